"""Callback ``report`` and command ``microtrain report RUN_DIR``: the pictures and tables a person
reads after a run, written to ``<run dir>/report/``.

    curves.png          train/test accuracy and loss per epoch, learning rate per step
    per_class.png       per-class test accuracy of the final model (beside a reference when given)
    confusion.png       confusion matrix, normalised by true class
    misclassified.png   the most confidently wrong test images, ``true -> predicted (confidence)``
    augmentations.png   training images exactly as the train loader delivers them
    report.md           summary, the pictures and the tables (readable on GitHub)
    report.json         the same figures for programs; run_info.json, lr_steps.json: what the
                        command needs to redraw the report later

The callback writes it at ``after_fit``, and on an error or Ctrl-C from what exists (curves and
the last finished epoch's confusion; no extra pass over the data, so nothing blocks). The command
rebuilds data, loaders and model from the run dir's recipe.yaml, loads checkpoints/last.pt and
evaluates the test split; both go through :func:`make_report`. Only rank 0 writes. Figures use
matplotlib's object API with the Agg canvas: no window, no display needed, no global backend change.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import microtrain
from microtrain.errors import MicrotrainError

FOLDER = "report"
DPI = 100
RUN_INFO = "run_info.json"
LR_STEPS = "lr_steps.json"
FILES = ("curves.png", "per_class.png", "confusion.png", "misclassified.png", "augmentations.png", "report.md", "report.json")
LAST = 5  # "mean of the last 5 epochs", as the seed reports it
GRID_COLUMNS = {"misclassified": 6, "augmentations": 8}
GRID_CELL = {"misclassified": (2.3, 2.55), "augmentations": (1.6, 1.8)}  # inches per image (with its title)


# --------------------------------------------------------------------------------------------
# Pure figures: confusion matrix, per-class table (tested on hand-computed cases)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Predictions on the test split (shared by the callback and the command)
# --------------------------------------------------------------------------------------------

@dataclass
class Predictions:
    """One pass over the test split: the confusion matrix and the most confidently wrong images."""

    confusion: np.ndarray  # (C, C) counts, rows true
    images: np.ndarray  # uint8 (k, H, W, C), de-normalised from what the model saw
    true: np.ndarray  # int64 (k,)
    predicted: np.ndarray  # int64 (k,)
    confidence: np.ndarray  # float (k,), softmax probability of the predicted class


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Loader batch (float NCHW, normalised with mean/std in [0, 1]) -> uint8 NHWC in real colours."""
    channels = images.shape[1]
    scale = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, channels, 1, 1) * 255.0
    shift = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, channels, 1, 1) * 255.0
    pixels = (images.float() * scale + shift).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def collect_predictions(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, num_classes: int,
                        mean: Sequence[float], std: Sequence[float], keep: int) -> Predictions:
    """Run ``forward`` over every batch of ``loader``; keep the ``keep`` most confident mistakes.

    Only the few kept images are de-normalised and copied to the host, so the pass costs little
    more than an evaluation."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    images = np.zeros((0,), dtype=np.uint8)
    true = np.zeros(0, dtype=np.int64)
    predicted = np.zeros(0, dtype=np.int64)
    confidence = np.zeros(0, dtype=np.float64)
    with torch.inference_mode():
        for batch, labels in loader:
            probabilities = forward(batch).float().softmax(1)
            top, guess = probabilities.max(1)
            labels_np, guess_np = labels.cpu().numpy(), guess.cpu().numpy()
            confusion += confusion_matrix(labels_np, guess_np, num_classes)
            wrong = np.flatnonzero(labels_np != guess_np)
            if keep <= 0 or wrong.size == 0:
                continue
            top_np = top.cpu().numpy().astype(np.float64)
            wrong = wrong[np.argsort(-top_np[wrong], kind="stable")[:keep]]
            picked = denormalise(batch[torch.as_tensor(wrong, device=batch.device)], mean, std)
            images = picked if images.size == 0 else np.concatenate([images, picked])
            true = np.concatenate([true, labels_np[wrong]])
            predicted = np.concatenate([predicted, guess_np[wrong]])
            confidence = np.concatenate([confidence, top_np[wrong]])
            order = np.argsort(-confidence, kind="stable")[:keep]  # earlier images win ties
            images, true, predicted, confidence = images[order], true[order], predicted[order], confidence[order]
    return Predictions(confusion, images, true, predicted, confidence)


def loader_samples(loader: Any, mean: Sequence[float], std: Sequence[float], count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of epoch 1's first batch, as the train loader delivers them (augmented)."""
    loader.set_epoch(1)
    iterator = iter(loader)
    try:
        images, labels = next(iterator)
    finally:
        del iterator
    images, labels = images[:count], labels[:count]
    if labels.dim() != 1:  # soft labels (e.g. mixed batches): show the strongest class
        labels = labels.argmax(1)
    return denormalise(images, mean, std), labels.cpu().numpy()


