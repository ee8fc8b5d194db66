r"""SISA: PISA with an RMSprop-type second moment of ``g + pi`` as the preconditioner."""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim.optimizer import ParamsT

from .admm import PISA
from .preconditioners import SecondMoment

__all__ = ["SISA"]


class SISA(PISA):
    r"""Scaled inexact stochastic ADMM (PISA with :class:`~pisa.preconditioners.SecondMoment`).

    One round (``t`` = round number; ``lr_t = 1/(sigma_t + rho_t)`` as in :class:`~pisa.PISA`)::

        for each worker i:
            g_i  = grad F_i(w)  [+ kappa w  if coupled]
            s_i  = g_i + pi_i
            v_i  = beta v_i + (1 - beta) s_i^2                 (second moment of g + pi)
            q_i  = sqrt(v_i / (1 - beta^t)) + eps
            w_i  = w - s_i / (sigma_t + rho_t q_i)  [- lr_t kappa w  if decoupled]
            pi_i = pi_i + sigma_t (w_i - w)
        w = sum_i alpha_i (sigma_t w_i + pi_i) / (sigma_t + lambda)

    State per worker: ``dual`` (pi_i) and ``exp_avg_sq`` (v_i), two parameter copies.

    Args:
        beta: second-moment decay in ``[0, 1)``.
        eps: added to ``q`` (>= 0).
        All other arguments: see :class:`~pisa.PISA`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
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
        track_residuals: bool = True,
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
            track_residuals=track_residuals,
        )
