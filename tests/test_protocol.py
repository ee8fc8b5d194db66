"""The verdict protocol (pisa_bench/protocol.py) and the verdict rule (analysis/verdict.py).

Trial expansion (grid, sigma/rho/companion scaling), the edge rule, selection on the
validation split (never test), the seed stages, and verdicts computed from synthetic seed
tables with a known answer. The driver runs on run directories written by a stand-in launcher
(a known validation / test curve per lr), and once end to end on real smoke runs.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from omegaconf import DictConfig, OmegaConf

from pisa_bench.analysis.verdict import (
    CONTRADICTED,
    NOT_DIST,
    SUPPORTED,
    compare,
    detectable_effect,
    holm,
    impute_failures,
    overall,
)
from pisa_bench.launch.plan import Plan, Point
from pisa_bench.protocol import ProtocolSpec, drive, lr_overrides, multipliers, selection_value
from pisa_bench.rundir import METRIC_COLUMNS

# --- trial expansion --------------------------------------------------------------------------


def test_multipliers_are_log_spaced_and_hit_one() -> None:
    assert multipliers(5, 0.1, 10.0) == [0.1, 0.3162, 1.0, 3.162, 10.0]
    m = multipliers(7, 0.01, 100.0)
    assert m[3] == 1.0 and len(m) == 7
    ratios = np.diff(np.log10(m))
    assert np.allclose(ratios, ratios[0], atol=1e-3)


def _ovr(items: Sequence[str]) -> dict[str, float]:
    return {k: float(v) for k, v in (o.split("=") for o in items)}


def test_lr_overrides_keep_sigma_times_lr_and_move_the_companion() -> None:
    sgd = OmegaConf.create({"optim": {"name": "sgdm", "lr": 0.01}})
    assert _ovr(lr_overrides(sgd, 10.0)) == {"optim.lr": pytest.approx(0.1)}
    sisa = OmegaConf.create({"optim": {"name": "sisa", "lr": 1e-3, "sigma": 2.0}})
    o = _ovr(lr_overrides(sisa, 4.0))
    assert o["optim.lr"] * o["optim.sigma"] == pytest.approx(1e-3 * 2.0)
    assert o["optim.lr"] == pytest.approx(4e-3)
    # lr given through sigma and rho (lr = 1/(sigma + rho)): both scale by 1/m
    fl = OmegaConf.create({"optim": {"name": "sisa", "lr": None, "sigma": 1000.0, "rho": 100.0}})
    o = _ovr(lr_overrides(fl, 10.0))
    assert 1 / (o["optim.sigma"] + o["optim.rho"]) == pytest.approx(10 / 1100)
    assert o["optim.sigma"] / o["optim.rho"] == pytest.approx(10.0)
    hybrid = OmegaConf.create({"optim": {"name": "nsisa", "lr": 0.005, "sigma": 80.0,
                                         "companion": {"name": "adamw", "lr": 0.003}}})
    o = _ovr(lr_overrides(hybrid, 0.1))
    assert o["optim.companion.lr"] == pytest.approx(3e-4)
    assert o["optim.lr"] == pytest.approx(5e-4) and o["optim.sigma"] == pytest.approx(800.0)
    with pytest.raises(ValueError, match=r"no optim\.lr"):
        lr_overrides(OmegaConf.create({"optim": {"name": "x", "lr": None}}), 2.0)


def test_spec_requires_an_equal_budget_of_at_least_five_trials() -> None:
    assert ProtocolSpec.from_meta({}) is None
    spec = ProtocolSpec.from_meta({"protocol": {"claim": "sisa", "trials": 5}})
    assert spec is not None and spec.claims == ("sisa",) and spec.seeds == 5
    with pytest.raises(ValueError, match=">= 5"):
        ProtocolSpec.from_meta({"protocol": {"claim": "sisa", "trials": 3}})
    with pytest.raises(ValueError, match="unknown keys"):
        ProtocolSpec.from_meta({"protocol": {"claim": "sisa", "trails": 5}})
    with pytest.raises(ValueError, match="claim"):
        ProtocolSpec.from_meta({"protocol": {"trials": 5}})


# --- the driver on run directories of known curves ----------------------------------------------
BASE_LR = {"sisa": 1e-3, "adamw": 1e-3}


def _fake_compose(out_dir: Path):
    """A stand-in for Hydra: the config of a point is a base config with the overrides set."""

    def compose(overrides: Sequence[str]) -> DictConfig:
        cfg = OmegaConf.create({
            "name": "proto", "scale": "small", "seed": 0, "paths": {"out_dir": str(out_dir)},
            "run": {"dir": None}, "task": {"name": "toy", "metric": {
                "name": "accuracy", "split": "test", "lower_is_better": False}},
            "optim": {"name": "sisa", "lr": 1e-3, "sigma": 1.0}, "train": {}})
        for o in overrides:
            key, value = o.split("=", 1)
            if key == "optim":
                cfg.optim = {"name": value, "lr": BASE_LR[value],
                             **({"sigma": 1.0} if value == "sisa" else {})}
            else:
                OmegaConf.update(cfg, key, _parse(value))
        return cfg

    return compose


def _parse(v: str) -> Any:
    if v in ("true", "false"):
        return v == "true"
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _write_run(run_dir: Path, status: str, rows: list[tuple[str, float]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(METRIC_COLUMNS)
        for metric, value in rows:
            w.writerow([10, 1.0, 100, 1.0, "test", metric, value])
    (run_dir / "summary.json").write_text(json.dumps({"status": status}))


def _launcher(val_peak: dict[str, float], test_peak: dict[str, float], launched: list):
    """Writes each point's run: val accuracy peaks at lr = val_peak[optim] (log-quadratic),
    test accuracy at test_peak[optim] (elsewhere on purpose); seeds add a small offset."""

    def launch(points: Sequence[Point]) -> None:
        for p in points:
            launched.append(p)
            name, lr, seed = str(p.cfg.optim.name), float(p.cfg.optim.lr), int(p.cfg.seed)
            val = 90 - (math.log10(lr / val_peak[name])) ** 2
            test = 90 - (math.log10(lr / test_peak[name])) ** 2 + 0.01 * seed
            status = "diverged" if lr > 0.05 else "ok"  # very large lrs blow up
            _write_run(p.run_dir, status, [("val_accuracy", val - 1), ("val_accuracy", val),
                                           ("accuracy", test)])

    return launch


def _plan(tmp_path: Path, compose, tasks: Sequence[str] = ()) -> Plan:
    points = []
    for task in tasks or [None]:
        for optim in ("sisa", "adamw"):
            ovr = [f"optim={optim}", "seed=0"] + ([f"task.name={task}"] if task else [])
            cfg = compose(ovr)
            points.append(Point(ovr, cfg, tmp_path / "unused" / f"{task}-{optim}"))
    return Plan(experiment="proto", name="proto", scale="small", out_dir=tmp_path,
                base_overrides=[], task_overrides=[], hydra_overrides=[], meta={},
                points=points)


def test_selection_uses_validation_edge_rule_extends_and_seeds_follow(tmp_path: Path) -> None:
    compose = _fake_compose(tmp_path)
    spec = ProtocolSpec(claims=("sisa",), trials=5, lr_range=(0.1, 10.0), max_extend=2,
                        seeds=3)
    launched: list[Point] = []
    # sisa: val optimum at 3e-3 (inside the grid; test optimum at 1e-4 must not be chosen);
    # adamw: val optimum at 1e-1 x 1e-3 ... far below the grid: the edge rule extends downwards
    launch = _launcher({"sisa": 3.162e-3, "adamw": 1e-5}, {"sisa": 1e-4, "adamw": 1e-2},
                       launched)
    proto = drive(_plan(tmp_path, compose), spec, launch, echo=lambda s: None, compose=compose)
    sisa, adamw = proto.arms
    assert sorted(sisa.trials) == [0.1, 0.3162, 1.0, 3.162, 10.0] and not sisa.extra
    assert sisa.chosen == 3.162  # validation optimum, not the test optimum (x0.1)
    assert adamw.extra == [0.03162, 0.01]  # two extra trials on the low side, then stop
    assert adamw.at_edge == "low" and adamw.chosen == 0.01
    assert all(int(p.cfg.seed) == 0 for p in [*sisa.trials.values(), *adamw.trials.values()])
    for arm in proto.arms:
        assert sorted(arm.tuned) == sorted(arm.paper) == [0, 1, 2]
        assert all(p.tags["lr_mult"] == arm.chosen for s, p in arm.tuned.items() if s)
        assert all(float(p.cfg.optim.lr) == pytest.approx(BASE_LR[arm.label])
                   for p in arm.paper.values())
        assert arm.tuned[0] is arm.trials[arm.chosen]  # seed 0 of the tuned row is the trial
    # equal budget: both arms got the same 5 grid trials; the extra ones are reported
    assert len(launched) == len({p.run_dir for p in launched})
    # resuming: the same call launches nothing and rebuilds the same choices
    again: list[Point] = []
    proto2 = drive(_plan(tmp_path, compose), spec,
                   _launcher({"sisa": 1.0, "adamw": 1.0}, {"sisa": 1.0, "adamw": 1.0}, again),
                   echo=lambda s: None, compose=compose)
    assert again == [] and [a.chosen for a in proto2.arms] == [3.162, 0.01]


def test_paper_overrides_reach_the_paper_row_only(tmp_path: Path) -> None:
    """``paper_overrides`` (the official code's options) go into every "paper settings" run of
    that arm, seed 0 included (so the x1 trial is not reused for it), and into no trial, no
    tuned run and no other arm."""
    compose = _fake_compose(tmp_path)
    spec = ProtocolSpec.from_meta({"protocol": {
        "claim": "sisa", "seeds": 2, "paper_overrides": {"sisa": ["optim.scaled_dual=true"]}}})
    assert spec is not None and spec.paper_overrides == (
        ("sisa", None, ("optim.scaled_dual=true",)),)
    launched: list[Point] = []
    launch = _launcher({"sisa": 1e-3, "adamw": 1e-3}, {"sisa": 1e-3, "adamw": 1e-3}, launched)
    proto = drive(_plan(tmp_path, compose), spec, launch, echo=lambda s: None, compose=compose)
    sisa, adamw = proto.arms
    assert sisa.chosen == 1.0  # the tuned row is at x1 too, yet stays apart from the paper row
    assert all(p.cfg.optim.get("scaled_dual") is True for p in sisa.paper.values())
    assert sisa.paper[0] is not sisa.trials[1.0]
    others = [*sisa.trials.values(), *sisa.tuned.values(), *adamw.trials.values(),
              *adamw.tuned.values(), *adamw.paper.values()]
    assert not any(p.cfg.optim.get("scaled_dual") for p in others)
    assert adamw.paper[0] is adamw.trials[1.0]
    assert {p.run_dir for p in sisa.paper.values()}.isdisjoint(p.run_dir for p in others)


def test_paper_overrides_per_task_reach_that_task_only(tmp_path: Path) -> None:
    """A mapping task label -> overrides gives them to that task's arm of the optimizer only
    (fig1_vision: the official VGG-11 round for VGG-11's SISA, not ResNet-34's); a list beside
    it still reaches every task's arm; a value that is neither is refused."""
    compose = _fake_compose(tmp_path)
    spec = ProtocolSpec.from_meta({"protocol": {"claim": "sisa", "seeds": 2, "paper_overrides": {
        "sisa": {"vgg": ["optim.first_grad_norm=true"]}, "adamw": ["optim.eps=1e-6"]}}})
    assert spec is not None
    launch = _launcher({"sisa": 1e-3, "adamw": 1e-3}, {"sisa": 1e-3, "adamw": 1e-3}, [])
    proto = drive(_plan(tmp_path, compose, tasks=("vgg", "resnet")), spec, launch,
                  echo=lambda s: None, compose=compose)
    arms = {a.key: a for a in proto.arms}
    assert all(p.cfg.optim.get("first_grad_norm") is True
               for p in arms["vgg", "sisa"].paper.values())
    assert not any(p.cfg.optim.get("first_grad_norm") for a in proto.arms
                   for p in [*a.trials.values(), *a.tuned.values()]
                   + ([] if a.key == ("vgg", "sisa") else list(a.paper.values())))
    assert all(p.cfg.optim.get("eps") == 1e-6 for t in ("vgg", "resnet")
               for p in arms[t, "adamw"].paper.values())
    with pytest.raises(ValueError, match=r"paper_overrides\.sisa\.vgg: a list"):
        ProtocolSpec.from_meta({"protocol": {"claim": "sisa", "paper_overrides": {
            "sisa": {"vgg": "optim.first_grad_norm=true"}}}})


def test_diverged_trials_rank_last(tmp_path: Path) -> None:
    compose = _fake_compose(tmp_path)
    spec = ProtocolSpec(claims=("sisa",), trials=5, max_extend=0, seeds=1)
    # the val optimum is at the top of the grid (x10 = 1e-2, fine) for sisa; for adamw x10 is
    # 1e-2 too: make everything above 0.05 diverge and the optimum at 1 (lr 1) -> x10 chosen
    proto = drive(_plan(tmp_path, compose), spec,
                  _launcher({"sisa": 1.0, "adamw": 1.0}, {"sisa": 1.0, "adamw": 1.0}, []),
                  echo=lambda s: None, compose=compose)
    assert [a.chosen for a in proto.arms] == [10.0, 10.0]
    assert [a.at_edge for a in proto.arms] == ["high", "high"]  # flagged: a bound
    big = ProtocolSpec(claims=("sisa",), trials=5, lr_range=(0.1, 100.0), max_extend=0, seeds=1)
    out = tmp_path / "big"
    compose2 = _fake_compose(out)
    proto = drive(_plan(out, compose2), big,
                  _launcher({"sisa": 1.0, "adamw": 1.0}, {"sisa": 1.0, "adamw": 1.0}, []),
                  echo=lambda s: None, compose=compose2)
    # x100 (lr 0.1) diverged: ranks last although its val metric would be the best
    assert all(a.chosen == 17.78 for a in proto.arms)  # grid 0.1, 0.5623, 3.162, 17.78, 100


def test_a_failed_trial_counts_as_a_failure_then_the_next_call_retries_it(tmp_path: Path) -> None:
    """A failed run (an error, not divergence) settles its stage in the call that ran it, so
    the protocol goes on with it ranked last; the next call runs it again (the same command
    resumes), and once it succeeds it is selected on its merits."""
    compose = _fake_compose(tmp_path)
    spec = ProtocolSpec(claims=("sisa",), trials=5, max_extend=0, seeds=2)
    good = _launcher({"sisa": 1e-3, "adamw": 1e-3}, {"sisa": 1e-3, "adamw": 1e-3}, [])

    def failing(points: Sequence[Point]) -> None:  # sisa's x1 trial (its val optimum) fails
        for p in points:
            if str(p.cfg.optim.name) == "sisa" and p.tags.get("lr_mult") == 1.0:
                _write_run(p.run_dir, "failed", [])
            else:
                good([p])

    proto = drive(_plan(tmp_path, compose), spec, failing, echo=lambda s: None,
                  compose=compose)
    sisa = proto.arms[0]
    assert sisa.chosen != 1.0 and sisa.tuned  # ranked last, and the seeds still ran
    launched: list[Point] = []
    retry = _launcher({"sisa": 1e-3, "adamw": 1e-3}, {"sisa": 1e-3, "adamw": 1e-3}, launched)
    proto2 = drive(_plan(tmp_path, compose), spec, retry, echo=lambda s: None,
                   compose=compose)
    first = launched[0]
    assert (str(first.cfg.optim.name), first.tags["lr_mult"]) == ("sisa", 1.0)
    assert proto2.arms[0].chosen == 1.0  # now ok: chosen on its validation value


def test_selection_value_reads_the_last_validation_row(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", "ok", [("val_accuracy", 1.0), ("accuracy", 99.0),
                                       ("val_accuracy", 2.0)])
    assert selection_value(tmp_path / "a", "accuracy") == 2.0
    _write_run(tmp_path / "b", "diverged", [("val_accuracy", 5.0)])
    assert selection_value(tmp_path / "b", "accuracy") is None
    _write_run(tmp_path / "c", "ok", [("accuracy", 5.0)])  # no validation split
    assert selection_value(tmp_path / "c", "accuracy") is None


