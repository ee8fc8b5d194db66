"""GAN (WGAN / WGAN-GP, FID) and RL (SB3 PPO / A2C with our optimizer) tasks."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from pisa_bench.config import compose_config, group_options
from pisa_bench.fid import (
    InceptionExtractor,
    fid_from_features,
    frechet_distance,
    resolve_extractor,
)
from pisa_bench.rundir import read_metrics
from pisa_bench.runtime import Dist
from pisa_bench.tasks import build_task
from pisa_bench.tasks.gan import clip_weights, gradient_penalty
from pisa_bench.trainer import Trainer

CPU = torch.device("cpu")


# --- Fréchet distance ------------------------------------------------------------------------
def _spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def test_frechet_distance_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_scaled_covariance_closed_form() -> None:
    # S2 = c^2 S1 (not diagonal): sqrt(S1 S2) = c S1, FD = ||dmu||^2 + (1 - c)^2 tr(S1)
    rng = np.random.default_rng(1)
    s1 = _spd(6, rng)
    mu1, mu2, c = rng.normal(size=6), rng.normal(size=6), 1.7
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, c**2 * s1) == pytest.approx(expected, rel=1e-8)


def test_fid_of_features_against_themselves_and_a_mean_shift() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(400, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert abs(fid_from_features(f, f)) < 1e-6
    shifts = [0.1, 0.5, 2.0]
    values = [fid_from_features(f, f + s) for s in shifts]
    assert values == sorted(values) and values[0] > 0
    for s, v in zip(shifts, values):  # same covariance: FD = ||shift||^2 = 8 s^2
        assert v == pytest.approx(8 * s**2, rel=1e-6, abs=1e-6)


def test_inception_extractor_needs_its_file_and_auto_falls_back(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Inception FID network is not available"):
        InceptionExtractor(tmp_path / "inception-2015-12-05.pt", CPU, 8)
    assert resolve_extractor("auto", None) == "classifier"
    assert resolve_extractor("auto", str(tmp_path / "absent.pt")) == "classifier"
    (tmp_path / "present.pt").write_bytes(b"")
    assert resolve_extractor("auto", str(tmp_path / "present.pt")) == "inception"
    with pytest.raises(ValueError):
        resolve_extractor("inceptionv3", None)


def test_fid_metric_name_says_which_network(tmp_path: Path) -> None:
    base = [f"paths.out_dir={tmp_path}", "task=wgan_cifar10", "optim=adamw", "scale=smoke"]
    task = build_task(compose_config(base), CPU)
    assert task.metric == "fid_classifier"
    task = build_task(compose_config([*base, "task.fid.extractor=inception"]), CPU)
    assert task.metric == "fid_inception"
    with pytest.raises(FileNotFoundError, match="fid_classifier"):
        task.setup()  # no Inception file here: a clear error, never a silent substitute


# --- the validation split of the GAN (task.data.val_fraction) ---------------------------------
VAL = ["task=wgan_gp_cifar10", "optim=adamw", "scale=smoke", "task.data.val_fraction=0.25",
       "task.fid.n_real=16", "task.fid.reference=test", "task.metric.split=test"]


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.flatten().tolist()) for r in x}


def test_gan_validation_images_are_held_out_from_gan_and_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held-out images are disjoint from what the GAN and the FID classifier train on and
    from the test images; together with the GAN's pool they are the loader's training split."""
    import pisa_bench.fid as fid

    seen: dict[str, torch.Tensor] = {}
    real_train = fid.train_classifier

    def spy(train_x: torch.Tensor, *args: object, **kw: object):
        seen["classifier"] = train_x
        return real_train(train_x, *args, **kw)

    monkeypatch.setattr(fid, "train_classifier", spy)
    task = build_task(compose_config([f"paths.out_dir={tmp_path}", *VAL]), CPU)
    task.setup()
    val, train, test = _rows(task.val_x), _rows(task.train_x), _rows(task.data.test_x)
    assert len(task.val_x) == 16 and len(task.train_x) == 48  # 25% of the 64 synthetic images
    assert len(val) == 16 and not val & train and not val & test
    assert not val & _rows(seen["classifier"]) and not test & _rows(seen["classifier"])
    assert any("validation split: 16 of the 64" in n for n in task.notes)


