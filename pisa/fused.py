r"""The compiled (``fused=True``) elementwise step of PISA, SISA and NSISA: inductor's kernels
(CUDA; on CPU :mod:`pisa.cpu_kernel` runs the same loop in C++, and these kernels only where it
cannot, or with ``PISA.fused_cpu_backend = "inductor"``).

Everything of a worker's local step after the direction is elementwise: per parameter tensor
one loop of a ``torch.compile``'d graph (inductor: C++/OpenMP on CPU, Triton on CUDA) reads
``w, g, pi, v`` (and the target when ``m > 1``) once and writes ``pi, v`` and the target once,
instead of the foreach path's ~10 passes over parameter-sized temporaries. One graph covers a
pack of up to :data:`MAX_PACK` tensors (:func:`packs`), so a step is a few compiled calls. With
the foreach path's coefficients (all computed on the host, as floats, by
:meth:`pisa.PISA._admm_update`'s formulas)::

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
flat), so one graph per kernel variant, pack pattern (:func:`size_pattern`) and dtype serves every
pack of that pattern.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PRECONDITIONERS", "admm_kernel", "flat", "fused_supported", "packs", "precond_kind",
    "size_pattern",
]

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


def _update_pack(
    ws: list[Tensor], ds: list[Tensor], pis: list[Tensor], vs: list[Tensor] | None,
    tgts: list[Tensor] | None, tel: Tensor | None, hp: Tensor, precond: str, add_dual: bool,
    uses_w: bool,
) -> None:
    """:func:`_update` on each tensor of a pack (one graph: one compiled call per pack)."""
    for j in range(len(ws)):
        _update(ws[j], ds[j], pis[j], None if vs is None else vs[j],
                None if tgts is None else tgts[j], tel, hp, precond, add_dual, uses_w)


#: most tensors per compiled call: a pack of n tensors is one graph (one dispatch instead of n,
#: and on CPU about 8% less time than n single-tensor graphs over GPT-2's tensors); its compile
#: time grows with n
MAX_PACK = 32
#: most pack kernels compiled in a process: beyond it a pack of a new size pattern runs tensor by
#: tensor (single-tensor kernels, whose few patterns serve every size), so a parameter set that
#: changes from step to step (gradients that are sometimes ``None``) cannot compile without end
MAX_KERNELS = 64

_KERNELS: dict[tuple[Any, ...], Callable[..., None]] = {}


def packs(n: int, max_pack: int = MAX_PACK) -> list[slice]:
    """``range(n)`` cut into packs whose lengths are powers of two (at most ``max_pack``),
    largest first, so that every list length reuses at most ``log2(max_pack) + 1`` shapes of
    graph."""
    out, start = [], 0
    while start < n:
        size = max_pack
        while size > n - start:
            size //= 2
        out.append(slice(start, start + size))
        start += size
    return out


def size_pattern(sizes: list[int]) -> tuple[int, ...]:
    """Which tensors of a pack have equal sizes (the index of each size's first occurrence; -1
    for size 1, -2 for the size of the coefficient tensor): dynamo gives equal sizes one symbol
    and guards that they stay equal, and specialises size 1, so a graph serves exactly the packs
    with its pattern."""
    first: dict[int, int] = {}
    return tuple(-1 if n == 1 else -2 if n == N_COEF else first.setdefault(n, j)
                 for j, n in enumerate(sizes))


def admm_kernel(
    precond: str, add_dual: bool, uses_w: bool, in_place: bool, track: bool,
    pattern: tuple[int, ...],
) -> Callable[..., None] | None:
    """The compiled :func:`_update_pack` for one variant and size pattern, built on first use
    (``dynamic=True``, ``fullgraph=True``). Each gets its own copy of the code object, so that
    dynamo's per-function cache (8 entries) holds only its graphs (one per dtype); the sizes are
    dynamic, so a pattern compiles once whatever the sizes. None for a new pattern of more than
    one tensor once :data:`MAX_KERNELS` kernels exist (run the pack tensor by tensor)."""
    key = (precond, add_dual, uses_w, in_place, track, pattern)
    fn = _KERNELS.get(key)
    if fn is None and len(pattern) > 1 and len(_KERNELS) >= MAX_KERNELS:
        return None
    if fn is None:
        name = f"_pisa_admm_{precond}{'_dual' if add_dual else ''}{'_w' if uses_w else ''}"
        name += f"_{len(_KERNELS)}"
        code = _update_pack.__code__.replace(co_name=name)
        if hasattr(code, "co_qualname"):  # Python >= 3.11
            code = code.replace(co_qualname=name)
        body = types.FunctionType(code, _update_pack.__globals__, name)
        compiled = torch.compile(body, dynamic=True, fullgraph=True)

        def fn(
            ws: list[Tensor], ds: list[Tensor], pis: list[Tensor], vs: list[Tensor] | None,
            tgts: list[Tensor] | None, tel: Tensor | None, hp: Tensor,
            _c: Callable[..., None] = compiled,
        ) -> None:
            # the sum goes into a 1-element tensor: a 0-d float64 input that the graph adds a
            # reduction to in place is not written back by inductor (torch 2.13, CPU)
            _c(ws, ds, pis, vs, tgts, None if tel is None else flat(tel), hp, precond, add_dual,
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