# --- the verdict rule on synthetic seed tables -------------------------------------------
def _seeds(values: dict[str, Sequence[float]], lower: bool = False,
           status: dict[tuple[str, int], str] | None = None) -> pd.DataFrame:
    rows = []
    for arm, vals in values.items():
        for s, v in enumerate(vals):
            rows.append({"task": "t", "arm": arm, "role": "tuned", "seed": s,
                         "status": (status or {}).get((arm, s), "ok"), "final_metric": v,
                         "lower_is_better": lower})
    return pd.DataFrame(rows)


def test_holm_matches_hand_computation() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    out = holm([math.nan, 0.02])
    assert math.isnan(out[0]) and out[1] == pytest.approx(0.02)


def test_planted_difference_is_found_and_no_difference_is_not() -> None:
    rng = np.random.default_rng(0)
    base = 80 + rng.normal(0, 1.0, size=6)  # seed effects shared by the arms (pairing)
    noise = lambda: rng.normal(0, 0.1, size=6)  # noqa: E731
    planted = _seeds({"sisa": base + 1.0 + noise(), "adam": base + noise(),
                      "sgd": base - 0.5 + noise()})
    comps = compare(planted, ["sisa"])
    assert [c.baseline for c in comps] == ["adam", "sgd"]
    assert all(c.verdict == SUPPORTED for c in comps)
    assert comps[0].effect == pytest.approx(1.0, abs=0.2)
    assert comps[0].ci_lo < 1.0 < comps[0].ci_hi
    assert overall(comps) == SUPPORTED
    same = _seeds({"sisa": base + noise(), "adam": base + noise()})
    (c,) = compare(same, ["sisa"])
    assert c.verdict == NOT_DIST and c.p_holm > 0.05
    assert 0 < c.mde < 0.5  # small seed noise: small differences would have been seen
    assert overall([c]) == f"{NOT_DIST} at 6 seeds"
    worse = _seeds({"sisa": base - 2 + noise(), "adam": base + noise()})
    (c,) = compare(worse, ["sisa"])
    assert c.verdict == CONTRADICTED and c.effect < 0
    assert overall([c]).startswith(CONTRADICTED)