def test_gan_logs_val_fid_beside_the_test_fid_and_the_protocol_selects_on_it(run_cfg) -> None:
    """Every evaluation logs fid_classifier (test images) and val_fid_classifier (held-out
    images) with the same generated images; the protocol reads val_<the recorded metric>."""
    from pisa_bench.protocol import selection_value

    summary, run_dir = run_cfg([*VAL, "train.threads=1"])
    assert summary["status"] == "ok", summary.get("error")
    rows = [r for r in read_metrics(run_dir / "metrics.csv") if "fid" in str(r["metric"])]
    test = [r for r in rows if r["metric"] == "fid_classifier"]
    val = [r for r in rows if r["metric"] == "val_fid_classifier"]
    assert test and [r["step"] for r in val] == [r["step"] for r in test]
    assert {r["split"] for r in rows} == {"test"}
    assert float(val[-1]["value"]) != float(test[-1]["value"])  # two reference sets
    assert selection_value(run_dir, "fid") == pytest.approx(float(val[-1]["value"]))
    plain, plain_dir = run_cfg(["task=wgan_gp_cifar10", "optim=adamw", "scale=smoke", "seed=1"])
    assert plain["status"] == "ok" and selection_value(plain_dir, "fid") is None


def test_gan_val_fid_is_computed_against_the_held_out_images(tmp_path: Path) -> None:
    """Swapping the held-out pool for the test images makes val_fid equal to the test FID: the
    two differ only by their real images, drawn the same way and in the same number."""
    task = build_task(compose_config([f"paths.out_dir={tmp_path}", *VAL]), CPU)
    task.setup()
    model = task.build_model()
    out = task.evaluate(model)
    assert out["val_fid_classifier"] != out["fid_classifier"]
    task.val_x, task._real_stats = task.data.test_x, {}
    out = task.evaluate(model)
    assert out["val_fid_classifier"] == pytest.approx(out["fid_classifier"], rel=1e-12)


def test_gan_refuses_a_split_smaller_than_n_real(tmp_path: Path) -> None:
    task = build_task(compose_config([f"paths.out_dir={tmp_path}", *VAL, "task.fid.n_real=20"]),
                      CPU)
    task.setup()
    with pytest.raises(ValueError, match="n_real=20 but the val split has 16"):
        task.evaluate(task.build_model())
    with pytest.raises(ValueError, match="must be train or test"):
        build_task(compose_config([f"paths.out_dir={tmp_path}", *VAL, "task.fid.reference=val"]),
                   CPU)


# --- WGAN / WGAN-GP ----------------------------------------------------------------------------
def test_gradient_penalty_of_a_linear_critic() -> None:
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    real, fake = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    w = critic[1].weight.detach()
    expected = (w.norm() - 1) ** 2  # grad_x (w.x + b) = w at every point
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_penalty_of_a_quadratic_critic() -> None:
    # D(x) = ||x||^2 / 2: grad = x at the interpolate a real + (1 - a) fake
    real, fake = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])

    def critic(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x**2).flatten(1).sum(1)

    x_hat = alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake
    expected = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    got = gradient_penalty(critic, real, fake, alpha)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.requires_grad  # the penalty can be back-propagated into the critic


def test_clip_weights() -> None:
    net = nn.Linear(10, 10)
    nn.init.normal_(net.weight, std=1.0)
    clip_weights(net, 0.01)
    assert all(p.abs().max() <= 0.01 for p in net.parameters())


