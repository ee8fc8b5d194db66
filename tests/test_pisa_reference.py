"""PISA / SISA / NSISA against a float64 reference written plainly from the paper's equations.

The reference below is deliberately naive (one tensor at a time, every w_i materialised, the
global update written as sum_i alpha_i (sigma w_i + pi_i) / (sigma + lambda)); it shares no code
with the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pisa

DT = torch.float64
SHAPES = [(5, 3), (3, 6), (4, 2, 2, 2), (4,)]  # tall, wide, conv (4 x 8), vector
ROUNDS = 20
LR0, SIGMA0 = 0.05, 4.0  # rho0 = 1/lr0 - sigma0 = 16
LAM, KAPPA = 0.01, 0.05
BETA, EPS = 0.9, 1e-8
MU = 0.9
NS_ABC = (3.4445, -4.7750, 2.0315)


def lr_factor(r: int) -> float:
    """A warm-up then step-decay schedule (LambdaLR multiplier of round r)."""
    return min(1.0, (r + 1) / 3) * 0.6 ** (r // 6)


def round_hyper(r: int, sigma_power: float = 1.0) -> tuple[int, float, float, float]:
    """``(t, lr_t, sigma_t, rho_t)`` of round r under the schedule: sigma_t follows
    ``(lr_0 / lr_t)^sigma_power``, rho_t follows ``lr_0 / lr_t`` (power 1: sigma_t lr_t fixed)."""
    lr = LR0 * lr_factor(r)
    sigma = SIGMA0 * (LR0 / lr) ** sigma_power
    return r + 1, lr, sigma, (1.0 / LR0 - SIGMA0) * LR0 / lr


def problem(m: int):
    gen = torch.Generator().manual_seed(1234)
    w0 = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    curv = [torch.rand(s, generator=gen, dtype=DT) + 0.5 for s in SHAPES]
    centres = [
        [[torch.randn(s, generator=gen, dtype=DT) for s in SHAPES] for _ in range(m)]
        for _ in range(ROUNDS)
    ]

    def grad(r: int, i: int, w: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradient of worker i's stochastic loss of round r at w (heterogeneous, nonlinear)."""
        return [a * (x - c) + 0.3 * torch.sin(x) for a, x, c in zip(curv, w, centres[r][i])]

    return w0, grad


def ref_newton_schulz(M: torch.Tensor) -> torch.Tensor:
    a, b, c = NS_ABC
    X = M / (M.norm() + 1e-7)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for _ in range(5):
        A = X @ X.T
        B = A @ X
        X = a * X + b * B + c * (A @ B)
    if transposed:
        X = X.T
    return X


