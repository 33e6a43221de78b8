"""Images per second that each loader plugin delivers, with the model left out.

Every loader found in the plugin registry is measured on the training split of CIFAR-10 (the real
copy when one is found, otherwise synthetic images of the same shape, 50,000 x 32 x 32 x 3) with
the seed recipe's augmentation list: albumentations with 0, 1, 2 ... workers, DALI on its CPU
operators, DALI on the GPU when CUDA is present, and any other loader plugin with its defaults.
Each loader runs a warm-up epoch, then several epochs of which the median is reported. An epoch
is a full pass in which every batch is touched (summed on its device); on a GPU the clock stops
only after a synchronise. Nothing else runs, so the figure is the loader's ceiling.

    python benchmarks/loader_throughput.py --data-root ../shared/data --json loader_throughput.json
    python benchmarks/loader_throughput.py --loaders albumentations,dali --workers 0,2 --limit 2000
    python benchmarks/loader_throughput.py --loaders tensor --augment "[HorizontalFlip, {TrivialAugment: {}}]"

``--augment`` is ``seed`` (the seed recipe's list), ``none``, or any augment list in YAML; a loader that
cannot run the list is reported as skipped with its reason.

Measure on a quiet machine: the header shows the load average at the start.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from microtrain import machine_info  # noqa: E402
from microtrain.errors import MicrotrainError  # noqa: E402
from microtrain.plugin_manager import create_plugin_manager  # noqa: E402
from microtrain.recipe import load_recipe_file  # noqa: E402
from microtrain.state import ImageData, LoaderContext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED_RECIPE = REPO / "recipes" / "cifar10_dsconv.yaml"


@dataclass
class Variant:
    """One loader configuration to measure."""

    loader: str
    setting: str
    options: dict[str, Any]


@dataclass
class Result:
    loader: str
    setting: str
    device: str
    status: str = "ok"
    reason: str = ""
    images_per_epoch: int = 0
    batches_per_epoch: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0
    images_per_second: float = 0.0  # median over the measured epochs
    images_per_second_min: float = 0.0
    images_per_second_max: float = 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loaders", default="", help="comma-separated loader names (default: every registered loader)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128, the seed recipe's)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="measured epochs after the warm-up; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up epochs, not measured (default 1)")
    parser.add_argument("--workers", default="0,1,2", help="albumentations worker counts to measure (default 0,1,2)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding cifar-10-batches-bin/ (default $MICROTRAIN_DATA; synthetic data if absent)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N training images (quick checks)")
    parser.add_argument("--augment", default="seed",
                        help="seed (the seed recipe's augmentation list, the default), none, or an augment list in YAML, "
                             "e.g. \"[HorizontalFlip, {TrivialAugment: {}}]\"")
    parser.add_argument("--device", default="auto", help="where batches are delivered: auto (cuda if present), cpu, cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.epochs < 1 or args.warmup < 0 or args.limit < 0:
        parser.error("--batch-size and --epochs must be at least 1, --warmup and --limit at least 0")
    try:
        args.worker_counts = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    except ValueError:
        parser.error(f"--workers takes comma-separated integers such as 0,1,2, got {args.workers!r}")
    if any(w < 0 for w in args.worker_counts):
        parser.error("--workers: counts must be 0 or more")
    return args


def cifar_roots(root: str | None) -> list[Path]:
    """Where a CIFAR-10 copy is looked for: --data-root, $MICROTRAIN_DATA, ~/.cache/microtrain, ../shared/data."""
    if root:
        return [Path(root).expanduser()]
    candidates = [os.environ.get("MICROTRAIN_DATA"), Path.home() / ".cache" / "microtrain", REPO.parent / "shared" / "data"]
    return [Path(c).expanduser() for c in candidates if c]


def load_data(root: str | None, limit: int) -> tuple[ImageData, str]:
    """The real CIFAR-10 training split when present, else synthetic images of the same shape."""
    from microtrain_plugins.data.cifar10 import build_cifar10, find_folder

    for base in cifar_roots(root):
        if find_folder(base) is not None:
            data = build_cifar10(root=str(base), download_missing=False, verify=False, limit_train=limit, limit_test=1)
            return data, f"CIFAR-10 ({base})"
    if root:
        raise MicrotrainError(f"--data-root {root}: no cifar-10-batches-bin/ with the 6 batch files there; "
                              "fix the path or leave --data-root out to use synthetic images")
    from microtrain_plugins.data.synthetic import build_synthetic

    data = build_synthetic(train_size=limit or 50_000, test_size=1, image_size=32)
    return data, "synthetic 32x32x3 (no CIFAR-10 copy found)"


def variants(names: list[str], worker_counts: list[int], gpu: bool) -> list[Variant]:
    """Every configuration to measure for the registered loader ``names``."""
    found = []
    for name in names:
        if name == "albumentations":
            found += [Variant(name, f"workers={w}", {"workers": w}) for w in worker_counts]
        elif name == "dali":
            found.append(Variant(name, "device=cpu", {"device": "cpu"}))
            if gpu:
                found.append(Variant(name, "device=gpu", {"device": "gpu"}))
        else:
            found.append(Variant(name, "defaults", {}))
    return found


def augment_list(text: str) -> list:
    """--augment: ``seed``, ``none`` or a YAML list of transforms (checked by each loader when it is built)."""
    if text == "seed":
        return load_recipe_file(SEED_RECIPE)["loader"]["augment"]
    if text == "none":
        return []
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if not isinstance(parsed, list):
        raise MicrotrainError(f"--augment {text!r}: give seed, none or a YAML list of transforms, e.g. "
                              "\"[HorizontalFlip, {TrivialAugment: {}}]\"")
    return parsed


def measure(registry, variant: Variant, data: ImageData, device: torch.device, batch_size: int, augment: list,
            warmup: int, epochs: int) -> Result:
    component = registry.get("loader", variant.loader, "--loaders")
    wanted = {"batch_size": batch_size, "augment": augment, **variant.options}
    result = Result(variant.loader, variant.setting, str(device))
    if augment and "augment" not in component.options:
        result.status, result.reason = "skipped", "the loader takes no augment list (rerun with --augment none)"
        return result
    ctx = LoaderContext(images=data.train_images, labels=data.train_labels, train=True, device=device, seed=0,
                        mean=data.mean, std=data.std, channels_last=True)
    try:
        options = component.validate({k: v for k, v in wanted.items() if k in component.options}, "loader")
        loader = component.build(ctx, options=options)
    except MicrotrainError as exc:
        result.status, result.reason = "skipped", str(exc)
        return result
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for epoch in range(1, warmup + epochs + 1):
            loader.set_epoch(epoch)
            images_seen = 0
            start = time.perf_counter()
            for images, labels in loader:
                total += images.sum(dtype=torch.float64) + labels.sum()  # touch every batch on its device
                images_seen += labels.shape[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            if epoch <= warmup:
                result.warmup_seconds = seconds
            else:
                result.epoch_seconds.append(seconds)
        result.images_per_epoch, result.batches_per_epoch = images_seen, len(loader)
    finally:
        del loader
        gc.collect()  # end DataLoader worker processes before the next variant
    rates = [result.images_per_epoch / s for s in result.epoch_seconds]
    result.images_per_second = statistics.median(rates)
    result.images_per_second_min, result.images_per_second_max = min(rates), max(rates)
    if not np.isfinite(float(total)):
        raise RuntimeError(f"{variant.loader} {variant.setting}: non-finite pixel values")
    return result


def machine() -> dict[str, Any]:
    """The machine (CPU model, cores, threads, versions), its load when timing began, and the loader libraries' versions."""
    info = machine_info()
    info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    for package, module in (("albumentations", "albumentations"), ("nvidia-dali", "nvidia.dali")):
        try:
            info[package] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            info[package] = None
    return info


