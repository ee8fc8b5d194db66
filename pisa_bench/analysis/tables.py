"""Render the per-task aggregate (:mod:`.aggregate`) as Markdown and LaTeX tables.

One table per (task, scale), one row per optimizer; the best mean final / best metric of each
task is bold; footnotes say how diverged runs and the statistics are handled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from pisa_bench.analysis.aggregate import TASK_KEYS, best_baselines, significance, summarize
from pisa_bench.analysis.stats import WILCOXON_MIN_N

HEADERS = (
    "Optimizer", "Final (mean ± std)", "95% CI", "Best (mean ± std)", "Steps to target",
    "Time to target (s)", "Reached", "Opt. step (ms)", "Peak memory", "Opt. state",
    "Runs", "Div. / fail.", "vs best baseline",
)
FOOTNOTE = (
    "Mean ± sample std over seeds; 95% CI = mean ± t(0.975, n−1)·std/√n. "
    "Means, CIs, target medians and tests use runs with status ok only: diverged, failed and "
    "unfinished runs are counted (Runs, Div. / fail.) but their metric is treated as missing. "
    "Steps / time to target: median over the k ok runs that reached it (k/n reached). "
    "Opt. step, peak memory, opt. state: means over every run that recorded them. "
    "Rows: one per run identity (the resolved config minus seed and bookkeeping; differing "
    "hyperparameters in brackets); duplicates of an identity and seed are left out (see notes). "
    "vs best baseline (best mean final metric among non-PISA-family optimizers, references "
    "such as local-only / centralised training excluded): runs paired by "
    f"seed, Δ = optimizer − baseline final metric, paired t-test p (t) and, when n ≥ "
    f"{WILCOXON_MIN_N}, Wilcoxon signed-rank p (W); n = pairs. Bold: best mean in the task."
)


@dataclass(frozen=True)
class Style:
    """How a format writes bold text, ± and plain text."""

    bold: Callable[[str], str]
    pm: str
    text: Callable[[str], str]
    delta: str
    lt: str = "<"


MARKDOWN = Style(bold=lambda s: f"**{s}**", pm=" ± ", text=lambda s: s.replace("|", "\\|"),
                 delta="Δ")
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in s)


LATEX = Style(bold=lambda s: rf"\textbf{{{s}}}", pm=r" $\pm$ ", text=latex_escape,
              delta=r"$\Delta$", lt="$<$")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt_num(x: object, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if _finite(x) else "–"


def fmt_bytes(x: object) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units, 3 significant digits)."""
    if not _finite(x):
        return "–"
    x = float(x)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.3g} {unit}"
        x /= 1024
    raise AssertionError("unreachable")


def fmt_p(p: object, lt: str = "<") -> str:
    """``p=0.0123`` (3 significant digits); below 1e-4 ``p<1e-4``."""
    if not _finite(p):
        return "p=–"
    return f"p{lt}1e-4" if p < 1e-4 else f"p={p:.3g}"


def _mean_std(row: pd.Series, key: str, st: Style) -> str:
    mean = fmt_num(row[f"{key}_mean"])
    if bool(row.get(f"best_{key}", False)):
        mean = st.bold(mean)
    std = row[f"{key}_std"]
    return f"{mean}{st.pm}{fmt_num(std, 2)}" if _finite(std) else mean


def _test_cell(row: pd.Series, tests: pd.DataFrame, baseline: str | None, st: Style) -> str:
    if baseline is None:
        return "–"
    if row["optim"] == baseline:
        return "reference"
    hit = tests[(tests["task"] == row["task"]) & (tests["scale"] == row["scale"])
                & (tests["optim"] == row["optim"])]
    if hit.empty or int(hit["n"].iloc[0]) < 2:
        n = 0 if hit.empty else int(hit["n"].iloc[0])
        return f"n={n}: no test"
    t = hit.iloc[0]
    parts = [f"{st.delta}={t['mean_diff']:+.3g}", f"t {fmt_p(t['t_p'], st.lt)}"]
    if _finite(t["wilcoxon_p"]):
        parts.append(f"W {fmt_p(t['wilcoxon_p'], st.lt)}")
    return ", ".join(parts) + f" (n={int(t['n'])})"


