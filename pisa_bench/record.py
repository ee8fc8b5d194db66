"""Life cycle of one run directory: claim it, start / resume / retry it, log into it, close it.

The decisions, in order (``pisa_bench.main.execute`` drives them; see ``rundir.py`` for the
files and the promise):

1. the run is claimed with a lock (:mod:`pisa_bench.runlock`): a second process refuses;
2. a run whose status is an outcome (ok, diverged) is skipped after an integrity check of its
   ``metrics.csv`` (rows restored from the final checkpoint if they went missing);
3. a directory holding a run of another identity (``run.dir=`` reused with another config)
   is refused;
4. anything else (preempted, failed, killed while running, unreadable or missing summary) is
   continued from the newest checkpoint that loads, ``metrics.csv`` rewritten from the rows that
   checkpoint carries; with no loadable checkpoint it restarts at step 0, what was there moved
   to ``attempts/<k>-<why>/``. Each start is one entry of ``meta.json``'s ``attempts``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pisa_bench.checkpoints import CheckpointStore, Loaded
from pisa_bench.errors import EXIT_LOCKED, UserError
from pisa_bench.identity import identity_config, identity_hash
from pisa_bench.rundir import (
    METRIC_COLUMNS,
    OUTCOMES,
    SUMMARY_FIELDS,
    MetricRow,
    MetricsWriter,
    UnreadableRecord,
    atomic_write_json,
    atomic_write_text,
    metric_row,
    read_json,
    read_metrics,
    read_summary,
    remove_temporaries,
    run_meta,
)
from pisa_bench.runlock import RunLock, RunLocked

log = logging.getLogger("pisa-bench")

REPO = Path(__file__).resolve().parent.parent
__all__ = ["RunExists", "RunLocked", "RunRecord", "run_dir_for"]


class RunExists(UserError, RuntimeError):
    """The run directory holds a run that must not be overwritten (or is claimed)."""

    @classmethod
    def finished(cls, run_dir: Path, status: str) -> RunExists:
        return cls(f"{run_dir} already holds a finished run (status '{status}'); runs are never "
                   "overwritten. Change the seed or `name=`, or delete that directory.")


class RunLockedError(RunExists, RunLocked):
    """Another live process holds the run."""

    exit_code = EXIT_LOCKED


def run_dir_for(cfg: DictConfig) -> Path:
    """``<out_dir>/runs/<name>/<task>/<optim>/<scale>-s<seed>-<hash>`` (or ``run.dir`` if set)."""
    if cfg.run.get("dir"):
        return Path(str(cfg.run.dir))
    leaf = f"{cfg.scale}-s{cfg.seed}-{identity_hash(cfg)[:8]}"
    return (
        Path(str(cfg.paths.out_dir))
        / "runs"
        / str(cfg.name)
        / str(cfg.task.name)
        / str(cfg.optim.name)
        / leaf
    )


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def check_identity(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse (:class:`RunExists`) when ``run_dir`` holds a run of another identity."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    try:
        old = identity_config(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    except Exception as e:
        raise RunExists(f"{path} is unreadable ({type(e).__name__}); cannot tell which run "
                        f"{run_dir} holds: move it away or pass another run.dir") from None
    new = identity_config(cfg)
    if old != new:
        diff = sorted(_differences(old, new), key=lambda d: not d.split(":")[0].endswith("name"))
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise RunExists(f"{run_dir} holds a run with another configuration ({shown}); runs are "
                        "never overwritten: use another run.dir (or none)")


class RunRecord:
    """Writes config.yaml, meta.json, metrics.csv and summary.json of one run.

    Open it with :meth:`open`, which holds the run's lock until :meth:`close`.
    """

    def __init__(
        self, run_dir: Path, summary: dict[str, Any], rows: list[MetricRow], lock: RunLock,
        resumed_step: int | None,
    ) -> None:
        self.dir = run_dir
        self.summary = summary
        self.lock = lock
        self.resumed_step = resumed_step  # None: started at step 0
        self.metrics = MetricsWriter(run_dir / "metrics.csv", rows)
        self._t0 = time.perf_counter()
        self._wall_before = float(summary.get("wall_time_s") or 0.0)

    @property
    def resumed(self) -> bool:
        return self.resumed_step is not None

    # --- opening --------------------------------------------------------------------------
    @classmethod
    def claim(cls, cfg: DictConfig) -> RunLock:
        """Lock the run directory of ``cfg`` (``run.lock_wait_s``: how long to wait)."""
        run_dir = run_dir_for(cfg)
        try:
            return RunLock(run_dir, float(cfg.run.get("lock_wait_s") or 0)).acquire()
        except RunLocked as e:
            raise RunLockedError(str(e)) from None

    @classmethod
    def open(
        cls,
        cfg: DictConfig,
        device: str,
        loaded: Loaded | None = None,
        ckpt_notes: list[str] | tuple[str, ...] = (),
        lock: RunLock | None = None,
    ) -> RunRecord:
        """Start or continue the run of ``cfg``. ``loaded``: the checkpoint it continues from
        (None: start at step 0, archiving what an earlier attempt left)."""
        run_dir = run_dir_for(cfg)
        lock = lock or cls.claim(cfg)
        try:
            return cls._open(cfg, device, run_dir, loaded, list(ckpt_notes), lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open(
        cls, cfg: DictConfig, device: str, run_dir: Path, loaded: Loaded | None,
        notes: list[str], lock: RunLock,
    ) -> RunRecord:
        try:
            old = read_summary(run_dir)
        except UnreadableRecord as e:
            old, notes = {"status": "unreadable"}, [*notes, f"{e}; recovered from the checkpoint"
                                                       if loaded else str(e)]
        status = None if old is None else old.get("status")
        if status in OUTCOMES:
            raise RunExists.finished(run_dir, str(status))
        check_identity(run_dir, cfg)
        started = status is not None or (run_dir / "metrics.csv").exists()
        if started and cfg.run.if_exists != "resume":
            raise RunExists(
                f"{run_dir} holds an unfinished run (status '{status}') and run.if_exists="
                f"{cfg.run.if_exists}; use run.if_exists=resume to continue it."
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(run_dir)
        if lock.previous is not None and status == "running":
            notes.append(f"the attempt of pid {lock.previous.get('pid')} on "
                         f"{lock.previous.get('host')} (started {lock.previous.get('start_time')})"
                         " was killed before it recorded a status")
        if status == "failed":
            notes.append(f"retried after a failed attempt: {(old or {}).get('error')}")
        if loaded is None and started:
            why = "; ".join(notes) or "no checkpoint"
            dest = _archive(run_dir, "failed" if status == "failed" else "restart",
                            keep_checkpoints=False)
            notes.append(f"restarted at step 0 (no checkpoint loaded: {why}); what the earlier "
                         f"attempt left is in {dest.relative_to(run_dir)}")
        elif status == "failed":
            _archive(run_dir, "failed", keep_checkpoints=True)
        if not (run_dir / "config.yaml").exists():
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        summary, rows = cls._initial_summary(cfg, run_dir, loaded)
        summary["notes"] = [*(summary.get("notes") or []), *notes]
        for n in notes:
            log.warning("%s: %s", run_dir, n)
        _add_attempt(run_dir, cfg, device, None if loaded is None else loaded.step)
        rec = cls(run_dir, summary, rows, lock, None if loaded is None else loaded.step)
        rec.write_summary()
        return rec

    @staticmethod
    def _initial_summary(
        cfg: DictConfig, run_dir: Path, loaded: Loaded | None
    ) -> tuple[dict[str, Any], list[MetricRow]]:
        if loaded is not None:
            t = loaded.state["trainer"]
            summary = dict(t["summary"])
            rows = t.get("metric_rows")
            if rows is None:  # a checkpoint without its rows: keep those up to its step
                rows = [metric_row(*(r[c] for c in METRIC_COLUMNS))
                        for r in read_metrics(run_dir / "metrics.csv")
                        if r["step"] <= loaded.step] if (run_dir / "metrics.csv").exists() else []
            summary["wall_time_s"] = t["wall_time_s"]
        else:
            summary = {k: None for k in SUMMARY_FIELDS}
            summary.update(name=str(cfg.name), task=str(cfg.task.name), optim=str(cfg.optim.name),
                           scale=str(cfg.scale), seed=int(cfg.seed), notes=[])
            rows = []
        summary.update(status="running", error=None, identity=identity_hash(cfg))
        return summary, [tuple(r) for r in rows]

    # --- logging --------------------------------------------------------------------------
    def wall_time(self) -> float:
        return self._wall_before + time.perf_counter() - self._t0

    def log(
        self, step: int, epoch: float, samples: int, split: str, metrics: dict[str, float]
    ) -> None:
        self.metrics.write(step, epoch, samples, self.wall_time(), split, metrics)

    def update(self, **fields: Any) -> None:
        unknown = set(fields) - set(SUMMARY_FIELDS)
        if unknown:
            raise KeyError(f"not summary fields: {sorted(unknown)}")
        self.summary.update(fields)

    def write_summary(self) -> None:
        s = dict(self.summary)
        s["wall_time_s"] = round(self.wall_time(), 3)
        s["metric_rows"] = len(self.metrics.rows)
        for k, v in s.items():  # JSON has no NaN/inf: keep them readable as strings
            if isinstance(v, float) and not math.isfinite(v):
                s[k] = str(v)
        atomic_write_json(self.dir / "summary.json", s)

    def close(self, status: str, error: str | None = None) -> dict[str, Any]:
        """Write the final status and release the run."""
        try:
            self.summary["status"] = status
            if error is not None:
                self.summary["error"] = error
            self.write_summary()
            self.metrics.close()
            return read_json(self.dir / "summary.json")
        finally:
            self.lock.release()


def _archive(run_dir: Path, why: str, keep_checkpoints: bool) -> Path:
    """Move what an attempt left (summary, metrics, and the checkpoints unless kept) to
    ``attempts/<k>-<why>/`` (copying the summary when checkpoints are kept, as the run goes on)."""
    root = run_dir / "attempts"
    k = 1 + max((int(p.name.split("-")[0]) for p in root.glob("*-*")
                 if p.name.split("-")[0].isdigit()), default=0)
    dest = root / f"{k}-{why}"
    dest.mkdir(parents=True)
    for name in ("summary.json", "metrics.csv"):
        src = run_dir / name
        if src.exists():
            (shutil.copy2 if keep_checkpoints else shutil.move)(src, dest / name)
    ckpt = run_dir / "ckpt"
    if not keep_checkpoints and ckpt.is_dir():
        shutil.move(ckpt, dest / "ckpt")
    return dest


def _add_attempt(run_dir: Path, cfg: DictConfig, device: str, resumed_from: int | None) -> None:
    """Append this start to ``meta.json`` (the first start's fields stay at the top level)."""
    path = run_dir / "meta.json"
    entry = {**run_meta(device, REPO), "pid": os.getpid(), "resumed_from_step": resumed_from}
    try:
        meta = read_json(path) if path.exists() else {}
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict) or not meta:
        meta = {k: v for k, v in entry.items() if k not in ("pid", "resumed_from_step")}
    else:
        meta["resumes"] = [*meta.get("resumes", []), entry["start_time"]]
    meta["identity"] = identity_hash(cfg)
    meta["attempts"] = [*meta.get("attempts", []), entry]
    atomic_write_json(path, meta)


