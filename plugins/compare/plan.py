"""Before anything runs: resolve both recipes, check they can be compared, decide for every (side, seed)
whether to train, resume or reuse its run dir, and estimate what the training left to do costs.

Run dirs are ``OUT/a/seed<S>`` and ``OUT/b/seed<S>``: a fresh one is trained with ``--run-dir``, a
completed one is reused, anything else (interrupted, failed, still marked running) continues with
``--resume``, so a stopped comparison picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import microtrain
from microtrain import MicrotrainError
from microtrain_plugins.callbacks.metrics_log import read_metrics
from microtrain_plugins.compare.metrics import read_recipe, read_status

ASSUMED_IMAGES_PER_SECOND = 300.0
"""Train images/s assumed when no run of the recipe was measured here (the seed recipe on a 2-core CPU)."""
EVALUATION_SHARE = 0.2
"""Evaluation, checkpoints and the EMA's BatchNorm pass, as a share of an epoch's training time (an assumption)."""
STARTUP_SECONDS = 15.0
"""Per process: importing torch, loading the data, building the model (an assumption)."""
DATA_KEYS_IGNORED = ("root",)
"""Where the data lives differs between machines, not what it is."""
LOADER_KEYS_IGNORED = ("workers", "eval_batch_size")
IN_ORDER_DRAW_LOADERS = ("tensor", "dali")
"""Loaders that draw a batch's augmentation parameters transform by transform from one stream, in list order
(augment_spec.draw_batch), so a transform appended to the list leaves the draws of the ones before it alone."""
"""Loader options that change neither the training batches nor their augmentation draws."""


@dataclass
class Side:
    """One side of the comparison: a recipe, the overrides every one of its runs gets, and what resolving it told."""

    key: str  # "a" or "b"
    recipe_path: str
    overrides: list[str]
    recipe: dict[str, Any]  # resolved (its seed is replaced per run)
    classes: list[str]
    train_size: int
    registry: Any  # the components the recipe was resolved against (Run.registry)

    @property
    def name(self) -> str:
        return self.recipe["name"]

    def recipe_for(self, seed: int) -> dict[str, Any]:
        """The recipe a run of this seed saves as recipe.yaml, read back as YAML (as the saved one is)."""
        return yaml.safe_load(microtrain.dump_recipe({**self.recipe, "seed": seed}))


def resolve_side(key: str, recipe_path: str, overrides: list[str]) -> Side:
    """Resolve and build the recipe once (nothing trains or is written): checks it and gives its class list.

    A side whose recipe does not log metrics gets the ``metrics`` callback added, since the comparison reads
    metrics.jsonl."""
    if not Path(recipe_path).is_file():
        raise MicrotrainError(f"recipe '{recipe_path}' not found; pass the paths of two recipe files")
    run = microtrain.build_run(recipe_path, overrides, callbacks="none")
    if "metrics" not in [name for name, _ in microtrain.plugin_entries(run.recipe["plugins"])]:
        overrides = [*overrides, f"plugins={json.dumps([*run.recipe['plugins'], 'metrics'])}"]
        run = microtrain.build_run(recipe_path, overrides, callbacks="none")
    data = run.state.data
    return Side(key=key, recipe_path=recipe_path, overrides=overrides, recipe=run.recipe, classes=list(data.classes),
                train_size=len(data.train_labels), registry=run.registry)


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for k in sorted(set(a) | set(b), key=str) for key in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def without(section: dict[str, Any], ignored: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in ignored}


def check_same_data(data_a: dict[str, Any], data_b: dict[str, Any], classes_a: list[str], classes_b: list[str]) -> None:
    """The two sides must be evaluated on the same test set with the same classes."""
    changed = differences(without(data_a, DATA_KEYS_IGNORED), without(data_b, DATA_KEYS_IGNORED))
    if changed:
        shown = ", ".join(f"data.{key} is {_get(data_a, key)!r} in A and {_get(data_b, key)!r} in B" for key in changed[:3])
        raise MicrotrainError(f"A and B use different data ({shown}); compare recipes on the same dataset")
    if list(classes_a) != list(classes_b):
        raise MicrotrainError(f"A and B have different class lists (A: {_classes_text(classes_a)}; B: "
                              f"{_classes_text(classes_b)}); compare recipes on the same dataset and classes")


def loader_notes(loader_a: dict[str, Any], loader_b: dict[str, Any]) -> list[str]:
    """Pairing holds when both sides draw the same batches and augmentations; say so when they may not."""
    changed = differences(without(loader_a, LOADER_KEYS_IGNORED), without(loader_b, LOADER_KEYS_IGNORED))
    if not changed:
        return []
    appended = appended_transforms(loader_a, loader_b) if changed == ["augment"] else None
    if appended:
        side, names = appended
        return [f"{side}'s loader.augment appends {', '.join(names)} to the transforms both sides list: the same seed "
                f"still gives both the same batches and the same draws of the shared transforms (the "
                f"{loader_a.get('name')} loader draws them first, in list order); only {side}'s appended transforms "
                "draw their own."]
    shown = ", ".join(f"loader.{key}" for key in changed[:4])
    return [f"A and B differ in {shown}: the same seed no longer gives both the same batches and augmentation draws, "
            "so pairing removes less of the run-to-run variance."]


def appended_transforms(loader_a: dict[str, Any], loader_b: dict[str, Any]) -> tuple[str, list[str]] | None:
    """("A" or "B", names) when one side's augment list is the other's with transforms appended, on a loader whose
    draws of the shared transforms then stay the same; else None."""
    if loader_a.get("name") != loader_b.get("name") or loader_a.get("name") not in IN_ORDER_DRAW_LOADERS:
        return None
    list_a, list_b = list(loader_a.get("augment") or []), list(loader_b.get("augment") or [])
    side, shorter, longer = ("B", list_a, list_b) if len(list_b) > len(list_a) else ("A", list_b, list_a)
    if longer[:len(shorter)] != shorter:
        return None
    return side, [entry if isinstance(entry, str) else next(iter(entry), "?") for entry in longer[len(shorter):]]


def _get(mapping: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        mapping = mapping.get(part) if isinstance(mapping, dict) else None
    return mapping


def _classes_text(classes: list[str]) -> str:
    shown = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
    return f"{len(classes)} classes: {shown}"


@dataclass
class PlannedRun:
    side: Side
    seed: int
    run_dir: Path
    action: str  # train, resume or reuse
    epochs_left: int

    @property
    def label(self) -> str:
        return f"{self.side.key.upper()} seed {self.seed}"

    def command(self) -> list[str]:
        """The ``microtrain run`` process of this run (fresh: --run-dir; stopped: --resume)."""
        where = ["--run-dir", str(self.run_dir)] if self.action == "train" else ["--resume", str(self.run_dir)]
        return [sys.executable, "-m", "microtrain", "run", self.side.recipe_path, f"seed={self.seed}",
                *self.side.overrides, *where]


def plan_run(side: Side, seed: int, run_dir: Path) -> PlannedRun:
    """Train, resume or reuse ``run_dir``; a folder holding anything but this run is an error (nothing is deleted)."""
    epochs = side.recipe["epochs"]
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return PlannedRun(side, seed, run_dir, "train", epochs)
    if not (run_dir / "recipe.yaml").is_file():
        raise MicrotrainError(f"'{run_dir}' exists but holds no microtrain run (no recipe.yaml); delete it or pass another --out")
    # as --resume compares: an option added since the run dir was saved is not a change
    changed = differences(microtrain.with_defaults(read_recipe(run_dir), side.registry),
                          microtrain.with_defaults(side.recipe_for(seed), side.registry))
    if changed:
        raise MicrotrainError(f"'{run_dir}' holds a run of another recipe ({', '.join(changed[:4])} differ); pass another "
                              "--out, or delete that folder to train it again")
    if read_status(run_dir) == "completed":
        return PlannedRun(side, seed, run_dir, "reuse", 0)
    try:
        done = len(read_metrics(run_dir))
    except MicrotrainError:
        done = 0
    return PlannedRun(side, seed, run_dir, "resume", max(epochs - done, 0))


def plan_runs(sides: list[Side], seeds: list[int], out: Path) -> list[PlannedRun]:
    """Every (seed, side), seed by seed: an interrupted comparison then holds whole pairs."""
    return [plan_run(side, seed, out / side.key / f"seed{seed}") for seed in seeds for side in sides]


@dataclass
class Speed:
    images_per_second: float
    source: str  # where the figure comes from, or the assumption
    measured: bool


@dataclass
class Estimate:
    seconds: float
    runs: int
    epochs: int
    speeds: dict[str, Speed] = field(default_factory=dict)


def measured_speed(side: Side, out: Path, runs_root: Path = Path("runs")) -> Speed:
    """Train images/s of this recipe measured on this machine: median over the epochs of its newest run dir
    (this comparison's own first, then any run of a recipe of the same name under runs/), else the assumption."""
    found = sorted(out.glob(f"{side.key}/seed*/metrics.jsonl"), key=_mtime, reverse=True)
    others = [p for depth in range(2, 5) for p in runs_root.glob("/".join(["*"] * depth) + "/metrics.jsonl")]
    found += sorted((p for p in others if _recipe_name(p.parent) == side.name), key=_mtime, reverse=True)
    for path in found:
        try:
            rows = read_metrics(path.parent)
        except MicrotrainError:
            continue
        speeds = [row["train_images_per_second"] for row in rows if isinstance(row.get("train_images_per_second"), (int, float))]
        if speeds:
            return Speed(statistics.median(speeds), f"median of {len(speeds)} epochs in {path.parent}", True)
    return Speed(ASSUMED_IMAGES_PER_SECOND, f"assumed: no run of {side.name} found under {out / side.key} or {runs_root}",
                 False)


def _recipe_name(run_dir: Path) -> str | None:
    try:
        return read_recipe(run_dir).get("name")
    except MicrotrainError:
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def estimate(planned: list[PlannedRun], out: Path) -> Estimate:
    """Roughly how long the runs left to do take: epochs x (train images / measured img/s) x (1 + evaluation) +
    start-up, per process."""
    speeds = {}
    seconds, runs, epochs = 0.0, 0, 0
    for run in planned:
        if run.action == "reuse":
            continue
        speed = speeds.setdefault(run.side.key, measured_speed(run.side, out))
        epoch_seconds = run.side.train_size / speed.images_per_second * (1 + EVALUATION_SHARE)
        seconds += run.epochs_left * epoch_seconds + STARTUP_SECONDS
        runs += 1
        epochs += run.epochs_left
    return Estimate(seconds, runs, epochs, speeds)


def parse_duration(text: str) -> float:
    """``90m``, ``2h``, ``3600s`` or a plain number of hours -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if match is None:
        raise MicrotrainError(f"--budget {text!r} is not a duration; write it as 90m, 2h, 3600s or a number of hours")
    value = float(match.group(1))
    return value * {"s": 1, "m": 60, "h": 3600, "": 3600}[match.group(2)]


def duration_text(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
