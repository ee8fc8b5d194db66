"""Run records under faults, for real: ``run.py`` in subprocesses, killed with SIGKILL at random
moments and inside its writes, two at once on one run, files deleted or corrupted, a full disk,
a signal to a sweep. Each faulty run is resumed by the same command and its ``metrics.csv`` is
compared row by row (wall time aside) with an uninterrupted run's.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pisa_bench.rundir import FAULT_ENV, read_metrics

REPO = Path(__file__).resolve().parent.parent
PY = os.environ.get("PISA_TEST_PYTHON", sys.executable)
# 12 rounds of SISA (m = 4 virtual workers) on the smoke MNIST task, an evaluation (and so a
# checkpoint) every 4 rounds, a training row every round: kills land between checkpoints too.
ARGS = ["task=quickstart_mnist", "optim=sisa", "scale=smoke", "train.max_steps=12",
        "train.eval_every=4", "train.threads=1", "hydra/job_logging=disabled"]


def run(out: Path, *extra: str, env: dict[str, str] | None = None, wait: bool = True,
        ) -> subprocess.CompletedProcess | subprocess.Popen:
    flags = [e for e in extra if e.startswith("-")]  # before the overrides (-m)
    extra = tuple(e for e in extra if not e.startswith("-"))
    cmd = [PY, str(REPO / "run.py"), *flags, *ARGS, f"paths.out_dir={out}", *extra]
    full_env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=240)


def run_dir(out: Path) -> Path:
    (d,) = [p.parent for p in out.glob("runs/**/config.yaml") if "attempts" not in p.parts]
    return d


def rows(d: Path) -> list[tuple]:
    return [(r["step"], r["epoch"], r["samples_or_tokens"], r["split"], r["metric"], r["value"])
            for r in read_metrics(d / "metrics.csv")]


def summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def finish(out: Path) -> Path:
    """Rerun the same command until the run has its outcome (at most 3 times)."""
    for _ in range(3):
        r = run(out)
        if r.returncode == 0:
            return run_dir(out)
    raise AssertionError(f"the run did not finish: rc={r.returncode}\n{r.stderr[-3000:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[tuple], dict]:
    out = tmp_path_factory.mktemp("reference")
    r = run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    d = run_dir(out)
    assert summary(d)["status"] == "ok"
    return rows(d), summary(d)


def assert_same_record(d: Path, reference: tuple[list[tuple], dict]) -> None:
    ref_rows, ref_summary = reference
    got = rows(d)
    keys = [(r[0], r[3], r[4]) for r in got]
    assert len(keys) == len(set(keys)), "a (step, split, metric) row is doubled"
    assert got == ref_rows
    s = summary(d)
    assert s["status"] == "ok" and s["final_metric"] == ref_summary["final_metric"]
    assert s["steps"] == ref_summary["steps"] and s["metric_rows"] == len(ref_rows)


@pytest.mark.parametrize("kill_at", [9, 14])
def test_kill_inside_a_write_then_resume_matches(tmp_path: Path, reference, kill_at: int) -> None:
    """SIGKILL inside the n-th write. The writes of this run: config, meta, metrics.csv,
    summary at the start (1-4); per checkpoint (steps 4, 8, 12) the staged file before its
    rename, the moment between moving the newest to ``.prev`` and the staged one into place, the
    summary (5-13); the two summaries at the end (14, 15). So 9: inside the second checkpoint's
    rotation (``.prev`` and the staged file on disk, no newest); 14: the run is done but its
    status unwritten."""
    r = run(tmp_path, env={FAULT_ENV: str(kill_at)})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    d = finish(tmp_path)
    assert_same_record(d, reference)
    assert not list(d.rglob(".*.tmp")) and not list(d.rglob("*.staged"))


def _attempts(out: Path) -> list:
    """The attempts ``meta.json`` records so far (none before the run has started)."""
    metas = [f for f in out.glob("runs/**/meta.json") if "attempts" not in f.parts]
    try:
        return json.loads(metas[0].read_text())["attempts"] if metas else []
    except (OSError, ValueError, KeyError):
        return []


def _kill_twice(out: Path, first: int, second: int) -> bool:
    """Start the run, SIGKILL it once ``first`` rows are on disk; start it again, SIGKILL it once
    ``second`` rows are. False when the second kill came too late: the run had already written
    its outcome (the last rows and the summary can land within one poll), so no attempt is left
    to resume."""
    for attempt, target in enumerate((first, second), start=1):
        p = run(out, wait=False)
        while p.poll() is None:
            # this attempt's own rows: once it is recorded (the rows the killed one left on
            # disk may already reach the target, and a kill before then would be no attempt)
            if len(_attempts(out)) >= attempt:
                csvs = [f for f in out.glob("runs/**/metrics.csv") if "attempts" not in f.parts]
                if csvs and len(read_metrics(csvs[0])) >= target:
                    break
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL, "the run ended before it was killed"
    return summary(run_dir(out))["status"] not in ("ok", "diverged")


def test_kill_at_random_moments_then_resume_matches(tmp_path: Path, reference) -> None:
    """Two SIGKILLs at random moments of one run (after a random number of logged rows, so rows
    after the last checkpoint are on disk), then resume to the end. The first kill lands
    anywhere; the second after the first checkpoint (a row of a later step is on disk), so that
    the last attempt must resume from a checkpoint rather than start again. A second kill that
    lands after the run wrote its outcome is no mid-run kill: the scenario starts over in a
    fresh directory (at most 5 times)."""
    rng = random.Random(int(os.environ.get("PISA_FAULT_SEED", "0")))
    n = len(reference[0])
    eval_every = int(next(a for a in ARGS if a.startswith("train.eval_every=")).split("=")[1])
    checkpointed = sum(1 for r in reference[0] if r[0] <= eval_every)  # rows up to the 1st one
    first = rng.randrange(2, n - 2)
    second = rng.randrange(max(first, checkpointed) + 1, n - 1)
    for tries in range(5):
        out = tmp_path / f"try{tries}"
        if _kill_twice(out, first, second):
            break
    else:
        raise AssertionError("5 times the second kill came after the run had finished")
    d = finish(out)
    assert_same_record(d, reference)
    attempts = json.loads((d / "meta.json").read_text())["attempts"]
    assert len(attempts) == 3 and attempts[-1]["resumed_from_step"] > 0  # resumed, not redone


def test_second_process_refuses_or_waits(tmp_path: Path) -> None:
    long = ("train.max_steps=4000", "train.eval_every=1000", "train.log_every=20")  # ~10 s
    first = run(tmp_path, *long, wait=False)
    d = None
    for _ in range(600):  # until the first process holds the run
        locks = list(tmp_path.glob("runs/**/.lock"))
        if locks and locks[0].read_text().strip():
            d = locks[0].parent
            break
        time.sleep(0.05)
    assert d is not None, "the first process never claimed its run"
    second = run(tmp_path, *long)
    assert second.returncode == 4, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "another process" in lines[0] and str(first.pid) in lines[0]
    waiting = run(tmp_path, *long, "run.lock_wait_s=200")  # waits, then finds it finished
    assert waiting.returncode == 0, waiting.stderr[-2000:]
    assert first.wait(timeout=200) == 0
    got = rows(d)
    losses = [r[0] for r in got if r[3] == "train" and r[4] == "loss"]
    assert losses == list(range(20, 4001, 20))  # each once: nothing lost, nothing doubled
    assert summary(d)["status"] == "ok" and summary(d)["metric_rows"] == len(got)
    assert len(json.loads((d / "meta.json").read_text())["attempts"]) == 1


def test_deleted_and_corrupt_files_are_recovered(tmp_path: Path, reference) -> None:
    # metrics.csv deleted from an unfinished run: rebuilt from the checkpoint's rows
    a = tmp_path / "a"
    assert run(a, "train.preempt_at_step=9").returncode == 3
    (run_dir(a) / "metrics.csv").unlink()
    assert_same_record(finish(a), reference)
    # summary.json deleted from a finished run, then garbage in it: recovered, nothing doubled
    d = run_dir(a)
    (d / "summary.json").unlink()
    assert_same_record(finish(a), reference)
    (d / "summary.json").write_text("{ not json")
    assert_same_record(finish(a), reference)
    # metrics.csv of a finished run truncated: restored from the final checkpoint
    text = (d / "metrics.csv").read_text()
    (d / "metrics.csv").write_text(text[: len(text) // 3])
    assert run(a).returncode == 0
    assert_same_record(d, reference)
    assert any("restored from rank0.pt" in n for n in summary(d)["notes"])


def test_corrupt_checkpoints_fall_back_then_restart(tmp_path: Path, reference) -> None:
    assert run(tmp_path, "train.preempt_at_step=9").returncode == 3
    d = run_dir(tmp_path)
    newest, prev = d / "ckpt" / "rank0.pt", d / "ckpt" / "rank0.prev.pt"
    assert newest.exists() and prev.exists()
    newest.write_bytes(newest.read_bytes()[:200])  # truncated
    assert_same_record(finish(tmp_path), reference)
    assert any("unreadable" in n and "rank0.pt" in n for n in summary(d)["notes"])
    resumed = json.loads((d / "meta.json").read_text())["attempts"][-1]["resumed_from_step"]
    assert resumed is not None and 0 < resumed < 9  # from the older checkpoint
    # no checkpoint loads: restart at step 0, what was there archived
    b = tmp_path / "b"
    assert run(b, "train.preempt_at_step=9").returncode == 3
    db = run_dir(b)
    for f in (db / "ckpt").glob("*.pt"):
        f.write_bytes(b"garbage")
    assert_same_record(finish(b), reference)
    assert (db / "attempts" / "1-restart" / "metrics.csv").exists()
    assert any("restarted at step 0" in n for n in summary(db)["notes"])


def _idx(path: Path, data: bytes, dims: tuple[int, ...], magic: int) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in dims) + data)


def test_failed_run_is_retried_once_the_cause_is_fixed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["task.data.name=fashion_mnist", "task.data.synthetic=false",
            f"paths.data_dir={data}", "train.max_steps=4"]
    r = run(tmp_path, *args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: dataset 'fashion-mnist' not found")
    d = run_dir(tmp_path)
    assert summary(d)["status"] == "failed"
    f = data / "fashion-mnist"
    f.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in (("train", 96), ("t10k", 32)):
        _idx(f / f"{split}-images-idx3-ubyte.gz", bytes(rng.randrange(256) for _ in range(
            n * 28 * 28)), (n, 28, 28), 0x803)
        _idx(f / f"{split}-labels-idx1-ubyte.gz", bytes(rng.randrange(10) for _ in range(n)),
             (n,), 0x801)
    r = run(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert summary(d)["status"] == "ok"
    assert json.loads((d / "attempts" / "1-failed" / "summary.json").read_text())[
        "status"] == "failed"
    assert len(json.loads((d / "meta.json").read_text())["attempts"]) == 2


def test_reused_run_dir_with_another_config_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    assert run(tmp_path, f"run.dir={d}", "train.preempt_at_step=5").returncode == 3
    before = (d / "config.yaml").read_text()
    r = run(tmp_path, f"run.dir={d}", "optim=adamw")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "another configuration" in lines[0] and "optim.name" in lines[0]
    assert (d / "config.yaml").read_text() == before
    r = run(tmp_path, f"run.dir={d}")  # the same config resumes
    assert r.returncode == 0, r.stderr[-2000:]
    attempts = json.loads((d / "meta.json").read_text())["attempts"]
    assert [a["resumed_from_step"] for a in attempts] == [None, 5]
    assert all("git_sha" in a and "host" in a and "start_time" in a for a in attempts)


def test_signal_stops_a_local_sweep_and_the_same_command_resumes(tmp_path: Path) -> None:
    # 2,000 steps: on a quiet machine 400 ended before a signal sent 1 s after training began
    sweep = ["-m", "optim=sisa,adamw", "train.max_steps=2000", "train.eval_every=0"]
    p = run(tmp_path, *sweep, wait=False)
    for _ in range(1200):  # until the first job is training (its signal handlers are set)
        if list(tmp_path.glob("runs/**/sisa/*/ckpt")) or list(tmp_path.glob(
                "runs/**/sisa/*/metrics.csv")):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, err[-2000:]
    sisa = next(tmp_path.glob("runs/**/sisa/*/summary.json")).parent
    assert summary(sisa)["status"] == "preempted"
    assert not list(tmp_path.glob("runs/**/adamw/*")), "the sweep went on after the signal"
    r = run(tmp_path, *sweep)
    assert r.returncode == 0, r.stderr[-2000:]
    assert summary(sisa)["status"] == "ok"
    assert summary(next(tmp_path.glob("runs/**/adamw/*/summary.json")).parent)["status"] == "ok"


def _tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_loses_nothing(tmp_path: Path, reference) -> None:
    """The disk fills up mid-run (room for the first checkpoint, not the second): one line,
    a non-zero exit; once there is room again the same command ends with the full record."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "2m"):
        pytest.skip("needs root and a mountable tmpfs to fill a disk")
    try:
        st = os.statvfs(disk)
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 72 * 1024))
        r = run(disk)
        assert r.returncode == 1, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: No space left on device: "), lines
        assert str(disk) in lines[0]  # names the run
        filler.unlink()
        assert_same_record(finish(disk), reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
