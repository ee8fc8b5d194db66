"""ImageNet classification with torchvision's ResNet-18 and ImageFolder loaders (GPU machines only).

Data: ``<data_dir>/imagenet/{train,val}/<wnid>/*.JPEG`` (the ImageFolder layout of the PyTorch
ImageNet example; the validation images sorted into class folders). Transforms as that example and
the paper's script: train RandomResizedCrop(224) + horizontal flip, val Resize(256) +
CenterCrop(224), normalised with the ImageNet mean/std. Primary metric: top-1 accuracy (%) on val.

torchvision is an optional extra (``pip install -e .[vision]`` on a machine with a CUDA torch) and
is imported only here, lazily. With ``task.data.synthetic: true`` (the smoke scale) the task is
:class:`~pisa_bench.tasks.vision.ImageClassification` on synthetic images with the in-project
model the config names, so it runs on a CPU machine without torchvision.

Determinism: the sample order comes from the ``(seed, epoch)`` generator, and the random
transforms of the image at position ``k`` of an epoch run under the torch RNG seeded with
``base + k`` (``base`` drawn from the same generator; :class:`SeededSubset`), so the augmentation is
fixed by ``(seed, epoch, k)`` whatever ``data.workers`` is. A resume starts the epoch's loader at
the first batch not done (``train_batches(epoch, start)``): the images before are not read. Under
torchrun every rank loads the whole global batch and keeps its share (the trainer's split), which
wastes decoding on the other ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pisa_bench.errors import DatasetMissing
from pisa_bench.models import build_model
from pisa_bench.runtime import epoch_generator
from pisa_bench.tasks.vision import ImageClassification

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def import_torchvision() -> Any:
    """``torchvision``, or an error that says how to get a working one."""
    try:
        import torchvision
    except Exception as e:  # missing, or a wheel built against another torch
        raise ImportError(
            "this task needs torchvision (ImageNet loaders and models), which is missing or does "
            f"not import here ({type(e).__name__}: {e}). Install the optional extra on a machine "
            "with a CUDA build of torch: `pip install -e .[vision]`. (On CPU-only machines the "
            "torchvision wheel is built against CUDA torch and breaks `import transformers`; "
            "run this task's smoke scale there instead.)"
        ) from e
    return torchvision


class Headed(nn.Module):
    """``body`` with its output layer moved to ``classifier`` (excluded by routing)."""

    def __init__(self, body: nn.Module, head: str) -> None:
        super().__init__()
        self.classifier = getattr(body, head)
        setattr(body, head, nn.Identity())
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's ImageNet ResNet-18 (7x7 stem + max-pool), randomly initialised; its ``fc``
    head is exposed as ``classifier`` (same layers, same parameters)."""
    return Headed(import_torchvision().models.resnet18(weights=None, num_classes=num_classes), "fc")


class SeededSubset(torch.utils.data.Dataset):
    """``dataset[indices[k]]`` with the torch RNG seeded ``base + k`` for its transforms (the
    caller's RNG state is restored afterwards, in the main process and in loader workers alike)."""

    def __init__(self, dataset: Any, indices: list[int], base: int, offset: int = 0) -> None:
        self.dataset, self.indices, self.base, self.offset = dataset, indices, base, offset

    def __len__(self) -> int:
        return len(self.indices) - self.offset

    def __getitem__(self, k: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.base + self.offset + k)
            return self.dataset[self.indices[self.offset + k]]


class ImageNetClassification(ImageClassification):
    """ResNet-18 on ImageNet-1k from ImageFolder directories; synthetic data at smoke scale."""

    @classmethod
    def accepted_data_keys(cls, data: DictConfig) -> frozenset[str]:
        from pisa_bench.data.images import LOADER_KEYS

        own = {"name", "synthetic", "train_per_class", "crop", "resize", "workers", "augment"}
        own |= {"shape", "num_classes"}  # describe the synthetic stand-in (smoke scale)
        return frozenset(own | (LOADER_KEYS["synthetic"] if data.get("synthetic") else set()))

    def _synthetic(self) -> bool:
        return bool(self.tcfg.data.get("synthetic"))

    def setup(self) -> None:
        if self._synthetic():
            super().setup()
            return
        tv = import_torchvision()
        from torchvision import transforms as T

        root = self.data_dir / "imagenet"
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise DatasetMissing(
                "imagenet", root, ["train/<wnid>/*.JPEG", "val/<wnid>/*.JPEG"],
                hint="The validation images must be sorted into class folders (e.g. with the "
                     "valprep.sh script of the PyTorch ImageNet example).",
            )
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        dcfg = self.tcfg.data
        self.train_set = tv.datasets.ImageFolder(str(root / "train"), T.Compose([
            T.RandomResizedCrop(int(dcfg.crop)), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
        self.val_set = tv.datasets.ImageFolder(str(root / "val"), T.Compose([
            T.Resize(int(dcfg.resize)), T.CenterCrop(int(dcfg.crop)), T.ToTensor(), norm]))
        self.num_classes = len(self.train_set.classes)
        self.train_index = self._per_class(self.train_set.targets, dcfg.get("train_per_class"))
        if len(self.train_index) < len(self.train_set):
            self.notes.append(f"ImageNet trained on {len(self.train_index)} images "
                              f"({dcfg.train_per_class} per class)")

    @staticmethod
    def _per_class(targets: list[int], k: int | None) -> torch.Tensor:
        """Indices of the first ``k`` images of every class (all with ``k=None``)."""
        t = torch.tensor(targets)
        if k is None:
            return torch.arange(len(t))
        keep = [torch.nonzero(t == c).flatten()[: int(k)] for c in t.unique()]
        return torch.cat(keep).sort().values

    def build_model(self) -> nn.Module:
        if self._synthetic():
            return super().build_model()
        return build_model(self.tcfg.model, num_classes=self.num_classes)

    def _loader(self, dataset: Any, batch_size: int, drop_last: bool,
                generator: torch.Generator | None) -> torch.utils.data.DataLoader:
        """In order; ``generator``: what the loader draws its worker seeds from (not the global
        RNG; the transforms' randomness is :class:`SeededSubset`'s)."""
        w = int(self.tcfg.data.workers)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last, num_workers=w,
            pin_memory=self.device.type == "cuda", generator=generator,
        )

    def steps_per_epoch(self) -> int:
        if self._synthetic():
            return super().steps_per_epoch()
        return max(len(self.train_index) // int(self.cfg.train.batch_size), 1)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        if self._synthetic():
            yield from super().train_batches(epoch, start)
            return
        g = epoch_generator(self.seed, epoch)
        order = self.train_index[torch.randperm(len(self.train_index), generator=g)]
        base = int(torch.randint(0, 2**62, (1,), generator=g))
        bs = int(self.cfg.train.batch_size)
        subset = SeededSubset(self.train_set, order.tolist(), base, offset=start * bs)
        yield from self._loader(subset, bs, True, g)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self._synthetic():
            return super().evaluate(model)
        loader = self._loader(self.val_set, int(self.cfg.train.eval_batch_size), False, None)
        top1 = top5 = 0
        loss_sum, n = 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += int((best5[:, 0] == y).sum())
            top5 += int((best5 == y[:, None]).any(1).sum())
            n += len(y)
        return {"accuracy": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss_sum / n}
