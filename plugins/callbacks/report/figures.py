"""The report's figures, drawn with matplotlib's object API on the Agg canvas: no window, no display,
no global backend change. Each figure's size is fixed per kind and grows with the classes or images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from microtrain_plugins.callbacks.report.tables import ClassRow, as_number, normalise_rows

DPI = 100
GRID_COLUMNS = {"misclassified": 6, "augmentations": 8}
GRID_CELL = {"misclassified": (2.3, 2.55), "augmentations": (1.6, 1.8)}  # inches per image (with its title)


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


def new_figure(kind: str, count: int = 0, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=figure_inches(kind, count), dpi=DPI, layout=layout)



def curves_figure(history: list[dict], lr_steps: Sequence[float] | None, steps_per_epoch: int | None):
    """Accuracy, loss and learning rate, all against epochs (the lr per step, as fractional epochs)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure("curves")
    acc_ax, loss_ax, lr_ax = fig.subplots(1, 3)
    epochs = [row["epoch"] for row in history]
    for ax, key, title, unit in ((acc_ax, "acc", "accuracy", "accuracy (%)"), (loss_ax, "loss", "loss", "cross-entropy loss")):
        splits = (("train", "tab:blue"), ("val", "tab:green"), ("test", "tab:orange"))
        for split, colour in splits:
            if split == "val" and not any(f"val_{key}" in row for row in history):
                continue  # no validation split in this run
            # test and val points exist only for the evaluated epochs (eval_every): join those
            points = [(row["epoch"], as_number(row.get(f"{split}_{key}"))) for row in history]
            points = [(epoch, value) for epoch, value in points if math.isfinite(value)] if split != "train" else points
            style = {"marker": "o", "markersize": 3} if len(points) <= 30 else {}
            ax.plot([epoch for epoch, _ in points], [value for _, value in points], color=colour, label=split, **style)
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # The star marks the epoch a person would pick: on the validation split when there is one.
    chosen = "val" if any("val_acc" in row for row in history) else "test"
    finite = [row for row in history if math.isfinite(as_number(row.get(f"{chosen}_acc")))]
    if finite:
        best = max(finite, key=lambda row: row[f"{chosen}_acc"])
        acc_ax.scatter([best["epoch"]], [best[f"{chosen}_acc"]], marker="*", s=140, color="tab:red", zorder=3,
                       label=f"best {chosen} {best[f'{chosen}_acc']:.2f}% (epoch {best['epoch']})")
    if history:
        acc_ax.legend(loc="best")
        loss_ax.legend(loc="best")
    if lr_steps and steps_per_epoch:
        x = np.arange(1, len(lr_steps) + 1) / steps_per_epoch
        lr_ax.plot(x, lr_steps, color="tab:purple", linewidth=1.2)
        lr_ax.set_title("learning rate (per step)")
    elif history:
        lr_ax.plot(epochs, [as_number(row.get("lr")) for row in history], color="tab:purple",
                   **({"marker": "o", "markersize": 3} if len(history) <= 30 else {}))
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
    fig = new_figure("per_class", len(rows))
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
    fig = new_figure("confusion", n, layout="compressed")  # compressed: made for fixed-aspect images
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
    fig = new_figure(kind, count, layout=None)  # fixed margins: constrained layout is slow with many axes
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

