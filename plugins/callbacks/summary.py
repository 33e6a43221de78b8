"""Callback ``summary``: at the end of a run, a table of per-class accuracy (beside a reference,
such as the seed document's figures, when the recipe gives one), best and last-5-mean test
accuracy, and wall time; also written to ``<run dir>/summary.json``. The wall time is the run's: a
resumed run adds the seconds its earlier sessions spent, kept in the checkpoint, as the report does."""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Annotated, Any

import microtrain
from microtrain import Check, Range, RecipeError


def evaluated_rows(history: list[dict]) -> list[dict]:
    """The epochs that were evaluated (recipe field ``eval_every``): those with a test accuracy."""
    return [row for row in history if isinstance(row.get("test_acc"), (int, float)) and math.isfinite(row["test_acc"])]


def summarize(history: list[dict], wall_seconds: float | None = None, last: int = 5) -> dict:
    """The figures a person reports for a run, from its per-epoch metrics. Test figures come from the evaluated
    epochs: with ``eval_every: 1`` (the default) every epoch, else ``last`` means the last evaluations, whose epochs
    ``last_mean_epochs`` lists; a run stopped before any evaluation has None for them."""
    evaluated = evaluated_rows(history)
    tail = evaluated[-last:]
    final = evaluated[-1] if evaluated else {}
    validation = {}
    if evaluated and all("val_acc" in row for row in evaluated):  # a validation split: the honest way to pick an epoch
        best_val = max(evaluated, key=lambda row: row["val_acc"])
        validation = {"best_val_acc": best_val["val_acc"], "best_val_epoch": best_val["epoch"],
                      "test_acc_at_best_val": best_val["test_acc"], "final_val_acc": final["val_acc"]}
    best = max(evaluated, key=lambda row: row["test_acc"]) if evaluated else {}
    return {
        "epochs": len(history),
        "best_test_acc": best.get("test_acc"),
        "best_epoch": best.get("epoch"),
        f"last{last}_mean_test_acc": statistics.fmean(row["test_acc"] for row in tail) if tail else None,
        "last_mean_epochs": [row["epoch"] for row in tail],
        "final_test_acc": final.get("test_acc"),
        "final_epoch": final.get("epoch"),
        "final_per_class_acc": final.get("per_class_acc", {}),
        "mean_epoch_seconds": statistics.fmean(row["epoch_seconds"] for row in history),
        "mean_train_images_per_second": statistics.fmean(row["train_images_per_second"] for row in history),
        "wall_seconds": wall_seconds,
        **validation,
    }


def epochs_text(epochs: list[int]) -> str:
    """'last 5 epochs' when they follow each other, else 'epochs 30, 35, 40'."""
    if epochs and epochs == list(range(epochs[0], epochs[0] + len(epochs))):
        return f"last {len(epochs)} epoch{'s' if len(epochs) > 1 else ''}"
    return "epochs " + ", ".join(str(epoch) for epoch in epochs)


class Summary:
    def __init__(self, *, reference: dict | None = None, reference_name: str = "reference", last: int = 5):
        self.reference = reference or {}
        self.reference_name = reference_name
        self.last = last
        self.wall_before = 0.0  # seconds spent in earlier sessions of a resumed run
        self.start = time.perf_counter()

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.start

    @microtrain.hookimpl
    def before_fit(self, state):
        self.start = time.perf_counter()

    @microtrain.hookimpl
    def on_checkpoint_save(self, state, checkpoint):
        checkpoint["plugins"]["summary"] = {"wall_seconds": self._wall()}

    @microtrain.hookimpl
    def on_checkpoint_load(self, state, checkpoint):
        self.wall_before = float(checkpoint.get("plugins", {}).get("summary", {}).get("wall_seconds", 0.0))

    @microtrain.hookimpl
    def after_fit(self, state):
        if not state.is_main or not state.history:
            return
        from rich.console import Console
        from rich.table import Table

        summary = summarize(state.history, self._wall(), self.last)
        summary["resumed_from_epoch"] = state.start_epoch - 1 if state.start_epoch > 1 else None
        (state.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        console = Console()
        wall = (f"wall time {summary['wall_seconds'] / 60:.1f} min"
                f"{' (all sessions of the run)' if summary['resumed_from_epoch'] else ''}, "
                f"{summary['mean_train_images_per_second']:.0f} train img/s")
        if summary["final_test_acc"] is None:  # stopped before its first evaluation
            console.print(f"no epoch was evaluated (eval_every {state.eval_every}); {wall}", highlight=False)
            return
        table = Table(title=f"{state.recipe['name']}: per-class test accuracy after epoch {summary['final_epoch']}",
                      title_justify="left")
        table.add_column("class")
        table.add_column("accuracy %", justify="right")
        if self.reference:
            table.add_column(f"{self.reference_name} %", justify="right")
        for name, acc in summary["final_per_class_acc"].items():
            row = [name, f"{acc:.1f}"]
            if self.reference:
                ref = self.reference.get(name)
                row.append("-" if ref is None else f"{ref:g}")
            table.add_row(*row)
        console.print(table)
        key = f"last{self.last}_mean_test_acc"
        console.print(
            f"test accuracy: final {summary['final_test_acc']:.2f}%, best {summary['best_test_acc']:.2f}% (epoch "
            f"{summary['best_epoch']}), mean of {epochs_text(summary['last_mean_epochs'])} {summary[key]:.2f}%; {wall}",
            highlight=False,
        )
        if "best_val_acc" in summary:
            console.print(f"validation accuracy: best {summary['best_val_acc']:.2f}% (epoch {summary['best_val_epoch']}, "
                          f"test accuracy then {summary['test_acc_at_best_val']:.2f}%), final {summary['final_val_acc']:.2f}%",
                          highlight=False)


def check_reference(table: dict[Any, Any], where: str) -> dict[str, Any]:
    """Class name -> accuracy in percent; names are text (a folder named 3 is class '3')."""
    for name, accuracy in table.items():
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not math.isfinite(accuracy) \
                or not 0 <= accuracy <= 100:
            raise RecipeError(f"{where}.{name}: expected an accuracy in percent (0 to 100), got {accuracy!r}; write the "
                              f"reference as {{class name: percent, ...}}")
    return {str(name): accuracy for name, accuracy in table.items()}


REFERENCE = Annotated[dict, Check(check_reference, "(class name: accuracy %, 0 to 100)")] | None


def build_summary(*, reference: REFERENCE = None, reference_name: str = "reference",
                  last: Annotated[int, Range(ge=1)] = 5) -> Summary:
    """End-of-run table: per-class accuracy, best and mean accuracy of the last ``last`` epochs, wall time
    (summary.json); ``reference`` adds a column of per-class figures to compare with."""
    return Summary(reference=reference, reference_name=reference_name, last=last)


@microtrain.hookimpl
def register_components(registry):
    registry.callback("summary", build_summary)