def test_lower_is_better_flips_the_sign_and_references_are_never_compared() -> None:
    rng = np.random.default_rng(1)
    base = 100 + rng.normal(0, 5, size=5)
    df = _seeds({"sisa": base - 3 + rng.normal(0, 0.1, 5), "adam": base,
                 "central": base - 10}, lower=True)
    comps = compare(df, ["sisa"], references=["central"])
    assert [c.baseline for c in comps] == ["adam"]
    assert comps[0].effect == pytest.approx(3.0, abs=0.2) and comps[0].verdict == SUPPORTED


def test_failures_count_against_their_optimizer() -> None:
    vals = {"sisa": [80.0, 80.1, 79.9, 80.05, 80.0], "adam": [80.0, 80.1, 79.9, 80.0, 80.1]}
    df = _seeds(vals, status={("sisa", 2): "diverged"})
    filled = impute_failures(df, lower_is_better=False)
    row = filled[(filled["arm"] == "sisa") & (filled["seed"] == 2)].iloc[0]
    assert bool(row["failed"]) and row["value"] == 79.9  # the worst ok final metric
    (c,) = compare(df, ["sisa"])
    assert c.claim_failures == 1 and c.n == 5  # counted, not dropped


def test_detectable_effect_shrinks_with_seeds_and_grows_with_comparisons() -> None:
    assert detectable_effect(1.0, 10, 1) < detectable_effect(1.0, 5, 1)
    assert detectable_effect(1.0, 5, 5) > detectable_effect(1.0, 5, 1)
    assert math.isnan(detectable_effect(1.0, 1, 1))


