"""Run one training job: ``python run.py task=<task> optim=<optimizer> [scale=...] [seed=...]``.

Sweeps: ``python run.py -m optim=sisa,adamw seed=0,1,2`` (add ``hydra/launcher=slurm`` for SLURM).
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from experiments.sweep import job_entry


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """One run (``experiments.main.execute``), requeue-safe under SLURM's time-limit signal."""
    return job_entry(cfg)


if __name__ == "__main__":
    main()
