r"""NSISA: PISA whose direction is Nesterov momentum orthogonalised by Newton-Schulz (as Muon)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .admm import LR, PISA, _lr_value, _Path, _Worker, parse_dtype
from .newton_schulz import NS_COEFFICIENTS, default_ns_dtype, newton_schulz_
from .preconditioners import EMA, AbsValue, Preconditioner, SecondMoment, _check_beta

__all__ = ["NSISA"]

_VECTOR_MODES = ("sisa", "momentum", "error")
#: default ``c = sigma * lr``: the paper's GPT-2 setting (sigma 80, rho 100: c = 80 / 180)
DEFAULT_C = 80.0 / 180.0


class NSISA(PISA):
    r"""Newton-Schulz inexact stochastic ADMM.

    One round (``t`` = round number; ``lr_t = 1/(sigma_t + rho_t)``, ``sigma_t = c / lr_t`` with
    ``c = sigma * lr_0`` fixed, as in :class:`~pisa.PISA`)::

        for each worker i:
            g_i  = grad F_i(w)  [+ kappa w  if coupled]        (-grad with maximize=True)
          matrices (>= 2-D; conv weights as (out, in*k*k)):
            B_i  = mu B_i + g_i
            M_i  = g_i + mu B_i                       (nesterov; else M_i = B_i)
            d_i  = NS5(M_i) * sqrt(max(1, rows/cols))
            q_i  = |d_i + pi_i| + eps                 (or the EMA variant, preconditioner="ema")
          vectors, scalars, empty tensors (vectors="sisa", default: SISA's elementwise step):
            d_i  = g_i ,  v_i = b v_i + (1 - b) s_i^2 ,  q_i = sqrt(v_i / (1 - b^t)) + eps
                   (b = vector_beta; vectors="momentum": d_i = M_i and q_i as for matrices)
          both:
            s_i  = d_i + pi_i
            w_i  = w - s_i / (sigma_t + rho_t q_i)  [- lr_t kappa w  if decoupled]
            pi_i = pi_i + sigma_t (w_i - w)
        w = sum_i alpha_i (sigma_t w_i + pi_i) / (sigma_t + lambda)

    ``NS5``: five quintic Newton-Schulz steps, ``X = M / (||M||_F + 1e-7)`` (transposed when
    ``rows > cols``), ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` with
    ``(a, b, c) = (3.4445, -4.7750, 2.0315)`` (:mod:`pisa.newton_schulz`); same-shaped matrices are
    orthogonalised as one batch. State per worker: ``dual`` and ``momentum_buffer`` (matrices),
    ``dual`` and ``exp_avg_sq`` (vectors; plus ``exp_avg_sq`` for matrices with ``"ema"``).

    Why vectors differ: orthogonalisation is defined for matrices only, and the raw momentum
    ``M`` (a sum of ~``1/(1-mu)`` gradients) with ``q = |s|`` gives a sign-like step whose dual
    keeps pushing, which diverges on simple convex problems; the SISA step (an Adam-like
    normalisation by the second moment of ``g + pi``) trains biases and norm gains the way AdamW
    does for Muon. ``vectors="error"`` refuses non-matrix parameters with ``ValueError`` (as
    ``torch.optim.Muon``); route them to a companion with :func:`pisa.hybrid_nsisa` instead.

    The denominator ``sigma_t + rho_t q`` is at least ``sigma_t > 0``, so zero entries of ``s``
    cannot produce ``0/0``; ``zero_guard=eps0`` adds ``eps0**t`` to them as the paper's code does.

    ``momentum`` is a group key: a momentum scheduler (``OneCycleLR(cycle_momentum=True)``,
    ``CyclicLR``) cycles ``mu`` as it does SGD's (between 0.85 and 0.95 by default, inversely to
    ``lr``); pass ``cycle_momentum=False`` to keep ``mu`` fixed.

    Args:
        params: parameters or param groups (each group may set its own hyperparameters).
        lr: ``1 / (sigma + rho)`` at the start (default ``1e-3``), in ``(0, 1/sigma)``; a float or
            a one-element Tensor.
        sigma: ADMM penalty at ``lr``, in ``(0, 1/lr)``; ``c = sigma * lr`` is the share of the
            step that does not scale with ``q`` (README: "Choosing sigma and lr"). Default
            ``None``: ``c = 4/9`` (``sigma = 4 / (9 lr)``; ``0.8 * rho`` when ``rho`` is given),
            the paper's GPT-2 ratio ``sigma : rho = 80 : 100``.
        rho: alternative to ``lr``: ``lr = 1 / (sigma + rho)``, > 0.
        momentum: ``mu`` in ``[0, 1)``.
        nesterov: Nesterov momentum.
        ns_steps: Newton-Schulz iterations (>= 0).
        ns_dtype: dtype of the iteration (a ``torch.dtype`` or a name such as ``"bfloat16"``);
            default bfloat16 on accelerators (as the paper and torch's Muon), float32 on CPU
            (bfloat16 matmuls are slow on most CPUs; torch's Muon keeps bfloat16 everywhere),
            float64 for float64 parameters.
        ns_coefficients: ``(a, b, c)``.
        eps: added to ``q`` (>= 0).
        preconditioner: ``"abs"`` (``|s| + eps``, default), ``"ema"``
            (``sqrt(v / (1 - beta^t)) + eps``, ``v = beta v + (1 - beta) s^2``) or any
            :class:`~pisa.preconditioners.Preconditioner` (for the matrices).
        beta: the EMA variant's decay, in ``[0, 1)`` (checked even when unused).
        zero_guard: ``eps0`` in ``(0, 1)`` or ``None`` (off).
        vectors: how parameters with fewer than 2 dimensions (or no elements) are updated:
            ``"sisa"`` (default), ``"momentum"`` (the matrices' momentum and preconditioner,
            without orthogonalisation) or ``"error"`` (``ValueError``).
        vector_beta: second-moment decay ``b`` of the ``"sisa"`` vector path, in ``[0, 1)``.
        l2_lambda: global L2 ``lambda >= 0`` on ``w``.
        weight_decay: ``kappa >= 0``; coupled (added to ``g``) unless decoupled.
        decoupled_weight_decay: ``w_i -= lr * kappa * w`` (as AdamW) instead of coupling.
        n_workers: virtual workers ``m >= 1`` (distributed: the world size).
        worker_weights: ``alpha_i`` (non-negative, normalised), default equal.
        distributed: ``None`` auto (world size > 1), ``True`` / ``False`` to force.
        dual_init: initial value of every dual entry (the official GPT-2 code used 1e-10).
        scaled_dual: the official GPT-2 code's dual (default ``False``): each worker's stored
            dual is multiplied by its weight after its update, ``pi_i <- alpha_i (pi_i + sigma
            (w_i - w))``, shrinking it by ``1/m`` per round with equal workers; ``w`` of that
            round is the textbook one. For "paper settings" rows; not fused.
        track_residuals: compute the primal residual and dual norm each round.
        maximize: maximise instead of minimise.
        foreach: ``None`` / ``True`` multi-tensor kernels (batched Newton-Schulz), ``False`` one
            tensor at a time (same result, lower peak memory).
        fused: ``True``: the vectors' SISA step and, for matrices, everything after the
            Newton-Schulz direction (the preconditioner ``|s| + eps`` or the EMA, the ADMM update)
            as ``torch.compile``'d kernels (:mod:`pisa.fused`); the momentum and the
            orthogonalisation run as before. ``None`` / ``False`` (default): the foreach path.
        none_grad: ``"skip"`` (default, as torch: a parameter without ``.grad`` in the whole
            round is untouched) or ``"zero"`` (a missing gradient is a zero gradient).
        check_distributed: at the first distributed step, raise when the ranks' parameters
            differ or their gradients were averaged (DDP / accelerate).
        capturable, differentiable: only ``False`` is supported.
        bucket_mb: distributed mode: MiB per bucket of the consensus all-reduce (persistent
            buffers, a bucket never mixes devices or dtypes), each bucket started
            asynchronously once its parameters' local step is done (``None``: one bucket per
            device and dtype, after the whole step). The same sums either way.
        comm_dtype: distributed mode: the dtype the consensus sum travels in (e.g.
            ``torch.bfloat16``: half the bytes, each contribution and the sum rounded);
            ``None`` (default): the parameters' dtype.
        sigma_power: ``sigma_t = sigma (lr_0 / lr_t)^p`` while ``rho_t = rho lr_0 / lr_t``;
            default 1 (``sigma / rho`` kept); 2: the official GPT-2 124M code's warmdown.
        consensus_dtype: virtual workers: form the consensus ``sum_i alpha_i (sigma_t w_i +
            pi_i)`` in this dtype (e.g. ``"bfloat16"``, as the official GPT-2 code's
            all-reduce), rounding ``w`` every round; ``None`` (default): exact. See
            :class:`~pisa.PISA`.
    """

    _elementwise_direction = False
    _uses_momentum = True

    def __init__(
        self,
        params: ParamsT,
        lr: LR | None = None,
        sigma: float | None = None,
        *,
        rho: float | None = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | str | None = None,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-8,
        preconditioner: Preconditioner | str = "abs",
        beta: float = 0.9,
        zero_guard: float | None = None,
        vectors: str = "sisa",
        vector_beta: float = 0.999,
        l2_lambda: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        n_workers: int | None = None,
        worker_weights: Sequence[float] | None = None,
        distributed: bool | None = None,
        dual_init: float = 0.0,
        scaled_dual: bool = False,
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
        _check_beta(beta)
        if sigma is None:  # c = sigma * lr = 4/9: the paper's GPT-2 ratio sigma : rho = 80 : 100
            sigma = DEFAULT_C / (1.0 - DEFAULT_C) * rho if rho is not None else (
                DEFAULT_C / _lr_value(1e-3 if lr is None else lr)
            )
        if isinstance(preconditioner, str):
            name = preconditioner.lower()
            if name in ("abs", "abs_value"):
                preconditioner = AbsValue(eps=eps)
            elif name == "ema":
                preconditioner = EMA(beta=beta, eps=eps)
            else:
                raise ValueError(
                    f"preconditioner must be 'abs', 'ema' or an instance, got {name!r}"
                )
        if isinstance(ns_dtype, str):
            ns_dtype = parse_dtype(ns_dtype, "ns_dtype")
        if vectors not in _VECTOR_MODES:
            raise ValueError(f"vectors must be one of {_VECTOR_MODES}, got {vectors!r}")
        self._vector_precond = SecondMoment(beta=vector_beta, eps=eps, beta_key="vector_beta")
        self._ns_defaults = {
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "ns_coefficients": tuple(ns_coefficients),
            "ns_eps": 1e-7,
            "zero_guard": zero_guard,
            "vectors": vectors,
            **self._vector_precond.defaults(),
        }
        super().__init__(
            params,
            lr,
            sigma,
            rho=rho,
            l2_lambda=l2_lambda,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            preconditioner=preconditioner,
            n_workers=n_workers,
            worker_weights=worker_weights,
            distributed=distributed,
            dual_init=dual_init,
            scaled_dual=scaled_dual,
            track_residuals=track_residuals,
            maximize=maximize,
            foreach=foreach,
            none_grad=none_grad,
            check_distributed=check_distributed,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            bucket_mb=bucket_mb,
            comm_dtype=comm_dtype,
            sigma_power=sigma_power,
            consensus_dtype=consensus_dtype,
        )

    @staticmethod
    def _is_matrix(p: Tensor) -> bool:
        return p.ndim >= 2 and p.numel() > 0

    def _vector_path(self, group: dict[str, Any]) -> bool:
        """True when the group's non-matrix parameters take the SISA step."""
        return group.get("vectors", "sisa") == "sisa"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`PISA.add_param_group`; with ``vectors="error"`` a non-matrix parameter
        raises ``ValueError``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["vectors"] == "error":
            bad = [tuple(p.shape) for p in group["params"] if not self._is_matrix(p)]
            if bad:
                self.param_groups.pop()
                raise ValueError(
                    f"NSISA(vectors='error') takes matrices only, got parameters of shapes {bad}; "
                    "use vectors='sisa' or route them to a companion (pisa.hybrid_nsisa)"
                )

    def _param_state_keys(self, p: Tensor, group: dict[str, Any]) -> tuple[str, ...]:
        if self._is_matrix(p) or not self._vector_path(group):
            return self._worker_state_keys()
        return ("dual", *self._vector_precond.state_keys)

    def _group_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        targets: list[Tensor],
        worker: _Worker,
        aux: list[Tensor] | None,
    ) -> None:
        """Matrices: the Newton-Schulz direction; vectors: SISA's elementwise step (default)."""
        if not self._vector_path(group):
            super()._group_step(group, params, grads, targets, worker, aux)
            return
        paths = {
            True: _Path(self._worker_state_keys(), False, self._search_direction,
                        self.preconditioner),
            False: _Path(("dual", *self._vector_precond.state_keys), True,
                         super()._search_direction, self._vector_precond),
        }
        for matrices, path in paths.items():
            idx = [j for j, p in enumerate(params) if self._is_matrix(p) == matrices]
            if not idx:
                continue
            sub = [[lst[j] for j in idx] for lst in (params, grads, targets)]
            sub_aux = None if aux is None or not matrices else [aux[j] for j in idx]
            self._run(group, *sub, worker, sub_aux, path)

    def _direction_defaults(self) -> dict[str, Any]:
        return dict(self._ns_defaults)

    def _direction_state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _validate_direction(self, group: dict[str, Any]) -> None:
        super()._validate_direction(group)  # momentum in [0, 1)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be a bool, got {group['nesterov']!r}")
        if group["vectors"] not in _VECTOR_MODES:
            raise ValueError(f"vectors must be one of {_VECTOR_MODES}, got {group['vectors']!r}")
        self._vector_precond.validate(group)
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"ns_steps must be an integer >= 0, got {steps!r}")
        dt = group["ns_dtype"]
        if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise ValueError(f"ns_dtype must be None or a floating torch.dtype, got {dt!r}")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError("ns_coefficients must be three numbers (a, b, c)")
        zg = group["zero_guard"]
        if zg is not None and not 0.0 < zg < 1.0:
            raise ValueError(f"zero_guard must be None or in (0, 1), got {zg}")

    def _search_direction(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        wstate: dict[str, list[Tensor]],
        step: int,
    ) -> list[Tensor]:
        mu, nesterov = group["momentum"], group["nesterov"]
        kc = self._coupled_wd(group)
        g = torch._foreach_add(grads, params, alpha=kc) if kc else grads
        buf, pi = wstate["momentum_buffer"], wstate["dual"]
        for b, gj in zip(buf, g):  # B <- g + mu B in one pass
            torch.add(gj, b, alpha=mu, out=b)
        s: list[Tensor | None] = [None] * len(params)
        # vectors / scalars: s = M + pi
        vec = [j for j, p in enumerate(params) if p.ndim < 2 or p.numel() == 0]
        if vec:
            if nesterov:
                M = torch._foreach_add([g[j] for j in vec], [buf[j] for j in vec], alpha=mu)
                torch._foreach_add_(M, [pi[j] for j in vec])
            else:
                M = torch._foreach_add([buf[j] for j in vec], [pi[j] for j in vec])
            for j, m in zip(vec, M):
                s[j] = m
        # matrices, batched by shape: M is written straight into the Newton-Schulz buffer and
        # s = scale * NS(M) + pi is formed from its output (no parameter-sized copies of M)
        buckets: dict[tuple[int, int, torch.dtype, torch.device], list[int]] = {}
        for j, p in enumerate(params):
            if p.ndim >= 2 and p.numel() > 0:
                rows = p.size(0)
                buckets.setdefault((rows, p.numel() // rows, p.dtype, p.device), []).append(j)
        for (rows, cols, dtype, device), idx in buckets.items():
            ns_dtype = group["ns_dtype"] or default_ns_dtype(device, dtype)
            X = torch.empty((len(idx), rows, cols), dtype=ns_dtype, device=device)
            for k, j in enumerate(idx):
                if nesterov:
                    torch.add(
                        g[j].reshape(rows, cols), buf[j].reshape(rows, cols), alpha=mu, out=X[k]
                    )
                else:
                    X[k].copy_(buf[j].reshape(rows, cols))
            X = newton_schulz_(X, group["ns_steps"], group["ns_eps"], group["ns_coefficients"])
            scale = math.sqrt(max(1.0, rows / cols))
            for k, j in enumerate(idx):
                s[j] = torch.add(pi[j], X[k].reshape(pi[j].shape), alpha=scale)
        out = [x for x in s if x is not None]
        zg = group["zero_guard"]
        if zg is not None:
            tiny = zg**step
            for x in out:
                x.add_((x == 0).to(x.dtype), alpha=tiny)
        return out

    def _direction_batches(self, params: list[Tensor], size: int | None) -> list[list[int]]:
        """Same-shaped matrices together (one batched Newton-Schulz), at most ``4 * size``
        elements per batch when ``size`` is set (CPU); vectors in one batch."""
        if size is None:
            return [list(range(len(params)))]
        limit = 4 * size
        by_shape: dict[tuple[int, int, torch.dtype, torch.device], list[int]] = {}
        vectors: list[int] = []
        for j, p in enumerate(params):
            if p.ndim >= 2 and p.numel() > 0:
                key = (p.size(0), p.numel() // p.size(0), p.dtype, p.device)
                by_shape.setdefault(key, []).append(j)
            else:
                vectors.append(j)
        batches: list[list[int]] = []
        for idx in by_shape.values():
            per_batch = max(1, limit // params[idx[0]].numel())
            batches += [idx[a : a + per_batch] for a in range(0, len(idx), per_batch)]
        if vectors:
            batches.append(vectors)
        return batches
