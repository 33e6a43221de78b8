"""``microtrain predict RUN_DIR_OR_CHECKPOINT INPUT...``: classify images with a run's evaluation model.

The model, preprocessing and forward pass are microtrain.load_run's: the run's EMA weights and test-time
augmentation when it used them (``--raw``: the trained weights), the test split's preprocessing, and the loop
that logged the run's test accuracy, in batches of the run's test batch size. So predicting a run's test split
from a checkpoint scores exactly what the run logged for that checkpoint's epoch.

Prints a table (the first ``--rows`` images) and, for inputs whose class the layout gives (a folder laid out
``<class>/``, a CIFAR-10 batch), the accuracy and per-class accuracy. ``--json FILE`` writes every image as one
JSON object per line: ``path``, ``class``, ``probability``, ``top_k`` ([class, probability] pairs), and
``label`` (the true class) when known.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import microtrain
from microtrain import LoadedRun, MicrotrainError
from microtrain_plugins.commands import inputs as input_files

DEFAULT_ROWS = 20


def evaluation_setup(loaded: LoadedRun) -> tuple[str, bool]:
    """Which weights the loaded model has and whether the flip TTA applies, read from the recipe's callbacks."""
    callbacks = {name: options for name, options in microtrain.plugin_entries(loaded.recipe.get("plugins") or [])
                 if options is not None}
    weights = "EMA weights" if "ema" in callbacks and not loaded.raw else "trained weights"
    return weights, bool(callbacks.get("tta", {}).get("flip"))


def describe(loaded: LoadedRun) -> str:
    """One line: which run, which checkpoint, which weights, and what the run logged for them."""
    weights, flip = evaluation_setup(loaded)
    weights += " (--raw)" if loaded.raw else ""
    tta = ", flip TTA" if flip else ""
    logged = loaded.logged_metrics or {}
    figure = f", logged test_acc {logged['test_acc']:.2f}%" if isinstance(logged.get("test_acc"), (int, float)) else ""
    return f"{loaded.recipe['name']}: {loaded.checkpoint_path} (epoch {loaded.epoch}{figure}), {weights}{tta}"


def batches(inputs: input_files.Inputs, loaded: LoadedRun, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(inputs), batch_size):
        yield loaded.normalise(input_files.arrays(inputs, loaded, start, start + batch_size))


def predict_inputs(loaded: LoadedRun, inputs: input_files.Inputs, batch_size: int) -> torch.Tensor:
    """Probabilities ``(N, classes)`` of every input, in order."""
    return loaded.logits_of_batches(batches(inputs, loaded, batch_size)).softmax(dim=1)


def accuracy(labels: list[int | None], predicted: list[int], classes: list[str]) -> dict[str, object]:
    """Accuracy and per-class accuracy (percent) over the inputs whose class is known."""
    pairs = [(label, guess) for label, guess in zip(labels, predicted, strict=True) if label is not None]
    per_class = {}
    for index, name in enumerate(classes):
        members = [guess for label, guess in pairs if label == index]
        if members:
            per_class[name] = (len(members), sum(guess == index for guess in members))
    correct = sum(label == guess for label, guess in pairs)
    return {"images": len(pairs), "correct": correct, "accuracy": 100.0 * correct / len(pairs) if pairs else float("nan"),
            "per_class": per_class}


def write_json_lines(path: Path, inputs: input_files.Inputs, probabilities: torch.Tensor, classes: list[str], top_k: int):
    top_p, top_i = probabilities.topk(top_k, dim=1)
    try:
        with open(path, "w") as out:
            for row, name in enumerate(inputs.names):
                ranked = [[classes[int(i)], float(p)] for p, i in zip(top_p[row], top_i[row], strict=True)]
                record = {"path": name, "class": ranked[0][0], "probability": ranked[0][1], "top_k": ranked}
                if inputs.labels[row] is not None:
                    record["label"] = classes[inputs.labels[row]]
                out.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise MicrotrainError(f"cannot write --json '{path}' ({exc.strerror or exc}); pass a writable path") from None


