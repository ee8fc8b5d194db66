"""Shared fixtures: compose configs in-process and run them into a temporary output directory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pisa_bench.config import compose_config
from pisa_bench.main import execute


@pytest.fixture
def run_cfg(tmp_path: Path) -> Callable[..., tuple[dict[str, Any], Path]]:
    """``run_cfg(overrides)`` -> (summary, run_dir), runs written under ``tmp_path``."""

    def _run(overrides: Sequence[str]) -> tuple[dict[str, Any], Path]:
        from pisa_bench.record import run_dir_for

        cfg = compose_config([f"paths.out_dir={tmp_path}", *overrides])
        summary = execute(cfg)
        return summary, run_dir_for(cfg)

    return _run


@pytest.fixture
def preempt_and_resume(run_cfg, tmp_path: Path) -> Callable[..., tuple[dict, dict, dict, Path]]:
    """``preempt_and_resume(overrides, at=2)`` -> (uninterrupted summary, summary of the run
    preempted at step ``at``, summary of that run resumed to the end, its run directory)."""

    def _run(overrides: Sequence[str], at: int = 2) -> tuple[dict, dict, dict, Path]:
        full, _ = run_cfg([*overrides, f"run.dir={tmp_path / 'full'}"])
        cut = [*overrides, f"run.dir={tmp_path / 'cut'}"]
        first, _ = run_cfg([*cut, f"train.preempt_at_step={at}"])
        second, cut_dir = run_cfg(cut)
        return full, first, second, cut_dir

    return _run


@pytest.fixture(autouse=True)
def _fresh_stop_request() -> None:
    """A signal a test sent to this process must not stop the runs of later tests."""
    from pisa_bench import stop

    stop.reset()


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logging.getLogger("pisa-bench").setLevel(logging.WARNING)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Smoke-size tensors run fastest on one thread (and shared CI cores stay responsive)."""
    import torch

    torch.set_num_threads(1)
