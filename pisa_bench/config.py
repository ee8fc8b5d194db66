"""Compose configs without the command line (tests, scripts/reproduce.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def group_options(group: str) -> list[str]:
    """The choices of a config group (``task``, ``optim``, ``experiment``, ...)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def help_groups() -> str:
    """The groups ``run.py --help`` lists, one line each (``group: option, ...``); the task
    folders' own ``scale/`` and ``optim/`` files are picked by ``task=``, ``scale=`` and
    ``optim=``, not chosen directly, so they are named once instead of listed."""
    groups = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra")
    lines = [f"{g}: {', '.join(group_options(g))}" for g in groups]
    lines.append("(a task's own settings, conf/task/<task>/scale/ and optim/, follow task=, "
                 "scale= and optim=)")
    return "\n".join(lines)


def register_resolvers() -> None:
    """``${pisa_help_groups:}`` for the help template in ``conf/config.yaml``."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("pisa_help_groups"):
        OmegaConf.register_new_resolver("pisa_help_groups", help_groups)


def optim_config(name: str) -> dict[str, Any]:
    """``conf/optim/<name>.yaml``: the optimizer config a bare name stands for (its class in
    ``_target_``); ``ValueError`` naming the choices for an unknown name."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "optim" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown optimizer '{name}'; choose one of: "
                         f"{', '.join(group_options('optim'))}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(cfg, dict)
    return cfg


def task_settings(task: str, kind: str) -> list[str]:
    """The ``kind`` (``scale`` | ``optim``) choices ``task`` has settings of its own for: the
    files in the ``conf/task/<folder>/<kind>/`` folders that ``conf/task/<task>/specialise.yaml``
    names (the task's own folder, and a related task's whose settings it shares)."""
    import yaml

    hub = CONF_DIR / "task" / task / "specialise.yaml"
    if not hub.exists():
        return []
    out: set[str] = set()
    for folder in specialise_folders(yaml.safe_load(hub.read_text()), kind):
        out |= {p.stem for p in (CONF_DIR / "task" / folder / kind).glob("*.yaml")}
    return sorted(out)


def specialise_folders(hub: dict, kind: str) -> list[str]:
    """The task folders (under ``conf/task/``) whose ``<kind>/`` a ``specialise.yaml`` (as
    parsed YAML) picks from, in order: ``optional lstm2_ptb/optim@_global_: ${optim}`` ->
    ``lstm2_ptb``."""
    out = []
    for entry in hub.get("defaults") or []:
        for key in entry:
            group = str(key).removeprefix("optional ").split("@")[0].strip()
            folder, _, k = group.rpartition("/")
            if k == kind:
                out.append(folder)
    return out


def compose_config(overrides: Sequence[str] = (), with_hydra: bool = False) -> DictConfig:
    """The config ``python run.py <overrides>`` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=with_hydra)
    if with_hydra:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = cfg.paths.out_dir
    return cfg
