"""Callback ``report`` and command ``microtrain report RUN_DIR``: the pictures and tables a person
reads after a run, written to ``<run dir>/report/`` (see the package's docstring for the files).

The callback records the learning rate per step and the run's facts, and writes the report at
``after_fit``: one pass of the evaluation model over the test split (through the engine's
evaluation loop, with a collector that keeps the most confident mistakes) and one batch of the
train loader. On an error or Ctrl-C it writes what exists, without reading the loaders. The
command rebuilds the run from its recipe.yaml and checkpoints/last.pt (with the callbacks that
take part in evaluation, such as EMA and TTA) and writes the same report. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch

import microtrain
from microtrain import MicrotrainError, Range, machine_info
from microtrain_plugins.callbacks.report.predictions import MistakeCollector
from microtrain_plugins.callbacks.report.render import (
    LR_STEPS,
    RUN_INFO,
    components_of,
    make_report,
    write_text_atomically,
)

FOLDER = "report"


class Report:
    """Records the learning rate per step and the run's facts; writes the report at the end."""

    def __init__(self, *, mistakes: int = 24, samples: int = 32):
        self.mistakes = mistakes
        self.samples = samples
        self.lr_steps: list[float] = []
        self.wall_before = 0.0  # seconds spent in earlier sessions of a resumed run
        self.start: float | None = None
        self.run_info: dict[str, Any] = {}

    def _wall(self) -> float:
        return self.wall_before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    @microtrain.hookimpl
    def before_fit(self, state):
        self.start = time.perf_counter()
        del self.lr_steps[state.step:]  # a resumed run continues from the checkpoint's step
        if not state.is_main:
            return
        self.run_info = {
            **machine_info(state.device),
            "parameters": sum(p.numel() for p in state.unwrapped_model.parameters()),
            "components": components_of(state.recipe),
            "world_size": state.world_size,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_seconds": None,
        }
        folder = state.run_dir / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(folder / RUN_INFO, json.dumps(self.run_info, indent=1) + "\n")

    @microtrain.hookimpl
    def before_batch(self, state):
        """Read here rather than after the step: after it, the schedule already moved to the next step's lr."""
        if state.is_main:
            self.lr_steps.append(state.optimizer.param_groups[0]["lr"])

    @microtrain.hookimpl
    def on_checkpoint_save(self, state, checkpoint):
        checkpoint["plugins"]["report"] = {
            "lr_steps": torch.tensor(self.lr_steps, dtype=torch.float64),
            "steps_per_epoch": state.steps_per_epoch,
            "wall_seconds": self._wall(),
        }

    @microtrain.hookimpl
    def on_checkpoint_load(self, state, checkpoint):
        saved = checkpoint.get("plugins", {}).get("report")
        if saved:
            self.lr_steps = [float(v) for v in saved["lr_steps"].tolist()][: state.step]
            self.wall_before = float(saved.get("wall_seconds", 0.0))

    @microtrain.hookimpl
    def after_fit(self, state):
        if not state.is_main:
            return
        notes = []
        if state.world_size > 1:
            notes.append(f"Distributed run ({state.world_size} ranks): the misclassified images come from rank 0's share "
                         "of the test split; the confusion matrix covers all of it.")
        mistakes = MistakeCollector(self.mistakes, state.data.mean, state.data.std)
        figures = microtrain.evaluate(state, state.unwrapped_eval_model, collect=mistakes, all_ranks=False)
        last = state.history[-1].get("confusion") if state.history and state.status == "completed" else None
        self._write(state, predictions=mistakes.found, confusion=last if last is not None else figures["confusion"],
                    train_loader=state.train_loader, notes=notes)

    @microtrain.hookimpl
    def on_error(self, state, error):
        """From what exists, without reading the loaders (their workers may be gone after Ctrl-C)."""
        if not state.is_main or self.start is None:
            return
        self._write(state, status=state.status if state.status != "running" else "failed",
                    notes=[f"The run stopped during epoch {state.epoch} ({type(error).__name__})."])
        print(f"microtrain: partial report written to {state.run_dir / FOLDER / 'report.md'}", file=sys.stderr)

    def _write(self, state, *, notes: list[str], status: str | None = None, **sources: Any) -> dict[str, Any]:
        self.run_info["wall_seconds"] = self._wall()
        return make_report(state.run_dir / FOLDER, recipe=state.recipe, history=state.history, classes=state.data.classes,
                           mean=state.data.mean, std=state.data.std, run_info=self.run_info, lr_steps=self.lr_steps,
                           steps_per_epoch=state.steps_per_epoch, status=status or state.status, notes=notes,
                           samples=self.samples, **sources)


GRID_CELLS = Range(ge=0, le=256)  # one picture each in a grid figure


