"""PyTorch Lightning with SISA returned by ``configure_optimizers`` (no change to Lightning).

A small MLP learns a fixed random teacher's 4-class labels. Two ways to place the workers:

* ``automatic`` (Lightning's automatic optimization): Lightning calls
  ``optimizer.step(closure)``, and PISA runs the closure (zero_grad, ``training_step``,
  ``backward``) with gradients enabled before its step, as ``torch.optim`` does. Every batch is one
  worker's local step, so with ``n_workers=m`` each ``m`` consecutive batches form one round, each
  taking its gradient at the same global weights. ``accumulate_grad_batches=k`` accumulates ``k``
  batches into one worker's gradient (a round sees ``m * k`` batches). ``max_steps`` and an
  ``"interval": "step"`` scheduler count ``optimizer.step()`` calls (worker steps); PISA reads
  ``lr`` at a round's first step and holds it for the round, so such a schedule is sampled once
  per round.
* ``manual`` (``automatic_optimization = False``): ``training_step`` cuts its batch into ``m``
  sub-batches and makes the round itself (``manual_backward`` + ``opt.step()`` per worker), then
  steps the scheduler once per round. Lightning's ``global_step`` still counts ``opt.step()``
  calls, so ``max_steps`` is ``m`` per batch.

Not supported: multi-process strategies (``ddp``, ``fsdp``): ``DistributedDataParallel``
averages the gradients in ``backward()`` and would make the ranks' workers one; PISA's first
distributed ``step()`` checks that the ranks' gradients differ and raises if they do not
(``check_distributed``). Plain loops fix it with ``pisa.distributed.prepare`` / ``no_sync``
(``examples/torchrun_workers.py``). One device (``devices=1``, CPU or one GPU) with any ``m`` is
what this example covers.

    python examples/lightning_module.py --workers 4 --rounds 50 --mode automatic
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pisa

IN, CLASSES = 8, 4


def make_data(size: int, seed: int = 0) -> TensorDataset:
    """Inputs ``x ~ N(0, I)`` labelled by the argmax of a fixed random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(size, IN, generator=gen)
    return TensorDataset(x, (x @ teacher).argmax(-1))


def make_loader(batches: int, batch_size: int, seed: int = 0) -> DataLoader:
    """``batches`` shuffled batches (one epoch) of :func:`make_data`."""
    return DataLoader(
        make_data(batches * batch_size, seed), batch_size=batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


class Classifier(L.LightningModule):
    """An MLP trained with SISA; ``mode`` is ``"automatic"`` or ``"manual"`` (module docstring)."""

    def __init__(
        self, n_workers: int = 1, lr: float = 1e-2, mode: str = "automatic", rounds: int = 100
    ) -> None:
        super().__init__()
        if mode not in ("automatic", "manual"):
            raise ValueError(f"mode must be 'automatic' or 'manual', got {mode!r}")
        self.net = nn.Sequential(nn.Linear(IN, 32), nn.Tanh(), nn.Linear(32, CLASSES))
        self.n_workers, self.lr, self.mode, self.rounds = n_workers, lr, mode, rounds
        self.automatic_optimization = mode == "automatic"
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        if self.automatic_optimization:  # one worker's batch; Lightning steps via the closure
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.losses.append(float(loss.detach()))
            return loss
        opt = self.optimizers()
        losses = []
        for xs, ys in zip(x.chunk(self.n_workers), y.chunk(self.n_workers)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self.net(xs), ys)
            self.manual_backward(loss)  # at the global weights: params hold w in the round
            opt.step()  # one worker's local step; the m-th ends the round
            losses.append(float(loss.detach()))
        assert opt.optimizer.round_done
        self.lr_schedulers().step()  # once per round
        self.losses.append(sum(losses) / len(losses))
        return None

    def configure_optimizers(self) -> Any:
        # SISA used like Adam: c = sigma * lr = 1e-3 at lr 1e-2 (README: "Choosing sigma and lr")
        opt = pisa.SISA(self.parameters(), lr=self.lr, sigma=0.1, n_workers=self.n_workers)
        steps = self.rounds * (self.n_workers if self.automatic_optimization else 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train(
    n_workers: int = 4,
    rounds: int = 50,
    mode: str = "automatic",
    lr: float = 1e-2,
    batch_size: int = 32,
    accumulate: int = 1,
    seed: int = 0,
) -> tuple[Classifier, list[float], pisa.SISA]:
    """Trains for ``rounds`` rounds; returns the module, the training loss per Lightning step (per
    batch in ``automatic`` mode, the mean over the round's sub-batches in ``manual`` mode) and
    SISA. ``accumulate``: Lightning's ``accumulate_grad_batches`` (automatic mode only)."""
    if accumulate > 1 and mode != "automatic":
        raise ValueError("accumulate > 1 needs mode='automatic'")
    L.seed_everything(seed, verbose=False)
    batches = rounds * (n_workers if mode == "automatic" else 1) * accumulate
    per_batch = batch_size * (1 if mode == "automatic" else n_workers)
    loader = make_loader(batches, per_batch, seed)
    module = Classifier(n_workers, lr, mode, rounds)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=rounds * n_workers, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, pisa.SISA) and opt.round_done and opt.rounds == rounds
    return module, module.losses, opt


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--mode", choices=["automatic", "manual"], default="automatic")
    args = parser.parse_args()
    _, losses, opt = train(args.workers, args.rounds, args.mode)
    print(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f} with {args.workers} workers "
          f"({opt.rounds} rounds, {args.mode} optimization)")
