"""torch.distributed helpers: mode resolution, bucketed flat all-reduce, parameter broadcast,
and the checks and helpers that keep a distributed PISA run correct.

One rank is one PISA worker. The consensus all-reduce of each round goes through
:class:`FlatBuckets`: persistent buffers (allocated once), cut into buckets of one device and
dtype, each bucket's ``all_reduce`` launched asynchronously as soon as the local step of its
tensors is done, all waited on before the consensus is written back (gloo on CPU, NCCL on GPU;
whatever the process group was initialised with, e.g. by ``torchrun``).

PISA does its own communication (one bucketed sum per round), so the gradients in ``.grad`` must be
each rank's *own*: a model wrapped in ``DistributedDataParallel`` (also by
``accelerate.Accelerator.prepare``) averages them during ``backward()``, which silently turns the
m workers into one. Either train the unwrapped module (:func:`prepare`) or run every backward
inside :func:`no_sync`. ``PISA.step`` checks this at its first distributed step
(:func:`check_replicas`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "FlatBuckets",
    "GradientSum",
    "all_reduce_sum_",
    "broadcast_parameters",
    "check_bucketing",
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


_MIB = 1 << 20
_EXTRA_DTYPES = (torch.float32, torch.float64)


@dataclass(eq=False)
class _Bucket:
    """One bucket: ``buffer`` holds the views (the tensors' dtype), ``comm`` is what is reduced
    (``buffer`` itself, or its persistent ``comm_dtype`` copy); ``close`` is one more than the
    largest index of its tensors (the bucket is final once the tensors before ``close`` are)."""

    buffer: Tensor
    comm: Tensor
    close: int
    has_extra: bool = False
    handle: Any = None


class FlatBuckets:
    """Persistent flat buffers over a list of tensors, a view shaped like each, all-reduced (sum
    over the ranks) bucket by bucket, each bucket as soon as its tensors are final.

    Layout: the tensors in list order, by device and dtype (a bucket never mixes them), cut into
    buckets of at most ``bucket_mb`` MiB of their dtype (a larger tensor gets a bucket of its
    own; ``None``: one bucket per device and dtype), as DDP's ``bucket_cap_mb``. ``n_extra``
    scalars (``extra``: telemetry sums, flags) ride at the end of the bucket that closes last
    when it is communicated in float32 / float64, else in a float32 bucket of their own. Every
    rank must build the same layout (the same shapes and dtypes in the same order).

    Allocated once: reuse the object while :meth:`matches` holds (:meth:`zero_`, write the views,
    :meth:`start`, :meth:`wait`). :meth:`start` ``(upto)`` launches ``all_reduce(async_op=True)``
    of every bucket whose tensors all have an index ``< upto``, so their communication overlaps
    the work on the later tensors; :meth:`wait` launches the rest (the extras' bucket last) and
    waits on every handle. Buckets are launched in the same order on every rank whatever
    ``upto`` values each passes, so ranks never mismatch collectives.

    ``comm_dtype`` (e.g. ``torch.bfloat16``): a bucket in another dtype is copied into a
    persistent buffer of that dtype, reduced there and copied back: ``sum_r x_r`` becomes
    ``fl(sum_r fl(x_r))``, each rank's contribution and each partial sum rounded to
    ``comm_dtype`` (bfloat16: ``|fl(x) - x| <= 2^-8 |x|``, so the error is at most about
    ``m 2^-8 sum_r |x_r|`` over ``m`` ranks), for half the bytes of float32. ``None``: each
    tensor's own dtype (exact up to the backend's summation order).
    """

    def __init__(
        self,
        like: Sequence[Tensor],
        n_extra: int = 0,
        *,
        bucket_mb: float | None = None,
        comm_dtype: torch.dtype | None = None,
    ) -> None:
        check_bucketing(bucket_mb, comm_dtype)
        cap = None if bucket_mb is None else max(1, int(bucket_mb * _MIB))
        self.signature = _signature(like, n_extra)
        plans: list[tuple[torch.device, torch.dtype, list[int]]] = []
        open_: dict[tuple[torch.device, torch.dtype], tuple[int, int]] = {}  # -> (plan, bytes)
        for i, t in enumerate(like):
            key = (t.device, t.dtype)
            nbytes = t.numel() * t.element_size()
            slot = open_.get(key)
            if slot is None or (cap is not None and slot[1] and slot[1] + nbytes > cap):
                plans.append((t.device, t.dtype, []))
                slot = (len(plans) - 1, 0)
            plans[slot[0]][2].append(i)
            open_[key] = (slot[0], slot[1] + nbytes)
        plans.sort(key=lambda plan: plan[2][-1])  # the order in which buckets become final
        self.views: list[Tensor] = [torch.Tensor()] * len(like)
        self.extra: Tensor | None = None
        self._buckets: list[_Bucket] = []
        for b, (device, dtype, idx) in enumerate(plans):
            wire = comm_dtype or dtype
            extra = n_extra if b == len(plans) - 1 and wire in _EXTRA_DTYPES else 0
            total = sum(like[i].numel() for i in idx)
            flat = torch.zeros(total + extra, device=device, dtype=dtype)
            offset = 0
            for i in idx:
                n = like[i].numel()
                self.views[i] = flat[offset : offset + n].view_as(like[i])
                offset += n
            comm = flat if wire == dtype else torch.empty(total + extra, device=device, dtype=wire)
            if extra:
                self.extra = flat[total:]
            self._buckets.append(_Bucket(flat, comm, idx[-1] + 1, has_extra=bool(extra)))
        if n_extra and self.extra is None:
            device = plans[-1][0] if plans else torch.device("cpu")
            self.extra = torch.zeros(n_extra, device=device)
            self._buckets.append(_Bucket(self.extra, self.extra, len(like) + 1, has_extra=True))
        #: positions after which a bucket is final (``start(pos)`` launches it)
        self.bounds: frozenset[int] = frozenset(b.close for b in self._buckets)
        self._next = 0  # buckets before it are launched

    @property
    def buffers(self) -> list[Tensor]:
        """The flat buffers, one per bucket, in launch order (the views and extras live there)."""
        return [b.buffer for b in self._buckets]

    @property
    def comm_buffers(self) -> list[Tensor]:
        """What each bucket's ``all_reduce`` is given (a buffer itself, or its ``comm_dtype``
        copy)."""
        return [b.comm for b in self._buckets]

    def matches(self, like: Sequence[Tensor], n_extra: int = 0) -> bool:
        """True when ``like`` has this layout (shapes, dtypes, devices, order, ``n_extra``)."""
        return _signature(like, n_extra) == self.signature

    def zero_(self) -> None:
        """Zero every buffer (views and extras); a use that stopped half way (an exception
        between :meth:`start` and :meth:`wait`) is drained first."""
        for b in self._buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
            b.buffer.zero_()
        self._next = 0

    def start(self, upto: int | None = None) -> None:
        """Launch, asynchronously, the all-reduce of every bucket whose tensors all have an
        index ``< upto`` (their views are final); the extras' bucket only with ``upto=None``
        (everything, the extras too, is final)."""
        while self._next < len(self._buckets):
            b = self._buckets[self._next]
            if upto is not None and (b.has_extra or b.close > upto):
                return
            self._launch(b)
            self._next += 1

    def wait(self) -> None:
        """Launch the buckets not yet launched, wait on every handle and copy ``comm_dtype``
        results back: afterwards every view and ``extra`` holds its sum over the ranks."""
        for b in self._buckets[self._next :]:
            self._launch(b)
        self._next = 0
        for b in self._buckets:
            b.handle.wait()
            b.handle = None
            if b.comm is not b.buffer:
                b.buffer.copy_(b.comm)

    def all_reduce_(self) -> None:
        """Sum every buffer over the ranks, in place (:meth:`wait` with nothing started)."""
        self.wait()

    @staticmethod
    def _launch(b: _Bucket) -> None:
        if b.comm is not b.buffer:
            b.comm.copy_(b.buffer)
        b.handle = dist.all_reduce(b.comm, op=dist.ReduceOp.SUM, async_op=True)


class GradientSum:
    """``.grad <- sum over the ranks of scale * .grad`` for a list of parameters, through
    persistent :class:`FlatBuckets` (rebuilt only when the list's layout changes):
    :meth:`start` copies the gradients in and launches the all-reduce (plus one presence weight
    per parameter, in the same buckets), so it can overlap other work; :meth:`finish` waits and
    writes the sums back. A parameter without ``.grad`` on every rank keeps ``None`` (one host
    sync, only when this rank lacks one)."""

    def __init__(self, bucket_mb: float | None = 25.0, comm_dtype: torch.dtype | None = None):
        check_bucketing(bucket_mb, comm_dtype)
        self.bucket_mb = bucket_mb
        self.comm_dtype = comm_dtype
        self.buckets: FlatBuckets | None = None
        self._pending: tuple[list[Tensor], list[bool]] | None = None

    def start(self, params: Sequence[Tensor], scale: float = 1.0) -> None:
        """Launch the sum of ``scale * p.grad`` (a missing ``.grad`` counts as zero)."""
        params = list(params)
        if self._pending is not None and self._pending[0] and self.buckets is not None:
            self.buckets.wait()  # a step that raised in between: drain, keep ranks in step
        present = [p.grad is not None for p in params]
        if not params:
            self._pending = (params, present)
            return
        b = self.buckets
        if b is None or not b.matches(params, len(params)):
            b = self.buckets = FlatBuckets(params, len(params), bucket_mb=self.bucket_mb,
                                           comm_dtype=self.comm_dtype)
        else:
            b.zero_()
        have = [j for j, ok in enumerate(present) if ok]
        grads: list[Tensor] = [params[j].grad for j in have]  # type: ignore[misc]
        if have:
            torch._foreach_add_([b.views[j] for j in have], grads, alpha=scale)
        assert b.extra is not None
        b.extra.copy_(torch.tensor([scale if ok else 0.0 for ok in present],
                                   dtype=b.extra.dtype))
        b.start()
        self._pending = (params, present)

    def finish(self) -> None:
        """Wait for the sum started by :meth:`start` and write it into ``.grad``."""
        if self._pending is None:
            raise RuntimeError("GradientSum.finish called without start")
        params, present = self._pending
        self._pending = None
        if not params:
            return
        b = self.buckets
        assert b is not None and b.extra is not None
        b.wait()
        have = [j for j, ok in enumerate(present) if ok]
        grads: list[Tensor] = [params[j].grad for j in have]  # type: ignore[misc]
        if have:
            torch._foreach_copy_(grads, [b.views[j] for j in have])
        if len(have) < len(params):  # the sum of the scales of the ranks with a gradient
            for p, view, ok, weight in zip(params, b.views, present, b.extra.tolist()):
                if not ok and weight > 0.0:
                    p.grad = torch.zeros_like(p)
                    p.grad.copy_(view)


def _signature(like: Sequence[Tensor], n_extra: int) -> tuple[Any, ...]:
    return (n_extra, *((t.device, t.dtype, tuple(t.shape)) for t in like))


def check_bucketing(bucket_mb: float | None, comm_dtype: torch.dtype | None) -> None:
    """Raise ``ValueError`` unless ``bucket_mb`` is ``None`` or > 0 and ``comm_dtype`` is
    ``None`` or a floating dtype."""
    if bucket_mb is not None and (
        isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float))
        or not bucket_mb > 0
    ):
        raise ValueError(f"bucket_mb must be None or a number > 0, got {bucket_mb!r}")
    if comm_dtype is not None and not (
        isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point
    ):
        raise ValueError(f"comm_dtype must be None or a floating torch.dtype, got {comm_dtype!r}")


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
