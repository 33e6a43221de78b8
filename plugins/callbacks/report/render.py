"""Writing the report: the files of ``<run dir>/report/`` from a run's history, its last evaluation and
its facts (machine, versions, wall time). Every file is written under a temporary name and renamed, so
an interrupted write never leaves half a file."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import microtrain
from microtrain_plugins.callbacks.report.figures import (
    DPI,
    confusion_figure,
    curves_figure,
    grid_figure,
    per_class_figure,
)
from microtrain_plugins.callbacks.report.predictions import Predictions, loader_samples
from microtrain_plugins.callbacks.report.tables import (
    LAST,
    ClassRow,
    as_number,
    class_table,
    duration_text,
    json_safe,
    number_text,
    percent_text,
    reference_of,
    summarize_history,
)
from microtrain_plugins.callbacks.summary import epochs_text

RUN_INFO = "run_info.json"
LR_STEPS = "lr_steps.json"
FILES = ("curves.png", "per_class.png", "confusion.png", "misclassified.png", "augmentations.png", "report.md", "report.json")


def save_figure(fig, path: Path) -> None:
    """Write to a temporary name, then rename: an interrupted write never leaves half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def best_checkpoint_notes(best_json: Path) -> list[str]:
    """What best.pt is, from the checkpoint callback's best.json: the epoch, the metric, and which split chose it."""
    try:
        best = json.loads(best_json.read_text())
        epoch, monitor, split = best["epoch"], best["monitor"], best["split"]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    note = f"checkpoints/best.pt is epoch {epoch}, chosen on {monitor}"
    if split == "test split":
        return [note + ": picked by looking at the test split (the run has no validation split; val_fraction=0.1 "
                "holds one out), so its test accuracy is an optimistic estimate."]
    return [note + " (the validation split held out of the training images)."]


