"""The torch.optim contract for SISA, NSISA, PISA and Hybrid at m = 1 and m = 4.

In the spirit of torch's OptimizerInfo tests: param groups, add_param_group, closure, hooks,
schedulers (OneCycleLR with its defaults), swa_utils, dtypes, non-contiguous / 0-d / empty
parameters, sparse refusal, state round trips (fresh optimizer, deepcopy, pickle),
torch.compile, missing gradients, maximize / foreach, argument validation, the
ConsensusOptimizer protocol and NSISA on whole models.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import pisa

NAMES = ["sisa", "nsisa", "pisa", "hybrid"]
WORKERS = [1, 4]
CASES = [(name, m) for name in NAMES for m in WORKERS]
IDS = [f"{name}_m{m}" for name, m in CASES]


class Tiny(nn.Module):
    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.hidden2 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 1)
        if unused:
            self.unused = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden2(torch.tanh(self.hidden(x))))).squeeze(-1)


def make(name: str, model: nn.Module, m: int, **kw) -> torch.optim.Optimizer:
    common = {"n_workers": m, "weight_decay": 1e-2, "lr": 0.02, **kw}
    if name == "sisa":
        return pisa.SISA(model.parameters(), sigma=2.0, **common)
    if name == "nsisa":
        return pisa.NSISA(model.parameters(), sigma=5.0, **common)
    if name == "pisa":
        return pisa.PISA(model.parameters(), sigma=2.0, **common)
    return pisa.hybrid_nsisa(model, sigma=5.0, companion_kwargs={"lr": 1e-2}, **common)


def batch(call: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + call)
    x = torch.randn(8, 4, generator=gen)
    return x.to(dtype), (x.sum(-1) * 0.3 + torch.randn(8, generator=gen) * 0.1).to(dtype)


def loss_of(model: nn.Module, call: int) -> torch.Tensor:
    x, y = batch(call, next(model.parameters()).dtype)
    return (model(x) - y).pow(2).mean()


def train(model: nn.Module, opt, start: int, stop: int, step: Callable | None = None) -> None:
    """Calls ``start .. stop-1`` (one worker step each)."""
    step = opt.step if step is None else step
    for call in range(start, stop):
        opt.zero_grad(set_to_none=True)
        loss_of(model, call).backward()
        step()


def build(name: str, m: int, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = Tiny(unused=kw.pop("unused", False))
    return model, make(name, model, m, **kw)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if atol == 0.0:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


# ------------------------------------------------------------------ missing gradients
@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_parameter_without_grad_is_skipped(name: str, m: int) -> None:
    model, opt = build(name, m, unused=True, dual_init=1e-3, l2_lambda=1e-2)
    before = weights(model.unused)
    hidden_before = model.hidden.weight.detach().clone()
    train(model, opt, 0, 3 * m)
    assert_same(weights(model.unused), before)
    assert not torch.equal(model.hidden.weight, hidden_before)
    for p in model.unused.parameters():
        assert p not in opt.state or not opt.state[p]


@pytest.mark.parametrize("name", ["sisa", "nsisa", "pisa"])
def test_none_grad_zero_keeps_the_old_semantics(name: str) -> None:
    """``none_grad="zero"``: a missing gradient is a zero gradient (decay moves the weight)."""
    model, opt = build(name, 1, unused=True, none_grad="zero")
    before = weights(model.unused)
    train(model, opt, 0, 3)
    assert not torch.equal(model.unused.weight, before[0])


def test_partial_participation_is_consistent() -> None:
    """A worker without a gradient keeps ``w_i = w`` and ``pi_i``: the round is
    ``w <- sum_i alpha_i (sigma w_i + pi_i) / (sigma + lambda)`` with ``w_1 = w`` (PISA, q = 1)."""
    dt = torch.float64
    lr, sigma, lam, kappa = 0.1, 2.0, 0.05, 0.1
    c, alphas = sigma * lr, [0.25, 0.75]
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=dt))
    opt = pisa.PISA([p], lr=lr, sigma=sigma, n_workers=2, worker_weights=[1, 3], l2_lambda=lam,
                    weight_decay=kappa)
    w, pi0, pi1 = p.detach().clone(), torch.zeros(2, dtype=dt), torch.zeros(2, dtype=dt)
    for r in range(4):
        g = torch.tensor([1.0 + r, 0.5 - r], dtype=dt)
        s0 = g + kappa * w + pi0
        w0 = w - lr * s0
        pi0 = pi0 + sigma * (w0 - w)
        w = (alphas[0] * (sigma * w0 + pi0) + alphas[1] * (sigma * w + pi1)) / (sigma + lam)
        for grad in (g, None):  # worker 1 has no gradient
            p.grad = grad
            opt.step()
        torch.testing.assert_close(p.detach(), w, atol=1e-14, rtol=0)
    assert torch.equal(opt.state[p]["dual"][1], pi1)
    assert c < 1


# ------------------------------------------------------------------ copies and state
@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_continues_exactly(name: str, m: int, how: str) -> None:
    model, opt = build(name, m)
    split = 2 * m + (m - 1 if m > 1 else 0)  # inside a round when m > 1
    train(model, opt, 0, split)
    if how == "deepcopy":
        model_c, opt_c = copy.deepcopy((model, opt))
    else:
        model_c, opt_c = pickle.loads(pickle.dumps((model, opt)))
    assert opt_c.worker_index == opt.worker_index and opt_c.n_workers == m
    train(model, opt, split, split + 3 * m)
    train(model_c, opt_c, split, split + 3 * m)
    assert_same(weights(model), weights(model_c))
    assert opt.telemetry() == opt_c.telemetry()


@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_state_dict_round_trip_into_fresh_optimizer(name: str, m: int) -> None:
    model, opt = build(name, m)
    split = m + (1 if m > 1 else 0)
    train(model, opt, 0, split)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    model_c, opt_c = build(name, m, seed=7)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train(model, opt, split, split + 2 * m)
    train(model_c, opt_c, split, split + 2 * m)
    assert_same(weights(model), weights(model_c))


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_compiled_step_matches_eager(name: str, m: int) -> None:
    torch._dynamo.reset()
    model_e, opt_e = build(name, m)
    model_c, opt_c = build(name, m)
    calls = 20 * m
    train(model_e, opt_e, 0, calls)
    train(model_c, opt_c, 0, calls, step=torch.compile(opt_c.step))
    main = opt_c.main if name == "hybrid" else opt_c
    assert opt_c.round_done and main.rounds == 20
    assert_same(weights(model_e), weights(model_c), atol=1e-6)


# ------------------------------------------------------------------ groups, closure, hooks
@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_param_groups_and_add_param_group(name: str, m: int) -> None:
    torch.manual_seed(0)
    model = Tiny()
    extra = nn.Linear(4, 2)
    if name == "hybrid":
        opt = make(name, model, m)
        with pytest.raises(RuntimeError, match=r"main or Hybrid\.companion"):
            opt.add_param_group({"params": list(extra.parameters())})
        target = opt.main
    else:
        groups = [
            {"params": list(model.hidden.parameters()), "lr": 0.01},
            {"params": [*model.hidden2.parameters(), *model.head.parameters()]},
        ]
        cls = {"sisa": pisa.SISA, "nsisa": pisa.NSISA, "pisa": pisa.PISA}[name]
        opt = cls(groups, lr=0.02, sigma=2.0, n_workers=m)
        assert [g["lr0"] for g in opt.param_groups] == [0.01, 0.02]
        target = opt
    train(model, opt, 0, m)
    if m > 1:
        train(model, opt, m, m + 1)
        with pytest.raises(RuntimeError, match="between rounds"):
            target.add_param_group({"params": [extra.weight]})
        train(model, opt, m + 1, 2 * m)
    target.add_param_group({"params": [extra.weight], "lr": 0.005})
    assert target.param_groups[-1]["lr0"] == 0.005
    before = extra.weight.detach().clone()
    for call in range(2 * m, 4 * m):
        opt.zero_grad(set_to_none=True)
        x, _ = batch(call)
        (loss_of(model, call) + extra(x).pow(2).mean()).backward()
        opt.step()
    assert not torch.equal(extra.weight, before)


@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_closure_and_hooks(name: str, m: int) -> None:
    model, opt = build(name, m)
    seen: list[str] = []
    pre = opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    post = opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    model_ref, opt_ref = build(name, m)
    for call in range(2 * m):
        def closure(call: int = call) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, call)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
    train(model_ref, opt_ref, 0, 2 * m)
    assert seen == ["pre", "post"] * (2 * m)
    assert_same(weights(model), weights(model_ref))
    pre.remove()
    post.remove()
    train(model, opt, 2 * m, 3 * m)
    assert len(seen) == 4 * m


# ------------------------------------------------------------------ schedulers, SWA
@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_one_cycle_with_defaults(name: str, m: int) -> None:
    model, opt = build(name, m)
    total = 6
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=total)
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for r in range(total):
            train(model, opt, r * m, (r + 1) * m)
            assert opt.round_done
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
    assert 0.019 < max(lrs) <= 0.02 and lrs[0] == pytest.approx(0.02 / 25)
    messages = [str(w.message) for w in caught if "has no momentum" in str(w.message)]
    if name in ("sisa", "pisa"):
        assert len(messages) == 1  # the inert key is not silently "cycled"
    else:
        assert not messages
        momenta = {g["momentum"] for g in opt.param_groups}
        assert len(momenta) == 1 and 0.85 <= momenta.pop() < 0.95
    if name == "hybrid":
        comp = opt.companion.param_groups[0]
        train(model, opt, total * m, total * m + m)  # the next step copies momentum to beta1
        assert comp["betas"][0] == comp["momentum"] != 0.9


@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_swa_utils(name: str, m: int) -> None:
    model, opt = build(name, m)
    swa_model = torch.optim.swa_utils.AveragedModel(model)
    swa_sched = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=2)
    for r in range(4):
        train(model, opt, r * m, (r + 1) * m)
        swa_model.update_parameters(model)
        swa_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert torch.isfinite(swa_model(batch(0)[0])).all()


# ------------------------------------------------------------------ tensors of every kind
@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(name: str, m: int, dtype: torch.dtype) -> None:
    model, opt = build(name, m)
    model.to(dtype)
    opt = make(name, model, m)
    before = weights(model)
    train(model, opt, 0, 3 * m)
    for p, b in zip(model.parameters(), before):
        assert p.dtype == dtype and torch.isfinite(p).all()
        if p.ndim >= 2:  # (a bias may come back to the same bfloat16 value)
            assert not torch.equal(p, b)
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                assert value.dtype == dtype, key


def _odd_params(contiguous: bool) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    mat = torch.randn(6, 4, generator=gen)
    w = nn.Parameter(mat.clone() if contiguous else mat.t().contiguous().t())
    assert w.is_contiguous() == contiguous or contiguous
    return [w, nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.empty(0, 3))]


@pytest.mark.parametrize(("name", "m"), [c for c in CASES if c[0] != "hybrid"],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] != "hybrid"])
def test_non_contiguous_zero_dim_and_empty(name: str, m: int) -> None:
    cls = {"sisa": pisa.SISA, "nsisa": pisa.NSISA, "pisa": pisa.PISA}[name]
    runs = []
    for contiguous in (True, False):
        params = _odd_params(contiguous)
        if not contiguous:
            assert not params[0].is_contiguous()
        opt = cls(params, lr=0.02, sigma=2.0, n_workers=m)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3 * m):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    assert_same(runs[0], runs[1])
    assert runs[0][1].ndim == 0 and runs[0][1] != 0.7
    assert runs[0][2].shape == (0, 3)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_refused(name: str) -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    if name == "hybrid":
        opt = pisa.Hybrid(pisa.SISA(emb.parameters(), lr=0.01))
    else:
        opt = make(name, emb, 1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# ------------------------------------------------------------------ torch conventions
@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_maximize_equals_minimising_the_negation(name: str, m: int) -> None:
    model_a, opt_a = build(name, m)
    if name == "hybrid":
        model_b = copy.deepcopy(model_a)
        opt_b = pisa.hybrid_nsisa(model_b, lr=0.02, sigma=5.0, n_workers=m, weight_decay=1e-2,
                                  maximize=True, companion_kwargs={"lr": 1e-2, "maximize": True})
    else:
        model_b, opt_b = build(name, m, maximize=True)
    train(model_a, opt_a, 0, 2 * m)
    for call in range(2 * m):
        opt_b.zero_grad(set_to_none=True)
        (-loss_of(model_b, call)).backward()
        opt_b.step()
    assert_same(weights(model_a), weights(model_b))


@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_foreach_false_gives_the_same_weights(name: str, m: int) -> None:
    runs = []
    for foreach in (None, False):
        model, opt = build(name, m, foreach=foreach)
        train(model, opt, 0, 3 * m)
        runs.append(weights(model))
    assert_same(*runs)


@pytest.mark.parametrize(("name", "m"), CASES, ids=IDS)
def test_fused_accepts_every_optimizer(name: str, m: int) -> None:
    """``fused=True`` on these tiny float32 tensors runs the C++ CPU kernel (nothing compiled by
    ``torch.compile``): the weights of the foreach path up to float32 rounding
    (tests/test_pisa_fused.py compares the kernels in depth)."""
    runs = []
    for fused in (None, True):
        model, opt = build(name, m, fused=fused)
        with torch.compiler.set_stance("fail_on_recompile"):
            train(model, opt, 0, 3 * m)
        runs.append(weights(model))
    assert_same(*runs, atol=1e-6)


@pytest.mark.parametrize("name", ["sisa", "nsisa", "pisa"])
def test_tensor_lr_equals_float_lr(name: str) -> None:
    model_a, opt_a = build(name, 2)
    model_b, opt_b = build(name, 2, lr=torch.tensor(0.02, dtype=torch.float64))
    sched = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    for r in range(3):
        train(model_a, opt_a, 2 * r, 2 * r + 2)
        train(model_b, opt_b, 2 * r, 2 * r + 2)
        sched.step()
        sched_a.step()
    assert isinstance(opt_b.param_groups[0]["lr"], torch.Tensor)
    assert_same(weights(model_a), weights(model_b))


@pytest.mark.parametrize(
    "build_bad",
    [
        lambda: pisa.SISA(None, lr=-1),
        lambda: pisa.PISA(None, lr=-1),
        lambda: pisa.NSISA(None, lr=-1),
        lambda: pisa.SISA(None, sigma=0.0),
        lambda: pisa.SISA(None, beta=1.5),
        lambda: pisa.NSISA(None, beta=-0.1),
        lambda: pisa.NSISA(None, momentum=-0.1),
        lambda: pisa.NSISA(None, vector_beta=1.0),
        lambda: pisa.NSISA(None, vectors="nope"),
        lambda: pisa.NSISA(None, nesterov="yes"),
        lambda: pisa.SISA(None, eps=-1.0),
        lambda: pisa.SISA(None, weight_decay=-1.0),
        lambda: pisa.SISA(None, maximize="yes"),
        lambda: pisa.SISA(None, foreach=1),
        lambda: pisa.SISA(None, fused="yes"),
        lambda: pisa.NSISA(None, fused=True, foreach=True),
        lambda: pisa.SISA(None, none_grad="drop"),
        lambda: pisa.SISA(None, capturable=True),
        lambda: pisa.SISA(None, differentiable=True),
        lambda: pisa.SISA(None, lr=torch.tensor([0.1, 0.2])),
        lambda: pisa.SISA(None, n_workers=0),
    ],
)
def test_arguments_are_checked_before_params(build_bad) -> None:
    with pytest.raises(ValueError):
        build_bad()


# ------------------------------------------------------------------ NSISA on whole models
def test_nsisa_trains_a_whole_mlp() -> None:
    """The drop-in call on its defaults: biases and the norm gain take the SISA vector path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))
    opt = pisa.NSISA(model.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 1.5
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = (model(x).squeeze(-1) - y).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    assert max(losses) == losses[0]


@pytest.mark.parametrize(("sigma", "factor"), [(None, 0.2), (1.0, 0.5)])
def test_nsisa_vectors_on_a_convex_quadratic(sigma: float | None, factor: float) -> None:
    """The issue's case, a 10-d convex quadratic, falls on the defaults and also at the old
    default sigma = 1 (c = 1e-3), where the momentum path for vectors diverged (10 -> 145)."""
    x = nn.Parameter(torch.full((10,), 1.0))
    opt = pisa.NSISA([x], sigma=sigma)
    for _ in range(300):
        opt.zero_grad()
        x.pow(2).sum().backward()
        opt.step()
    assert float(x.pow(2).sum()) < factor * 10.0


def test_nsisa_default_sigma_keeps_the_papers_ratio() -> None:
    p = nn.Parameter(torch.ones(3, 3))
    for opt in (pisa.NSISA([p]), pisa.NSISA([p], lr=0.02), pisa.NSISA([p], rho=100.0)):
        group = opt.param_groups[0]
        assert group["sigma"] * group["lr"] == pytest.approx(80 / 180)


def test_nsisa_can_refuse_vectors() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="matrices only"):
        pisa.NSISA(model.parameters(), vectors="error")
    pisa.NSISA([model.weight], vectors="error")


