"""A plain PyTorch loop with ``m`` virtual PISA workers (one process).

Each round takes one batch, cuts it into ``m`` sub-batches and gives each to one worker: the
worker's ``backward()`` is taken at the global weights and its ``step()`` is its local ADMM step;
the ``m``-th ``step()`` closes the round (``opt.round_done``) and writes the new weights.

    python examples/virtual_workers.py --workers 4 --rounds 60
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import pisa


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def batch(round_: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``round_``'s batch of a fixed noisy regression problem."""
    gen = torch.Generator().manual_seed(1000 + round_)
    x = torch.randn(size, 8, generator=gen)
    y = torch.sin(x[:, :4]).sum(-1, keepdim=True) + 0.05 * torch.randn(size, 1, generator=gen)
    return x, y


def make_optimizer(model: nn.Module, n_workers: int | None) -> pisa.SISA:
    """SISA used like Adam: lr 1e-2, c = sigma * lr = 1e-3 (README: "Choosing sigma and lr")."""
    return pisa.SISA(model.parameters(), lr=1e-2, sigma=0.1, n_workers=n_workers)


def evaluate(model: nn.Module) -> float:
    x, y = batch(-1, size=512)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def train(n_workers: int = 4, rounds: int = 60, seed: int = 0) -> tuple[nn.Module, list[float]]:
    """Returns the model and the held-out loss before training and after every round."""
    model = make_model(seed)
    opt = make_optimizer(model, n_workers)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rounds)  # stepped per round
    losses = [evaluate(model)]
    for r in range(rounds):
        x, y = batch(r)
        for xs, ys in zip(x.chunk(n_workers), y.chunk(n_workers)):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        assert opt.round_done
        sched.step()
        losses.append(evaluate(model))
    return model, losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    _, losses = train(args.workers, args.rounds)
    print(f"held-out MSE {losses[0]:.4f} -> {losses[-1]:.4f} with {args.workers} workers")
