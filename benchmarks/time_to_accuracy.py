"""Time to accuracy: train a recipe for several seeds and report when test accuracy first reaches a target.

    python benchmarks/time_to_accuracy.py recipes/cifar10_dsconv_fast.yaml --target 85 --seeds 0 1 2 \\
        data.root=../shared/data --json tta85.json

Each seed is one ``microtrain run`` process (``seed=S`` plus the given overrides) in
``--run-root/seed<S>``. This file is also added to the run's plugin list as a plugin module: its
``on_eval`` hook logs ``wall_seconds`` in metrics.jsonl, the seconds from launching the process to
the end of that epoch's evaluation (start-up, data loading and every evaluation included). The
report gives, per seed, the first evaluated epoch whose test accuracy is >= the target and its wall time
(with ``eval_every=N`` fewer epochs are evaluated: less time spent, a coarser answer),
the final and best accuracy, then the mean and spread (sample standard deviation) over seeds.

``--runs DIR...`` only reads finished run dirs (no training); runs without ``wall_seconds`` report
the summed training seconds of the epochs instead, marked as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import microtrain

LAUNCH_ENV = "MICROTRAIN_LAUNCH_TIME"
HERE = Path(__file__).resolve().parent
PLUGIN_MODULE = Path(__file__).stem


# --- the plugin half: loaded inside each training process ------------------------------------------

@microtrain.hookimpl
def on_eval(state) -> None:
    """Add the wall time since launch to this epoch's metrics (logged by the metrics callback)."""
    launched = float(os.environ.get(LAUNCH_ENV, "nan"))
    state.metrics["wall_seconds"] = time.time() - launched


# --- the driver -------------------------------------------------------------------------------------

def plugin_list(recipe_path: str, overrides: list[str]) -> list[Any]:
    """The recipe's resolved plugins plus metrics (needed) and this module (the clock)."""
    from microtrain import plugin_entries
    from microtrain.assembly import prepare_recipe

    recipe, _, _ = prepare_recipe(recipe_path, overrides)
    plugins = list(recipe["plugins"])
    names = [name for name, _ in plugin_entries(plugins)]
    if "metrics" not in names:
        plugins.append("metrics")
    return [*plugins, PLUGIN_MODULE]