def row_cells(row: pd.Series, tests: pd.DataFrame, baseline: str | None, st: Style) -> list[str]:
    """The cells of one optimizer's row, in :data:`HEADERS` order."""
    has_target = _finite(row["target"])
    ci = (f"[{fmt_num(row['final_ci_lo'])}, {fmt_num(row['final_ci_hi'])}]"
          if _finite(row["final_ci_lo"]) else "–")
    div_fail = f"{row['n_diverged']} / {row['n_failed']}"
    if row["n_other"]:
        div_fail += f" (+{row['n_other']} unfinished)"
    name = str(row["optim"]) + (" (reference)" if bool(row.get("reference", False)) else "")
    return [
        st.text(name),
        _mean_std(row, "final", st),
        ci,
        _mean_std(row, "best", st),
        fmt_num(row["steps_to_target_median"], 6) if has_target else "–",
        fmt_num(row["time_to_target_median"]) if has_target else "–",
        f"{row['reached']}/{row['n']}" if has_target else "no target",
        fmt_num(row["opt_step_ms_mean"], 3),
        fmt_bytes(row["peak_memory_bytes"]),
        fmt_bytes(row["optimizer_state_bytes"]),
        str(row["n"]),
        div_fail,
        _test_cell(row, tests, baseline, st),
    ]


def task_caption(g: pd.DataFrame) -> str:
    """``"cifar10 (small): accuracy on val, higher is better; target 0.9"``."""
    r = g.iloc[0]
    name = f"{r['task']} ({r['scale']})" if r["scale"] else str(r["task"])
    if pd.isna(r["metric"]):
        return f"{name}: primary metric unknown (no finished run)"
    direction = "lower" if bool(r["lower_is_better"]) else "higher"
    target = f"target {fmt_num(r['target'])}" if _finite(r["target"]) else "no target"
    return f"{name}: {r['metric']} on {r['metric_split']}, {direction} is better; {target}"


def to_markdown(summary: pd.DataFrame, tests: pd.DataFrame, title: str | None = None) -> str:
    """Markdown: a ``###`` section and a pipe table per task, then the footnote."""
    lines = [f"# {title}", ""] if title else []
    bases = best_baselines(summary)
    for (task, scale), g in summary.groupby(TASK_KEYS, sort=True):
        base = bases.get((task, scale))
        lines += [f"### {task_caption(g)}", "",
                  "| " + " | ".join(HEADERS) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|"]
        lines += ["| " + " | ".join(row_cells(r, tests, base, MARKDOWN)) + " |"
                  for _, r in g.iterrows()]
        lines.append("")
    lines += [f"*{FOOTNOTE}*", ""]
    return "\n".join(lines)


def to_latex(summary: pd.DataFrame, tests: pd.DataFrame, title: str | None = None) -> str:
    """LaTeX (needs ``booktabs``): a ``table`` float per task with the footnote under it."""
    out = ["% generated by pisa_bench.analysis.tables; needs \\usepackage{booktabs}"]
    if title:
        out.append(f"% {title}")
    note = latex_escape(FOOTNOTE).replace("±", r"$\pm$").replace("Δ", r"$\Delta$") \
        .replace("√", r"$\surd$").replace("≥", r"$\geq$").replace("−", "-").replace("·", r"$\cdot$")
    bases = best_baselines(summary)
    for (task, scale), g in summary.groupby(TASK_KEYS, sort=True):
        base = bases.get((task, scale))
        out += [r"\begin{table}[ht]", r"\centering", r"\scriptsize",
                rf"\caption{{{latex_escape(task_caption(g))}}}",
                r"\begin{tabular}{l" + "r" * (len(HEADERS) - 1) + "}", r"\toprule",
                " & ".join(latex_escape(h).replace("±", r"$\pm$") for h in HEADERS) + r" \\",
                r"\midrule"]
        out += [" & ".join(row_cells(r, tests, base, LATEX)) + r" \\" for _, r in g.iterrows()]
        out += [r"\bottomrule", r"\end{tabular}", "", rf"\par\smallskip{{\tiny {note}}}",
                r"\end{table}", ""]
    return "\n".join(out)


def render_tables(runs: pd.DataFrame, title: str | None = None) -> tuple[str, str]:
    """``(markdown, latex)`` for a runs table (as produced by :func:`.collect.collect`)."""
    summary = summarize(runs)
    if summary.empty:
        msg = "No runs."
        return (f"# {title}\n\n{msg}\n" if title else f"{msg}\n"), f"% {msg}\n"
    tests = significance(runs, summary)
    return to_markdown(summary, tests, title), to_latex(summary, tests, title)
