"""What a task is: model, data, loss and evaluation built from its config.

A supervised task implements ``build_model``, ``train_batches``, ``loss`` and ``evaluate`` and
the shared :class:`~pisa_bench.trainer.Trainer` runs it as is. Tasks with their own loop
(GAN: two optimizers; RL: a library's rollout loop; federated: clients and rounds) override
:meth:`Task.run` and use the trainer's services (optimizer construction, logging, timing,
checkpoint/resume, NaN guard, progress bar).

Determinism contract (resume continuity): every random choice a task makes about data
(shuffling, augmentation, synthetic samples, partitions) comes from a ``torch.Generator``
seeded from ``(seed, epoch)``, never from the global RNG, so that a resume continues an epoch at
exactly the same batch: ``train_batches(epoch, start)`` starts at batch ``start`` directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

if TYPE_CHECKING:
    from pisa_bench.trainer import Trainer


class Task(ABC):
    """Base class of every task. ``cfg`` is the whole resolved config; ``cfg.task`` is its own."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.tcfg = cfg.task
        self.device = device
        self.seed = int(cfg.seed)
        self.data_dir = Path(str(cfg.paths.data_dir)).expanduser()
        self.notes: list[str] = []  # plain-language remarks recorded in summary.json

    # --- the primary metric -------------------------------------------------------------
    @property
    def metric(self) -> str:
        return str(self.tcfg.metric.name)

    @property
    def lower_is_better(self) -> bool:
        return bool(self.tcfg.metric.lower_is_better)

    @property
    def metric_split(self) -> str:
        return str(self.tcfg.metric.get("split", "val"))

    @property
    def target(self) -> float | None:
        t = self.tcfg.metric.get("target")
        return None if t is None else float(t)

    @classmethod
    def accepted_data_keys(cls, data: DictConfig) -> frozenset[str] | None:
        """The ``task.data`` keys this task and its loader read for ``data`` (None: unchecked).

        :func:`pisa_bench.validate.validate` refuses any other key before the run starts, so
        that no key is silently ignored. May raise ``ConfigError`` (e.g. an unknown dataset).
        """
        return None

    # --- what a supervised task provides -------------------------------------------------
    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load data (raise :class:`DatasetMissing` when it is absent). Called once."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, on CPU; the trainer moves it to the device."""

    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Any]:
        """One pass over the training data in an order fixed by ``(seed, epoch)``, from batch
        ``start`` on: the same batches as ``list(train_batches(epoch))[start:]``, without
        reading or decoding the ``start`` batches before (how a resume continues an epoch)."""
        raise NotImplementedError(f"{type(self).__name__} has its own loop")

    def steps_per_epoch(self) -> int | None:
        """Batches in one epoch (``None``: unknown / endless stream)."""
        return None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Training loss on a (sub-)batch already on the device."""
        raise NotImplementedError(f"{type(self).__name__} has its own loop")

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Evaluation metrics; must contain :attr:`metric` (on split :attr:`metric_split`)."""

    def split_batch(self, batch: Any, m: int) -> list[Any]:
        """Cut a batch into ``m`` worker sub-batches (default: along dim 0 of every tensor)."""
        return split_along(batch, m, dim=0)

    def count(self, batch: Any) -> int:
        """Samples (or tokens) in a batch, for the ``samples_or_tokens`` axis."""
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(first, dict):
            first = next(iter(first.values()))
        return int(first.shape[0])

    def state_dict(self) -> dict[str, Any]:
        """Task state that a checkpoint must carry (e.g. an LSTM's hidden state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`."""

    # --- custom loops --------------------------------------------------------------------
    def run(self, trainer: Trainer) -> None:
        """Train. Supervised tasks use the shared loop; GAN/RL/federated tasks override."""
        trainer.fit(self)


def split_along(batch: Any, m: int, dim: int = 0) -> list[Any]:
    """Split every tensor of a (nested tuple/list/dict) batch into ``m`` equal-ish chunks.

    Raises ``ValueError`` when the batch has fewer than ``m`` rows along ``dim``.
    """
    if m == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        n = batch.shape[dim]
        if n < m:
            raise ValueError(f"batch of {n} along dim {dim} cannot feed {m} workers")
        return list(torch.tensor_split(batch, m, dim=dim))
    if isinstance(batch, dict):
        parts = {k: split_along(v, m, dim) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(m)]
    if isinstance(batch, (list, tuple)):
        parts = [split_along(v, m, dim) for v in batch]
        return [type(batch)(p[i] for p in parts) for i in range(m)]
    return [batch] * m


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a nested batch to ``device`` (non-blocking)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
