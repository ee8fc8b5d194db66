"""Figures (PNG + PDF) in the style of the paper's Fig. 1-3, and performance profiles.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no GUI backend, no global
figure state), so that it runs headless and in parallel test workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Container, Iterable, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from pisa_bench.analysis.aggregate import TASK_KEYS, consensus_labels, family_first, task_info
from pisa_bench.analysis.curves import metric_curves, primary_curves, seed_band
from pisa_bench.analysis.profiles import (
    COSTS,
    default_taus,
    performance_profile,
    performance_ratios,
    target_costs,
    task_label,
)

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 9,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.6, "lines.linewidth": 1.6, "legend.frameon": False,
    "savefig.dpi": 200, "pdf.fonttype": 42,
}
X_LABELS = {"step": "Steps", "samples_or_tokens": "Samples / tokens",
            "wall_time_s": "Wall-clock time (s)"}
DISPLAY = {"pisa": "PISA", "sisa": "SISA", "nsisa": "NSISA", "adamw": "AdamW", "adam": "Adam",
           "sgd": "SGD", "sgdm": "SGD-M", "muon": "Muon", "lion": "Lion", "radam": "RAdam"}
MAX_COLS = 4
SPARSE_POINTS = 12


def display_name(optim: str) -> str:
    return DISPLAY.get(str(optim).lower(), str(optim))


def optimizer_colors(
    optims: Iterable[str], consensus: Container[str] = ()
) -> dict[str, tuple[float, ...]]:
    """A fixed colour per optimizer: the PISA family (the labels in ``consensus``, e.g.
    :func:`.aggregate.consensus_labels` of the runs) first, then baselines, alphabetically."""
    names = sorted(set(optims), key=family_first(consensus))
    cmap = mpl.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {o: cmap(i % cmap.N) for i, o in enumerate(names)}


def _new_figure(n_rows: int, n_cols: int, w: float = 3.4, h: float = 2.6) -> Figure:
    fig = Figure(figsize=(w * n_cols, h * n_rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path_stem: str | os.PathLike) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf``; return the paths."""
    out = []
    for ext in ("png", "pdf"):
        path = Path(f"{os.fspath(path_stem)}.{ext}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with mpl.rc_context(STYLE):
            fig.savefig(path, bbox_inches="tight")
        out.append(path)
    return out


class PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers (``3``, ``0.6``) instead of ``3×10^0``, ``6e-01``."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def _plain_log_ticks(axis) -> None:
    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))


def _wants_log(metric: str, values: np.ndarray) -> bool:
    name = metric.lower()
    lossy = "loss" in name or "perplexity" in name or name == "ppl"
    return lossy and values.size > 0 and bool(np.all(values[np.isfinite(values)] > 0))


def _draw_band(ax: Axes, df: pd.DataFrame, x: str, band: str, colors: dict) -> list[str]:
    """One mean line + band per optimizer in ``df``; returns the optimizers drawn."""
    drawn = []
    for optim, g in df.groupby("optim", sort=True):
        b = seed_band(g, x)
        if b.empty:
            continue
        lo, hi = ((b["min"], b["max"]) if band == "minmax"
                  else (b["mean"] - b["std"], b["mean"] + b["std"]))
        color = colors[optim]
        marker = "o" if len(b) <= SPARSE_POINTS else None  # sparse evaluations stay visible
        ax.plot(b[x], b["mean"], color=color, label=display_name(optim), marker=marker,
                markersize=3)
        ax.fill_between(b[x], lo, hi, color=color, alpha=0.18, linewidth=0)
        drawn.append(optim)
    return drawn


