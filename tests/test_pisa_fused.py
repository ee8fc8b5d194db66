"""``fused=True`` (the compiled elementwise step: the C++ CPU kernel, :mod:`pisa.cpu_kernel`, and
inductor's kernels, :mod:`pisa.fused`) against the foreach path.

Same weights and state as the foreach reference (float64 within 1e-12, float32 within 1e-6
relative, over 100 rounds), at m = 1 and m = 4 virtual workers, for SISA and PISA with weight
decay and L2; checkpoints move between the two paths in both directions; schedulers (``lr``,
``beta``) and new tensor sizes do not recompile (``torch.compiler.set_stance("fail_on_recompile")``
raises on any compilation); NSISA, Hybrid and distributed workers. Tests run inductor's kernels
(CUDA's path, and CPU's where the C++ kernel cannot be built) unless they take the ``backend``
fixture, which runs them with each. Tensors are tiny: each inductor kernel variant compiles once
per process (a few seconds, cached by inductor on disk), and the tests are arranged so that they
share variants.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import Net, shard
from torch import nn

import pisa

pytestmark = pytest.mark.compiled
DEFAULT_MIN_NUMEL = pisa.PISA.fused_min_numel


@pytest.fixture(autouse=True)
def _every_tensor_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors here are tiny: lower the size below which inductor's path takes the foreach
    path; inductor's kernels unless a test takes ``backend``."""
    monkeypatch.setattr(pisa.PISA, "fused_min_numel", 1)
    monkeypatch.setattr(pisa.PISA, "fused_cpu_backend", "inductor")


