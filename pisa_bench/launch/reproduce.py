"""Reproduce one paper artefact (table or figure) with one command: run its sweep, skipping
finished runs, then collect the runs and render them into ``results/<artefact>/``.

    python scripts/reproduce.py quickstart                     # runs here, one after the other
    python scripts/reproduce.py fig1_vision --scale paper --launcher slurm [--no-wait]
    python scripts/reproduce.py fig1_vision --collect-only     # render what has finished
    python scripts/reproduce.py fig1_vision --dry-run          # list the runs and their state

An artefact is an experiment config, ``conf/experiment/<artefact>.yaml`` (see
:mod:`pisa_bench.launch.plan` for its keys). Resuming is the same command again: finished runs
(ok / diverged) are skipped before anything is launched, interrupted or failed ones resume
from their checkpoints. Extra arguments are run.py overrides: ``optim=sisa,adamw`` replaces a
sweep dimension, ``train.max_steps=50`` applies to every run, ``hydra.launcher.partition=gpu``
sets the launcher.

An experiment with a ``reproduce.protocol`` block runs under the verdict protocol
(:mod:`pisa_bench.protocol`, ``results/PROTOCOL.md``): lr trials on seed 0, selection on the
validation split, edge rule, seeds; its artefact carries a verdict
(:mod:`pisa_bench.analysis.artefact`). ``--sweep-only`` runs its sweep as written instead.

    python scripts/reproduce.py verdicts                       # results/VERDICTS.md
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from pisa_bench.config import CONF_DIR, group_options
from pisa_bench.launch.launchers import LAUNCHERS, launch
from pisa_bench.launch.ledger import claim
from pisa_bench.launch.plan import Plan, Point, composer, plan
from pisa_bench.protocol import ProtocolSpec, bracket_label, drive, select_key

REPO = CONF_DIR.parent
DEFAULT_RESULTS = REPO / "results"
SCRIPT = REPO / "scripts" / "reproduce.py"


# --- rendering --------------------------------------------------------------------------------
def relabel(runs: pd.DataFrame, curves: pd.DataFrame | None, meta: dict[str, Any]) -> None:
    """Give variants of one task / optimizer their own table rows (``reproduce.split_*_by``):
    ``lstm_ptb`` -> ``lstm_ptb[layers=2]``. PISA-family optimizers keep their names: rows whose
    ``family`` is ``consensus`` (:func:`pisa_bench.analysis.collect.with_family`)."""
    from pisa_bench.analysis.collect import load_config, with_family
    from pisa_bench.baselines.registry import CONSENSUS

    if "family" not in runs.columns:
        with_family(runs)
    for col, spec_key in (("task", "split_task_by"), ("optim", "split_optim_by")):
        spec = meta.get(spec_key) or {}
        if not spec or runs.empty:
            continue
        new = {}
        for i, row in runs.iterrows():
            if col == "optim" and row["family"] == CONSENSUS:
                continue
            cfg = load_config(Path(str(row["run_dir"])))
            values = {name: select_key(cfg, key) for name, key in spec.items()}
            new[i] = bracket_label(str(row[col]), values)
        by_dir = {str(runs.at[i, "run_dir"]): v for i, v in new.items()}
        for i, v in new.items():
            runs.at[i, col] = v
        if curves is not None and not curves.empty:
            mapped = curves["run_dir"].astype(str).map(by_dir)
            curves[col] = mapped.where(mapped.notna(), curves[col])


def render_plan(p: Plan, results_dir: str | os.PathLike, artefact: str) -> tuple[Path, str]:
    """Collect the plan's run directories and render them; returns (report dir, table text)."""
    from pisa_bench.analysis.collect import collect
    from pisa_bench.analysis.report import render

    out = Path(results_dir) / report_dir_name(p, artefact)
    dirs = [pt.run_dir for pt in p.points if (pt.run_dir / "summary.json").exists()]
    if not dirs:
        raise SystemExit(f"nothing to render: none of the {len(p.points)} runs of {artefact} "
                         f"has started (under {p.runs_root})")
    runs, curves = collect(dirs)
    title = str(p.meta.get("title") or artefact)
    relabel(runs, curves, p.meta)
    done = render(runs, curves, out, title)
    text = (out / "table.md").read_text()
    files = "\n".join(f"  {f}" for f in sorted(done.files))
    notes = "".join(f"note: {n}\n" for n in done.notes)
    return out, f"{text}\n{notes}wrote {out}/:\n{files}\n"


