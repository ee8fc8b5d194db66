"""Launchers: run a plan's points here, one after the other (``local``), or as one job each
through a Hydra launcher plugin (``submitit_local``, ``slurm``).

The plugin route uses Hydra's public surface only: this process writes the points' override
lists to a plan file and starts ``python run.py -m hydra/sweeper=planned
hydra.sweeper.plan_file=<file> hydra/launcher=<launcher> ...``; the ``planned`` sweeper
(``hydra_plugins/pisa_planned_sweeper``, a Sweeper plugin) hands exactly those jobs to the
launcher, as Hydra's basic sweeper hands it a cartesian product. Each job runs run.py's task
function (:func:`pisa_bench.launch.job.job_entry`). Outcomes are read back from the run
directories, the record that survives requeues, never from the launcher's return values.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pisa_bench import stop
from pisa_bench.config import CONF_DIR
from pisa_bench.launch.ledger import in_flight
from pisa_bench.launch.plan import Plan, Point
from pisa_bench.rundir import atomic_write_text, run_status

#: ``--launcher`` choices -> ``hydra/launcher`` option (None: in this process).
LAUNCHERS = {"local": None, "submitit_local": "submitit_local", "slurm": "slurm"}
RUN_PY = CONF_DIR.parent / "run.py"


def launch(
    plan_: Plan, points: Sequence[Point], launcher: str, echo: Callable[[str], None] = print
) -> dict[str, int]:
    """Run ``points`` with the ``--launcher`` choice ``launcher``, claimed in the in-flight
    ledger while they run; returns counts per final status."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    hydra_launcher = LAUNCHERS[launcher]
    if hydra_launcher is None:
        with in_flight(plan_, points, launcher="local"):
            return launch_local(points, echo)
    return launch_hydra(plan_, points, hydra_launcher, echo)


def launch_local(
    points: Sequence[Point], echo: Callable[[str], None] = print
) -> dict[str, int]:
    """Run ``points`` one after the other in this process; returns counts per final status.

    A failing run is recorded (status failed) and the sweep goes on; a signal (Ctrl-C, SIGTERM)
    checkpoints the running one and launches nothing more: the same command resumes the sweep.
    """
    from pisa_bench.main import execute

    counts: dict[str, int] = {}
    n = len(points)
    with stop.handle_signals():
        for i, p in enumerate(points, 1):
            if stop.STOP.is_set():
                counts["not started"] = n - i + 1
                echo(f"stopped by a signal: {n - i + 1} runs not started; run the same command "
                     "to resume")
                break
            how = "resume" if p.status is not None else "start"
            echo(f"[{i}/{n}] {p.label} ({how}) ...")
            t0 = time.perf_counter()
            try:
                summary = execute(p.cfg)
                status = str(summary.get("status"))
                detail = f"{summary.get('metric')}={_fmt(summary.get('final_metric'))}"
            except Exception as e:  # recorded as failed by execute(); keep going
                status, detail = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            counts[status] = counts.get(status, 0) + 1
            echo(f"[{i}/{n}] {p.label}: {status}, {detail} ({time.perf_counter() - t0:.1f} s)")
            if status == "preempted":
                echo("interrupted: the run saved a checkpoint; run the same command to resume")
                break
    return counts


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def hydra_command(plan_: Plan, plan_file: str, launcher: str, sweep_dir: str) -> list[str]:
    """The ``run.py -m`` command line that launches the jobs listed in ``plan_file``."""
    user = [o for o in plan_.hydra_overrides
            if not o.startswith(("hydra/launcher=", "hydra/sweeper=", "hydra.sweep.dir="))]
    return [sys.executable, str(RUN_PY), "-m", "hydra/sweeper=planned",
            f"hydra.sweeper.plan_file={plan_file}", f"hydra/launcher={launcher}",
            f"hydra.sweep.dir={sweep_dir}", *user, *plan_.base_overrides]


def launch_hydra(
    plan_: Plan, points: Sequence[Point], launcher: str, echo: Callable[[str], None] = print
) -> dict[str, int]:
    """Launch ``points`` as one job each through the Hydra launcher plugin ``launcher``
    (``hydra/launcher=<launcher>``) and wait for them; returns counts per final status.

    The launching process runs in this one's process group, as ``run.py -m`` typed in a
    terminal would (a Ctrl-C reaches it and its local jobs); a SIGINT or SIGTERM sent to this
    process alone is passed on to it."""
    given = [o.split("=", 1)[1] for o in plan_.hydra_overrides if o.startswith("hydra.sweep.dir=")]
    sweep_dir = given[-1] if given else str(
        plan_.out_dir / "multirun" / plan_.name / f"{datetime.now():%Y-%m-%d_%H-%M-%S}")
    plan_file = (plan_.out_dir / "multirun" / plan_.name
                 / f"plan-{datetime.now():%Y%m%d-%H%M%S-%f}.json")
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan_file, json.dumps({"jobs": [p.overrides for p in points]}, indent=1))
    cmd = hydra_command(plan_, str(plan_file), launcher, sweep_dir)
    echo(f"launching {len(points)} jobs with hydra/launcher={launcher}; job logs under "
         f"{sweep_dir}/.submitit/")
    with in_flight(plan_, points, launcher=launcher, sweep_dir=sweep_dir):
        proc = subprocess.Popen(cmd, cwd=str(RUN_PY.parent))

        def forward(signum: int, frame: Any) -> None:
            proc.send_signal(signum)

        old: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                old[sig] = signal.signal(sig, forward)
        try:
            rc = proc.wait()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    plan_file.unlink(missing_ok=True)
    if rc != 0:
        echo(f"launcher exited with code {rc} (its error is above); the runs' records follow")
    counts: dict[str, int] = {}
    for p in points:
        s = str(run_status(p.run_dir))
        counts[s] = counts.get(s, 0) + 1
    return counts
