"""Per (task, scale, optimizer) statistics over seeds, and tests against the best baseline.

Rules (stated again in the rendered tables' footnotes):

- quality numbers (final / best metric, steps / time to target) use runs with status ``ok``
  only; diverged, failed and unfinished (preempted / running) runs are counted, their metric
  treated as missing;
- cost numbers (optimizer-step ms, peak memory, optimizer-state bytes) are means over every run
  that recorded them, whatever its status;
- "k/n reached": k ok runs reached the target out of all n runs; the median steps / time is
  taken over those k;
- baselines are the optimizers whose runs are not of the PISA family: the runs table's
  ``family`` column (``summary.json``'s, see :func:`.collect.with_family`), never their names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container
from typing import Any

import numpy as np
import pandas as pd

from pisa_bench.analysis.stats import mean_ci, median_reached, paired_test
from pisa_bench.baselines.registry import CONSENSUS

TASK_KEYS = ["task", "scale"]
GROUP_KEYS = [*TASK_KEYS, "optim"]
QUALITY_STATUSES = ("ok",)
TASK_FIELDS = ("metric", "metric_split", "lower_is_better", "target")


def consensus_labels(runs: pd.DataFrame, col: str = "optim") -> set[str]:
    """The optimizer labels (column ``col``) of the PISA family: rows whose ``family`` is
    ``consensus`` (empty when the table has no ``family``)."""
    if runs.empty or "family" not in runs.columns or col not in runs.columns:
        return set()
    return set(runs.loc[runs["family"] == CONSENSUS, col].dropna().astype(str))


def family_first(consensus: Container[str]) -> Callable[[Any], tuple[bool, str]]:
    """Sort key: the PISA family (labels in ``consensus``) first, then baselines, by name."""
    return lambda o: (str(o) not in consensus, str(o))


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return False if v is None or pd.isna(v) else bool(v)


def prepare(runs: pd.DataFrame) -> pd.DataFrame:
    """Copy with string keys (a missing scale becomes ``""``) and numeric metric columns."""
    df = runs.copy()
    for key in (*GROUP_KEYS, "family"):
        if key not in df.columns:
            df[key] = ""
        df[key] = df[key].map(lambda v: "" if v is None or pd.isna(v) else str(v))
    for col in ("final_metric", "best_metric", "steps_to_target", "time_to_target_s",
                "opt_step_ms_mean", "peak_memory_bytes", "optimizer_state_bytes", "target"):
        if col not in df.columns:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def task_info(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, scale): primary metric, its split, lower_is_better, target (first non-null)."""
    df = prepare(runs)
    rows = []
    for (task, scale), g in df.groupby(TASK_KEYS, sort=True):
        row: dict[str, Any] = {"task": task, "scale": scale}
        for f in TASK_FIELDS:
            vals = g[f].dropna() if f in g.columns else pd.Series(dtype=object)
            row[f] = vals.iloc[0] if len(vals) else None
        row["lower_is_better"] = _as_bool(row["lower_is_better"])
        rows.append(row)
    return pd.DataFrame(rows, columns=[*TASK_KEYS, *TASK_FIELDS])