def make_report(out_dir: Path, *, recipe: dict[str, Any], history: list[dict], classes: Sequence[str],
                mean: Sequence[float], std: Sequence[float], run_info: dict[str, Any],
                predictions: Predictions | None = None, train_loader: Any = None, confusion: Any = None,
                lr_steps: Sequence[float] | None = None, steps_per_epoch: int | None = None, status: str = "completed",
                notes: Sequence[str] = (), samples: int = 32) -> dict[str, Any]:
    """Write every file of the report into ``out_dir``; returns what report.json holds.

    ``predictions`` are the mistakes of a pass over the test split and ``confusion`` its matrix (or the last
    epoch's); without them the last finished epoch's matrix is used. ``train_loader`` gives the augmentation
    samples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    notes += best_checkpoint_notes(out_dir.parent / "checkpoints" / "best.json")
    final_epoch = history[-1]["epoch"] if history else None  # the epoch of the model a given confusion matrix is of
    evaluated = [row for row in history if row.get("confusion") is not None]  # every epoch unless eval_every > 1
    if confusion is None and evaluated:
        confusion, final_epoch = evaluated[-1]["confusion"], evaluated[-1]["epoch"]
        notes.append(f"Per-class figures and confusion matrix are those of the last evaluated epoch ({final_epoch}).")
    samples_images = samples_labels = None
    if train_loader is not None and samples > 0:
        samples_images, samples_labels = loader_samples(train_loader, mean, std, samples)
    write_text_atomically(out_dir / RUN_INFO, json.dumps(json_safe(dict(run_info)), indent=1) + "\n")
    if lr_steps:
        rounded = [float(f"{v:.7g}") for v in lr_steps]
        write_text_atomically(out_dir / LR_STEPS, json.dumps({"steps_per_epoch": steps_per_epoch, "lr": rounded}))

    written = []
    fig = curves_figure(history, lr_steps, steps_per_epoch)
    save_figure(fig, out_dir / "curves.png")
    written.append("curves.png")

    rows: list[ClassRow] = []
    reference, reference_name = reference_of(recipe)
    if confusion is not None:
        matrix = np.asarray(confusion, dtype=np.int64)
        rows = class_table(matrix, classes)
        which = f"epoch {final_epoch}" if final_epoch is not None else "final model"
        save_figure(per_class_figure(rows, f"per-class test accuracy ({which})", reference, reference_name), out_dir / "per_class.png")
        save_figure(confusion_figure(matrix, classes, f"confusion matrix, % of each true class ({which})"), out_dir / "confusion.png")
        written += ["per_class.png", "confusion.png"]
    else:
        notes.append("No epoch was evaluated: no per-class figures and no confusion matrix.")

    if predictions is not None:
        titles = [f"{classes[t]} -> {classes[p]} ({c:.2f})" for t, p, c in
                  zip(predictions.true, predictions.predicted, predictions.confidence, strict=True)]
        save_figure(grid_figure("misclassified", predictions.images, titles,
                          f"the {len(titles)} most confidently wrong test images: true -> predicted (confidence)"),
              out_dir / "misclassified.png")
        written.append("misclassified.png")
    else:
        notes.append("misclassified.png was not made (no pass over the test split); "
                     "`microtrain report RUN_DIR` makes it from the last checkpoint.")
    if samples_images is not None:
        titles = [classes[int(label)] for label in samples_labels]
        save_figure(grid_figure("augmentations", samples_images, titles,
                          f"training images as the loader delivers them (epoch 1, first batch, {len(titles)} shown)"),
              out_dir / "augmentations.png")
        written.append("augmentations.png")
    else:
        notes.append("augmentations.png was not made (the train loader was not read); "
                     "`microtrain report RUN_DIR` makes it.")

    summary = summarize_history(history) if history else {}
    record = {
        "recipe": recipe.get("name"),
        "status": status,
        "epochs_planned": recipe.get("epochs"),
        "summary": summary,
        "run": run_info,
        "per_class": [asdict(row) for row in rows],
        "confusion": np.asarray(confusion).tolist() if confusion is not None else None,
        "misclassified": [] if predictions is None else [
            {"true": classes[t], "predicted": classes[p], "confidence": round(float(c), 4)}
            for t, p, c in zip(predictions.true, predictions.predicted, predictions.confidence, strict=True)],
        "notes": notes,
    }
    written += ["report.md", "report.json"]
    record["files"] = written
    write_text_atomically(out_dir / "report.md", render_markdown(record, history, reference, reference_name))
    write_text_atomically(out_dir / "report.json", json.dumps(json_safe(record), indent=1) + "\n")
    return record



def render_markdown(record: dict[str, Any], history: list[dict], reference: dict[str, float], reference_name: str) -> str:
    """report.md: summary table, pictures, per-class table, the last epochs' log."""
    run, summary, files = record["run"], record["summary"], set(record["files"])
    lines = [f"# Run report: {record['recipe']}", ""]
    done = history[-1]["epoch"] if history else 0
    planned = record.get("epochs_planned")
    state = {"completed": "completed", "interrupted": "interrupted (Ctrl-C or signal)", "failed": "failed"}.get(
        record["status"], record["status"])
    if record["status"] == "completed" and planned and done < planned:
        state = "stopped early"
    lines += [f"Status: **{state}** after {done} of {planned} epochs.", ""]
    recipe_line = record["recipe"]
    if run.get("components"):
        recipe_line += " (" + ", ".join(f"{k} {v}" for k, v in run["components"].items()) + ")"
    rows = [("recipe", recipe_line)]
    if summary:
        rows += [
            ("best test accuracy", f"{percent_text(summary['best_test_acc'])}% (epoch {summary['best_epoch']})"),
            (f"mean test accuracy, {epochs_text(summary['last_mean_epochs'])}", f"{percent_text(summary['last_mean_test_acc'])}%"),
            ("final test accuracy", f"{percent_text(summary['final_test_acc'])}%"),
            *([("best validation accuracy", f"{percent_text(summary['best_val_acc'])}% (epoch {summary['best_val_epoch']}; "
                f"test accuracy then {percent_text(summary['test_acc_at_best_val'])}%)")] if "best_val_acc" in summary else []),
            ("training throughput", f"{as_number(summary['mean_train_images_per_second']):,.0f} images/s (mean over epochs)"),
        ]
    rows.append(("wall time", duration_text(run.get("wall_seconds"))))
    if summary:
        rows.append(("time in training epochs", duration_text(summary["train_seconds"])))
    if run.get("parameters") is not None:
        rows.append(("parameters", f"{run['parameters']:,}"))
    machine = f"{run.get('platform', '?')}; {run.get('cpu', '?')}, {run.get('cores', '?')} cores"
    if run.get("cpu_capability"):  # absent in runs recorded before it was
        machine += f" ({run['cpu_capability']})"
    if run.get("gpu"):
        machine += f"; {run['gpu']}"
    rows += [("device", str(run.get("device"))), ("machine", machine),
             ("versions", f"python {run.get('python')}, torch {run.get('torch')}, microtrain {run.get('microtrain')}")]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if record["notes"]:
        lines += [f"> {note}" for note in record["notes"]] + [""]

    lines += ["## Accuracy, loss and learning rate", "", "![curves](curves.png)", ""]
    if "per_class.png" in files:
        lines += ["## Per-class accuracy", "", "![per-class accuracy](per_class.png)", ""]
        head = "| class | test accuracy % |" + (f" {reference_name} % |" if reference else "") + \
               " test images | most frequent confusion |"
        lines += [head, "|---|---:|" + ("---:|" if reference else "") + "---:|---|"]
        for row in record["per_class"]:
            confused = "-" if not row["confused_with"] else \
                f"{row['confused_with']}: {row['confused_count']} ({100.0 * row['confused_count'] / row['count']:.1f}%)"
            ref = ""
            if reference:
                value = reference.get(row["name"])
                ref = f" {value:g} |" if isinstance(value, (int, float)) else " - |"
            lines.append(f"| {row['name']} | {percent_text(row['accuracy'], 1)} |{ref} {row['count']} | {confused} |")
        lines += ["", "## Confusion matrix", "", "Rows: true class; each row in % of that class's test images.", "",
                  "![confusion matrix](confusion.png)", ""]
    if "misclassified.png" in files:
        lines += ["## Most confidently wrong test images", "", "![misclassified test images](misclassified.png)", ""]
    if "augmentations.png" in files:
        lines += ["## Training images as the loader delivers them", "",
                  "After the recipe's augmentations, de-normalised to real colours.", "",
                  "![training images after augmentation](augmentations.png)", ""]
    if history:
        lines += [f"## Last {min(LAST, len(history))} epochs", "",
                  "| epoch | lr | train loss | train acc % | test loss | test acc % | seconds | images/s |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in history[-LAST:]:
            lines.append(
                f"| {row['epoch']} | {as_number(row.get('lr')):.4g} | {as_number(row.get('train_loss')):.4f} | "
                f"{percent_text(row.get('train_acc'))} | {number_text(row.get('test_loss'))} | {percent_text(row.get('test_acc'))} | "
                f"{as_number(row.get('epoch_seconds')):.1f} | {as_number(row.get('train_images_per_second')):,.0f} |")
        lines.append("")
    lines += [f"*Written {datetime.datetime.now().isoformat(timespec='seconds')} by microtrain {microtrain.__version__}; "
              "regenerate with `microtrain report RUN_DIR`.*", ""]
    return "\n".join(lines)


def components_of(recipe: dict[str, Any]) -> dict[str, str]:
    return {section: recipe[section]["name"] for section in ("model", "data", "loader", "optimizer", "schedule")
            if isinstance(recipe.get(section), dict) and "name" in recipe[section]}
