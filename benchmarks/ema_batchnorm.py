"""What the EMA model's BatchNorm statistics are worth: re-evaluate a run's checkpoint three ways.

    python benchmarks/ema_batchnorm.py runs/dsresnet-50ep data.root=../shared/data --json out.json

Evaluates, through the engine's own test pass (the recipe's loader, precision and ``tta`` plugin):
1. the raw trained weights (the checkpoint's ``model``),
2. the EMA weights with the BatchNorm statistics saved beside them in the checkpoint
   (what the ``ema`` callback's ``bn_batches: 0`` gives: statistics copied from the trained model),
3. the EMA weights with their BatchNorm statistics re-estimated from N augmented training batches of
   the run's last epoch, for each N of ``--bn-batches`` (what the ``ema`` callback does with
   ``bn_batches: N``).

The recipe is the run dir's ``recipe.yaml``; overrides after the run dir change it (``data.root``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import microtrain
from microtrain_plugins.callbacks.ema import reestimate_batchnorm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run dir with recipe.yaml and checkpoints/")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.root=../shared/data")
    parser.add_argument("--checkpoint", default="last.pt", help="file in RUN_DIR/checkpoints (default last.pt)")
    parser.add_argument("--bn-batches", type=int, nargs="+", default=[5, 20, 80])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    checkpoint = microtrain.load_checkpoint(args.run_dir / "checkpoints" / args.checkpoint)
    saved_ema = checkpoint.get("plugins", {}).get("ema")
    if saved_ema is None:
        print(f"{args.checkpoint} has no EMA weights: the run did not use the ema plugin", file=sys.stderr)
        return 2
    # Only tta (when the recipe has it): its predict hook is part of the test pass; the weights are set below.
    run = microtrain.build_run(args.run_dir / "recipe.yaml", args.overrides, run_dir=args.run_dir, callbacks=["tta"])
    state, engine = run.state, run.engine
    model = state.unwrapped_model

    results: dict[str, object] = {"run_dir": str(args.run_dir), "checkpoint": args.checkpoint,
                                  "epoch": checkpoint["epoch"], "ema_updates": saved_ema["updates"]}
    model.load_state_dict(checkpoint["model"])
    results["raw_weights"] = engine.evaluate(model)["test_acc"]
    model.load_state_dict(saved_ema["state_dict"])
    saved = engine.evaluate(model)
    results["ema_saved_batchnorm"] = saved["test_acc"]
    results["ema_saved_batchnorm_test_loss"] = saved["test_loss"]

    state.train_loader.set_epoch(max(int(checkpoint["epoch"]), 1))
    batches: list[torch.Tensor] = []
    for images, _ in state.train_loader:
        batches.append(images)
        if len(batches) == max(args.bn_batches):
            break
    reestimated = {}
    for count in args.bn_batches:
        model.load_state_dict(saved_ema["state_dict"])
        start = time.perf_counter()
        reestimate_batchnorm(model, batches[:count])
        seconds = time.perf_counter() - start
        reestimated[str(count)] = {"test_acc": engine.evaluate(model)["test_acc"], "seconds": round(seconds, 2)}
    results["ema_reestimated_batchnorm"] = reestimated

    print(f"{args.run_dir} ({args.checkpoint}, epoch {checkpoint['epoch']}): test accuracy %")
    print(f"  raw trained weights                 {results['raw_weights']:.2f}")
    print(f"  EMA, BatchNorm statistics as saved  {results['ema_saved_batchnorm']:.2f}")
    for count, entry in reestimated.items():
        print(f"  EMA, BatchNorm re-estimated, {count:>3} batches  {entry['test_acc']:.2f}  ({entry['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
