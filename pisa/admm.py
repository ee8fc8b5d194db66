r"""PISA: preconditioned inexact stochastic ADMM (Zhou et al., Nat. Mach. Intell. 2026).

The base optimizer: the ADMM round, the step-size convention, virtual and distributed workers,
state and telemetry. SISA and NSISA (:mod:`pisa.sisa`, :mod:`pisa.nsisa`) only change the direction
``d_i`` and the preconditioner ``q_i``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import cpu_kernel
from . import distributed as pdist
from . import fused as pfused
from .chunking import chunks, resolve_chunk_size
from .preconditioners import Preconditioner, make_preconditioner
from .protocol import picklable_state

__all__ = ["PISA"]

_EXTRA_KEY = "pisa"
_NONE_GRAD = ("skip", "zero")

LR = float | Tensor


def _lr_value(lr: Any) -> float:
    """``lr`` as a float: a number, or a one-element Tensor (as torch optimizers accept)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a Tensor must hold one value, got shape {tuple(lr.shape)}")
        return float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"lr must be a float or a one-element Tensor, got {lr!r}")
    return float(lr)


def _resolve_lr(lr: LR | None, sigma: float, rho: float | None) -> LR:
    if rho is None:
        return 1e-3 if lr is None else lr
    if lr is not None:
        raise ValueError("give either lr or rho (lr = 1 / (sigma + rho)), not both")
    if not rho > 0.0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if not sigma > 0.0:
        raise ValueError(f"sigma must be > 0 (and < 1/lr), got {sigma}")
    return 1.0 / (sigma + rho)


def _sigma_rho(lr: float, c: float) -> tuple[float, float]:
    """``sigma_t = c / lr_t``, ``rho_t = (1 - c) / lr_t``."""
    return (math.inf, math.inf) if lr == 0 else (c / lr, (1.0 - c) / lr)


def _step_lr_c(group: dict[str, Any], lr: float | None = None) -> tuple[float, float]:
    r"""``(lr_t, c_t)`` with ``sigma_t + rho_t q = (c_t + (1 - c_t) q) / lr_t`` at the group's
    learning rate ``lr`` (default: the round's, ``round_lr``). With ``r = lr / lr_0`` and
    ``p = sigma_power``: ``sigma_t = sigma r^-p``, ``rho_t = rho r^-1``, so ``p = 1`` keeps
    ``c_t = sigma * lr_0`` and ``lr_t = lr``."""
    lr = group["round_lr"] if lr is None else lr
    c = group["sigma"] * group["lr0"]
    power = group["sigma_power"]
    if power == 1.0 or lr == 0.0:
        return lr, c
    r = lr / group["lr0"]
    sigma_t = group["sigma"] * r ** -power
    rho_t = (1.0 - c) / group["lr0"] / r
    return 1.0 / (sigma_t + rho_t), sigma_t / (sigma_t + rho_t)


def _inv_sigma(group: dict[str, Any]) -> float:
    """``1 / sigma_t`` of the round (0 at ``lr_t = 0``)."""
    lr, c = _step_lr_c(group)
    return lr / c


def _consensus_scale(group: dict[str, Any]) -> float:
    """``sigma_t``, the scale of a rounded consensus term ``alpha_i (sigma_t w_i + pi_i)``
    (1 at ``lr_t = 0``, where ``w`` stays put)."""
    inv_sigma = _inv_sigma(group)
    return 1.0 / inv_sigma if inv_sigma > 0.0 else 1.0


def parse_dtype(value: torch.dtype | str, what: str) -> torch.dtype:
    """A floating ``torch.dtype`` from a dtype or a name (``"bfloat16"``, ``"bf16"``,
    ``"torch.float16"``, ...); ``ValueError`` naming the argument ``what`` otherwise."""
    if isinstance(value, str):
        aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                   "float": "float32", "fp64": "float64", "double": "float64"}
        key = value.lower().removeprefix("torch.")
        dtype = getattr(torch, aliases.get(key, key), None)
    else:
        dtype = value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating dtype or its name, got {value!r}")
    return dtype


