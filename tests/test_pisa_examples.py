"""The examples under ``examples/`` run at tiny scale: the loss falls, and the torchrun run (one
worker per process) equals the virtual-worker run."""

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
