"""Quintic Newton-Schulz: singular values land in the polynomial's band."""

from __future__ import annotations

import math

import pytest
import torch

from pisa.newton_schulz import newton_schulz, ns_polynomial, orthogonalize

SHAPES = [(64, 16), (16, 64), (24, 24), (48, 20), (20, 48)]  # tall, wide, square, ...
# band of p^5 on [3e-3, 1] for (a, b, c) = (3.4445, -4.7750, 2.0315) (see test_band_constants)
BAND = (0.6818, 1.2024)


def test_band_constants() -> None:
    x = torch.linspace(3e-3, 1.0, 400_001, dtype=torch.float64)
    y = ns_polynomial(x)
    assert float(y.min()) == pytest.approx(BAND[0], abs=1e-4)
    assert float(y.max()) == pytest.approx(BAND[1], abs=1e-4)


def random_matrix(shape, seed: int) -> torch.Tensor:
    G = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s0 = torch.linalg.svdvals(G) / G.norm()
    assert float(s0.min()) > 3e-3  # inside the range the band is computed for
    return G


@pytest.mark.parametrize("shape", SHAPES)
def test_singular_values_follow_the_polynomial(shape) -> None:
    G = random_matrix(shape, seed=sum(shape))
    X = newton_schulz(G, dtype=torch.float64)
    assert X.shape == G.shape
    sv = torch.linalg.svdvals(X)
    s0 = torch.linalg.svdvals(G) / (G.norm() + 1e-7)
    expected = torch.sort(ns_polynomial(s0), descending=True).values
    torch.testing.assert_close(sv, expected, atol=1e-10, rtol=0)
    # singular vectors are kept: X = U p(S) V^T
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(X, U @ torch.diag(ns_polynomial(S / (G.norm() + 1e-7))) @ Vh,
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_singular_values_in_band(shape, dtype) -> None:
    G = random_matrix(shape, seed=100 + sum(shape))
    sv = torch.linalg.svdvals(newton_schulz(G.to(dtype), dtype=dtype).double())
    # bfloat16 carries 8 significant bits: allow a few of its roundings (3 * 2^-8 relative)
    slack = 3 * 2.0**-8 if dtype == torch.bfloat16 else 1e-4
    assert float(sv.min()) >= BAND[0] * (1 - slack)
    assert float(sv.max()) <= BAND[1] * (1 + slack)


def test_batched_equals_per_matrix() -> None:
    G = torch.randn(3, 12, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batched = newton_schulz(G, dtype=torch.float64)
    for k in range(3):
        torch.testing.assert_close(batched[k], newton_schulz(G[k], dtype=torch.float64),
                                   atol=1e-12, rtol=0)


def test_orthogonalize_conv_reshape_and_scale() -> None:
    M = torch.randn(12, 2, 1, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = orthogonalize(M, dtype=torch.float64)
    assert out.shape == M.shape
    expected = newton_schulz(M.reshape(12, 4), dtype=torch.float64) * math.sqrt(12 / 4)
    torch.testing.assert_close(out.reshape(12, 4), expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="dims"):
        orthogonalize(torch.ones(3))


def test_default_ns_dtype_is_bfloat16_on_accelerators_only() -> None:
    """bfloat16 where the paper ran (GPU), float32 on CPU (no fast bf16 matmul), float64 kept."""
    from pisa.newton_schulz import default_ns_dtype

    assert default_ns_dtype(torch.device("cuda"), torch.float32) == torch.bfloat16
    assert default_ns_dtype(torch.device("cpu"), torch.float32) == torch.float32
    assert default_ns_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    assert default_ns_dtype(torch.device("cuda"), torch.float64) == torch.float64
    assert newton_schulz(torch.randn(8, 4)).dtype == torch.float32