def _sum_sq_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """sum_j ||t_j||^2 as a float32 scalar on ``device`` (no host sync)."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(tensors)
    return torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]).square().sum()


class _Part(NamedTuple):
    """A run of one group's trainable parameters, in parameter order: those the worker steps
    (with their raw gradients) and those it skips; ``end``: the position, counted over all
    trainable parameters, after the run."""

    group: dict[str, Any]
    params: list[Tensor]
    raw: list[Tensor | None]
    skipped: list[Tensor]
    end: int


def _parts(
    groups: list[tuple[dict[str, Any], list[tuple[Tensor, Tensor | None, bool]]]],
    bounds: frozenset[int],
) -> Iterator[_Part]:
    """Each group's ``(parameter, gradient, stepped)`` entries as :class:`_Part` runs, cut at
    the positions in ``bounds`` (where a communication bucket becomes final) and at the group's
    end."""
    pos = 0
    for group, entries in groups:
        params: list[Tensor] = []
        raw: list[Tensor | None] = []
        skipped: list[Tensor] = []
        for k, (p, g, stepped) in enumerate(entries):
            pos += 1
            if stepped:
                params.append(p)
                raw.append(g)
            else:
                skipped.append(p)
            if pos in bounds or k == len(entries) - 1:
                yield _Part(group, params, raw, skipped, pos)
                params, raw, skipped = [], [], []


class _Worker(NamedTuple):
    """The stepping worker: its state slot ``local``, its weight ``alpha`` (telemetry), the
    weight ``alpha_t`` of its target update (1 when ``w`` is updated in place), the round
    number ``t`` (bias correction) and its first gradient's norm ``norm`` (``first_grad_norm``;
    1 when not measured)."""

    local: int
    alpha: float
    alpha_t: float
    t: int
    norm: float = 1.0


class _Path(NamedTuple):
    """How a set of parameters is stepped: its per-worker state keys, whether the direction is
    elementwise (then it runs chunk by chunk), the direction and the preconditioner."""

    keys: tuple[str, ...]
    elementwise: bool
    direction: Callable[..., list[Tensor]]
    precond: Preconditioner


class PISA(Optimizer):
    r"""Preconditioned inexact stochastic ADMM with a pluggable diagonal preconditioner.

    Consensus problem over ``m`` workers with weights :math:`\alpha_i` (:math:`\sum_i\alpha_i=1`)
    and a global L2 term :math:`\lambda` (``l2_lambda``)::

        min  sum_i alpha_i F_i(w_i) + (lambda / 2) ||w||^2      s.t.  w_i = w

    One round (one optimizer step of the global weights ``w``; ``t`` counts rounds from 1)::

        sigma_t = sigma * lr_0 / lr_t ,  rho_t = 1 / lr_t - sigma_t    (lr_t = 1/(sigma_t + rho_t))
        for each worker i (a virtual worker's step() call, or one rank):
            g_i  = grad F_i(w)   [+ kappa * w   if weight decay is coupled]   (-grad: maximize)
            d_i  = direction(g_i)          PISA/SISA: g_i ; NSISA: orthogonalised momentum
            s_i  = d_i + pi_i
            q_i  = preconditioner(s_i)     Identity: 1 ; SISA: sqrt(v_hat) + eps ; NSISA: |s|+eps
            w_i  = w - s_i / (sigma_t + rho_t * q_i)   [- lr_t * kappa * w   if decoupled]
            pi_i = pi_i + sigma_t * (w_i - w)
        w = sum_i alpha_i (sigma_t * w_i + pi_i) / (sigma_t + lambda)

    ``w_i`` is never stored: each worker adds ``alpha_i * (w_i - w + pi_i / sigma_t)`` to one
    accumulator (none at all with ``m = 1``: the update is done in place), and
    ``w <- (w + acc) / (1 + lambda / sigma_t)``. The state per worker is ``pi_i`` plus the
    direction's and the preconditioner's buffers (SISA: ``v_i``; NSISA: the momentum buffer).

    Step size: the group's ``lr`` is ``1 / (sigma + rho)``; ``sigma`` is its value at the initial
    ``lr_0`` (stored as ``group['lr0']``) and the ratio ``sigma / rho`` is kept when a scheduler
    edits ``group['lr']``: with ``c = sigma * lr_0`` the local step is
    ``w_i - w = -lr_t * s / (c + (1 - c) q)``. ``sigma_power = p`` changes that rule to
    ``sigma_t = sigma r^-p``, ``rho_t = rho r^-1`` with ``r = lr_t / lr_0`` (``p = 2``: the
    official GPT-2 124M code's warmdown, which divides sigma by the decay ratio twice). ``lr``
    is read once per round (at the round's first ``step()``) and held for the round
    (``group['round_lr']``). ``lr_t = 0`` is allowed (``w`` then stays put). ``lr`` may be a
    float or a one-element Tensor.

    Workers:

    * virtual (one process, ``n_workers = m``): each ``step()`` is one worker's local step on the
      gradient in ``.grad``, which must be computed at the global weights; the parameters hold
      ``w`` during the round and every ``m``-th call writes the new ``w``.
    * distributed (``torch.distributed`` initialised; ``distributed=None`` picks it when the world
      size is > 1): one rank is one worker, ``n_workers`` is the world size and every ``step()`` is
      a full round with one sum over the ranks (``bucket_mb``, ``comm_dtype``: how it is cut into
      overlapped all-reduces and in which dtype it travels). Ranks must start from equal
      parameters (see :func:`pisa.distributed.prepare`) and must *not* average gradients
      themselves (no ``DistributedDataParallel`` gradient sync): the first step checks both
      with one small all-reduce and raises with the fix (``check_distributed=False`` turns the
      check off).

    Missing gradients (``none_grad="skip"``, the default, as ``torch.optim``): a parameter whose
    ``.grad`` is ``None`` in every worker of a round is not touched (value, dual, state, weight
    decay, L2); a worker that has no gradient for it while others do keeps its dual and state and
    its local copy at ``w`` (``w_i = w``). ``none_grad="zero"``: a missing gradient is a zero
    gradient (``F_i`` does not depend on the parameter, the exact ADMM for that case; the dual and
    the decay terms then keep moving it). Parameters with ``requires_grad=False`` are skipped.

    ``step()`` is excluded from ``torch.compile`` (``torch.compiler.disable``): compiling it, or
    a training step that calls it, runs it eagerly (a graph break), so the round position and the
    bias-correction counter stay exact; compile the model instead.

    Args:
        params: parameters or param groups (each group may set its own hyperparameters).
        lr: ``1 / (sigma + rho)`` at the start (default ``1e-3``); must be in ``(0, 1/sigma)``.
            A float or a one-element Tensor.
        sigma: ADMM penalty at ``lr``; must be in ``(0, 1/lr)``. See the README, "Choosing sigma
            and lr": ``c = sigma * lr`` is the fraction of the step that does not scale with
            ``q``.
        rho: alternative to ``lr``: gives ``lr = 1 / (sigma + rho)``; must be > 0.
        l2_lambda: global L2 ``lambda >= 0`` on ``w`` (the ``(sigma + lambda)`` in the update).
        weight_decay: ``kappa >= 0``; coupled (added to ``g``) unless
            ``decoupled_weight_decay=True`` (``w_i -= lr * kappa * w``, as AdamW).
        decoupled_weight_decay: see ``weight_decay``.
        preconditioner: a :class:`~pisa.preconditioners.Preconditioner` or a name
            (``identity``, ``second_moment``, ``abs``, ``ema``, ``hutchinson``).
        n_workers: virtual workers ``m >= 1`` (distributed: the world size).
        worker_weights: ``alpha_i`` (any non-negative numbers; normalised), default equal.
        distributed: ``None`` auto, ``True`` / ``False`` to force.
        dual_init: initial value of every dual entry (0; the official GPT-2 code used 1e-10).
        sigma_power: ``p`` in ``sigma_t = sigma (lr_0 / lr_t)^p`` (``rho_t = rho lr_0 / lr_t``
            whatever ``p``); ``p >= 0``. Default ``1``: ``sigma / rho`` is kept, so a scheduler
            scales the whole step. The official GPT-2 124M code has ``p = 2`` in its warmdown
            (its schedule has no warmup, so ``lr_t / lr_0`` is the decay ratio there and 1
            before): sigma grows as ``1/r^2`` while rho grows as ``1/r`` (for "paper settings"
            rows).
        scaled_dual: the official GPT-2 code's dual (for "paper settings" rows; default
            ``False``, the textbook round): after its update each worker's stored dual is
            multiplied by its weight, ``pi_i <- alpha_i (pi_i + sigma (w_i - w))``, and that
            code's all-reduce of ``sigma alpha_i w_i + pi_i`` gives the same ``w`` as the
            textbook consensus, so only the next rounds see the difference: with ``m``
            equal workers the dual shrinks by ``1/m`` every round (no effect at ``m = 1``).
            Runs on the foreach path (not fused).
        first_grad_norm: the official VGG-11 CIFAR-10 code's step size (for "paper settings"
            rows; default ``False``): each worker ``i`` measures ``N_i = ||g_i + kappa w||``
            (its whole gradient, coupled decay included, over the parameters of the groups
            with this option; one norm per worker, not per tensor) once, at its first
            ``step()``, and from then on divides its local step and its dual's share of the
            consensus by it::

                w_i  = w - s_i / (N_i (sigma_t + rho_t q_i))  [- lr_t kappa w / N_i  if decoupled]
                pi_i = pi_i + sigma_t (w_i - w)                     (unchanged)
                w    = sum_i alpha_i (sigma_t w_i + pi_i / N_i) / (sigma_t + lambda)

            i.e. the local step and the consensus see the penalty ``N_i sigma_t`` while the
            dual still ascends by ``sigma_t``. ``N_i`` lives in the optimizer state
            (:meth:`state_dict`, ``deepcopy``); a plain ``torch.optim`` state dict without it
            measures it again at the next step. A first gradient of zero or non-finite norm
            raises ``RuntimeError``. Not with ``scaled_dual``; runs on the foreach path (with
            ``fused=True`` its groups take it).
        l2_dual_only: the official VGG-11 CIFAR-10 code's consensus (for "paper settings" rows;
            default ``False``): ``lambda`` enters the dual's share only, ``w = sum_i alpha_i
            (w_i + pi_i / (N_i (sigma_t + lambda)))`` (``N_i = 1`` without
            ``first_grad_norm``) instead of ``sum_i alpha_i (sigma_t w_i + pi_i / N_i) /
            (sigma_t + lambda)``: ``w`` is not shrunk by ``sigma_t / (sigma_t + lambda)``, so
            with ``lambda << sigma_t`` the global L2 has almost no effect. No effect when
            ``lambda = 0``. Not with ``scaled_dual``; runs on the foreach path.
        track_residuals: compute the primal residual and dual norm each round (:meth:`telemetry`).
            Also an attribute that may change between rounds: a round sums its telemetry when it is
            on at the round's first ``step()`` (a loop that logs every k-th round turns it on for
            those only; the residual costs about 5% of a compiled SISA step); a round run without it
            reports NaN for both. In virtual mode the dual norm is computed when :meth:`telemetry`
            is read, not in the step (it needs one more read of the duals, a quarter of a compiled
            SISA step): a round's value is there until the next round starts (read mid-round, in
            between the workers' steps, a round whose dual norm was never read gives NaN).
        maximize: maximise the objective (the gradient's sign is flipped), as in ``torch.optim``.
        foreach: ``None`` / ``True``: multi-tensor (``torch._foreach_*``) kernels over the whole
            group; ``False``: one tensor at a time (lower peak memory; same result).
        fused: ``True``: the elementwise part of the step (direction ``g + pi`` and coupled decay,
            the identity / second-moment / ``|s|`` preconditioner, the ADMM update, the telemetry
            sums) runs as one compiled loop per tensor that reads and writes each state tensor
            once. On CPU (float32 / float64): a C++ kernel (:mod:`pisa.cpu_kernel`), one call per
            step for every contiguous tensor, built with the machine's compiler on first use (a
            few seconds, once per machine; where it cannot be built, inductor's kernels). On CUDA
            (and CPU's other dtypes): ``torch.compile``'d kernels (:mod:`pisa.fused`), one call
            per pack of up to 32 tensors; the first step compiles (for GPT-2 124M about 30 s, once
            per process and then from inductor's disk cache; a pack compiles once per variant,
            dtype and pattern of equal sizes, whatever the sizes; past 64 pack kernels, tensor by
            tensor), and tensors with fewer than ``fused_min_numel`` (class attribute, 2^14)
            elements take the foreach path. Same result as the foreach path up to rounding
            (float64 within ``1e-12``, float32 within ``1e-6`` relative after 100 steps;
            bfloat16 / float16 are computed in float32 and rounded once, so they differ by their
            own rounding); the state and ``state_dict`` are the same, so checkpoints move between
            the paths. ``lr`` and the other group keys are passed as data, so schedulers do not
            recompile. ``None`` (default) / ``False``: the foreach path on every device, as
            ``torch.optim`` (which also never picks ``fused`` by itself): a compiled step needs a
            compiler and costs its first step. Non-contiguous tensors take the foreach path.
            Preconditioners without a fused form (Hutchinson, custom ones) and NSISA's
            Newton-Schulz direction run as before; NSISA fuses its vectors' SISA step and the
            update after the direction. Not with ``foreach=True``. A group key, but an
            implementation choice: :meth:`load_state_dict` keeps this optimizer's value.
        none_grad: ``"skip"`` (default) or ``"zero"``, see above.
        check_distributed: at the first distributed step, raise when the ranks' parameters differ
            or their gradients are identical (averaged by DDP / accelerate).
        capturable, differentiable: accepted for signature compatibility; only ``False`` (the
            round position lives on the host; the update is not differentiable).
        bucket_mb: distributed mode: the round's sum ``sum_i alpha_i (w_i - w + pi_i / sigma_t)``
            is accumulated in persistent flat buffers (allocated at the first step, reused every
            round, rebuilt only when the trainable parameters change) cut into buckets of at
            most this many MiB of the parameters' dtype (DDP's ``bucket_cap_mb``; a bucket never
            mixes devices or dtypes). Each bucket's ``all_reduce`` starts (``async_op=True``) as
            soon as the local step of its parameters is done, so it overlaps the rest of the
            step; all are waited on before ``w`` is written. ``None``: one bucket per device and
            dtype, reduced after the whole local step. The sums are the same either way (bit
            for bit with 2 ranks; with more, the backend's per-element summation order may
            depend on the layout, as with DDP's buckets). See :class:`pisa.distributed.FlatBuckets`.
            Measured (``results/bench/README.md``, gloo on a 2-core CPU machine): one bucket was
            the fastest, 0.94-1.13x DDP + fused AdamW per round against 1.43-1.58x for 2 MiB
            buckets with 4 processes, as gloo reduces on the cores the step runs on; the overlap
            is for a transfer with its own engine (NCCL), not measured here.
        comm_dtype: distributed mode: the dtype the sum travels in, e.g. ``torch.bfloat16``
            (half the bytes of float32; the official GPT-2 code all-reduces ``sigma w_i + pi_i``
            in a float16 buffer, bfloat16 in its last steps, so its rounding is relative to
            ``w``; here the reduced quantity is the round's difference, so it is relative to the
            move): each bucket is cast, reduced and cast back, so each rank's contribution and
            the sum are rounded to it (bfloat16: relative error up to ``2^-8`` each). Measured
            against the exact run on the tests' tiny model (2 ranks, float64 parameters,
            constant LR): SISA's weights differ by 0.3% of the distance they moved, flat from 10
            to 100 rounds (the loss equal to 4 digits); NSISA's trajectory there amplifies any
            perturbation (float32 communication: 4e-8 of the distance at 25 rounds, 3e-5 at
            100), so bfloat16's roundings grow to 0.4% (25), 4% (50) and 68% (100 rounds). On
            the benchmark MLP (``results/bench/README.md``) SISA's error is 0.3-0.4%.
            ``None`` (default): the parameters' dtype.
        consensus_dtype: virtual workers: the dtype in which the round's consensus
            ``sum_i alpha_i (sigma_t w_i + pi_i)`` is formed, as the official GPT-2 code's
            bfloat16 all-reduce buffer (float16 for its Medium / XL runs; for "paper settings"
            rows): each worker's term is rounded to it and added to the running sum in it
            (one rounding per worker, in worker order, as a ring all-reduce rounds each partial
            sum), and ``w = sum / (sigma_t + lambda)``. The rounding is relative to
            ``sigma_t w``, so ``w`` keeps only that dtype's precision (bfloat16: 8 bits) and
            moves smaller than half its spacing are lost. A dtype or its name; ``None``
            (default): no rounding (the textbook round, ``w`` accumulated exactly in the
            parameters' dtype). Not in distributed mode (``comm_dtype`` rounds the round's
            difference there, not ``w``). Costs one buffer of that dtype per parameter, also
            with ``n_workers = 1``.

    Group keys a scheduler may edit: ``lr`` (the ratio ``sigma/rho`` is kept), ``momentum``
    (NSISA's ``mu``; inert in PISA/SISA, which warn once when it is set non-zero, e.g. by
    ``OneCycleLR(cycle_momentum=True)``), ``weight_decay``, ``l2_lambda``, and the
    preconditioner's keys (``beta``, ``eps``, ...).
    """

    _default_preconditioner = "identity"
    #: True when ``_search_direction`` is elementwise (then it is run chunk by chunk too)
    _elementwise_direction = True
    #: True when the group key ``momentum`` drives the update (NSISA)
    _uses_momentum = False
    #: elements per piece of the elementwise pipeline: an int, None (whole lists at once) or
    #: "auto" (CPU: 2^18 elements per 2 threads, so temporaries are reused and stay in cache;
    #: CUDA: whole lists, the multi-tensor kernels and the caching allocator do that already)
    chunk_size: int | str | None = "auto"
    #: ``fused=True`` on inductor's kernels: tensors with fewer elements take the foreach path
    #: (packing them too made a GPT-2 step slower and its compilation longer; the C++ CPU kernel
    #: takes every size)
    fused_min_numel: int = 1 << 14
    #: ``fused=True``: most tensors per compiled call (:func:`pisa.fused.packs`; 1: one call per
    #: tensor)
    fused_max_pack: int = pfused.MAX_PACK
    #: ``fused=True`` on CPU: ``"cpp"``, the C++ kernel (:mod:`pisa.cpu_kernel`) for float32 and
    #: float64 tensors (inductor's kernels where it cannot be built), or ``"inductor"``
    fused_cpu_backend: str = "cpp"

    def __init__(
        self,
        params: ParamsT,
        lr: LR | None = None,
        sigma: float = 1.0,
        *,
        rho: float | None = None,
        l2_lambda: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        preconditioner: Preconditioner | str | None = None,
        n_workers: int | None = None,
        worker_weights: Sequence[float] | None = None,
        distributed: bool | None = None,
        dual_init: float = 0.0,
        scaled_dual: bool = False,
        first_grad_norm: bool = False,
        l2_dual_only: bool = False,
        track_residuals: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        none_grad: str = "skip",
        check_distributed: bool = True,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        bucket_mb: float | None = 25.0,
        comm_dtype: torch.dtype | None = None,
        sigma_power: float = 1.0,
        consensus_dtype: torch.dtype | str | None = None,
    ) -> None:
        # every argument is checked before ``params`` is touched (as torch.optim does)
        lr = _resolve_lr(lr, sigma, rho)
        pdist.check_bucketing(bucket_mb, comm_dtype)
        if consensus_dtype is not None:
            consensus_dtype = parse_dtype(consensus_dtype, "consensus_dtype")
        if capturable:
            raise ValueError(
                "capturable=True is not supported: the round position lives on the host"
            )
        if differentiable:
            raise ValueError("differentiable=True is not supported by PISA optimizers")
        if none_grad not in _NONE_GRAD:
            raise ValueError(f"none_grad must be one of {_NONE_GRAD}, got {none_grad!r}")
        self.preconditioner: Preconditioner = make_preconditioner(
            preconditioner, self._default_preconditioner
        )
        defaults: dict[str, Any] = {
            "lr": lr,
            "sigma": sigma,
            "l2_lambda": l2_lambda,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "dual_init": dual_init,
            "scaled_dual": scaled_dual,
            "sigma_power": sigma_power,
            "first_grad_norm": first_grad_norm,
            "l2_dual_only": l2_dual_only,
            "momentum": 0.0,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
        }
        defaults.update(self.preconditioner.defaults())
        defaults.update(self._direction_defaults())
        self._validate_group({**defaults, "lr0": _lr_value(lr)})
        self._distributed = pdist.resolve_distributed(distributed)
        if self._distributed:
            world = pdist.world_size()
            if n_workers is not None and n_workers != world:
                raise ValueError(
                    f"n_workers must equal the world size ({world}) in distributed mode, "
                    f"got {n_workers}"
                )
            n_workers = world
        elif n_workers is None:
            n_workers = 1
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers must be an integer >= 1, got {n_workers!r}")
        self._n_workers = n_workers
        self._rank = pdist.rank() if self._distributed else 0
        self._n_local = 1 if self._distributed else n_workers
        if consensus_dtype is not None and self._distributed:
            raise ValueError(
                "consensus_dtype is for virtual workers; in distributed mode comm_dtype sets "
                "the dtype of the consensus all-reduce"
            )
        if consensus_dtype is not None and (first_grad_norm or l2_dual_only):
            raise ValueError(
                "consensus_dtype (the official GPT-2 code's consensus) cannot be combined with "
                "first_grad_norm / l2_dual_only (the official VGG-11 code's round)"
            )
        self._consensus_dtype: torch.dtype | None = consensus_dtype
        self._weights = self._normalise_weights(worker_weights)
        #: ``first_grad_norm``: each local worker's first gradient norm N_i (None: not yet)
        self._first_norms: list[float | None] = [None] * self._n_local
        self._round = 0
        self._worker = 0
        self._round_done = True
        #: flat indices (over all groups' params) of parameters stepped in the current round
        self._round_seen: set[int] = set()
        self.none_grad = none_grad
        self.check_distributed = bool(check_distributed)
        self._dist_checked = False
        self._bucket_mb = bucket_mb
        self._comm_dtype = comm_dtype
        self._buckets: pdist.FlatBuckets | None = None  # built at the first distributed step
        self._momentum_warned = False
        self.track_residuals = track_residuals
        self._tel_partial: list[Tensor] | None = None
        self._tel_last: dict[str, Tensor | float] = {}
        #: virtual mode: (alpha_i, i, the parameters worker i stepped) of the current round, and
        #: of the last completed round until its dual norm is read (:meth:`_dual_norm_now`)
        self._round_duals: list[tuple[float, int, list[Tensor]]] = []
        self._dual_pending: list[tuple[float, int, list[Tensor]]] | None = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ subclass hooks
    def _direction_defaults(self) -> dict[str, Any]:
        """Extra group hyperparameters of the direction (NSISA: momentum, ns_steps, ...)."""
        return {}

    def _direction_state_keys(self) -> tuple[str, ...]:
        """Per-worker state tensors of the direction (NSISA: ``momentum_buffer``)."""
        return ()

    def _validate_direction(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for invalid direction hyperparameters."""
        mu = group["momentum"]
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 <= mu < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {mu!r}")

    def _search_direction(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        wstate: dict[str, list[Tensor]],
        step: int,
    ) -> list[Tensor]:
        """Fresh tensors ``s = d + pi`` (coupled weight decay inside ``d``). Base: ``d = g``."""
        s = torch._foreach_add(grads, wstate["dual"])
        kc = self._coupled_wd(group)
        if kc:
            torch._foreach_add_(s, params, alpha=kc)
        return s

    @staticmethod
    def _coupled_wd(group: dict[str, Any]) -> float:
        return 0.0 if group["decoupled_weight_decay"] else float(group["weight_decay"])

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``dict`` with ``params`` and optional hyperparameters), as torch does;
        its ``lr`` becomes its ``lr0``. Only between rounds in virtual mode."""
        if not self._distributed and self.__dict__.get("_worker", 0) != 0:
            raise RuntimeError("param groups can only be added between rounds")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("lr0", _lr_value(group["lr"]))
        group.setdefault("round_lr", None)
        try:
            self._validate_group(group)
            for p in group["params"]:
                if torch.is_complex(p):
                    raise ValueError("PISA optimizers do not support complex parameters")
                if p.is_sparse:
                    raise ValueError("PISA optimizers do not support sparse parameters")
                if group["fused"] and not pfused.fused_supported(p.device):
                    raise ValueError(
                        f"fused=True needs CPU, CUDA or XPU parameters, got {p.device.type}"
                    )
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the argument and its valid range for a bad group."""
        lr, sigma = _lr_value(group["lr"]), group["sigma"]
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
            raise ValueError(f"sigma must be a float > 0 (and < 1/lr), got {sigma!r}")
        if not lr > 0.0:
            raise ValueError(f"lr must be in (0, 1/sigma), got lr={lr}")
        if not sigma > 0.0:
            raise ValueError(f"sigma must be > 0 (and < 1/lr), got sigma={sigma}")
        if not lr * sigma < 1.0:
            raise ValueError(
                f"lr must be in (0, 1/sigma) = (0, {1.0 / sigma:g}) so that "
                f"rho = 1/lr - sigma > 0; got lr={lr}, sigma={sigma}"
            )
        if not group["lr0"] * sigma < 1.0:
            raise ValueError(
                f"sigma must be in (0, 1/lr0) = (0, {1.0 / group['lr0']:g}), got sigma={sigma}"
            )
        for key in ("l2_lambda", "weight_decay"):
            val = group[key]
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0.0:
                raise ValueError(f"{key} must be >= 0, got {val!r}")
        if not isinstance(group["decoupled_weight_decay"], bool):
            raise ValueError("decoupled_weight_decay must be a bool")
        dual_init = group["dual_init"]
        if not isinstance(dual_init, (int, float)) or not math.isfinite(dual_init):
            raise ValueError(f"dual_init must be finite, got {dual_init!r}")
        if not isinstance(group["scaled_dual"], bool):
            raise ValueError(f"scaled_dual must be a bool, got {group['scaled_dual']!r}")
        power = group["sigma_power"]
        if (isinstance(power, bool) or not isinstance(power, (int, float))
                or not (math.isfinite(power) and power >= 0.0)):
            raise ValueError(f"sigma_power must be a finite float >= 0, got {power!r}")
        for key in ("first_grad_norm", "l2_dual_only"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{key} must be a bool, got {group[key]!r}")
            if group[key] and group["scaled_dual"]:
                raise ValueError(
                    f"{key} (the official VGG-11 code's round) and scaled_dual (the official "
                    "GPT-2 code's dual) cannot be combined"
                )
        if not isinstance(group["maximize"], bool):
            raise ValueError(f"maximize must be a bool, got {group['maximize']!r}")
        if not (group["foreach"] is None or isinstance(group["foreach"], bool)):
            raise ValueError(f"foreach must be None, True or False, got {group['foreach']!r}")
        fused = group.get("fused")
        if not (fused is None or isinstance(fused, bool)):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        if fused and group["foreach"]:
            raise ValueError("fused=True and foreach=True cannot be set together")
        self.preconditioner.validate(group)
        self._validate_direction(group)

    def _normalise_weights(self, weights: Sequence[float] | None) -> list[float]:
        m = self._n_workers
        if weights is None:
            return [1.0 / m] * m
        w = [float(x) for x in weights]
        if len(w) != m:
            raise ValueError(f"worker_weights must have n_workers={m} entries, got {len(w)}")
        if any(not (x >= 0.0 and math.isfinite(x)) for x in w) or not sum(w) > 0.0:
            raise ValueError(f"worker_weights must be finite, >= 0, with a positive sum: {w}")
        total = sum(w)
        return [x / total for x in w]

    # ------------------------------------------------------------------ public attributes
    @property
    def n_workers(self) -> int:
        """Number of ADMM workers ``m`` (the world size in distributed mode)."""
        return self._n_workers

    @property
    def distributed(self) -> bool:
        """True in distributed mode (one rank is one worker, every ``step()`` is a round)."""
        return self._distributed

    @property
    def worker_index(self) -> int:
        """Index of the worker the next ``step()`` belongs to (the rank in distributed mode)."""
        return self._rank if self._distributed else self._worker

    @property
    def _accumulates(self) -> bool:
        """Virtual mode with an accumulator (``m > 1``, or a rounded consensus); else the
        update is in place (``m = 1``) or goes to the communication buckets (distributed)."""
        return not self._distributed and (
            self._n_local > 1 or self._consensus_dtype is not None
        )

    @property
    def round_done(self) -> bool:
        """True right after the ``step()`` that completed a round (always, in distributed mode)."""
        return True if self._distributed else self._round_done

    @property
    def rounds(self) -> int:
        """Completed rounds (= the bias-correction counter ``t`` of the last round)."""
        return self._round

    @property
    def comm_buckets(self) -> pdist.FlatBuckets | None:
        """Distributed mode: the persistent consensus buffers
        (:class:`pisa.distributed.FlatBuckets`), built at the first step and reused every round;
        ``None`` before it and in virtual mode."""
        return self._buckets

    @property
    def requires_create_graph(self) -> bool:
        """True when the preconditioner needs ``loss.backward(create_graph=True)``."""
        return self.preconditioner.requires_create_graph

    @property
    def worker_weights(self) -> list[float]:
        """The normalised ``alpha_i``."""
        return list(self._weights)

    def set_worker_weights(self, weights: Sequence[float]) -> None:
        """Set ``alpha_i`` (e.g. client data sizes; normalised). Only between rounds."""
        if not self._distributed and self._worker != 0:
            raise RuntimeError("worker weights can only change between rounds")
        self._weights = self._normalise_weights(weights)

    def current_sigma_rho(self, group: dict[str, Any] | None = None) -> tuple[float, float]:
        """``(sigma_t, rho_t)`` that ``group`` (default: the first) has at its current ``lr``."""
        group = self.param_groups[0] if group is None else group
        return _sigma_rho(*_step_lr_c(group, _lr_value(group["lr"])))

    def telemetry(self) -> dict[str, float]:
        """Values of the last completed round: ``primal_residual``
        ``= sqrt(sum_i alpha_i ||w_i - w||^2)``, ``dual_norm = sqrt(sum_i alpha_i ||pi_i||^2)``
        (over the parameters the workers stepped; NaN for a round run with
        ``track_residuals=False``), and ``sigma`` / ``rho`` of the first group. Calling it
        synchronises the device; in virtual mode the first call after a round reads the duals for
        ``dual_norm``."""
        self._dual_norm_now()
        out: dict[str, float] = {}
        for key in ("primal_residual", "dual_norm"):
            val = self._tel_last.get(key)
            out[key] = float(val) if val is not None else (
                0.0 if self.track_residuals else math.nan)  # before the first round
        sigma, rho = self._tel_last.get("sigma"), self._tel_last.get("rho")
        if sigma is None:
            sigma, rho = self.current_sigma_rho()
        out["sigma"], out["rho"] = float(sigma), float(rho)
        return out

    def _dual_norm_now(self) -> None:
        """Virtual mode: ``sqrt(sum_i alpha_i ||pi_i||^2)`` of the last completed round, over the
        parameters each worker stepped, from the duals as they are: no step has touched them
        since the round closed (the next round's first step drops the pending round)."""
        pending, self._dual_pending = self._dual_pending, None
        if pending is None:
            return
        device = pending[0][2][0].device if pending else self._first_device()
        total = torch.zeros((), device=device)
        for alpha, local, params in pending:
            duals = [self.state[p]["dual"][local] for p in params]
            total += alpha * _sum_sq_norms(duals, device)
        self._tel_last["dual_norm"] = total.sqrt()

    # ------------------------------------------------------------------ state
    def _worker_state_keys(self) -> tuple[str, ...]:
        return ("dual", *self._direction_state_keys(), *self.preconditioner.state_keys)

    def _param_state_keys(self, p: Tensor, group: dict[str, Any]) -> tuple[str, ...]:
        """Per-worker state tensors of ``p`` (``dual`` first). Default: the same for every ``p``."""
        return self._worker_state_keys()

    def _init_state(self, p: Tensor, group: dict[str, Any], local: int) -> None:
        state = self.state[p]
        shape = (self._n_local, *p.shape)
        dual_init = float(group["dual_init"])
        state["dual"] = torch.full(shape, dual_init, dtype=p.dtype, device=p.device)
        for key in self._param_state_keys(p, group)[1:]:
            state[key] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        if self._accumulates:
            acc = torch.zeros_like(p, memory_format=torch.preserve_format)
            earlier = sum(self._weights[:local])  # workers of this round without a gradient
            if self._consensus_dtype is not None:  # their terms alpha_j (sigma_t w + pi_j)
                cons = torch.zeros_like(p, dtype=self._consensus_dtype)
                if local:
                    cons.copy_(earlier * (_consensus_scale(group) * p.detach() + dual_init))
                state["consensus"] = cons
            elif local and dual_init:  # w_j = w, pi_j = dual_init
                if group["first_grad_norm"] or group["l2_dual_only"]:
                    shares = [self._dual_share(group, self._worker_norm(j)) for j in range(local)]
                    share = sum(a * d / n for a, (n, d) in zip(self._weights, shares))
                else:
                    share = earlier * _inv_sigma(group)
                acc.fill_(share * dual_init)
            state["acc"] = acc

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state dict (per-parameter ``dual``, direction and preconditioner
        buffers with a leading worker axis; the groups with ``lr0`` and ``round_lr``) plus, under
        the key ``"pisa"``, the round position, worker weights, telemetry, the workers' first
        gradient norms (``first_grad_norm``) and the preconditioner's own state: loading it
        resumes bit for bit, also inside a round."""
        if self._round_done:
            self._dual_norm_now()
        sd = super().state_dict()
        partial = self._tel_partial
        sd[_EXTRA_KEY] = {
            "round": self._round,
            "worker": self._worker,
            "round_done": self._round_done,
            "round_seen": sorted(self._round_seen),
            "n_workers": self._n_workers,
            "distributed": self._distributed,
            "worker_weights": list(self._weights),
            "telemetry_partial": None if partial is None else [t.detach().cpu() for t in partial],
            "telemetry_last": {
                k: (v.detach().cpu() if isinstance(v, Tensor) else v)
                for k, v in self._tel_last.items()
            },
            "preconditioner": self.preconditioner.state_dict(),
            "first_grad_norms": list(self._first_norms),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also a plain ``torch.optim`` one without ``"pisa"``:
        then the round position starts afresh). Raises ``ValueError`` when it was saved with
        another worker count or in the other (virtual / distributed) mode. Group keys added
        since the checkpoint was written get this optimizer's defaults."""
        extra = state_dict.get(_EXTRA_KEY)
        if extra is not None:
            if extra["n_workers"] != self._n_workers:
                raise ValueError(
                    f"state_dict was saved with n_workers={extra['n_workers']}, "
                    f"this optimizer has n_workers={self._n_workers}"
                )
            if bool(extra["distributed"]) != self._distributed:
                raise ValueError("state_dict was saved in the other (virtual/distributed) mode")
        fused = [group.get("fused") for group in self.param_groups]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != _EXTRA_KEY})
        for group, own in zip(self.param_groups, fused):
            group["fused"] = own  # an implementation choice, not training state
            if own:
                group["foreach"] = None
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("lr0", _lr_value(group["lr"]))
            group.setdefault("round_lr", None)
        self._restore_consensus(extra is not None and int(extra["worker"]) != 0)
        if extra is None:
            return
        self._round = int(extra["round"])
        self._worker = int(extra["worker"])
        self._round_done = bool(extra["round_done"])
        self._round_seen = {int(k) for k in extra.get("round_seen", [])}
        self._weights = [float(x) for x in extra["worker_weights"]]
        device = self._first_device()
        partial = extra["telemetry_partial"]
        self._tel_partial = None if partial is None else [t.to(device) for t in partial]
        self._tel_last = {
            k: (v.to(device) if isinstance(v, Tensor) else v)
            for k, v in extra["telemetry_last"].items()
        }
        self._round_duals, self._dual_pending = [], None
        self.preconditioner.load_state_dict(extra["preconditioner"])
        norms = extra.get("first_grad_norms")  # absent before first_grad_norm existed
        self._first_norms = (
            [None] * self._n_local if norms is None else
            [None if n is None else float(n) for n in norms]
        )

    def _restore_consensus(self, mid_round: bool) -> None:
        """After loading: the rounded consensus back in ``consensus_dtype`` (``torch.optim``
        casts state to the parameter's dtype; the values were in it, so this is exact), made
        for a checkpoint without it, dropped for an optimizer without it; between rounds only
        when its presence changes."""
        for p, state in self.state.items():
            if "dual" not in state:
                continue
            if self._accumulates != ("acc" in state):  # m = 1: with consensus_dtype or not
                if self._accumulates:
                    state["acc"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    del state["acc"]
            cons = state.get("consensus")
            if (cons is None) == (self._consensus_dtype is None):
                if cons is not None:
                    state["consensus"] = cons.to(self._consensus_dtype)
                continue
            if mid_round:
                raise ValueError(
                    "state_dict was saved inside a round with another consensus_dtype "
                    "setting; load it into an optimizer with the same one"
                )
            if cons is None:
                state["consensus"] = torch.zeros_like(p, dtype=self._consensus_dtype)
            else:
                del state["consensus"]

    def __getstate__(self) -> dict[str, Any]:
        """Everything (round position, workers, preconditioner), so that ``copy.deepcopy`` and
        ``pickle`` give an optimizer that continues exactly; step hooks and the communication
        buffers (rebuilt at the next step) are not copied."""
        return {**picklable_state(self), "_buckets": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in (("_bucket_mb", 25.0), ("_comm_dtype", None), ("_buckets", None),
                           ("_consensus_dtype", None), ("_dual_pending", None),
                           ("_round_duals", [])):
            self.__dict__.setdefault(key, value)
        self.__dict__.setdefault("_first_norms", [None] * self.__dict__.get("_n_local", 1))

    def _first_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ the round
    def _round_lr(self, group: dict[str, Any]) -> float:
        lr = group["lr"]
        value = _lr_value(lr) if isinstance(lr, Tensor) else lr
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
            raise ValueError(f"lr must be a float >= 0 during training, got {lr}")
        return float(value)

    def _warn_inert_momentum(self, group: dict[str, Any]) -> None:
        if self._uses_momentum or self._momentum_warned or not group.get("momentum"):
            return
        self._momentum_warned = True
        warnings.warn(
            f"{type(self).__name__} has no momentum: group['momentum']={group['momentum']} "
            "(set by a momentum scheduler such as OneCycleLR with cycle_momentum=True) is "
            "ignored; pass cycle_momentum=False to silence this",
            UserWarning,
            stacklevel=3,
        )

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One worker's local step (virtual mode; every ``n_workers``-th call ends the round) or a
        full round (distributed mode / ``n_workers = 1``).

        Args:
            closure: optional callable that re-evaluates the model and returns the loss (run with
                gradients enabled before the step, as in ``torch.optim``).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        local = 0 if self._distributed else self._worker
        alpha = self._weights[self._rank if self._distributed else local]
        t = self._round + 1
        first = local == 0
        if first:
            for group in self.param_groups:
                group["round_lr"] = self._round_lr(group)
                self._validate_group_sigma(group)
                self._warn_inert_momentum(group)
            self._round_seen = set()
        zero_mode = self.none_grad == "zero"

        # gather, group by group in parameter order: every trainable parameter, and whether
        # this worker steps it (a gradient, or "zero" mode) or skips it
        groups: list[tuple[dict[str, Any], list[tuple[Tensor, Tensor | None, bool]]]] = []
        trainable: list[Tensor] = []
        stepped_all: list[Tensor] = []
        raw_all: list[Tensor | None] = []
        flat = -1
        for group in self.param_groups:
            entries: list[tuple[Tensor, Tensor | None, bool]] = []
            for p in group["params"]:
                flat += 1
                if not p.requires_grad:
                    continue
                trainable.append(p)
                g = p.grad
                if g is not None and g.is_sparse:
                    raise RuntimeError("PISA optimizers do not support sparse gradients")
                if g is None and not zero_mode:
                    entries.append((p, None, False))
                    continue
                if "dual" not in self.state[p]:
                    if zero_mode and not first:
                        raise RuntimeError(
                            "a parameter got its first gradient in the middle of a round; "
                            "parameters can only join at a round's first step()"
                        )
                    self._init_state(p, group, local)
                entries.append((p, g, True))
                stepped_all.append(p)
                raw_all.append(g)
                self._round_seen.add(flat)
            groups.append((group, entries))
        if not trainable or (self._n_workers == 1 and not stepped_all):
            return loss  # nothing to do (as torch.optim: no gradients, no step)

        if self._distributed and self.check_distributed and not self._dist_checked:
            pdist.check_replicas(trainable, [g for g in raw_all if g is not None])
            self._dist_checked = True

        aux_all = None
        if self.preconditioner.requires_create_graph and stepped_all:
            aux_all = self.preconditioner.prepare(stepped_all, raw_all)

        device = trainable[0].device
        if first:  # the round sums its telemetry when track_residuals is on at its first step
            self._tel_partial = (
                [torch.zeros((), device=device) for _ in range(2)]
                if self.track_residuals else None
            )
        if first and not self._distributed:  # an unread round's dual norm stays NaN
            self._round_duals, self._dual_pending = [], None
        if self._tel_partial is not None and not self._distributed and stepped_all:
            self._round_duals.append((alpha, local, stepped_all))
        buckets: pdist.FlatBuckets | None = None
        target_of: dict[int, Tensor] = {}
        if self._distributed:
            # every rank lays out all trainable parameters the same way; the extras carry the
            # telemetry sums and one "had a gradient" count per parameter
            buckets = self._consensus_buckets(trainable)
            target_of = {id(p): v for p, v in zip(trainable, buckets.views)}
            alpha_t = alpha
        elif self._accumulates:
            alpha_t = alpha
        else:
            alpha_t = 1.0

        if self._first_norms[local] is None and any(g["first_grad_norm"] for g, _ in groups):
            self._measure_first_norm(groups, local)
        worker = _Worker(local, alpha, alpha_t, t, self._worker_norm(local))
        offset = 0
        parts = list(_parts(groups, frozenset() if buckets is None else buckets.bounds))
        for part in parts:
            group, params, raw, skipped = part.group, part.params, part.raw, part.skipped
            if self._distributed:
                targets = [target_of[id(p)] for p in params]
            elif self._accumulates:
                targets = [self.state[p]["acc"] for p in params]
            else:
                targets = params
            if params:
                grads = [
                    torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, raw)
                ]
                if group["maximize"]:
                    grads = torch._foreach_neg(grads)
                n = len(params)
                aux = None if aux_all is None else aux_all[offset : offset + n]
                self._group_step(group, params, grads, targets, worker, aux)
                offset += n
            if skipped and (self._distributed or self._accumulates):
                self._skipped_contribution(group, skipped, target_of, local, alpha)
            if buckets is not None:  # this part's buckets are final: start their all-reduce
                buckets.start(part.end)

        # close the round
        if self._distributed:
            assert buckets is not None and buckets.extra is not None
            stepped_ids = {id(p) for p in stepped_all}
            flags = [1.0 if id(p) in stepped_ids else 0.0 for p in trainable]
            if self._tel_partial is None:
                buckets.extra[:2].zero_()
            else:
                buckets.extra[:2].copy_(torch.stack(self._tel_partial).to(buckets.extra.dtype))
            buckets.extra[2:].copy_(torch.tensor(flags, dtype=buckets.extra.dtype))
            buckets.wait()
            if self._tel_partial is not None:
                self._tel_partial = [
                    t.to(device=device, dtype=torch.float32) for t in buckets.extra[:2]
                ]
            if len(stepped_ids) == len(trainable):
                live = None  # this rank stepped everything: every parameter moves
            else:  # one host sync, only when this rank skipped something
                counts = buckets.extra[2:].tolist()
                live = {id(p) for p, c in zip(trainable, counts) if c > 0}
            self._finish_round(self._close_lists(target_of, live))
        elif self._accumulates:
            if self._consensus_dtype is not None:
                self._fold_consensus(alpha)
            if local == self._n_local - 1:
                close = self._close_lists_virtual()
                if self._consensus_dtype is not None:
                    close = self._write_consensus(close)
                self._finish_round(close)
            else:
                self._worker = local + 1
                self._round_done = False
                return loss
        else:
            self._finish_round([(p.group, p.params, None) for p in parts if p.params])
        return loss

    def _consensus_buckets(self, trainable: list[Tensor]) -> pdist.FlatBuckets:
        """The persistent consensus buffers over ``trainable``, zeroed (built at the first
        distributed step, rebuilt only when the trainable parameters' layout changes)."""
        n_extra = 2 + len(trainable)
        buckets = self._buckets
        if buckets is not None and buckets.matches(trainable, n_extra):
            buckets.zero_()
            return buckets
        self._buckets = pdist.FlatBuckets(
            trainable, n_extra, bucket_mb=self._bucket_mb, comm_dtype=self._comm_dtype
        )
        return self._buckets

    def _skipped_contribution(
        self,
        group: dict[str, Any],
        skipped: list[Tensor],
        target_of: dict[int, Tensor],
        local: int,
        alpha: float,
    ) -> None:
        """A worker without a gradient for ``p`` keeps ``w_i = w`` and ``pi_i``: it adds
        ``alpha_i pi_i / sigma_t`` to the accumulator (the state-less ``pi_i`` is ``dual_init``;
        ``first_grad_norm`` / ``l2_dual_only``: ``alpha_i pi_i / (N_i (sigma_t + lambda))``)."""
        norm, inv_d = self._dual_share(group, self._worker_norm(local))
        inv_sigma = inv_d / norm
        for p in skipped:
            state = self.state.get(p)
            if self._distributed:
                target = target_of[id(p)]
            elif state is None or "acc" not in state:
                continue  # no state yet: a later worker that initialises it adds this term
            else:
                target = state["acc"]
            if state is not None and "dual" in state:
                target.add_(state["dual"][local], alpha=alpha * inv_sigma)
            elif group["dual_init"]:
                target.add_(alpha * inv_sigma * float(group["dual_init"]))

    def _close_lists(
        self, target_of: dict[int, Tensor], live: set[int] | None
    ) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor] | None]]:
        """Per group: the parameters that move this round and their reduced targets."""
        out = []
        for group in self.param_groups:
            ps = [
                p for p in group["params"]
                if id(p) in target_of and (live is None or id(p) in live)
            ]
            if ps:
                out.append((group, ps, [target_of[id(p)] for p in ps]))
        return out

    def _close_lists_virtual(
        self,
    ) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor] | None]]:
        """Virtual mode: parameters stepped by some worker of the round move; every other
        accumulator (skip contributions only) is cleared."""
        out = []
        flat = -1
        for group in self.param_groups:
            ps: list[Tensor] = []
            for p in group["params"]:
                flat += 1
                state = self.state.get(p)
                if not p.requires_grad or state is None or "acc" not in state:
                    continue
                if flat in self._round_seen:
                    ps.append(p)
                else:
                    state["acc"].zero_()
            if ps:
                out.append((group, ps, [self.state[p]["acc"] for p in ps]))
        return out

    def _fold_consensus(self, alpha: float) -> None:
        """``consensus += fl(sigma_t (alpha_i w + acc))``: the worker's term ``alpha_i (sigma_t
        w_i + pi_i)`` rounded to ``consensus_dtype`` and summed in it; ``acc`` is cleared."""
        for group in self.param_groups:
            sigma_t = _consensus_scale(group)
            for p in group["params"]:
                state = self.state.get(p)
                if state is None or "consensus" not in state:
                    continue
                acc = state["acc"]
                term = torch.add(acc, p.detach(), alpha=alpha).mul_(sigma_t)
                state["consensus"].add_(term.to(self._consensus_dtype))
                acc.zero_()

    def _write_consensus(
        self, close: list[tuple[dict[str, Any], list[Tensor], list[Tensor] | None]]
    ) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor] | None]]:
        """``w <- consensus / sigma_t`` for the parameters that move (the others' sums are
        dropped); the ``(1 + lambda / sigma_t)`` division is left to :meth:`_finish_round`."""
        moving = {id(p) for _, ps, _ in close for p in ps}
        for group in self.param_groups:
            inv_sigma = 1.0 / _consensus_scale(group)
            for p in group["params"]:
                state = self.state.get(p)
                if state is None or "consensus" not in state:
                    continue
                cons = state["consensus"]
                if id(p) in moving:
                    p.detach().copy_(cons.to(p.dtype).mul_(inv_sigma))
                cons.zero_()
        return [(group, ps, None) for group, ps, _ in close]

    def _worker_norm(self, local: int) -> float:
        """Local worker ``local``'s first gradient norm ``N_i`` (1 while not measured)."""
        norm = self._first_norms[local]
        return 1.0 if norm is None else norm

    @staticmethod
    def _dual_share(group: dict[str, Any], norm: float) -> tuple[float, float]:
        """``(N, 1/den)`` of a worker's share ``alpha pi / (N den)`` of the consensus sum:
        ``N`` its first gradient norm with ``first_grad_norm`` (else 1), ``den = sigma_t``, or
        ``sigma_t + lambda`` with ``l2_dual_only`` (written in ``lr_t`` so that ``lr_t = 0``
        gives 0)."""
        lr, c = _step_lr_c(group)
        n = norm if group["first_grad_norm"] else 1.0
        if group["l2_dual_only"]:
            return n, lr / (c + float(group["l2_lambda"]) * lr)
        return n, lr / c

    def _measure_first_norm(
        self, groups: list[tuple[dict[str, Any], list[tuple[Tensor, Tensor | None, bool]]]],
        local: int,
    ) -> None:
        """``first_grad_norm``: ``N_i = ||g_i + kappa w||`` over the stepped parameters of the
        groups with the option (the gradient as the step uses it: signed by ``maximize``, with
        the coupled decay), measured at the worker's first step (one host sync, once)."""
        terms: list[Tensor] = []
        for group, entries in groups:
            if not group["first_grad_norm"]:
                continue
            kc = self._coupled_wd(group)
            for p, g, stepped in entries:
                if not stepped:
                    continue
                x = torch.zeros_like(p) if g is None else g.detach()
                if group["maximize"]:
                    x = -x
                terms.append(x + kc * p.detach() if kc else x)
        if not terms:
            return
        norms = torch._foreach_norm(terms)
        norm = math.sqrt(sum(float(n.double()) ** 2 for n in norms))
        if not (math.isfinite(norm) and norm > 0.0):
            raise RuntimeError(
                f"first_grad_norm: worker {local}'s first gradient has norm {norm}; its steps "
                "would be divided by it"
            )
        self._first_norms[local] = norm

    def _validate_group_sigma(self, group: dict[str, Any]) -> None:
        c = group["sigma"] * group["lr0"]
        if not 0.0 < c < 1.0:
            raise ValueError(
                f"sigma must be in (0, 1/lr0) = (0, {1.0 / group['lr0']:g}), got {group['sigma']}"
            )

    def _group_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        targets: list[Tensor],
        worker: _Worker,
        aux: list[Tensor] | None,
    ) -> None:
        """One worker's step on one group's stepped parameters (NSISA splits matrices and
        vectors here)."""
        path = _Path(
            self._worker_state_keys(), self._elementwise_direction, self._search_direction,
            self.preconditioner,
        )
        self._run(group, params, grads, targets, worker, aux, path)

    def _run(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        targets: list[Tensor],
        worker: _Worker,
        aux: list[Tensor] | None,
        path: _Path,
    ) -> None:
        """Build this worker's state lists and run the pipeline (``foreach=False``: one tensor at
        a time)."""
        if group["foreach"] is False and len(params) > 1:
            for j in range(len(params)):
                one = slice(j, j + 1)
                self._run(
                    group, params[one], grads[one], targets[one], worker,
                    None if aux is None else aux[one], path,
                )
            return
        wstate = {key: [self.state[p][key][worker.local] for p in params] for key in path.keys}
        self._local_step(group, params, grads, wstate, targets, worker, aux, path)

    def _local_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        wstate: dict[str, list[Tensor]],
        targets: list[Tensor],
        worker: _Worker,
        aux: list[Tensor] | None,
        path: _Path,
    ) -> None:
        """One worker's step on one group, in chunks of at most ``chunk_size`` elements.

        Every operation after the direction is elementwise, so the lists are cut into aligned
        flat pieces and the pipeline runs piece by piece: the temporaries stay small (reused by
        the allocator, mostly in cache) instead of being parameter-sized.
        """
        size = resolve_chunk_size(self.chunk_size, params[0].device)
        t = worker.t
        official = group["scaled_dual"] or group["first_grad_norm"] or group["l2_dual_only"]
        kind = (pfused.precond_kind(path.precond)
                if group["fused"] and aux is None and not official else None)
        if kind is not None and path.elementwise and (
            getattr(path.direction, "__func__", None) is PISA._search_direction
        ):  # d = g: the direction is part of the kernel
            self._fused_update(group, params, grads, wstate, targets, worker, path.precond,
                               kind, add_dual=True)
            return
        if path.elementwise:
            lists = [params, grads, targets, *wstate.values()] + ([aux] if aux is not None else [])
            for piece in chunks(lists, size):
                cp, cg, ct, *rest = piece
                cw = dict(zip(wstate.keys(), rest[: len(wstate)]))
                caux = rest[len(wstate)] if aux is not None else None
                s = path.direction(group, cp, cg, cw, t)
                self._admm_update(group, cp, s, cw, ct, worker, caux, path.precond)
        else:
            # direction on batches of whole tensors (NSISA: same-shaped matrices), then the
            # elementwise part in pieces, batch by batch so that temporaries stay bounded
            for idx in self._direction_batches(params, size):
                bp, bg, bt = ([lst[j] for j in idx] for lst in (params, grads, targets))
                bw = {key: [lst[j] for j in idx] for key, lst in wstate.items()}
                baux = None if aux is None else [aux[j] for j in idx]
                s = path.direction(group, bp, bg, bw, t)
                if kind is not None:
                    self._fused_update(group, bp, s, bw, bt, worker, path.precond, kind,
                                       add_dual=False)
                    continue
                lists = [bp, s, bt, *bw.values()] + ([baux] if baux is not None else [])
                for piece in chunks(lists, size):
                    cp, cs, ct, *rest = piece
                    cw = dict(zip(bw.keys(), rest[: len(bw)]))
                    caux = rest[len(bw)] if baux is not None else None
                    self._admm_update(group, cp, cs, cw, ct, worker, caux, path.precond)

    def _direction_batches(self, params: list[Tensor], size: int | None) -> list[list[int]]:
        """Index batches for a non-elementwise direction (default: all parameters at once)."""
        return [list(range(len(params)))]

    @staticmethod
    def _update_coefficients(
        group: dict[str, Any], scale: float, shift: float, identity: bool
    ) -> tuple[float, float, float, float, float, float | None]:
        r"""Scalars of one worker's update for a preconditioner ``q = scale * Q + shift``, in the
        ``c = sigma_t * lr_t`` parametrisation (the foreach and the fused path share them):
        ``(lr_t, c, 1/sigma_t, kd, k, qshift)`` with ``c + (1 - c) q = k (Q + qshift)``, so
        ``e = s / (k (Q + qshift))``; ``qshift`` None when ``q`` is the constant ``shift``
        (``identity`` or ``scale = 0``), then ``k = c + (1 - c) shift``. ``kd``: the decoupled
        weight decay (0 when coupled)."""
        lr, c = _step_lr_c(group)
        kd = float(group["weight_decay"]) if group["decoupled_weight_decay"] else 0.0
        if identity or scale == 0.0:
            return lr, c, lr / c, kd, c + (1.0 - c) * shift, None
        k = (1.0 - c) * scale
        return lr, c, lr / c, kd, k, (c + (1.0 - c) * shift) / k

    def _admm_update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        s: list[Tensor],
        wstate: dict[str, list[Tensor]],
        targets: list[Tensor],
        worker: _Worker,
        aux: list[Tensor] | None,
        precond: Preconditioner,
    ) -> None:
        r"""Preconditioner and ADMM update for ``s = d + pi`` (overwritten), in the
        ``c = sigma_t * lr_t`` (constant) parametrisation::

            sigma_t + rho_t q = (c + (1 - c) q) / lr_t ,   e = s / (c + (1 - c) q) + kd * w
            w_i - w = -lr_t e ,   pi_i <- pi_i - c e ,
            target += alpha (pi_i_old / sigma_t - 2 lr_t e)   (= alpha (w_i - w + pi_i / sigma_t))
        """
        alpha, alpha_t = worker.alpha, worker.alpha_t
        Q, scale, shift = precond.compute(s, wstate, group, worker.t, aux)
        lr, c, inv_sigma, kd, k, qshift = self._update_coefficients(group, scale, shift,
                                                                    Q is None)
        if Q is not None and qshift is not None:
            torch._foreach_add_(Q, qshift)
            torch._foreach_div_(s, Q)
            del Q
        e = s  # holds k * e
        if kd:
            torch._foreach_add_(e, params, alpha=kd * k)
        pi = wstate["dual"]
        if group["first_grad_norm"] or group["l2_dual_only"]:
            # official VGG code: w_i - w = -lr e / N, pi_i -= c e / N, target += alpha (w_i - w
            # + pi_i / (N den)) with den = sigma_t (+ lambda); lr -> lr / N for the telemetry
            norm, inv_d = self._dual_share(group, worker.norm)
            lr = lr / norm
            torch._foreach_add_(targets, pi, alpha=alpha_t * inv_d / norm)
            torch._foreach_add_(targets, e, alpha=-alpha_t * (lr + c * inv_d / norm**2) / k)
            torch._foreach_add_(pi, e, alpha=-c / (norm * k))
        else:
            torch._foreach_add_(targets, pi, alpha=alpha_t * inv_sigma)
            torch._foreach_add_(targets, e, alpha=-2.0 * alpha_t * lr / k)
            torch._foreach_add_(pi, e, alpha=-c / k)
        if group["scaled_dual"] and alpha != 1.0:  # official GPT-2 code: pi_i <- alpha_i pi_i
            torch._foreach_mul_(pi, alpha)
        if self._tel_partial is not None:
            device = self._tel_partial[0].device
            self._tel_partial[0] += (alpha * (lr / k) ** 2) * _sum_sq_norms(e, device)
            if self._distributed:  # virtual mode: when read (_dual_norm_now)
                self._tel_partial[1] += alpha * _sum_sq_norms(pi, device)

    def _fused_update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        d: list[Tensor],
        wstate: dict[str, list[Tensor]],
        targets: list[Tensor],
        worker: _Worker,
        precond: Preconditioner,
        kind: str,
        add_dual: bool,
    ) -> None:
        """:meth:`_admm_update` (and, with ``add_dual``, the base direction ``s = d + pi + kc w``)
        as compiled kernels over packs of tensors (:mod:`pisa.fused`), with the same
        coefficients."""
        kc = self._coupled_wd(group) if add_dual else 0.0
        alpha, alpha_t = worker.alpha, worker.alpha_t
        scale, shift = precond.coefficients(group, worker.t)
        beta = float(group[precond.beta_key]) if kind == "second_moment" else 0.0
        lr, c, inv_sigma, kd, k, qshift = self._update_coefficients(group, scale, shift,
                                                                    kind == "identity")
        if qshift is None:
            kind, qshift = "identity", 0.0
        coef = [0.0] * pfused.N_COEF
        coef[pfused.KC], coef[pfused.BETA], coef[pfused.ONE_MINUS_BETA] = kc, beta, 1.0 - beta
        coef[pfused.QSHIFT], coef[pfused.KDK] = qshift, kd * k
        coef[pfused.A_PI], coef[pfused.A_E] = alpha_t * inv_sigma, -2.0 * alpha_t * lr / k
        coef[pfused.A_DUAL], coef[pfused.T_E] = -c / k, alpha * (lr / k) ** 2
        device = params[0].device
        tel = None if self._tel_partial is None else self._tel_partial[0]
        pi_all = wstate["dual"]
        v_all = wstate.get("exp_avg_sq") if kind == "second_moment" else None
        rest: list[int] = []  # small or non-contiguous tensors: the foreach path
        fused: dict[bool, list[int]] = {True: [], False: []}  # by "the target is w"
        native: dict[tuple[torch.dtype, bool], list[int]] = {}  # the C++ kernel's, by dtype too
        lib = (cpu_kernel.library()
               if device.type == "cpu" and self.fused_cpu_backend == "cpp" else None)
        for j, (p, dj, pi, tgt) in enumerate(zip(params, d, pi_all, targets)):
            tensors = [p, dj, pi] + ([] if v_all is None else [v_all[j]]) + [tgt]
            if not all(x.is_contiguous() for x in tensors):
                rest.append(j)
            elif lib is not None and p.dtype in cpu_kernel.DTYPES and all(
                x.dtype == p.dtype for x in tensors
            ):
                native.setdefault((p.dtype, tgt is p), []).append(j)
            elif p.numel() < max(1, self.fused_min_numel):
                rest.append(j)
            else:
                fused[tgt is p].append(j)
        for (_, in_place), js in native.items():
            assert lib is not None
            sq = cpu_kernel.admm(
                lib, [params[j] for j in js], [d[j] for j in js], [pi_all[j] for j in js],
                None if v_all is None else [v_all[j] for j in js],
                None if in_place else [targets[j] for j in js], coef, kind, dual=add_dual,
                coupled=kc != 0.0, decoupled=kd != 0.0, track=tel is not None)
            if tel is not None:
                tel += coef[pfused.T_E] * sq
        hp = torch.tensor(coef, dtype=torch.float64, device=device) if any(fused.values()) else None
        flat = pfused.flat
        for in_place, idx in fused.items():
            uses_w = in_place or kc != 0.0 or kd != 0.0
            variant = (kind, add_dual, uses_w, in_place, tel is not None)
            for pack in pfused.packs(len(idx), self.fused_max_pack):
                js = idx[pack]
                kernel = pfused.admm_kernel(
                    *variant, pfused.size_pattern([params[j].numel() for j in js]))
                # no room for a new pack kernel: tensor by tensor (single-tensor kernels)
                calls = [(kernel, js)] if kernel is not None else [
                    (pfused.admm_kernel(*variant, pfused.size_pattern([params[j].numel()])), [j])
                    for j in js
                ]
                for kern, sub in calls:
                    assert kern is not None  # a single tensor always gets its kernel
                    kern([flat(params[j]) for j in sub], [flat(d[j]) for j in sub],
                         [flat(pi_all[j]) for j in sub],
                         None if v_all is None else [flat(v_all[j]) for j in sub],
                         None if in_place else [flat(targets[j]) for j in sub], tel, hp)
        if rest:
            sub_p = [params[j] for j in rest]
            sub_w = {key: [lst[j] for j in rest] for key, lst in wstate.items()}
            sub_t = [targets[j] for j in rest]
            s = [d[j] for j in rest]
            if add_dual:
                s = PISA._search_direction(self, group, sub_p, s, sub_w, worker.t)
            self._admm_update(group, sub_p, s, sub_w, sub_t, worker, None, precond)
            skip = set(rest)  # their telemetry is in _admm_update's
            pi_all = [pi for j, pi in enumerate(pi_all) if j not in skip]
        if self._distributed and self._tel_partial is not None:
            self._tel_partial[1] += alpha * _sum_sq_norms(pi_all, self._tel_partial[1].device)

    def _finish_round(
        self, close: list[tuple[dict[str, Any], list[Tensor], list[Tensor] | None]]
    ) -> None:
        """``w <- (w + acc) / (1 + lambda / sigma_t)`` for the parameters that move (``acc``
        None: the update was in place; ``l2_dual_only``: ``w <- w + acc``); then the round
        counter and telemetry advance."""
        for group, params, acc in close:
            lam = group["l2_lambda"]
            inv_sigma = _inv_sigma(group)
            if acc is not None:
                torch._foreach_add_(params, acc)
                if not self._distributed:
                    torch._foreach_zero_(acc)
            if lam and not group["l2_dual_only"]:  # l2_dual_only: lambda was in the shares
                torch._foreach_mul_(params, 1.0 / (1.0 + lam * inv_sigma))
        sigma, rho = _sigma_rho(*_step_lr_c(self.param_groups[0]))
        self._tel_last = {"primal_residual": math.nan, "dual_norm": math.nan,
                          "sigma": sigma, "rho": rho}
        if self._tel_partial is not None:  # a tracked round
            primal_sq, dual_sq = self._tel_partial
            self._tel_last["primal_residual"] = primal_sq.clamp_min(0).sqrt()
            if self._distributed:
                self._tel_last["dual_norm"] = dual_sq.clamp_min(0).sqrt()
            else:  # virtual mode: computed when read (_dual_norm_now)
                self._dual_pending = self._round_duals
        self._round_duals = []
        self._tel_partial = None
        self._round += 1
        self._worker = 0
        self._round_done = True
