"""The report's numbers: confusion matrix, per-class table and the run's summary (pure functions,
tested on hand-computed cases)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from microtrain import plugin_entries

LAST = 5  # "mean of the last 5 epochs", as the seed reports it


@dataclass
class ClassRow:
    """One class of the per-class table."""

    name: str
    count: int  # test images of this class
    correct: int
    accuracy: float  # percent; nan when the class has no test image
    confused_with: str | None  # the class most often predicted instead, None when never wrong
    confused_count: int


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows: true class, columns: predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def normalise_rows(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its total: the share of a true class given each prediction (empty rows stay 0)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


def class_table(confusion: np.ndarray, classes: Sequence[str]) -> list[ClassRow]:
    """Accuracy, count and most frequent wrong prediction of every class."""
    confusion = np.asarray(confusion, dtype=np.int64)
    rows = []
    for i, name in enumerate(classes):
        count, correct = int(confusion[i].sum()), int(confusion[i, i])
        wrong = confusion[i].copy()
        wrong[i] = -1
        j = int(wrong.argmax()) if len(classes) > 1 else i
        confused = int(wrong[j]) if j != i else 0
        rows.append(ClassRow(name, count, correct, 100.0 * correct / count if count else math.nan,
                             classes[j] if confused > 0 else None, confused))
    return rows


def as_number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


def duration_text(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "not recorded"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def reference_of(recipe: dict[str, Any]) -> tuple[dict[str, float], str]:
    """The per-class reference figures the recipe gives the summary plugin (e.g. the seed's)."""
    for name, options in plugin_entries(recipe.get("plugins") or []):
        if name == "summary" and options is not None:
            if isinstance(options.get("reference"), dict):
                return options["reference"], str(options.get("reference_name", "reference"))
    return {}, "reference"


def summarize_history(history: list[dict]) -> dict[str, Any]:
    """Best / last-5 / final test accuracy and throughput (via the summary plugin's summarize)."""
    from microtrain_plugins.callbacks.summary import summarize

    numeric = ("test_acc", "epoch_seconds", "train_images_per_second")
    clean = [{**row, **{k: as_number(row.get(k)) for k in numeric}} for row in history]
    summary = summarize(clean, None, LAST)
    summary["last_mean_test_acc"] = summary.pop(f"last{LAST}_mean_test_acc")
    summary["train_seconds"] = sum(row["epoch_seconds"] for row in clean)
    return summary

# The one function that computes and writes everything


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def number_text(value: Any, digits: int = 4) -> str:
    value = as_number(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def percent_text(value: Any, digits: int = 2) -> str:
    value = as_number(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"

