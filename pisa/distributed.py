"""torch.distributed helpers: mode resolution, bucketed flat all-reduce, parameter broadcast.

One rank is one PISA worker. Buckets group tensors by (device, dtype) so that a homogeneous model
costs exactly one ``all_reduce`` per call (gloo on CPU, NCCL on GPU; whatever the process group
was initialised with, e.g. by ``torchrun``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "FlatBuckets",
    "all_reduce_sum_",
    "broadcast_parameters",
    "is_distributed",
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
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
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
