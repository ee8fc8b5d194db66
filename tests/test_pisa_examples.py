"""The examples under ``examples/`` run at tiny scale: the loss falls (plain loop, HF Trainer,
Lightning, SB3), the torchrun run (one worker per process) equals the virtual-worker run, and
Lightning's ``step(closure)`` with virtual workers equals the plain loop."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workers", [1, 4])
def test_virtual_workers_example_loss_falls(workers: int) -> None:
    _, losses = load("virtual_workers").train(n_workers=workers, rounds=30)
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.distributed
def test_torchrun_example_equals_virtual_workers(tmp_path: Path) -> None:
    rounds = 20
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "torchrun_workers.py"), "--rounds", str(rounds), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out MSE" in proc.stdout
    distributed = torch.load(out, weights_only=True)
    model, losses = load("virtual_workers").train(n_workers=2, rounds=rounds)
    assert losses[-1] < 0.5 * losses[0]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(distributed[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_sb3_example_learns_cartpole() -> None:
    pytest.importorskip("stable_baselines3")
    torch.set_num_threads(1)
    before, after = load("sb3_ppo").train(timesteps=4096, n_workers=4, seed=1)
    assert after > 5 * before and after > 100


@pytest.mark.parametrize(
    ("workers", "via", "grad_accum"),
    [(1, "optimizers", 1), (4, "optimizers", 1), (4, "cls_and_kwargs", 1), (2, "optimizers", 2)],
)
def test_hf_trainer_example_loss_falls(workers: int, via: str, grad_accum: int) -> None:
    pytest.importorskip("accelerate")  # transformers.Trainer needs it (the "examples" extra)
    torch.set_num_threads(1)
    steps = 64
    _, losses, opt = load("hf_trainer").train(
        n_workers=workers, steps=steps, via=via, grad_accum=grad_accum
    )
    assert len(losses) == steps and opt.rounds == steps // workers  # one worker per Trainer step
    assert sum(losses[-4:]) / 4 < 0.7 * losses[0]


@pytest.mark.parametrize(
    ("workers", "mode", "accumulate"),
    [(1, "automatic", 1), (4, "automatic", 1), (4, "manual", 1), (2, "automatic", 2)],
)
def test_lightning_example_loss_falls(workers: int, mode: str, accumulate: int) -> None:
    pytest.importorskip("lightning")
    torch.set_num_threads(1)
    _, losses, opt = load("lightning_module").train(
        n_workers=workers, rounds=40, mode=mode, accumulate=accumulate
    )
    assert opt.rounds == 40  # m (automatic) or 1 (manual) Lightning steps per round
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5


def test_lightning_closure_step_equals_plain_loop() -> None:
    """Lightning's ``optimizer.step(closure)`` with 4 virtual workers gives the plain loop's
    weights (each closure's gradient is its worker's, taken at the global weights)."""
    lightning = pytest.importorskip("lightning")
    torch.set_num_threads(1)
    example = load("lightning_module")
    workers, rounds = 4, 6
    module, _, _ = example.train(n_workers=workers, rounds=rounds, mode="automatic")
    lightning.seed_everything(0, verbose=False)
    reference = example.Classifier(workers, 1e-2, "automatic", rounds)
    conf = reference.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for x, y in example.make_loader(rounds * workers, 32, seed=0):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference.net(x), y).backward()
        opt.step()
        sched.step()
    assert opt.rounds == rounds
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