def plot_curves(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    path_stem: str | os.PathLike,
    x: str = "step",
    band: str = "minmax",
    logy: bool | None = None,
    train_loss: tuple[str, str] | None = ("train", "loss"),
    statuses: Sequence[str] = ("ok",),
    title: str | None = None,
) -> list[Path]:
    """Primary metric vs ``x`` (step | samples_or_tokens | wall_time_s): one panel per task,
    one line per optimizer (mean over seeds) with a min–max (``band="minmax"``) or ±std
    (``"std"``) band; a second row of panels with the training loss ``(split, metric)`` when
    logged. ``logy=None``: log y for positive loss / perplexity metrics. Returns the files
    written (none when there is nothing to draw)."""
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', not {band!r}")
    prim = primary_curves(runs, curves, statuses)
    train = (metric_curves(runs, curves, train_loss[1], train_loss[0], statuses)
             if train_loss else prim.iloc[0:0])
    if prim.empty and train.empty:
        return []
    info = task_info(runs).set_index(TASK_KEYS)
    tasks = sorted(set(map(tuple, pd.concat([prim, train])[TASK_KEYS].to_numpy())))
    consensus = consensus_labels(runs)
    colors = optimizer_colors(pd.concat([prim, train])["optim"], consensus)
    rows_per = 2 if not train.empty else 1
    n_cols = min(len(tasks), MAX_COLS)
    n_blocks = math.ceil(len(tasks) / n_cols)
    drawn: set[str] = set()
    with mpl.rc_context(STYLE):
        fig = _new_figure(n_blocks * rows_per, n_cols)
        axes = fig.subplots(n_blocks * rows_per, n_cols, squeeze=False)
        for ax in axes.flat:
            ax.set_visible(False)
        for i, (task, scale) in enumerate(tasks):
            r0, col = (i // n_cols) * rows_per, i % n_cols
            t = info.loc[(task, scale)]
            panels = [(prim, str(t["metric"]), f"{t['metric']} ({t['metric_split']})")]
            if rows_per == 2:
                panels.append((train, train_loss[1], f"{train_loss[0]} {train_loss[1]}"))
            for j, (df, metric, ylabel) in enumerate(panels):
                ax = axes[r0 + j, col]
                sub = df[(df["task"] == task) & (df["scale"] == scale)]
                if sub.empty:
                    continue
                ax.set_visible(True)
                drawn.update(_draw_band(ax, sub, x, band, colors))
                log = _wants_log(metric, sub["value"].to_numpy(float)) if logy is None else logy
                if log:
                    ax.set_yscale("log")
                    _plain_log_ticks(ax.yaxis)
                ax.set_title(task_label(task, scale))
                ax.set_xlabel(X_LABELS.get(x, x))
                ax.set_ylabel(ylabel)
        handles = [Line2D([], [], color=colors[o], label=display_name(o))
                   for o in sorted(drawn, key=family_first(consensus))]
        spread = "min–max" if band == "minmax" else "±1 std"
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6),
                   title=f"line: mean over seeds, band: {spread}", title_fontsize=7)
        if title:
            fig.suptitle(title)
    return save(fig, path_stem)


def plot_profile(
    runs: pd.DataFrame,
    path_stem: str | os.PathLike,
    costs: Sequence[str] = ("time", "steps"),
    title: str | None = None,
) -> list[Path]:
    """Performance profiles ``rho_p(tau)`` (see :mod:`.profiles`), one panel per cost
    (``time``: time to target, ``steps``: steps to target), tau on a log axis."""
    consensus = consensus_labels(runs)
    colors = optimizer_colors(runs["optim"].dropna().astype(str), consensus)
    with mpl.rc_context(STYLE):
        fig = _new_figure(1, len(costs), w=4.0, h=3.0)
        axes = fig.subplots(1, len(costs), squeeze=False)[0]
        for ax, cost in zip(axes, costs):
            ratios = performance_ratios(target_costs(runs, COSTS[cost]))
            taus = default_taus(ratios)
            rho = performance_profile(ratios, taus)
            for optim in sorted(rho.columns, key=family_first(consensus)):
                ax.step(taus, rho[optim], where="post", color=colors[optim],
                        label=display_name(optim))
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set_xlim(1, taus[-1])
            ax.set_ylim(-0.02, 1.03)
            ax.set_xlabel("τ (ratio to the best optimizer on the task)")
            ax.set_ylabel("fraction of tasks within τ")
            ax.set_title(f"{cost.capitalize()} to target ({len(ratios)} tasks)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6))
        if title:
            fig.suptitle(title)
    return save(fig, path_stem)
