"""Divergence is detected on every quantity a task optimizes, and never clamped into an ok run.

A run whose watched quantity (a loss, an evaluation metric, the generator's output) is NaN,
infinite or exploded (``|value| > task.explode_above``, default
:data:`pisa_bench.trainer.EXPLODE_ABOVE`) ends ``diverged`` with its step, never ``failed`` with
a numerical error from downstream code, and never ``ok`` with a clamped finite metric.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from pisa_bench.fid import frechet_distance
from pisa_bench.tasks.language import perplexity
from pisa_bench.trainer import EXPLODE_ABOVE

WGAN = ["task=wgan_cifar10", "scale=smoke", "train.threads=1", "optim=sgdm"]
LSTM = ["task=lstm1_ptb", "scale=smoke", "train.threads=1", "optim=sgdm", "train.max_steps=20"]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_wgan_generator_blowup_is_diverged_not_failed(run_cfg) -> None:
    """SGD at lr 1e6: the critic (weight-clipped) and both training losses stay finite, but the
    generator's eval-mode output is NaN at the first evaluation (step 8, the end of the first
    epoch of 64 synthetic images): FID is undefined there, and the run is ``diverged`` at step 8
    (before: ``failed`` with a scipy sqrtm error)."""
    summary, run_dir = run_cfg([*WGAN, "optim.lr=1e6", "train.max_steps=16"])
    assert summary["status"] == "diverged", summary.get("error")
    assert summary["diverged_step"] == 8
    assert "generator_abs_max is nan at step 8" in summary["error"]
    train = [r for r in _rows(run_dir) if r["split"] == "train" and r["metric"] == "loss_d"]
    assert len(train) == 8 and all(math.isfinite(float(r["value"])) for r in train)


def test_wgan_sane_run_logs_a_finite_generator_output(run_cfg) -> None:
    summary, run_dir = run_cfg([*WGAN, "optim.lr=1e-3", "train.max_steps=8"])
    assert summary["status"] == "ok", summary.get("error")
    (row,) = [r for r in _rows(run_dir) if r["metric"] == "generator_abs_max"]
    assert 0.0 < float(row["value"]) <= 1.0  # tanh output


def test_lstm_exploded_perplexity_is_diverged(run_cfg) -> None:
    """SGD at lr 1e3 drives the word model's test loss past 50 nats (perplexity > 5e21, what
    the former clamp ``exp(min(loss, 50))`` reported as an ok run): now ``diverged``."""
    summary, run_dir = run_cfg([*LSTM, "optim.lr=1e3"])
    assert summary["status"] == "diverged", summary.get("error")
    assert summary["diverged_step"] == 20
    assert "ppl is" in summary["error"] and "explode_above" in summary["error"]
    (ppl,) = [float(r["value"]) for r in _rows(run_dir) if r["metric"] == "ppl"]
    (loss,) = [
        float(r["value"]) for r in _rows(run_dir) if r["metric"] == "loss" and r["split"] == "test"
    ]
    assert ppl == pytest.approx(math.exp(loss)) and ppl > EXPLODE_ABOVE  # reported unclamped


def test_explode_threshold_is_the_task_config(run_cfg) -> None:
    """The same sane LSTM run is ok by default and diverged under a perplexity limit of 10."""
    ok, _ = run_cfg([*LSTM, "optim.lr=10", "name=default_limit"])
    assert ok["status"] == "ok" and 10 < ok["final_metric"] < 1e3
    low, _ = run_cfg([*LSTM, "optim.lr=10", "name=low_limit", "+task.explode_above=10"])
    assert low["status"] == "diverged" and "explode_above=10" in low["error"]


def test_perplexity_is_never_clamped() -> None:
    assert perplexity(60.0) == pytest.approx(math.exp(60.0))
    assert perplexity(800.0) == math.inf  # exp overflows a float: infinite, not an error
    assert math.isnan(perplexity(math.nan))


def test_frechet_distance_of_non_finite_statistics_is_nan() -> None:
    mu, cov = np.zeros(3), np.eye(3)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(frechet_distance(mu, cov, np.full(3, np.nan), cov))
    assert math.isnan(frechet_distance(mu, cov, mu, np.full((3, 3), np.inf)))


def test_wgan_generator_loss_is_watched(run_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-finite generator loss (its round at step 3) ends the run at step 3, whatever the
    critic's loss does (both GAN losses are watched)."""
    from pisa_bench.tasks.gan import WGAN as GanTask

    original = GanTask.generator_round

    def round_(self, model, opt, batch_size, trainer, create_graph=False):  # type: ignore[no-untyped-def]
        row = original(self, model, opt, batch_size, trainer, create_graph)
        return {**row, "loss_g": math.inf} if trainer.step == 2 else row

    monkeypatch.setattr(GanTask, "generator_round", round_)
    summary, _ = run_cfg([*WGAN, "optim.lr=1e-3", "train.max_steps=6"])
    assert summary["status"] == "diverged" and summary["diverged_step"] == 3
    assert "loss_g is inf at step 3" in summary["error"]


