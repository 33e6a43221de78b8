"""The ``microtrain compare`` command: plan, check, train (or reuse) the paired runs, analyse, write.

    microtrain compare A.yaml B.yaml --seeds 3 [--metric last5_test_acc] [KEY=VALUE ...] [--out DIR]
    microtrain compare --runs-a 'runs/x/seed*' --runs-b 'runs/y/seed*'

Everything that can be checked is checked before the first run starts (the recipes resolve, the two
sides use the same data and classes, the metric is logged, the run dirs hold what they should, the
estimate fits the budget): a bad input is one line and exit status 2, with nothing run. Each run is
its own ``microtrain run`` process in ``OUT/<a|b>/seed<S>``, so a stopped comparison continues where
it stopped when the same command is given again.
"""

from __future__ import annotations

import datetime
import glob
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import microtrain
from microtrain import MicrotrainError, machine_info
from microtrain_plugins.compare import plan as planning
from microtrain_plugins.compare.analysis import SIDES, analyse
from microtrain_plugins.compare.metrics import RunFigures, check_logged, parse_metric, read_finished_run
from microtrain_plugins.compare.output import print_result, write_outputs

DEFAULT_METRIC = "last5_test_acc"
DEFAULT_SEEDS = 3
DEFAULT_BUDGET = "1h"
INTERRUPTED = 130