def test_weight_clipping_keeps_the_trained_critic_in_range(run_cfg) -> None:
    # lr 0.1 would move weights far beyond 0.01 without clipping
    summary, run_dir = run_cfg(
        ["task=wgan_cifar10", "optim=adamw", "scale=smoke", "optim.lr=0.1", "train.ckpt_every=1"]
    )
    assert summary["status"] == "ok", summary.get("error")
    assert summary["metric"] == "fid_classifier"
    assert any("NOT the Inception FID" in n for n in summary["notes"])
    state = torch.load(run_dir / "ckpt" / "rank0.pt", weights_only=False)["user"]["model"]
    critic = [
        v
        for k, v in state.items()
        if k.startswith("critic.") and v.is_floating_point() and "running" not in k
    ]
    assert critic
    top = max(float(v.abs().max()) for v in critic)
    assert top == pytest.approx(0.01)  # at the bound: the clipping was active
    gen = [v for k, v in state.items() if k.startswith("generator.") and "weight" in k]
    assert max(float(v.abs().max()) for v in gen) > 0.01  # the generator is not clipped


def test_wgan_gp_resume_reproduces_an_uninterrupted_run(preempt_and_resume) -> None:
    base = ["task=wgan_gp_cifar10", "optim=adamw", "scale=smoke", "train.max_steps=4"]
    full, first, second, _ = preempt_and_resume(base)
    assert first["status"] == "preempted" and first["steps"] == 2
    assert second["status"] == "ok" and second["steps"] == 4
    assert second["final_metric"] == pytest.approx(full["final_metric"], rel=1e-6)


# --- a stand-in virtual-worker optimizer (the PISA contract, checked) --------------------------
class VirtualWorkers(torch.optim.Optimizer):
    """SGD on the mean of m gradients, with the virtual-worker contract of the PISA family
    (:class:`pisa.ConsensusOptimizer`):
    the parameters stay at the global weights during a round (checked at every step), the m-th
    ``step()`` writes the new weights and sets ``round_done``."""

    created: ClassVar[list[VirtualWorkers]] = []

    def __init__(self, params, lr: float = 0.01, n_workers: int = 2, **_: object) -> None:
        super().__init__(params, {"lr": lr})
        self.n_workers, self.worker, self.round_done = n_workers, 0, True
        self.rounds, self.steps, self.moved_in_round = 0, 0, 0
        self.history: list[bool] = []
        VirtualWorkers.created.append(self)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if self.worker == 0:
            self._w = [p.clone() for p in params]
            self._acc = [torch.zeros_like(p) for p in params]
        elif any(not torch.equal(p, w) for p, w in zip(params, self._w)):
            self.moved_in_round += 1
        for a, p in zip(self._acc, params):
            if p.grad is not None:
                a += p.grad
        self.worker += 1
        self.steps += 1
        self.round_done = self.worker == self.n_workers
        if self.round_done:
            for p, a in zip(params, self._acc):
                p -= self.param_groups[0]["lr"] * a / self.n_workers
            self.worker, self.rounds = 0, self.rounds + 1
        self.history.append(self.round_done)

    @property
    def worker_index(self) -> int:  # the rest of pisa.ConsensusOptimizer
        return self.worker

    def telemetry(self) -> dict[str, float]:
        return {}


@pytest.fixture
def virtual_workers(monkeypatch: pytest.MonkeyPatch) -> list[VirtualWorkers]:
    """Importable :class:`VirtualWorkers`, optimizer ``vw`` (``optim=sgdm optim._target_=...``)."""
    module = types.ModuleType("_vw_for_tests")
    module.VirtualWorkers = VirtualWorkers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_vw_for_tests", module)
    VirtualWorkers.created = []
    return VirtualWorkers.created


VW = ["optim=sgdm", "optim.name=vw", "optim._target_=_vw_for_tests.VirtualWorkers",
      "optim.lr=0.01", "+optim.n_workers=2"]


def test_wgan_splits_each_round_into_worker_sub_batches(run_cfg, virtual_workers) -> None:
    summary, _ = run_cfg(["task=wgan_gp_cifar10", "scale=smoke", *VW])
    assert summary["status"] == "ok", summary.get("error")
    opt_d, opt_g = virtual_workers
    for opt in (opt_d, opt_g):
        assert opt.rounds == summary["steps"] == 3 and opt.steps == 6
        assert opt.history == [False, True] * 3 and opt.moved_in_round == 0


