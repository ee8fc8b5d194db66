"""Errors a user can fix, and how entry points report them: one line, a meaningful exit code.

Exit codes of ``run.py`` and ``scripts/*.py``:

====  ===========================================================================
0     every run has its outcome (ok or diverged)
1     a run failed (recorded as ``failed``; the next invocation retries it), or an I/O error
2     bad input: a config value, a missing dataset or file, a run directory of another run
3     a run was preempted or not started (rerun the same command to resume)
4     another process holds a run
====  ===========================================================================
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_LOCKED = 0, 1, 2, 3, 4


def exit_code(statuses: Iterable[str]) -> int:
    """The exit code for runs that ended with ``statuses`` (the worst one wins)."""
    statuses = list(statuses)
    if any(s in ("failed", "unreadable") for s in statuses):
        return EXIT_FAILED
    if any(s not in ("ok", "diverged") for s in statuses):
        return EXIT_INTERRUPTED
    return EXIT_OK


def _code(e: BaseException) -> int | None:
    from experiments.record import RunExists, RunLockedError
    from experiments.rundir import UnreadableRecord
    from experiments.tasks.base import DatasetMissing
    from experiments.validate import ConfigError

    if isinstance(e, RunLockedError):
        return EXIT_LOCKED
    if isinstance(e, (ConfigError, DatasetMissing, RunExists, UnreadableRecord)):
        return EXIT_BAD_INPUT
    if isinstance(e, OSError):
        return EXIT_FAILED
    return None


@contextlib.contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """Turn the errors a user can fix into ``error: <message>`` on stderr and an exit code
    (``debug``: re-raise them, traceback and all). Other exceptions propagate (a bug)."""
    try:
        yield
    except Exception as e:
        code = _code(e)
        if code is None or debug:
            raise
        msg = f"{e.strerror or e}: {e.filename}" if isinstance(e, OSError) and e.filename else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(code)
