r"""NSISA: PISA whose direction is Nesterov momentum orthogonalised by Newton-Schulz (as Muon)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .admm import PISA
from .newton_schulz import NS_COEFFICIENTS, default_ns_dtype, newton_schulz_
from .preconditioners import EMA, AbsValue, Preconditioner

__all__ = ["NSISA"]


def _parse_dtype(name: str) -> torch.dtype:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "fp64": "float64", "double": "float64"}
    key = aliases.get(name.lower().removeprefix("torch."), name.lower().removeprefix("torch."))
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"ns_dtype must be a floating dtype name, got {name!r}")
    return dtype


class NSISA(PISA):
    r"""Newton-Schulz inexact stochastic ADMM.

    One round (``t`` = round number; ``lr_t = 1/(sigma_t + rho_t)`` as in :class:`~pisa.PISA`)::

        for each worker i:
            g_i  = grad F_i(w)  [+ kappa w  if coupled]
            B_i  = mu B_i + g_i
            M_i  = g_i + mu B_i                       (nesterov; else M_i = B_i)
            d_i  = NS5(M_i) * sqrt(max(1, rows/cols))  for >= 2-D tensors (conv: (out, in*k*k)),
                   M_i                                  for vectors and scalars
            s_i  = d_i + pi_i
            q_i  = |s_i| + eps                          (or the EMA variant, preconditioner="ema")
            w_i  = w - s_i / (sigma_t + rho_t q_i)  [- lr_t kappa w  if decoupled]
            pi_i = pi_i + sigma_t (w_i - w)
        w = sum_i alpha_i (sigma_t w_i + pi_i) / (sigma_t + lambda)

    ``NS5``: five quintic Newton-Schulz steps, ``X = M / (||M||_F + 1e-7)`` (transposed when
    ``rows > cols``), ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` with
    ``(a, b, c) = (3.4445, -4.7750, 2.0315)`` (:mod:`pisa.newton_schulz`); same-shaped matrices are
    orthogonalised as one batch. State per worker: ``dual`` and ``momentum_buffer``.

    The denominator ``sigma_t + rho_t q`` is at least ``sigma_t > 0``, so zero entries of ``s``
    cannot produce ``0/0``; ``zero_guard=eps0`` adds ``eps0**t`` to them as the paper's code does.

    Embeddings and output heads are usually better trained by a companion optimizer (AdamW), see
    :func:`pisa.hybrid_nsisa`.

    Args:
        momentum: ``mu`` in ``[0, 1)``.
        nesterov: Nesterov momentum.
        ns_steps: Newton-Schulz iterations (>= 0).
        ns_dtype: dtype of the iteration (a ``torch.dtype`` or a name such as ``"bfloat16"``);
            default bfloat16 on every device (as the paper and torch's Muon), float64 for
            float64 parameters.
        ns_coefficients: ``(a, b, c)``.
        eps: added to ``q``.
        preconditioner: ``"abs"`` (``|s| + eps``, default), ``"ema"``
            (``sqrt(v / (1 - beta^t)) + eps``, ``v = beta v + (1 - beta) s^2``) or any
            :class:`~pisa.preconditioners.Preconditioner`.
        beta: the EMA variant's decay.
        zero_guard: ``eps0`` or ``None`` (off).
        All other arguments: see :class:`~pisa.PISA`.
    """

    _elementwise_direction = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        sigma: float = 1.0,
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
        l2_lambda: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        n_workers: int | None = None,
        worker_weights: Sequence[float] | None = None,
        distributed: bool | None = None,
        dual_init: float = 0.0,
        track_residuals: bool = True,
    ) -> None:
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
            ns_dtype = _parse_dtype(ns_dtype)
        self._ns_defaults = {
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "ns_coefficients": tuple(ns_coefficients),
            "ns_eps": 1e-7,
            "zero_guard": zero_guard,
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
            track_residuals=track_residuals,
        )

    def _direction_defaults(self) -> dict[str, Any]:
        return dict(self._ns_defaults)

    def _direction_state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _validate_direction(self, group: dict[str, Any]) -> None:
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
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