def print_results(loaded: LoadedRun, inputs: input_files.Inputs, probabilities: torch.Tensor, *, top_k: int, rows: int,
                  header: str) -> dict[str, object] | None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    classes = loaded.classes
    top_p, top_i = probabilities.topk(top_k, dim=1)
    console.print(escape(header), soft_wrap=True)
    labelled = inputs.labelled
    shown = min(rows, len(inputs))
    if shown:
        table = Table()
        table.add_column("image", overflow="fold")
        table.add_column("class")
        table.add_column("probability", justify="right")
        if top_k > 1:
            table.add_column(f"next {top_k - 1}")
        if labelled:
            table.add_column("true class")
        for row in range(shown):
            best = int(top_i[row, 0])
            cells = [escape(inputs.shown_names[row]), classes[best], f"{float(top_p[row, 0]):.3f}"]
            if top_k > 1:
                cells.append(", ".join(f"{classes[int(i)]} {float(p):.3f}" for p, i in zip(top_p[row, 1:], top_i[row, 1:],
                                                                                             strict=True)))
            if labelled:
                label = inputs.labels[row]
                cells.append("" if label is None else classes[label] + (" [green]ok[/]" if label == best else " [red]x[/]"))
            table.add_row(*cells)
        console.print(table)
        if shown < len(inputs):
            console.print(f"... {len(inputs) - shown:,} more images (--rows N to show more, --json FILE for all)", soft_wrap=True)
    for note in inputs.notes:
        console.print(f"note: {escape(note)}", soft_wrap=True)
    if not labelled:
        return None
    figures = accuracy(inputs.labels, top_i[:, 0].tolist(), classes)
    console.print(f"accuracy {figures['accuracy']:.2f}% ({figures['correct']:,} of {figures['images']:,} images whose class "
                  "the folder layout or the batch file gives)", soft_wrap=True)
    table = Table()
    for column in ("class", "images", "correct", "accuracy"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, (count, correct) in figures["per_class"].items():
        table.add_row(name, f"{count:,}", f"{correct:,}", f"{100.0 * correct / count:.2f}%")
    console.print(table)
    return figures


def cmd_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise MicrotrainError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise MicrotrainError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.rows < 0:
        raise MicrotrainError(f"--rows must be 0 or more, got {args.rows}")
    loaded = microtrain.load_run(args.run, raw=args.raw, device=args.device, overrides=args.set)
    inputs = input_files.collect(args.inputs, loaded.classes)
    start = time.perf_counter()
    probabilities = predict_inputs(loaded, inputs, args.batch_size or loaded.batch_size)
    seconds = time.perf_counter() - start
    top_k = min(args.top_k, len(loaded.classes))
    if args.json:
        write_json_lines(args.json, inputs, probabilities, loaded.classes, top_k)
    header = f"{describe(loaded)}\n{len(inputs):,} images in {seconds:.1f} s on {loaded.device}"
    print_results(loaded, inputs, probabilities, top_k=top_k, rows=args.rows, header=header)
    if args.json:
        print(f"{len(inputs):,} predictions written to {args.json}")
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments predict and export share: which run, which weights, recipe overrides."""
    parser.add_argument("run", type=Path, metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run dir (its checkpoints/last.pt) or a checkpoint file, e.g. RUN_DIR/checkpoints/best.pt")
    parser.add_argument("--raw", action="store_true", help="the trained weights, not the EMA ones (when the run used ema)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run's recipe where this machine differs (repeatable), e.g. --set data.root=/data")


@microtrain.hookimpl
def register_commands(subparsers):
    parser = subparsers.add_parser(
        "predict", help="classify images with a run's model (files, folders, CIFAR-10 .bin batches)",
        description="Classify images with the evaluation model of a run (EMA weights and test-time augmentation when it "
                    "used them) and the run's test-time preprocessing. Folders laid out <class>/... and CIFAR-10 batches "
                    "are also scored: accuracy and per-class accuracy.")
    add_run_arguments(parser)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files (PNG, JPEG), folders of them (recursive), or a CIFAR-10 binary batch file (.bin)")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="classes listed per image (default 3)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write one JSON object per image (JSON lines)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default: the run's test batch size)")
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:N or auto (default: the recipe's)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, metavar="N",
                        help=f"images shown in the table (default {DEFAULT_ROWS}; --json FILE has them all)")
    parser.set_defaults(handler=cmd_predict)