# --- validation splits carved out of the training data -----------------------------------------
def test_validation_split_is_fixed_disjoint_and_checked() -> None:
    import torch

    from pisa_bench.data.split import carve_validation, tail_split, validation_indices

    tr, va = validation_indices(100, 0.2)
    assert len(va) == 20 and len(tr) == 80 and not set(tr.tolist()) & set(va.tolist())
    assert torch.equal(validation_indices(100, 0.2)[1], va)  # the same for every run and seed
    x, y = torch.arange(100).float().unsqueeze(1), torch.arange(100)
    tx, ty, vx, vy = carve_validation(x, y, 0.2)
    assert torch.equal(tx[:, 0].long(), ty) and torch.equal(vx[:, 0].long(), vy)
    assert sorted([*ty.tolist(), *vy.tolist()]) == list(
        range(100))
    assert carve_validation(x, y, 0.0)[2] is None
    train, val = tail_split(torch.arange(10), 0.3)
    assert train.tolist() == list(range(7)) and val is not None and val.tolist() == [7, 8, 9]
    for bad in (1.0, -0.1, 0.001):
        with pytest.raises(ValueError, match="val_fraction"):
            validation_indices(100, bad)


@pytest.mark.parametrize("task,metric", [("quickstart_mnist", "accuracy"),
                                         ("fl_adult", "accuracy"), ("lstm1_ptb", "ppl"),
                                         ("gpt2", "loss"), ("gpt2_finetune", "loss")])
