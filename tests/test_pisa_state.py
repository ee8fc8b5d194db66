"""state_dict round trips (bitwise resume, also inside a virtual-worker round), argument checks."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import pisa
from pisa.preconditioners import Hutchinson


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 5, kernel_size=3, padding=1)
        self.hidden = nn.Linear(5, 7)
        self.head = nn.Linear(7, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(1, 2)  # (batch, 6, length)
        x = torch.tanh(self.conv(x)).mean(-1)
        return self.head(torch.tanh(self.hidden(x))).squeeze(-1)


def batch(call: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + call)
    tokens = torch.randint(0, 10, (8, 5), generator=gen)
    return tokens, torch.randn(8, generator=gen)


OPTIMIZERS = {
    "sisa_m1": lambda model: pisa.SISA(model.parameters(), lr=0.02, sigma=2.0, l2_lambda=1e-3),
    "sisa_m4": lambda model: pisa.SISA(
        model.parameters(), lr=0.02, sigma=2.0, n_workers=4, weight_decay=1e-2,
        worker_weights=[1, 2, 3, 4],
    ),
    "nsisa_m4": lambda model: pisa.NSISA(
        model.parameters(), lr=0.01, sigma=5.0, n_workers=4, l2_lambda=1e-3,
        weight_decay=1e-2, decoupled_weight_decay=True,
    ),
    "nsisa_ema_m3": lambda model: pisa.NSISA(
        model.parameters(), lr=0.01, sigma=5.0, n_workers=3, preconditioner="ema",
        dual_init=1e-10,
    ),
    "pisa_hutchinson_m2": lambda model: pisa.PISA(
        model.parameters(), lr=0.02, sigma=2.0, n_workers=2, preconditioner=Hutchinson(seed=3),
    ),
    "sisa_bf16_consensus_m3": lambda model: pisa.SISA(
        model.parameters(), lr=0.02, sigma=2.0, n_workers=3, consensus_dtype="bfloat16",
        sigma_power=2.0, l2_lambda=1e-3,
    ),
    "hybrid_nsisa_m3": lambda model: pisa.hybrid_nsisa(
        model, lr=0.01, sigma=5.0, n_workers=3, companion_kwargs={"lr": 1e-2},
    ),
}


def train(model, opt, sched, start: int, stop: int, create_graph: bool) -> None:
    for call in range(start, stop):
        tokens, target = batch(call)
        opt.zero_grad(set_to_none=True)
        loss = (model(tokens) - target).pow(2).mean()
        loss.backward(create_graph=create_graph)
        opt.step()
        if opt.round_done:
            sched.step()
    opt.zero_grad(set_to_none=True)


def build(name: str, seed: int):
    torch.manual_seed(seed)
    model = Net()
    opt = OPTIMIZERS[name](model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bitwise_identical(name: str) -> None:
    create_graph = "hutchinson" in name
    total = 23
    model_a, opt_a, sched_a = build(name, seed=0)
    train(model_a, opt_a, sched_a, 0, total, create_graph)

    m = opt_a.n_workers
    split = 2 * m + (m - 1 if m > 1 else 0)  # inside a round when m > 1
    model_b, opt_b, sched_b = build(name, seed=0)
    train(model_b, opt_b, sched_b, 0, split, create_graph)
    if m > 1:
        assert opt_b.worker_index == m - 1 and not opt_b.round_done
    buffer = io.BytesIO()
    torch.save(
        {"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()},
        buffer,
    )
    del model_b, opt_b, sched_b
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)

    model_c, opt_c, sched_c = build(name, seed=99)  # different init: everything must come back
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    assert opt_c.worker_index == (m - 1 if m > 1 else 0)
    train(model_c, opt_c, sched_c, split, total, create_graph)

    for (n, p_a), p_c in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(p_a, p_c), n
    assert opt_a.telemetry() == opt_c.telemetry()
    assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_c.param_groups]
    # the run really moved the parameters and the schedule
    torch.manual_seed(0)
    assert not torch.equal(next(Net().parameters()), next(model_a.parameters()))
    assert opt_a.param_groups[0]["lr"] < opt_a.param_groups[0]["lr0"]


def test_load_rejects_other_worker_count() -> None:
    p = nn.Parameter(torch.ones(3))
    sd = pisa.SISA([p], lr=0.1, n_workers=2).state_dict()
    with pytest.raises(ValueError, match="n_workers"):
        pisa.SISA([p], lr=0.1, n_workers=3).load_state_dict(sd)


def params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(2, 2))]


@pytest.mark.parametrize(
    ("build_bad", "name", "valid_range"),
    [
        (lambda: pisa.PISA(params(), lr=0.0), "lr", "(0, 1/sigma)"),
        (lambda: pisa.SISA(params(), lr=-1e-3), "lr", "(0, 1/sigma)"),
        (lambda: pisa.NSISA(params(), lr=-1.0), "lr", "(0, 1/sigma)"),
        (lambda: pisa.SISA(params(), lr=1e-3, sigma=-1.0), "sigma", "> 0"),
        (lambda: pisa.PISA(params(), lr=1e-3, sigma=0.0), "sigma", "> 0"),
        (lambda: pisa.SISA(params(), lr=0.5, sigma=2.0), "lr", "(0, 1/sigma) = (0, 0.5)"),
        (lambda: pisa.SISA(params(), lr=0.6, sigma=2.0), "rho", "rho = 1/lr - sigma > 0"),
        (lambda: pisa.SISA(params(), sigma=1.0, rho=0.0), "rho", "> 0"),
        (lambda: pisa.SISA(params(), n_workers=0), "n_workers", ">= 1"),
        (lambda: pisa.NSISA(params(), n_workers=-2), "n_workers", ">= 1"),
        (lambda: pisa.PISA(params(), n_workers=1.5), "n_workers", ">= 1"),
        (lambda: pisa.SISA(params(), beta=1.0), "beta", "[0, 1)"),
        (lambda: pisa.SISA(params(), beta=-0.1), "beta", "[0, 1)"),
        (lambda: pisa.NSISA(params(), preconditioner="ema", beta=1.5), "beta", "[0, 1)"),
        (lambda: pisa.NSISA(params(), momentum=1.0), "momentum", "[0, 1)"),
        (lambda: pisa.PISA(params(), preconditioner=Hutchinson(beta=1.0)), "hessian_beta",
         "[0, 1)"),
        (lambda: pisa.SISA(params(), eps=-1.0), "eps", ">= 0"),
        (lambda: pisa.SISA(params(), l2_lambda=-1.0), "l2_lambda", ">= 0"),
        (lambda: pisa.SISA(params(), weight_decay=-1.0), "weight_decay", ">= 0"),
        (lambda: pisa.SISA(params(), n_workers=2, worker_weights=[1.0]), "worker_weights", "2"),
        (lambda: pisa.SISA(params(), n_workers=2, worker_weights=[1.0, -1.0]), "worker_weights",
         ">= 0"),
        (lambda: pisa.SISA(params(), sigma_power=-1.0), "sigma_power", ">= 0"),
        (lambda: pisa.NSISA(params(), sigma_power=float("nan")), "sigma_power", ">= 0"),
        (lambda: pisa.SISA(params(), consensus_dtype="int8"), "consensus_dtype", "floating"),
        (lambda: pisa.PISA(params(), consensus_dtype="nope"), "consensus_dtype", "floating"),
        (lambda: pisa.SISA(params(), consensus_dtype="bfloat16", first_grad_norm=True),
         "consensus_dtype", "cannot be combined"),
    ],
)
def test_bad_hyperparameters_raise(build_bad, name: str, valid_range: str) -> None:
    with pytest.raises(ValueError) as info:
        build_bad()
    message = str(info.value)
    assert name in message
    assert valid_range in message


def test_bad_lr_from_a_scheduler_raises_at_step() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = pisa.SISA([p], lr=0.1, sigma=1.0)
    opt.param_groups[0]["lr"] = -0.1
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="lr"):
        opt.step()


def test_param_groups_keep_their_own_ratio() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = pisa.SISA([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1, sigma=2.0)
    assert [g["lr0"] for g in opt.param_groups] == [0.1, 0.01]
    assert opt.current_sigma_rho(opt.param_groups[1]) == pytest.approx((2.0, 98.0))


@pytest.mark.parametrize("name", ["sisa_m4", "nsisa_m4", "nsisa_ema_m3"])
def test_chunked_pipeline_is_bitwise_identical(name: str) -> None:
    """The elementwise pipeline cut into pieces of 5 elements gives exactly the same weights."""
    runs = []
    for chunk in (None, 5):
        model, opt, sched = build(name, seed=0)
        opt.chunk_size = chunk
        train(model, opt, sched, 0, 9, create_graph=False)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_zero_lr_round_keeps_weights() -> None:
    """lr_t -> 0 means sigma_t, rho_t -> infinity: the round leaves w where it is."""
    p = nn.Parameter(torch.randn(4, 3))
    opt = pisa.NSISA([p], lr=0.05, sigma=2.0, l2_lambda=0.1, n_workers=2)
    for _ in range(2):
        p.grad = torch.randn(4, 3)
        opt.step()
    before = p.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    for _ in range(2):
        p.grad = torch.randn(4, 3)
        opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.telemetry()["sigma"] == float("inf")


def test_nsisa_batched_newton_schulz_equals_per_matrix() -> None:
    """Same-shaped matrices orthogonalised as one batch (chunk_size=None, the CUDA path) give
    the weights of one matrix at a time (small chunks, the CPU path)."""
    runs = []
    for chunk in (None, 8):
        torch.manual_seed(0)
        mats = [nn.Parameter(torch.randn(4, 6, dtype=torch.float64)) for _ in range(3)]
        tall = [nn.Parameter(torch.randn(6, 4, dtype=torch.float64)) for _ in range(2)]
        params = mats + tall + [nn.Parameter(torch.randn(5, dtype=torch.float64))]
        opt = pisa.NSISA(params, lr=0.05, sigma=2.0, n_workers=2, ns_dtype=torch.float64)
        opt.chunk_size = chunk
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert not torch.equal(runs[0][0], runs[0][1])


@pytest.mark.parametrize("m", [1, 3])
def test_consensus_dtype_can_be_switched_between_rounds(m: int) -> None:
    """A checkpoint taken between rounds loads into an optimizer with or without
    ``consensus_dtype`` and trains on; inside a round a change is refused."""
    def make(model, dtype):
        return pisa.SISA(model.parameters(), lr=0.02, sigma=2.0, n_workers=m,
                         consensus_dtype=dtype)

    for saved, loaded in (("bfloat16", None), (None, "bfloat16")):
        torch.manual_seed(0)
        model = Net()
        opt = make(model, saved)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        train(model, opt, sched, 0, 2 * m, False)
        before = [p.detach().clone() for p in model.parameters()]
        opt2 = make(model, loaded)
        opt2.load_state_dict(opt.state_dict())
        train(model, opt2, torch.optim.lr_scheduler.StepLR(opt2, 2), 2 * m, 4 * m, False)
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        if m > 1:
            train(model, opt, sched, 0, 1, False)  # inside a round now
            with pytest.raises(ValueError, match="consensus_dtype"):
                make(model, loaded).load_state_dict(opt.state_dict())
