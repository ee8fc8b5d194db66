"""Optional metric sinks beside the always-on ``metrics.csv``: Weights & Biases and TensorBoard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf


class Sink(Protocol):
    def log(self, split: str, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class WandbSink:
    """Weights & Biases, offline unless the user sets ``WANDB_MODE``."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        lc = cfg.logger
        self.run = wandb.init(
            project=str(lc.get("project", "pisa-bench")),
            entity=lc.get("entity"),
            name=run_dir.name,
            group=f"{cfg.name}/{cfg.task.name}",
            dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
            resume="allow",
            id=f"{cfg.task.name}-{cfg.optim.name}-{run_dir.name}".replace("/", "-"),
        )

    def log(self, split: str, metrics: dict[str, float], step: int) -> None:
        self.run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, split: str, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(f"{split}/{k}", v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


SINKS: dict[str, Any] = {"csv": None, "wandb": WandbSink, "tensorboard": TensorBoardSink}


def make_sinks(cfg: DictConfig, run_dir: Path) -> list[Sink]:
    """Sinks named by ``logger.sinks`` (``csv`` is the run record itself and always on)."""
    out: list[Sink] = []
    for name in cfg.logger.get("sinks", ["csv"]):
        if name not in SINKS:
            raise ValueError(f"unknown logger '{name}'; choose from {', '.join(SINKS)}")
        if SINKS[name] is not None:
            out.append(SINKS[name](cfg, run_dir))
    return out
