"""What a comparison compares, and how it is read from a finished run dir.

A metric is a name: ``final_<column>`` (the last epoch), ``last<N>_<column>`` (the mean of the last N
epochs), ``best_<column>`` (the best epoch: highest, or lowest for a loss or a time), ``time_to:<T>``
(training seconds until test accuracy first reaches T%) or ``epochs_to:<T>``. A column is a field of
metrics.jsonl (``test_acc``, ``test_loss``, ``train_acc``, ...).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from microtrain import MicrotrainError
from microtrain_plugins.callbacks.metrics_log import read_metrics

LOGGED_COLUMNS = ("test_acc", "test_loss", "train_acc", "train_loss", "lr", "epoch_seconds", "train_images_per_second")
"""The numbers every run logs each epoch (the engine and the metrics callback); a plugin may add its own."""

VALIDATION_COLUMNS = ("val_acc", "val_loss")
"""Logged besides, each epoch, by a run whose recipe holds out a validation split (``val_fraction`` > 0)."""

EXAMPLES = "last5_test_acc, final_test_acc, best_test_acc, time_to:85 or epochs_to:85"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # final, last, best, time_to, epochs_to
    column: str
    window: int = 1
    target: float | None = None

    @property
    def lower_is_better(self) -> bool:
        return self.kind in ("time_to", "epochs_to") or "loss" in self.column or self.column.endswith("seconds")

    @property
    def unit(self) -> str:
        if self.kind == "time_to":
            return "s"
        if self.kind == "epochs_to":
            return "epochs"
        if self.column.endswith("_acc"):
            return "points"
        return "s" if self.column.endswith("seconds") else ""

    @property
    def description(self) -> str:
        if self.kind == "time_to":
            return f"training seconds until test accuracy first reaches {self.target:g}% (summed epoch_seconds)"
        if self.kind == "epochs_to":
            return f"epochs until test accuracy first reaches {self.target:g}%"
        if self.kind == "final":
            return f"{self.column} of the last epoch"
        if self.kind == "last":
            return f"mean {self.column} of the last {self.window} epochs"
        return f"{'lowest' if self.lower_is_better else 'highest'} {self.column} of any epoch"


def parse_metric(text: str) -> Metric:
    """A metric name -> Metric; a name that means nothing is one line naming the forms that do."""
    match = re.fullmatch(r"(time_to|epochs_to):(\d+(?:\.\d+)?)", text)
    if match:
        target = float(match.group(2))
        if not 0 < target <= 100:
            raise MicrotrainError(f"--metric {text}: the target is a test accuracy in percent, above 0 and at most 100; "
                                  "e.g. time_to:85")
        return Metric(text, match.group(1), "test_acc", target=target)
    match = re.fullmatch(r"(final|best)_(\w+)", text) or re.fullmatch(r"last(\d+)_(\w+)", text)
    if match is None:
        raise MicrotrainError(f"--metric {text!r} is not a metric; use {EXAMPLES} (any metrics.jsonl column after "
                              "final_, best_ or lastN_)")
    if match.group(1).isdigit():
        window = int(match.group(1))
        if window < 1:
            raise MicrotrainError(f"--metric {text}: lastN needs N of 1 or more, e.g. last5_test_acc")
        return Metric(text, "last", match.group(2), window=window)
    return Metric(text, match.group(1), match.group(2))


def logged_columns(recipe: dict[str, Any]) -> tuple[str, ...]:
    """The columns a run of this resolved recipe logs each epoch, whatever its plugins."""
    holds_out = float(recipe.get("val_fraction") or 0) > 0
    return LOGGED_COLUMNS + (VALIDATION_COLUMNS if holds_out else ())


def check_logged(metric: Metric, recipes: dict[str, dict[str, Any]]) -> None:
    """Runs still to train must log the metric's column: one every run logs, or a validation column when every
    recipe (``{label: resolved recipe}``) holds out a validation split. A plugin's own column can be compared over
    run dirs that hold it, with --runs-a/--runs-b."""
    for label, recipe in recipes.items():
        columns = logged_columns(recipe)
        if metric.column in columns:
            continue
        if metric.column in VALIDATION_COLUMNS:
            raise MicrotrainError(f"--metric {metric.name}: {label} holds out no validation split (val_fraction is 0), so "
                                  f"its runs log no '{metric.column}'; add val_fraction=0.1 for both sides (a stratified "
                                  "hold-out of the training images), or compare best_test_acc")
        raise MicrotrainError(f"--metric {metric.name}: runs do not log '{metric.column}' (every run logs "
                              f"{', '.join(columns)}); a plugin's own column can be compared over finished "
                              "run dirs with --runs-a/--runs-b")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def target_row(metric: Metric, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first epoch whose test accuracy reaches the target (None: never)."""
    return next((row for row in rows if _number(row.get("test_acc")) >= metric.target), None)


def metric_value(metric: Metric, rows: list[dict[str, Any]]) -> float | None:
    """The metric of one run from its metrics.jsonl rows; None when a target was never reached."""
    if metric.kind in ("time_to", "epochs_to"):
        reached = target_row(metric, rows)
        if reached is None:
            return None
        if metric.kind == "epochs_to":
            return float(reached["epoch"])
        return sum(_number(row.get("epoch_seconds")) for row in rows if row["epoch"] <= reached["epoch"])
    values = [_number(row.get(metric.column)) for row in metric_rows(metric, rows)]
    return float(sum(values) / len(values))


