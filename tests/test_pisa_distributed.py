"""Distributed workers (2 gloo processes) give the same weights as 2 virtual workers; the usual
wrappers (DDP, ranks that start apart) are caught or made correct."""

from __future__ import annotations

import copy
import math
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


EQUAL_NAMES = ("sisa", "sisa_vgg", "nsisa", "hybrid")  # sisa_vgg: the official VGG-11 round


def make(name: str, model: nn.Module, **mode):
    if name in ("sisa", "sisa_vgg"):
        vgg = name == "sisa_vgg"  # each rank measures its own first gradient norm
        return pisa.SISA(model.parameters(), lr=0.02, sigma=3.0, l2_lambda=1e-3,
                         worker_weights=WEIGHTS, first_grad_norm=vgg, l2_dual_only=vgg, **mode)
    if name == "nsisa":
        return pisa.NSISA(model.parameters(), lr=0.01, sigma=5.0, ns_dtype=DT,
                          weight_decay=1e-2, worker_weights=WEIGHTS, **mode)
    return pisa.hybrid_nsisa(model, lr=0.01, sigma=5.0, ns_dtype=DT, worker_weights=WEIGHTS,
                             companion_kwargs={"lr": 1e-2}, **mode)


def train(model: nn.Module, opt, rounds: range, rank: int | None, on_round=None,
          sched_state: dict | None = None, gamma: float = 0.5) -> dict:
    """``rounds`` of the tiny task (``rank`` None: every virtual worker); the LR is multiplied by
    ``gamma`` every 2 rounds (``sched_state``: the scheduler's state to continue from). Returns
    the scheduler's state."""
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=gamma)
    if sched_state is not None:
        sched.load_state_dict(sched_state)
    for r in rounds:
        if on_round is not None:
            on_round(r)
        workers = range(WORLD) if rank is None else [rank]
        for i in workers:
            tokens, target = shard(r, i)
            opt.zero_grad(set_to_none=True)
            (model(tokens) - target).pow(2).mean().backward()
            opt.step()
        assert opt.round_done
        sched.step()
    return sched.state_dict()