def reference(kind: str, m: int, alphas: list[float], decoupled: bool, official: bool = False,
              sigma_power: float = 1.0, consensus_dtype: torch.dtype | None = None):
    """Plain PISA rounds; returns the global weights and telemetry after every round.

    ``official``: the official GPT-2 code's dual and all-reduce as that code writes them,
    ``pi_i <- alpha_i (pi_i + sigma (w_i - w))`` and ``w = sum_i (sigma alpha_i w_i + pi_i) /
    (sigma + lambda)``. ``sigma_power = p``: sigma follows ``(lr_0 / lr)^p`` while rho follows
    ``lr_0 / lr`` (the official 124M warmdown: p = 2). ``consensus_dtype``: that code's
    low-precision all-reduce buffer: each worker's term is rounded to it and summed in it."""
    w0, grad = problem(m)
    w = [x.clone() for x in w0]
    pi = [[torch.zeros_like(x) for x in w] for _ in range(m)]
    v = [[torch.zeros_like(x) for x in w] for _ in range(m)]
    buf = [[torch.zeros_like(x) for x in w] for _ in range(m)]
    history = []
    for r in range(ROUNDS):
        t, lr, sigma, rho = round_hyper(r, sigma_power)
        new_w = [torch.zeros_like(x, dtype=consensus_dtype or DT) for x in w]
        primal_sq, dual_sq = 0.0, 0.0
        for i in range(m):
            g_all = grad(r, i, w)
            for j in range(len(w)):
                g = g_all[j] + (0.0 if decoupled else KAPPA) * w[j]
                # NSISA's vectors take SISA's step by default (vectors="sisa")
                sisa_step = kind == "sisa" or (kind == "nsisa" and w[j].ndim < 2)
                if kind.startswith("nsisa") and not sisa_step:
                    buf[i][j] = MU * buf[i][j] + g
                    M = g + MU * buf[i][j]
                    if M.ndim >= 2:
                        rows = M.shape[0]
                        M2 = M.reshape(rows, -1)
                        scale = math.sqrt(max(1.0, rows / M2.shape[1]))
                        d = (ref_newton_schulz(M2) * scale).reshape(M.shape)
                    else:
                        d = M
                else:
                    d = g
                s = d + pi[i][j]
                if kind == "pisa":
                    q = torch.ones_like(s)
                elif sisa_step:
                    v[i][j] = BETA * v[i][j] + (1 - BETA) * s * s
                    q = torch.sqrt(v[i][j] / (1 - BETA**t)) + EPS
                else:
                    q = s.abs() + EPS
                w_i = w[j] - s / (sigma + rho * q)
                if decoupled:
                    w_i = w_i - lr * KAPPA * w[j]
                if official:
                    pi[i][j] = alphas[i] * (pi[i][j] + sigma * (w_i - w[j]))
                    new_w[j] = new_w[j] + sigma * alphas[i] * w_i + pi[i][j]
                else:
                    pi[i][j] = pi[i][j] + sigma * (w_i - w[j])
                    term = alphas[i] * (sigma * w_i + pi[i][j])
                    new_w[j] = new_w[j] + term.to(new_w[j].dtype)
                primal_sq += alphas[i] * float((w_i - w[j]).pow(2).sum())
                dual_sq += alphas[i] * float(pi[i][j].pow(2).sum())
        w = [x.to(DT) / (sigma + LAM) for x in new_w]
        tel = (math.sqrt(primal_sq), math.sqrt(dual_sq), sigma, rho)
        history.append(([x.clone() for x in w], *tel))
    return history


def make_optimizer(kind: str, params, m: int, weights, decoupled: bool, **extra):
    common = dict(
        **extra,
        lr=LR0,
        sigma=SIGMA0,
        l2_lambda=LAM,
        weight_decay=KAPPA,
        decoupled_weight_decay=decoupled,
        n_workers=m,
        worker_weights=weights,
    )
    if kind == "pisa":
        return pisa.PISA(params, **common)
    if kind == "sisa":
        return pisa.SISA(params, beta=BETA, eps=EPS, **common)
    vectors = "momentum" if kind == "nsisa_momentum" else "sisa"
    return pisa.NSISA(params, momentum=MU, nesterov=True, eps=EPS, ns_dtype=DT, vectors=vectors,
                      vector_beta=BETA, **common)


