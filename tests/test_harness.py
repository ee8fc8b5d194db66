"""The shared harness: composition, run records, resume continuity, divergence, bad input."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from pisa_bench.config import compose_config, group_options
from pisa_bench.errors import DatasetMissing
from pisa_bench.record import RunExists, RunRecord
from pisa_bench.rundir import read_metrics
from pisa_bench.schedules import lr_multiplier

REPO = Path(__file__).resolve().parent.parent

QUICK = [
    "task=quickstart_mnist",
    "scale=smoke",
    "train.max_steps=6",
    "train.log_every=1",
    "train.eval_every=2",
]


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_config([f"experiment={experiment}"], with_hydra=True)
    assert cfg.task.name and cfg.optim.name


@pytest.mark.parametrize("task", group_options("task"))
@pytest.mark.parametrize("scale", group_options("scale"))
def test_every_task_scale_composes(task: str, scale: str) -> None:
    cfg = compose_config([f"task={task}", f"scale={scale}"])
    assert cfg.task.name == task and cfg.scale == scale
    assert cfg.task.metric.name and cfg.task.metric.lower_is_better in (True, False)


def test_unknown_task_lists_choices() -> None:
    with pytest.raises(MissingConfigException) as e:
        compose_config(["task=no_such_task"])
    assert "quickstart_mnist" in str(e.value) and "Available options in 'task'" in str(e.value)


def test_unknown_optimizer_lists_choices() -> None:
    with pytest.raises(MissingConfigException) as e:
        compose_config(["optim=no_such_optim"])
    assert "adamw" in str(e.value) and "muon" in str(e.value)


def test_missing_dataset_names_files_and_path(run_cfg, tmp_path: Path) -> None:
    empty = tmp_path / "no_data"
    with pytest.raises(DatasetMissing) as e:
        run_cfg(
            [
                "task=quickstart_mnist",
                "task.data.name=fashion_mnist",
                "optim=adamw",
                f"paths.data_dir={empty}",
            ]
        )
    msg = str(e.value)
    assert str(empty / "fashion-mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "paths.data_dir" in msg and "PISA_DATA_DIR" in msg


def test_failed_run_is_recorded(run_cfg, tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing):
        run_cfg(
            [
                "task=quickstart_mnist",
                "task.data.name=fashion_mnist",
                "optim=adamw",
                f"paths.data_dir={tmp_path / 'none'}",
            ]
        )
    (summary_path,) = tmp_path.glob("runs/**/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "failed" and "fashion-mnist" in summary["error"]


def test_nan_run_is_recorded_as_diverged(run_cfg) -> None:
    summary, _ = run_cfg([*QUICK, "optim=sgdm", "optim.lr=1e30", "optim.weight_decay=0"])
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_step"], int) and 1 <= summary["diverged_step"] <= 6
    assert "step" in summary["error"]


@pytest.mark.parametrize("optim", ["adamw", "muon", "sisa", "nsisa"])
def test_resume_continuity(optim: str, run_cfg, tmp_path: Path) -> None:
    """A run preempted at step 3 and resumed ends with the same metrics as an uninterrupted one."""
    full, full_dir = run_cfg([*QUICK, f"optim={optim}", "name=full"])
    assert full["status"] == "ok"
    part, part_dir = run_cfg([*QUICK, f"optim={optim}", "name=cut", "train.preempt_at_step=3"])
    assert part["status"] == "preempted" and part["steps"] == 3
    assert (part_dir / "ckpt").exists()
    resumed, resumed_dir = run_cfg([*QUICK, f"optim={optim}", "name=cut"])
    assert resumed_dir == part_dir and resumed["status"] == "ok"

    def values(d: Path) -> list[tuple[int, str, str, float]]:
        return [
            (r["step"], r["split"], r["metric"], r["value"])
            for r in read_metrics(d / "metrics.csv")
        ]

    assert values(resumed_dir) == values(full_dir)
    assert resumed["final_metric"] == full["final_metric"]
    assert resumed["steps"] == full["steps"] == 6
    meta = json.loads((resumed_dir / "meta.json").read_text())
    assert len(meta["resumes"]) == 1
    # the record names its CPU and the instruction set torch's kernels use
    import torch

    assert f"({torch.backends.cpu.get_cpu_capability()}, " in meta["cpu"]


def test_round_telemetry_is_summed_for_logged_rounds_only(
    run_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer has a consensus optimizer sum its round telemetry (``track_residuals``) for
    the rounds it logs only: with ``log_every=3`` rounds 3, 6 and 7 (the last), whose logged
    values (losses, telemetry, the final evaluation) are those of a run that logs every round."""
    import pisa.admm

    tracked: list[bool] = []
    real = pisa.admm.PISA._finish_round

    def finish(self, close):
        tracked.append(self._tel_partial is not None)
        return real(self, close)

    monkeypatch.setattr(pisa.admm.PISA, "_finish_round", finish)
    base = [o for o in QUICK if not o.startswith("train.log_every")]
    runs = {}
    for every in (1, 3):
        tracked.clear()
        summary, run_dir = run_cfg([*base, "optim=sisa", f"train.log_every={every}",
                                    "train.max_steps=7", f"name=every{every}"])
        assert summary["status"] == "ok"
        runs[every] = {(r["step"], r["split"], r["metric"]): r["value"]
                       for r in read_metrics(run_dir / "metrics.csv")
                       if r["split"] == "train" or r["step"] == 7}
        assert tracked == ([True] * 7 if every == 1 else
                           [step in (3, 6, 7) for step in range(1, 8)])
    assert sorted({step for step, _, _ in runs[3]}) == [3, 6, 7]
    for key, value in runs[3].items():  # the losses, telemetry and the final evaluation
        assert value == runs[1][key], key
    assert {"loss", "admm_dual_norm"} <= {m for _, _, m in runs[3]}
    assert any(split != "train" for _, split, _ in runs[3])
    residuals = [v for (_, _, m), v in runs[3].items() if m == "admm_primal_residual"]
    assert len(residuals) == 3 and all(v > 0 for v in residuals)


