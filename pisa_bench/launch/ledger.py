"""The in-flight ledger: which run directories a live launcher process is running.

A launcher claims its points before starting them (``<out_dir>/runs/<name>/.inflight/
<host>-<pid>.json``, written atomically) and removes the claim when they end; a second
command plans the same sweep, sees the claim, and skips those runs instead of starting them
twice. A claim whose process is dead (same host) is stale and removed on reading. The run
lock (:mod:`pisa_bench.runlock`) is what makes two processes on one run impossible; the
ledger only keeps launchers from queueing runs that are already in hand.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pisa_bench.rundir import atomic_write_json, read_json

if TYPE_CHECKING:
    from pisa_bench.launch.plan import Plan, Point

INFLIGHT_DIR = ".inflight"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_in_flight(runs_root: Path) -> dict[Path, dict[str, Any]]:
    """Run dirs claimed by live launchers (stale entries of dead processes are removed)."""
    out: dict[Path, dict[str, Any]] = {}
    d = runs_root / INFLIGHT_DIR
    if not d.is_dir():
        return out
    for f in sorted(d.glob("*.json")):
        try:
            entry = read_json(f)
        except (OSError, ValueError):
            continue
        if entry.get("host") == socket.gethostname() and not _pid_alive(int(entry.get("pid", -1))):
            f.unlink(missing_ok=True)  # its launcher is gone: its runs are fair game again
            continue
        if entry.get("pid") == os.getpid() and entry.get("host") == socket.gethostname():
            continue
        for r in entry.get("run_dirs", []):
            out[Path(r)] = {**entry, "ledger": str(f)}
    return out


def claim(plan_: Plan, points: Sequence[Point], pid: int | None = None, **info: Any) -> Path:
    """Write the ledger entry saying that process ``pid`` (default: this one) runs ``points``."""
    pid = os.getpid() if pid is None else pid
    d = plan_.runs_root / INFLIGHT_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{socket.gethostname()}-{pid}.json"
    atomic_write_json(path, {
        "pid": pid, "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), **info,
        "run_dirs": [str(p.run_dir) for p in points],
    })
    return path


@contextmanager
def in_flight(plan_: Plan, points: Sequence[Point], **info: Any) -> Iterator[Path]:
    """Claim ``points`` for this process while it launches / waits for them."""
    path = claim(plan_, points, **info)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