# ------------------------------------------------------------------ protocol and docs
def test_consensus_protocol() -> None:
    model = Tiny()
    for name in NAMES:
        opt = make(name, model, 2)
        assert isinstance(opt, pisa.ConsensusOptimizer) and pisa.is_consensus(opt)
    adamw = torch.optim.AdamW(model.parameters())
    assert not pisa.is_consensus(adamw)
    muon = pisa.Hybrid(torch.optim.Muon([model.hidden.weight], lr=0.01))
    assert pisa.is_consensus(muon) and muon.n_workers == 1 and muon.round_done


def test_consensus_protocol_on_classes() -> None:
    """``is_consensus`` of a class: whether its instances follow the protocol (a registry asks
    it of the class it names, before building anything)."""
    for cls in (pisa.PISA, pisa.SISA, pisa.NSISA, pisa.Hybrid):
        assert pisa.is_consensus(cls), cls
    for cls in (torch.optim.AdamW, torch.optim.SGD, torch.optim.Muon):
        assert not pisa.is_consensus(cls), cls


def test_hybrid_rounds_follow_any_consensus_main() -> None:
    """Hybrid asks the protocol, not the class: a non-PISA main with rounds of 2 gets the
    companion stepped once per round."""

    class TwoCallSGD(torch.optim.SGD):
        n_workers = 2

        def __init__(self, params) -> None:
            super().__init__(params, lr=0.1)
            self.calls = 0

        @property
        def worker_index(self) -> int:
            return self.calls % 2

        @property
        def round_done(self) -> bool:
            return self.calls % 2 == 0

        def telemetry(self) -> dict[str, float]:
            return {"calls": float(self.calls)}

        def step(self, closure=None):
            self.calls += 1
            return super().step(closure)

    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    comp = torch.optim.SGD([b], lr=1.0)
    opt = pisa.Hybrid(TwoCallSGD([a]), comp)
    for g in (1.0, 3.0):
        a.grad, b.grad = torch.full((2,), g), torch.full((2,), g)
        opt.step()
        if g == 1.0:
            assert torch.equal(b.detach(), torch.ones(2))  # not moved inside the round
    assert torch.equal(b.detach(), torch.full((2,), -1.0))  # 1 - (0.5 * 1 + 0.5 * 3)
    assert opt.telemetry() == {"calls": 2.0}


