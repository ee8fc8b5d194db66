"""Steps, tokens and seconds to a target: the "faster" half of a claim (e.g. GPT-2's Fig. 2).

The target is the reference arm's *final* reported metric, averaged over its tuned seeds (for
GPT-2: the tuned AdamW's final held-out loss). An arm reaches it at the first evaluation step
``s`` where the mean over its seeds is past the target *and the difference is real* by
modded-nanogpt's rule for records: a one-sided z-test of the seeds' values at ``s`` against the
target,

    z = (target - mean_s) / (sd_s / sqrt(n))      (lower is better; sign flipped otherwise)
    p = 1 - Phi(z)  <  alpha = 0.01,

with ``sd_s`` the seeds' sample standard deviation. Tokens (``samples_or_tokens``) and wall time
at that step are the means over the seeds. An arm whose seeds never pass is reported as not
reaching it (``–``), not as slow. The reference itself reaches its own mean only by chance, so it
is shown for scale with its final step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.01  # modded-nanogpt's threshold for a record


@dataclass(frozen=True)
class Reached:
    """Where an arm's seeds pass the target (``None`` fields: never)."""

    arm: str
    n: int
    step: int | None
    tokens: float | None
    wall_s: float | None
    p: float | None  # the z-test's p-value at ``step`` (or at the last step when never reached)


def z_test_past(values: Sequence[float], target: float, lower_is_better: bool) -> float:
    """One-sided p-value that the mean of ``values`` is past ``target`` (NaN below 2 values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan
    gap = (target - v.mean()) if lower_is_better else (v.mean() - target)
    sd = v.std(ddof=1)
    if sd == 0:
        return 0.0 if gap > 0 else 1.0
    return float(stats.norm.sf(gap / (sd / math.sqrt(len(v)))))


def reached(arm: str, curves: pd.DataFrame, target: float, lower_is_better: bool,
            alpha: float = ALPHA) -> Reached:
    """The first evaluation step at which ``arm``'s seeds pass ``target`` (module docstring).

    ``curves``: one row per (run_dir, step) with columns ``run_dir, step, samples_or_tokens,
    wall_time_s, value`` (the reported metric); only steps every seed evaluated count.
    """
    runs = curves["run_dir"].nunique()
    per_step = curves.groupby("step")
    p_last = math.nan
    for step, g in per_step:
        if g["run_dir"].nunique() < runs:
            continue
        p_last = z_test_past(g["value"].to_numpy(), target, lower_is_better)
        if p_last < alpha:
            return Reached(arm, runs, int(step), float(g["samples_or_tokens"].mean()),
                           float(g["wall_time_s"].mean()), p_last)
    return Reached(arm, runs, None, None, None, None if math.isnan(p_last) else p_last)


def speed_table(rows: pd.DataFrame, curves: pd.DataFrame, reference: str) -> str:
    """Markdown: per task, steps / tokens / seconds of each arm's tuned seeds to the reference
    arm's final mean (``rows``: the artefact's runs.csv; ``curves``: the runs' metric rows)."""
    tuned = rows[(rows["role"] == "tuned") & (rows["status"] == "ok")]
    lines = []
    for task, g in tuned.groupby("arm_task", sort=True):
        ref = g[g["arm"] == reference]
        if ref.empty:
            continue
        metric, lower = str(g["metric"].iloc[0]), bool(g["lower_is_better"].iloc[0])
        target = float(pd.to_numeric(ref["final_metric"]).mean())
        lines += [f"### {task}: to the tuned {reference}'s final {metric} "
                  f"({target:.4g}, mean of {len(ref)} seeds)", "",
                  "| arm | seeds | step | tokens / samples | wall (s) | z-test p |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arm, ga in g.groupby("arm", sort=True):
            c = curves[curves["run_dir"].isin(ga["run_dir"]) & (curves["metric"] == metric)
                       & (curves["split"] != "train")]
            c = c.assign(value=pd.to_numeric(c["value"], errors="coerce")).dropna(
                subset=["value"])
            if c.empty:
                continue
            r = reached(arm, c, target, lower)
            name = f"{arm} (reference)" if arm == reference else arm
            if r.step is None:
                p = "–" if r.p is None else f"{r.p:.2g} (end)"
                lines.append(f"| {name} | {r.n} | not reached | – | – | {p} |")
            else:
                lines.append(f"| {name} | {r.n} | {r.step} | {r.tokens:,.0f} | "
                             f"{r.wall_s:.3g} | {r.p:.2g} |")
        lines.append("")
    if lines:
        lines.append(f"*First evaluation step at which the mean over seeds is past the target "
                     f"with p < {ALPHA} (one-sided z-test over seeds, modded-nanogpt's rule); "
                     "tokens and wall time: means over seeds at that step. The reference "
                     "reaches its own mean only by chance.*")
    return "\n".join(lines) + "\n"
