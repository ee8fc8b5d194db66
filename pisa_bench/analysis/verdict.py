r"""The verdict on a claim: paired effect sizes, Holm correction, detectable effect.

Input: a *seed table*, one row per (task, arm, role, seed) with the final test metric
(``final_metric``; NaN for a run that diverged, failed or never finished) and ``status``.
For a claimed arm ``c`` and each baseline ``b`` of the same task and role (references such as
local-only / centralised training are shown but never compared), runs are paired by seed and
the difference is oriented so that a positive value favours the claim::

    d_s = y_c(s) - y_b(s)      (higher is better)      d_s = y_b(s) - y_c(s)   (lower is better)

A run without an ok outcome counts as a failure of its optimizer: its value is the worst final
metric any run of the task reached (``impute_failures``), never dropped. Then, over the ``n``
pairs,

- effect ``mean(d)``, 95% CI ``mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)``;
- paired t-test p (two-sided), Holm-corrected over the baselines the claim is compared with
  (``holm``);
- ``supported``: Holm p < alpha and effect > 0; ``contradicted``: Holm p < alpha and effect < 0;
  otherwise ``not distinguishable at n seeds``, with the smallest detectable effect
  ``(t_{1-a/(2k), n-1} + t_{0.8, n-1}) sd(d) / sqrt(n)`` (80% power at the strictest Holm level
  ``a/k`` for ``k`` comparisons; ``sd(d)`` as observed).

The claim as a whole (one claimed arm against all its baselines): ``supported`` when supported
against every baseline, ``contradicted`` when any baseline is significantly better, else ``not
distinguishable at n seeds`` (the baselines it did beat are listed).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
POWER = 0.8
SUPPORTED, CONTRADICTED, NOT_DIST = "supported", "contradicted", "not distinguishable"


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted):
    ``p_(i) -> max_{j <= i} min(1, (k - j + 1) p_(j))`` in increasing order of p."""
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, math.nan)
    k = ok.size
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (k - rank) * p[i]))
        out[i] = running
    return out.tolist()


@dataclass(frozen=True)
class Comparison:
    """One claimed arm against one baseline, paired by seed (effect > 0 favours the claim)."""

    task: str
    claim: str
    baseline: str
    role: str
    n: int
    effect: float
    ci_lo: float
    ci_hi: float
    sd: float
    p: float
    p_holm: float
    mde: float
    claim_failures: int
    baseline_failures: int
    verdict: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def paired(a: np.ndarray, b: np.ndarray, lower_is_better: bool) -> tuple[int, float, float,
                                                                         float, float, float]:
    """``(n, effect, ci_lo, ci_hi, sd, p)`` of the oriented differences of paired ``a``, ``b``."""
    d = (b - a) if lower_is_better else (a - b)
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return 0, math.nan, math.nan, math.nan, math.nan, math.nan
    mean = float(d.mean())
    if n < 2:
        return n, mean, math.nan, math.nan, math.nan, math.nan
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return n, mean, mean - half, mean + half, sd, p


def detectable_effect(sd: float, n: int, k: int, alpha: float = ALPHA,
                      power: float = POWER) -> float:
    """Smallest true effect a paired t-test of ``n`` pairs finds with ``power`` at level
    ``alpha / k`` (two-sided): ``(t_{1-alpha/(2k), n-1} + t_{power, n-1}) * sd / sqrt(n)``."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return float((stats.t.ppf(1 - alpha / (2 * max(k, 1)), df) + stats.t.ppf(power, df))
                 * sd / math.sqrt(n))


def impute_failures(seeds: pd.DataFrame, lower_is_better: bool) -> pd.DataFrame:
    """Copy with ``value``: ``final_metric`` of ok runs, the task's worst ok final metric for the
    others (column ``failed`` marks them)."""
    df = seeds.copy()
    df["final_metric"] = pd.to_numeric(df["final_metric"], errors="coerce")
    ok = (df["status"] == "ok") & np.isfinite(df["final_metric"].astype(float))
    df["failed"] = ~ok
    worst = df.loc[ok, "final_metric"]
    fill = (worst.max() if lower_is_better else worst.min()) if len(worst) else math.nan
    df["value"] = df["final_metric"].where(ok, fill)
    return df


def verdict_of(effect: float, p_holm: float, alpha: float = ALPHA) -> str:
    if math.isfinite(p_holm) and p_holm < alpha and math.isfinite(effect) and effect != 0:
        return SUPPORTED if effect > 0 else CONTRADICTED
    return NOT_DIST


def compare(
    seeds: pd.DataFrame,
    claims: Sequence[str],
    references: Sequence[str] = (),
    role: str = "tuned",
    alpha: float = ALPHA,
) -> list[Comparison]:
    """Every claimed arm against every baseline arm, per task, for one role (see module doc).

    ``seeds`` columns: task, arm, role, seed, status, final_metric, lower_is_better.
    Baselines: the arms of the task that are neither claimed nor references.
    """
    out: list[Comparison] = []
    for task, g_task in seeds.groupby("task", sort=True):
        lower = bool(g_task["lower_is_better"].iloc[0])
        g_task = impute_failures(g_task, lower)  # worst over every role of the task
        g = g_task[g_task["role"] == role]
        arms = sorted(set(g["arm"]))
        baselines = [a for a in arms if a not in claims and a not in references]
        for claim in (c for c in claims if c in arms):
            mine = g[g["arm"] == claim].drop_duplicates("seed").set_index("seed")
            rows = []
            for base in baselines:
                ref = g[g["arm"] == base].drop_duplicates("seed").set_index("seed")
                both = mine.index.intersection(ref.index)
                a = mine.loc[both, "value"].to_numpy(float)
                b = ref.loc[both, "value"].to_numpy(float)
                n, eff, lo, hi, sd, p = paired(a, b, lower)
                rows.append((base, n, eff, lo, hi, sd, p, int(mine.loc[both, "failed"].sum()),
                             int(ref.loc[both, "failed"].sum())))
            adj = holm([r[6] for r in rows])
            k = len(rows)
            for (base, n, eff, lo, hi, sd, p, cf, bf), ph in zip(rows, adj):
                out.append(Comparison(str(task), claim, base, role, n, eff, lo, hi, sd, p, ph,
                                      detectable_effect(sd, n, k, alpha), cf, bf,
                                      verdict_of(eff, ph, alpha)))
    return out


def overall(comparisons: Sequence[Comparison]) -> str:
    """One claimed arm against all its baselines (see the module docstring)."""
    if not comparisons:
        return "no comparison"
    vs = [c.verdict for c in comparisons]
    n = min(c.n for c in comparisons)
    if all(v == SUPPORTED for v in vs):
        return SUPPORTED
    if any(v == CONTRADICTED for v in vs):
        worse = ", ".join(c.baseline for c in comparisons if c.verdict == CONTRADICTED)
        return f"{CONTRADICTED} (worse than {worse})"
    beat = [c.baseline for c in comparisons if c.verdict == SUPPORTED]
    tail = f"; better than {', '.join(beat)}" if beat else ""
    return f"{NOT_DIST} at {n} seeds{tail}"


def comparisons_frame(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    cols = list(Comparison.__dataclass_fields__)
    return pd.DataFrame([c.as_dict() for c in comparisons], columns=cols)