def summarize(runs: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per (task, scale, optim): counts, mean/std/CI of final and best metric, target
    medians, costs, and ``best_final`` / ``best_best`` flags (best mean in its task, respecting
    ``lower_is_better``; ties all flagged)."""
    df = prepare(runs)
    info = task_info(df).set_index(TASK_KEYS)
    rows = []
    for (task, scale, optim), g in df.groupby(GROUP_KEYS, sort=True):
        status = g["status"].fillna("unknown")
        ok = g[status.isin(QUALITY_STATUSES)]
        recorded = set(g["family"]) - {""}  # one family per identity; PISA if any says so
        row: dict[str, Any] = {"task": task, "scale": scale, "optim": optim, "family": (
            CONSENSUS if CONSENSUS in recorded else min(recorded, default=""))}
        row.update(info.loc[(task, scale)].to_dict())
        row.update(
            n=len(g),
            n_ok=int((status == "ok").sum()),
            n_diverged=int((status == "diverged").sum()),
            n_failed=int((status == "failed").sum()),
        )
        row["n_other"] = row["n"] - row["n_ok"] - row["n_diverged"] - row["n_failed"]
        row["reference"] = bool(g["reference"].fillna(False).astype(bool).any()) \
            if "reference" in g else False
        for col, key in (("final_metric", "final"), ("best_metric", "best")):
            ci = mean_ci(ok[col].to_numpy(), level)
            row.update({f"{key}_n": ci.n, f"{key}_mean": ci.mean, f"{key}_std": ci.std,
                        f"{key}_ci_lo": ci.lo, f"{key}_ci_hi": ci.hi})
        steps_med, k, _ = median_reached(ok["steps_to_target"].tolist())
        time_med, _, _ = median_reached(ok["time_to_target_s"].tolist())
        row.update(steps_to_target_median=steps_med, time_to_target_median=time_med, reached=k)
        for col in ("opt_step_ms_mean", "peak_memory_bytes", "optimizer_state_bytes"):
            vals = g[col].dropna()
            row[col] = float(vals.mean()) if len(vals) else math.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    for key in ("final", "best"):
        out[f"best_{key}"] = False
        for _, g in out.groupby(TASK_KEYS):
            means = g[f"{key}_mean"].dropna()
            if means.empty:
                continue
            best = means.min() if bool(g["lower_is_better"].iloc[0]) else means.max()
            out.loc[means.index[means == best], f"best_{key}"] = True
    return out


def best_baselines(summary: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Per (task, scale): the baseline (``family`` not ``consensus``) with the best mean final
    metric (``lower_is_better``); references (federated local-only / centralised, column
    ``reference``) are never picked."""
    out = {}
    for (task, scale), g in summary.groupby(TASK_KEYS):
        baseline = g["family"] != CONSENSUS if "family" in g else True
        g = g[baseline & g["final_mean"].notna()]
        if "reference" in g:
            g = g[~g["reference"].astype(bool)]
        if g.empty:
            continue
        lower = bool(g["lower_is_better"].iloc[0])
        idx = g["final_mean"].idxmin() if lower else g["final_mean"].idxmax()
        out[(task, scale)] = str(g.loc[idx, "optim"])
    return out


def seed_values(runs: pd.DataFrame, col: str = "final_metric") -> pd.DataFrame:
    """``col`` of ok runs per (task, scale, optim, seed) (mean if a seed was run twice)."""
    df = prepare(runs)
    df = df[df["status"].isin(QUALITY_STATUSES) & df[col].notna() & df["seed"].notna()]
    return df.groupby([*GROUP_KEYS, "seed"], as_index=False)[col].mean()


def significance(runs: pd.DataFrame, summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each optimizer against its task's best baseline, runs paired by seed.

    Columns: task, scale, optim, baseline, n (pairs), mean_diff (optim - baseline), t_p (paired
    t-test), wilcoxon_p (Wilcoxon signed-rank, only when n >= 5; NaN otherwise).
    """
    summary = summarize(runs) if summary is None else summary
    vals = seed_values(runs)
    cols = ["task", "scale", "optim", "baseline", "n", "mean_diff", "t_p", "wilcoxon_p"]
    rows = []
    for (task, scale), base in best_baselines(summary).items():
        in_task = vals[(vals["task"] == task) & (vals["scale"] == scale)]
        ref = in_task[in_task["optim"] == base].set_index("seed")["final_metric"]
        for optim in sorted(set(summary.loc[(summary["task"] == task)
                                            & (summary["scale"] == scale), "optim"])):
            if optim == base:
                continue
            mine = in_task[in_task["optim"] == optim].set_index("seed")["final_metric"]
            pairs = pd.concat([mine, ref], axis=1, join="inner", keys=["a", "b"])
            res = paired_test(pairs["a"].to_numpy(), pairs["b"].to_numpy())
            rows.append([task, scale, optim, base, res.n, res.mean_diff, res.t_p, res.wilcoxon_p])
    return pd.DataFrame(rows, columns=cols)