@pytest.mark.parametrize("chunk", [None, 7], ids=["whole", "chunked"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled_wd", "decoupled_wd"])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("kind", ["pisa", "sisa", "nsisa", "nsisa_momentum"])
def test_matches_float64_reference(kind: str, m: int, decoupled: bool, chunk: int | None) -> None:
    raw_weights = [1.0, 2.0, 3.0, 4.0][:m]
    alphas = [x / sum(raw_weights) for x in raw_weights]
    history = reference(kind, m, alphas, decoupled)

    w0, grad = problem(m)
    params = [nn.Parameter(x.clone()) for x in w0]
    opt = make_optimizer(kind, params, m, raw_weights, decoupled)
    opt.chunk_size = chunk  # 7: the elementwise pipeline runs on pieces of <= 7 elements
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for r in range(ROUNDS):
        w_round = [p.detach().clone() for p in params]
        for i in range(m):
            assert opt.worker_index == i
            # the parameters hold the global w during the whole round
            for p, x in zip(params, w_round):
                assert torch.equal(p.detach(), x)
            for p, g in zip(params, grad(r, i, w_round)):
                p.grad = g
            opt.step()
            assert opt.round_done == (i == m - 1)
        sched.step()
        ref_w, ref_primal, ref_dual, ref_sigma, ref_rho = history[r]
        for p, x in zip(params, ref_w):
            torch.testing.assert_close(p.detach(), x, atol=1e-10, rtol=0)
        tel = opt.telemetry()
        assert tel["primal_residual"] == pytest.approx(ref_primal, rel=1e-5)
        assert tel["dual_norm"] == pytest.approx(ref_dual, rel=1e-5)
        assert tel["sigma"] == pytest.approx(ref_sigma, rel=1e-12)
        assert tel["rho"] == pytest.approx(ref_rho, rel=1e-12)
    # the schedule really changed sigma (ratio kept): sigma_t * lr_t is constant
    assert history[-1][3] != history[0][3]
    assert opt.rounds == ROUNDS


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("kind", ["sisa", "nsisa"])
def test_sigma_power_matches_the_official_warmdown(kind: str, m: int) -> None:
    """``sigma_power=2``: sigma_t = sigma (lr_0/lr_t)^2, rho_t = rho lr_0/lr_t (the official GPT-2
    124M warmdown), against the float64 reference; the telemetry reports that sigma / rho."""
    raw_weights = [1.0, 2.0, 3.0, 4.0][:m]
    alphas = [x / sum(raw_weights) for x in raw_weights]
    history = reference(kind, m, alphas, False, sigma_power=2.0)
    opt = run_against(history, kind, m, raw_weights, sigma_power=2.0)
    _, _, _, ref_sigma, ref_rho = history[-1]
    tel = opt.telemetry()
    assert (tel["sigma"], tel["rho"]) == pytest.approx((ref_sigma, ref_rho), rel=1e-12)
    # a real departure: sigma / rho is no longer the initial ratio, the weights differ
    assert ref_sigma / ref_rho > 1.5 * SIGMA0 / (1.0 / LR0 - SIGMA0)
    textbook = reference(kind, m, alphas, False)[-1][0]
    assert max(float((a - b).abs().max()) for a, b in zip(history[-1][0], textbook)) > 1e-3


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("kind", ["pisa", "sisa", "nsisa"])
def test_bf16_consensus_matches_the_official_allreduce(kind: str, m: int) -> None:
    """``consensus_dtype=bfloat16``: each worker's ``alpha_i (sigma w_i + pi_i)`` rounded to
    bfloat16 and summed in it, as the official GPT-2 code's all-reduce buffer, against the
    float64 reference; the weights then carry bfloat16's rounding (not float64's)."""
    raw_weights = [1.0, 2.0, 3.0, 4.0][:m]
    alphas = [x / sum(raw_weights) for x in raw_weights]
    bf16 = torch.bfloat16
    history = reference(kind, m, alphas, False, consensus_dtype=bf16)
    run_against(history, kind, m, raw_weights, consensus_dtype=bf16)
    textbook = reference(kind, m, alphas, False)
    first = max(float((a - b).abs().max()) for a, b in zip(history[0][0], textbook[0][0]))
    assert 1e-6 < first < 0.05  # one round: bfloat16's rounding of sigma w + pi, no more
    # the round's sum (sigma_t + lambda) w is a bfloat16 number (to float64's rounding)
    total = history[0][0][0] * (history[0][3] + LAM)
    torch.testing.assert_close(total, total.to(bf16).to(DT), rtol=1e-12, atol=0)
    total = textbook[0][0][0] * (textbook[0][3] + LAM)
    assert not torch.allclose(total, total.to(bf16).to(DT), rtol=1e-6, atol=0)


def test_rho_argument_sets_lr() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = pisa.SISA([p], sigma=80.0, rho=100.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 180)
    assert opt.current_sigma_rho() == pytest.approx((80.0, 100.0))
    opt.param_groups[0]["lr"] /= 2  # what a scheduler does: the ratio is kept
    assert opt.current_sigma_rho() == pytest.approx((160.0, 200.0))


def run_against(history, kind: str, m: int, raw_weights, **extra) -> pisa.PISA:
    """Train on :func:`problem` with the reference's schedule; every round's weights must equal
    the reference's ``history`` (float64, 1e-10)."""
    w0, grad = problem(m)
    params = [nn.Parameter(x.clone()) for x in w0]
    opt = make_optimizer(kind, params, m, raw_weights, False, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for r in range(ROUNDS):
        w_round = [p.detach().clone() for p in params]
        for i in range(m):
            for p, g in zip(params, grad(r, i, w_round)):
                p.grad = g
            opt.step()
        sched.step()
        for p, x in zip(params, history[r][0]):
            torch.testing.assert_close(p.detach(), x, atol=1e-10, rtol=0)
    return opt


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("kind", ["pisa", "sisa", "nsisa"])
def test_scaled_dual_matches_the_official_gpt2_loop(kind: str, m: int) -> None:
    """``scaled_dual=True`` follows the official GPT-2 code's dual and all-reduce (float64,
    unequal weights, a schedule); at m = 4 it is a different trajectory from the textbook
    round, at m = 1 the same one."""
    raw_weights = [1.0, 2.0, 3.0, 4.0][:m]
    alphas = [x / sum(raw_weights) for x in raw_weights]
    history = reference(kind, m, alphas, False, official=True)
    opt = run_against(history, kind, m, raw_weights, scaled_dual=True)
    assert opt.telemetry()["dual_norm"] == pytest.approx(history[-1][2], rel=1e-5)
    textbook = reference(kind, m, alphas, False)[-1][0]
    gap = max(float((a - b).abs().max()) for a, b in zip(history[-1][0], textbook))
    assert (gap > 1e-3) if m > 1 else (gap < 1e-12)


def reference_vgg(m: int, alphas: list[float], norm: bool = True, dual_only: bool = True):
    """The official VGG-11 CIFAR-10 SISA round as that code writes it (``Vison Model/cifar10/
    l2_lower_loss_mPiAM_varying_rho_sigma.py``), in float64: each worker's gradient with the
    coupled decay, its norm over all tensors taken at the first iteration only, the step
    ``(g + pi) / (N sigma + N rho (sqrt(v_hat) + eps))``, the dual ``pi += sigma (w_i - w)`` and
    ``w = sum_i alpha_i w_i + (sum_i alpha_i pi_i / N_i) / (sigma + lambda)``.

    ``norm=False`` (``N_i = 1``) / ``dual_only=False`` (the textbook consensus ``sum_i alpha_i
    (sigma w_i + pi_i / N_i) / (sigma + lambda)``) switch one departure off. Returns the global
    weights after every round and the norms."""
    w0, grad = problem(m)
    w = [x.clone() for x in w0]
    pi, v = ([[torch.zeros_like(x) for x in w] for _ in range(m)] for _ in range(2))
    factors: list[float] = []
    history = []
    for r in range(ROUNDS):
        t, _, sigma, rho = round_hyper(r)
        local = []
        for i in range(m):
            g = [gj + KAPPA * wj for gj, wj in zip(grad(r, i, w), w)]
            if r == 0:
                factors.append(math.sqrt(sum(float((gj**2).sum()) for gj in g)))
            n = factors[i] if norm else 1.0
            w_i = []
            for j in range(len(w)):
                s = g[j] + pi[i][j]
                v[i][j] = BETA * v[i][j] + (1 - BETA) * s.pow(2)
                q = torch.sqrt(v[i][j] / (1 - BETA**t)) + EPS
                w_i.append(w[j] - s / (sigma * n + rho * n * q))
                pi[i][j] = pi[i][j] + sigma * (w_i[j] - w[j])
            local.append(w_i)
        n_of = [f if norm else 1.0 for f in factors]
        new_w = []
        for j in range(len(w)):
            avg_w = sum(alphas[i] * local[i][j] for i in range(m))
            avg_pi = sum(alphas[i] * pi[i][j] / n_of[i] for i in range(m))
            if dual_only:
                new_w.append(avg_w + avg_pi / (sigma + LAM))
            else:
                new_w.append((sigma * avg_w + avg_pi) / (sigma + LAM))
        w = new_w
        history.append([x.clone() for x in w])
    return history, factors


def _run_vgg(opt, params, m: int, rounds: range, sched=None) -> None:
    _, grad = problem(m)
    for r in rounds:
        w_round = [p.detach().clone() for p in params]
        for i in range(m):
            for p, g in zip(params, grad(r, i, w_round)):
                p.grad = g
            opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused_falls_back"])
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)],
                         ids=["official", "norm_only", "dual_only"])
