"""The run directory: the only record analysis reads.

One directory per run, never overwritten, every file written atomically::

    <run_dir>/
        config.yaml     resolved Hydra config
        meta.json       git sha + dirty flag, package versions, device, host, command, start time
        metrics.csv     long format: step,epoch,samples_or_tokens,wall_time_s,split,metric,value
        summary.json    status (ok | diverged | failed | preempted | running), final / best primary
                        metric, steps, wall time, mean optimizer-step ms, peak memory,
                        optimizer-state bytes, steps / time to target, the error if any
        checkpoint.pt   latest checkpoint (model, optimizer, scheduler, RNG, trainer position)

``metrics.csv`` is appended row by row and flushed; a crash loses at most the row being
written, which the reader drops. ``summary.json`` is written at start (status ``running``),
at each checkpoint and at the end, always through a temporary file and ``os.replace``.
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

METRIC_COLUMNS = ("step", "epoch", "samples_or_tokens", "wall_time_s", "split", "metric", "value")
STATUSES = ("ok", "diverged", "failed", "preempted", "running")
FINISHED = ("ok", "diverged", "failed")
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` through a temporary file and ``os.replace``."""
    import torch

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


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


def run_meta(device: str, repo: Path) -> dict[str, Any]:
    return {
        **git_state(repo),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device,
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


class MetricsWriter:
    """Appends rows of ``metrics.csv`` (long format), flushing each batch of rows."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self._w = csv.writer(self._f)
        if new:
            self._w.writerow(METRIC_COLUMNS)
            self._f.flush()

    def write(
        self,
        step: int,
        epoch: float,
        samples_or_tokens: int,
        wall_time_s: float,
        split: str,
        metrics: Mapping[str, float],
    ) -> None:
        for name, value in metrics.items():
            self._w.writerow(
                [
                    step,
                    f"{epoch:.6g}",
                    samples_or_tokens,
                    f"{wall_time_s:.4f}",
                    split,
                    name,
                    repr(float(value)),
                ]
            )
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_metrics(path: str | os.PathLike, after_step: int) -> None:
    """Drop rows logged after ``after_step`` (used on resume: those steps are re-run)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if len(r) == len(METRIC_COLUMNS) and int(r[0]) <= after_step]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(kept)
    atomic_write_text(path, buf.getvalue())


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
