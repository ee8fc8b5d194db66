"""Compose configs without the command line (tests, scripts/reproduce.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def group_options(group: str) -> list[str]:
    """The choices of a config group (``task``, ``optim``, ``experiment``, ...)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(overrides: Sequence[str] = (), with_hydra: bool = False) -> DictConfig:
    """The config ``python run.py <overrides>`` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=with_hydra)
    if with_hydra:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = cfg.paths.out_dir
    return cfg