def make_forward(model: torch.nn.Module, precision: str, device: torch.device,
                 predict: Callable[..., Any] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The evaluation forward pass as the engine does it: autocast per the recipe, the ``predict`` hook first."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward(images: torch.Tensor) -> torch.Tensor:
        context = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with context:
            logits = predict(model=model, images=images) if predict is not None else None
            return model(images) if logits is None else logits

    return forward


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode for the duration, then back to what it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# Figures (matplotlib object API, Agg canvas)
# --------------------------------------------------------------------------------------------

def figure_inches(kind: str, count: int = 0) -> tuple[float, float]:
    """Size of each figure: fixed per kind, growing with the number of classes or images."""
    if kind == "curves":
        return (15.0, 4.6)
    if kind == "per_class":
        return (8.0, round(min(1.6 + 0.42 * max(count, 1), 30.0), 2))
    if kind == "confusion":
        side = min(max(6.0, 1.2 + 0.62 * count), 16.0)
        return (round(side + 1.4, 2), round(side, 2))
    if kind in GRID_COLUMNS:
        columns = min(GRID_COLUMNS[kind], max(count, 1))
        rows = -(-max(count, 1) // columns)
        width, height = GRID_CELL[kind]
        return (round(columns * width, 2), round(rows * height + 0.5, 2))
    raise ValueError(kind)


def figure_pixels(kind: str, count: int = 0) -> tuple[int, int]:
    """The PNG's width and height in pixels."""
    width, height = figure_inches(kind, count)
    return (int(round(width * DPI)), int(round(height * DPI)))


def _figure(kind: str, count: int = 0, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=figure_inches(kind, count), dpi=DPI, layout=layout)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


def curves_figure(history: list[dict], lr_steps: Sequence[float] | None, steps_per_epoch: int | None):
    """Accuracy, loss and learning rate, all against epochs (the lr per step, as fractional epochs)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure("curves")
    acc_ax, loss_ax, lr_ax = fig.subplots(1, 3)
    epochs = [row["epoch"] for row in history]
    style = {"marker": "o", "markersize": 3} if len(history) <= 30 else {}
    for ax, key, title, unit in ((acc_ax, "acc", "accuracy", "accuracy (%)"), (loss_ax, "loss", "loss", "cross-entropy loss")):
        for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
            values = [_number(row.get(f"{split}_{key}")) for row in history]
            ax.plot(epochs, values, color=colour, label=split, **style)
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    finite = [row for row in history if math.isfinite(_number(row.get("test_acc")))]
    if finite:
        best = max(finite, key=lambda row: row["test_acc"])
        acc_ax.scatter([best["epoch"]], [best["test_acc"]], marker="*", s=140, color="tab:red", zorder=3,
                       label=f"best test {best['test_acc']:.2f}% (epoch {best['epoch']})")
    if history:
        acc_ax.legend(loc="best")
        loss_ax.legend(loc="best")
    if lr_steps and steps_per_epoch:
        x = np.arange(1, len(lr_steps) + 1) / steps_per_epoch
        lr_ax.plot(x, lr_steps, color="tab:green", linewidth=1.2)
        lr_ax.set_title("learning rate (per step)")
    elif history:
        lr_ax.plot(epochs, [_number(row.get("lr")) for row in history], color="tab:green", **style)
        lr_ax.set_title("learning rate (per epoch; no per-step record)")
    else:
        lr_ax.set_title("learning rate")
    lr_ax.set(xlabel="epoch", ylabel="learning rate")
    lr_ax.grid(alpha=0.3)
    if not history:
        for ax in (acc_ax, loss_ax):
            ax.text(0.5, 0.5, "no epoch finished", ha="center", va="center", transform=ax.transAxes, color="grey")
    return fig


def per_class_figure(rows: list[ClassRow], title: str, reference: dict[str, float] | None = None,
                     reference_name: str = "reference"):
    """Horizontal bars of per-class accuracy, the value at each bar's end, a reference as ticks."""
    fig = _figure("per_class", len(rows))
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1]
    values = np.array([row.accuracy for row in rows], dtype=np.float64)
    ax.barh(y, np.nan_to_num(values), color="tab:blue", height=0.65, label="test accuracy")
    for yi, value in zip(y, values, strict=True):  # the numbers in a column right of 100: clear of bars and ticks
        ax.text(101.5, yi, f"{value:.1f}" if math.isfinite(value) else "no images", va="center", fontsize=9)
    if reference:
        ref = [reference.get(row.name) for row in rows]
        points = [(r, yi) for r, yi in zip(ref, y, strict=True) if isinstance(r, (int, float))]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker="|", s=260, linewidths=2.5, color="black",
                       label=reference_name, zorder=3)
    total = sum(row.count for row in rows)
    if total:
        overall = 100.0 * sum(row.correct for row in rows) / total
        ax.axvline(overall, color="tab:red", linestyle="--", linewidth=1, label=f"overall {overall:.1f}%")
    ax.set_yticks(y, [row.name for row in rows], fontsize=10 if len(rows) <= 60 else 7)
    ax.set_xlim(0, 114)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(rows) > 4 else -0.25), ncol=3, frameon=False)
    return fig


