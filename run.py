"""Run one training job: ``python run.py task=<task> optim=<optimizer> [scale=...] [seed=...]``.

Sweeps: ``python run.py -m optim=sisa,adamw seed=0,1,2`` (add ``hydra/launcher=slurm`` for SLURM).

Exit code: 0 when every run has its outcome (ok or diverged, now or earlier), 1 when one failed,
2 on bad input (one line naming the key or file; ``HYDRA_FULL_ERROR=1`` for the traceback),
3 when one was preempted or not started (rerun the same command to resume), 4 when another
process holds a run.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from pisa_bench.config import register_resolvers
from pisa_bench.errors import exit_code, one_line_errors
from pisa_bench.launch.job import JOB_STATUSES, job_entry

register_resolvers()  # before Hydra reads the config (the --help template)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """One run (``pisa_bench.main.execute``), requeue-safe under SLURM's time-limit signal."""
    with one_line_errors(debug=bool(os.environ.get("HYDRA_FULL_ERROR"))):
        return job_entry(cfg)


if __name__ == "__main__":
    main()
    sys.exit(exit_code(JOB_STATUSES))