def split_words(words: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """Positional words are recipes, or KEY=VALUE overrides for both sides."""
    return [w for w in words if "=" not in w], [w for w in words if "=" in w] + list(overrides)


def check_overrides(overrides: list[str], where: str) -> None:
    for text in overrides:
        if "=" not in text:
            raise MicrotrainError(f"{where} {text!r} is not KEY=VALUE; write it as e.g. optimizer.lr=0.1")
        if text.split("=", 1)[0].strip() == "seed":
            raise MicrotrainError(f"{where} {text!r}: compare sets each run's seed itself; choose how many with --seeds N")


def default_out(name_a: str, name_b: str) -> Path:
    return Path("runs") / "compare" / (name_a if name_a == name_b else f"{name_a}_vs_{name_b}")


def default_labels(names: tuple[str, str], side_overrides: tuple[list[str], list[str]]) -> dict[str, str]:
    """The recipe names; when both sides run the same recipe, what each side changes in it."""
    if names[0] != names[1]:
        return dict(zip(SIDES, names, strict=True))
    labels = {}
    for key, name, changed in zip(SIDES, names, side_overrides, strict=True):
        text = f"{name} {' '.join(changed)}" if changed else f"{name} ({key.upper()})"
        labels[key] = text if len(text) <= 60 else text[:57] + "..."
    return labels


# --- running the paired runs ------------------------------------------------------------------------------------

class ChildRunner:
    """Runs one ``microtrain run`` process at a time. The child has its own session, so a Ctrl-C (or SIGTERM)
    reaches this process only and is passed on once: the child then stops after its current step, saves a
    checkpoint and marks its run dir interrupted, and the next compare resumes it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.stopping = False

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # a second signal makes the child stop at once, as in microtrain run

    def run(self, command: list[str]) -> int:
        handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        try:
            self.process = subprocess.Popen(command, start_new_session=True)
            status = self.process.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return INTERRUPTED if self.stopping else status


def execute(planned: list[planning.PlannedRun], command_line: str) -> int:
    """Train or resume every planned run in order; 0 when all finished."""
    todo = [run for run in planned if run.action != "reuse"]
    runner = ChildRunner()
    for number, run in enumerate(todo, 1):
        if run.action == "train" and run.run_dir.is_dir():
            run.run_dir.rmdir()  # planned as fresh only when empty; `microtrain run --run-dir` wants a new folder
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        verb = "training" if run.action == "train" else f"resuming ({run.epochs_left} epochs left)"
        print(f"compare [{number}/{len(todo)}] {run.label}: {verb} in {run.run_dir}", flush=True)
        status = runner.run(run.command())
        if status == INTERRUPTED or runner.stopping:
            print(f"microtrain: compare stopped during {run.label}; finished runs are kept and {run.run_dir} resumes: "
                  f"run the same command again ({command_line})", file=sys.stderr)
            return INTERRUPTED
        if status != 0:
            print(f"microtrain: compare: {run.label} failed (microtrain run exited with status {status}; its message is above, "
                  f"a traceback in {run.run_dir / 'error.log'} when there is one); fix it and run the same command again: "
                  "finished runs are reused", file=sys.stderr)
            return 1
    return 0


# --- the two modes ----------------------------------------------------------------------------------------------

def compare_recipes(args, recipes: list[str], overrides: list[str], metric) -> int:
    if len(recipes) != 2:
        raise MicrotrainError(f"give two recipes, A then B (got {len(recipes)}: {' '.join(recipes) or 'none'}); e.g. "
                              "microtrain compare a.yaml b.yaml --seeds 3, or --runs-a/--runs-b for finished runs")
    if args.seeds < 2:
        raise MicrotrainError(f"--seeds {args.seeds}: a comparison needs at least 2 seeds (an interval needs the spread "
                              "between seeds); 3 or more is better")
    set_a, set_b = list(args.set_a or []), list(args.set_b or [])
    check_overrides(overrides, "override")
    check_overrides(set_a, "--set-a")
    check_overrides(set_b, "--set-b")
    budget = planning.parse_duration(args.budget)
    sides = [planning.resolve_side("a", recipes[0], overrides + set_a), planning.resolve_side("b", recipes[1], overrides + set_b)]
    side_a, side_b = sides
    check_logged(metric, {f"A ({side_a.name})": side_a.recipe, f"B ({side_b.name})": side_b.recipe})
    planning.check_same_data(side_a.recipe["data"], side_b.recipe["data"], side_a.classes, side_b.classes)
    notes = planning.loader_notes(side_a.recipe["loader"], side_b.recipe["loader"])
    out = args.out or default_out(side_a.name, side_b.name)
    seeds = list(range(args.seeds))
    planned = planning.plan_runs(sides, seeds, out)
    estimate = planning.estimate(planned, out)
    labels = dict(zip(SIDES, args.labels, strict=True)) if args.labels else \
        default_labels((side_a.name, side_b.name), (set_a, set_b))
    command_line = shlex.join(["microtrain", "compare", *recipes, "--seeds", str(args.seeds), "--metric", metric.name,
                               *[w for s in set_a for w in ("--set-a", s)], *[w for s in set_b for w in ("--set-b", s)],
                               *(["--labels", *args.labels] if args.labels else []), "--out", str(out), *overrides])
    print_plan(planned, estimate, labels, notes, budget)
    over_budget = estimate.runs and estimate.seconds > budget and not args.yes
    if args.dry_run:
        print("compare: dry run, nothing trained" + ("; over --budget: a real run needs --yes or a larger --budget"
                                                     if over_budget else ""))
        return 0
    if over_budget:
        raise MicrotrainError(f"the plan needs roughly {planning.duration_text(estimate.seconds)} ({estimate.runs} runs, "
                              f"{estimate.epochs} epochs), over --budget {args.budget}; add --yes to run it anyway, or raise "
                              "--budget")
    status = execute(planned, command_line)
    if status:
        return status
    runs = {key: [read_finished_run(run.run_dir, metric) for run in planned if run.side.key == key] for key in SIDES}
    header = {key: {"recipe": side.recipe_path, "name": side.name, "overrides": side.overrides, "resolved_recipe": side.recipe}
              for key, side in zip(SIDES, sides, strict=True)}
    return finish(metric, runs, labels, notes, out, {**header, "command": command_line})


def expand_run_dirs(patterns: list[str], option: str) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
            if not matches:
                raise MicrotrainError(f"{option} {pattern!r} matches no folder; check the pattern (quote it so the shell "
                                      "leaves it to compare)")
            found += matches
        else:
            found.append(Path(pattern))
    return found


def compare_run_dirs(args, recipes: list[str], overrides: list[str], metric) -> int:
    if not (args.runs_a and args.runs_b):
        raise MicrotrainError("give both --runs-a and --runs-b (the finished run dirs of each side)")
    if recipes or overrides or args.set_a or args.set_b:
        raise MicrotrainError("--runs-a/--runs-b compare finished runs: give no recipes or overrides with them")
    runs = {key: [read_finished_run(d, metric) for d in expand_run_dirs(patterns, f"--runs-{key}")]
            for key, patterns in zip(SIDES, (args.runs_a, args.runs_b), strict=True)}
    for key in SIDES:
        check_one_recipe(runs[key], key)
    first_a, first_b = runs["a"][0], runs["b"][0]
    planning.check_same_data(first_a.recipe.get("data", {}), first_b.recipe.get("data", {}), list(first_a.per_class),
                             list(first_b.per_class))
    notes = planning.loader_notes(first_a.recipe.get("loader", {}), first_b.recipe.get("loader", {}))
    names = (str(first_a.recipe.get("name")), str(first_b.recipe.get("name")))
    labels = dict(zip(SIDES, args.labels, strict=True)) if args.labels else default_labels(names, ([], []))
    out = args.out or default_out(*names)
    command_line = shlex.join(["microtrain", "compare", "--runs-a", *args.runs_a, "--runs-b", *args.runs_b,
                               "--metric", metric.name, *(["--labels", *args.labels] if args.labels else []), "--out", str(out)])
    header = {key: {"recipe": None, "name": names[i], "overrides": [], "run_dirs": [str(r.run_dir) for r in runs[key]]}
              for i, key in enumerate(SIDES)}
    if args.dry_run:
        print(f"compare: {len(runs['a'])} + {len(runs['b'])} finished runs, nothing to train; would write {out}")
        return 0
    return finish(metric, runs, labels, notes, out, {**header, "command": command_line})


def check_one_recipe(runs: list[RunFigures], key: str) -> None:
    """The runs of one side differ only in their seed (and where their data lives)."""
    def comparable(run: RunFigures) -> dict[str, Any]:
        recipe = {k: v for k, v in run.recipe.items() if k != "seed"}
        if isinstance(recipe.get("data"), dict):
            recipe["data"] = planning.without(recipe["data"], planning.DATA_KEYS_IGNORED)
        return recipe

    first = comparable(runs[0])
    for run in runs[1:]:
        changed = planning.differences(first, comparable(run))
        if changed:
            raise MicrotrainError(f"the runs of side {key.upper()} are not one recipe: {runs[0].run_dir} and {run.run_dir} "
                                  f"differ in {', '.join(changed[:4])}; give the runs of one recipe per side")


def finish(metric, runs: dict[str, list[RunFigures]], labels: dict[str, str], notes: list[str], out: Path,
           header: dict[str, Any]) -> int:
    result = analyse(metric, runs["a"], runs["b"], labels)
    result["notes"] = notes + result["notes"]
    result = {"tool": "microtrain compare", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "header": {**header, "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info()},
              **result}
    print_result(result)
    written = write_outputs(result, out)
    print(f"compare: wrote {', '.join(str(p) for p in written)}")
    return 0


def print_plan(planned: list[planning.PlannedRun], estimate: planning.Estimate, labels: dict[str, str], notes: list[str],
               budget: float) -> None:
    sides = {run.side.key: run.side for run in planned}
    for key, side in sides.items():
        changed = f" with {' '.join(side.overrides)}" if side.overrides else ""
        print(f"compare: {key.upper()} = {labels[key]}: {side.recipe_path}{changed}")
    counts = {action: sum(run.action == action for run in planned) for action in ("train", "resume", "reuse")}
    print(f"compare: {len(planned)} runs: {counts['train']} to train, {counts['resume']} to resume, {counts['reuse']} finished "
          "(reused)")
    if estimate.runs:
        speeds = "; ".join(f"{key.upper()}: {speed.images_per_second:.0f} train img/s ({speed.source})"
                           for key, speed in estimate.speeds.items())
        print(f"compare: roughly {planning.duration_text(estimate.seconds)} for {estimate.runs} runs, {estimate.epochs} epochs "
              f"(budget {planning.duration_text(budget)}); {speeds}; plus {planning.EVALUATION_SHARE:.0%} per epoch for "
              f"evaluation and {planning.STARTUP_SECONDS:.0f} s per process (assumed)")
    for note in notes:
        print(f"compare: note: {note}")


# --- the command line -------------------------------------------------------------------------------------------

def cmd_compare(args) -> int:
    recipes, overrides = split_words(args.words, args.overrides)
    metric = parse_metric(args.metric)
    if args.runs_a or args.runs_b:
        return compare_run_dirs(args, recipes, overrides, metric)
    return compare_recipes(args, recipes, overrides, metric)


@microtrain.hookimpl
def register_commands(subparsers):
    parser = subparsers.add_parser(
        "compare", help="is recipe B better than A? seed-paired runs with confidence intervals",
        description="Train recipes A and B for seeds 0..N-1 (or read finished run dirs), pair the runs by seed and report "
                    "the mean difference B - A of a metric with 95%% intervals (paired t and bootstrap), the paired t-test, "
                    "per-class differences and the difference in training time. Writes OUT/compare.json, compare.md and "
                    "compare.png; the runs go to OUT/a/seedS and OUT/b/seedS, and the same command continues a stopped "
                    "comparison (finished runs are reused, an interrupted one resumes).")
    parser.add_argument("words", nargs="*", metavar="RECIPE_A RECIPE_B [KEY=VALUE]",
                        help="the two recipes, then overrides for both sides (e.g. data.root=../shared/data epochs=2)")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, metavar="N", help=f"seeds 0..N-1 (default {DEFAULT_SEEDS})")
    parser.add_argument("--metric", default=DEFAULT_METRIC,
                        help=f"what to compare (default {DEFAULT_METRIC}): final_X, lastN_X, best_X for a metrics.jsonl "
                             "column X such as test_acc or test_loss; time_to:T or epochs_to:T for the training seconds "
                             "or epochs until test accuracy first reaches T%% (one-sided: does B get there sooner?)")
    parser.add_argument("--set-a", action="append", metavar="KEY=VALUE", help="an override for A only (repeat for more)")
    parser.add_argument("--set-b", action="append", metavar="KEY=VALUE", help="an override for B only (repeat for more)")
    parser.add_argument("--runs-a", nargs="+", metavar="DIR", help="finished run dirs of A (or a quoted glob) instead of "
                        "training")
    parser.add_argument("--runs-b", nargs="+", metavar="DIR", help="finished run dirs of B (or a quoted glob)")
    parser.add_argument("--labels", nargs=2, metavar=("LABEL_A", "LABEL_B"), help="names of A and B in the table and plot")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where the runs and the results go (default "
                        "runs/compare/<A name>_vs_<B name>)")
    parser.add_argument("--budget", default=DEFAULT_BUDGET, metavar="DURATION",
                        help=f"refuse to start when the estimated time exceeds it, unless --yes (default {DEFAULT_BUDGET}; "
                             "90m, 2h, 3600s)")
    parser.add_argument("--yes", action="store_true", help="run even when the estimate exceeds --budget")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the plan; train nothing")
    parser.set_defaults(handler=cmd_compare, overrides=[])
