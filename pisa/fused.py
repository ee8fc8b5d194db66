r"""The compiled (``fused=True``) elementwise step of PISA, SISA and NSISA.

Everything of a worker's local step after the direction is elementwise: per parameter tensor one
``torch.compile``'d kernel (inductor: C++/OpenMP on CPU, Triton on CUDA) reads ``w, g, pi, v``
(and the target when ``m > 1``) once and writes ``pi, v`` and the target once, instead of the
foreach path's ~10 passes over parameter-sized temporaries. With the foreach path's coefficients
(all computed on the host, as floats, by :meth:`pisa.PISA._admm_update`'s formulas)::

    s   = d [+ pi] + kc * w                        (d = g: PISA/SISA, NSISA vectors; else s given)
    v   = beta * v + ((1 - beta) * s) * s          (second_moment)
    Q   = sqrt(v) + shift'   |   |s| + shift'      (second_moment | abs; identity: no Q)
    e   = s / Q + kdk * w                          (holds k * e; identity: e = s + kdk * w)
    tgt = (tgt + a_pi * pi) + a_e * e              (tgt = w in place when m = 1)
    pi  = pi + a_dual * e
    tel += t_e * sum(e^2)                          (telemetry; sum(pi^2): see PISA.telemetry)

Arithmetic runs in the parameter dtype (``float32`` / ``float64``; ``bfloat16`` / ``float16`` in
``float32`` with one rounding per stored value, where the foreach path rounds every
intermediate). The coefficients travel as one ``float64`` tensor, so a scheduler changing ``lr``
(or ``beta``, ``weight_decay``, ...) does not recompile; shapes are dynamic (tensors are passed
flat), so one graph per kernel variant and dtype serves every parameter.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["PRECONDITIONERS", "admm_kernel", "flat", "fused_supported", "precond_kind"]

#: preconditioner kinds the kernel implements (:func:`precond_kind` maps instances to them)
PRECONDITIONERS = ("identity", "second_moment", "abs")

# coefficient slots of the ``hp`` tensor
KC, BETA, ONE_MINUS_BETA, QSHIFT, KDK, A_PI, A_E, A_DUAL, T_E = range(9)
N_COEF = 9


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _update(
    w: Tensor,
    d: Tensor,
    pi: Tensor,
    v: Tensor | None,
    tgt: Tensor | None,
    tel: Tensor | None,
    hp: Tensor,
    precond: str,
    add_dual: bool,
    uses_w: bool,
) -> None:
    """The kernel body (see the module docstring); ``tgt`` None: update ``w`` in place."""
    dt = _opmath(w.dtype)
    c = [hp[i].to(dt) for i in range(N_COEF)]
    pi0 = pi.to(dt)
    s = d.to(dt)
    if add_dual:
        s = s + pi0
    w0 = w.to(dt) if uses_w else None
    if w0 is not None:
        s = s + c[KC] * w0
    if precond == "second_moment":
        assert v is not None
        v1 = v.to(dt) * c[BETA] + (c[ONE_MINUS_BETA] * s) * s
        v.copy_(v1)
        e = s / (torch.sqrt(v1) + c[QSHIFT])
    elif precond == "abs":
        e = s / (torch.abs(s) + c[QSHIFT])
    else:
        e = s
    if w0 is not None:
        e = e + c[KDK] * w0
    base = w0 if tgt is None else tgt.to(dt)
    new_t = (base + c[A_PI] * pi0) + c[A_E] * e
    new_pi = pi0 + c[A_DUAL] * e
    (w if tgt is None else tgt).copy_(new_t)
    pi.copy_(new_pi)
    if tel is not None:
        # only sum(e^2) here: a sum that loads the dual (the buffer written) makes inductor stage
        # the whole new dual in a temporary, so the dual's norm is a separate read (in virtual
        # mode only when the telemetry is read); float64 avoids inductor's slow cascade
        # summation of float32
        e64 = e.to(torch.float64)
        tel.add_(((e64 * e64).sum() * hp[T_E]).to(tel.dtype))


_KERNELS: dict[tuple[Any, ...], Callable[..., None]] = {}


def admm_kernel(
    precond: str, add_dual: bool, uses_w: bool, in_place: bool, track: bool
) -> Callable[..., None]:
    """The compiled :func:`_update` for one variant, built on first use (``dynamic=True``,
    ``fullgraph=True``). Each variant gets its own copy of the code object, so that dynamo's
    per-function cache (8 entries) holds only that variant's graphs (one per dtype)."""
    key = (precond, add_dual, uses_w, in_place, track)
    fn = _KERNELS.get(key)
    if fn is None:
        name = f"_pisa_admm_{precond}{'_dual' if add_dual else ''}{'_w' if uses_w else ''}"
        code = _update.__code__.replace(co_name=name)
        if hasattr(code, "co_qualname"):  # Python >= 3.11
            code = code.replace(co_qualname=name)
        body = types.FunctionType(code, _update.__globals__, name)
        compiled = torch.compile(body, dynamic=True, fullgraph=True)

        def fn(
            w: Tensor, d: Tensor, pi: Tensor, v: Tensor | None, tgt: Tensor | None,
            tel: Tensor | None, hp: Tensor, _c: Callable[..., None] = compiled,
        ) -> None:
            # the sum goes into a 1-element tensor: a 0-d float64 input that the graph adds a
            # reduction to in place is not written back by inductor (torch 2.13, CPU)
            _c(w, d, pi, v, tgt, None if tel is None else flat(tel), hp, precond, add_dual,
               uses_w)

        _KERNELS[key] = fn
    return fn


def flat(t: Tensor) -> Tensor:
    """A contiguous tensor as a 1-D tensor on the same memory that is not a view (``set_``):
    dynamo guards on a view's base (its shape and strides), which would compile one graph per
    parameter shape; a plain tensor with a dynamic size needs one."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,)
    )


def precond_kind(precond: Any) -> str | None:
    """The kernel's name for a preconditioner, or None when it has no fused form (a subclass
    that overrides ``compute`` has none)."""
    from .preconditioners import AbsValue, Identity, SecondMoment

    for cls, kind in ((Identity, "identity"), (SecondMoment, "second_moment"),
                      (AbsValue, "abs")):
        if isinstance(precond, cls) and type(precond).compute is cls.compute:
            return kind
    return None


def fused_supported(device: torch.device) -> bool:
    """True where inductor compiles the kernel: CPU (needs a C++ compiler), CUDA, XPU."""
    return device.type in ("cpu", "cuda", "xpu")
