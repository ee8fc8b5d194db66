"""scripts/gpu_check.py on CPU at its smallest size: every check that can run on CPU runs (the
CUDA-only lines are skipped with the reason), and the CSV holds one row per check."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out-dir", str(tmp / "out"),
                           "--work-dir", str(tmp / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    (path,) = (tmp / "out").glob("*.csv")
    with path.open() as f:
        rows = {r["check"]: r for r in csv.DictReader(f)}
    return proc, rows


@pytest.mark.distributed
def test_gpu_check_on_cpu_runs_every_cpu_check(tmp_path: Path) -> None:
    # the smoke matrix and the trainer under torchrun have their own CPU tests
    # (test_smoke_matrix.py, test_distributed_trainer.py): one task and no torchrun_trainer here
    proc, rows = _run(tmp_path, "--device", "cpu", "--size", "tiny",
                      "--tasks", "quickstart_mnist", "--skip", "torchrun_trainer")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {k: r["status"] for k, r in rows.items()}
    assert status["cuda"] == "skipped" and rows["cuda"]["detail"] == "device cpu"
    assert (status["torchrun_trainer"], rows["torchrun_trainer"]["detail"]) == ("skipped", "--skip")
    for check in ("bf16_autocast", "smoke:quickstart_mnist", "gpt2_124m_nsisa",
                  "nccl_pisa_round", "bench"):
        assert status[check] == "ok", rows[check]
    gpt = json.loads(rows["gpt2_124m_nsisa"]["metrics"])
    assert gpt["steps"] == 6 and gpt["step_ms"] > 0 and gpt["peak_memory_gib"] > 0
    assert gpt["opt_step_ms"] > 0 and gpt["batch"] == "4x16"
    nccl = json.loads(rows["nccl_pisa_round"]["metrics"])
    assert nccl["backend"] == "gloo" and nccl["world"] == 2 and nccl["max_abs_diff"] <= 1e-10
    bench = {k.split(":")[2]: json.loads(r["metrics"]) for k, r in rows.items()
             if k.startswith("bench:tiny:")}
    assert {"adamw_foreach", "sisa", "nsisa", "muon", "pisa"} <= set(bench)
    assert all(b["median_step_ms"] > 0 and b["state_bytes"] > 0 for b in bench.values())
    assert bench["sisa"]["state_copies"] == pytest.approx(2.0, abs=0.01)  # dual + 2nd moment
    try:
        import torchvision  # noqa: F401
        assert status["resnet18_imagenet"] == "ok", rows["resnet18_imagenet"]
    except ImportError:
        assert status["resnet18_imagenet"] == "skipped"
        assert "torchvision does not import here" in rows["resnet18_imagenet"]["detail"]
    for check in rows:  # the printed line per check
        assert check in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_without_cuda_fails_with_the_reason(tmp_path: Path) -> None:
    proc, rows = _run(tmp_path, "--device", "cuda", "--size", "tiny")
    assert proc.returncode == 1
    assert rows["cuda"]["status"] == "failed"
    assert rows["cuda"]["detail"].startswith("RuntimeError: CUDA not available")
    assert "[FAIL] cuda" in proc.stdout and "failed: cuda" in proc.stdout
    others = [r for k, r in rows.items() if k != "cuda"]
    assert others and {r["status"] for r in others} == {"skipped"}  # nothing else is attempted
    assert {r["detail"] for r in others} == {"CUDA is not usable (the cuda line says why)"}
