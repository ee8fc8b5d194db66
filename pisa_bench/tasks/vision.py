"""Image classification on in-memory datasets (MNIST family, CIFAR-10), primary metric accuracy (%).

Batches are drawn without replacement in an order fixed by ``(seed, epoch)``; augmentation
(``data.augment``: random crop with ``pad`` pixels of zero padding and horizontal flip, as the
CIFAR recipes) uses the same per-epoch generator, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pisa_bench.data.images import ImageData, image_data_keys, load_images
from pisa_bench.data.split import carve_validation
from pisa_bench.models import build_model
from pisa_bench.runtime import epoch_generator
from pisa_bench.tasks.base import Task


def augment_draws(
    n: int, pad: int, flip: bool, g: torch.Generator
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The random draws of :func:`augment` for ``n`` images, in its order: crop offsets
    ``(dy, dx)`` (with ``pad``) and the flip mask (with ``flip``). A skipped batch makes them
    alone, so that the batches after it see the same generator state."""
    dy = dx = mask = None
    if pad:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    if flip:
        mask = torch.rand(n, generator=g) < 0.5
    return dy, dx, mask


def augment(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and random horizontal flip (uint8 batch)."""
    n, _, h, w = x.shape
    dy, dx, mask = augment_draws(n, pad, flip, g)
    if dy is not None and dx is not None:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(x.shape[1])[None, :, None, None],
            rows,
            cols,
        ]
    if mask is not None:
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class ImageClassification(Task):
    """Cross-entropy training, accuracy and loss on the test split."""

    data: ImageData

    @classmethod
    def accepted_data_keys(cls, data: DictConfig) -> frozenset[str]:
        return image_data_keys(data) | {"augment", "val_fraction"}

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.label_smoothing = float(self.tcfg.get("label_smoothing", 0.0))  # read once

    def setup(self) -> None:
        self.data = load_images(self.tcfg.data, self.data_dir)
        if self.data.note:
            self.notes.append(self.data.note)
        d = self.data  # task.data.val_fraction: held-out share of train (model selection)
        d.train_x, d.train_y, self.val_x, self.val_y = carve_validation(
            d.train_x, d.train_y, self.tcfg.data.get("val_fraction"))
        if self.val_x is not None:
            self.notes.append(f"validation split: {len(self.val_y)} of the training images "
                              f"held out (val_accuracy / val_loss)")
        self.mean = torch.tensor(self.data.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(self.data.std).view(1, -1, 1, 1)

    def build_model(self) -> nn.Module:
        x = self.data.train_x
        return build_model(
            self.tcfg.model,
            in_channels=x.shape[1],
            num_classes=self.data.num_classes,
            image_size=x.shape[-1],
        )

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def steps_per_epoch(self) -> int:
        return max(len(self.data.train_x) // int(self.cfg.train.batch_size), 1)

    def train_batches(
        self, epoch: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.seed, epoch)
        n, bs = len(self.data.train_x), int(self.cfg.train.batch_size)
        bs = min(bs, n)
        perm = torch.randperm(n, generator=g)
        aug = self.tcfg.data.get("augment") or {}
        for i in range(self.steps_per_epoch()):
            idx = perm[i * bs : (i + 1) * bs]
            if i < start:  # skipped: only its augmentation draws, to keep the generator's state
                if aug:
                    augment_draws(len(idx), int(aug.get("pad", 0)), bool(aug.get("flip", False)), g)
                continue
            x = self.data.train_x[idx]
            if aug:
                x = augment(x, int(aug.get("pad", 0)), bool(aug.get("flip", False)), g)
            yield self._normalise(x), self.data.train_y[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``accuracy`` / ``loss`` on test and, with a validation split, ``val_accuracy`` /
        ``val_loss`` on it."""
        out = self._scores(model, self.data.test_x, self.data.test_y)
        if self.val_x is not None:
            val = self._scores(model, self.val_x, self.val_y)
            out.update({f"val_{k}": v for k, v in val.items()})
        return out

    def _scores(self, model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, float]:
        bs = int(self.cfg.train.eval_batch_size)
        correct, loss_sum, n = 0, 0.0, len(xs)
        for i in range(0, n, bs):
            x = self._normalise(xs[i : i + bs]).to(self.device)
            y = ys[i : i + bs].to(self.device)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return {"accuracy": 100.0 * correct / n, "loss": loss_sum / n}
