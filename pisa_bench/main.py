"""Execute one run from a resolved config: the body of ``run.py`` (and of in-process tests)."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from pisa_bench.checkpoints import CheckpointStore, Loaded
from pisa_bench.record import RunExists, RunRecord, check_identity, run_dir_for, verify_finished
from pisa_bench.rundir import OUTCOMES, UnreadableRecord, read_summary
from pisa_bench.runtime import Dist, init_distributed, pick_device, seed_everything
from pisa_bench.tasks import build_task
from pisa_bench.trainer import Diverged, Preempted, Trainer
from pisa_bench.validate import validate

log = logging.getLogger("pisa-bench")


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg`` into its run directory and return its summary.

    A finished run (status ok or diverged) is never redone: with ``run.if_exists=resume``
    (default) it is skipped, said so, and its summary returned. Anything else continues from the
    newest checkpoint that loads (see :mod:`pisa_bench.record`). Divergence and preemption end
    the run with status ``diverged`` / ``preempted``; any other error is recorded as ``failed``
    (retried by the next invocation) and raised.
    """
    validate(cfg)  # before anything else, and before the run directory exists
    d = init_distributed(str(cfg.train.device))
    device = pick_device(str(cfg.train.device), d)
    seed_everything(int(cfg.seed))
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    run_dir = run_dir_for(cfg)
    task = build_task(cfg, device)
    lock, finished = None, None
    if d.is_main:
        lock = RunRecord.claim(cfg)
        try:
            finished = _finished_summary(cfg, run_dir, str(device))
            if finished is None:
                check_identity(run_dir, cfg)
        except BaseException:
            lock.release()
            raise
    if _skip_on_every_rank(finished is not None, d, device):
        if lock is not None:
            lock.release()
        return finished if finished is not None else {"status": "skipped"}
    store = CheckpointStore(run_dir, d.rank)
    store.clean()
    loaded, notes = store.load(map_location=device)
    loaded, notes = _agree_across_ranks(store, loaded, notes, d, device)
    record = None
    if d.is_main:
        record = RunRecord.open(cfg, str(device), loaded, notes, lock)
        log.info("run directory: %s (%s)", run_dir,
                 f"resumed at step {loaded.step}" if loaded else "started at step 0")
        record.update(
            metric=task.metric,
            metric_split=task.metric_split,
            lower_is_better=task.lower_is_better,
            target=task.target,
        )
    sinks = []
    trainer = Trainer(cfg, task, record, run_dir, device, d, resume=loaded)
    try:
        task.setup()
        if record is not None:
            from pisa_bench.loggers import make_sinks

            sinks = make_sinks(cfg, run_dir)
        trainer.extra_loggers = sinks
        with trainer:
            task.run(trainer)
        status, error = "ok", None
    except Diverged as e:
        log.warning("diverged: %s", e)
        status, error = "diverged", str(e)
        if record is not None:
            record.update(diverged_step=e.step)
    except (Preempted, KeyboardInterrupt, SystemExit) as e:
        log.warning("preempted: %s", e)
        status, error = "preempted", None
    except BaseException as e:
        if record is not None:
            _close_failed(record, trainer, task, e)
        raise
    finally:
        for s in sinks:
            s.close()
    if record is None:
        return {"status": status}
    if status != "ok":
        trainer.write_resources()
        trainer.write_progress()
    notes = list(record.summary.get("notes") or [])
    record.update(notes=notes + [n for n in task.notes if n not in notes])
    summary = record.close(status, error)
    log.info(
        "status %s; %s=%s (best %s)",
        status,
        summary["metric"],
        summary["final_metric"],
        summary["best_metric"],
    )
    return summary


def _finished_summary(cfg: DictConfig, run_dir: Any, device: str) -> dict[str, Any] | None:
    """The summary of a finished run to skip (its record checked, restored if need be); None
    when the run is to be started or continued. Refuses a finished run under
    ``run.if_exists=refuse``."""
    try:
        summary = read_summary(run_dir)
    except UnreadableRecord:
        return None  # recovered from the checkpoint (RunRecord.open says so)
    if summary is None or summary.get("status") not in OUTCOMES:
        return None
    if cfg.run.if_exists != "resume":
        raise RunExists.finished(run_dir, str(summary["status"]))
    for note in verify_finished(run_dir, summary, device):
        log.warning("%s: %s", run_dir, note)
    log.info("skipping %s: finished earlier (status %s, %s=%s)", run_dir, summary["status"],
             summary.get("metric"), summary.get("final_metric"))
    return summary


def _skip_on_every_rank(skip: bool, d: Dist, device: torch.device) -> bool:
    """Rank 0's decision to skip a finished run, told to every torchrun rank."""
    if d.world == 1:
        return skip
    flag = torch.tensor([int(skip)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _agree_across_ranks(
    store: CheckpointStore, loaded: Loaded | None, notes: list[str], d: Dist,
    device: torch.device,
) -> tuple[Loaded | None, list[str]]:
    """Under torchrun, continue from the newest step every rank can load (or all from 0)."""
    if d.world == 1:
        return loaded, notes
    step = torch.tensor([loaded.step if loaded else -1], dtype=torch.int64, device=device)
    dist.all_reduce(step, op=dist.ReduceOp.MIN)
    agreed = int(step.item())
    if agreed < 0:
        return None, notes + (["another rank had no loadable checkpoint"] if loaded else [])
    if loaded is None or loaded.step != agreed:
        loaded, more = store.load(map_location=device, max_step=agreed)
        notes = notes + more
    ok = torch.tensor([int(loaded is not None and loaded.step == agreed)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not int(ok.item()):
        return None, [*notes, f"the ranks hold no common checkpoint (step {agreed})"]
    return loaded, notes


def _close_failed(record: RunRecord, trainer: Trainer, task: Any, e: BaseException) -> None:
    """Record a failed attempt as far as the disk allows (a full disk may refuse even that:
    then the run stays 'running' and the next invocation continues it all the same)."""
    try:
        trainer.write_progress()
        record.update(notes=[*(record.summary.get("notes") or []), *task.notes])
        record.close("failed", "".join(traceback.format_exception_only(type(e), e)).strip())
    except OSError as io:
        log.error("could not record the failure in %s: %s", record.dir, io)
        record.lock.release()
