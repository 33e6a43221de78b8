"""benchmarks/eval_batch.py: every asked-for size measured, the best round kept, JSON written with machine and command."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_eval_batch_benchmark_measures_each_size_and_writes_json(tmp_path, capsys, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("eval_batch", REPO / "benchmarks" / "eval_batch.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    calls = []
    monkeypatch.setattr(bench, "measure", lambda model, batch, cl, images: calls.append(batch) or float(batch + len(calls)))
    out = tmp_path / "eval.json"
    assert bench.main(["--recipe", str(REPO / "recipes" / "cifar10_dsconv_fast.yaml"), "--sizes", "8", "16",
                       "--rounds", "2", "--json", str(out)]) == 0
    assert calls == [8, 16, 8, 16]  # interleaved rounds
    report = json.loads(out.read_text())
    assert report["results"] == [{"eval_batch_size": 8, "images_per_second": 11.0},  # best of rounds: 9, 11
                                 {"eval_batch_size": 16, "images_per_second": 20.0}]
    assert report["machine"]["cpu"] and report["command"].startswith("python benchmarks/eval_batch.py --recipe")
    assert "eval_batch_size    16:" in capsys.readouterr().out


def test_measure_times_real_forward_passes() -> None:
    spec = importlib.util.spec_from_file_location("eval_batch", REPO / "benchmarks" / "eval_batch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    model(torch.zeros(1, 3, 32, 32))
    assert bench.measure(model.eval(), 4, True, 8) > 0
