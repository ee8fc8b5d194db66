"""A real single-node SLURM cluster (scripts/slurm_up.sh, with accounting): a 3-run sweep through
``scripts/reproduce.py --launcher slurm`` (hydra/launcher=slurm) in which one job gets the
time-limit warning (USR2), checkpoints, is requeued and resumes. Skipped with the reason where SLURM
cannot be started (not root, not Linux, no apt-get for missing packages, install or start-up
failing); the daemons the fixture started are stopped even when a test fails."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pisa_bench.launch.plan import plan

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
UP, DOWN = REPO / "scripts" / "slurm_up.sh", REPO / "scripts" / "slurm_down.sh"
LAUNCHER = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=5",
            "hydra.launcher.signal_delay_s=60", "hydra.launcher.partition=null"]
# jobs inherit this environment (sbatch --export=ALL): one BLAS/OpenMP thread per job, so that
# 3 jobs on 2 cores do not spin against each other
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Start the cluster (installing the packages if needed); yields a scratch directory."""
    if not sys.platform.startswith("linux"):
        pytest.skip("SLURM test: Linux only")
    if os.geteuid() != 0:
        pytest.skip("SLURM test: needs root to install and start munge/slurm daemons")
    have = all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists()
               for b in ("slurmctld", "slurmd", "munged", "slurmdbd", "mariadbd"))
    if not have and shutil.which("apt-get") is None:
        pytest.skip("SLURM test: slurm/munge/slurmdbd/mariadb missing and no apt-get to install")
    tmp = tmp_path_factory.mktemp("slurm")
    log = tmp / "slurm_up.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            r = subprocess.run(["sh", str(UP)], stdout=f, stderr=subprocess.STDOUT, timeout=600,
                               env={**os.environ, "INSTALL": "1", "ACCOUNTING": "1"})
        ok = r.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        subprocess.run(["sh", str(DOWN)], capture_output=True, timeout=120)
        pytest.skip(f"SLURM test: the cluster could not start:\n{_tail(log)}")
    print(f"slurm up in {time.perf_counter() - t0:.1f} s")
    try:
        yield tmp
    finally:
        for pkl in glob.glob(str(tmp / "**" / ".submitit" / "*"), recursive=True):
            job = Path(pkl).name.split("_")[0]
            if job.isdigit():  # cancel what the tests submitted and may have left behind
                subprocess.run(["scancel", job], capture_output=True, timeout=30)
        r = subprocess.run(["sh", str(DOWN)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"slurm_down.sh failed: {r.stdout}{r.stderr}"


def _start(out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """``reproduce.py quickstart --scale smoke --launcher slurm ...`` in the background."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "reproduce.log"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce.py"), "quickstart", "--scale",
           "smoke", "--launcher", "slurm", "--out-dir", str(out / "out"), "--results-dir",
           str(out / "results"), *LAUNCHER, *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def _finish(proc: subprocess.Popen, log: Path, timeout: float, poll=None) -> str:
    """Wait for ``proc`` (calling ``poll()`` every 0.1 s); kill its process group on timeout."""
    deadline = time.time() + timeout
    try:
        while proc.poll() is None:
            if time.time() > deadline:
                pytest.fail(f"reproduce.py did not finish in {timeout} s:\n{_tail(log, 40)}")
            if poll is not None:
                poll()
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log.read_text(errors="replace")


def _runs(out: Path) -> list[Path]:
    return sorted(Path(p).parent for p in
                  glob.glob(str(out / "out" / "runs" / "**" / "summary.json"), recursive=True))


def test_sweep_on_slurm_with_a_time_limit_requeue(slurm: Path) -> None:
    """A 3-run sweep through reproduce.py --launcher slurm: one job per run. One of them gets
    USR2 (what SLURM sends signal_delay_s before the time limit): its trainer checkpoints,
    submitit requeues the job, and the requeued job resumes the run from its checkpoint."""
    out = slurm / "sweep"
    steps = 1500
    overrides = ["optim=adamw", f"train.max_steps={steps}", "train.log_every=50"]
    proc, log = _start(out, "--seeds", "3", *overrides)
    signalled: list[Path] = []
    job: list[str] = []

    def signal_first_run_then_hurry_its_requeue() -> None:
        if not signalled:
            runs = _runs(out)
            if runs:  # a run has started inside its job: send it the time-limit warning
                signalled.append(runs[0])
                job.append(json.loads((runs[0] / "meta.json").read_text())["slurm_job_id"])
                subprocess.run(["scancel", "--signal=USR2", job[0]], check=True, timeout=30)
            return
        # a requeued job waits ~2 min (BeginTime) before it may start again: skip the wait
        state = subprocess.run(["squeue", "-h", "-j", job[0], "-o", "%T"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job[0]}", "StartTime=now"],
                           capture_output=True, timeout=30)

    stdout = _finish(proc, log, 240, poll=signal_first_run_then_hurry_its_requeue)
    assert proc.returncode == 0, stdout[-4000:]
    assert "3 seed runs to run" in stdout  # the quickstart's protocol: seeds, no tuning stage
    assert "launching 3 jobs with hydra/launcher=slurm" in stdout
    runs = _runs(out)
    assert len(runs) == 3 and signalled
    job_ids = set()
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["steps"] == steps, (run, summary)
        assert (run / "metrics.csv").read_text().count("\n") > 1
        meta = json.loads((run / "meta.json").read_text())
        job_ids.add(meta["slurm_job_id"])
        resumed = len(meta.get("resumes", []))
        assert resumed == (1 if run == signalled[0] else 0), (run, meta)
        logged = [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]
        assert logged == sorted(logged)  # no step logged twice across the requeue
    assert None not in job_ids and len(job_ids) == 3  # each run was its own SLURM job
    assert (signalled[0] / "ckpt" / "rank0.pt").exists()
    logs = "".join(p.read_text(errors="replace")  # job logs (stderr) under .submitit/
                   for p in (out / "out" / "multirun").rglob("*_log.err"))
    assert logs.count("Requeued job") == 1 and logs.count("resumed from") == 1, logs[-3000:]
    assert (out / "results" / "quickstart_smoke" / "table.md").exists()
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", ",".join(job_ids)],
                            capture_output=True, text=True, timeout=30).stdout.split()
    assert states == ["COMPLETED"] * 3, states
    again = plan("quickstart", "smoke", 3, out / "out", overrides)  # the same command again
    assert len(again.done) == 3 and not again.todo