def metric_rows(metric: Metric, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epochs the metric reads; per-class figures are read from the same ones (the last for a target).

    Test and validation columns exist only for evaluated epochs (recipe field ``eval_every``): ``final_`` reads the
    last evaluated epoch, ``best_`` every evaluated one, and ``lastN_`` needs each of the last N epochs evaluated."""
    if metric.kind == "last":
        tail = rows[-metric.window:]
        missing = [row["epoch"] for row in tail if metric.column not in row]
        if missing:
            raise MicrotrainError(f"--metric {metric.name}: epoch(s) {', '.join(map(str, missing))} of a run were not "
                                  f"evaluated (eval_every > 1), so there is no mean of the last {metric.window}; compare "
                                  f"final_{metric.column}, or run with eval_every=1")
        return tail
    if metric.kind == "best":
        pick = min if metric.lower_is_better else max
        usable = [row for row in rows if math.isfinite(_number(row.get(metric.column)))]
        return [pick(usable, key=lambda row: _number(row.get(metric.column)))] if usable else rows[-1:]
    holding = [row for row in rows if metric.column in row]
    return holding[-1:] if holding else rows[-1:]


def per_class_key(metric: Metric) -> str:
    """The per-class column of the split the metric reads: validation for a ``val_`` column, else test."""
    return "val_per_class_acc" if metric.column.startswith("val_") else "per_class_acc"


def per_class(metric: Metric, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per-class accuracy on the metric's split over the metric's epochs (nan for a class without images)."""
    chosen = metric_rows(metric, rows)
    key = per_class_key(metric)
    classes = list((chosen[-1].get(key) or {}).keys())
    return {name: float(np.mean([_number((row.get(key) or {}).get(name)) for row in chosen])) for name in classes}


@dataclass
class RunFigures:
    """What a comparison reads from one finished run."""

    run_dir: Path
    seed: int
    recipe: dict[str, Any]
    value: float | None  # the metric (None: the target was not reached)
    per_class: dict[str, float]
    epochs: int
    train_seconds: float
    train_images_per_second: float  # mean over epochs of train images/s
    wall_seconds: float | None  # from the report callback's run_info.json (every session of a resumed run)
    columns: set[str]

    def as_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "run_dir": str(self.run_dir), "value": self.value, "epochs": self.epochs,
                "train_seconds": self.train_seconds, "train_images_per_second": self.train_images_per_second,
                "wall_seconds": self.wall_seconds, "per_class": self.per_class}


def read_status(run_dir: Path) -> str | None:
    """status.json's status, or None when there is none (a run dir that never started)."""
    try:
        return str(json.loads((run_dir / "status.json").read_text()).get("status"))
    except (OSError, ValueError, AttributeError):
        return None


def read_recipe(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "recipe.yaml"
    try:
        recipe = yaml.safe_load(path.read_text())
    except OSError:
        raise MicrotrainError(f"'{run_dir}' has no recipe.yaml; pass the run dir of a microtrain run") from None
    except yaml.YAMLError:
        raise MicrotrainError(f"{path} is not readable YAML; pass the run dir of a microtrain run") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("seed"), int):
        raise MicrotrainError(f"{path} is not a resolved microtrain recipe (no seed); pass the run dir of a microtrain run")
    return recipe


def read_finished_run(run_dir: Path, metric: Metric) -> RunFigures:
    """A finished run's figures; a run that did not finish, or lacks the metric, is one clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MicrotrainError(f"run dir '{run_dir}' not found; pass folders of finished microtrain runs")
    recipe = read_recipe(run_dir)
    status = read_status(run_dir)
    if status != "completed":
        raise MicrotrainError(f"run dir '{run_dir}' did not finish (status {status or 'unknown'}); finish it with "
                              f"microtrain run <recipe> --resume {run_dir}, or leave it out")
    rows = read_metrics(run_dir)
    columns = set().union(*(row.keys() for row in rows))
    if metric.column not in columns:
        raise MicrotrainError(f"--metric {metric.name}: '{run_dir}' logs no '{metric.column}' (it logs "
                              f"{', '.join(sorted(c for c in columns if not c.endswith(('per_class_acc', 'confusion'))))}); "
                              "pick a metric both sides log")
    wall = None
    try:
        wall = _number(json.loads((run_dir / "report" / "run_info.json").read_text()).get("wall_seconds"))
    except (OSError, ValueError, AttributeError):
        pass
    speeds = [_number(row.get("train_images_per_second")) for row in rows]
    return RunFigures(run_dir=run_dir, seed=recipe["seed"], recipe=recipe, value=metric_value(metric, rows),
                      per_class=per_class(metric, rows), epochs=len(rows),
                      train_seconds=sum(_number(row.get("epoch_seconds")) for row in rows),
                      train_images_per_second=float(np.nanmean(speeds)) if speeds else math.nan,
                      wall_seconds=wall if wall is not None and math.isfinite(wall) else None, columns=columns)

