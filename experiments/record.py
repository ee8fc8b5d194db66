"""Life cycle of one run directory: create or resume it, log into it, close it with a status."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.rundir import (
    FINISHED,
    SUMMARY_FIELDS,
    MetricsWriter,
    atomic_write_json,
    atomic_write_text,
    read_json,
    run_meta,
    truncate_metrics,
)

REPO = Path(__file__).resolve().parent.parent
# Config keys that do not change what a run computes: left out of the run's identity.
_NOT_IDENTITY = ("paths", "run", "logger", "hydra", "reproduce")


class RunExists(RuntimeError):
    """The run directory already holds a run that must not be overwritten."""


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the resolved config minus paths / run / logger settings."""
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    for k in _NOT_IDENTITY:
        c.pop(k, None)
    if isinstance(c.get("train"), dict):
        for k in ("device", "threads", "progress", "preempt_at_step", "ckpt_every"):
            c["train"].pop(k, None)
    blob = json.dumps(c, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_dir_for(cfg: DictConfig) -> Path:
    """``<out_dir>/runs/<name>/<task>/<optim>/<scale>-s<seed>-<hash>`` (or ``run.dir`` if set)."""
    if cfg.run.get("dir"):
        return Path(str(cfg.run.dir))
    leaf = f"{cfg.scale}-s{cfg.seed}-{config_hash(cfg)}"
    return (
        Path(str(cfg.paths.out_dir))
        / "runs"
        / str(cfg.name)
        / str(cfg.task.name)
        / str(cfg.optim.name)
        / leaf
    )


def existing_status(run_dir: Path) -> str | None:
    p = run_dir / "summary.json"
    return read_json(p).get("status") if p.exists() else None


class RunRecord:
    """Writes config.yaml, meta.json, metrics.csv and summary.json of one run.

    ``RunRecord.open`` refuses to touch a finished run (``RunExists``) and reopens an unfinished
    one for resumption when ``run.if_exists == 'resume'``.
    """

    def __init__(self, run_dir: Path, summary: dict[str, Any], resumed: bool) -> None:
        self.dir = run_dir
        self.summary = summary
        self.resumed = resumed
        self.metrics = MetricsWriter(run_dir / "metrics.csv")
        self._t0 = time.perf_counter()
        self._wall_before = float(summary.get("wall_time_s") or 0.0)

    @classmethod
    def open(cls, cfg: DictConfig, device: str) -> RunRecord:
        run_dir = run_dir_for(cfg)
        status = existing_status(run_dir)
        if status in FINISHED:
            raise RunExists(
                f"{run_dir} already holds a finished run (status '{status}'); runs are never "
                "overwritten. Change the seed or `name=`, or delete that directory."
            )
        resumed = status is not None and (run_dir / "ckpt").exists()
        if status is not None and cfg.run.if_exists != "resume":
            raise RunExists(
                f"{run_dir} holds an unfinished run (status '{status}') and run.if_exists="
                f"{cfg.run.if_exists}; use run.if_exists=resume to continue it."
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        meta_path = run_dir / "meta.json"
        meta = run_meta(device, REPO)
        if meta_path.exists():  # keep the first start; list every resume
            old = read_json(meta_path)
            meta["resumes"] = [*old.get("resumes", []), meta["start_time"]]
            meta["start_time"] = old.get("start_time", meta["start_time"])
        atomic_write_json(meta_path, meta)
        if resumed:
            summary = read_json(run_dir / "summary.json")
        else:
            summary = {k: None for k in SUMMARY_FIELDS}
            summary.update(
                name=str(cfg.name),
                task=str(cfg.task.name),
                optim=str(cfg.optim.name),
                scale=str(cfg.scale),
                seed=int(cfg.seed),
                notes=[],
            )
        summary["status"] = "running"
        rec = cls(run_dir, summary, resumed)
        if status is not None and not resumed:  # died before its first checkpoint: start over
            rec.truncate_after(-1)
        rec.write_summary()
        return rec

    # --- logging --------------------------------------------------------------------------
    def wall_time(self) -> float:
        return self._wall_before + time.perf_counter() - self._t0

    def log(
        self, step: int, epoch: float, samples: int, split: str, metrics: dict[str, float]
    ) -> None:
        self.metrics.write(step, epoch, samples, self.wall_time(), split, metrics)

    def truncate_after(self, step: int) -> None:
        """On resume: drop metric rows of steps after the checkpoint (they are re-run)."""
        self.metrics.close()
        truncate_metrics(self.dir / "metrics.csv", step)
        self.metrics = MetricsWriter(self.dir / "metrics.csv")

    def restore_wall_time(self, wall_time_s: float) -> None:
        self._wall_before = wall_time_s
        self._t0 = time.perf_counter()

    def update(self, **fields: Any) -> None:
        unknown = set(fields) - set(SUMMARY_FIELDS)
        if unknown:
            raise KeyError(f"not summary fields: {sorted(unknown)}")
        self.summary.update(fields)

    def write_summary(self) -> None:
        s = dict(self.summary)
        s["wall_time_s"] = round(self.wall_time(), 3)
        for k, v in s.items():  # JSON has no NaN/inf: keep them readable as strings
            if isinstance(v, float) and not math.isfinite(v):
                s[k] = str(v)
        atomic_write_json(self.dir / "summary.json", s)

    def close(self, status: str, error: str | None = None) -> dict[str, Any]:
        self.summary["status"] = status
        if error is not None:
            self.summary["error"] = error
        self.write_summary()
        self.metrics.close()
        return read_json(self.dir / "summary.json")