def print_table(results: list[Result], header: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    table = Table(title="Loader throughput (model left out)", caption=" | ".join(f"{k}: {v}" for k, v in header.items()))
    for column, justify in (("loader", "left"), ("setting", "left"), ("device", "left"), ("images/s (median)", "right"),
                            ("min - max", "right"), ("epoch s (median)", "right"), ("batches", "right")):
        table.add_column(column, justify=justify)
    for r in results:
        if r.status != "ok":
            table.add_row(r.loader, r.setting, r.device, "[yellow]skipped[/]", "", "", r.reason[:80])
            continue
        table.add_row(r.loader, r.setting, r.device, f"{r.images_per_second:,.0f}",
                      f"{r.images_per_second_min:,.0f} - {r.images_per_second_max:,.0f}",
                      f"{statistics.median(r.epoch_seconds):.2f}", str(r.batches_per_epoch))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MicrotrainError(f"--device {args.device}: CUDA is not available here; use --device cpu or auto")
        _, registry = create_plugin_manager()
        available = registry.names("loader")
        names = [n.strip() for n in args.loaders.split(",") if n.strip()] or available
        for name in names:
            registry.get("loader", name, "--loaders")  # an unknown name is an error that lists the available ones
        data, source = load_data(args.data_root, args.limit)
        augment = augment_list(args.augment)
    except MicrotrainError as exc:
        print(f"loader_throughput: error: {exc}", file=sys.stderr)
        return 2
    settings = {"data": source, "images": len(data.train_labels), "batch_size": args.batch_size, "augment": args.augment,
                "warmup_epochs": args.warmup, "measured_epochs": args.epochs, "device": str(device)}
    info = machine()
    results = []
    for variant in variants(names, args.worker_counts, device.type == "cuda"):
        print(f"measuring {variant.loader} ({variant.setting}) ...", file=sys.stderr, flush=True)
        try:
            results.append(measure(registry, variant, data, device, args.batch_size, augment, args.warmup, args.epochs))
        except Exception as exc:  # noqa: BLE001 - one loader's failure (a missing module, a CUDA error) is a result too
            results.append(Result(variant.loader, variant.setting, str(device), status="failed",
                                  reason=f"{type(exc).__name__}: {exc}"[:500]))
        if args.json:  # after every variant: a run stopped half-way keeps what it measured
            args.json.write_text(json.dumps({"settings": settings, "machine": info,
                                             "results": [asdict(r) for r in results]}, indent=2) + "\n")
    header = {"data": f"{source}, {settings['images']:,} images", "batch": args.batch_size, "augment": args.augment,
              "epochs": f"{args.warmup} warm-up + {args.epochs} measured", "cpu": info["cpu"], "cores": info["usable_cores"],
              "gpu": info["gpu"] or "none", "load avg at start": info["load_average_at_start"]}
    print_table(results, header)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