@pytest.mark.parametrize("m", [1, 4])
def test_first_grad_norm_matches_the_official_vgg_loop(
    m: int, flags: tuple[bool, bool], fused: bool
) -> None:
    """``first_grad_norm=True, l2_dual_only=True`` follow the official VGG-11 SISA round
    (float64, unequal weights, a schedule, coupled decay) to 1e-12, each option alone its half
    of it; the official round is a different trajectory from the textbook one, at m = 1 too.
    With ``fused=True`` these groups take the foreach path (same result, nothing compiled)."""
    norm, dual_only = flags
    raw_weights = [1.0, 2.0, 3.0, 4.0][:m]
    alphas = [x / sum(raw_weights) for x in raw_weights]
    history, factors = reference_vgg(m, alphas, norm, dual_only)
    w0, _ = problem(m)
    params = [nn.Parameter(x.clone()) for x in w0]
    opt = make_optimizer("sisa", params, m, raw_weights, False, first_grad_norm=norm,
                         l2_dual_only=dual_only, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for r in range(ROUNDS):
        _run_vgg(opt, params, m, range(r, r + 1), sched)
        for p, x in zip(params, history[r]):
            torch.testing.assert_close(p.detach(), x, atol=1e-12, rtol=0)
    stored = opt.state_dict()["pisa"]["first_grad_norms"]
    assert stored == (pytest.approx(factors, rel=1e-13) if norm else [None] * m)
    assert min(factors) > 2.0  # N_i far from 1: the scaling is exercised
    textbook = reference("sisa", m, alphas, False)[-1][0]
    gap = max(float((a - b).abs().max()) for a, b in zip(history[-1], textbook))
    assert gap > 1e-3


@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
@pytest.mark.parametrize("m", [1, 4])
def test_first_grad_norm_resumes_exactly(m: int, how: str) -> None:
    """The measured ``N_i`` is optimizer state: a copy made mid-run (mid-round at m = 4)
    continues bit for bit, and does not measure ``N_i`` again on its later gradients."""
    import copy

    w0, grad = problem(m)
    params = [nn.Parameter(x.clone()) for x in w0]
    kw = dict(first_grad_norm=True, l2_dual_only=True)
    opt = make_optimizer("sisa", params, m, None, False, **kw)
    _run_vgg(opt, params, m, range(3))
    if m > 1:  # stop inside round 3: two of its workers have stepped
        w_round = [p.detach().clone() for p in params]
        for i in range(2):
            for p, g in zip(params, grad(3, i, w_round)):
                p.grad = g
            opt.step()
    if how == "deepcopy":  # one memo: the copy's groups and state hold the copied params
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2 = [nn.Parameter(p.detach().clone()) for p in params]
        opt2 = make_optimizer("sisa", params2, m, None, False, **kw)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, ps in ((opt, params), (opt2, params2)):
        start = 3
        if m > 1:
            w_round = [p.detach().clone() for p in ps]
            _, g_of = problem(m)
            for i in range(2, m):
                for p, g in zip(ps, g_of(3, i, w_round)):
                    p.grad = g
                o.step()
            start = 4
        _run_vgg(o, ps, m, range(start, 8))
    for a, b in zip(params, params2):
        assert torch.equal(a.detach(), b.detach())
    assert opt2.state_dict()["pisa"]["first_grad_norms"] == \
        opt.state_dict()["pisa"]["first_grad_norms"]


def test_first_grad_norm_and_l2_dual_only_validate() -> None:
    p = nn.Parameter(torch.ones(3))
    for key in ("first_grad_norm", "l2_dual_only"):
        for bad in ("yes", 1, None):
            with pytest.raises(ValueError, match=f"{key} must be a bool"):
                pisa.SISA([p], **{key: bad})
        with pytest.raises(ValueError, match="cannot be combined"):
            pisa.SISA([p], scaled_dual=True, **{key: True})
        with pytest.raises(ValueError, match=f"{key} must be a bool"):
            pisa.SISA([p]).add_param_group({"params": [nn.Parameter(torch.ones(2))], key: "on"})
    # the defaults are the textbook round
    assert pisa.SISA([p]).defaults["first_grad_norm"] is False
    assert pisa.PISA([p]).defaults["l2_dual_only"] is False
    # a first gradient of norm 0 cannot divide the steps
    opt = pisa.SISA([p], first_grad_norm=True)
    p.grad = torch.zeros(3)
    with pytest.raises(RuntimeError, match="first gradient has norm 0"):
        opt.step()
