"""How close microtrain's training loop is to a hand-written PyTorch loop, and to the machine's peak.

For every loader, the same recipe is built twice in this process (same seed, so the same initial
weights, the same loader batches, optimizer, schedule, precision, label smoothing, channels_last):

  microtrain  the engine's Engine.fit with its hooks and the progress and metrics callbacks on;
  bare        a minimal loop: forward, cross-entropy, zero_grad, backward, optimizer and schedule step.

Both train ``--warmup`` untimed steps and then ``--steps`` timed steps; the table gives images/s of
both and their ratio (microtrain / bare; 1.0 means no overhead). The two runs alternate, ``--repeats``
times, and the best of each is kept. The model's training-step FLOPs (forward + backward, counted
with torch.utils.flop_counter.FlopCounterMode: convolutions and matmuls) give the achieved GFLOP/s,
set against the measured peak of a 2048x2048 fp32 matmul on the same device and thread count.

    python benchmarks/epoch_throughput.py --steps 200 --data-root ../shared/data --json epoch.json
    python benchmarks/epoch_throughput.py --steps 5 --warmup 2 --loaders tensor      # quick check, synthetic data

Without ``--data-root`` the data are the ``synthetic`` dataset (32x32, sized to the steps run).
Extra ``key=value`` arguments are recipe overrides for every run (e.g. ``precision=bf16 compile=true``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import microtrain  # noqa: E402
from microtrain import MicrotrainError, Run, State, machine_info  # noqa: E402
from microtrain.assembly import configure_threads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LOADERS = ["albumentations", "tensor", "dali"]


class Take:
    """The first ``count`` batches of a loader, so both loops see exactly the same batches."""

    def __init__(self, loader: Any, count: int):
        if len(loader) < count:
            raise MicrotrainError(f"the loader gives {len(loader)} batches per epoch but {count} are needed; "
                                  "lower --steps/--warmup or --batch-size")
        self.loader, self.count = loader, count

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for number, batch in enumerate(self.loader):
            if number >= self.count:
                break
            yield batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Times the engine from the end of the last warm-up step to the start of evaluation."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.stop = None

    @microtrain.hookimpl(trylast=True)
    def after_batch(self, state: State) -> None:
        if state.batch_index == self.warmup:
            synchronize(state.device)
            self.start = time.perf_counter()

    @microtrain.hookimpl(tryfirst=True)
    def before_eval(self, state: State) -> None:
        synchronize(state.device)
        self.stop = time.perf_counter()


def overrides_for(loader: str, args: argparse.Namespace) -> list[str]:
    total = args.warmup + args.steps
    data = (["data.name=cifar10", f"data.root={args.data_root}"] if args.data_root else
            ["data.name=synthetic", f"data.train_size={total * args.batch_size}", f"data.test_size={args.batch_size}"])
    return [f"loader.name={loader}", f"loader.batch_size={args.batch_size}", "epochs=1", f"threads={args.threads}",
            "plugins=[progress, metrics]", *data, *args.overrides]


def build(loader: str, args: argparse.Namespace, run_dir: Path, with_plugins: bool, **options: Any) -> Run:
    run = microtrain.build_run(args.recipe, overrides_for(loader, args), run_dir=run_dir,
                               callbacks="all" if with_plugins else "none", **options)
    total = args.warmup + args.steps
    run.state.train_loader = Take(run.state.train_loader, total)
    run.state.test_loader = Take(run.state.test_loader, 1)  # evaluation is not timed; keep it short
    run.state.steps_per_epoch = total
    return run


def time_microtrain(loader: str, args: argparse.Namespace) -> float:
    """Seconds for the timed steps through Engine.fit (hooks, progress and metrics callbacks on)."""
    with tempfile.TemporaryDirectory(prefix="epoch-throughput-") as tmp:
        clock = Clock(args.warmup)
        build(loader, args, Path(tmp), with_plugins=True, extra_plugins={"benchmark-clock": clock}).engine.fit()
        return clock.stop - clock.start


def time_bare(loader: str, args: argparse.Namespace) -> float:
    """Seconds for the timed steps through a minimal hand-written loop over the same components."""
    with tempfile.TemporaryDirectory(prefix="epoch-throughput-") as tmp:
        run = build(loader, args, Path(tmp), with_plugins=False)
    recipe, state = run.recipe, run.state
    model, optimizer, scheduler, device = state.model, state.optimizer, state.scheduler, state.device
    scaler = torch.amp.GradScaler(device.type, enabled=recipe["precision"] == "fp16" and device.type == "cuda")
    smoothing = recipe["label_smoothing"]
    model.train()
    state.train_loader.set_epoch(1)
    start = None
    for number, (images, labels) in enumerate(state.train_loader, 1):
        with microtrain.autocast(device, recipe["precision"]):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if number == args.warmup:
            synchronize(device)
            start = time.perf_counter()
    synchronize(device)
    return time.perf_counter() - start


def train_step_flops(loader: str, args: argparse.Namespace) -> tuple[float, torch.device, str]:
    """FLOPs of one training step (forward + backward) per image, on a copy of the recipe's model."""
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory(prefix="epoch-throughput-") as tmp:
        run = build(loader, args, Path(tmp), with_plugins=False)
    recipe, state = run.recipe, run.state
    model = copy.deepcopy(state.unwrapped_model).train()
    images, labels = next(iter(state.train_loader))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / images.shape[0], state.device, recipe["model"]["name"]


