"""Execute one run from a resolved config: the body of ``run.py`` (and of in-process tests)."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import torch
from omegaconf import DictConfig

from experiments.record import RunExists, RunRecord, run_dir_for
from experiments.rundir import read_json
from experiments.runtime import init_distributed, pick_device, seed_everything
from experiments.tasks import build_task
from experiments.trainer import Diverged, Preempted, Trainer
from experiments.validate import validate

log = logging.getLogger("pisa-bench")


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg`` into its run directory and return its summary.

    A finished run is never redone: with ``run.if_exists=resume`` (default) its summary is
    returned as is; an unfinished one resumes from its checkpoint. Divergence and preemption
    end the run with status ``diverged`` / ``preempted``; any other error is recorded as
    ``failed`` and raised.
    """
    validate(cfg)  # before anything else, and before the run directory exists
    d = init_distributed(str(cfg.train.device))
    device = pick_device(str(cfg.train.device), d)
    seed_everything(int(cfg.seed))
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    run_dir = run_dir_for(cfg)
    task = build_task(cfg, device)
    record = None
    if d.is_main:
        try:
            record = RunRecord.open(cfg, str(device))
        except RunExists as e:
            if cfg.run.if_exists == "resume" and (run_dir / "summary.json").exists():
                log.info("skipping: %s", e)
                return read_json(run_dir / "summary.json")
            raise
        log.info("run directory: %s", run_dir)
        record.update(
            metric=task.metric,
            metric_split=task.metric_split,
            lower_is_better=task.lower_is_better,
            target=task.target,
        )
    sinks = []
    trainer = Trainer(cfg, task, record, run_dir, device, d)
    try:
        task.setup()
        if record is not None:
            from experiments.loggers import make_sinks

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
            trainer.write_progress()
            record.update(notes=[*(record.summary.get("notes") or []), *task.notes])
            record.close("failed", "".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    finally:
        for s in sinks:
            s.close()
    if record is None:
        return {"status": status}
    if status != "ok":
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