# --- RL ----------------------------------------------------------------------------------------
def _rl_task(tmp_path: Path, overrides: list[str]):
    cfg = compose_config(
        [f"paths.out_dir={tmp_path}", "scale=smoke", f"run.dir={tmp_path / 'run'}", *overrides]
    )
    task = build_task(cfg, CPU)
    trainer = Trainer(cfg, task, None, tmp_path / "run", CPU, Dist())
    task.setup()
    with trainer:
        task.run(trainer)
    return task, trainer


def test_rl_run_logs_returns_against_env_steps(run_cfg) -> None:
    summary, run_dir = run_cfg(
        [
            "task=ppo_mujoco",
            "optim=adamw",
            "scale=smoke",
            "task.total_timesteps=256",
            "task.eval.every_env_steps=64",
        ]
    )
    assert summary["status"] == "ok", summary.get("error")
    assert summary["metric"] == "return" and summary["lower_is_better"] is False
    rows = read_metrics(run_dir / "metrics.csv")
    evals = [r for r in rows if r["metric"] == "return" and r["split"] == summary["metric_split"]]
    steps = [r["samples_or_tokens"] for r in evals]
    assert len(steps) >= 4 and steps == sorted(set(steps)) and steps[-1] >= 256
    assert any(r["metric"] == "episode_return" and r["split"] == "train" for r in rows)
    assert any(r["metric"] == "policy_loss" for r in rows)
    assert summary["samples_or_tokens"] >= 256 and summary["optimizer_state_bytes"] > 0


def test_rl_nan_weights_after_finite_losses_are_divergence(run_cfg, monkeypatch) -> None:
    """An update whose losses were finite but which left NaN weights ends the run as diverged
    (SB3's next rollout would otherwise fail on its action distribution)."""
    real, calls = torch.optim.SGD.step, []

    def poisoning(self, closure=None):
        out = real(self, closure)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoning)
    summary, _ = run_cfg(["task=a2c_mujoco", "optim=sgdm", "scale=smoke"])
    assert len(calls) == 3
    assert summary["status"] == "diverged", summary.get("error")
    assert "sum of |weights| is nan at step 3" in summary["error"]


@pytest.mark.parametrize(
    ("optim", "cls"), [("adamw", torch.optim.AdamW), ("sgdm", torch.optim.SGD)]
)
def test_rl_uses_the_configured_optimizer(tmp_path: Path, optim: str, cls: type) -> None:
    task, trainer = _rl_task(tmp_path, ["task=a2c_mujoco", f"optim={optim}"])
    opt = task.agent.policy.optimizer
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == pytest.approx(float(trainer.cfg.optim.lr))  # not SB3's
    assert trainer.step == task.minibatch_steps == 16  # A2C: one step per rollout of 8 (128 steps)


@pytest.mark.parametrize(("algo", "rounds"), [("a2c", 16), ("ppo", 4)])
def test_rl_virtual_worker_round_every_two_minibatches(
    tmp_path: Path, virtual_workers, algo: str, rounds: int
) -> None:
    task, trainer = _rl_task(tmp_path, [f"task={algo}_mujoco", *VW])
    (opt,) = virtual_workers
    assert task.agent.policy.optimizer is opt
    assert opt.history == [False, True] * rounds  # a round completes every 2 minibatch steps
    assert trainer.step == opt.rounds == rounds and task.minibatch_steps == 2 * rounds
    assert opt.moved_in_round == 0  # every minibatch gradient was taken at the global weights


@pytest.mark.skipif(
    "sisa" not in group_options("optim"), reason="conf/optim/sisa.yaml not there yet"
)
def test_rl_with_sisa_two_workers(tmp_path: Path) -> None:
    import pisa

    task, trainer = _rl_task(tmp_path, ["task=ppo_mujoco", "optim=sisa", "optim.n_workers=2"])
    opt = task.agent.policy.optimizer
    assert type(opt) is pisa.SISA and opt.n_workers == 2
    assert task.minibatch_steps == 8 and trainer.step == 4 and opt.round_done