def run(
    name: str, rank: int | None, rounds: int = ROUNDS, on_round=None, gamma: float = 0.5,
    **opt_kwargs,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """rank None: one process, 2 virtual workers; else this rank's worker of a 2-rank run.
    ``on_round(r, opt)`` is called before each round."""
    torch.manual_seed(0)
    model = Net().to(DT)
    mode = {"n_workers": WORLD} if rank is None else {}
    opt = make(name, model, **mode, **opt_kwargs)
    assert opt.n_workers == WORLD
    hook = None if on_round is None else (lambda r: on_round(r, opt))
    train(model, opt, range(rounds), rank, hook, gamma=gamma)
    return {k: v.clone() for k, v in model.state_dict().items()}, opt.telemetry()


def _track_last(r: int, opt) -> None:
    """``track_residuals`` on for the last round only (set on the Hybrid, reaching its main):
    the rounds before report NaN."""
    if r > 0:
        assert math.isnan(opt.telemetry()["primal_residual"]), r
    opt.track_residuals = r == ROUNDS - 1


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        out = {}
        for name in EQUAL_NAMES:
            out[name] = run(name, rank)
        out["hybrid_last_tracked"] = run("hybrid", rank, on_round=_track_last)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_equals_virtual(tmp_path: Path) -> None:
    # the virtual runs first: forked children then inherit every lazily imported module
    virtual = {name: run(name, rank=None) for name in EQUAL_NAMES}
    virtual["hybrid_last_tracked"] = run("hybrid", None, on_round=_track_last)
    # fork (as DataLoader workers, one thread each) avoids re-importing torch in every child
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in (*EQUAL_NAMES, "hybrid_last_tracked"):
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
    # telemetry summed for the last round only: the same weights and last-round values
    for run_of in (virtual, *ranks):
        state, tel = run_of["hybrid_last_tracked"]
        full_state, full_tel = run_of["hybrid"]
        for key, value in full_state.items():
            assert torch.equal(state[key], value), key
        assert tel == full_tel


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


# ---------------------------------------------------------------- the consensus buckets
TINY_MB = 1e-4  # 104 bytes: 13 float64 numbers, so the tiny Net's tensors take 6 buckets
BF16_ROUNDS = 50
NAMES = ("sisa", "nsisa", "hybrid")


class AllReduceSpy:
    """Wraps ``dist.all_reduce`` (in a child process): per round, for each call, the tensor's
    storage, dtype, size, whether it was async, and whether the consensus buffers' last bucket
    was still all zero at that moment (the end of the local step not computed yet)."""

    def __init__(self) -> None:
        self.rounds: list[list[tuple[int, str, int, bool, bool]]] = []
        self.buckets: list = []  # the consensus FlatBuckets after each round (kept alive)
        self.opt = None

    def __enter__(self) -> AllReduceSpy:
        self.orig = dist.all_reduce
        dist.all_reduce = self._call
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.orig

    def _consensus(self):
        opt = self.opt
        return (opt.main if isinstance(opt, pisa.Hybrid) else opt).comm_buckets

    def on_round(self, r: int, opt) -> None:
        if r:
            self.buckets.append(self._consensus())
        self.opt = opt
        self.rounds.append([])

    def _call(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        buckets = self._consensus()
        last_zero = buckets is not None and bool((buckets.buffers[-1] == 0).all())
        self.rounds[-1].append((tensor.data_ptr(), str(tensor.dtype), tensor.numel(),
                                bool(async_op), last_zero))
        return self.orig(tensor, op=op, group=group, async_op=async_op)

    def summary(self) -> dict:
        self.buckets.append(self._consensus())
        first = self.buckets[0]
        return {
            "calls": self.rounds,
            "same_object": all(b is first for b in self.buckets),
            "same_buffers": all(
                x is y for b in self.buckets for x, y in zip(b.comm_buffers, first.comm_buffers)
            ),
            "consensus_ptrs": [t.data_ptr() for t in first.comm_buffers],
            "consensus_dtypes": [str(t.dtype) for t in first.comm_buffers],
        }


def _resume(rank: int, split: int) -> dict[str, torch.Tensor]:
    """SISA (tiny buckets) for ``split`` rounds, then a fresh model and optimizer loaded from
    their state dicts continue to ``ROUNDS``."""
    torch.manual_seed(0)
    model = Net().to(DT)
    opt = make("sisa", model, bucket_mb=TINY_MB)
    sched = train(model, opt, range(split), rank)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched}
    buffers = {t.data_ptr() for t in opt.comm_buckets.buffers}
    assert not any(isinstance(v, torch.Tensor) and v.data_ptr() in buffers
                   for st in saved["opt"]["state"].values() for v in st.values())
    saved = copy.deepcopy(saved)
    model = Net().to(DT)
    model.load_state_dict(saved["model"])
    opt = make("sisa", model, bucket_mb=TINY_MB)
    opt.load_state_dict(saved["opt"])
    train(model, opt, range(split, ROUNDS), rank, sched_state=saved["sched"])
    return {k: v.clone() for k, v in model.state_dict().items()}


def _join_group(rank: int) -> dict:
    """SISA on all but the head for 2 rounds, then the head joins (add_param_group): the
    buffers are rebuilt once, then kept."""
    torch.manual_seed(0)
    model = Net().to(DT)
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    opt = pisa.SISA(body, lr=0.02, sigma=3.0, bucket_mb=TINY_MB)
    seen = []
    for r in range(4):
        if r == 2:
            opt.add_param_group({"params": list(model.head.parameters())})
        tokens, target = shard(r, rank)
        opt.zero_grad(set_to_none=True)
        (model(tokens) - target).pow(2).mean().backward()
        opt.step()
        seen.append(opt.comm_buckets)
    return {
        "rebuilt": [seen[r] is not seen[r - 1] for r in range(1, 4)],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _buckets_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        out: dict = {}
        for name in NAMES:
            out[name, "one"] = run(name, rank, bucket_mb=None)[0]
            with AllReduceSpy() as spy:
                out[name, "tiny"] = run(name, rank, on_round=spy.on_round, bucket_mb=TINY_MB)[0]
            out[name, "spy"] = spy.summary()
        out["fp", "long"] = run("sisa", rank, rounds=BF16_ROUNDS, gamma=1.0,
                                bucket_mb=TINY_MB)[0]
        with AllReduceSpy() as spy:
            out["bf16", "long"] = run("sisa", rank, rounds=BF16_ROUNDS, on_round=spy.on_round,
                                      gamma=1.0, bucket_mb=TINY_MB,
                                      comm_dtype=torch.bfloat16)[0]
        out["bf16", "spy"] = spy.summary()
        with AllReduceSpy() as spy:  # a cast bucket that carries the extras
            out["fp32", "long"] = run("sisa", rank, rounds=BF16_ROUNDS, on_round=spy.on_round,
                                      gamma=1.0, bucket_mb=TINY_MB,
                                      comm_dtype=torch.float32)[0]
        out["fp32", "spy"] = spy.summary()
        out["resume"] = _resume(rank, split=3)
        out["join"] = _join_group(rank)
        torch.save(out, os.path.join(out_dir, f"buckets{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def bucket_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("buckets")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_buckets_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD,
                       join=True, start_method=method)
    return [torch.load(tmp / f"buckets{r}.pt", weights_only=True) for r in range(WORLD)]


def _consensus_calls(spy: dict, round_calls: list) -> list:
    ptrs = set(spy["consensus_ptrs"])
    return [c for c in round_calls if c[0] in ptrs]


@pytest.mark.distributed
def test_buckets_overlapped_equal_one_bucket_bitwise(bucket_runs: list[dict]) -> None:
    """Small buckets started during the step give the same weights, bit for bit (float64, 2
    ranks), as one bucket reduced after the whole step, and the virtual workers' to 1e-12."""
    for name in NAMES:
        virtual, _ = run(name, rank=None)
        for out in bucket_runs:
            assert len(out[name, "spy"]["consensus_ptrs"]) >= 2, name  # several buckets
            for key, value in out[name, "one"].items():
                assert torch.equal(out[name, "tiny"][key], value), f"{name} {key}"
                torch.testing.assert_close(value, virtual[key], atol=1e-12, rtol=0)


@pytest.mark.distributed
def test_buckets_are_persistent_and_started_during_the_step(bucket_runs: list[dict]) -> None:
    """The same buffer objects are all-reduced every round, each once, asynchronously; the first
    is launched while the last bucket is still unwritten (communication overlaps the step)."""
    for name in NAMES:
        for out in bucket_runs:
            spy = out[name, "spy"]
            assert spy["same_object"] and spy["same_buffers"], name
            for r, calls in enumerate(spy["calls"]):
                consensus = _consensus_calls(spy, calls)
                assert [c[0] for c in consensus] == spy["consensus_ptrs"], (name, r)
                assert all(c[3] for c in consensus), (name, r)  # async_op=True
                assert consensus[0][4], (name, r)  # the last bucket not yet written
                assert not consensus[-1][4], (name, r)  # ... and written when it is launched
            if name == "hybrid":  # the companion's gradient sum goes first, in the same round
                for calls in spy["calls"]:
                    assert calls[0][0] not in spy["consensus_ptrs"] and calls[0][3]


@pytest.mark.distributed
@pytest.mark.parametrize(("comm", "bound"), [("bf16", 1e-2), ("fp32", 1e-5)])
def test_comm_dtype_error_is_bounded(bucket_runs: list[dict], comm: str, bound: float) -> None:
    """comm_dtype (float64 parameters, 50 rounds of SISA at a constant LR): the tensors travel
    in that dtype (bfloat16: the extras in a float32 bucket of their own; float32: with the last
    bucket); the weights differ from the exact run, by less than ``bound`` times the distance
    they moved (measured: 2.9e-3 for bfloat16, whose roundings are 2^-8 relative)."""
    torch.manual_seed(0)
    initial = Net().to(DT).state_dict()
    for out in bucket_runs:
        dtypes = out[comm, "spy"]["consensus_dtypes"]
        wire = "torch.bfloat16" if comm == "bf16" else "torch.float32"
        if comm == "bf16":
            assert dtypes[:-1] == [wire] * (len(dtypes) - 1) and dtypes[-1] == "torch.float32"
        else:
            assert dtypes == [wire] * len(dtypes)
        exact, rounded = out["fp", "long"], out[comm, "long"]
        moved = torch.cat([(exact[k] - initial[k]).flatten() for k in exact]).norm()
        err = torch.cat([(rounded[k] - exact[k]).flatten() for k in exact]).norm()
        assert 0 < err < bound * moved, (float(err), float(moved))
    assert all(torch.equal(bucket_runs[0][comm, "long"][k], bucket_runs[1][comm, "long"][k])
               for k in initial)


@pytest.mark.distributed
def test_buckets_state_dict_round_trip_and_new_group(bucket_runs: list[dict]) -> None:
    """Resuming from state dicts mid-run gives the uninterrupted run bit for bit (the buffers
    are no state); a parameter group added in distributed mode rebuilds the buffers once."""
    for out in bucket_runs:
        for key, value in out["sisa", "tiny"].items():
            assert torch.equal(out["resume"][key], value), key
        assert out["join"]["rebuilt"] == [False, True, False]
    for key, value in bucket_runs[0]["join"]["state"].items():
        assert torch.equal(bucket_runs[1]["join"]["state"][key], value), key