def verify_finished(run_dir: Path, summary: dict[str, Any], device: str = "cpu") -> list[str]:
    """Check a finished run's ``metrics.csv`` against its summary; restore it from the final
    checkpoint when rows went missing. Returns remarks; raises :class:`UnreadableRecord` naming
    the file when the record cannot be made whole."""
    path = run_dir / "metrics.csv"
    want = summary.get("metric_rows")
    have = len(read_metrics(path)) if path.exists() else None
    if want is None or have == want:
        return []
    loaded, _ = CheckpointStore(run_dir).load()
    rows = None if loaded is None else loaded.state["trainer"].get("metric_rows")
    if rows is None or len(rows) != want:
        raise UnreadableRecord(
            f"{path}: {'missing' if have is None else f'{have} rows'} but the finished run "
            f"logged {want}, and no checkpoint holds them; the record is incomplete (rerun it "
            "under another name, or delete the directory)")
    MetricsWriter(path, [tuple(r) for r in rows]).close()
    note = (f"{path.name} had {'gone missing' if have is None else f'{have} of {want} rows'}; "
            f"restored from {loaded.path.name}")
    atomic_write_json(run_dir / "summary.json",
                      {**summary, "notes": [*(summary.get("notes") or []), note]})
    return [note]


def prune_checkpoints(run_dir: Path, dry_run: bool = False) -> int:
    """Delete ``ckpt/`` of a finished run (ok / diverged) whose record is whole; the bytes freed
    (0 when the run is unfinished, has no checkpoints, or another process holds it).

    The record is checked (:func:`verify_finished`, which first restores missing metric rows
    from the final checkpoint) under the run's lock, so a live run is never touched. Afterwards
    a later loss of ``metrics.csv`` rows can no longer be repaired from a checkpoint."""
    import shutil

    ckpt = run_dir / "ckpt"
    try:
        summary = read_summary(run_dir)
    except UnreadableRecord:
        return 0
    if summary is None or summary.get("status") not in OUTCOMES or not ckpt.is_dir():
        return 0
    try:
        with RunLock(run_dir):
            verify_finished(run_dir, summary)
            size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
            if not dry_run:
                shutil.rmtree(ckpt)
            return size
    except (RunLocked, UnreadableRecord):
        return 0
