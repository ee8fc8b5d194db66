"""Performance profiles across tasks (Dolan & Moré 2002; the AlgoPerf benchmark's scoring).

For tasks ``s`` and optimizers ``p`` with cost ``t[s, p]`` (time or steps to the task's
target; ``inf`` when not reached):

    r[s, p]   = t[s, p] / min_q t[s, q]                 (performance ratio; inf if t is inf
                                                         or no optimizer reached the target)
    rho_p(tau) = |{s : r[s, p] <= tau}| / |S|            (fraction of tasks within factor tau)

Cost of an optimizer on a task = median over its runs of the per-run cost, a run that did not
reach the target (or is not ``ok``: diverged, failed, unfinished) counting as ``inf``; so the
median is finite only when at least half the seeds reached the target. An optimizer with no
run on a task also gets ``inf`` there. Only tasks that have a target are profiled.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pisa_bench.analysis.aggregate import QUALITY_STATUSES, TASK_KEYS, prepare

COSTS = {"time": "time_to_target_s", "steps": "steps_to_target"}


def task_label(task: str, scale: str) -> str:
    return f"{task} ({scale})" if scale else task


def tasks_with_target(runs: pd.DataFrame) -> list[str]:
    """Labels of the (task, scale) pairs where some run has a target."""
    df = prepare(runs)
    has = df.groupby(TASK_KEYS)["target"].apply(lambda s: s.notna().any())
    return [task_label(t, s) for (t, s), v in has.items() if v]


def target_costs(runs: pd.DataFrame, cost: str = "time_to_target_s") -> pd.DataFrame:
    """``t[s, p]``: tasks with a target (rows) x optimizers (columns), see module docstring."""
    df = prepare(runs)
    df = df[df.groupby(TASK_KEYS)["target"].transform(lambda s: s.notna().any())]
    per_run = df[cost].where(df["status"].isin(QUALITY_STATUSES)).fillna(np.inf)
    df = df.assign(_cost=per_run, _task=[task_label(t, s) for t, s in zip(df["task"],
                                                                          df["scale"])])
    table = df.groupby(["_task", "optim"])["_cost"].median().unstack("optim")
    table.index.name, table.columns.name = "task", "optim"
    return table.fillna(np.inf)


def performance_ratios(costs: pd.DataFrame) -> pd.DataFrame:
    """``r[s, p] = t[s, p] / min_q t[s, q]``; a task nobody finished gives ``inf`` throughout."""
    best = costs.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = costs.div(best, axis=0)
    ratios = ratios.mask(costs.eq(best, axis=0), 1.0)  # the best one (also when its cost is 0)
    ratios[~np.isfinite(best)] = np.inf  # row of a task that no optimizer finished
    return ratios.where(np.isfinite(costs), np.inf)


def default_taus(ratios: pd.DataFrame, n: int = 200) -> np.ndarray:
    """Log-spaced tau from 1 to beyond the largest finite ratio, plus every finite ratio (so
    that the steps of rho land exactly)."""
    finite = ratios.to_numpy(float)[np.isfinite(ratios.to_numpy(float))]
    top = max(2.0, float(finite.max()) * 1.5) if finite.size else 2.0
    return np.unique(np.concatenate([np.logspace(0, np.log10(top), n), finite]))


def performance_profile(ratios: pd.DataFrame, taus: np.ndarray | None = None) -> pd.DataFrame:
    """``rho_p(tau)`` for each optimizer (columns) at each tau (index)."""
    taus = default_taus(ratios) if taus is None else np.asarray(taus, dtype=float)
    r = ratios.to_numpy(float)  # tasks x optims
    rho = (r[None, :, :] <= taus[:, None, None]).mean(axis=1)
    return pd.DataFrame(rho, index=pd.Index(taus, name="tau"), columns=ratios.columns)