def matmul_peak_gflops(device: torch.device, size: int = 2048, seconds: float = 1.0) -> float:
    """Best rate of a size x size fp32 matmul (2 n^3 FLOPs) on ``device`` over about ``seconds``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    for _ in range(2):
        torch.mm(a, b, out=out)
    synchronize(device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / (4 if device.type == "cuda" else 1))
    return 2 * size**3 / best / 1e9


def available(loader: str) -> str | None:
    """None when the loader can run here, else why not (only dali has an optional dependency)."""
    if loader != "dali":
        return None
    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        found = False
    return None if found else "NVIDIA DALI is not installed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value for every run (e.g. precision=bf16)")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "cifar10_dsconv.yaml"), help="recipe to train")
    parser.add_argument("--loaders", nargs="+", default=DEFAULT_LOADERS, help="loader plugins to compare")
    parser.add_argument("--steps", type=int, default=200, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before timing starts")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop; the best is kept")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-root", default=None, help="CIFAR-10 root (default: synthetic data)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every core)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # so `--loaders tensor k=v` works
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    for name in ("steps", "warmup", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    console = Console()
    configure_threads(args.threads, 1)
    results: list[dict[str, Any]] = []
    flops_per_image = device = model_name = peak = None
    for loader in args.loaders:
        reason = available(loader)
        if reason:
            console.print(f"[yellow]{loader}: skipped ({reason})[/]")
            results.append({"loader": loader, "skipped": reason})
            continue
        try:
            if flops_per_image is None:
                flops_per_image, device, model_name = train_step_flops(loader, args)
                peak = matmul_peak_gflops(device)
            runs: dict[str, list[float]] = {"microtrain": [], "bare": []}
            for repeat in range(args.repeats):
                order = ("microtrain", "bare") if repeat % 2 == 0 else ("bare", "microtrain")
                for which in order:
                    seconds = (time_microtrain if which == "microtrain" else time_bare)(loader, args)
                    runs[which].append(args.steps * args.batch_size / seconds)
        except MicrotrainError as exc:
            console.print(f"[yellow]{loader}: skipped ({exc})[/]")
            results.append({"loader": loader, "skipped": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - one loader's failure (a missing module, a CUDA error) is a result too
            console.print(f"[red]{loader}: failed ({type(exc).__name__}: {exc})[/]", highlight=False)
            results.append({"loader": loader, "skipped": f"failed: {type(exc).__name__}: {exc}"[:500], "failed": True})
            write_report(args, argv, device, model_name, flops_per_image, peak, results)
            continue
        mt, bare = max(runs["microtrain"]), max(runs["bare"])
        results.append({
            "loader": loader, "ratio": mt / bare,
            "microtrain_images_per_second": mt, "bare_images_per_second": bare,
            "microtrain_gflops": mt * flops_per_image / 1e9, "bare_gflops": bare * flops_per_image / 1e9,
            "fraction_of_peak": mt * flops_per_image / 1e9 / peak,
            "all_microtrain_images_per_second": runs["microtrain"], "all_bare_images_per_second": runs["bare"],
        })
        write_report(args, argv, device, model_name, flops_per_image, peak, results)  # a stopped run keeps this much

    table = Table(title=f"training throughput: {model_name or '?'}, batch {args.batch_size}, {args.steps} timed steps "
                        f"after {args.warmup}, best of {args.repeats}")
    for column in ("loader", "microtrain img/s", "bare img/s", "ratio", "GFLOP/s", "% of peak"):
        table.add_column(column, justify="left" if column == "loader" else "right")
    for row in results:
        if "skipped" in row:
            table.add_row(row["loader"], "-", "-", "-", "-", "skipped")
            continue
        table.add_row(row["loader"], f"{row['microtrain_images_per_second']:.0f}", f"{row['bare_images_per_second']:.0f}",
                      f"{row['ratio']:.3f}", f"{row['microtrain_gflops']:.1f}", f"{100 * row['fraction_of_peak']:.1f}")
    console.print(table)
    if peak is not None:
        console.print(f"device {device}, {torch.get_num_threads()} threads; training step {flops_per_image / 1e6:.1f} "
                      f"MFLOP per image (forward + backward); peak {peak:.1f} GFLOP/s (2048x2048 fp32 matmul)",
                      highlight=False)
    if args.json:
        write_report(args, argv, device, model_name, flops_per_image, peak, results)
        console.print(f"wrote {args.json}")
    return 1 if any(row.get("failed") for row in results) else 0


def write_report(args: argparse.Namespace, argv: list[str] | None, device, model_name, flops_per_image, peak,
                 results: list[dict[str, Any]]) -> None:
    """The JSON report of what is measured so far (``--json``), rewritten after every loader."""
    if not args.json:
        return
    report = {
        "benchmark": "epoch_throughput", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(device), "device": str(device), "recipe": str(args.recipe), "model": model_name,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "data": args.data_root or "synthetic", "overrides": args.overrides,
        "train_flops_per_image": flops_per_image, "peak_gflops": peak, "loaders": results,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MicrotrainError as error:
        print(f"epoch_throughput: {error}", file=sys.stderr)
        sys.exit(2)
