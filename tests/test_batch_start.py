"""Resume without re-iterating: ``train_batches(epoch, start)`` starts at batch ``start`` directly.

Every task that iterates a dataset gives ``list(train_batches(e))[start:]`` exactly, without
producing (indexing, augmenting, decoding) the batches before; the trainer asks for its resume
position. (Exactness of whole resumed runs: the resume tests of each task.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pisa_bench.config import compose_config
from pisa_bench.runtime import Dist
from pisa_bench.tasks import build_task
from pisa_bench.tasks.base import Task
from pisa_bench.trainer import Trainer

START = 2


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _task(name: str, *extra: str) -> Task:
    cfg = compose_config([f"task={name}", "scale=smoke", *extra])
    task = build_task(cfg, torch.device("cpu"))
    task.setup()
    return task


def _counting(obj: Any, attr: str) -> tuple[list[int], Any]:
    """Count the calls of ``obj.attr`` (a method); returns the count list and an undo."""
    calls: list[int] = []
    inner = getattr(obj, attr)

    def wrapper(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return inner(*a, **k)

    setattr(obj, attr, wrapper)
    return calls, lambda: delattr(obj, attr)


# (task, overrides, the per-batch work to count: (attribute path on the task, method) or None)
CASES = [
    ("vgg11_cifar10", ["task.data.n_train=48", "train.batch_size=8"], ("", "_normalise")),
    ("quickstart_mnist", ["train.batch_size=8"], ("", "_normalise")),
    ("gpt2", ["train.batch_size=4"], ("train_windows", "batch")),
    ("gpt2_finetune", ["train.batch_size=4"], None),
    ("lstm1_ptb", ["train.batch_size=4"], None),
    ("wgan_cifar10", ["train.batch_size=8"], ("", "to_input")),
]


@pytest.mark.parametrize(("name", "extra", "work"), CASES, ids=[c[0] for c in CASES])
def test_start_gives_the_tail_of_the_epoch_without_producing_the_head(
    name: str, extra: list[str], work: tuple[str, str] | None
) -> None:
    task = _task(name, *extra)
    spe = task.steps_per_epoch()
    assert spe > START + 1, f"{name}: smoke epoch too short for this test ({spe} batches)"
    for epoch in (0, 1):
        whole = list(task.train_batches(epoch))
        assert len(whole) == spe
        if work is not None:
            calls, undo = _counting(getattr(task, work[0]) if work[0] else task, work[1])
        tail = list(task.train_batches(epoch, START))
        assert len(tail) == spe - START
        assert all(_equal(a, b) for a, b in zip(tail, whole[START:]))
        if work is not None:
            assert len(calls) == spe - START  # the first START batches were not produced
            undo()
    assert list(task.train_batches(0, spe)) == []  # resumed at the end of an epoch


class Counting(Task):
    """Batches 0..n-1 of an epoch as tensors ``[epoch, i]``; records every ``start`` asked."""

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(1, 1)

    def steps_per_epoch(self) -> int:
        return 4

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        self.starts.append((epoch, start))
        for i in range(start, self.steps_per_epoch()):
            yield torch.tensor([epoch, i])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {self.metric: 0.0}


@pytest.mark.parametrize("position", [0, 1, 3, 4])
def test_trainer_batches_start_at_the_resume_position(tmp_path: Path, position: int) -> None:
    cfg = compose_config(["task=quickstart_mnist", "scale=smoke"])
    task = Counting(cfg, torch.device("cpu"))
    task.starts = []
    trainer = Trainer(cfg, task, None, tmp_path, torch.device("cpu"), Dist())
    trainer.epoch, trainer.batch_in_epoch = 2, position  # as load_checkpoint() leaves them
    it = trainer.batches()
    got = [next(it).tolist() for _ in range(6)]
    want = [[e, i] for e in (2, 3, 4) for i in range(4)][position:]
    assert got == want[:6]
    assert task.starts[0] == (2, position)  # the resume position itself, not 0
    assert all(start == 0 for _, start in task.starts[1:])  # later epochs from their start
    done = position + 6  # batches of epoch 2 onwards
    assert (trainer.epoch, trainer.batch_in_epoch) == (2 + (done - 1) // 4, (done - 1) % 4 + 1)


class RandomTransform(torch.utils.data.Dataset):
    """Item i: ``[i, u]``, ``u`` a draw of the global torch RNG (as torchvision's transforms)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), float(torch.rand(()))])


@pytest.mark.parametrize("workers", [0, 2])
def test_imagenet_loader_starts_at_a_batch_with_the_same_augmentation(workers: int) -> None:
    """The ImageFolder path (without torchvision: a dataset whose items draw from the global RNG
    as the transforms do): started at batch 2, the loader reads only the images from there on,
    and every image gets the augmentation it gets in the whole epoch, with 0 or 2 workers."""
    cfg = compose_config(["task=resnet18_imagenet", "scale=smoke", "task.data.synthetic=false",
                          f"task.data.workers={workers}", "train.batch_size=8"])
    task = build_task(cfg, torch.device("cpu"))
    data = RandomTransform()
    task.train_set, task.train_index = data, torch.arange(len(data))
    whole = list(task.train_batches(1))
    assert len(whole) == task.steps_per_epoch() == 5
    rng = torch.get_rng_state()
    tail = list(task.train_batches(1, START))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(tail, whole[START:], strict=True))
    order = torch.cat([b[:, 0] for b in whole])
    assert sorted(order.tolist()) == list(range(40)) and order.tolist() != list(range(40))
    assert not torch.equal(whole[0][:, 1], next(iter(task.train_batches(2)))[:, 1])  # per epoch


def test_imagenet_seeded_subset_reads_only_from_its_start() -> None:
    from pisa_bench.tasks.imagenet import SeededSubset

    reads: list[int] = []

    class Reading(RandomTransform):
        def __getitem__(self, i: int) -> torch.Tensor:
            reads.append(i)
            return super().__getitem__(i)

    order = list(range(39, -1, -1))
    sub = SeededSubset(Reading(), order, base=7, offset=16)
    assert len(sub) == 24
    items = [sub[k] for k in range(len(sub))]
    assert reads == order[16:]
    full = SeededSubset(Reading(), order, base=7)
    assert all(torch.equal(a, full[16 + k]) for k, a in enumerate(items))
