"""Curves over seeds: pick the primary metric rows, align the seeds on one x grid, reduce.

Alignment: when every seed was evaluated at the same x values those are the grid; otherwise
(wall-clock, or different eval steps) the grid is the union of the seeds' x values inside the
range all seeds cover, and each seed is linearly interpolated onto it (``numpy.interp``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pisa_bench.analysis.aggregate import GROUP_KEYS, prepare

X_AXES = ("step", "samples_or_tokens", "wall_time_s")


def primary_curves(
    runs: pd.DataFrame, curves: pd.DataFrame, statuses: Sequence[str] = ("ok",)
) -> pd.DataFrame:
    """Rows of ``curves`` holding each run's primary metric on its split, for runs whose status
    is in ``statuses``; keyed by task, scale, optim, seed, run_dir."""
    r = prepare(runs)
    r = r[r["status"].isin(statuses)][[*GROUP_KEYS, "seed", "run_dir", "metric", "metric_split"]]
    r = r.rename(columns={"metric": "primary", "metric_split": "primary_split"})
    m = _drop_ids(curves).merge(r, on="run_dir")
    keep = (m["metric"] == m["primary"]) & (m["split"] == m["primary_split"])
    return m[keep].drop(columns=["primary", "primary_split"])


def _drop_ids(curves: pd.DataFrame) -> pd.DataFrame:
    """The curves without the identifiers that the runs table holds (they come from there)."""
    return curves.drop(columns=[k for k in (*GROUP_KEYS, "seed", "name", "status")
                                if k in curves.columns])


def metric_curves(
    runs: pd.DataFrame, curves: pd.DataFrame, metric: str, split: str,
    statuses: Sequence[str] = ("ok",),
) -> pd.DataFrame:
    """Rows of ``curves`` with the given metric and split (e.g. train loss) for kept runs."""
    r = prepare(runs)
    r = r[r["status"].isin(statuses)][[*GROUP_KEYS, "seed", "run_dir"]]
    c = curves[(curves["metric"] == metric) & (curves["split"] == split)]
    return _drop_ids(c).merge(r, on="run_dir")


def _series(g: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    g = g[np.isfinite(g[x].to_numpy(float)) & np.isfinite(g[y].to_numpy(float))]
    g = g.drop_duplicates(subset=x, keep="last").sort_values(x)
    return g[x].to_numpy(float), g[y].to_numpy(float)


def seed_band(df: pd.DataFrame, x: str, y: str = "value", by: str = "run_dir") -> pd.DataFrame:
    """Mean, std (ddof=1; 0 for one seed), min, max and n over the runs (``by``) of ``df``,
    per point of the common x grid. Columns: x, mean, std, min, max, n."""
    series = [s for _, g in df.groupby(by) if (s := _series(g, x, y))[0].size]
    cols = [x, "mean", "std", "min", "max", "n"]
    if not series:
        return pd.DataFrame(columns=cols)
    xs = [s[0] for s in series]
    if all(a.shape == xs[0].shape and np.array_equal(a, xs[0]) for a in xs):
        grid, ys = xs[0], np.stack([s[1] for s in series])
    else:
        lo, hi = max(a[0] for a in xs), min(a[-1] for a in xs)
        grid = np.unique(np.concatenate(xs))
        if lo <= hi:
            grid = grid[(grid >= lo) & (grid <= hi)]
        ys = np.stack([np.interp(grid, a, b, left=np.nan, right=np.nan) for a, b in series])
    n = np.isfinite(ys).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are dropped below
        mean = np.nanmean(ys, axis=0)
        std = np.where(n > 1, np.nanstd(ys, axis=0, ddof=1), 0.0)
        mn, mx = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
    out = pd.DataFrame({x: grid, "mean": mean, "std": std, "min": mn, "max": mx, "n": n})
    return out[out["n"] > 0].reset_index(drop=True)
