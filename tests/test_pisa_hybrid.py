"""Parameter routing and the Hybrid (main + companion) optimizer."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import pisa
from pisa import Hybrid, split_hidden_matrices

DT = torch.float64


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6, length: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(length, dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(3 * dim, dim)
        self.multihead_attn = nn.Linear(dim, dim, bias=False)  # "head" inside a word: hidden
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.size(1))
        x = self.wte(tokens) + self.wpe(pos)
        x = x + self.c_proj(torch.tanh(self.c_attn(x)))
        x = x + self.multihead_attn(x)
        return self.lm_head(self.ln_f(x))


def test_split_hidden_matrices() -> None:
    model = TinyGPT()
    model.pos_embed = nn.Parameter(torch.zeros(1, 4, 6))  # 3-D but an embedding by name
    model.conv = nn.Conv2d(2, 3, 2)
    hidden, rest = split_hidden_matrices(model, named=True)
    names = [n for n, _ in hidden]
    assert names == ["c_attn.weight", "c_proj.weight", "multihead_attn.weight", "conv.weight"]
    rest_names = {n for n, _ in rest}
    assert {"wte.weight", "wpe.weight", "lm_head.weight", "pos_embed", "ln_f.weight",
            "c_attn.bias", "conv.bias"} <= rest_names
    assert len(hidden) + len(rest) == len(list(model.parameters()))
    hidden2d, _ = split_hidden_matrices(model, require_2d=True, named=True)
    assert "conv.weight" not in [n for n, _ in hidden2d]
    # user patterns, glob patterns, and nn.Embedding regardless of its name
    custom, _ = split_hidden_matrices(model, exclude=("c_attn", "conv.*", "pos_*"), named=True)
    assert [n for n, _ in custom] == ["c_proj.weight", "multihead_attn.weight", "lm_head.weight"]
    model.table = nn.Embedding(3, 3)
    assert "table.weight" not in [n for n, _ in split_hidden_matrices(model, named=True)[0]]


def data(seed: int, sizes: list[int]):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    tokens = torch.randint(0, 11, (n, 4), generator=gen)
    targets = torch.randint(0, 11, (n, 4), generator=gen)
    return tokens, targets


def loss_fn(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


NSISA_KW = dict(lr=0.01, sigma=5.0, ns_dtype=DT, l2_lambda=1e-3)
ADAMW_KW = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)


def test_companion_steps_once_per_round_on_full_batch_gradient() -> None:
    sizes = [2, 3, 4, 3]  # unequal client sizes: alpha_i = n_i / n
    m, rounds = len(sizes), 6
    torch.manual_seed(0)
    model = TinyGPT().to(DT)
    ref_model = copy.deepcopy(model)

    opt = pisa.hybrid_nsisa(model, n_workers=m, worker_weights=sizes, companion_kwargs=ADAMW_KW,
                            **NSISA_KW)
    assert isinstance(opt.companion, torch.optim.AdamW) and isinstance(opt.main, pisa.NSISA)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    # reference written out: NSISA on the hidden matrices with per-worker gradients, AdamW on
    # the rest stepped once per round with the full-batch gradient at the round's global w
    hidden, rest = split_hidden_matrices(ref_model)
    ref_main = pisa.NSISA(hidden, n_workers=m, worker_weights=sizes, **NSISA_KW)
    ref_comp = torch.optim.AdamW(rest, **ADAMW_KW)
    ref_scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
                  for o in (ref_main, ref_comp)]

    for r in range(rounds):
        tokens, targets = data(r, sizes)
        chunks = list(zip(tokens.split(sizes), targets.split(sizes)))
        comp_before = [p.detach().clone() for p in opt.companion.param_groups[0]["params"]]
        for i, (tok, tgt) in enumerate(chunks):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, tok, tgt).backward()
            opt.step()
            if i < m - 1:  # the companion does not move inside a round
                for p, before in zip(opt.companion.param_groups[0]["params"], comp_before):
                    assert torch.equal(p.detach(), before)
        assert opt.round_done
        sched.step()

        ref_comp.zero_grad(set_to_none=True)
        loss_fn(ref_model, tokens, targets).backward()  # full batch at w
        full_grads = [p.grad.clone() for p in rest]
        for tok, tgt in chunks:
            ref_main.zero_grad(set_to_none=True)
            loss_fn(ref_model, tok, tgt).backward()
            ref_main.step()
        for p, g in zip(rest, full_grads):
            p.grad = g
        ref_comp.step()
        for s in ref_scheds:
            s.step()

        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-12, rtol=0, msg=name)
    # the companion's state counts one AdamW step per round
    assert all(float(s["step"]) == rounds for s in opt.companion.state.values())


def test_scheduler_drives_both_optimizers() -> None:
    model = TinyGPT()
    opt = pisa.hybrid_nsisa(model, lr=0.01, sigma=5.0, n_workers=2, companion_kwargs={"lr": 1e-3})
    assert opt.param_groups[0] is opt.main.param_groups[0]
    assert opt.param_groups[-1] is opt.companion.param_groups[-1]
    sigma0 = opt.telemetry()["sigma"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    tokens, targets = data(0, [4])
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model, tokens, targets).backward()
        opt.step()
    sched.step()
    assert opt.main.param_groups[0]["lr"] == pytest.approx(0.005)
    assert opt.companion.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.main.current_sigma_rho()[0] == pytest.approx(2 * sigma0)
    assert opt.n_workers == 2 and opt.worker_index == 0 and opt.round_done
    assert set(opt.telemetry()) >= {"primal_residual", "dual_norm", "sigma", "rho"}


def test_generic_main_without_rounds_muon() -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    opt = pisa.hybrid(
        model, lambda ps: torch.optim.Muon(ps, lr=0.02), require_2d=True,
        companion_kwargs={"lr": 1e-3},
    )
    ref = copy.deepcopy(model)
    hidden, rest = split_hidden_matrices(ref, require_2d=True)
    ref_opts = [torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)]
    for step in range(3):
        tokens, targets = data(step, [5])
        opt.zero_grad()
        loss_fn(model, tokens, targets).backward()
        opt.step()
        assert opt.round_done and opt.n_workers == 1 and opt.telemetry() == {}
        for o in ref_opts:
            o.zero_grad()
        loss_fn(ref, tokens, targets).backward()
        for o in ref_opts:
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert len(opt.state) == len(list(model.parameters()))


def test_hybrid_rejects_shared_parameters() -> None:
    p = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="both"):
        Hybrid(pisa.NSISA([p]), torch.optim.AdamW([p]))


# ------------------------------------------------------------------ a composition, not a mirror
def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int, extra=None) -> None:
    tokens, targets = data(seed, [4])
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, tokens, targets)
    if extra is not None:
        loss = loss + extra(model.wte(tokens)).pow(2).mean()
    loss.backward()
    opt.step()


def test_scheduler_reaches_groups_after_load_and_add_param_group() -> None:
    """``param_groups`` follows both optimizers: their groups replaced by ``load_state_dict``
    and a group added to ``main``, with a scheduler built right after (no Hybrid call between)."""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = pisa.hybrid_nsisa(model, lr=0.01, sigma=5.0, companion_kwargs={"lr": 1e-3})
    _train_step(model, opt, 0)
    fresh = pisa.hybrid_nsisa(model, lr=0.02, sigma=5.0, companion_kwargs={"lr": 2e-3})
    old_groups = [*fresh.main.param_groups, *fresh.companion.param_groups]
    fresh.load_state_dict(opt.state_dict())  # torch replaces the group dicts
    groups = [*fresh.main.param_groups, *fresh.companion.param_groups]
    assert all(g is not o for g, o in zip(groups, old_groups))
    assert len(fresh.param_groups) == len(groups)
    assert all(g is h for g, h in zip(fresh.param_groups, groups))

    extra = nn.Linear(6, 6, bias=False)
    fresh.main.add_param_group({"params": [extra.weight], "lr": 0.004})
    assert fresh.param_groups[len(fresh.main.param_groups) - 1] is fresh.main.param_groups[-1]
    sched = torch.optim.lr_scheduler.StepLR(fresh, step_size=1, gamma=0.5)
    _train_step(model, fresh, 1, extra)
    sched.step()
    assert [g["lr"] for g in fresh.main.param_groups] == pytest.approx([0.005, 0.002])
    assert fresh.companion.param_groups[0]["lr"] == pytest.approx(5e-4)
    with pytest.raises(RuntimeError, match=r"Hybrid\.main or Hybrid\.companion"):
        fresh.add_param_group({"params": [nn.Parameter(torch.ones(2))]})


def test_state_is_a_live_read_only_view() -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    opt = pisa.hybrid(model, lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
                      companion_kwargs={"lr": 1e-3})
    params = list(model.parameters())
    assert len(opt.state) == 0 and params[0] not in opt.state
    assert len(opt.main.state) == 0  # a lookup does not create entries in main's defaultdict
    _train_step(model, opt, 0)
    assert len(opt.state) == len(params) and set(opt.state) == set(params)
    for p in params:
        owner = opt.main if p in opt.main.state else opt.companion
        assert opt.state[p] is owner.state[p]
    assert len(opt.main.state) + len(opt.companion.state) == len(params)
    with pytest.raises(TypeError):
        opt.state[params[0]] = {}  # type: ignore[index]
    copy_ = pisa.hybrid(model, lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
                        companion_kwargs={"lr": 1e-3})
    copy_.load_state_dict(opt.state_dict())  # torch replaces main.state
    assert set(copy_.state) == set(params)
    assert all(copy_.state[p] is copy_.main.state[p] for p in copy_.main.state)


def test_step_hooks_on_the_hybrid_fire_also_on_copies() -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    opt = pisa.hybrid_nsisa(model, lr=0.01, sigma=5.0, n_workers=2,
                            companion_kwargs={"lr": 1e-3})
    seen: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.main.register_step_pre_hook(lambda o, a, k: seen.append("main"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    _train_step(model, opt, 0)
    assert seen == ["pre", "main", "post"]
    for how in ("deepcopy", "pickle"):
        model_c, opt_c = (copy.deepcopy((model, opt)) if how == "deepcopy"
                          else pickle.loads(pickle.dumps((model, opt))))
        fired: list[str] = []
        opt_c.register_step_pre_hook(lambda o, a, k, fired=fired: fired.append("pre"))
        _train_step(model_c, opt_c, 1)
        assert fired == ["pre"], how
        assert len(seen) == 3  # torch's rule: hooks are not copied


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_owns_its_groups_and_continues_mid_round(how: str) -> None:
    """A copy's views point at the copy's optimizers (its scheduler drives them, not the
    original's); copied inside a round, both continue bit for bit."""
    torch.manual_seed(0)
    model = TinyGPT().to(DT)
    opt = pisa.hybrid_nsisa(model, n_workers=3, companion_kwargs=ADAMW_KW, **NSISA_KW)
    for seed in range(4):  # one round and one worker of the next
        _train_step(model, opt, seed)
    assert opt.worker_index == 1
    model_c, opt_c = (copy.deepcopy((model, opt)) if how == "deepcopy"
                      else pickle.loads(pickle.dumps((model, opt))))
    own = [*opt_c.main.param_groups, *opt_c.companion.param_groups]
    assert len(opt_c.param_groups) == len(own)
    assert all(g is h for g, h in zip(opt_c.param_groups, own))
    for seed in range(4, 9):
        _train_step(model, opt, seed)
        _train_step(model_c, opt_c, seed)
    for (name, p), q in zip(model.named_parameters(), model_c.parameters()):
        assert torch.equal(p, q), name
    assert all(opt_c.state[p] is opt_c.main.state[p] for p in opt_c.main.state)
    opt_c.companion.add_param_group({"params": [nn.Parameter(torch.ones(2, dtype=DT))]})
    assert opt_c.param_groups[-1] is opt_c.companion.param_groups[-1]
    sched = torch.optim.lr_scheduler.StepLR(opt_c, step_size=1, gamma=0.5)
    _train_step(model_c, opt_c, 9)
    sched.step()
    assert opt.companion.param_groups[0]["lr"] == ADAMW_KW["lr"]
    assert opt_c.companion.param_groups[0]["lr"] == pytest.approx(ADAMW_KW["lr"] / 2)
