"""The statistics of a seed-paired comparison, each a small function with its method written down.

Paired: the difference B - A of each seed's two runs. Its 95% interval comes from the t distribution
(exact for normal differences at any number of seeds) and from a percentile bootstrap (no normality
assumed, but too narrow with few seeds: it cannot see beyond the handful of differences it resamples).
The unpaired (Welch) interval is computed too, to show what pairing bought. scipy.stats supplies the
t distribution's quantiles and tail areas; everything else is NumPy, so the tests can check it against
hand computations, scipy's own tests and simulated draws with a known true difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # a fixed seed: the same runs give the same bootstrap interval every time

Alternative = Literal["two-sided", "less", "greater"]

def _scipy_stats():
    """scipy.stats, imported when a comparison is analysed: every microtrain command loads this plugin, and a
    machine without scipy (the GPU machines) must still run the others."""
    from scipy import stats

    return stats


T_INTERVAL_METHOD = "paired t interval: mean difference ± t(0.975, n-1) · sd / √n (scipy.stats.t quantile)"
BOOTSTRAP_METHOD = (f"percentile bootstrap of the mean paired difference: {BOOTSTRAP_RESAMPLES:,} resamples of the seeds "
                    f"with replacement, numpy.random.default_rng({BOOTSTRAP_SEED}); too narrow with few seeds")
WELCH_METHOD = ("unpaired Welch t interval: mean B - mean A ± t(0.975, Welch-Satterthwaite df) · √(sd_A²/n + sd_B²/n), "
                "the interval without pairing")


def as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def mean_sd(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the sd of one value is nan, not 0."""
    array = as_array(values)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


def t_bounds(differences: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided t interval of the mean along the last axis (so a simulation can do thousands at once)."""
    differences = as_array(differences)
    n = differences.shape[-1]
    if n < 2:
        raise ValueError("a t interval needs at least 2 values")
    mean = differences.mean(axis=-1)
    half = _scipy_stats().t.ppf(0.5 + confidence / 2, n - 1) * differences.std(axis=-1, ddof=1) / math.sqrt(n)
    return mean - half, mean + half


def t_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean paired difference with its t interval and the figures it is made of."""
    array = as_array(differences)
    n = array.size
    low, high = t_bounds(array, confidence)
    mean, sd = mean_sd(array)
    return {"mean": mean, "sd": sd, "se": sd / math.sqrt(n), "df": n - 1,
            "t_quantile": float(_scipy_stats().t.ppf(0.5 + confidence / 2, n - 1)),
            "low": float(low), "high": float(high), "confidence": confidence}


def one_sided_bound(differences: Sequence[float], side: Literal["upper", "lower"], confidence: float = CONFIDENCE) -> float:
    """The one-sided bound: the mean difference is below (upper) or above (lower) it with this confidence."""
    array = as_array(differences)
    mean, sd = mean_sd(array)
    half = _scipy_stats().t.ppf(confidence, array.size - 1) * sd / math.sqrt(array.size)
    return mean + half if side == "upper" else mean - half


def paired_t_test(differences: Sequence[float], alternative: Alternative = "two-sided") -> dict[str, float]:
    """t statistic and p-value of "the mean difference is 0" (as scipy.stats.ttest_rel, from the differences).

    When every difference is the same, the t statistic is infinite (p = 0) unless they are all 0, where the
    test says nothing (p = nan)."""
    array = as_array(differences)
    mean, sd = mean_sd(array)
    df = array.size - 1
    if sd == 0 or not math.isfinite(sd):
        if mean == 0 or not math.isfinite(sd):
            return {"t": math.nan, "df": df, "p": math.nan, "alternative": alternative}
        t = math.copysign(math.inf, mean)
    else:
        t = mean / (sd / math.sqrt(array.size))
    if alternative == "two-sided":
        p = 2 * _scipy_stats().t.sf(abs(t), df)
    elif alternative == "less":
        p = _scipy_stats().t.cdf(t, df)
    else:
        p = _scipy_stats().t.sf(t, df)
    return {"t": float(t), "df": df, "p": float(min(p, 1.0)), "alternative": alternative}


def bootstrap_interval(differences: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """Percentile bootstrap interval of the mean difference (seeds resampled with replacement)."""
    array = as_array(differences)
    if array.size < 2:
        raise ValueError("a bootstrap interval needs at least 2 values")
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, size=(resamples, array.size))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return {"mean": float(array.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "resamples": resamples, "seed": seed}


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Interval of mean(B) - mean(A) treating the two sides as independent samples (no pairing)."""
    a_array, b_array = as_array(a), as_array(b)
    va, vb = a_array.var(ddof=1) / a_array.size, b_array.var(ddof=1) / b_array.size
    se = math.sqrt(va + vb)
    mean = float(b_array.mean() - a_array.mean())
    if se == 0:
        return {"mean": mean, "se": 0.0, "df": math.nan, "low": mean, "high": mean, "confidence": confidence}
    df = (va + vb) ** 2 / (va**2 / (a_array.size - 1) + vb**2 / (b_array.size - 1))
    half = float(_scipy_stats().t.ppf(0.5 + confidence / 2, df)) * se
    return {"mean": mean, "se": se, "df": float(df), "low": mean - half, "high": mean + half, "confidence": confidence}


def variance_reduction(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """What pairing bought: the sd of B - A for unpaired runs (√(sd_A² + sd_B²)) against that of paired ones.

    ``factor`` is the ratio of the variances: pairing is worth that many times more seeds."""
    _, sd_a = mean_sd(a)
    _, sd_b = mean_sd(b)
    _, sd_paired = mean_sd(as_array(b) - as_array(a))
    unpaired = math.sqrt(sd_a**2 + sd_b**2)
    factor = unpaired**2 / sd_paired**2 if sd_paired > 0 else math.inf if unpaired > 0 else math.nan
    return {"sd_unpaired": unpaired, "sd_paired": sd_paired, "factor": factor}