def confusion_figure(confusion: np.ndarray, classes: Sequence[str], title: str):
    """The matrix as a heat map in percent of each true class, the percentage written in each cell."""
    share = normalise_rows(confusion)
    n = len(classes)
    fig = _figure("confusion", n, layout="compressed")  # compressed: made for fixed-aspect images
    ax = fig.subplots()
    image = ax.imshow(share * 100.0, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="% of the true class")
    ticks = 10 if n <= 24 else 6  # many classes: smaller names so they do not overlap
    ax.set_xticks(range(n), classes, rotation=45 if n <= 24 else 90, ha="right", rotation_mode="anchor", fontsize=ticks)
    ax.set_yticks(range(n), classes, fontsize=ticks)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = share[i, j] * 100.0
                if value >= 0.05 or i == j:
                    ax.text(j, i, f"{value:.0f}" if value >= 9.5 or value == 0 else f"{value:.1f}", ha="center",
                            va="center", fontsize=9 if n <= 12 else 7, color="white" if value > 55 else "black")
    return fig


def grid_figure(kind: str, images: np.ndarray, titles: Sequence[str], suptitle: str):
    """Images (uint8 NHWC) in a grid, each with its title."""
    count = len(images)
    fig = _figure(kind, count, layout=None)  # fixed margins: constrained layout is slow with many axes
    width, height = figure_inches(kind, count)
    fig.suptitle(suptitle, fontsize=12, y=1 - 0.12 / height, va="top")
    columns = min(GRID_COLUMNS[kind], max(count, 1))
    rows = -(-max(count, 1) // columns)
    cell_w, cell_h = GRID_CELL[kind]
    title_space = 0.3  # inches above each image for its title
    fig.subplots_adjust(left=0.05 / width, right=1 - 0.05 / width, bottom=0.05 / height, top=1 - 0.5 / height,
                        wspace=0.1 * cell_w / (cell_w - 0.1 * cell_w), hspace=title_space / (cell_h - title_space))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    fontsize = 9 if kind == "misclassified" else 8
    for ax, image, title in zip(axes, images, titles, strict=False):  # more axes than images
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=fontsize)
    if count == 0:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center", transform=axes[0].transAxes)
    return fig


def figure_rgb(fig) -> np.ndarray:
    """Render a figure to a uint8 (H, W, 3) array (for TensorBoard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _save(fig, path: Path) -> None:
    """Write to a temporary name, then rename: an interrupted write never leaves half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Run facts: machine, versions, wall time
# --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Where a run trained: platform, CPU, cores, GPU, versions."""
    gpu = None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "device": str(device) if device is not None else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "microtrain": microtrain.__version__,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "not recorded"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _reference(recipe: dict[str, Any]) -> tuple[dict[str, float], str]:
    """The per-class reference figures the recipe gives the summary plugin (e.g. the seed's)."""
    for entry in recipe.get("plugins") or []:
        if isinstance(entry, dict) and isinstance(entry.get("summary"), dict):
            options = entry["summary"]
            if isinstance(options.get("reference"), dict):
                return options["reference"], str(options.get("reference_name", "reference"))
    return {}, "reference"


