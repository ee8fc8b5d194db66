"""Shared fixtures: compose configs in-process and run them into a temporary output directory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from experiments.config import compose_config
from experiments.main import execute


@pytest.fixture
def run_cfg(tmp_path: Path) -> Callable[..., tuple[dict[str, Any], Path]]:
    """``run_cfg(overrides)`` -> (summary, run_dir), runs written under ``tmp_path``."""

    def _run(overrides: Sequence[str]) -> tuple[dict[str, Any], Path]:
        from experiments.record import run_dir_for

        cfg = compose_config([f"paths.out_dir={tmp_path}", *overrides])
        summary = execute(cfg)
        return summary, run_dir_for(cfg)

    return _run


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logging.getLogger("pisa-bench").setLevel(logging.WARNING)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Smoke-size tensors run fastest on one thread (and shared CI cores stay responsive)."""
    import torch

    torch.set_num_threads(1)