@pytest.mark.parametrize(
    ("task", "what"),
    [("fl_adult", "training loss is"), ("ppo_mujoco", "_loss is"), ("a2c_mujoco", "_loss is")],
)
def test_federated_and_rl_loops_use_the_same_limit(task: str, what: str, run_cfg) -> None:
    """The federated round loop and the RL update loop watch their losses with the same
    ``task.explode_above``: a limit below any loss ends the run ``diverged`` at its first check."""
    summary, _ = run_cfg(
        [f"task={task}", "scale=smoke", "train.threads=1", "+task.explode_above=1e-9"]
    )
    assert summary["status"] == "diverged", summary.get("error")
    assert what in summary["error"] and "explode_above=1e-09" in summary["error"]


@pytest.mark.parametrize("every_step", [True, False])
def test_training_loss_read_late_still_diverges_at_its_step(
    every_step: bool, run_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervised loop reads its losses every step (CPU) or at the log cadence (GPU: no
    device sync per step). Either way an infinite loss at step 7 (log_every 10) ends the run
    ``diverged`` at step 7 with the rows logged before it, and no checkpoint holds a state past
    step 6 (checkpoints every 4 steps: the one due at step 8 reads the pending losses first)."""
    import torch

    from pisa_bench.checkpoints import CheckpointStore
    from pisa_bench.trainer import Trainer

    original = Trainer.worker_gradient

    def gradient(self, task, model, sub, accum, create_graph):  # type: ignore[no-untyped-def]
        value = original(self, task, model, sub, accum, create_graph)
        return value * math.inf if self.step == 6 else value  # the 7th round

    monkeypatch.setattr(Trainer, "worker_gradient", gradient)
    monkeypatch.setattr(Trainer, "reads_loss_every_step", lambda self: every_step)
    summary, run_dir = run_cfg([
        "task=quickstart_mnist", "scale=smoke", "optim=adamw", "train.threads=1",
        "train.epochs=null", "train.max_steps=20", "train.log_every=10", "train.eval_every=0",
        "train.ckpt_every=4", f"name=late_{every_step}",
    ])
    assert summary["status"] == "diverged" and summary["diverged_step"] == 7
    assert "training loss is inf at step 7" in summary["error"]
    assert {int(r["step"]) for r in _rows(run_dir)} <= set(range(7))
    loaded, _ = CheckpointStore(run_dir, 0).load(map_location=torch.device("cpu"))
    assert loaded is not None and loaded.step == 4


@pytest.mark.parametrize("every_step", [True, False])
def test_gan_losses_read_late_still_diverge_at_their_step(
    every_step: bool, run_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GAN loop queues its losses as the supervised loop does: read every step on CPU, at
    the log / evaluation / checkpoint cadence on GPU (no device sync per step). An infinite
    generator loss at step 3 (log_every 10) ends the run ``diverged`` at step 3 either way, and
    the checkpoint due at step 4 is not written (it reads the pending losses first)."""
    import torch

    from pisa_bench.checkpoints import CheckpointStore
    from pisa_bench.tasks.gan import WGAN as GanTask
    from pisa_bench.trainer import Trainer

    original = GanTask.generator_round

    def round_(self, model, opt, batch_size, trainer, create_graph=False):  # type: ignore[no-untyped-def]
        row = original(self, model, opt, batch_size, trainer, create_graph)
        return {**row, "loss_g": row["loss_g"] * math.inf} if trainer.step == 2 else row

    monkeypatch.setattr(GanTask, "generator_round", round_)
    monkeypatch.setattr(Trainer, "reads_loss_every_step", lambda self: every_step)
    summary, run_dir = run_cfg([
        *WGAN, "optim.lr=1e-3", "train.max_steps=7", "train.log_every=10", "train.eval_every=0",
        "train.ckpt_every=4", f"name=gan_late_{every_step}",
    ])
    assert summary["status"] == "diverged" and summary["diverged_step"] == 3
    assert "loss_g is inf at step 3" in summary["error"]
    loaded, _ = CheckpointStore(run_dir, 0).load(map_location=torch.device("cpu"))
    assert loaded is None


def test_gan_losses_read_late_log_the_same_rows(run_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the GAN's losses at the log cadence (GPU) logs exactly the rows that reading them
    every step (CPU) does; with a generator round every 2nd step the logged steps carry only the
    critic's losses, none left over from the step before."""
    from pisa_bench.trainer import Trainer

    rows = {}
    for every_step in (True, False):
        monkeypatch.setattr(Trainer, "reads_loss_every_step", lambda self, e=every_step: e)
        summary, run_dir = run_cfg([
            *WGAN, "optim.lr=1e-3", "train.max_steps=6", "train.log_every=2",
            "task.gan.n_critic=2", f"name=gan_rows_{every_step}",
        ])
        assert summary["status"] == "ok", summary.get("error")
        rows[every_step] = [
            (r["step"], r["metric"], r["value"]) for r in _rows(run_dir) if r["split"] == "train"
        ]
    assert {m for _, m, _ in rows[True]} >= {"loss_d", "wasserstein", "lr"}
    assert rows[True] == rows[False]
