"""``eval_every``: evaluation after every N-th epoch and the last; everything that reads test figures copes with
the epochs between, which log train figures only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE

import microtrain
from microtrain import MicrotrainError, RecipeError
from microtrain_plugins.compare.metrics import metric_value, parse_metric, per_class

RECIPE = {**TINY_RECIPE, "epochs": 5, "eval_every": 2,
          "plugins": ["progress", "metrics", "checkpoint", "report", {"ema": {"decay": 0.9}}, "summary"]}


class EvalRecorder:
    def __init__(self) -> None:
        self.before_eval_epochs: list[int] = []
        self.on_eval_epochs: list[int] = []
        self.evaluated_at_epoch_end: list[bool] = []

    @microtrain.hookimpl
    def before_eval(self, state) -> None:
        self.before_eval_epochs.append(state.epoch)

    @microtrain.hookimpl
    def on_eval(self, state) -> None:
        self.on_eval_epochs.append(state.epoch)

    @microtrain.hookimpl
    def after_epoch(self, state) -> None:
        self.evaluated_at_epoch_end.append("test_acc" in state.metrics)


def test_the_engine_evaluates_every_nth_epoch_and_the_last(tmp_path: Path) -> None:
    recorder = EvalRecorder()
    (tmp_path / "run").mkdir()
    run = microtrain.build_run({**RECIPE, "plugins": ["metrics"]}, run_dir=tmp_path / "run",
                               extra_plugins={"recorder": recorder})
    state = run.engine.fit()
    assert recorder.before_eval_epochs == recorder.on_eval_epochs == [2, 4, 5]
    assert recorder.evaluated_at_epoch_end == [False, True, False, True, True]
    assert [("test_acc" in row) for row in state.history] == recorder.evaluated_at_epoch_end
    assert all("train_acc" in row and "epoch_seconds" in row for row in state.history)


def test_a_run_with_eval_every_logs_checkpoints_reports_and_summarises_the_evaluated_epochs(tmp_path: Path,
                                                                                           capsys) -> None:
    from microtrain.run import run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert run(recipe, [], run_dir=tmp_path / "run") == 0
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if "test_acc" in row] == [2, 4, 5]
    assert not {"test_loss", "per_class_acc", "confusion"} & set(rows[0])
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["epoch"] in (2, 4, 5)
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluated = [row for row in rows if "test_acc" in row]
    assert summary["last_mean_epochs"] == [2, 4, 5] and summary["final_epoch"] == 5
    assert summary["last5_mean_test_acc"] == pytest.approx(sum(row["test_acc"] for row in evaluated) / 3)
    assert summary["best_test_acc"] == max(row["test_acc"] for row in evaluated)
    out = capsys.readouterr().out.replace("\n", " ")
    assert "mean of epochs 2, 4, 5" in out
    lines = [line for line in out.split("epoch ") if line.lstrip().startswith(("1/5", "2/5"))]
    assert "test loss" not in lines[0] and "test loss" in lines[1]
    report = (run_dir / "report" / "report.md").read_text()
    assert "| mean test accuracy, epochs 2, 4, 5 |" in report
    assert "| 1 |" in report and "| - | - |" in report  # the last-epochs table: no test figures for epoch 1
    assert (run_dir / "report" / "curves.png").stat().st_size > 0


def test_compare_reads_the_evaluated_epochs_and_refuses_a_last_n_mean_over_gaps() -> None:
    rows = [{"epoch": 1, "train_acc": 40.0}, {"epoch": 2, "train_acc": 50.0, "test_acc": 45.0,
                                               "per_class_acc": {"cat": 40.0}},
            {"epoch": 3, "train_acc": 60.0}]
    final = parse_metric("final_test_acc")
    assert metric_value(final, rows) == 45.0 and per_class(final, rows) == {"cat": 40.0}
    assert metric_value(parse_metric("final_train_acc"), rows) == 60.0
    assert metric_value(parse_metric("best_test_acc"), rows) == 45.0
    with pytest.raises(MicrotrainError, match=r"epoch\(s\) 1, 3 of a run were not evaluated .*final_test_acc"):
        metric_value(parse_metric("last3_test_acc"), rows)
    assert metric_value(parse_metric("last3_train_acc"), rows) == 50.0


def test_eval_every_is_checked_when_the_recipe_is_resolved() -> None:
    with pytest.raises(RecipeError, match="eval_every"):
        microtrain.build_run({**RECIPE, "eval_every": 0}, callbacks="none")


def test_time_to_accuracy_reads_the_evaluated_epochs(tmp_path: Path, monkeypatch) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("time_to_accuracy", REPO / "benchmarks" / "time_to_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    rows = [{"epoch": 1, "epoch_seconds": 10.0}, {"epoch": 2, "epoch_seconds": 10.0, "test_acc": 86.0, "wall_seconds": 30.0},
            {"epoch": 3, "epoch_seconds": 10.0}, {"epoch": 4, "epoch_seconds": 10.0, "test_acc": 87.0, "wall_seconds": 55.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = bench.analyse(tmp_path, 85.0)
    assert (result["epoch_to_target"], result["seconds_to_target"], result["time_kind"]) == (2, 30.0, "wall_seconds")
    assert (result["final_test_acc"], result["best_test_acc"], result["total_seconds"]) == (87.0, 87.0, 55.0)

    stopped = tmp_path / "stopped"  # stopped before its first evaluation: one line saying so, not an IndexError
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert bench.main(["--runs", str(tmp_path), str(stopped)]) == 1
    with pytest.raises(MicrotrainError, match="no evaluated epoch"):
        bench.analyse(stopped, 85.0)


def test_evaluating_less_often_changes_neither_training_nor_what_a_checkpoint_holds(tmp_path: Path) -> None:
    """Same seed, eval_every 1 against 3: the same train figures every epoch, the same final test figures, and the
    checkpoint of epoch 2 (evaluated in one run, not in the other) holds the same EMA with re-estimated BatchNorm."""
    from microtrain.run import run

    recipe = tmp_path / "recipe.yaml"
    plugins = ["metrics", {"checkpoint": {"keep_previous": True}}, {"ema": {"decay": 0.9}}, {"tta": {"flip": True}}]
    recipe.write_text(yaml.safe_dump({**RECIPE, "epochs": 3, "plugins": plugins}))
    figures, emas = {}, {}
    for every in (1, 3):
        run_dir = tmp_path / f"every{every}"
        assert run(recipe, [f"eval_every={every}"], run_dir=run_dir) == 0
        figures[every] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        emas[every] = microtrain.load_checkpoint(run_dir / "checkpoints" / "previous.pt")["plugins"]["ema"]["state_dict"]
    for row_1, row_3 in zip(figures[1], figures[3], strict=True):
        assert (row_1["train_loss"], row_1["train_acc"]) == (row_3["train_loss"], row_3["train_acc"])
    assert (figures[1][-1]["test_acc"], figures[1][-1]["test_loss"]) == (figures[3][-1]["test_acc"], figures[3][-1]["test_loss"])
    assert "test_acc" not in figures[3][1]
    assert emas[1].keys() == emas[3].keys()
    assert all(torch.equal(emas[1][name], emas[3][name]) for name in emas[1])
