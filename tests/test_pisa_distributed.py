"""Distributed workers (2 gloo processes) give the same weights as 2 virtual workers; the usual
wrappers (DDP, ranks that start apart) are caught or made correct."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import Net, shard
from torch import nn

import pisa

DT = torch.float64
WORLD = 2
ROUNDS = 5
WEIGHTS = [1.0, 3.0]


def make(name: str, model: nn.Module, **mode):
    if name == "sisa":
        return pisa.SISA(model.parameters(), lr=0.02, sigma=3.0, l2_lambda=1e-3,
                         worker_weights=WEIGHTS, **mode)
    if name == "nsisa":
        return pisa.NSISA(model.parameters(), lr=0.01, sigma=5.0, ns_dtype=DT,
                          weight_decay=1e-2, worker_weights=WEIGHTS, **mode)
    return pisa.hybrid_nsisa(model, lr=0.01, sigma=5.0, ns_dtype=DT, worker_weights=WEIGHTS,
                             companion_kwargs={"lr": 1e-2}, **mode)


def run(name: str, rank: int | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """rank None: one process, 2 virtual workers; else this rank's worker of a 2-rank run."""
    torch.manual_seed(0)
    model = Net().to(DT)
    opt = make(name, model, n_workers=WORLD) if rank is None else make(name, model)
    assert opt.n_workers == WORLD
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for r in range(ROUNDS):
        workers = range(WORLD) if rank is None else [rank]
        for i in workers:
            tokens, target = shard(r, i)
            opt.zero_grad(set_to_none=True)
            (model(tokens) - target).pow(2).mean().backward()
            opt.step()
        assert opt.round_done
        sched.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, opt.telemetry()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        out = {}
        for name in ("sisa", "nsisa", "hybrid"):
            out[name] = run(name, rank)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_equals_virtual(tmp_path: Path) -> None:
    # the virtual runs first: forked children then inherit every lazily imported module
    virtual = {name: run(name, rank=None) for name in ("sisa", "nsisa", "hybrid")}
    # fork (as DataLoader workers, one thread each) avoids re-importing torch in every child
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in ("sisa", "nsisa", "hybrid"):
        virtual_state, virtual_tel = virtual[name]
        for r in range(WORLD):
            dist_state, dist_tel = ranks[r][name]
            for key, value in virtual_state.items():
                torch.testing.assert_close(dist_state[key], value, atol=1e-12, rtol=0,
                                           msg=f"{name} rank {r} {key}")
            for key in ("primal_residual", "dual_norm", "sigma", "rho"):
                assert dist_tel[key] == pytest.approx(virtual_tel[key], rel=1e-5), key
        # every rank holds the same global weights, bit for bit
        for key in virtual_state:
            assert torch.equal(ranks[0][name][0][key], ranks[1][name][0][key])
        torch.manual_seed(0)
        initial = Net().to(DT).state_dict()
        assert not torch.equal(initial["hidden.weight"], virtual_state["hidden.weight"])
        assert not torch.equal(initial["embed.weight"], virtual_state["embed.weight"])


MODES = ("ddp", "differ", "prepare", "no_sync")


def run_wrapped(mode: str, rank: int) -> dict[str, torch.Tensor] | str:
    """SISA on this rank under one of the usual setups; the final weights, or the error."""
    torch.manual_seed(rank if mode in ("differ", "prepare") else 0)
    model = Net().to(DT)
    wrapped: nn.Module = model
    if mode in ("ddp", "no_sync"):
        wrapped = nn.parallel.DistributedDataParallel(model)
    elif mode == "prepare":
        model = wrapped = pisa.distributed.prepare(nn.parallel.DistributedDataParallel(model))
    opt = make("sisa", model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    try:
        for r in range(ROUNDS):
            tokens, target = shard(r, rank)
            opt.zero_grad(set_to_none=True)
            if mode == "no_sync":
                with pisa.distributed.no_sync(wrapped):
                    (wrapped(tokens) - target).pow(2).mean().backward()
            else:
                (wrapped(tokens) - target).pow(2).mean().backward()
            opt.step()
            sched.step()
    except RuntimeError as err:
        return str(err)
    return {k: v.clone() for k, v in model.state_dict().items()}


class Partial(nn.Module):
    """``rank0`` is used on rank 0 only, ``unused`` nowhere."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.rank0 = nn.Linear(3, 4)
        self.unused = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        h = self.hidden(x) + (self.rank0(x) if rank == 0 else 0.0)
        return self.head(torch.tanh(h)).squeeze(-1)


def run_partial(rank: int) -> dict[str, torch.Tensor]:
    """Hybrid NSISA + AdamW with parameters missing gradients on some or all ranks."""
    torch.manual_seed(0)
    model = Partial().to(DT)
    opt = pisa.hybrid_nsisa(model, lr=0.01, sigma=5.0, ns_dtype=DT, weight_decay=1e-2,
                            l2_lambda=1e-3, companion_kwargs={"lr": 1e-2, "weight_decay": 0.1})
    gen = torch.Generator().manual_seed(rank)
    for _ in range(ROUNDS):
        x = torch.randn(6, 3, generator=gen, dtype=DT)
        opt.zero_grad(set_to_none=True)
        model(x, rank).pow(2).mean().backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _wrapped_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        out: dict = {mode: run_wrapped(mode, rank) for mode in MODES}
        out["partial"] = run_partial(rank)
        torch.save(out, os.path.join(out_dir, f"wrapped{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_wrappers_are_caught_or_made_correct(tmp_path: Path) -> None:
    """DDP-averaged gradients and ranks that start apart raise at the first step (one checksum
    all-reduce); ``prepare`` and ``no_sync`` give the virtual-worker run; a parameter without a
    gradient on every rank stays put, one with a gradient on some rank moves the same everywhere
    (main and companion of a Hybrid)."""
    virtual, _ = run("sisa", rank=None)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_wrapped_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                       nprocs=WORLD, join=True, start_method=method)
    ranks = [torch.load(tmp_path / f"wrapped{r}.pt", weights_only=True) for r in range(WORLD)]
    for out in ranks:
        assert isinstance(out["ddp"], str) and "averaged" in out["ddp"]
        assert "pisa.distributed.prepare" in out["ddp"]
        assert isinstance(out["differ"], str) and "parameters differ" in out["differ"]
        for mode in ("prepare", "no_sync"):
            assert isinstance(out[mode], dict), out[mode]
            for key, value in virtual.items():
                torch.testing.assert_close(out[mode][key], value, atol=1e-12, rtol=0,
                                           msg=f"{mode} {key}")
    torch.manual_seed(0)
    initial = Partial().to(DT).state_dict()
    partial = [out["partial"] for out in ranks]
    for key in initial:
        assert torch.equal(partial[0][key], partial[1][key]), key
    for key in ("unused.weight", "unused.bias"):
        assert torch.equal(partial[0][key], initial[key]), key
    for key in ("rank0.weight", "rank0.bias", "hidden.weight", "head.bias"):
        assert not torch.equal(partial[0][key], initial[key]), key
