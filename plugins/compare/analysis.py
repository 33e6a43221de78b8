"""From the paired runs to every figure a comparison reports: per-seed values, the statistics (each with
its name and method), per-class differences, cost, and a verdict that states the interval.

The result is one JSON-ready dict (``compare.json``); the table, Markdown and figure are drawn from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from microtrain import MicrotrainError
from microtrain_plugins.compare import stats
from microtrain_plugins.compare.metrics import Metric, RunFigures

SIDES = ("a", "b")
COST_FIGURES = {
    "train_seconds": ("training seconds (sum of epoch_seconds)", "s"),
    "train_images_per_second": ("train images/s (mean over epochs)", "img/s"),
    "wall_seconds": ("wall seconds of the run (report callback's run_info.json)", "s"),
}
PER_CLASS_NOTE = ("Per-class intervals are not corrected for looking at every class at once: each excludes 0 by chance "
                  "one time in twenty, so with 10 classes and no real difference about two comparisons in five show "
                  "at least one class whose interval excludes 0.")
SECONDS_NOTE = ("Seconds and images/s depend on the machine and on what else ran on it; on a shared machine, repeated runs of "
                "the same command differ by 10-20%.")


def level_unit(unit: str) -> str:
    """An accuracy is in %, a difference of two in percentage points."""
    return "%" if unit == "points" else unit


def fmt(value: float | None, unit: str, signed: bool = False) -> str:
    """A figure with its unit: % and points to 2 decimals, seconds to 1, others to 4 significant digits."""
    if value is None or not math.isfinite(value):
        return "n/a" if value is None or math.isnan(value) else ("+inf" if value > 0 else "-inf")
    sign = "+" if signed else ""
    if unit == "%":
        return f"{value:{sign}.2f}%"
    if unit == "points":
        return f"{value:{sign}.2f} points"
    if unit in ("s", "img/s"):
        return f"{value:{sign}.1f} {unit}"
    if unit == "epochs":
        return f"{value:{sign}.2f} epochs"
    return f"{value:{sign}.4g}"


def pair_runs(runs_a: Sequence[RunFigures], runs_b: Sequence[RunFigures]) -> list[tuple[RunFigures, RunFigures]]:
    """Pairs by seed; the two sides must hold the same seeds, each once."""
    by_seed: list[dict[int, RunFigures]] = []
    for key, runs in zip(SIDES, (runs_a, runs_b), strict=True):
        seen: dict[int, RunFigures] = {}
        for run in runs:
            if run.seed in seen:
                raise MicrotrainError(f"side {key.upper()} has two runs of seed {run.seed} ({seen[run.seed].run_dir} and "
                                      f"{run.run_dir}); give each seed once")
            seen[run.seed] = run
        by_seed.append(seen)
    seeds_a, seeds_b = set(by_seed[0]), set(by_seed[1])
    if seeds_a != seeds_b:
        raise MicrotrainError(f"runs pair by seed, but A has seeds {sorted(seeds_a)} and B {sorted(seeds_b)}; give run dirs "
                              "of the same seeds on both sides")
    if len(seeds_a) < 2:
        raise MicrotrainError(f"a comparison needs at least 2 seeds per side (got {len(seeds_a)}); an interval needs "
                              "the spread between seeds")
    return [(by_seed[0][seed], by_seed[1][seed]) for seed in sorted(seeds_a)]


def statistic(name: str, method: str, unit: str = "", **figures: Any) -> dict[str, Any]:
    return {"name": name, "method": method, "unit": unit, **figures}


def difference_statistics(a: np.ndarray, b: np.ndarray, unit: str, one_sided: bool) -> list[dict[str, Any]]:
    """Every statistic of the paired differences B - A, each with its name and method."""
    diffs = b - a
    t_ci = stats.t_interval(diffs)
    boot = stats.bootstrap_interval(diffs)
    welch = stats.welch_interval(a, b)
    test = stats.paired_t_test(diffs)
    gain = stats.variance_reduction(a, b)
    found = []
    for key, values in zip(SIDES, (a, b), strict=True):
        mean, sd = stats.mean_sd(values)
        found += [statistic(f"mean_{key}", f"mean over seeds of side {key.upper()}", level_unit(unit), value=mean),
                  statistic(f"sd_{key}", f"sample standard deviation over seeds of side {key.upper()} (n - 1)", unit, value=sd)]
    found += [
        statistic("mean_difference", "mean over seeds of B - A (paired by seed)", unit, value=t_ci["mean"]),
        statistic("sd_difference", "sample standard deviation of the paired differences B - A (n - 1)", unit, value=t_ci["sd"]),
        statistic("ci95_paired_t", stats.T_INTERVAL_METHOD, unit, low=t_ci["low"], high=t_ci["high"], df=t_ci["df"],
                  t_quantile=t_ci["t_quantile"]),
        statistic("ci95_bootstrap", stats.BOOTSTRAP_METHOD, unit, low=boot["low"], high=boot["high"]),
        statistic("p_value_paired_t", "two-sided paired t-test of mean(B - A) = 0 (scipy.stats.t tail area; equals "
                  "scipy.stats.ttest_rel)", value=test["p"], t=test["t"], df=test["df"]),
    ]
    if one_sided:
        less = stats.paired_t_test(diffs, "less")
        found += [
            statistic("upper_bound95_one_sided", "one-sided paired t bound: mean(B - A) is below it with 95% confidence "
                      "(mean + t(0.95, n-1) · sd / √n)", unit, value=stats.one_sided_bound(diffs, "upper")),
            statistic("p_value_one_sided_b_sooner", "one-sided paired t-test of mean(B - A) >= 0 against B sooner (< 0)",
                      value=less["p"], t=less["t"], df=less["df"]),
        ]
    found += [
        statistic("ci95_unpaired_welch", stats.WELCH_METHOD, unit, low=welch["low"], high=welch["high"], df=welch["df"]),
        statistic("sd_difference_unpaired", "standard deviation B - A would have for unpaired runs: √(sd_A² + sd_B²)", unit,
                  value=gain["sd_unpaired"]),
        statistic("variance_reduction_factor", "pairing's gain: (sd_A² + sd_B²) / sd_difference², the variance of an unpaired "
                  "difference over that of a paired one (as many times more seeds, unpaired, for the same interval)",
                  value=gain["factor"]),
    ]
    return found


def by_name(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in found}


def verdict(metric: Metric, found: dict[str, dict[str, Any]], pairs: int, labels: dict[str, str]) -> str:
    """One plain sentence that always states the interval."""
    unit = metric.unit
    mean = found["mean_difference"]["value"]
    low, high = found["ci95_paired_t"]["low"], found["ci95_paired_t"]["high"]
    basis = f"paired t over {pairs} seeds"
    b, a = labels["b"], labels["a"]
    if metric.kind in ("time_to", "epochs_to"):
        bound = found["upper_bound95_one_sided"]["value"]
        if bound < 0:
            return (f"B ({b}) reaches {metric.target:g}% sooner than A ({a}): B - A is at most {fmt(bound, unit, True)} "
                    f"(one-sided 95% bound, {basis}; mean {fmt(mean, unit, True)}, two-sided 95% interval "
                    f"{fmt(low, unit, True)} to {fmt(high, unit, True)}).")
        return (f"Not shown that B ({b}) reaches {metric.target:g}% sooner than A ({a}): the one-sided 95% upper bound on "
                f"B - A is {fmt(bound, unit, True)} ({basis}; mean {fmt(mean, unit, True)}, two-sided 95% interval "
                f"{fmt(low, unit, True)} to {fmt(high, unit, True)}).")
    interval = f"{fmt(low, unit, True)} to {fmt(high, unit, True)}"
    if low > 0 or high < 0:
        higher = low > 0
        better = higher != metric.lower_is_better
        return (f"B ({b}) is {'better' if better else 'worse'} than A ({a}) on {metric.name}: B - A = {fmt(mean, unit, True)}, "
                f"95% interval {interval} ({basis}), so B's {metric.name} is {'higher' if higher else 'lower'} by "
                f"{fmt(abs(low if higher else high), unit)} at least.")
    return (f"No difference shown on {metric.name}: B - A = {fmt(mean, unit, True)}, 95% interval {interval} ({basis}), "
            "which holds 0: B - A may be of either sign; more seeds narrow the interval.")


def analyse(metric: Metric, runs_a: Sequence[RunFigures], runs_b: Sequence[RunFigures], labels: dict[str, str]
            ) -> dict[str, Any]:
    """Every figure of the comparison (compare.json without the header the command adds)."""
    pairs = pair_runs(runs_a, runs_b)
    for run_a, run_b in pairs:
        for run in (run_a, run_b):
            if run.value is not None and not math.isfinite(run.value):
                raise MicrotrainError(f"--metric {metric.name}: '{run.run_dir}' has no finite value of it (a diverged run?); "
                                      "leave that seed out or pick another metric")
    seeds = [run_a.seed for run_a, _ in pairs]
    per_seed = [{"seed": run_a.seed, "a": run_a.value, "b": run_b.value,
                 "difference": None if run_a.value is None or run_b.value is None else run_b.value - run_a.value}
                for run_a, run_b in pairs]
    usable = [row for row in per_seed if row["difference"] is not None]
    result: dict[str, Any] = {
        "metric": {"name": metric.name, "description": metric.description, "unit": metric.unit,
                   "lower_is_better": metric.lower_is_better, "target": metric.target},
        "labels": labels, "seeds": seeds, "per_seed": per_seed,
        "runs": {key: [run.as_json() for run in side] for key, side in zip(SIDES, zip(*pairs, strict=True), strict=True)},
        "notes": [],
    }
    one_sided = metric.kind in ("time_to", "epochs_to")
    if one_sided:
        reached = {key: sum(row[key] is not None for row in per_seed) for key in SIDES}
        result["reached"] = {**reached, "both": len(usable), "seeds": len(per_seed)}
        if len(usable) < len(per_seed):
            result["notes"].append(f"The target was reached by A on {reached['a']} and by B on {reached['b']} of "
                                   f"{len(per_seed)} seeds; the statistics use the {len(usable)} seeds where both reached it.")
    if len(usable) >= 2:
        a = np.array([row["a"] for row in usable])
        b = np.array([row["b"] for row in usable])
        found = difference_statistics(a, b, metric.unit, one_sided)
        result["statistics"] = found
        result["verdict"] = verdict(metric, by_name(found), len(usable), labels)
    else:
        result["statistics"] = []
        result["verdict"] = (f"No interval: only {len(usable)} seed(s) reached {metric.target:g}% on both sides "
                             f"(A on {result['reached']['a']}, B on {result['reached']['b']} of {len(per_seed)}); "
                             "train longer or lower the target.")
    result["per_class"] = per_class_differences(pairs)
    result["per_class_split"] = "validation" if metric.column.startswith("val_") else "test"
    if result["per_class"]:
        result["notes"].append(PER_CLASS_NOTE)
    result["cost"] = cost_differences(pairs)
    result["notes"].append(SECONDS_NOTE)
    return result


def per_class_differences(pairs: list[tuple[RunFigures, RunFigures]]) -> list[dict[str, Any]]:
    """Per class: mean accuracy (on the metric's split) of each side and the paired difference with its t interval."""
    classes = list(pairs[0][0].per_class)
    rows = []
    for name in classes:
        a = np.array([run_a.per_class.get(name, math.nan) for run_a, _ in pairs], dtype=np.float64)
        b = np.array([run_b.per_class.get(name, math.nan) for _, run_b in pairs], dtype=np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            rows.append({"class": name, "mean_a": None, "mean_b": None, "difference": None, "low": None, "high": None})
            continue
        interval = stats.t_interval(b - a)
        rows.append({"class": name, "mean_a": float(a.mean()), "mean_b": float(b.mean()), "difference": interval["mean"],
                     "low": interval["low"], "high": interval["high"],
                     "method": "paired t interval of the class's test accuracy, B - A, over seeds (95%)"})
    return rows


def cost_differences(pairs: list[tuple[RunFigures, RunFigures]]) -> list[dict[str, Any]]:
    """Training seconds, images/s and wall seconds of each side, and B - A with its paired t interval."""
    rows = []
    for field, (description, unit) in COST_FIGURES.items():
        a = [getattr(run_a, field) for run_a, _ in pairs]
        b = [getattr(run_b, field) for _, run_b in pairs]
        if any(v is None or not math.isfinite(v) for v in (*a, *b)):
            continue
        interval = stats.t_interval(np.array(b) - np.array(a))
        rows.append({"name": field, "description": description, "unit": unit, "per_seed_a": a, "per_seed_b": b,
                     "mean_a": float(np.mean(a)), "mean_b": float(np.mean(b)), "difference": interval["mean"],
                     "low": interval["low"], "high": interval["high"], "ratio_b_over_a": float(np.mean(b) / np.mean(a))
                     if np.mean(a) else None, "method": stats.T_INTERVAL_METHOD})
    return rows
