"""Where a figure was measured: every run's run_info.json, compare's header and the benchmarks' JSON name
the machine with this one function, so a number can always be traced to the CPU (or GPU) that made it.
``platform.processor()`` alone says only "x86_64" on Linux, which cannot tell an AMD VM from an Intel one."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

import microtrain


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels use here (AVX2, AVX512, ...). Our VMs all call themselves
    "AMD EPYC" yet one has AVX-512 and one only AVX2, and this work runs about twice as fast on the first."""
    with contextlib.suppress(AttributeError, RuntimeError):
        return str(torch.backends.cpu.get_cpu_capability())
    return "unknown"


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Where a run trained or a benchmark ran: platform, CPU, cores, GPU, torch threads, versions."""
    gpu = None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    elif device is None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device) if device is not None else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "microtrain": microtrain.__version__,
    }
