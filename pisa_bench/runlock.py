"""One process per run: an exclusive ``flock`` on ``<run_dir>/.lock``.

The kernel releases the lock when its holder dies, however it dies (``kill -9``, OOM, a lost
node's process on a local filesystem), so a lock is never stale in the sense of blocking; the
file's content (pid, host, start time, command) tells who holds it, and who held it last when
a new process takes it over.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("pisa-bench")


class RunLocked(RuntimeError):
    """Another live process holds the run."""


class RunLock:
    """``with RunLock(run_dir, wait_s=0):`` holds the run or raises :class:`RunLocked`.

    ``wait_s``: how long to wait for the holder to finish (0: refuse at once).
    :attr:`previous` is the content left by the last holder when it did not release the lock
    cleanly (it died), else None.
    """

    def __init__(self, run_dir: Path, wait_s: float = 0.0) -> None:
        self.path = Path(run_dir) / ".lock"
        self.wait_s = float(wait_s)
        self.previous: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read(fd)
                    os.close(fd)
                    raise RunLocked(
                        f"{self.path.parent} is being run by another process ({_who(holder)}); "
                        "wait for it, or pass run.lock_wait_s=<seconds> to wait"
                    ) from None
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))
        left = _read(fd)
        if left.get("pid") is not None:  # a holder that exits cleanly empties the file
            self.previous = left
            log.warning("taking over %s from a process that died (%s)", self.path, _who(left))
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # a clean exit: nothing to take over
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        out = json.loads(raw) if raw.strip() else {}
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _who(info: dict[str, Any]) -> str:
    if not info:
        return "unknown holder"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, started {info.get('start_time')}: "
        f"{info.get('command')}"
    )
