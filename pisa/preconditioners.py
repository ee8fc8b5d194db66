r"""Diagonal preconditioners for the PISA local step.

The local step of worker ``i`` is ``w_i = w - s_i / (sigma + rho * q_i)`` with an elementwise,
positive ``q_i``. A preconditioner computes ``q_i`` from ``s_i = d_i + pi_i`` (and, for
second-order ones, from the gradient's graph). To let the optimizer fuse the denominator it returns
``(Q, scale, shift)`` meaning ``q = scale * Q + shift`` elementwise, with ``Q`` a list of fresh
tensors the optimizer may overwrite, or ``Q = None`` for the constant ``q = shift``.

Hyperparameters live in the optimizer's param groups (so schedulers and ``state_dict`` see them);
:meth:`Preconditioner.defaults` supplies their default values. Per-worker state tensors (one
parameter copy each) are named by :attr:`Preconditioner.state_keys` and kept by the optimizer.

* ``Identity``: ``q = 1`` (no state);
* ``SecondMoment`` (SISA): ``v = beta v + (1 - beta) s^2``, ``q = sqrt(v / (1 - beta^t)) + eps``
  (state ``v``); ``EMA``: the same with ``beta = 0.9`` (NSISA's EMA variant);
* ``AbsValue`` (NSISA): ``q = |s| + eps`` (no state);
* ``Hutchinson``: ``h = beta h + (1 - beta) z * (H z)``, ``q = |h / (1 - beta^t)| + eps``
  (state ``h``; Rademacher ``z``; needs ``create_graph=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EMA",
    "AbsValue",
    "Hutchinson",
    "Identity",
    "Preconditioner",
    "SecondMoment",
    "hutchinson_diagonal",
    "make_preconditioner",
]

QSpec = tuple[list[Tensor] | None, float, float]


def _check_beta(beta: float, name: str = "beta") -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta!r}")


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


class Preconditioner:
    """Base class: a diagonal ``q`` computed from ``s`` (see the module docstring)."""

    #: names of per-worker state tensors shaped like the parameter
    state_keys: tuple[str, ...] = ()
    #: True when the gradients must carry a graph (``loss.backward(create_graph=True)``)
    requires_create_graph: bool = False

    def defaults(self) -> dict[str, Any]:
        """Hyperparameters this preconditioner reads from each param group, with defaults."""
        return {}

    def validate(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for invalid hyperparameters of ``group``."""

    def prepare(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor] | None:
        """Called once per ``step()`` with every participating parameter and its raw ``.grad``
        (before any group is processed); the result is passed to :meth:`compute` as ``aux``,
        sliced per group. Default: nothing."""
        return None

    def compute(
        self,
        s: list[Tensor],
        state: dict[str, list[Tensor]],
        group: dict[str, Any],
        step: int,
        aux: list[Tensor] | None,
    ) -> QSpec:
        """Return ``(Q, scale, shift)`` with ``q = scale * Q + shift`` (``Q`` fresh or ``None``).
        ``state`` holds this worker's state tensors by name; ``step`` counts from 1."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Optimizer-wide state (e.g. a random generator); per-parameter state is elsewhere."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Identity(Preconditioner):
    """``q = 1``: the plain inexact ADMM step ``w_i = w - lr * s_i``."""

    def compute(self, s, state, group, step, aux) -> QSpec:
        return None, *self.coefficients(group, step)

    def coefficients(self, group: dict[str, Any], step: int) -> tuple[float, float]:
        """``(scale, shift)`` of ``q = scale * Q + shift`` (also used by the fused kernel)."""
        return 0.0, 1.0


class SecondMoment(Preconditioner):
    r"""SISA's preconditioner, an RMSprop-type second moment of ``s = g + pi`` (not of ``g``):
    ``v = beta * v + (1 - beta) * s^2``, ``q = sqrt(v / (1 - beta^t)) + eps`` (bias correction
    optional). Group keys: ``beta``, ``eps``."""

    state_keys = ("exp_avg_sq",)

    def __init__(
        self,
        beta: float = 0.999,
        eps: float = 1e-8,
        bias_correction: bool = True,
        *,
        beta_key: str = "beta",
    ):
        """``beta_key``: the group key holding ``beta`` (NSISA's vectors use ``vector_beta``)."""
        _check_beta(beta, beta_key)
        _check_eps(eps)
        self.beta, self.eps, self.bias_correction = beta, eps, bias_correction
        self.beta_key = beta_key

    def defaults(self) -> dict[str, Any]:
        return {self.beta_key: self.beta, "eps": self.eps}

    def validate(self, group: dict[str, Any]) -> None:
        _check_beta(group[self.beta_key], self.beta_key)
        _check_eps(group["eps"])

    def compute(self, s, state, group, step, aux) -> QSpec:
        beta = group[self.beta_key]
        v = state["exp_avg_sq"]
        torch._foreach_mul_(v, beta)
        torch._foreach_addcmul_(v, s, s, value=1.0 - beta)
        return torch._foreach_sqrt(v), *self.coefficients(group, step)

    def coefficients(self, group: dict[str, Any], step: int) -> tuple[float, float]:
        """``(scale, shift) = (1 / sqrt(1 - beta^t), eps)`` (scale 1 without bias correction)."""
        beta = group[self.beta_key]
        scale = 1.0 / (1.0 - beta**step) ** 0.5 if self.bias_correction else 1.0
        return scale, group["eps"]

    def __repr__(self) -> str:
        return f"SecondMoment(bias_correction={self.bias_correction})"


class EMA(SecondMoment):
    """The EMA variant of NSISA's preconditioner: :class:`SecondMoment` with ``beta = 0.9``."""

    def __init__(self, beta: float = 0.9, eps: float = 1e-8, bias_correction: bool = True):
        super().__init__(beta=beta, eps=eps, bias_correction=bias_correction)


class AbsValue(Preconditioner):
    """NSISA's default (official GPT-2 code): ``q = |s| + eps``. Group key: ``eps``."""

    def __init__(self, eps: float = 1e-8):
        _check_eps(eps)
        self.eps = eps

    def defaults(self) -> dict[str, Any]:
        return {"eps": self.eps}

    def validate(self, group: dict[str, Any]) -> None:
        _check_eps(group["eps"])

    def compute(self, s, state, group, step, aux) -> QSpec:
        return torch._foreach_abs(s), *self.coefficients(group, step)

    def coefficients(self, group: dict[str, Any], step: int) -> tuple[float, float]:
        """``(scale, shift) = (1, eps)``."""
        return 1.0, group["eps"]


GeneratorSpec = torch.Generator | Callable[[torch.device], torch.Generator] | None


def _rademacher(p: Tensor, generator: GeneratorSpec) -> Tensor:
    gen = generator(p.device) if callable(generator) else generator
    z = torch.randint(0, 2, p.shape, generator=gen, device=p.device, dtype=p.dtype)
    return z.mul_(2).sub_(1)


def hutchinson_diagonal(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    n_samples: int = 1,
    generator: GeneratorSpec = None,
    retain_graph: bool = False,
) -> list[Tensor]:
    r"""Hutchinson estimate of the Hessian diagonal, ``mean_k z_k * (H z_k)`` with Rademacher
    ``z_k``; ``grads`` must come from ``autograd.grad(..., create_graph=True)`` (or
    ``backward(create_graph=True)``). Unbiased: ``E[z * Hz] = diag(H)``; the variance of entry ``j``
    per sample is ``sum_{k != j} H_jk^2``. A gradient without a graph (``None``, or a loss linear
    in that parameter) has a zero Hessian block; if no gradient has a graph, ``RuntimeError``.
    ``generator``: a ``torch.Generator``, a function ``device -> Generator``, or ``None``."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    pairs = [
        (i, g) for i, g in enumerate(grads) if g is not None and g.grad_fn is not None
    ]
    if not pairs:
        raise RuntimeError(
            "the Hutchinson preconditioner needs gradients with a graph: call "
            "loss.backward(create_graph=True) (and zero_grad(set_to_none=True) after step)"
        )
    params = list(params)
    est = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
    live_params = [params[i] for i, _ in pairs]
    live_grads = [g for _, g in pairs]
    with torch.enable_grad():
        for k in range(n_samples):
            zs = [_rademacher(p, generator) for p in live_params]
            hz = torch.autograd.grad(
                live_grads,
                live_params,
                grad_outputs=zs,
                retain_graph=retain_graph or k < n_samples - 1,
                allow_unused=True,
            )
            for (i, _), z, h in zip(pairs, zs, hz):
                if h is not None:
                    est[i].addcmul_(z, h.detach())
    if n_samples > 1:
        torch._foreach_div_(est, float(n_samples))
    return est


class Hutchinson(Preconditioner):
    r"""Second-order preconditioner: an EMA of Hutchinson estimates of the Hessian diagonal,
    ``h = beta * h + (1 - beta) * z * (H z)``, ``q = |h / (1 - beta^t)| + eps``.

    Needs ``loss.backward(create_graph=True)``. Each ``step()`` costs one Hessian-vector product
    (a second backward through the graph) per sample. ``z`` is drawn from the optimizer's own
    generator (seeded by ``seed``; its state is part of ``state_dict``). Group keys:
    ``hessian_beta``, ``eps``."""

    state_keys = ("hess_diag",)
    requires_create_graph = True

    def __init__(self, beta: float = 0.95, eps: float = 1e-8, n_samples: int = 1, seed: int = 0):
        _check_beta(beta, "hessian_beta")
        _check_eps(eps)
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.beta, self.eps, self.n_samples, self.seed = beta, eps, n_samples, seed
        self._generators: dict[str, torch.Generator] = {}

    def defaults(self) -> dict[str, Any]:
        return {"hessian_beta": self.beta, "eps": self.eps}

    def validate(self, group: dict[str, Any]) -> None:
        _check_beta(group["hessian_beta"], "hessian_beta")
        _check_eps(group["eps"])

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def prepare(self, params, grads) -> list[Tensor] | None:
        if not params:
            return []
        return hutchinson_diagonal(
            grads, params, n_samples=self.n_samples, generator=self._generator
        )

    def compute(self, s, state, group, step, aux) -> QSpec:
        if aux is None:
            raise RuntimeError("Hutchinson.compute needs the Hessian-diagonal samples from prepare")
        beta = group["hessian_beta"]
        h = state["hess_diag"]
        torch._foreach_lerp_(h, aux, 1.0 - beta)
        Q = torch._foreach_abs(h)
        return Q, 1.0 / (1.0 - beta**step), group["eps"]

    def state_dict(self) -> dict[str, Any]:
        return {"generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, rng in state.get("generators", {}).items():
            self._generator(torch.device(key)).set_state(rng.cpu())

    def __repr__(self) -> str:
        return f"Hutchinson(n_samples={self.n_samples}, seed={self.seed})"


def make_preconditioner(spec: str | Preconditioner | None, default: str = "identity") -> (
    Preconditioner
):
    """A preconditioner from a name (``identity``, ``second_moment``/``sisa``, ``abs``,
    ``ema``, ``hutchinson``) or an instance (returned as is)."""
    if isinstance(spec, Preconditioner):
        return spec
    name = (default if spec is None else spec).lower()
    table: dict[str, type[Preconditioner]] = {
        "identity": Identity,
        "none": Identity,
        "second_moment": SecondMoment,
        "sisa": SecondMoment,
        "abs": AbsValue,
        "abs_value": AbsValue,
        "ema": EMA,
        "hutchinson": Hutchinson,
    }
    if name not in table:
        raise ValueError(f"unknown preconditioner {spec!r}; choose one of {sorted(table)}")
    return table[name]()
