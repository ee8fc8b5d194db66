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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_LOCKED = 0, 1, 2, 3, 4


class UserError(Exception):
    """An error the user can fix: entry points print its message (no traceback) and exit with
    :attr:`exit_code`."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(UserError, ValueError):
    """An invalid config value; the message is one line naming the key, value and valid range."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        shown = repr(value) if isinstance(value, str) else str(value)
        super().__init__(f"{key}={shown}: {expected}")
        self.key = key


class DatasetMissing(UserError, FileNotFoundError):
    """A dataset is not on disk; the message names the files expected and where."""

    def __init__(self, dataset: str, directory: Path, files: Sequence[str], hint: str = "") -> None:
        listing = "\n".join(f"  - {directory / f}" for f in files)
        msg = (
            f"dataset '{dataset}' not found. Expected these files:\n{listing}\n"
            f"Put them there, or point the data directory elsewhere with "
            f"`paths.data_dir=/path/to/data` (or the PISA_DATA_DIR environment variable)."
        )
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)


def exit_code(statuses: Iterable[str]) -> int:
    """The exit code for runs that ended with ``statuses`` (the worst one wins)."""
    statuses = list(statuses)
    if "failed" in statuses:
        return EXIT_FAILED
    # "skipped": a torchrun rank whose rank 0 found the run finished (an outcome)
    if any(s not in ("ok", "diverged", "skipped") for s in statuses):
        return EXIT_INTERRUPTED
    return EXIT_OK


@contextlib.contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """Turn the errors a user can fix into ``error: <message>`` on stderr and an exit code
    (``debug``: re-raise them, traceback and all). Other exceptions propagate (a bug)."""
    try:
        yield
    except Exception as e:
        code = e.exit_code if isinstance(e, UserError) else (
            EXIT_FAILED if isinstance(e, OSError) else None)
        if code is None or debug:
            raise
        msg = f"{e.strerror or e}: {e.filename}" if isinstance(e, OSError) and e.filename else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(code)
