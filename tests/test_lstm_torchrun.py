"""The LSTM task refuses torchrun (a rank cannot receive the hidden state of the previous piece
of the BPTT window) with one clear line, in a real 2-process torchrun run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_lstm_under_torchrun_is_refused_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PISA_OUT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(ROOT / "run.py"),
           "task=lstm1_ptb", "scale=smoke", "optim=sisa", "train.threads=1",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    want = "task lstm1_ptb runs in one process (got 2 torchrun processes)"
    lines = [line for line in out.splitlines() if want in line]
    assert lines, out[-3000:]
    assert "run `python run.py` without torchrun" in lines[0]
