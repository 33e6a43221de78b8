"""``microtrain export RUN_DIR_OR_CHECKPOINT --format onnx|torchscript|exported-program``: a run's evaluation
model as one file another runtime can load.

What is exported is microtrain.load_run's ``inference_module()``: uint8 images ``(N, C, H, W)`` at the trained
size (RGB for a 3-channel model, pixels 0-255) -> class probabilities ``(N, classes)``. The run's normalisation
(mean, std), its evaluation weights (EMA when it used ema; ``--raw`` for the trained ones), its test-time
augmentation (the tta flip average, through the predict hook) and a softmax are folded in; resizing and the
conversion to RGB are not (see docs/predict-and-export.md). It computes in float32 whatever the recipe's precision.

After writing, the file is loaded back in its own runtime (onnxruntime, ``torch.jit.load``,
``torch.export.load``) and run on real images (the run's test split, or ``--check INPUT...``); its probabilities
are compared with PyTorch's. A max absolute difference above ``--tolerance``, or a different top-1 class where
PyTorch's top two are not tied within it, deletes the file and exits 2. Beside the file, ``<file>.json`` says
the classes, the input and output, and the check's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import microtrain
from microtrain import DataError, LoadedRun, MicrotrainError
from microtrain_plugins.commands import inputs as input_files
from microtrain_plugins.commands.predict import add_run_arguments, evaluation_setup

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
RUNTIMES = {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "exported-program": "torch.export.load"}
DEFAULT_CHECK_IMAGES = 64
DEFAULT_TOLERANCE = 1e-4
ONNX_INSTALL = 'pip install -e ".[export]" (or: pip install onnx onnxscript onnxruntime)'


def parse_batch(text: str) -> int | None:
    """``dynamic`` -> None (any batch size), ``N`` -> N."""
    if text == "dynamic":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise MicrotrainError(f"--batch {text!r}: pass dynamic (any batch size) or a whole number of images >= 1")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters' progress lines, deprecation notices (torch.jit) and optional-package warnings are not the
    user's business; errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_images(loaded: LoadedRun, paths: list[Path] | None, count: int) -> tuple[np.ndarray, str]:
    """uint8 ``(count, H, W, C)`` real images to check the export on, and where they came from."""
    if paths:
        found = input_files.collect(paths, loaded.classes)
        return input_files.arrays(found, loaded, 0, count), f"{min(count, len(found))} images from --check"
    try:
        data = loaded.dataset()
    except MicrotrainError as exc:
        raise DataError(f"the export is checked on real images, and the run's test split could not be read ({exc}); "
                        "pass --check with image files, a folder or a CIFAR-10 .bin batch") from None
    return loaded.to_arrays(data.test_images[:count]), f"{min(count, len(data.test_images))} images of the run's test split"


def to_nchw(arrays: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)))


def write_onnx(module: torch.nn.Module, example: torch.Tensor, out: Path, batch: int | None, classes: list[str]) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401 - the dynamo exporter needs it; say so before it fails deep inside
    except ImportError as exc:
        raise MicrotrainError(f"--format onnx needs the onnx packages ({exc}); install them with {ONNX_INSTALL}") from None
    dynamic = {"images": {0: torch.export.Dim("batch", min=1)}} if batch is None else None
    with quiet():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"], output_names=["probabilities"],
                                    dynamic_shapes=dynamic, verbose=False)
        program.save(str(out), external_data=False)  # one self-contained file: these models are small
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {"classes": json.dumps(classes), "input": "uint8 NCHW pixels 0-255",
                                        "output": "class probabilities"})
    onnx.save(model, str(out))


def write_torchscript(module: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    with quiet():  # torch.jit.trace is deprecated in torch 2.x but still the way to write a TorchScript file
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(out))


def write_exported_program(module: torch.nn.Module, example: torch.Tensor, out: Path, batch: int | None) -> None:
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if batch is None else None
    with quiet():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
        torch.export.save(program, str(out))


def run_exported(fmt: str, out: Path, images: torch.Tensor, batch: int | None) -> np.ndarray:
    """The exported file's probabilities for ``images``, loaded and run in its own runtime (in chunks of a fixed batch)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        forward = lambda chunk: session.run(None, {name: chunk.numpy()})[0]
    else:
        with quiet():
            loaded = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
        forward = lambda chunk: loaded(chunk).detach().numpy()
    size = batch or len(images)
    with torch.no_grad():
        return np.concatenate([forward(images[start:start + size]) for start in range(0, len(images), size)])