def test_finished_run_is_never_overwritten(run_cfg) -> None:
    first, run_dir = run_cfg([*QUICK, "optim=adamw"])
    before = (run_dir / "metrics.csv").read_text()
    again, same_dir = run_cfg([*QUICK, "optim=adamw"])  # run.if_exists=resume: skipped
    assert same_dir == run_dir and again == first
    assert (run_dir / "metrics.csv").read_text() == before
    with pytest.raises(RunExists):
        run_cfg([*QUICK, "optim=adamw", "run.if_exists=refuse"])


def test_refuse_does_not_resume_unfinished(tmp_path: Path) -> None:
    cfg = compose_config(
        [f"paths.out_dir={tmp_path}", *QUICK, "optim=adamw", "run.if_exists=refuse"]
    )
    rec = RunRecord.open(cfg, "cpu")
    rec.metrics.close()
    with pytest.raises(RunExists):
        RunRecord.open(cfg, "cpu")


def test_sigterm_checkpoints_and_marks_preempted(run_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM mid-run ends the run as 'preempted' with a checkpoint to resume from. The signal
    is sent from inside the loop (at the 3rd optimizer step), once the run's handler is in place:
    a timer could fire before it on a loaded machine and kill the test process instead."""
    from pisa_bench.trainer import Trainer

    original = Trainer.optimizer_step

    def step(self, opt, closure=None):  # type: ignore[no-untyped-def]
        original(self, opt, closure)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "optimizer_step", step)
    summary, run_dir = run_cfg(
        [
            "task=quickstart_mnist",
            "scale=smoke",
            "optim=adamw",
            "train.max_steps=100000",
            "train.eval_every=0",
        ]
    )
    assert summary["status"] == "preempted"
    assert (run_dir / "ckpt" / "rank0.pt").exists()
    assert summary["steps"] == 3


def test_schedules() -> None:
    f = lr_multiplier({"name": "step", "milestones_frac": [0.5, 0.75], "gamma": 0.1}, 100)
    assert [f(0), f(49), f(50), f(75), f(99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    f = lr_multiplier(
        {"name": "step", "milestones_frac": [0.1, 0.5], "gammas": [0.9, 0.35]}, 100
    )
    assert [f(9), f(10), f(49), f(50)] == pytest.approx([1, 0.9, 0.9, 0.9 * 0.35])
    with pytest.raises(ValueError, match="one factor per"):
        lr_multiplier({"name": "step", "milestones_frac": [0.1], "gammas": [0.9, 0.3]}, 100)
    f = lr_multiplier({"name": "trapezoid", "warmup_steps": 10, "warmdown_frac": 0.5}, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(49) == 1.0 and f(75) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    f = lr_multiplier({"name": "cosine", "min_frac": 0.1}, 100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="constant"):
        lr_multiplier({"name": "linear"}, 10)


def test_companion_routes_any_optimizer() -> None:
    """An optimizer config with a companion trains hidden matrices only (Shampoo on GPT-2)."""
    import torch
    from torch import nn

    from pisa import Hybrid
    from pisa_bench.baselines import build_optimizer

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 3))
    cfg = {"name": "shampoo", "_target_": "pytorch_optimizer.Shampoo", "lr": 1e-3,
           "routing": {"exclude": ["2."]},
           "companion": {"name": "adamw", "_target_": "torch.optim.AdamW", "lr": 1e-3}}
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Hybrid)
    main_ids = {id(p) for g in opt.main.param_groups for p in g["params"]}
    assert main_ids == {id(model[1].weight)}
    assert isinstance(opt.companion, torch.optim.AdamW)
    assert "shampoo" in type(opt.main).__name__.lower()


def test_registry_builds_hybrids_with_pisa_hybrid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's hybrids come from :func:`pisa.hybrid` (one builder) and route as it does:
    the same split and groups, the companion's config, ``Incompatible`` when nothing is left."""
    import torch
    from torch import nn

    import pisa
    from pisa_bench.baselines import Incompatible, build_optimizer

    calls: list[str] = []
    real = pisa.hybrid

    def counted(*args: object, **kwargs: object) -> pisa.Hybrid:
        calls.append("hybrid")
        return real(*args, **kwargs)

    monkeypatch.setattr(pisa, "hybrid", counted)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3))
    cfg = {"name": "muon", "_target_": "torch.optim.Muon", "hybrid": True, "lr": 0.02,
           "routing": {"exclude": ["3."], "require_2d": True},
           "companion": {"name": "adamw", "_target_": "torch.optim.AdamW", "lr": 1e-3,
                         "betas": [0.9, 0.95]}}
    opt = build_optimizer(model, cfg)
    assert calls == ["hybrid"]
    ref = real(model, lambda ps: torch.optim.Muon(ps, lr=0.02), exclude=("3.",),
               require_2d=True, companion_kwargs={"lr": 1e-3, "betas": (0.9, 0.95)})
    for ours, theirs in zip(opt.param_groups, ref.param_groups, strict=True):
        assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]
        assert {k: v for k, v in ours.items() if k != "params"} == {
            k: v for k, v in theirs.items() if k != "params"}
    assert isinstance(opt.main, torch.optim.Muon) and isinstance(opt.companion, torch.optim.AdamW)
    assert opt.companion.param_groups[0]["betas"] == (0.9, 0.95)

    hidden_only = build_optimizer(nn.Linear(4, 4, bias=False),
                                  {"name": "nsisa", "_target_": "pisa.NSISA", "hybrid": True,
                                   "lr": 0.01})
    assert isinstance(hidden_only.main, pisa.NSISA) and hidden_only.companion is None
    refused = r"none left after routing \(exclude=\['1\.', '2\.', '3\.'\], require_2d=True\)"
    with pytest.raises(Incompatible, match=refused):
        build_optimizer(model, {**cfg, "routing": {"exclude": ["1.", "2.", "3."],
                                                   "require_2d": True}})
    with pytest.raises(ValueError, match="companion optimizer must be a plain one, not 'muon'"):
        build_optimizer(model, {**cfg, "companion": {"name": "muon", "_target_": "torch.optim.Muon",
                                                     "hybrid": True}})
    assert len(calls) == 4


