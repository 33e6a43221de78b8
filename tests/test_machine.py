"""microtrain.machine: every figure names the CPU model that made it, not just the architecture."""

from __future__ import annotations

from pathlib import Path

import torch

from microtrain import machine


def test_cpu_model_reads_the_model_name_line(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx512f\n")
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real_read_text(cpuinfo if str(self) == "/proc/cpuinfo" else self,
                                                                                 *a, **k))
    assert machine.cpu_model() == "AMD EPYC 9B14"


def test_cpu_model_falls_back_without_proc_cpuinfo(monkeypatch):
    def missing(self, *args, **kwargs):
        raise FileNotFoundError(self)

    monkeypatch.setattr(Path, "read_text", missing)
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "arm64")
    assert machine.cpu_model() == "arm64"


def test_machine_info_names_device_threads_and_versions():
    info = machine.machine_info(torch.device("cpu"))
    assert info["device"] == "cpu" and info["gpu"] is None  # a CPU run names no GPU, even on a GPU machine
    assert info["torch_threads"] == torch.get_num_threads() and 1 <= info["usable_cores"] <= info["cores"]
    assert info["torch"] == torch.__version__ and info["microtrain"]
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # AVX2 or AVX512: twice the speed apart
