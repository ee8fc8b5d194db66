"""Write a report directory from a runs table (and its curves): tables, runs.csv, figures.

    DIR/table.md, DIR/table.tex, DIR/runs.csv,
    DIR/curves_steps.{png,pdf}, DIR/curves_samples.{png,pdf}, DIR/curves_wall.{png,pdf},
    DIR/profile.{png,pdf}   (only when at least 2 tasks have a target)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.analysis.collect import collect, load_collected
from experiments.analysis.figures import plot_curves, plot_profile
from experiments.analysis.profiles import tasks_with_target
from experiments.analysis.tables import render_tables

CURVE_FIGURES = {"curves_steps": "step", "curves_samples": "samples_or_tokens",
                 "curves_wall": "wall_time_s"}
MIN_PROFILE_TASKS = 2


@dataclass
class Rendered:
    """What :func:`render` wrote, and why anything was skipped."""

    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def profile_skip_reason(runs: pd.DataFrame) -> str | None:
    """Why no performance profile can be drawn (``None``: it can)."""
    tasks = tasks_with_target(runs)
    if len(tasks) >= MIN_PROFILE_TASKS:
        return None
    which = f" ({', '.join(tasks)})" if tasks else ""
    return (f"performance profile skipped: {len(tasks)} task(s) with a target{which}; "
            f"a profile needs at least {MIN_PROFILE_TASKS}")


def render(
    runs: pd.DataFrame,
    curves: pd.DataFrame | None,
    out_dir: str | os.PathLike,
    title: str | None = None,
    band: str = "minmax",
) -> Rendered:
    """Write the whole report into ``out_dir`` (created); see the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = Rendered()
    md, tex = render_tables(runs, title)
    for name, text in (("table.md", md), ("table.tex", tex)):
        (out / name).write_text(text)
        done.files.append(out / name)
    runs.to_csv(out / "runs.csv", index=False)
    done.files.append(out / "runs.csv")
    if curves is None or curves.empty:
        done.notes.append("curve figures skipped: no curves table (metrics.csv rows)")
    else:
        for stem, x in CURVE_FIGURES.items():
            files = plot_curves(runs, curves, out / stem, x=x, band=band, title=title)
            if not files:
                done.notes.append(f"{stem} skipped: no primary-metric rows for ok runs")
            done.files += files
    reason = profile_skip_reason(runs)
    if reason:
        done.notes.append(reason)
    else:
        done.files += plot_profile(runs, out / "profile", title=title)
    return done


def render_from_runs(
    roots: list[str | os.PathLike], out_dir: str | os.PathLike, title: str | None = None
) -> Rendered:
    """:func:`render` of the run directories found under ``roots``."""
    runs, curves = collect(roots)
    return render(runs, curves, out_dir, title)


def render_from_table(
    table: str | os.PathLike, out_dir: str | os.PathLike, title: str | None = None
) -> Rendered:
    """:func:`render` of a table written by ``scripts/collect.py`` (curves from its sibling)."""
    runs, curves = load_collected(table)
    return render(runs, curves, out_dir, title)
