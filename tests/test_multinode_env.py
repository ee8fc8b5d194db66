"""A multi-task SLURM job (``hydra.launcher.nodes`` x ``tasks_per_node``) without SLURM: two
``run.py`` processes with the environment srun gives each task (SUBMITIT_EXECUTOR, SLURM_NTASKS,
SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_JOB_NUM_NODES, SLURM_JOB_NODELIST) go
through ``pisa_bench.launch.job.job_entry`` -> ``_export_torch_distributed`` ->
``init_distributed`` (gloo) and train as one 2-rank run, which equals one process with 2
virtual workers. Layouts: 1 node x 2 tasks, and 2 "nodes" (both this host) x 1 task, each task
LOCAL_RANK 0 on its node. A MASTER_PORT already in the environment (the same on every node) is
used, not refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pisa_bench.rundir import read_json, read_metrics

ROOT = Path(__file__).resolve().parent.parent
BASE = ["task=quickstart_mnist", "scale=smoke", "optim=sisa", "train.max_steps=4",
        "train.log_every=1", "train.eval_every=2", "train.batch_size=16", "train.threads=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    return [r["value"] for r in read_metrics(run_dir / "metrics.csv")
            if r["split"] == "train" and r["metric"] == "loss"]


@pytest.mark.distributed
@pytest.mark.parametrize(("nodes", "tasks_per_node"), [(1, 2), (2, 1)])
def test_slurm_task_environment_gives_one_distributed_run(
    nodes: int, tasks_per_node: int, run_cfg, tmp_path: Path
) -> None:
    out, port = tmp_path / "job", _free_port()
    procs = []
    for rank in range(nodes * tasks_per_node):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
        env.update({
            "OMP_NUM_THREADS": "1", "PISA_OUT_DIR": str(out), "SUBMITIT_EXECUTOR": "slurm",
            "SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(nodes * tasks_per_node),
            "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NODEID": str(rank // tasks_per_node),
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % tasks_per_node),
            "SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes), "MASTER_PORT": str(port),
        })
        cmd = [sys.executable, str(ROOT / "run.py"), *BASE,
               f"hydra.run.dir={tmp_path / f'hydra{rank}'}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    (summary_path,) = out.glob("runs/**/summary.json")  # one run directory, written by rank 0
    summary, meta = read_json(summary_path), read_json(summary_path.parent / "meta.json")
    assert summary["status"] == "ok" and meta["slurm_job_id"] == "4242"
    ref, ref_dir = run_cfg([*BASE, "optim.n_workers=2", "name=single"])
    got, want = _losses(summary_path.parent), _losses(ref_dir)
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)  # 2 ranks = 2 virtual workers
    assert summary["final_metric"] == pytest.approx(ref["final_metric"], abs=1e-9)
