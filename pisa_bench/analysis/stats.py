"""Small statistics over seeds: mean, std, t confidence interval, paired tests."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

WILCOXON_MIN_N = 5


@dataclass(frozen=True)
class MeanCI:
    """Mean, sample std and two-sided t confidence interval of ``n`` values."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean ± t interval over the finite values.

    ``std = sqrt(sum (x - mean)^2 / (n - 1))`` and
    ``CI = mean ± t_{(1+level)/2, n-1} * std / sqrt(n)``; ``std``/``CI`` are NaN when ``n < 2``.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return MeanCI(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return MeanCI(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison of ``a`` against ``b`` on ``n`` pairs (difference = a - b)."""

    n: int
    mean_diff: float
    t_p: float
    wilcoxon_p: float  # NaN when n < WILCOXON_MIN_N


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired t-test (``scipy.stats.ttest_rel``) and, when ``n >= 5``, the Wilcoxon signed-rank
    test (``scipy.stats.wilcoxon``), two-sided. Pairs with a non-finite member are dropped."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan)
    diff = float(np.mean(a - b))
    if n < 2:
        return PairedTest(n, diff, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance of differences -> NaN
        t_p = float(stats.ttest_rel(a, b).pvalue)
        w_p = math.nan
        if n >= WILCOXON_MIN_N:
            try:
                w_p = float(stats.wilcoxon(a, b).pvalue)
            except ValueError:  # all differences zero
                w_p = math.nan
    return PairedTest(n, diff, t_p, w_p)


def median_reached(values: Sequence[float | None]) -> tuple[float, int, int]:
    """``(median over the runs that reached, k reached, n runs)``; ``None``/NaN = not reached."""
    x = np.array([math.nan if v is None else v for v in values], dtype=float)
    reached = x[np.isfinite(x)]
    med = float(np.median(reached)) if reached.size else math.nan
    return med, int(reached.size), int(x.size)