def test_public_api_is_documented() -> None:
    for name in pisa.__all__:
        obj = getattr(pisa, name)
        if inspect.ismodule(obj) or not callable(obj):
            continue
        assert (obj.__doc__ or "").strip(), name
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (callable(member) or isinstance(member, property)):
                    continue
                doc = member.__doc__ if isinstance(member, property) else inspect.getdoc(
                    getattr(obj, attr)
                )  # an override may inherit its base's documentation
                assert (doc or "").strip(), f"{name}.{attr}"
    for cls in (pisa.SISA, pisa.NSISA):
        doc = cls.__doc__ or ""
        assert "see :class:" not in doc.split("Args:")[1]
        for param in inspect.signature(cls).parameters:
            assert f"{param}:" in doc or f"{param}," in doc, f"{cls.__name__}.{param}"


def test_readme_identity_for_one_worker() -> None:
    """README, "Choosing sigma and lr": for m = 1, lambda = 0, q = 1 one round is
    ``w <- w - 2 lr g - (1/sigma - 2 lr) g_bar`` with ``g_bar = -pi`` the EMA of g at rate c."""
    dt = torch.float64
    lr, sigma = 0.01, 20.0
    c = lr * sigma
    x = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=dt))
    opt = pisa.PISA([x], lr=lr, sigma=sigma)
    w, g_bar = x.detach().clone(), torch.zeros(3, dtype=dt)
    for _ in range(30):
        g = torch.sin(3 * w) + w**3
        x.grad = g.clone()
        opt.step()
        w = w - 2 * lr * g - (1 / sigma - 2 * lr) * g_bar
        g_bar = (1 - c) * g_bar + c * g
        torch.testing.assert_close(x.detach(), w, atol=1e-14, rtol=0)
        torch.testing.assert_close(-opt.state[x]["dual"][0], g_bar, atol=1e-14, rtol=0)
