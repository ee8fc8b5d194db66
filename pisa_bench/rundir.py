"""The run directory: the only record analysis reads.

One directory per run, never overwritten, every file written atomically::

    <run_dir>/
        config.yaml     resolved Hydra config (written once, at the first start)
        meta.json       identity hash, and one entry per attempt: git sha + dirty flag, host, pid,
                        device, command, start time, the step it resumed from
        metrics.csv     long format: step,epoch,samples_or_tokens,wall_time_s,split,metric,value
        summary.json    status (ok | diverged | failed | preempted | running), final / best primary
                        metric, steps, wall time, mean optimizer-step ms, peak memory,
                        optimizer-state bytes, steps / time to target, the error if any
        ckpt/rank{r}.pt       latest checkpoint of rank r (model, optimizer, scheduler, RNG,
        ckpt/rank{r}.prev.pt  trainer position, the metric rows so far) and the one before it
        attempts/<k>-<why>/   what an attempt left when the next one could not continue it
        .lock           held (``flock``) by the one process that runs the run; pid, host, start

The promise (tested in ``tests/test_faults.py``): whatever kills a run (a signal, ``kill -9``
inside any write, a full disk, a lost file), the next invocation of the same command continues
it from the newest checkpoint that loads and ends with ``metrics.csv`` equal, row for row, to an
uninterrupted run. ``metrics.csv`` is appended row by row and flushed; on resume it is rewritten
from the rows the checkpoint carries, so rows logged after the checkpoint, a torn last line, or a
deleted or truncated file never reach the record. Every other file is written to a temporary
file, fsynced, renamed over the old one and the directory fsynced: readers see the old or the new
file, never half. Temporary files a kill left behind are removed at the next start.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pisa_bench.errors import UserError

METRIC_COLUMNS = ("step", "epoch", "samples_or_tokens", "wall_time_s", "split", "metric", "value")
STATUSES = ("ok", "diverged", "failed", "preempted", "running")
# A run with one of these statuses has its outcome: it is skipped, never redone. "failed",
# "preempted" and "running" (a killed process) are resumed or retried by the next invocation.
OUTCOMES = ("ok", "diverged")
# summary.json keys (every key always present; None where it does not apply):
SUMMARY_FIELDS = {
    "status": "ok | diverged | failed | preempted | running",
    "name": "experiment name (config key `name`)",
    "task": "task name",
    "optim": "optimizer name",
    "scale": "smoke | small | paper",
    "seed": "int",
    "metric": "primary metric name, e.g. accuracy, val_loss, perplexity, fid, return",
    "metric_split": "split of the metrics.csv rows that hold the primary metric (val | test)",
    "lower_is_better": "bool",
    "final_metric": "primary metric at the last evaluation",
    "best_metric": "best primary metric over evaluations",
    "best_step": "its step",
    "target": "the task's target value for time-to-target (None: no target)",
    "steps_to_target": "first evaluated step reaching the target (None: never)",
    "time_to_target_s": "wall time at that step",
    "steps": "optimizer rounds done (global steps)",
    "samples_or_tokens": "training samples (or tokens) consumed",
    "wall_time_s": "training wall time, evaluation included, resumes summed",
    "opt_step_ms_mean": "mean wall ms of optimizer.step() per global step (fwd/bwd excluded)",
    "peak_memory_bytes": "peak accelerator memory (CUDA) or peak process RSS (CPU)",
    "optimizer_state_bytes": "bytes of all tensors in the optimizer state",
    "n_params": "trainable parameters",
    "diverged_step": "step where loss/metric became NaN/inf (None: never)",
    "error": "exception text of a failed run (None otherwise)",
    "notes": "list of plain-language remarks (e.g. substitute data, untrained start)",
    "identity": "hash of the run's identity: its resolved config minus seed, paths, bookkeeping",
    "family": "consensus (a PISA-family optimizer) | baseline",
    "ns_dtype": "dtype(s) Newton-Schulz ran in, as resolved for the run's device (None: no NS)",
    "metric_rows": "rows in metrics.csv when the summary was written (integrity check)",
}
PACKAGES = (
    "torch",
    "numpy",
    "transformers",
    "pytorch_optimizer",
    "hydra-core",
    "omegaconf",
    "stable_baselines3",
    "gymnasium",
    "pisa-bench",
)


FAULT_ENV = "PISA_FAULT_KILL_AT_WRITE"  # tests: "<n>" SIGKILLs this process inside its n-th write
_writes = 0


def fault_point() -> None:
    """Fault injection for the crash tests: with ``PISA_FAULT_KILL_AT_WRITE=n`` the process kills
    itself (SIGKILL, no cleanup) inside its n-th atomic write, after the data is written and
    before the rename: the moment a crash is most likely to tear a record."""
    global _writes
    at = os.environ.get(FAULT_ENV)
    if not at:
        return
    _writes += 1
    if _writes == int(at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Any) -> None:
    """``write(binary_file)`` into a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` through a temporary file, fsync and ``os.replace``."""
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``directory`` (call it while
    holding the run's lock, so that no live writer owns them)."""
    removed = []
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


class UnreadableRecord(UserError, ValueError):
    """A record file exists but cannot be parsed; the message names the file."""


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """``summary.json`` of ``run_dir``; None when absent; :class:`UnreadableRecord` naming the file
    when it is not a JSON object (the one status reader of the suite)."""
    path = run_dir / "summary.json"
    try:
        s = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UnreadableRecord(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(s, dict):
        raise UnreadableRecord(f"{path}: not a JSON object")
    return s


def run_status(run_dir: Path) -> str | None:
    """The run's status (None: never started; ``"unreadable"``: a broken summary.json)."""
    try:
        s = read_summary(run_dir)
    except UnreadableRecord:
        return "unreadable"
    return None if s is None else s.get("status")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_state(repo: Path) -> dict[str, Any]:
    """``{"git_sha": ..., "git_dirty": ...}`` of ``repo`` (``None`` outside a checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha, "git_dirty": dirty}


def cpu_description() -> str:
    """The CPU's model, the instruction set torch's CPU kernels dispatch to, and the cores: the
    same run on another CPU rounds differently (kernels chosen by instruction set), which can move
    a trajectory, so a record names its CPU."""
    import torch  # here: the record's writers import torch anyway, its readers need not

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


def run_meta(device: str, repo: Path) -> dict[str, Any]:
    return {
        **git_state(repo),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device,
        "cpu": cpu_description(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


MetricRow = tuple[str, ...]  # one metrics.csv row, as written (strings)


def metric_row(
    step: int, epoch: float, samples_or_tokens: int, wall_time_s: float, split: str,
    metric: str, value: float,
) -> MetricRow:
    """One ``metrics.csv`` row (:data:`METRIC_COLUMNS`) as the text it is written as."""
    return (str(step), f"{epoch:.6g}", str(samples_or_tokens), f"{wall_time_s:.4f}", split,
            metric, repr(float(value)))


class MetricsWriter:
    """Appends rows of ``metrics.csv`` (long format), flushing each batch of rows, and keeps every
    row written so far in :attr:`rows` (checkpoints carry them: a resume rewrites the file)."""

    def __init__(self, path: str | os.PathLike, rows: list[MetricRow] | None = None) -> None:
        """Start ``path`` afresh with ``rows`` (atomically), then append to it."""
        self.path = Path(path)
        self.rows: list[MetricRow] = list(rows or [])
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(METRIC_COLUMNS)
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        self._f = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self._w = csv.writer(self._f)

    def write(
        self,
        step: int,
        epoch: float,
        samples_or_tokens: int,
        wall_time_s: float,
        split: str,
        metrics: Mapping[str, float],
    ) -> None:
        new = [metric_row(step, epoch, samples_or_tokens, wall_time_s, split, name, value)
               for name, value in metrics.items()]
        self._w.writerows(new)
        self._f.flush()
        self.rows.extend(new)

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.csv``; a torn last line (crash mid-write) is dropped."""
    out = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return out
        for r in reader:
            if len(r) != len(METRIC_COLUMNS):
                continue
            try:
                out.append(
                    {
                        "step": int(r[0]),
                        "epoch": float(r[1]),
                        "samples_or_tokens": int(r[2]),
                        "wall_time_s": float(r[3]),
                        "split": r[4],
                        "metric": r[5],
                        "value": float(r[6]),
                    }
                )
            except ValueError:
                continue
    return out