def train_seed(recipe: str, seed: int, overrides: list[str], run_dir: Path, plugins: list[Any]) -> dict[str, Any]:
    """One ``microtrain run`` process; returns its exit status and wall time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env[LAUNCH_ENV] = repr(time.time())
    command = [sys.executable, "-m", "microtrain", "run", recipe, f"seed={seed}", *overrides,
               f"plugins={json.dumps(plugins)}", "--run-dir", str(run_dir)]
    start = time.perf_counter()
    returncode = subprocess.call(command, env=env)
    return {"returncode": returncode, "process_seconds": time.perf_counter() - start}


def analyse(run_dir: Path, target: float) -> dict[str, Any]:
    """Epoch and wall time at which test accuracy first reached ``target``, final and best accuracy."""
    from microtrain.errors import MicrotrainError
    from microtrain_plugins.callbacks.metrics_log import read_metrics
    from microtrain_plugins.callbacks.summary import evaluated_rows

    rows = read_metrics(run_dir)
    evaluated = evaluated_rows(rows)  # every epoch, unless the recipe sets eval_every
    if not evaluated:
        raise MicrotrainError(f"{run_dir}: no evaluated epoch in metrics.jsonl (the run stopped before its first "
                              "evaluation, or evaluated none); resume it with microtrain run RECIPE --resume DIR")
    timed = all(row.get("wall_seconds") is not None for row in evaluated)
    reached = next((row for row in evaluated if row["test_acc"] >= target), None)
    elapsed = 0.0
    train_seconds = {}
    for row in rows:
        elapsed += row.get("epoch_seconds") or 0.0
        train_seconds[row["epoch"]] = elapsed
    result: dict[str, Any] = {
        "run_dir": str(run_dir), "epochs": len(rows), "final_test_acc": evaluated[-1]["test_acc"],
        "best_test_acc": max(row["test_acc"] for row in evaluated), "reached": reached is not None,
        "epoch_to_target": reached["epoch"] if reached else None,
        "time_kind": "wall_seconds" if timed else "train_seconds",
        "seconds_to_target": None, "total_seconds": evaluated[-1]["wall_seconds"] if timed else elapsed,
    }
    if reached is not None:
        result["seconds_to_target"] = reached["wall_seconds"] if timed else train_seconds[reached["epoch"]]
    return result


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    reached = [r for r in ok if r["reached"]]
    return {
        "seeds": len(results), "finished": len(ok), "reached": len(reached),
        "time_kinds": sorted({r["time_kind"] for r in ok}),
        "epoch_to_target": spread([r["epoch_to_target"] for r in reached]),
        "seconds_to_target": spread([r["seconds_to_target"] for r in reached]),
        "final_test_acc": spread([r["final_test_acc"] for r in ok]),
        "best_test_acc": spread([r["best_test_acc"] for r in ok]),
    }


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(stats: dict[str, Any], digits: int = 1) -> str:
    return "-" if stats["mean"] is None else f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def print_report(results: list[dict[str, Any]], summary: dict[str, Any], target: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"time to {target:g}% test accuracy")
    for column in ("seed", f"epoch >= {target:g}%", "seconds to target", "final acc %", "best acc %", "epochs",
                   "total seconds", "run dir"):
        table.add_column(column, justify="left" if column == "run dir" else "right")
    for r in results:
        if "error" in r:
            table.add_row(str(r["seed"]), "[red]failed[/]", "-", "-", "-", "-", "-", r["error"])
            continue
        kind = "" if r["time_kind"] == "wall_seconds" else " (train)"
        table.add_row(str(r["seed"]), str(r["epoch_to_target"]) if r["reached"] else "not reached",
                      _fmt(r["seconds_to_target"]) + (kind if r["reached"] else ""), _fmt(r["final_test_acc"], 2),
                      _fmt(r["best_test_acc"], 2), str(r["epochs"]), _fmt(r["total_seconds"]) + kind, r["run_dir"])
    table.add_section()
    table.add_row("mean ± sd", _pm(summary["epoch_to_target"]), _pm(summary["seconds_to_target"]),
                  _pm(summary["final_test_acc"], 2), _pm(summary["best_test_acc"], 2), "", "",
                  f"{summary['reached']}/{summary['seeds']} seeds reached the target")
    console = Console()
    console.print(table)
    if len(summary["time_kinds"]) > 1:
        console.print("[yellow]note: some runs have no wall_seconds; their times are summed training seconds only, "
                      "so the time spread mixes two kinds of figure[/]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="recipe to train (not needed with --runs)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value for every seed (anywhere on the line)")
    parser.add_argument("--target", type=float, default=85.0, help="test accuracy in percent (default 85)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run-root", type=Path, default=None,
                        help="folder for the runs (default runs/time_to_accuracy/<recipe>-<timestamp>)")
    parser.add_argument("--runs", type=Path, nargs="+", default=None, help="only analyse these finished run dirs")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # so `--seeds 0 1 k=v` works
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    if args.runs is None and args.recipe is None:
        parser.error("give a RECIPE to train, or --runs DIR... to analyse finished runs")
    return args


def main(argv: list[str] | None = None) -> int:
    from microtrain.errors import MicrotrainError

    args = parse_args(argv)
    results: list[dict[str, Any]] = []
    failed = False
    if args.runs is not None:
        import yaml

        for run_dir in args.runs:
            try:
                result = analyse(run_dir, args.target)
            except MicrotrainError as exc:
                result, failed = {"run_dir": str(run_dir), "error": str(exc)}, True
            saved = run_dir / "recipe.yaml"
            result["seed"] = yaml.safe_load(saved.read_text()).get("seed") if saved.is_file() else "?"
            results.append(result)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        root = args.run_root or Path("runs") / "time_to_accuracy" / f"{Path(args.recipe).stem}-{stamp}"
        plugins = plugin_list(args.recipe, args.overrides)
        for seed in args.seeds:
            run_dir = root / f"seed{seed}"
            process = train_seed(args.recipe, seed, args.overrides, run_dir, plugins)
            try:
                result = analyse(run_dir, args.target)
            except MicrotrainError as exc:
                result = {"run_dir": str(run_dir), "error": str(exc)}
            if process["returncode"] != 0:
                failed = True
                result = {"run_dir": str(run_dir), "error": f"microtrain run exited with {process['returncode']}; "
                                                            f"see {run_dir / 'error.log'}"}
            results.append({"seed": seed, **result, **process})
    summary = summarise(results)
    print_report(results, summary, args.target)
    if args.json:
        report = {"benchmark": "time_to_accuracy", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "recipe": args.recipe, "overrides": args.overrides, "target": args.target, "runs": results,
                  "summary": summary}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    try:
        sys.exit(main())
    except Exception as error:  # noqa: BLE001 - one line for the user's mistakes, a traceback for ours
        from microtrain.errors import MicrotrainError

        if not isinstance(error, MicrotrainError):
            raise
        print(f"time_to_accuracy: {error}", file=sys.stderr)
        sys.exit(2)
