"""torchrun: 2 ranks give the run of one process with 2 virtual workers (PISA) or full batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pisa_bench.rundir import read_json, read_metrics

ROOT = Path(__file__).resolve().parent.parent
BASE = [
    "task=quickstart_mnist",
    "scale=smoke",
    "train.max_steps=4",
    "train.log_every=1",
    "train.eval_every=2",
    "train.batch_size=16",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(overrides: list[str], out: Path, timeout: float = 300) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PISA_OUT_DIR": str(out)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "--master_addr=127.0.0.1",
        str(ROOT / "run.py"),
        *overrides,
        "hydra.run.dir=" + str(out / "hydra"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = out.glob("runs/**/summary.json")
    return summary.parent


def _losses(run_dir: Path) -> list[float]:
    return [
        r["value"]
        for r in read_metrics(run_dir / "metrics.csv")
        if r["split"] == "train" and r["metric"] == "loss"
    ]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("optim", "single"),
    [
        ("sisa", ["optim.n_workers=2"]),
        ("nsisa", ["optim.n_workers=2"]),
        ("adamw", []),
        ("sgdm", []),  # scale-sensitive (AdamW is not): the gradients are averaged, not summed
    ],
)
def test_torchrun_matches_single_process(
    optim: str, single: list[str], run_cfg, tmp_path: Path
) -> None:
    dist_dir = _torchrun([*BASE, f"optim={optim}"], tmp_path / "dist")
    summary = read_json(dist_dir / "summary.json")
    assert summary["status"] == "ok", summary
    ref, ref_dir = run_cfg([*BASE, f"optim={optim}", *single, "name=single"])
    assert ref["status"] == "ok"
    got, want = _losses(dist_dir), _losses(ref_dir)
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert summary["final_metric"] == pytest.approx(ref["final_metric"], abs=1e-9)


@pytest.mark.distributed
def test_torchrun_skips_a_finished_run_on_every_rank(tmp_path: Path) -> None:
    """The same torchrun command again: rank 0 finds the run finished and every rank returns
    (no rank left waiting in a collective), the record untouched."""
    run_dir = _torchrun([*BASE, "optim=sisa"], tmp_path)
    before = (run_dir / "summary.json").read_text(), (run_dir / "metrics.csv").read_text()
    assert _torchrun([*BASE, "optim=sisa"], tmp_path, timeout=120) == run_dir
    assert ((run_dir / "summary.json").read_text(), (run_dir / "metrics.csv").read_text()) == before
