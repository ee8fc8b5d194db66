"""A tiny model and its data shards, shared by the distributed and the fused optimizer tests
(an embedding, two hidden matrices, a head: every routing case of Hybrid-NSISA)."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.hidden = nn.Linear(5, 6)
        self.hidden2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).mean(1)
        x = torch.tanh(self.hidden2(torch.tanh(self.hidden(x))))
        return self.head(x).squeeze(-1)


def shard(round_: int, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker ``worker``'s batch of round ``round_``: tokens and float64 targets."""
    gen = torch.Generator().manual_seed(100 * round_ + worker)
    return torch.randint(0, 7, (6, 3), generator=gen), torch.randn(6, generator=gen,
                                                                   dtype=torch.float64)