def build_report(*, mistakes: Annotated[int, GRID_CELLS] = 24, samples: Annotated[int, GRID_CELLS] = 32) -> Report:
    """Run report in <run dir>/report/: curves, per-class accuracy, confusion matrix, the ``mistakes`` most
    confidently misclassified test images and ``samples`` augmented training images."""
    return Report(mistakes=mistakes, samples=samples)


def report_run_dir(run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Rebuild data, loaders and model from ``run_dir`` and write its report again (no training)."""
    from microtrain_plugins.callbacks.metrics_log import read_metrics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MicrotrainError(f"run dir '{run_dir}' not found; pass the folder of a run, e.g. runs/<name>/<stamp>")
    history = read_metrics(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise MicrotrainError(f"'{run_dir}' has no recipe.yaml; pass the run dir of a microtrain run")
    checkpoint = microtrain.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    # Only the callbacks that take part in evaluation (EMA weights, test-time augmentation): the figures are the run's.
    run = microtrain.build_run(recipe_path, overrides, run_dir=run_dir, callbacks="evaluation", checkpoint=checkpoint)
    state, recipe = run.state, run.recipe
    mistakes = MistakeCollector(_report_options(recipe).get("mistakes", 24), state.data.mean, state.data.std)
    figures = run.evaluate(collect=mistakes)
    model = state.unwrapped_eval_model

    folder = run_dir / FOLDER
    info_path = folder / RUN_INFO
    notes = []
    try:
        run_info = json.loads(info_path.read_text())
        if not isinstance(run_info, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError):
        run_info = {**machine_info(state.device), "wall_seconds": None}
        notes.append("The run recorded no machine (no report/run_info.json): machine and versions are those of the "
                     "`microtrain report` command.")
    run_info["parameters"] = sum(p.numel() for p in model.parameters())
    run_info["components"] = components_of(recipe)
    if run_info.get("wall_seconds") is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            run_info["wall_seconds"] = json.loads((run_dir / "summary.json").read_text()).get("wall_seconds")

    lr_steps, steps_per_epoch = _saved_lr_steps(folder, checkpoint)
    if int(checkpoint.get("epoch", -1)) != int(history[-1]["epoch"]):
        notes.append(f"The checkpoint holds epoch {checkpoint.get('epoch')} while the metrics log ends at epoch "
                     f"{history[-1]['epoch']}: per-class figures are those of the checkpoint's weights.")
    found = microtrain.run_status(run_dir)  # a 'running' whose process is gone (SIGKILL) is not the run's status
    status = found.status or "completed"
    if found.status != found.recorded:
        notes.append(f"The run {found.message}.")
    samples = _report_options(recipe).get("samples", 32)
    return make_report(folder, recipe=recipe, history=history, classes=state.data.classes, mean=state.data.mean,
                       std=state.data.std, run_info=run_info, predictions=mistakes.found, confusion=figures["confusion"],
                       train_loader=state.train_loader, lr_steps=lr_steps, steps_per_epoch=steps_per_epoch, status=status,
                       notes=notes, samples=samples)


def _saved_lr_steps(folder: Path, checkpoint: dict[str, Any]) -> tuple[list[float] | None, int | None]:
    """The per-step learning rates: report/lr_steps.json, else the checkpoint's report entry, else none."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved = json.loads((folder / LR_STEPS).read_text())
        return [float(v) for v in saved["lr"]], int(saved["steps_per_epoch"])
    entry = checkpoint.get("plugins", {}).get("report")
    if entry and len(entry.get("lr_steps", [])):
        return [float(v) for v in entry["lr_steps"].tolist()], int(entry["steps_per_epoch"])
    return None, None


def _report_options(recipe: dict[str, Any]) -> dict[str, int]:
    for name, options in microtrain.plugin_entries(recipe.get("plugins") or []):
        if name == "report" and options is not None:
            return {k: int(v) for k, v in options.items() if k in ("mistakes", "samples")}
    return {}


def cmd_report(args) -> int:
    record = report_run_dir(args.run_dir, args.overrides)
    folder = Path(args.run_dir) / FOLDER
    print(f"report written to {folder / 'report.md'} ({', '.join(record['files'])})")
    return 0


@microtrain.hookimpl
def register_commands(subparsers):
    parser = subparsers.add_parser(
        "report", help="regenerate a run's report (plots, tables) from its run dir, without training",
        description="Rebuild data, loaders and model from RUN_DIR/recipe.yaml, load checkpoints/last.pt, evaluate the "
                    "test split and write RUN_DIR/report/ (curves from metrics.jsonl).")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run dir, e.g. runs/cifar10_dsconv/<stamp>")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="change the saved recipe where this machine differs, e.g. data.root=/data device=cpu")
    parser.set_defaults(handler=cmd_report)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("report", build_report)
