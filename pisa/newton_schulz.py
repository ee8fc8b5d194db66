r"""Quintic Newton-Schulz orthogonalisation (the direction map of NSISA and Muon).

For a matrix :math:`G = U S V^\top`, the iteration drives every singular value of
:math:`X_0 = G / (\|G\|_F + \epsilon)` towards one without an SVD::

    A_k     = X_k X_k^T
    X_{k+1} = a X_k + b A_k X_k + c A_k^2 X_k        (a, b, c) = (3.4445, -4.7750, 2.0315)

(written ``X = a X + (b A + c A A) X``, one matrix product cheaper than ``a X + b A X + c A (A X)``
when the matrix is wide). The iteration acts on each singular value separately through the scalar
polynomial ``p(x) = a x + b x^3 + c x^5``; with these coefficients five steps map ``(0, 1]`` into a
band around one (about 0.7 to 1.2) rather than onto one, which is what Muon and NSISA want.
A matrix with more rows than columns gets the transposed iteration, written without transposes
(``A = X^T X``, ``X = a X + X (b A + c A A)``), so that ``A`` is always the small Gram matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "NS_COEFFICIENTS",
    "default_ns_dtype",
    "newton_schulz",
    "newton_schulz_",
    "ns_polynomial",
    "orthogonalize",
]

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def default_ns_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """bfloat16 on accelerators (as the paper and torch's Muon); float32 on CPU; float64 for
    float64 parameters (reference checks).

    On CPU, bfloat16 matmuls are fast only on processors with native bf16 units (AMX,
    AVX512-BF16): on an AVX2 AMD EPYC they measured 30-60x slower than float32 at every width
    from 64 to 768 (``scripts/bench_optimizers.py``, rows ``nsisa`` / ``nsisa_bf16``). Pass
    ``ns_dtype=torch.bfloat16`` to get the paper's rounding on CPU."""
    if dtype == torch.float64:
        return torch.float64
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def ns_polynomial(
    x: Tensor | float, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS
) -> Tensor | float:
    """The scalar map that ``steps`` iterations apply to each normalised singular value."""
    a, b, c = coefficients
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> Tensor:
    """Orthogonalise ``G`` (shape ``(..., rows, cols)``; leading dims are a batch).

    Each matrix is normalised by its own Frobenius norm. The iteration runs in ``dtype`` (default:
    :func:`default_ns_dtype`) and the result is returned in that dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (or a batch of them), got shape {G.shape}")
    if dtype is None:
        dtype = default_ns_dtype(G.device, G.dtype)
    return newton_schulz_(G.to(dtype=dtype, copy=True), steps, eps, coefficients)


def newton_schulz_(
    X: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> Tensor:
    """:func:`newton_schulz` on a tensor it may overwrite (runs in ``X``'s dtype).

    A tall matrix uses the right-hand form ``A = X^T X``, ``X <- a X + X (b A + c A^2)``, which
    is the transposed iteration written without transposes (the result stays contiguous)."""
    a, b, c = coefficients
    shape = X.shape
    if X.ndim > 3:
        X = X.reshape(-1, X.size(-2), X.size(-1))
    tall = X.size(-2) > X.size(-1)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X.div_(norm.add_(eps))
    mm, addmm = (torch.bmm, torch.baddbmm) if X.ndim == 3 else (torch.mm, torch.addmm)
    for _ in range(steps):
        if tall:
            A = mm(X.mT, X)
            B = addmm(A, A, A, beta=b, alpha=c)
            X = addmm(X, X, B, beta=a)
        else:
            A = mm(X, X.mT)
            B = addmm(A, A, A, beta=b, alpha=c)
            X = addmm(X, B, X, beta=a)
    return X.reshape(shape) if len(shape) > 3 else X


def orthogonalize(
    M: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> Tensor:
    """NSISA / Muon direction of one weight: view ``M`` as ``(shape[0], -1)`` (convolutions),
    orthogonalise, scale by ``sqrt(max(1, rows / cols))``; returned with ``M``'s shape and dtype."""
    if M.ndim < 2:
        raise ValueError(f"orthogonalize needs a tensor with >= 2 dims, got shape {M.shape}")
    rows = M.size(0)
    M2 = M.reshape(rows, -1)
    cols = M2.size(1)
    X = newton_schulz(M2, steps=steps, eps=eps, dtype=dtype, coefficients=coefficients)
    X = X.to(M.dtype).reshape(M.shape)
    scale = math.sqrt(max(1.0, rows / cols))
    return X.mul_(scale) if scale != 1.0 else X