def _summary(history: list[dict]) -> dict[str, Any]:
    """Best / last-5 / final test accuracy and throughput (via the summary plugin's summarize)."""
    from microtrain_plugins.callbacks.summary import summarize

    numeric = ("test_acc", "epoch_seconds", "train_images_per_second")
    clean = [{**row, **{k: _number(row.get(k)) for k in numeric}} for row in history]
    summary = summarize(clean, None, LAST)
    summary["last_mean_test_acc"] = summary.pop(f"last{LAST}_mean_test_acc")
    summary["train_seconds"] = sum(row["epoch_seconds"] for row in clean)
    return summary


# --------------------------------------------------------------------------------------------
# The one function that computes and writes everything
# --------------------------------------------------------------------------------------------

def make_report(out_dir: Path, *, recipe: dict[str, Any], history: list[dict], classes: Sequence[str],
                mean: Sequence[float], std: Sequence[float], run_info: dict[str, Any],
                forward: Callable[[torch.Tensor], torch.Tensor] | None = None, test_loader: Any = None,
                train_loader: Any = None, confusion: Any = None, lr_steps: Sequence[float] | None = None,
                steps_per_epoch: int | None = None, status: str = "completed", notes: Sequence[str] = (),
                mistakes: int = 24, samples: int = 32) -> tuple[dict[str, Any], Predictions | None]:
    """Compute the predictions (when ``forward`` and ``test_loader`` are given) and the loader samples
    (when ``train_loader`` is), then write every file of the report into ``out_dir``.

    ``confusion`` (e.g. the last epoch's, summed over all ranks) takes precedence over the one the
    prediction pass gives. Returns what report.json holds, and the predictions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    predictions = None
    if forward is not None and test_loader is not None:
        predictions = collect_predictions(forward, test_loader, len(classes), mean, std, mistakes)
    if confusion is None and predictions is not None:
        confusion = predictions.confusion
    if confusion is None and history and history[-1].get("confusion") is not None:
        confusion = history[-1]["confusion"]
        notes.append(f"Per-class figures and confusion matrix are those of the last finished epoch ({history[-1]['epoch']}).")
    samples_images = samples_labels = None
    if train_loader is not None and samples > 0:
        samples_images, samples_labels = loader_samples(train_loader, mean, std, samples)
    _write_text(out_dir / RUN_INFO, json.dumps(_json_safe(dict(run_info)), indent=1) + "\n")
    if lr_steps:
        rounded = [float(f"{v:.7g}") for v in lr_steps]
        _write_text(out_dir / LR_STEPS, json.dumps({"steps_per_epoch": steps_per_epoch, "lr": rounded}))

    written = []
    fig = curves_figure(history, lr_steps, steps_per_epoch)
    _save(fig, out_dir / "curves.png")
    written.append("curves.png")

    final_epoch = history[-1]["epoch"] if history else None
    rows: list[ClassRow] = []
    reference, reference_name = _reference(recipe)
    if confusion is not None:
        matrix = np.asarray(confusion, dtype=np.int64)
        rows = class_table(matrix, classes)
        which = f"epoch {final_epoch}" if final_epoch is not None else "final model"
        _save(per_class_figure(rows, f"per-class test accuracy ({which})", reference, reference_name), out_dir / "per_class.png")
        _save(confusion_figure(matrix, classes, f"confusion matrix, % of each true class ({which})"), out_dir / "confusion.png")
        written += ["per_class.png", "confusion.png"]
    else:
        notes.append("No epoch finished: no per-class figures and no confusion matrix.")

    if predictions is not None:
        titles = [f"{classes[t]} -> {classes[p]} ({c:.2f})" for t, p, c in
                  zip(predictions.true, predictions.predicted, predictions.confidence, strict=True)]
        _save(grid_figure("misclassified", predictions.images, titles,
                          f"the {len(titles)} most confidently wrong test images: true -> predicted (confidence)"),
              out_dir / "misclassified.png")
        written.append("misclassified.png")
    else:
        notes.append("misclassified.png was not made (no pass over the test split); "
                     "`microtrain report RUN_DIR` makes it from the last checkpoint.")
    if samples_images is not None:
        titles = [classes[int(label)] for label in samples_labels]
        _save(grid_figure("augmentations", samples_images, titles,
                          f"training images as the loader delivers them (epoch 1, first batch, {len(titles)} shown)"),
              out_dir / "augmentations.png")
        written.append("augmentations.png")
    else:
        notes.append("augmentations.png was not made (the train loader was not read); "
                     "`microtrain report RUN_DIR` makes it.")

    summary = _summary(history) if history else {}
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
    _write_text(out_dir / "report.md", render_markdown(record, history, reference, reference_name))
    _write_text(out_dir / "report.json", json.dumps(_json_safe(record), indent=1) + "\n")
    return record, predictions


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _pct(value: Any, digits: int = 2) -> str:
    value = _number(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


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
            ("best test accuracy", f"{_pct(summary['best_test_acc'])}% (epoch {summary['best_epoch']})"),
            (f"mean test accuracy, last {min(LAST, len(history))} epochs", f"{_pct(summary['last_mean_test_acc'])}%"),
            ("final test accuracy", f"{_pct(summary['final_test_acc'])}%"),
            ("training throughput", f"{_number(summary['mean_train_images_per_second']):,.0f} images/s (mean over epochs)"),
        ]
    rows.append(("wall time", _duration(run.get("wall_seconds"))))
    if summary:
        rows.append(("time in training epochs", _duration(summary["train_seconds"])))
    if run.get("parameters") is not None:
        rows.append(("parameters", f"{run['parameters']:,}"))
    machine = f"{run.get('platform', '?')}; {run.get('cpu', '?')}, {run.get('cores', '?')} cores"
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
            lines.append(f"| {row['name']} | {_pct(row['accuracy'], 1)} |{ref} {row['count']} | {confused} |")
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
                f"| {row['epoch']} | {_number(row.get('lr')):.4g} | {_number(row.get('train_loss')):.4f} | "
                f"{_pct(row.get('train_acc'))} | {_number(row.get('test_loss')):.4f} | {_pct(row.get('test_acc'))} | "
                f"{_number(row.get('epoch_seconds')):.1f} | {_number(row.get('train_images_per_second')):,.0f} |")
        lines.append("")
    lines += [f"*Written {datetime.datetime.now().isoformat(timespec='seconds')} by microtrain {microtrain.__version__}; "
              "regenerate with `microtrain report RUN_DIR`.*", ""]
    return "\n".join(lines)


def _components(recipe: dict[str, Any]) -> dict[str, str]:
    return {section: recipe[section]["name"] for section in ("model", "data", "loader", "optimizer", "schedule")
            if isinstance(recipe.get(section), dict) and "name" in recipe[section]}


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------

def final_model(state) -> torch.nn.Module:
    """The model the engine evaluates, without torch.compile (one pass needs no compiling) and without
    DistributedDataParallel (rank 0 runs it alone; DDP's forward could wait for the other ranks)."""
    model = state.eval_model or state.model
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def hook_forward(state, model: torch.nn.Module, pm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The engine's evaluation forward: the ``predict`` hook (test-time augmentation) first, autocast per the recipe."""
    predict = None
    if pm is not None:
        from microtrain.plugin_manager import call_hook

        def predict(**kwargs: Any) -> Any:
            return call_hook(pm, "predict", state=state, **kwargs)

    return make_forward(model, state.recipe["precision"], state.device, predict)


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
            "components": _components(state.recipe),
            "world_size": state.world_size,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_seconds": None,
        }
        folder = state.run_dir / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        _write_text(folder / RUN_INFO, json.dumps(self.run_info, indent=1) + "\n")

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
        model = final_model(state)
        notes = []
        if state.world_size > 1:
            notes.append(f"Distributed run ({state.world_size} ranks): the misclassified images come from rank 0's share "
                         "of the test split; the confusion matrix covers all of it.")
        with evaluating(model):
            _, predictions = self._write(state, forward=hook_forward(state, model, state.extras.get("plugin_manager")),
                                         test_loader=state.test_loader, train_loader=state.train_loader, notes=notes)
        state.extras["report_predictions"] = predictions  # the tensorboard plugin shows them too

    @microtrain.hookimpl
    def on_error(self, state, error):
        """From what exists, without reading the loaders (their workers may be gone after Ctrl-C)."""
        if not state.is_main or self.start is None:
            return
        self._write(state, status=state.status if state.status != "running" else "failed",
                    notes=[f"The run stopped during epoch {state.epoch} ({type(error).__name__})."])
        print(f"microtrain: partial report written to {state.run_dir / FOLDER / 'report.md'}", file=sys.stderr)

    def _write(self, state, *, notes: list[str], status: str | None = None,
               **sources: Any) -> tuple[dict[str, Any], Predictions | None]:
        self.run_info["wall_seconds"] = self._wall()
        folder = state.run_dir / FOLDER
        confusion = state.history[-1].get("confusion") if state.history and state.status == "completed" else None
        return make_report(folder, recipe=state.recipe, history=state.history, classes=state.data.classes,
                           mean=state.data.mean, std=state.data.std, run_info=self.run_info, confusion=confusion,
                           lr_steps=self.lr_steps, steps_per_epoch=state.steps_per_epoch, status=status or state.status,
                           notes=notes, mistakes=self.mistakes, samples=self.samples, **sources)


def build_report(*, mistakes: int = 24, samples: int = 32) -> Report:
    """Run report in <run dir>/report/: curves, per-class accuracy, confusion matrix, misclassified and augmented images."""
    if mistakes < 0 or samples < 0:
        raise MicrotrainError("plugins.report: mistakes and samples must be 0 or more")
    return Report(mistakes=mistakes, samples=samples)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

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
    from microtrain.checkpoint import load_checkpoint, restore_checkpoint
    from microtrain.engine import build_state
    from microtrain.plugin_manager import call_hook
    from microtrain.run import LAST_CHECKPOINT, prepare_recipe

    recipe, pm, registry = prepare_recipe(recipe_path, list(overrides))
    checkpoint = load_checkpoint(run_dir / LAST_CHECKPOINT)
    _enable_eval_callbacks(recipe, pm, registry)
    state = build_state(recipe, run_dir, pm, registry)
    restore_checkpoint(state, checkpoint, pm)  # weights, and what evaluation plugins saved (EMA weights)
    call_hook(pm, "before_eval", state=state)  # e.g. the EMA plugin sets state.eval_model
    model = final_model(state)

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
    run_info["components"] = _components(recipe)
    if run_info.get("wall_seconds") is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            run_info["wall_seconds"] = json.loads((run_dir / "summary.json").read_text()).get("wall_seconds")

    lr_steps, steps_per_epoch = _saved_lr_steps(folder, checkpoint)
    if int(checkpoint.get("epoch", -1)) != int(history[-1]["epoch"]):
        notes.append(f"The checkpoint holds epoch {checkpoint.get('epoch')} while the metrics log ends at epoch "
                     f"{history[-1]['epoch']}: per-class figures are those of the checkpoint's weights.")
    status = "completed"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        status = json.loads((run_dir / "status.json").read_text()).get("status", status)
    with evaluating(model):
        record, _ = make_report(folder, recipe=recipe, history=history, classes=state.data.classes, mean=state.data.mean,
                                std=state.data.std, run_info=run_info, forward=hook_forward(state, model, pm),
                                test_loader=state.test_loader, train_loader=state.train_loader, lr_steps=lr_steps,
                                steps_per_epoch=steps_per_epoch, status=status, notes=notes, **_report_options(recipe))
    return record


EVAL_HOOKS = ("on_checkpoint_load", "before_eval", "predict")


def _enable_eval_callbacks(recipe: dict[str, Any], pm, registry) -> None:
    """Register the recipe's callbacks that take part in evaluation (EMA weights, test-time augmentation),
    so the command evaluates exactly as the run did. Others (loggers, progress) stay off; one that cannot
    be built here (e.g. tensorboard not installed) is skipped."""
    from microtrain.plugin_manager import register_callback

    for entry in recipe.get("plugins") or []:
        name, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        if name == "report" or not registry.has("callback", name):
            continue
        component = registry.get("callback", name, "plugins")
        try:
            instance = component.build(options=options if options is not None else component.validate({}, f"plugins.{name}"))
        except MicrotrainError:
            continue
        if any(hasattr(getattr(instance, hook, None), "microtrain_impl") for hook in EVAL_HOOKS):
            register_callback(pm, instance, name)


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
    for entry in recipe.get("plugins") or []:
        if isinstance(entry, dict) and isinstance(entry.get("report"), dict):
            return {k: int(v) for k, v in entry["report"].items() if k in ("mistakes", "samples")}
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