def report_dir_name(p: Plan, artefact: str) -> str:
    """``<artefact>`` at the experiment's own scale, ``<artefact>_<scale>`` otherwise."""
    with composer() as compose:
        default_scale = str(compose([f"experiment={artefact}"]).scale)
    return artefact if p.scale == default_scale else f"{artefact}_{p.scale}"


# --- command line -----------------------------------------------------------------------------
def _title(name: str) -> str:
    """``reproduce.title`` of an experiment file (read as YAML: no composition needed)."""
    import yaml

    data = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text()) or {}
    return str((data.get("reproduce") or {}).get("title") or "")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artefact", nargs="?", help="experiment name (conf/experiment/); --list")
    p.add_argument("overrides", nargs="*", help="extra run.py / hydra overrides")
    p.add_argument("--list", action="store_true", help="list the artefacts and exit")
    p.add_argument("--scale", choices=group_options("scale"), default=None,
                   help="scale of every run (default: the experiment's)")
    p.add_argument("--launcher", choices=list(LAUNCHERS), default="local",
                   help="local: here, one run after the other (default); submitit_local: one "
                        "process per run; slurm: one SLURM job per run (conf/hydra/launcher/"
                        "slurm.yaml)")
    p.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1")
    p.add_argument("--no-wait", action="store_true",
                   help="submit from a detached background process and return at once")
    p.add_argument("--dry-run", action="store_true", help="show the runs and their state only")
    p.add_argument("--collect-only", action="store_true",
                   help="launch nothing: collect and render the runs that exist")
    p.add_argument("--sweep-only", action="store_true",
                   help="run the experiment's sweep as it is written, without its verdict "
                        "protocol (reproduce.protocol: trials, selection, seeds)")
    p.add_argument("--out-dir", default=None, help="paths.out_dir (run directories)")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS),
                   help="where <artefact>/ is rendered (default: results/)")
    return p