def test_rl_resume_continues_the_env_step_count(run_cfg, tmp_path: Path) -> None:
    run = [
        f"run.dir={tmp_path / 'rl'}",
        "task=ppo_mujoco",
        "optim=adamw",
        "scale=smoke",
        "task.total_timesteps=256",
        "task.eval.every_env_steps=64",
    ]
    first, run_dir = run_cfg([*run, "train.preempt_at_step=4"])
    assert first["status"] == "preempted" and first["steps"] == 4
    cut = first["samples_or_tokens"]
    assert 64 <= cut < 256
    second, _ = run_cfg(run)
    assert second["status"] == "ok", second.get("error")
    rows = read_metrics(run_dir / "metrics.csv")
    samples = [r["samples_or_tokens"] for r in rows]
    assert samples == sorted(samples)  # no restart from 0
    assert second["samples_or_tokens"] < 256 + cut  # the budget was not spent twice
    assert second["steps"] == 16 and any(s > cut for s in samples)
    assert len(json.loads((run_dir / "meta.json").read_text()).get("resumes", [])) == 1


def _eval_starts(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> list[np.ndarray]:
    """First observation of each evaluation environment ``evaluate`` plays (test, then
    validation), read where SB3's ``evaluate_policy`` would start its episodes."""
    from pisa_bench.tasks import rl

    cfg = compose_config([f"paths.out_dir={tmp_path}", "scale=smoke", "task=ppo_mujoco",
                          "optim=adamw", f"seed={seed}", "task.eval.val_episodes=3"])
    task = build_task(cfg, CPU)
    task.setup()
    policy = task.build_model()
    starts: list[np.ndarray] = []

    def record(
        model: object, env: Any, n_eval_episodes: int, **kw: object
    ) -> tuple[list[float], list[int]]:
        starts.append(env.reset()[0].copy())
        return [float(len(starts))] * n_eval_episodes, [1] * n_eval_episodes

    monkeypatch.setattr(rl, "evaluate_policy", record)
    out = task.evaluate(policy)
    assert out["return"] == 1.0 and out["val_return"] == 2.0  # test, then validation episodes
    return starts


def test_rl_validation_episodes_are_fixed_and_apart_from_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pisa_bench.data.split import VAL_SPLIT_SEED
    from pisa_bench.tasks.rl import EVAL_SEED_OFFSET, eval_seeds

    test0, val0 = _eval_starts(tmp_path / "a", 0, monkeypatch)
    test1, val1 = _eval_starts(tmp_path / "b", 1, monkeypatch)
    assert np.array_equal(val0, val1)  # the same validation episodes for every run
    assert not np.array_equal(test0, test1)  # test episodes follow the run seed
    assert not np.array_equal(val0, test0) and not np.array_equal(val1, test1)
    assert eval_seeds(3) == (VAL_SPLIT_SEED, 3 + EVAL_SEED_OFFSET)
    with pytest.raises(ValueError, match="validation episodes"):
        eval_seeds(VAL_SPLIT_SEED - EVAL_SEED_OFFSET)


@pytest.mark.parametrize("val_episodes", [0, 2])
def test_rl_val_return_beside_return_and_selected_on(run_cfg: Any, val_episodes: int) -> None:
    from pisa_bench.protocol import selection_value

    summary, run_dir = run_cfg(["task=ppo_mujoco", "optim=adamw", "scale=smoke",
                                "task.total_timesteps=128", "task.eval.every_env_steps=64",
                                f"task.eval.val_episodes={val_episodes}"])
    assert summary["status"] == "ok" and summary["metric_split"] == "test"
    assert any("validation split" in n for n in summary["notes"]) == bool(val_episodes)
    rows = read_metrics(run_dir / "metrics.csv")
    tests = [r for r in rows if r["metric"] == "return" and r["split"] == "test"]
    vals = [r for r in rows if r["metric"] == "val_return"]
    assert len(tests) >= 2 and float(tests[-1]["value"]) == summary["final_metric"]
    if not val_episodes:  # off by default: no validation episodes, nothing to select on
        assert vals == [] and selection_value(run_dir, "return") is None
        return
    assert [r["step"] for r in vals] == [r["step"] for r in tests]  # at every evaluation
    assert selection_value(run_dir, "return") == float(vals[-1]["value"])
