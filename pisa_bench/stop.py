"""The process's stop request: one Event that the trainer, the job entry and sweeps read.

SIGINT / SIGTERM (and, in launcher jobs, SLURM's SIGUSR2 before a time limit) set it; the trainer
checkpoints at the end of its current step and ends the run as ``preempted``; a local sweep
launches nothing more. A second SIGINT / SIGTERM stops at once (``KeyboardInterrupt``), except
inside a checkpoint write, which is finished first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("pisa-bench")

STOP = threading.Event()
_state = {"critical": 0, "interrupt_after": False}


def request_stop(signum: int, frame: Any = None) -> None:
    """Signal handler: the first signal asks for a stop, a second one interrupts."""
    if STOP.is_set() and signum in (signal.SIGINT, signal.SIGTERM):
        if _state["critical"]:
            log.warning("signal %d: finishing the checkpoint being written, then stopping",
                        signum)
            _state["interrupt_after"] = True
            return
        raise KeyboardInterrupt
    log.warning("signal %d: checkpointing at the end of this step, then stopping", signum)
    STOP.set()


@contextlib.contextmanager
def handle_signals(*signums: int) -> Iterator[None]:
    """Route ``signums`` (default SIGINT, SIGTERM) to :func:`request_stop` while inside."""
    old: dict[int, Any] = {}
    for sig in signums or (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            old[sig] = signal.signal(sig, request_stop)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A section (a checkpoint write) that a second signal does not interrupt."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
        if not _state["critical"] and _state["interrupt_after"]:
            _state["interrupt_after"] = False
            raise KeyboardInterrupt


def reset() -> None:
    """Forget a stop request (tests that run several jobs in one process)."""
    STOP.clear()
    _state.update(critical=0, interrupt_after=False)