def compare(reference: np.ndarray, exported: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Max absolute difference, top-1 agreement, and the disagreements that are not ties within ``tolerance``."""
    difference = float(np.abs(reference - exported).max()) if reference.size else 0.0
    same = reference.argmax(1) == exported.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    tied = (top2[:, 1] - top2[:, 0]) <= tolerance
    return {"images": len(reference), "max_abs_difference": difference, "top1_agreement": int(same.sum()),
            "untied_disagreements": int((~same & ~tied).sum()), "tolerance": tolerance}


def cmd_export(args: argparse.Namespace) -> int:
    batch = parse_batch(args.batch)
    if args.check_images < 1:
        raise MicrotrainError(f"--check-images must be at least 1, got {args.check_images}")
    if args.tolerance <= 0:
        raise MicrotrainError(f"--tolerance must be > 0, got {args.tolerance}")
    fmt = args.format
    loaded = microtrain.load_run(args.run, raw=args.raw, device="cpu", overrides=args.set)
    out = Path(args.out) if args.out else loaded.run.state.run_dir / "export" / f"model{SUFFIXES[fmt]}"
    count = batch or args.check_images
    arrays, source = check_images(loaded, args.check, count)
    if len(arrays) == 0:
        raise DataError("no images to check the export on; pass --check with image files, a folder or a .bin batch")
    images = to_nchw(arrays)
    if batch is not None:  # a fixed batch: exactly that many, repeating the images there are
        images = images[torch.arange(batch) % len(images)]
    # A dynamic batch is traced on 2 images: torch.export would specialise a size-1 example to batch 1.
    example = images[:batch] if batch is not None else images[torch.arange(2) % len(images)]
    module = loaded.inference_module().eval()
    with torch.no_grad():
        reference = module(images).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "onnx":
            write_onnx(module, example, out, batch, loaded.classes)
        elif fmt == "torchscript":
            write_torchscript(module, example, out)
        else:
            write_exported_program(module, example, out, batch)
        exported = run_exported(fmt, out, images, batch)
    except MicrotrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter failure: one line, not an exporter's traceback
        out.unlink(missing_ok=True)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise MicrotrainError(f"--format {fmt} failed ({type(exc).__name__}: {detail}); the model or a plugin's "
                              "predict hook does something this exporter cannot trace: try another --format") from None
    figures = compare(reference, exported, args.tolerance)
    check = (f"check on {source} in {RUNTIMES[fmt]}: max |difference| {figures['max_abs_difference']:.2e}, top-1 "
             f"agreement {figures['top1_agreement']}/{figures['images']}")
    if figures["max_abs_difference"] > args.tolerance or figures["untied_disagreements"]:
        out.unlink(missing_ok=True)
        raise MicrotrainError(f"the exported model disagrees with PyTorch ({check}; tolerance {args.tolerance:g}); "
                              f"{out} was deleted; try another --format, or report the model and exporter versions")
    description = write_description(loaded, fmt, out, batch, figures, source)
    size = out.stat().st_size
    channels, height, width = loaded.image_shape
    print(f"exported {loaded.recipe['name']} epoch {loaded.epoch} ({description['weights']}"
          f"{', flip TTA folded in' if description['tta'] else ''}) to {out} ({size / 1e6:.1f} MB)")
    print(f"input 'images': uint8 ({'batch' if batch is None else batch}, {channels}, {height}, {width}), pixels 0-255"
          f"{', RGB' if channels == 3 else ''}, normalisation folded in; output 'probabilities': "
          f"({'batch' if batch is None else batch}, {len(loaded.classes)}) float32")
    print(check)
    if loaded.recipe.get("precision", "fp32") != "fp32":
        print(f"note: the run evaluates with {loaded.recipe['precision']} autocast; the export computes in float32")
    print(f"classes and input description: {out}.json")
    return 0


def write_description(loaded: LoadedRun, fmt: str, out: Path, batch: int | None, figures: dict[str, Any],
                      source: str) -> dict[str, Any]:
    """``<out>.json``: what a user of the file in another runtime needs (classes, input, output) and the check."""
    weights, flip = evaluation_setup(loaded)
    channels, height, width = loaded.image_shape
    description = {
        "format": fmt, "recipe": loaded.recipe["name"], "checkpoint": str(loaded.checkpoint_path), "epoch": loaded.epoch,
        "weights": weights, "tta": flip,
        "classes": loaded.classes,
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "shape": [batch or "batch", channels, height, width],
                  "pixels": "0-255" + (", RGB" if channels == 3 else ""),
                  "preprocessing": "convert to RGB and resize to the trained size before; mean/std normalisation is inside"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [batch or "batch", len(loaded.classes)]},
        "normalisation": {"mean": list(loaded.mean), "std": list(loaded.std), "folded_in": True},
        "check": {**figures, "source": source},
        "versions": {"microtrain": microtrain.__version__, "torch": torch.__version__},
    }
    Path(f"{out}.json").write_text(json.dumps(description, indent=1) + "\n")
    return description


@microtrain.hookimpl
def register_commands(subparsers):
    parser = subparsers.add_parser(
        "export", help="write a run's model as ONNX, TorchScript or a torch.export program, checked against PyTorch",
        description="Export the evaluation model of a run (uint8 NCHW images -> probabilities; normalisation, EMA "
                    "weights and flip TTA folded in), load it back in its own runtime and compare it with PyTorch on "
                    "real images; exit 2 if they disagree.")
    add_run_arguments(parser)
    parser.add_argument("--format", required=True, choices=sorted(SUFFIXES), help="the file format")
    parser.add_argument("--out", type=Path, metavar="FILE", help="where to write (default RUN_DIR/export/model.<format suffix>)")
    parser.add_argument("--batch", default="dynamic", metavar="dynamic|N",
                        help="the batch dimension: dynamic (any size, the default) or a fixed N")
    parser.add_argument("--check", nargs="+", type=Path, metavar="INPUT",
                        help="images to check the export on (default: the run's test split)")
    parser.add_argument("--check-images", type=int, default=DEFAULT_CHECK_IMAGES, metavar="N",
                        help=f"how many (default {DEFAULT_CHECK_IMAGES}; with --batch N, N)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted difference of a probability (default {DEFAULT_TOLERANCE:g})")
    parser.set_defaults(handler=cmd_export)
