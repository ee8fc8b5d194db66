"""torch.distributed helpers: mode resolution, bucketed flat all-reduce, parameter broadcast,
and the checks and helpers that keep a distributed PISA run correct.

One rank is one PISA worker. Buckets group tensors by (device, dtype) so that a homogeneous model
costs exactly one ``all_reduce`` per call (gloo on CPU, NCCL on GPU; whatever the process group
was initialised with, e.g. by ``torchrun``).

PISA does its own communication (one all-reduce per round), so the gradients in ``.grad`` must be
each rank's *own*: a model wrapped in ``DistributedDataParallel`` (also by
``accelerate.Accelerator.prepare``) averages them during ``backward()``, which silently turns the
m workers into one. Either train the unwrapped module (:func:`prepare`) or run every backward
inside :func:`no_sync`. ``PISA.step`` checks this at its first distributed step
(:func:`check_replicas`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "FlatBuckets",
    "all_reduce_sum_",
    "broadcast_parameters",
    "check_replicas",
    "is_distributed",
    "no_sync",
    "prepare",
    "rank",
    "resolve_distributed",
    "world_size",
]


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_distributed(flag: bool | None) -> bool:
    """``None``: auto (:func:`is_distributed`); ``True``: require an initialised process group."""
    if flag is None:
        return is_distributed()
    if flag and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs torch.distributed to be initialised "
            "(dist.init_process_group, e.g. under torchrun)"
        )
    return bool(flag)


def world_size() -> int:
    """The world size (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class FlatBuckets:
    """Contiguous buffers (one per device and dtype) with a view shaped like each tensor.

    ``n_extra`` scalars are appended to the first bucket (e.g. telemetry sums that ride along with
    the same all-reduce). Buffers start at zero.
    """

    def __init__(self, like: Sequence[Tensor], n_extra: int = 0):
        order: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(like):
            order.setdefault((t.device, t.dtype), []).append(i)
        self.views: list[Tensor] = [torch.Tensor()] * len(like)
        self.buffers: list[Tensor] = []
        self.extra: Tensor | None = None
        for b, ((device, dtype), idx) in enumerate(order.items()):
            total = sum(like[i].numel() for i in idx)
            extra = n_extra if b == 0 else 0
            flat = torch.zeros(total + extra, device=device, dtype=dtype)
            offset = 0
            for i in idx:
                n = like[i].numel()
                self.views[i] = flat[offset : offset + n].view_as(like[i])
                offset += n
            if extra:
                self.extra = flat[total:]
            self.buffers.append(flat)
        if n_extra and self.extra is None:
            self.buffers.append(torch.zeros(n_extra))
            self.extra = self.buffers[-1]

    def all_reduce_(self) -> None:
        """Sum every buffer over the ranks, in place."""
        for flat in self.buffers:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)


def all_reduce_sum_(tensors: Sequence[Tensor], scale: float = 1.0) -> None:
    """In place: each tensor <- sum over ranks of ``scale * tensor`` (one call per bucket)."""
    if not tensors:
        return
    buckets = FlatBuckets(tensors)
    torch._foreach_add_(buckets.views, list(tensors), alpha=scale)
    buckets.all_reduce_()
    torch._foreach_copy_(list(tensors), buckets.views)


@torch.no_grad()
def broadcast_parameters(params: Iterable[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (PISA needs equal initial w)."""
    params = list(params)
    if not params or not is_distributed():
        return
    buckets = FlatBuckets(params)
    torch._foreach_copy_(buckets.views, params)
    for flat in buckets.buffers:
        dist.broadcast(flat, src=src)
    torch._foreach_copy_(params, buckets.views)


def _checksums(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """``(sum x, sum x^2)`` over all entries, in float64 on ``device``."""
    if not tensors:
        return torch.zeros(2, dtype=torch.float64, device=device)
    flat = [t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]
    total = torch.stack([f.sum() for f in flat]).sum()
    total_sq = torch.stack([f.square().sum() for f in flat]).sum()
    return torch.stack([total, total_sq])


@torch.no_grad()
def check_replicas(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Raise ``RuntimeError`` when the ranks' ``params`` differ (they must start equal) or their
    ``grads`` are identical (averaged by DDP / accelerate, or every rank got the same batch).

    One all-reduce (MAX) of 8 float64 numbers: the checksums and their negatives, so every rank
    sees the maximum and minimum over the ranks. No-op outside a multi-rank process group.
    """
    if not is_distributed() or not params:
        return
    device = params[0].device
    local = torch.cat([_checksums(params, device), _checksums(grads, device)])
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[:4], -both[4:]
    same = (high == low).tolist()
    if not (same[0] and same[1]):
        raise RuntimeError(
            "PISA: the parameters differ across ranks at the first step; every worker must start "
            "from the same w: call pisa.distributed.prepare(model) (or "
            "pisa.distributed.broadcast_parameters(model.parameters())) before training"
        )
    if same[2] and same[3] and float(high[3]) > 0.0:
        raise RuntimeError(
            "PISA: the gradients are identical on every rank, so they were averaged before "
            "step() (a DistributedDataParallel / accelerate-prepared model) or every rank got the "
            "same batch. PISA does its own communication: train the unwrapped module "
            "(model = pisa.distributed.prepare(ddp_model)) or run backward() inside "
            "pisa.distributed.no_sync(model), and give each rank its own data shard "
            "(DistributedSampler). check_distributed=False turns this check off."
        )


def prepare(model: nn.Module, src: int = 0) -> nn.Module:
    """The module to train with a distributed PISA optimizer: unwraps
    ``DistributedDataParallel`` (``.module``; build the optimizer on its parameters) and copies
    rank ``src``'s parameters and buffers to every rank. Without a multi-rank process group it
    only unwraps."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    broadcast_parameters([*inner.parameters(), *inner.buffers()], src=src)
    return inner


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Context for the forward and backward of a ``DistributedDataParallel`` (or accelerate)
    model whose optimizer is PISA: gradients stay per rank (``model.no_sync()``); a plain module
    needs nothing."""
    ctx = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
    with ctx:
        yield
