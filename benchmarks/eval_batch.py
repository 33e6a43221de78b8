"""Test-pass speed of a recipe's model at several evaluation batch sizes (``loader.eval_batch_size``):
forward passes in inference mode, as the engine's evaluation runs them, data loading left out.
Used to pick the recipes' eval_batch_size: on a CPU a large batch is not free, because every
layer's activations then overflow the caches.

    python benchmarks/eval_batch.py [--recipe recipes/cifar10_dsresnet.yaml] [--sizes 128 256 500 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from microtrain import machine_info
from microtrain.assembly import configure_threads, prepare_recipe


def measure(model: torch.nn.Module, batch: int, channels_last: bool, images_per_size: int) -> float:
    """Images per second of ``model`` on ``images_per_size`` random images in batches of ``batch``."""
    images = torch.randn(batch, 3, 32, 32)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    steps = max(1, images_per_size // batch)
    with torch.inference_mode():
        model(images)  # warm-up: allocator and oneDNN primitive caches for this shape
        start = time.perf_counter()
        for _ in range(steps):
            model(images)
        return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/cifar10_dsresnet.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 500, 1000])
    parser.add_argument("--images", type=int, default=4000, help="images per size and round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all sizes; the best of each is kept")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    recipe, _, registry = prepare_recipe(args.recipe, [])
    configure_threads(recipe["threads"], 1)
    torch.manual_seed(0)
    options = {k: v for k, v in recipe["model"].items() if k != "name"}
    model = registry.get("model", recipe["model"]["name"], "model.name").build(10, (3, 32, 32), options=options).eval()
    if recipe["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # Interleaved rounds, best kept: a shared VM's speed drifts within a minute.
    best: dict[int, float] = {}
    for round_number in range(args.rounds):
        for size in args.sizes:
            rate = measure(model, size, recipe["channels_last"], args.images)
            best[size] = max(best.get(size, 0.0), rate)
            print(json.dumps({"round": round_number + 1, "eval_batch_size": size,
                              "images_per_second": round(rate, 1)}), flush=True)
    rows = [{"eval_batch_size": size, "images_per_second": round(best[size], 1)} for size in args.sizes]
    print("\n".join(f"eval_batch_size {row['eval_batch_size']:>5}: {row['images_per_second']:>7.0f} images/s"
                    for row in rows))
    if args.json:
        command = " ".join(["python", "benchmarks/eval_batch.py", *(sys.argv[1:] if argv is None else argv)])
        with open(args.json, "w") as handle:
            json.dump({"machine": machine_info(), "threads": torch.get_num_threads(), "recipe": args.recipe,
                       "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "results": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