def _detach(args: argparse.Namespace, argv: list[str], p: Plan) -> int:
    """Start this command without --no-wait in a detached process; print how to follow it."""
    log_dir = p.out_dir / "multirun" / p.name
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"reproduce-{datetime.now():%Y-%m-%d_%H-%M-%S}.log"
    child_argv = [a for a in argv if a != "--no-wait"]
    if args.out_dir is None:
        child_argv += ["--out-dir", str(p.out_dir)]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(SCRIPT), *child_argv], cwd=os.getcwd(),
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # claim the runs for the child now, so that a second command does not submit them again
    claim(p, p.todo, pid=proc.pid, launcher=args.launcher, log=str(log_path))
    me = f"python scripts/reproduce.py {shlex.join(child_argv)}"
    print(f"submitting {len(p.todo)} runs from background process {proc.pid}\n"
          f"  log:      {log_path}   (tail -f it)\n"
          f"  jobs:     squeue -u $USER    (or sacct --starttime today)\n"
          f"  progress: {me} --dry-run\n"
          f"  render:   {me} --collect-only   (the background process renders when all end)\n"
          f"  resume:   {me}   (relaunches only unfinished runs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_intermixed_args(argv)
    if args.list or not args.artefact:
        for name in group_options("experiment"):
            print(f"{name:24s} {_title(name)}")
        return 0 if args.list else 2
    if args.artefact not in (*group_options("experiment"), VERDICTS):
        print(f"unknown artefact '{args.artefact}'; choose one of: "
              f"{', '.join(group_options('experiment'))}", file=sys.stderr)
        return 2
    if args.no_wait and args.launcher == "local":
        print("--no-wait needs --launcher slurm (or submitit_local)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.artefact == VERDICTS:
        return write_verdicts(Path(args.results_dir))
    spec = None if args.sweep_only else protocol_spec(args.artefact, args.scale)
    if spec is not None:
        return run_protocol(args, spec, t0)
    p = plan(args.artefact, args.scale, args.seeds, args.out_dir, args.overrides)
    print(p.describe())
    if args.dry_run:
        for pt in p.points:
            busy = not pt.finished and pt.run_dir in p.in_flight
            state = "in flight" if busy else str(pt.status or "not started")
            print(f"  {state:12s} {pt.label}\n               {pt.run_dir}")
        print("commands of the runs to launch:" if p.todo else "nothing to launch")
        for pt in p.todo:
            print(f"  {pt.command()}")
        return 0
    if not args.collect_only and p.todo:
        if args.no_wait:
            return _detach(args, argv, p)
        launch(p, p.todo, args.launcher)
        p.refresh()
    _, text = render_plan(p, args.results_dir, args.artefact)
    print(text)
    unfinished = [pt for pt in p.points if not pt.finished]
    failed = [pt for pt in p.points if pt.status == "failed"]
    for pt in failed:
        err = str(_summary_or_empty(pt.run_dir).get("error") or "").splitlines()
        print(f"failed: {pt.label}: {err[-1] if err else '?'}\n        {pt.run_dir}")
    print(f"{len(p.points) - len(unfinished)}/{len(p.points)} runs finished"
          + (f", {len(failed)} failed (the same command retries them)" if failed else "")
          + (f"; {len(unfinished)} unfinished: run the same command to resume them"
             if unfinished else "")
          + f" ({_duration(time.perf_counter() - t0)})")
    return 1 if unfinished or failed else 0


# --- the verdict protocol ---------------------------------------------------------------------
VERDICTS = "verdicts"  # pseudo-artefact: regenerate results/VERDICTS.md from committed artefacts


def protocol_spec(artefact: str, scale: str | None) -> ProtocolSpec | None:
    """The artefact's ``reproduce.protocol`` (``None``: a plain sweep)."""
    base = [f"experiment={artefact}", *([f"scale={scale}"] if scale else [])]
    with composer() as compose:
        node = compose(base).get("reproduce")
    meta = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    assert isinstance(meta, dict)
    return ProtocolSpec.from_meta(meta)


def run_protocol(args: argparse.Namespace, spec: ProtocolSpec, t0: float) -> int:
    """Drive an artefact's protocol (trials, edge rule, seeds), then render it."""
    from dataclasses import replace

    from pisa_bench.analysis.artefact import render_protocol

    if args.seeds is not None:
        spec = replace(spec, seeds=args.seeds)
        spec.validate()
    p = plan(args.artefact, args.scale, 1, args.out_dir, args.overrides)

    def run_points(points: Sequence[Point]) -> None:
        launch(p, points, args.launcher)

    if args.no_wait:
        print("--no-wait is not available for protocol artefacts (stages depend on each other)",
              file=sys.stderr)
        return 2
    run = None if (args.dry_run or args.collect_only) else run_points
    proto = drive(p, spec, run)
    points = proto.points()
    if args.dry_run:
        roles = proto.roles()
        for pt in points:
            state = str(pt.status or "not started")
            what = "; ".join(f"{a.task}/{a.label} {r} s{s} x{m:g}" for a, r, s, m in
                             roles[pt.run_dir])
            print(f"  {state:12s} {what}\n               {pt.run_dir}")
        todo = [pt for pt in points if not pt.finished]
        print(f"{len(points)} runs known so far, {len(todo)} to run (later stages appear once "
              f"the trials they depend on have finished)")
        return 0
    if not any((pt.run_dir / "summary.json").exists() for pt in points):
        raise SystemExit(f"nothing to render: none of the runs of {args.artefact} has started")
    out = Path(args.results_dir) / report_dir_name(p, args.artefact)
    text = render_protocol(proto, out, args.artefact, command=_command(args))
    print(text)
    unfinished = [pt for pt in points if not pt.finished]
    print(f"{len(points) - len(unfinished)}/{len(points)} runs finished"
          + (f"; {len(unfinished)} unfinished: run the same command to resume them"
             if unfinished else "") + f" ({_duration(time.perf_counter() - t0)})")
    return 1 if unfinished or not proto.trials_done() else 0


def _command(args: argparse.Namespace) -> str:
    parts = ["python scripts/reproduce.py", args.artefact, *map(shlex.quote, args.overrides)]
    if args.scale:
        parts.append(f"--scale {args.scale}")
    if args.seeds is not None:
        parts.append(f"--seeds {args.seeds}")
    return " ".join(parts)


def write_verdicts(results_dir: Path) -> int:
    """``results/VERDICTS.md`` from the committed artefacts' ``verdict.json``."""
    from pisa_bench.analysis.artefact import verdicts_markdown

    path = results_dir / "VERDICTS.md"
    path.write_text(verdicts_markdown(results_dir))
    print(f"wrote {path}")
    return 0


def _summary_or_empty(run_dir: Path) -> dict[str, Any]:
    """The run's summary (:func:`pisa_bench.rundir.read_summary`), ``{}`` if absent or broken."""
    from pisa_bench.rundir import UnreadableRecord, read_summary

    try:
        return read_summary(run_dir) or {}
    except UnreadableRecord:
        return {}


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{math.floor(s / 60)} min {s % 60:.0f} s"