@pytest.fixture(params=["cpp", "inductor"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each CPU kernel in turn (the C++ one must build here: the machine has a compiler)."""
    if request.param == "cpp":
        assert pisa.cpu_kernel.library() is not None
    monkeypatch.setattr(pisa.PISA, "fused_cpu_backend", request.param)
    return request.param

ROUNDS = 100
SHAPES = [(6, 5), (5,), (3, 2, 2)]  # no 1-element tensor: it compiles its own graph
#: (m, keyword arguments): coupled decay and a dual start at m = 1; decoupled decay, L2 and
#: unequal worker weights at m = 4 (kernels: in place at m = 1, into the accumulator at m = 4)
SETTINGS = {
    1: {"weight_decay": 1e-2, "dual_init": 1e-3},
    4: {"weight_decay": 1e-2, "decoupled_weight_decay": True, "l2_lambda": 1e-2,
        "worker_weights": [1.0, 2.0, 3.0, 4.0]},
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def params(dtype: torch.dtype, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for s in SHAPES]


def make(name: str, ps: list[nn.Parameter], m: int, **kw) -> pisa.PISA:
    cls = {"sisa": pisa.SISA, "pisa": pisa.PISA}[name]
    return cls(ps, lr=0.02, sigma=2.0, n_workers=m, **{**SETTINGS[m], **kw})


def set_grads(ps: list[nn.Parameter], call: int) -> None:
    """A smooth loss (gradient 0.5 w^3 - w) plus noise that depends on the call."""
    gen = torch.Generator().manual_seed(1000 + call)
    for p in ps:
        w = p.detach()
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        p.grad = 0.5 * w**3 - w + 0.3 * noise


def train(ps: list[nn.Parameter], opt, start: int, stop: int, sched=None) -> None:
    for call in range(start, stop):
        set_grads(ps, call)
        opt.step()
        if sched is not None and opt.round_done:
            sched.step()


def rel_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    """``max |a - b| / max |a|`` per tensor (in float64)."""
    return [
        (x.double() - y.double()).abs().max().item() / max(x.abs().max().item(), 1e-30)
        for x, y in zip(a, b)
        if x.numel()
    ]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> None:
    for err in rel_errors(a, b):
        assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"


def state_tensors(opt: pisa.PISA, ps: list[nn.Parameter]) -> list[torch.Tensor]:
    return [opt.state[p][k] for p in ps for k in sorted(opt.state[p]) if k != "acc"]


CASES = [("sisa", 1, torch.float64), ("sisa", 4, torch.float64), ("sisa", 1, torch.float32),
         ("sisa", 4, torch.float32), ("pisa", 1, torch.float64), ("pisa", 4, torch.float64)]


@pytest.mark.parametrize(("name", "m", "dtype"), CASES,
                         ids=[f"{n}_m{m}_{str(d)[-7:]}" for n, m, d in CASES])
def test_fused_matches_foreach(name: str, m: int, dtype: torch.dtype, backend: str) -> None:
    """Weights within the tolerance; the state (dual, second moment) too in float64. In float32
    the dual (an average of gradients that partly cancel) carries the rounding of 100 steps at
    ~1e-6 in both paths, so there the fused state must be as close to the float64 run as the
    foreach state is (within a factor 2)."""
    runs = []
    for fused, dt in ((False, dtype), (True, dtype), (False, torch.float64)):
        ps = params(dt)
        opt = make(name, ps, m, fused=fused)
        train(ps, opt, 0, ROUNDS * m)
        assert opt.rounds == ROUNDS
        runs.append((ps, opt))
    (ps_a, opt_a), (ps_b, opt_b), (ps_r, opt_r) = runs
    assert_close([p.detach() for p in ps_a], [p.detach() for p in ps_b], dtype)
    state_a, state_b = state_tensors(opt_a, ps_a), state_tensors(opt_b, ps_b)
    if dtype == torch.float64:
        assert_close(state_a, state_b, dtype)
    else:
        state_r = state_tensors(opt_r, ps_r)
        for err_b, err_a in zip(rel_errors(state_r, state_b), rel_errors(state_r, state_a)):
            assert err_b <= 2.0 * err_a + 1e-7, (err_b, err_a)
    tel_a, tel_b = opt_a.telemetry(), opt_b.telemetry()
    for key in ("primal_residual", "dual_norm"):
        assert tel_b[key] == pytest.approx(tel_a[key], rel=1e-5), key


@pytest.mark.parametrize("m", [1, 4])
def test_telemetry_with_float64_default_dtype(m: int, backend: str) -> None:
    """With ``torch.set_default_dtype(torch.float64)`` the round's sums are 0-d float64 tensors,
    which inductor (torch 2.13, CPU) does not write back when a compiled graph adds a reduction
    to one in place: the fused primal residual must still equal the foreach one."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tels = []
        for fused in (False, True):
            ps = params(torch.float64)
            opt = make("sisa", ps, m, fused=fused)
            train(ps, opt, 0, 3 * m)
            tels.append(opt.telemetry())
    finally:
        torch.set_default_dtype(previous)
    assert tels[0]["primal_residual"] > 0.0
    for key in ("primal_residual", "dual_norm"):
        # the foreach path sums the norms in float32
        assert tels[1][key] == pytest.approx(tels[0][key], rel=1e-6), key


def test_kernels_are_compiled_and_schedulers_do_not_recompile() -> None:
    """A fresh kernel compiles (the stance raises on it); after the first round neither ``lr``
    (StepLR), ``beta`` nor a parameter of a new size compiles again, and the weights still
    follow the foreach path under the same schedule."""
    dt = torch.float64
    torch.compiler.reset()
    ps = params(dt)
    first = make("sisa", ps, 1, fused=True)
    set_grads(ps, 0)
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError):
        first.step()
    runs = []
    for fused in (False, True):
        ps = params(dt)
        opt = make("sisa", ps, 1, fused=fused)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
        train(ps, opt, 0, 1, sched)  # compiles the kernel for float64
        gen = torch.Generator().manual_seed(3)
        extra = nn.Parameter(torch.randn(11, 3, generator=gen, dtype=dt))  # a new size
        with torch.compiler.set_stance("fail_on_recompile"):
            for r in range(1, 12):
                if r == 5:
                    opt.param_groups[0]["beta"] = 0.9
                if r == 7:
                    opt.add_param_group({"params": [extra]})
                    ps.append(extra)
                train(ps, opt, r, r + 1, sched)
        assert opt.param_groups[0]["lr"] < 0.02 * 0.8**10
        runs.append([p.detach() for p in ps])
    assert_close(*runs, dt)


def test_packs_and_size_patterns() -> None:
    """Packs are powers of two, largest first, covering every index once; a pattern says which
    sizes are equal (and marks size 1 and the coefficient tensor's size)."""
    for n in range(0, 100):
        cut = pisa.fused.packs(n)
        sizes = [s.stop - s.start for s in cut]
        assert [i for s in cut for i in range(n)[s]] == list(range(n))
        assert all(k & (k - 1) == 0 and k <= pisa.fused.MAX_PACK for k in sizes)
        assert sizes == sorted(sizes, reverse=True)
    assert [s.stop - s.start for s in pisa.fused.packs(5, 1)] == [1] * 5  # per tensor
    assert pisa.fused.size_pattern([30, 30, 12, 5, 12]) == (0, 0, 2, 3, 2)
    assert pisa.fused.size_pattern([7, 1, pisa.fused.N_COEF]) == (0, -1, -2)


def fused_matches_foreach(numels: list[int], seed: int, stance: str = "default") -> None:
    """SISA (m = 1) on 1-D float64 tensors of these sizes, 3 steps, fused (under ``stance``)
    against foreach."""
    dt = torch.float64
    runs = []
    for fused in (False, True):
        gen = torch.Generator().manual_seed(seed)
        ps = [nn.Parameter(torch.randn(n, generator=gen, dtype=dt)) for n in numels]
        opt = pisa.SISA(ps, lr=0.02, sigma=2.0, n_workers=1, fused=fused)
        with torch.compiler.set_stance(stance):
            train(ps, opt, 0, 3)
        runs.append([p.detach() for p in ps])
    assert_close(*runs, dt)


def test_a_pattern_compiles_once_and_equal_sizes_are_kept_apart() -> None:
    """Packs with the sizes' pattern of a compiled pack reuse its graph whatever the sizes
    (no compilation: the stance raises on one); another pattern gets its own kernel, and every
    pack follows the foreach path."""
    fused_matches_foreach([30, 30, 12, 5], 0)  # pattern (0, 0, 2, 3)
    kernels = len(pisa.fused._KERNELS)
    fused_matches_foreach([20, 20, 7, 6], 1, "fail_on_recompile")  # same pattern, other sizes
    assert len(pisa.fused._KERNELS) == kernels
    fused_matches_foreach([20, 7, 7, 6], 2)  # (0, 1, 1, 3): a kernel of its own
    assert len(pisa.fused._KERNELS) == kernels + 1


def test_new_patterns_beyond_the_kernel_limit_run_tensor_by_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once ``MAX_KERNELS`` kernels exist, a pack of a new size pattern is not compiled: its
    tensors take the single-tensor kernels (compiled for the first model), same weights as the
    foreach path, and no kernel is added."""
    fused_matches_foreach([13, 17, 19], 0)  # packs of 2 and 1: compiles the single-tensor kernel
    monkeypatch.setattr(pisa.fused, "MAX_KERNELS", len(pisa.fused._KERNELS))
    kernels = dict(pisa.fused._KERNELS)
    fused_matches_foreach([23, 23, 29, 31], 1, "fail_on_recompile")  # pattern (0, 0, 2, 3): no room
    assert kernels == pisa.fused._KERNELS


def test_inside_a_compiled_training_step() -> None:
    """``torch.compile(opt.step)``: the step runs eagerly (``torch.compiler.disable``) and its
    kernels still run compiled, with the same weights."""
    dt = torch.float64
    runs = []
    for compiled in (False, True):
        ps = params(dt)
        opt = make("sisa", ps, 1, fused=True)
        step = torch.compile(opt.step) if compiled else opt.step
        for call in range(5):
            set_grads(ps, call)
            step()
        runs.append([p.detach() for p in ps])
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("direction", ["foreach_to_fused", "fused_to_foreach"])
def test_state_dict_moves_between_paths(direction: str, backend: str) -> None:
    """A checkpoint taken inside a round by one path continues in the other as in the first,
    and the loading optimizer keeps its own ``fused``."""
    dt, m = torch.float64, 4
    src_fused = direction == "fused_to_foreach"
    ps = params(dt)
    opt = make("sisa", ps, m, fused=src_fused)
    split = 3 * m + 2
    train(ps, opt, 0, split)
    ckpt = copy.deepcopy({"w": [p.detach().clone() for p in ps], "opt": opt.state_dict()})
    ps_c = params(dt, seed=5)
    opt_c = make("sisa", ps_c, m, fused=not src_fused)
    with torch.no_grad():
        for p, w in zip(ps_c, ckpt["w"]):
            p.copy_(w)
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.param_groups[0]["fused"] is (not src_fused)
    assert opt_c.worker_index == 2
    train(ps, opt, split, split + 5 * m)
    train(ps_c, opt_c, split, split + 5 * m)
    assert_close([p.detach() for p in ps], [p.detach() for p in ps_c], dt)
    assert_close(state_tensors(opt, ps), state_tensors(opt_c, ps_c), dt)


def test_small_non_contiguous_zero_dim_and_empty(
    monkeypatch: pytest.MonkeyPatch, backend: str,
) -> None:
    """Inductor's path: tensors below ``fused_min_numel`` (by default: all of these) and
    non-contiguous or empty ones take the foreach path (bit for bit); a 0-d one is fused. The
    C++ kernel takes every contiguous tensor, whatever its size (the non-contiguous one takes
    the foreach path)."""
    dt = torch.float64

    def build() -> list[nn.Parameter]:
        base = params(dt)
        return [nn.Parameter(base[0].detach().t()), nn.Parameter(base[1].detach()[0].clone()),
                nn.Parameter(torch.zeros(0, 3, dtype=dt)), base[2]]

    for min_numel, tol in ((DEFAULT_MIN_NUMEL, 0.0 if backend == "inductor" else TOL[dt]),
                           (1, TOL[dt])):
        monkeypatch.setattr(pisa.PISA, "fused_min_numel", min_numel)
        runs = []
        for fused in (False, True):
            ps = build()
            assert not ps[0].is_contiguous() and ps[1].ndim == 0
            train(ps, make("sisa", ps, 1, fused=fused), 0, 20)
            runs.append([p.detach() for p in ps])
        for x, y in zip(*runs):
            if tol == 0.0:
                assert torch.equal(x, y)
            else:
                assert_close([x], [y], dt)


WORLD = 2


def run_net(name: str, rank: int | None, fused: bool, rounds: int = 5) -> list[torch.Tensor]:
    """SISA or Hybrid-NSISA on ``Net`` with a scheduler; rank None: 2 virtual workers."""
    dt = torch.float64
    torch.manual_seed(0)
    model = Net().to(dt)
    mode = {"n_workers": WORLD} if rank is None else {}
    if name == "sisa":
        opt = pisa.SISA(model.parameters(), lr=0.02, sigma=3.0, l2_lambda=1e-3,
                        weight_decay=1e-2, decoupled_weight_decay=True,
                        worker_weights=[1.0, 3.0], fused=fused, **mode)
    else:
        opt = pisa.hybrid_nsisa(model, lr=0.01, sigma=5.0, ns_dtype=dt, weight_decay=1e-2,
                                worker_weights=[1.0, 3.0], companion_kwargs={"lr": 1e-2},
                                fused=fused, **mode)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for r in range(rounds):
        for i in range(WORLD) if rank is None else [rank]:
            tokens, target = shard(r, i)
            opt.zero_grad(set_to_none=True)
            (model(tokens) - target).pow(2).mean().backward()
            opt.step()
        assert opt.round_done
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def test_nsisa_and_hybrid_fused_match_foreach(backend: str) -> None:
    """NSISA's vectors (SISA step) and the update after its Newton-Schulz direction, inside
    Hybrid, with a scheduler."""
    assert_close(run_net("hybrid", None, False), run_net("hybrid", None, True), torch.float64)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.save(run_net("sisa", rank, True), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_fused_equals_virtual_foreach(tmp_path: Path, backend: str) -> None:
    reference = run_net("sisa", None, False)
    run_net("sisa", None, True)  # compiles here; forked children inherit the kernels (and
    # the backend)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method=method)
    for r in range(WORLD):
        assert_close(reference, torch.load(tmp_path / f"rank{r}.pt", weights_only=True),
                     torch.float64)


# ------------------------------------------------------------------ the C++ CPU kernel
def foreach_and_cpp(ps_of, name: str, m: int, calls: int) -> tuple[list, list]:
    """Weights and telemetry of the foreach path and of ``fused=True`` (the C++ kernel)."""
    out = []
    for fused in (False, True):
        ps = ps_of()
        opt = make(name, ps, m, fused=fused)
        train(ps, opt, 0, calls)
        out.append(([p.detach().clone() for p in ps], opt.telemetry()))
    return out[0], out[1]


@pytest.mark.parametrize(("name", "m"), [("sisa", 1), ("sisa", 4), ("pisa", 1)])
def test_cpp_kernel_takes_every_contiguous_tensor(
    monkeypatch: pytest.MonkeyPatch, name: str, m: int,
) -> None:
    """With the C++ kernel no inductor kernel is asked for, tiny tensors included (the default
    ``fused_min_numel``), and the weights follow the foreach path."""
    monkeypatch.setattr(pisa.PISA, "fused_cpu_backend", "cpp")
    monkeypatch.setattr(pisa.PISA, "fused_min_numel", DEFAULT_MIN_NUMEL)

    def refuse(*args, **kwargs):
        raise AssertionError("an inductor kernel was asked for")

    monkeypatch.setattr(pisa.fused, "admm_kernel", refuse)
    (w_ref, tel_ref), (w_cpp, tel_cpp) = foreach_and_cpp(lambda: params(torch.float64), name, m,
                                                         5 * m)
    assert_close(w_ref, w_cpp, torch.float64)
    assert tel_cpp["primal_residual"] == pytest.approx(tel_ref["primal_residual"], rel=1e-6)


def test_cpp_kernel_threads_do_not_change_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors of more than 16 blocks (with a partial last block) run on 2 threads: the same
    weights bit for bit as on 1 thread, and as the foreach path within the tolerance."""
    monkeypatch.setattr(pisa.PISA, "fused_cpu_backend", "cpp")
    dt = torch.float32

    def big() -> list[nn.Parameter]:
        gen = torch.Generator().manual_seed(7)
        return [nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s in [(40_000,), (300, 170)]]

    runs = {}
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[threads] = foreach_and_cpp(big, "sisa", 4, 8)
    finally:
        torch.set_num_threads(previous)
    (w_ref, _), (w_1, tel_1) = runs[1]
    _, (w_2, tel_2) = runs[2]
    assert all(torch.equal(x, y) for x, y in zip(w_1, w_2))
    assert tel_2["primal_residual"] == pytest.approx(tel_1["primal_residual"], rel=1e-6)
    assert_close(w_ref, w_1, dt)


BUILD_AND_STEP = """
import torch, pisa
assert pisa.cpu_kernel.library() is not None
p = torch.nn.Parameter(torch.arange(6.0))
p.grad = torch.ones(6)
pisa.SISA([p], lr=0.1, fused=True).step()
print(p.detach().tolist())
"""


def test_cpp_kernel_builds_once_for_concurrent_processes(tmp_path: Path) -> None:
    """Two processes build into an empty cache at the same time: both load a whole library and
    step alike; one library remains, and no temporary file."""
    env = {**os.environ, "PISA_KERNEL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_AND_STEP], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    assert [f.name.startswith("admm_cpu_") for f in tmp_path.iterdir()] == [True]


def test_cpp_kernel_rebuilds_a_damaged_library_and_falls_back_without_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cached library that does not load is rebuilt; a compiler that fails gives one warning and
    inductor's kernels (same weights as the foreach path)."""
    monkeypatch.setenv("PISA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(pisa.PISA, "fused_cpu_backend", "cpp")
    # built by another process (a library loaded here must not be overwritten under it)
    subprocess.run([sys.executable, "-c", BUILD_AND_STEP], check=True, timeout=300,
                   capture_output=True)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a library")
    library = pisa.cpu_kernel.library
    library.cache_clear()
    try:
        assert library() is not None and path.stat().st_size > 1000
        library.cache_clear()
        monkeypatch.setenv("CXX", "false")
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert library() is None
        (w_ref, _), (w_fused, _) = foreach_and_cpp(lambda: params(torch.float64), "sisa", 1, 3)
        assert_close(w_ref, w_fused, torch.float64)
    finally:
        library.cache_clear()


@pytest.mark.parametrize(
    "build_bad",
    [
        lambda: pisa.SISA(None, fused=1),
        lambda: pisa.PISA(None, fused=True, foreach=True),
        lambda: pisa.SISA([nn.Parameter(torch.zeros(2, device="meta"))], fused=True),
    ],
)
def test_bad_fused_arguments(build_bad) -> None:
    with pytest.raises(ValueError):
        build_bad()
