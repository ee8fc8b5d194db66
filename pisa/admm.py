r"""PISA: preconditioned inexact stochastic ADMM (Zhou et al., Nat. Mach. Intell. 2026).

The base optimizer: the ADMM round, the step-size convention, virtual and distributed workers,
state and telemetry. SISA and NSISA (:mod:`pisa.sisa`, :mod:`pisa.nsisa`) only change the direction
``d_i`` and the preconditioner ``q_i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import distributed as pdist
from .preconditioners import Preconditioner, make_preconditioner

__all__ = ["PISA"]

_EXTRA_KEY = "pisa"


def _resolve_lr(lr: float | None, sigma: float, rho: float | None) -> float:
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
    """``sigma_t = c / lr_t``, ``rho_t = (1 - c) / lr_t`` with ``c = sigma_0 * lr_0``."""
    return (math.inf, math.inf) if lr == 0 else (c / lr, (1.0 - c) / lr)


def _sum_sq_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """sum_j ||t_j||^2 as a float32 scalar on ``device`` (no host sync)."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(tensors)
    return torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]).square().sum()


def _chunks(lists: list[list[Tensor]], size: int | None) -> Iterator[list[list[Tensor]]]:
    """Cut aligned tensor lists (same shapes position by position) into pieces of about
    ``size`` elements: small tensors are grouped, large contiguous ones split into flat views.
    ``size`` None or <= 0: one piece."""
    n = len(lists[0])
    if not size or size <= 0 or sum(t.numel() for t in lists[0]) <= size:
        yield lists
        return
    piece: list[list[Tensor]] = [[] for _ in lists]
    filled = 0
    for j in range(n):
        numel = lists[0][j].numel()
        splittable = numel > size and all(lst[j].is_contiguous() for lst in lists)
        if not splittable:
            if filled and filled + numel > size:
                yield piece
                piece, filled = [[] for _ in lists], 0
            for out, lst in zip(piece, lists):
                out.append(lst[j])
            filled += numel
            continue
        flats = [lst[j].view(-1) for lst in lists]
        for a in range(0, numel, size):
            b = min(a + size, numel)
            if filled and filled + (b - a) > size:
                yield piece
                piece, filled = [[] for _ in lists], 0
            for out, flat in zip(piece, flats):
                out.append(flat[a:b])
            filled += b - a
    if filled or any(piece):
        yield piece


