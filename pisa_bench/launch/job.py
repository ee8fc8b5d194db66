"""The task function of ``run.py`` and of every launched job: one run under the process's stop
request, with SLURM's time-limit signal turned into a checkpoint and a requeue."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from omegaconf import DictConfig

from pisa_bench import stop
from pisa_bench.record import run_dir_for

log = logging.getLogger("pisa-bench")


def _export_torch_distributed() -> None:
    """In a multi-task submitit job (``hydra.launcher.nodes`` x ``tasks_per_node`` > 1: one task
    per GPU), export the torchrun variables that :func:`pisa_bench.runtime.init_distributed`
    reads: RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID (the GPU of the node the task uses; the
    tasks of a node share its GPUs), WORLD_SIZE = SLURM_NTASKS, MASTER_ADDR = the job's first
    node, MASTER_PORT = the environment's if set (the same on every node), else one drawn from the
    job id. Existing MASTER_* values are replaced by these (submitit would refuse them)."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "WORLD_SIZE" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True)


#: Final statuses of the jobs this process ran (run.py's exit code is derived from them).
JOB_STATUSES: list[str] = []


def job_entry(cfg: DictConfig) -> dict[str, Any]:
    """Task function of run.py and of launcher jobs: :func:`pisa_bench.main.execute` under the
    process's stop request (:mod:`pisa_bench.stop`).

    SIGINT / SIGTERM ask the running job to checkpoint and stop, and a local sweep (``run.py
    -m``: jobs one after the other in this process) to launch nothing more: each later job
    returns ``{"status": "not started"}`` at once; the same command resumes the sweep.

    SLURM sends SIGUSR2 ``signal_delay_s`` before a job's time limit; submitit's own handler
    would requeue at once, killing the training mid-step. Here USR2 sets the stop request as well
    (checkpoint at the end of the step, status ``preempted``); once execute() has returned,
    submitit's handler requeues the job, which resumes the run from ``ckpt/``.
    """
    from pisa_bench.main import execute

    _export_torch_distributed()
    if stop.STOP.is_set():
        log.warning("not started (this process was asked to stop): %s", run_dir_for(cfg))
        JOB_STATUSES.append("not started")
        return {"status": "not started"}
    if threading.current_thread() is not threading.main_thread():
        return execute(cfg)
    asked: list[Any] = []
    previous = signal.getsignal(signal.SIGUSR2)

    def on_usr2(signum: int, frame: Any) -> None:
        log.warning("signal %d (time limit / preemption): checkpointing, then requeueing", signum)
        asked.append(frame)
        stop.STOP.set()

    signal.signal(signal.SIGUSR2, on_usr2)
    status = "failed"
    try:
        with stop.handle_signals():
            summary = execute(cfg)
        status = str(summary.get("status"))
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(run_dir_for(cfg))) from e  # name the run
    finally:
        signal.signal(signal.SIGUSR2, previous)
        JOB_STATUSES.append(status)
    if asked and summary.get("status") == "preempted" and callable(previous):
        previous(signal.SIGUSR2, asked[0])  # submitit: requeue (or give up) and exit
    return summary