def test_ns_dtypes_records_the_resolved_newton_schulz_dtype() -> None:
    """``ns_dtype: null`` resolves per device and dtype (float32 on CPU, float64 for float64
    matrices); an explicit dtype is recorded as set; optimizers without Newton-Schulz give None."""
    import torch

    from pisa import NSISA, SISA
    from pisa_bench.runtime import ns_dtypes

    def mats(dtype: torch.dtype) -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.randn(4, 3, dtype=dtype)),
                torch.nn.Parameter(torch.randn(3, dtype=dtype))]

    assert ns_dtypes(NSISA(mats(torch.float32))) == "float32"
    assert ns_dtypes(NSISA(mats(torch.float64))) == "float64"
    assert ns_dtypes(NSISA(mats(torch.float32), ns_dtype="bfloat16")) == "bfloat16"
    mixed = NSISA([{"params": mats(torch.float32)},
                   {"params": mats(torch.float32), "ns_dtype": torch.bfloat16}])
    assert ns_dtypes(mixed) == "bfloat16,float32"
    assert ns_dtypes(SISA(mats(torch.float32))) is None
    assert ns_dtypes(torch.optim.AdamW(mats(torch.float32))) is None


def test_prune_checkpoints_frees_finished_runs_only(run_cfg, tmp_path: Path) -> None:
    """scripts/prune_checkpoints.py deletes ckpt/ of a finished run whose record is whole (first
    repairing lost metric rows from it), keeps a preempted run's and a held run's; the pruned
    run is still skipped as finished by the same command."""
    import subprocess
    import sys

    from pisa_bench.record import prune_checkpoints
    from pisa_bench.runlock import RunLock

    base = ["task=quickstart_mnist", "optim=sisa", "scale=smoke"]
    done, done_dir = run_cfg([*base, f"run.dir={tmp_path / 'done'}"])
    cut, cut_dir = run_cfg([*base, f"run.dir={tmp_path / 'cut'}", "train.preempt_at_step=2"])
    held, held_dir = run_cfg([*base, f"run.dir={tmp_path / 'held'}"])
    assert done["status"] == held["status"] == "ok" and cut["status"] == "preempted"
    assert all((d / "ckpt").is_dir() for d in (done_dir, cut_dir, held_dir))
    rows = (done_dir / "metrics.csv").read_text().splitlines()
    (done_dir / "metrics.csv").write_text("\n".join(rows[:-1]) + "\n")  # a lost row

    with RunLock(held_dir):  # another process holds it: left alone
        assert prune_checkpoints(held_dir) == 0
    assert prune_checkpoints(cut_dir) == 0 and (cut_dir / "ckpt").is_dir()
    assert prune_checkpoints(done_dir, dry_run=True) > 0 and (done_dir / "ckpt").is_dir()
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prune_checkpoints.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "2 of 3 runs with checkpoints pruned" in out.stdout  # done and held (now free)
    assert not (done_dir / "ckpt").exists() and (cut_dir / "ckpt").is_dir()
    assert (done_dir / "metrics.csv").read_text().splitlines() == rows  # repaired first
    again, _ = run_cfg([*base, f"run.dir={tmp_path / 'done'}"])
    assert again["status"] == "ok" and again["steps"] == done["steps"]
