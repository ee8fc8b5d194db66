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

from pisa_bench.analysis.collect import collect, load_collected
from pisa_bench.analysis.figures import plot_curves, plot_profile
from pisa_bench.analysis.identity import label_identities
from pisa_bench.analysis.profiles import tasks_with_target
from pisa_bench.analysis.tables import render_tables

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
    runs, curves, note = by_identity(runs, curves)
    if note:
        done.notes.append(note)
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


def by_identity(
    runs: pd.DataFrame, curves: pd.DataFrame | None
) -> tuple[pd.DataFrame, pd.DataFrame | None, str | None]:
    """Runs relabelled by identity (:func:`.identity.label_identities`): ``optim`` becomes the
    row label, the name stays in ``optim_name``; duplicates (identity and seed seen before) are
    left out, and the returned note names them."""
    if runs.empty or "run_dir" not in runs:
        return runs, curves, None
    df = label_identities(runs)
    dup = df[df["duplicate"]]
    note = None
    if len(dup):
        note = (f"{len(dup)} duplicate run(s) left out (same identity and seed as an earlier "
                "run): " + "; ".join(f"{r['optim']} seed {r['seed']}: {r['run_dir']}"
                                     for _, r in dup.iterrows()))
    df = df[~df["duplicate"]].copy()
    df["optim_name"] = df["optim"]
    df["optim"] = df["label"]
    if curves is not None and not curves.empty and "run_dir" in curves:
        curves = curves[curves["run_dir"].astype(str).isin(set(df["run_dir"].astype(str)))].copy()
        curves["optim"] = curves["run_dir"].astype(str).map(
            dict(zip(df["run_dir"].astype(str), df["label"])))
    return df, curves, note


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