class PISA(Optimizer):
    r"""Preconditioned inexact stochastic ADMM with a pluggable diagonal preconditioner.

    Consensus problem over ``m`` workers with weights :math:`\alpha_i` (:math:`\sum_i\alpha_i=1`)
    and a global L2 term :math:`\lambda` (``l2_lambda``)::

        min  sum_i alpha_i F_i(w_i) + (lambda / 2) ||w||^2      s.t.  w_i = w

    One round (one optimizer step of the global weights ``w``; ``t`` counts rounds from 1)::

        sigma_t = sigma * lr_0 / lr_t ,  rho_t = 1 / lr_t - sigma_t    (lr_t = 1/(sigma_t + rho_t))
        for each worker i (a virtual worker's step() call, or one rank):
            g_i  = grad F_i(w)   [+ kappa * w   if weight decay is coupled]
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
    edits ``group['lr']``. ``lr`` is read once per round (at the round's first ``step()``) and held
    for the round (``group['round_lr']``). ``lr_t = 0`` is allowed (``w`` then stays put).

    Workers:

    * virtual (one process, ``n_workers = m``): each ``step()`` is one worker's local step on the
      gradient in ``.grad``, which must be computed at the global weights; the parameters hold
      ``w`` during the round and every ``m``-th call writes the new ``w``.
    * distributed (``torch.distributed`` initialised; ``distributed=None`` picks it when the world
      size is > 1): one rank is one worker, ``n_workers`` is the world size and every ``step()`` is
      a full round with one ``all_reduce``. Ranks must start from equal parameters (see
      :func:`pisa.distributed.broadcast_parameters`).

    Parameters with ``requires_grad=False`` are skipped; a trainable parameter whose ``.grad`` is
    ``None`` has a zero gradient in that worker's step (``F_i`` does not depend on it).

    Args:
        params: parameters or param groups.
        lr: ``1 / (sigma + rho)`` at the start (default ``1e-3``); must be in ``(0, 1/sigma)``.
        sigma: ADMM penalty at ``lr``; must be in ``(0, 1/lr)``.
        rho: alternative to ``lr``: gives ``lr = 1 / (sigma + rho)``; must be > 0.
        l2_lambda: global L2 ``lambda >= 0`` on ``w`` (the ``(sigma + lambda)`` in the update).
        weight_decay: ``kappa >= 0``; coupled (added to ``g``) unless
            ``decoupled_weight_decay=True`` (``w_i -= lr * kappa * w``, as AdamW).
        preconditioner: a :class:`~pisa.preconditioners.Preconditioner` or a name
            (``identity``, ``second_moment``, ``abs``, ``ema``, ``hutchinson``).
        n_workers: virtual workers ``m >= 1`` (distributed: the world size).
        worker_weights: ``alpha_i`` (any non-negative numbers; normalised), default equal.
        distributed: ``None`` auto, ``True`` / ``False`` to force.
        dual_init: initial value of every dual entry (0; the official GPT-2 code used 1e-10).
        track_residuals: compute the primal residual and dual norm each round (:meth:`telemetry`).
    """

    _default_preconditioner = "identity"
    #: True when ``_search_direction`` is elementwise (then it is run chunk by chunk too)
    _elementwise_direction = True
    #: elements per piece of the elementwise pipeline: an int, None (whole lists at once) or
    #: "auto" (CPU: 2^18 elements per 2 threads, so temporaries are reused and stay in cache;
    #: CUDA: whole lists, the multi-tensor kernels and the caching allocator do that already)
    chunk_size: int | str | None = "auto"

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
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
        track_residuals: bool = True,
    ) -> None:
        lr = _resolve_lr(lr, sigma, rho)
        self.preconditioner: Preconditioner = make_preconditioner(
            preconditioner, self._default_preconditioner
        )
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
        self._weights = self._normalise_weights(worker_weights)
        self._round = 0
        self._worker = 0
        self._round_done = True
        self.track_residuals = track_residuals
        self._tel_partial: list[Tensor] | None = None
        self._tel_last: dict[str, Tensor | float] = {}
        defaults: dict[str, Any] = {
            "lr": lr,
            "sigma": sigma,
            "l2_lambda": l2_lambda,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "dual_init": dual_init,
        }
        defaults.update(self.preconditioner.defaults())
        defaults.update(self._direction_defaults())
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
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("lr0", group["lr"])
        group.setdefault("round_lr", None)
        self._validate_group(group)
        if any(torch.is_complex(p) for p in group["params"]):
            raise ValueError("PISA optimizers do not support complex parameters")

    def _validate_group(self, group: dict[str, Any]) -> None:
        lr, sigma = group["lr"], group["sigma"]
        if isinstance(lr, Tensor):
            raise ValueError("lr must be a float, not a Tensor")
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
        if not group["l2_lambda"] >= 0.0:
            raise ValueError(f"l2_lambda must be >= 0, got {group['l2_lambda']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if not math.isfinite(group["dual_init"]):
            raise ValueError(f"dual_init must be finite, got {group['dual_init']}")
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
        return self._distributed

    @property
    def worker_index(self) -> int:
        """Index of the worker the next ``step()`` belongs to (the rank in distributed mode)."""
        return self._rank if self._distributed else self._worker

    @property
    def round_done(self) -> bool:
        """True right after the ``step()`` that completed a round (always, in distributed mode)."""
        return True if self._distributed else self._round_done

    @property
    def rounds(self) -> int:
        """Completed rounds (= the bias-correction counter ``t`` of the last round)."""
        return self._round

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
        return _sigma_rho(group["lr"], group["sigma"] * group["lr0"])

    def telemetry(self) -> dict[str, float]:
        """Values of the last completed round: ``primal_residual``
        ``= sqrt(sum_i alpha_i ||w_i - w||^2)``, ``dual_norm = sqrt(sum_i alpha_i ||pi_i||^2)``
        (over all parameters; NaN when ``track_residuals=False``), and ``sigma`` / ``rho`` of the
        first group. Calling it synchronises the device."""
        out: dict[str, float] = {}
        for key in ("primal_residual", "dual_norm"):
            val = self._tel_last.get(key)
            out[key] = (
                float(val) if val is not None and self.track_residuals else
                (0.0 if self.track_residuals else math.nan)
            )
        sigma, rho = self._tel_last.get("sigma"), self._tel_last.get("rho")
        if sigma is None:
            sigma, rho = self.current_sigma_rho()
        out["sigma"], out["rho"] = float(sigma), float(rho)
        return out

    # ------------------------------------------------------------------ state
    def _worker_state_keys(self) -> tuple[str, ...]:
        return ("dual", *self._direction_state_keys(), *self.preconditioner.state_keys)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        shape = (self._n_local, *p.shape)
        state["dual"] = torch.full(shape, float(group["dual_init"]), dtype=p.dtype, device=p.device)
        for key in self._worker_state_keys()[1:]:
            state[key] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        if self._n_local > 1:
            state["acc"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        partial = self._tel_partial
        sd[_EXTRA_KEY] = {
            "round": self._round,
            "worker": self._worker,
            "round_done": self._round_done,
            "n_workers": self._n_workers,
            "distributed": self._distributed,
            "worker_weights": list(self._weights),
            "telemetry_partial": None if partial is None else [t.detach().cpu() for t in partial],
            "telemetry_last": {
                k: (v.detach().cpu() if isinstance(v, Tensor) else v)
                for k, v in self._tel_last.items()
            },
            "preconditioner": self.preconditioner.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get(_EXTRA_KEY)
        if extra is not None:
            if extra["n_workers"] != self._n_workers:
                raise ValueError(
                    f"state_dict was saved with n_workers={extra['n_workers']}, "
                    f"this optimizer has n_workers={self._n_workers}"
                )
            if bool(extra["distributed"]) != self._distributed:
                raise ValueError("state_dict was saved in the other (virtual/distributed) mode")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != _EXTRA_KEY})
        if extra is None:
            return
        self._round = int(extra["round"])
        self._worker = int(extra["worker"])
        self._round_done = bool(extra["round_done"])
        self._weights = [float(x) for x in extra["worker_weights"]]
        device = self._first_device()
        partial = extra["telemetry_partial"]
        self._tel_partial = None if partial is None else [t.to(device) for t in partial]
        self._tel_last = {
            k: (v.to(device) if isinstance(v, Tensor) else v)
            for k, v in extra["telemetry_last"].items()
        }
        self.preconditioner.load_state_dict(extra["preconditioner"])

    def _first_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ the round
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One worker's local step (virtual mode; every ``n_workers``-th call ends the round) or a
        full round (distributed mode / ``n_workers = 1``)."""
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
                lr = group["lr"]
                if isinstance(lr, Tensor) or not lr >= 0.0:
                    raise ValueError(f"lr must be a float >= 0 during training, got {lr}")
                group["round_lr"] = float(lr)
                self._validate_group_sigma(group)

        # gather participating parameters and their gradients
        per_group: list[tuple[dict[str, Any], list[Tensor], list[Tensor | None]]] = []
        all_params: list[Tensor] = []
        all_raw: list[Tensor | None] = []
        for group in self.param_groups:
            params: list[Tensor] = []
            raw: list[Tensor | None] = []
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("PISA optimizers do not support sparse gradients")
                if "dual" not in self.state[p]:
                    if not first:
                        raise RuntimeError(
                            "a parameter got its first gradient in the middle of a round; "
                            "parameters can only join at a round's first step()"
                        )
                    self._init_state(p, group)
                params.append(p)
                raw.append(p.grad)
            per_group.append((group, params, raw))
            all_params += params
            all_raw += raw
        if not all_params:
            return loss

        aux_all = None
        if self.preconditioner.requires_create_graph:
            aux_all = self.preconditioner.prepare(all_params, all_raw)

        device = all_params[0].device
        if first or self._tel_partial is None:
            self._tel_partial = [torch.zeros((), device=device) for _ in range(2)]
        if self._distributed:
            buckets = pdist.FlatBuckets(all_params, n_extra=2)
            targets_all = buckets.views
            alpha_t = alpha
        elif self._n_local > 1:
            buckets = None
            targets_all = [self.state[p]["acc"] for p in all_params]
            alpha_t = alpha
        else:
            buckets = None
            targets_all = all_params
            alpha_t = 1.0

        offset = 0
        for group, params, raw in per_group:
            n = len(params)
            if n == 0:
                continue
            grads = [
                torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, raw)
            ]
            wstate = {
                key: [self.state[p][key][local] for p in params]
                for key in self._worker_state_keys()
            }
            aux = None if aux_all is None else aux_all[offset : offset + n]
            self._local_step(
                group, params, grads, wstate, targets_all[offset : offset + n], alpha, alpha_t, t,
                aux,
            )
            offset += n

        # close the round
        if self._distributed:
            assert buckets is not None and buckets.extra is not None
            buckets.extra.copy_(torch.stack(self._tel_partial).to(buckets.extra.dtype))
            buckets.all_reduce_()
            self._tel_partial = [t.to(device=device, dtype=torch.float32) for t in buckets.extra]
            self._finish_round(per_group, buckets.views, zero_acc=False)
        elif self._n_local > 1:
            if local == self._n_local - 1:
                self._finish_round(per_group, targets_all, zero_acc=True)
            else:
                self._worker = local + 1
                self._round_done = False
                return loss
        else:
            self._finish_round(per_group, None, zero_acc=False)
        return loss

    def _validate_group_sigma(self, group: dict[str, Any]) -> None:
        c = group["sigma"] * group["lr0"]
        if not 0.0 < c < 1.0:
            raise ValueError(
                f"sigma must be in (0, 1/lr0) = (0, {1.0 / group['lr0']:g}), got {group['sigma']}"
            )

    def _local_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        wstate: dict[str, list[Tensor]],
        targets: list[Tensor],
        alpha: float,
        alpha_t: float,
        t: int,
        aux: list[Tensor] | None,
    ) -> None:
        """One worker's step on one group, in chunks of at most ``chunk_size`` elements.

        Every operation after the direction is elementwise, so the lists are cut into aligned
        flat pieces and the pipeline runs piece by piece: the temporaries stay small (reused by
        the allocator, mostly in cache) instead of being parameter-sized.
        """
        size = self._resolve_chunk_size(params[0].device)
        if self._elementwise_direction:
            lists = [params, grads, targets, *wstate.values()] + ([aux] if aux is not None else [])
            for piece in _chunks(lists, size):
                cp, cg, ct, *rest = piece
                cw = dict(zip(wstate.keys(), rest[: len(wstate)]))
                caux = rest[len(wstate)] if aux is not None else None
                s = self._search_direction(group, cp, cg, cw, t)
                self._admm_update(group, cp, s, cw, ct, alpha, alpha_t, t, caux)
        else:
            # direction on batches of whole tensors (NSISA: same-shaped matrices), then the
            # elementwise part in pieces, batch by batch so that temporaries stay bounded
            for idx in self._direction_batches(params, size):
                bp, bg, bt = ([lst[j] for j in idx] for lst in (params, grads, targets))
                bw = {key: [lst[j] for j in idx] for key, lst in wstate.items()}
                baux = None if aux is None else [aux[j] for j in idx]
                s = self._search_direction(group, bp, bg, bw, t)
                lists = [bp, s, bt, *bw.values()] + ([baux] if baux is not None else [])
                for piece in _chunks(lists, size):
                    cp, cs, ct, *rest = piece
                    cw = dict(zip(bw.keys(), rest[: len(bw)]))
                    caux = rest[len(bw)] if baux is not None else None
                    self._admm_update(group, cp, cs, cw, ct, alpha, alpha_t, t, caux)

    def _direction_batches(self, params: list[Tensor], size: int | None) -> list[list[int]]:
        """Index batches for a non-elementwise direction (default: all parameters at once)."""
        return [list(range(len(params)))]

    def _resolve_chunk_size(self, device: torch.device) -> int | None:
        size = self.chunk_size
        if size == "auto":
            if device.type != "cpu":
                return None
            return (1 << 18) * max(1, torch.get_num_threads() // 2)
        if size is not None and not isinstance(size, int):
            raise ValueError(f"chunk_size must be an int, None or 'auto', got {size!r}")
        return size

    def _admm_update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        s: list[Tensor],
        wstate: dict[str, list[Tensor]],
        targets: list[Tensor],
        alpha: float,
        alpha_t: float,
        t: int,
        aux: list[Tensor] | None,
    ) -> None:
        r"""Preconditioner and ADMM update for ``s = d + pi`` (overwritten), in the
        ``c = sigma_t * lr_t`` (constant) parametrisation::

            sigma_t + rho_t q = (c + (1 - c) q) / lr_t ,   e = s / (c + (1 - c) q) + kd * w
            w_i - w = -lr_t e ,   pi_i <- pi_i - c e ,
            target += alpha (pi_i_old / sigma_t - 2 lr_t e)   (= alpha (w_i - w + pi_i / sigma_t))
        """
        lr = group["round_lr"]
        c = group["sigma"] * group["lr0"]
        inv_sigma = lr / c
        kd = float(group["weight_decay"]) if group["decoupled_weight_decay"] else 0.0

        Q, scale, shift = self.preconditioner.compute(s, wstate, group, t, aux)
        if Q is None or scale == 0.0:
            k = c + (1.0 - c) * shift
        else:
            k = (1.0 - c) * scale
            torch._foreach_add_(Q, (c + (1.0 - c) * shift) / k)
            torch._foreach_div_(s, Q)
            del Q
        e = s  # holds k * e
        if kd:
            torch._foreach_add_(e, params, alpha=kd * k)
        pi = wstate["dual"]
        torch._foreach_add_(targets, pi, alpha=alpha_t * inv_sigma)
        torch._foreach_add_(targets, e, alpha=-2.0 * alpha_t * lr / k)
        torch._foreach_add_(pi, e, alpha=-c / k)
        if self.track_residuals and self._tel_partial is not None:
            device = self._tel_partial[0].device
            self._tel_partial[0] += (alpha * (lr / k) ** 2) * _sum_sq_norms(e, device)
            self._tel_partial[1] += alpha * _sum_sq_norms(pi, device)

    def _finish_round(
        self,
        per_group: list[tuple[dict[str, Any], list[Tensor], list[Tensor | None]]],
        targets_all: list[Tensor] | None,
        zero_acc: bool,
    ) -> None:
        offset = 0
        for group, params, _ in per_group:
            n = len(params)
            if n == 0:
                continue
            lr, lam = group["round_lr"], group["l2_lambda"]
            inv_sigma = lr / (group["sigma"] * group["lr0"])
            if targets_all is not None:
                acc = targets_all[offset : offset + n]
                torch._foreach_add_(params, acc)
                if zero_acc:
                    torch._foreach_zero_(acc)
            if lam:
                torch._foreach_mul_(params, 1.0 / (1.0 + lam * inv_sigma))
            offset += n
        if self._tel_partial is not None:
            primal_sq, dual_sq = self._tel_partial
            first = self.param_groups[0]
            sigma, rho = _sigma_rho(first["round_lr"], first["sigma"] * first["lr0"])
            self._tel_last = {
                "primal_residual": primal_sq.clamp_min(0).sqrt(),
                "dual_norm": dual_sq.clamp_min(0).sqrt(),
                "sigma": sigma,
                "rho": rho,
            }
        self._tel_partial = None
        self._round += 1
        self._worker = 0
        self._round_done = True
