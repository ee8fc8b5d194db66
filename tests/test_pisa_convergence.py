"""Heterogeneous clients (PISA reaches the global optimum, FedAvg does not) and the Hutchinson
second-order preconditioner."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pisa
from pisa.preconditioners import Hutchinson, hutchinson_diagonal

DT = torch.float64


def heterogeneous_problem(d: int = 6, m: int = 4):
    """F_i(w) = 1/2 (w - c_i)^T A_i (w - c_i) with different SPD A_i and centres c_i."""
    gen = torch.Generator().manual_seed(7)
    A, C = [], []
    for _ in range(m):
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
        A.append(Q @ torch.diag(torch.rand(d, generator=gen, dtype=DT) * 2.5 + 0.5) @ Q.T)
        C.append(2.0 * torch.randn(d, generator=gen, dtype=DT))
    alpha = [0.1, 0.2, 0.3, 0.4][:m]
    lam = 0.05
    # optimum of sum_i alpha_i F_i(w) + lam/2 ||w||^2
    H = sum(a * Ai for a, Ai in zip(alpha, A)) + lam * torch.eye(d, dtype=DT)
    w_star = torch.linalg.solve(H, sum(a * Ai @ ci for a, Ai, ci in zip(alpha, A, C)))
    return A, C, alpha, lam, w_star


def fedavg(A, C, alpha, lam, rounds: int, local_steps: int, eta: float) -> torch.Tensor:
    """FedAvg: each client runs local SGD steps from w, the server averages (weights alpha)."""
    w = torch.zeros_like(C[0])
    for _ in range(rounds):
        new = torch.zeros_like(w)
        for Ai, ci, a in zip(A, C, alpha):
            wi = w.clone()
            for _ in range(local_steps):
                wi -= eta * (Ai @ (wi - ci) + lam * wi)
            new += a * wi
        w = new
    return w


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, **kw: pisa.PISA(ps, lr=0.1, sigma=2.0, **kw),
        lambda ps, **kw: pisa.SISA(ps, lr=0.05, sigma=5.0, beta=0.99, **kw),
    ],
    ids=["pisa", "sisa"],
)
def test_heterogeneous_clients_reach_global_optimum(make) -> None:
    A, C, alpha, lam, w_star = heterogeneous_problem()
    m, rounds = len(A), 400
    w = nn.Parameter(torch.zeros_like(w_star))
    opt = make([w], n_workers=m, worker_weights=alpha, l2_lambda=lam)
    for _ in range(rounds):
        for i in range(m):
            assert opt.worker_index == i
            w.grad = A[i] @ (w.detach() - C[i])  # worker i sees only its own client's F_i
            opt.step()
    err_pisa = float((w.detach() - w_star).norm())
    err_fedavg = float((fedavg(A, C, alpha, lam, rounds, local_steps=10, eta=0.1) - w_star).norm())
    assert err_pisa < 1e-8
    assert err_fedavg > 1e-2
    assert err_fedavg > 1e4 * err_pisa
    # at the optimum the local copies agree with w
    assert opt.telemetry()["primal_residual"] < 1e-6


def quadratic(d: int = 6, diagonal: bool = False):
    gen = torch.Generator().manual_seed(3)
    if diagonal:
        H = torch.diag(torch.rand(d, generator=gen, dtype=DT) * 3 + 0.5)
    else:
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
        H = Q @ torch.diag(torch.rand(d, generator=gen, dtype=DT) * 3 + 0.5) @ Q.T
    b = torch.randn(d, generator=gen, dtype=DT)
    return H, b


def test_hutchinson_estimate_converges_to_hessian_diagonal() -> None:
    H, b = quadratic()
    w = torch.randn(len(b), dtype=DT, requires_grad=True)
    loss = 0.5 * w @ H @ w + b @ w
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    (est,) = hutchinson_diagonal([g], [w], n_samples=n, generator=gen, retain_graph=True)
    # per-sample variance of entry j is sum_{k != j} H_jk^2
    off = H - torch.diag(torch.diagonal(H))
    std = torch.sqrt((off**2).sum(1) / n)
    z_scores = (est - torch.diagonal(H)).abs() / std
    assert float(z_scores.max()) < 5.0
    # a single sample is far noisier than the average of n
    (one,) = hutchinson_diagonal([g], [w], n_samples=1, generator=gen, retain_graph=True)
    assert float((one - torch.diagonal(H)).norm()) > 5 * float((est - torch.diagonal(H)).norm())


def test_hutchinson_exact_on_diagonal_hessian() -> None:
    H, b = quadratic(diagonal=True)
    w = torch.randn(len(b), dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(0.5 * w @ H @ w + b @ w, w, create_graph=True)
    (est,) = hutchinson_diagonal([g], [w], n_samples=1)  # z_j^2 = 1 for Rademacher z
    torch.testing.assert_close(est, torch.diagonal(H), atol=1e-14, rtol=0)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("m", [1, 2])
def test_optimizer_with_hutchinson_preconditioner(m: int) -> None:
    H, b = quadratic()
    shifts = [torch.zeros_like(b), 0.5 * torch.ones_like(b)][:m]
    w = nn.Parameter(torch.zeros_like(b))
    precond = Hutchinson(beta=0.99, eps=1e-8, seed=1)
    opt = pisa.PISA([w], lr=0.2, sigma=2.0, preconditioner=precond, n_workers=m)
    assert opt.requires_create_graph
    for _ in range(400):
        for i in range(m):
            x = w - shifts[i]  # worker i: F_i(w) = 1/2 (w-s_i)^T H (w-s_i) + b^T (w-s_i)
            loss = 0.5 * x @ H @ x + b @ x
            loss.backward(create_graph=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    mean_shift = sum(shifts) / m
    w_star = mean_shift - torch.linalg.solve(H, b)
    assert float((w.detach() - w_star).norm()) < 1e-8
    # the stored estimate (bias-corrected EMA, beta = 0.99) is close to diag(H)
    h_hat = opt.state[w]["hess_diag"][0] / (1 - 0.99 ** opt.rounds)
    off = H - torch.diag(torch.diagonal(H))
    std_one = torch.sqrt((off**2).sum(1))
    ema_std = std_one * math.sqrt((1 - 0.99) / (1 + 0.99))
    assert float(((h_hat - torch.diagonal(H)).abs() / ema_std).max()) < 5.0


def test_hutchinson_needs_create_graph() -> None:
    H, b = quadratic()
    w = nn.Parameter(torch.zeros_like(b))
    opt = pisa.PISA([w], lr=0.1, sigma=1.0, preconditioner="hutchinson")
    (0.5 * w @ H @ w + b @ w).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