def test_tasks_log_the_validation_metric_beside_test(run_cfg, task: str, metric: str) -> None:
    """A smoke run with task.data.val_fraction logs val_<metric> (what the protocol selects
    on) in the same evaluations as the test metric; without it, no val_ rows."""
    summary, run_dir = run_cfg([f"task={task}", "scale=smoke", "task.data.val_fraction=0.25",
                                "train.threads=1"])
    assert summary["status"] == "ok"
    assert selection_value(run_dir, metric) is not None
    assert any("validation split" in n for n in summary["notes"])
    plain, plain_dir = run_cfg([f"task={task}", "scale=smoke", "train.threads=1", "seed=1"])
    assert plain["status"] == "ok" and selection_value(plain_dir, metric) is None


def test_recorded_runs_are_adopted_only_when_they_compute_the_same(tmp_path: Path) -> None:
    """A finished run whose directory name hashes an older config rule is found by identity;
    one that differs in a key is not, unless the experiment lists that key (adopt_ignore)."""
    from pisa_bench.protocol import adopt
    from pisa_bench.record import run_dir_for

    compose = _fake_compose(tmp_path)
    cfg = compose(["optim=adamw", "seed=0", "task.data.n_train=null"])
    want = run_dir_for(cfg)
    old = want.parent / "small-s0-00000000"  # another hash, same identity
    _write_run(old, "ok", [("val_accuracy", 1.0)])
    (old / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert adopt(want, cfg) == old
    other = compose(["optim=adamw", "seed=0", "task.data.n_train=256"])
    (old / "config.yaml").write_text(OmegaConf.to_yaml(other))
    assert adopt(want, cfg) == want  # differs in a key: not the same run
    assert adopt(want, cfg, ["task.data.n_train"]) == old
    seed1 = compose(["optim=adamw", "seed=1", "task.data.n_train=null"])
    assert adopt(run_dir_for(seed1), seed1, ["task.data.n_train"]) == run_dir_for(seed1)


# --- steps / tokens to a target (the "faster" half of a claim) --------------------------------
def _speed_curves(arm_means: dict[str, list[float]], seeds: int, sd: float) -> pd.DataFrame:
    """Held-out loss curves at steps 10, 20, ...: seed k of an arm is its mean + sd*(k - mid)."""
    rows = []
    for arm, means in arm_means.items():
        for k in range(seeds):
            for i, m in enumerate(means):
                rows.append({"run_dir": f"{arm}-{k}", "step": 10 * (i + 1),
                             "samples_or_tokens": 1000 * (i + 1), "wall_time_s": float(i + 1),
                             "split": "test", "metric": "loss",
                             "value": m + sd * (k - (seeds - 1) / 2)})
    return pd.DataFrame(rows)


def test_speed_finds_the_first_step_past_the_target_by_z_test() -> None:
    from pisa_bench.analysis.speed import reached, speed_table, z_test_past

    # the planted answer: "fast" passes 3.0 from step 20 on, "slow" from step 40, "never" never
    curves = _speed_curves({"fast": [3.5, 2.8, 2.7, 2.6], "slow": [4.0, 3.6, 3.2, 2.9],
                            "never": [4.0, 3.8, 3.6, 3.4]}, seeds=5, sd=0.01)
    r = reached("fast", curves[curves["run_dir"].str.startswith("fast")], 3.0, True)
    assert (r.step, r.tokens, r.n) == (20, 2000.0, 5) and r.p < 0.01
    assert reached("slow", curves[curves["run_dir"].str.startswith("slow")], 3.0, True).step == 40
    never = reached("never", curves[curves["run_dir"].str.startswith("never")], 3.0, True)
    assert never.step is None and never.p > 0.5
    # the z-test itself: mean 2.9, sd sqrt(0.02/3) over 4 values vs 3.0: z = 0.1 / (sd / 2)
    z = 0.1 / (math.sqrt(0.02 / 3) / 2)
    assert z_test_past([2.8, 2.9, 2.9, 3.0], 3.0, True) == pytest.approx(
        0.5 * math.erfc(z / math.sqrt(2)), rel=1e-6)
    assert z_test_past([2.9], 3.0, True) != z_test_past([2.9], 3.0, True)  # NaN below 2 values
    # noisy seeds: the mean passes at step 20 but not by the rule
    noisy = _speed_curves({"fast": [3.5, 2.95, 2.6, 2.5]}, seeds=5, sd=0.2)
    assert reached("fast", noisy, 3.0, True).step == 30
    # higher-is-better flips the side
    up = _speed_curves({"a": [0.5, 0.9]}, seeds=3, sd=0.01)
    assert reached("a", up, 0.8, False).step == 20
    # the table: the reference row and the arms that never reach the target
    rows = pd.DataFrame([{"arm_task": "gpt2", "arm": a, "role": "tuned", "status": "ok",
                          "run_dir": f"{a}-{k}", "metric": "loss", "lower_is_better": True,
                          "final_metric": {"fast": 2.6, "slow": 3.0, "never": 3.4}[a]}
                         for a in ("fast", "slow", "never") for k in range(5)])
    md = speed_table(rows, curves, "slow")
    assert "to the tuned slow's final loss (3, mean of 5 seeds)" in md
    assert "| fast | 5 | 20 | 2,000 |" in md and "| never | 5 | not reached |" in md
