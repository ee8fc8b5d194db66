"""Task classes, selected by a task config's ``cls`` key (``module:Class``)."""

from __future__ import annotations

import importlib

import torch
from omegaconf import DictConfig

from pisa_bench.errors import DatasetMissing
from pisa_bench.tasks.base import Task

__all__ = ["DatasetMissing", "Task", "build_task"]


def build_task(cfg: DictConfig, device: torch.device) -> Task:
    """Instantiate ``cfg.task.cls`` on the whole config."""
    module, name = str(cfg.task.cls).split(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"task.cls={cfg.task.cls} is not a Task subclass")
    return cls(cfg, device)
