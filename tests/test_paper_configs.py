"""The paper-scale configs against the paper's hyperparameters (../shared/PISA.md, "Paper
hyperparameters"), line by line: batch, budget, schedule, sigma/rho (lr = 1/(sigma + rho)),
lambda, m, precision and evaluation cadence as composed by ``scale=paper``."""

from __future__ import annotations

import pytest

from pisa_bench.config import compose_config


def _cfg(task: str, optim: str, *extra: str):
    return compose_config([f"task={task}", f"optim={optim}", "scale=paper", *extra])


def _rho(o) -> float:
    return 1.0 / float(o.lr) - float(o.sigma)


# task: sigma, rho, beta, weight decay, coupled?, lambda, batch, m, epochs
VISION = {
    "vgg11_cifar10": (4.5, 3e4, 0.995, 2.5e-4, False, 4e-4, 128, 4, 205),
    "resnet34_cifar10": (0.1, 5e3, 0.999, 5e-5, False, 0.0, 128, 4, 205),
    "densenet121_cifar10": (0.8, 2e3, 0.999, 5e-4, False, 5e-5, 256, 4, 201),
}


@pytest.mark.parametrize("task", sorted(VISION))
def test_cifar10_sisa(task: str) -> None:
    sigma, rho, beta, wd, decoupled, lam, batch, m, epochs = VISION[task]
    c = _cfg(task, "sisa")
    o, t = c.optim, c.train
    assert (o.sigma, o.beta, o.weight_decay, o.l2_lambda, o.n_workers) == (sigma, beta, wd, lam, m)
    assert bool(o.decoupled_weight_decay) is decoupled and _rho(o) == pytest.approx(rho, rel=1e-6)
    assert (t.batch_size, t.epochs, t.precision) == (batch, epochs, "fp32")
    assert t.eval_every == 50000 // batch  # every epoch
    assert t.schedule.name == "step"
    if task == "densenet121_cifar10":  # x0.25 every 50 epochs
        assert t.schedule.gamma == 0.25
        assert [round(f * epochs) for f in t.schedule.milestones_frac] == [50, 100, 150, 200]


def test_imagenet_resnet18_sisa() -> None:
    c = _cfg("resnet18_imagenet", "sisa")
    o, t = c.optim, c.train
    assert (o.lr, o.sigma, o.weight_decay, o.l2_lambda) == (5e-4, 1.0, 1e-2, 5e-6)
    assert o.decoupled_weight_decay is True
    assert (t.batch_size, t.epochs, t.precision, t.eval_every) == (256, 90, "fp32", 1281167 // 256)
    assert t.schedule.gamma == 0.15
    assert [round(f * 90) for f in t.schedule.milestones_frac] == [65, 75, 83]


@pytest.mark.parametrize(("size", "accum"), [("124M", 1), ("350M", 1), ("1558M", 4)])
def test_gpt2_nsisa(size: str, accum: int) -> None:
    c = _cfg("gpt2", "nsisa", f"task.size={size}")
    o, t, d = c.optim, c.train, c.task.data
    assert (o.sigma, o.momentum, o.l2_lambda, o.n_workers, o.nesterov) == (80.0, 0.95, 0.0, 4, True)
    assert _rho(o) == pytest.approx(100.0)
    assert (o.companion.name, o.companion.lr, list(o.companion.betas)) == ("adamw", 0.0036,
                                                                           [0.9, 0.95])
    assert (t.max_steps, t.batch_size * d.seq_len, t.grad_accum) == (5100, 65536, accum)
    assert t.schedule.name == "trapezoid" and round(t.schedule.warmdown_frac * 5100) == 1450
    assert (t.eval_every, d.val_tokens, t.precision, d.name) == (125, 10485760, "auto",
                                                                 "fineweb10B")


def test_gpt2_finetune() -> None:
    c = _cfg("gpt2_finetune", "adamw")
    assert c.optim.lr == 2e-5 and c.train.schedule.warmup_steps == 100
    assert _cfg("gpt2_finetune", "sisa").optim.n_workers == 4


@pytest.mark.parametrize(("task", "sigma", "lr", "lam", "m"),
                         [("wgan_cifar10", 0.1, 1e-3, 1e-5, 4), ("wgan_gp_cifar10", 5e-5, 5e-3,
                                                                 1e-4, 2)])
def test_wgans_sisa(task: str, sigma: float, lr: float, lam: float, m: int) -> None:
    c = _cfg(task, "sisa")
    assert (c.optim.sigma, c.optim.lr, c.optim.l2_lambda, c.optim.n_workers) == (sigma, lr, lam, m)
    assert c.train.precision == "fp32"
    if task == "wgan_cifar10":
        assert (c.train.batch_size, c.train.epochs, c.task.gan.clip_value) == (64, 100, 0.01)


@pytest.mark.parametrize(("task", "lr", "sigma"),
                         [("lstm1_ptb", 2.5e-3, 0.04), ("lstm2_ptb", 1.5e-2, 0.01),
                          ("lstm3_ptb", 1.5e-2, 0.01)])
def test_lstm_sisa(task: str, lr: float, sigma: float) -> None:
    c = _cfg(task, "sisa")
    o, t = c.optim, c.train
    assert (o.lr, o.sigma, o.eps, o.weight_decay, o.n_workers) == (lr, sigma, 1e-12, 1.2e-6, 4)
    assert (t.batch_size, t.grad_clip, t.precision) == (20, 0.25, "fp32")


@pytest.mark.parametrize(("task", "env", "lr", "sigma"),
                         [("ppo_mujoco", "Humanoid-v5", 1e-5, 0.1),
                          ("ppo_mujoco", "Ant-v5", 5e-5, None),
                          ("a2c_mujoco", "HalfCheetah-v5", 5e-3, 0.5),
                          ("a2c_mujoco", "InvertedDoublePendulum-v5", 5e-3, 0.5)])
def test_rl_sisa(task: str, env: str, lr: float, sigma: float | None) -> None:
    c = _cfg(task, "sisa", f"task.env.id={env}")
    assert (c.optim.lr, c.optim.beta, c.optim.n_workers) == (lr, 0.999, 4)
    if sigma is not None:  # the table gives none for PPO Ant (the script's default is used)
        assert c.optim.sigma == sigma


@pytest.mark.parametrize(("task", "lam"), [("fl_cifar10", 5e-3), ("fl_adult", 5e-2)])
def test_federated_sisa(task: str, lam: float) -> None:
    c = _cfg(task, "sisa")
    o = c.optim
    assert (o.sigma, o.rho, o.l2_lambda) == (1e3, 1e2, lam)
    assert (c.fl.admm.sigma_every, c.fl.admm.sigma_factor, c.train.max_steps) == (10, 0.997, 500)
    assert c.task.n_clients == (10 if task == "fl_cifar10" else 4)
