r"""SISA: PISA with an RMSprop-type second moment of ``g + pi`` as the preconditioner."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.optimizer import ParamsT

from .admm import LR, PISA
from .preconditioners import SecondMoment

__all__ = ["SISA"]


class SISA(PISA):
    r"""Scaled inexact stochastic ADMM (PISA with :class:`~pisa.preconditioners.SecondMoment`).

    One round (``t`` = round number; ``lr_t = 1/(sigma_t + rho_t)``, ``sigma_t = c / lr_t`` with
    ``c = sigma * lr_0`` fixed, as in :class:`~pisa.PISA`)::

        for each worker i:
            g_i  = grad F_i(w)  [+ kappa w  if coupled]        (-grad with maximize=True)
            s_i  = g_i + pi_i
            v_i  = beta v_i + (1 - beta) s_i^2                 (second moment of g + pi)
            q_i  = sqrt(v_i / (1 - beta^t)) + eps
            w_i  = w - s_i / (sigma_t + rho_t q_i)  [- lr_t kappa w  if decoupled]
                 = w - lr_t s_i / (c + (1 - c) q_i)
            pi_i = pi_i + sigma_t (w_i - w)
        w = sum_i alpha_i (sigma_t w_i + pi_i) / (sigma_t + lambda)

    With ``c -> 0`` the local step is RMSprop's ``lr s / q`` on ``s = g + pi``; with ``c -> 1``
    it is the plain ``lr s`` (README: "Choosing sigma and lr"). State per worker: ``dual``
    (pi_i) and ``exp_avg_sq`` (v_i), two parameter copies. SISA has no momentum: the group key
    ``momentum`` exists (0) so that momentum schedulers run; a non-zero value is ignored with a
    one-time warning.

    Args:
        params: parameters or param groups (each group may set its own hyperparameters).
        lr: ``1 / (sigma + rho)`` at the start (default ``1e-3``), in ``(0, 1/sigma)``; a float or
            a one-element Tensor.
        sigma: ADMM penalty at ``lr``, in ``(0, 1/lr)``.
        rho: alternative to ``lr``: ``lr = 1 / (sigma + rho)``, > 0.
        beta: second-moment decay in ``[0, 1)``.
        eps: added to ``q`` (>= 0).
        l2_lambda: global L2 ``lambda >= 0`` on ``w``.
        weight_decay: ``kappa >= 0``; coupled (added to ``g``) unless decoupled.
        decoupled_weight_decay: ``w_i -= lr * kappa * w`` (as AdamW) instead of coupling.
        n_workers: virtual workers ``m >= 1`` (distributed: the world size).
        worker_weights: ``alpha_i`` (non-negative, normalised), default equal.
        distributed: ``None`` auto (world size > 1), ``True`` / ``False`` to force.
        dual_init: initial value of every dual entry.
        scaled_dual: the official GPT-2 code's dual (default ``False``): each worker's stored
            dual is multiplied by its weight after its update, ``pi_i <- alpha_i (pi_i + sigma
            (w_i - w))``, shrinking it by ``1/m`` per round with equal workers; ``w`` of that
            round is the textbook one. For "paper settings" rows; not fused.
        first_grad_norm: the official VGG-11 CIFAR-10 code's step (default ``False``): worker
            ``i`` measures ``N_i = ||g_i + kappa w||`` (all parameters, once, at its first
            step) and divides its step and its dual's share by it from then on: ``w_i = w -
            s_i / (N_i (sigma_t + rho_t q_i))``, ``pi_i += sigma_t (w_i - w)``, ``w = sum_i
            alpha_i (sigma_t w_i + pi_i / N_i) / (sigma_t + lambda)``. ``N_i`` is optimizer
            state (``state_dict``); a first gradient of norm 0 raises ``RuntimeError``. For
            "paper settings" rows; not fused (with ``fused=True`` these groups take the foreach
            path). Not with ``scaled_dual``.
        l2_dual_only: the official VGG-11 CIFAR-10 code's consensus (default ``False``):
            ``w = sum_i alpha_i (w_i + pi_i / (N_i (sigma_t + lambda)))``, ``lambda`` on the
            dual's share only (``w`` is not shrunk by ``sigma_t / (sigma_t + lambda)``). For
            "paper settings" rows; not fused. Not with ``scaled_dual``.
        track_residuals: compute the primal residual and dual norm each round.
        maximize: maximise instead of minimise.
        foreach: ``None`` / ``True`` multi-tensor kernels, ``False`` one tensor at a time.
        fused: ``True``: the whole step (``g + pi``, the second moment, the ADMM update) as one
            ``torch.compile``'d call per pack of tensors (:mod:`pisa.fused`; same result up to
            rounding, same ``state_dict``); ``None`` / ``False`` (default): the foreach path.
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

    def __init__(
        self,
        params: ParamsT,
        lr: LR | None = None,
        sigma: float = 1.0,
        *,
        rho: float | None = None,
        beta: float = 0.999,
        eps: float = 1e-8,
        l2_lambda: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
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
        super().__init__(
            params,
            lr,
            sigma,
            rho=rho,
            l2_lambda=l2_lambda,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            preconditioner=SecondMoment(beta=beta, eps=eps),
            n_workers=n_workers,
            worker_weights=worker_weights,
            distributed=distributed,
            dual_init=dual_init,
            scaled_dual=scaled_dual,
            first_grad_norm=first_grad_norm,
            l2_dual_only=l2_dual_only,
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
