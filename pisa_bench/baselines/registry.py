"""Every optimizer by class: the PISA family and the maintained competitors.

An ``optim`` config is ``{name: <label>, _target_: <module.Class>, <hyperparameter>: <value>,
...}`` (``conf/optim/<name>.yaml``); every key but the reserved ones below is passed to the
class's constructor, so the config owns every hyperparameter. Reserved keys:

- ``name``: the label that run directories, tables and figures use (``conf/optim/<name>.yaml``);
- ``_target_``: the optimizer class (``torch.optim.AdamW``, ``pytorch_optimizer.AdaBelief``,
  ``pisa.SISA``);
- ``takes``: ``params`` (the default) or ``model`` (Adam-mini's constructor takes the module);
- ``hybrid``: ``true`` for optimizers of hidden matrices only (Muon, NSISA): the rest of the
  model goes to the companion;
- ``routing``: for hybrid optimizers (Muon, NSISA), which parameters are *not* hidden matrices
  (``exclude``: name patterns; embeddings and vectors always go to the companion;
  ``require_2d``: only 2-D matrices are hidden, conv kernels go to the companion too);
- ``companion``: an ``optim``-style config of the optimizer that trains those parameters
  (AdamW by default).

Nothing is re-implemented here: torch.optim, the ``pytorch-optimizer`` package and ``pisa``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

RESERVED = ("name", "_target_", "takes", "hybrid", "routing", "companion")
CONSENSUS, BASELINE = "consensus", "baseline"  # summary.json's ``family``
FAMILIES = (CONSENSUS, BASELINE)
#: the companion of a hybrid optimizer whose config names none
DEFAULT_COMPANION = {"name": "adamw", "_target_": "torch.optim.AdamW"}
#: the packages optimizers come from, by top-level module (``Spec.source``)
SOURCES = {"pisa": "pisa", "torch": "torch", "pytorch_optimizer": "pytorch-optimizer"}


class Incompatible(ValueError):
    """This optimizer cannot train this model or task (refused before any step)."""


@dataclass(frozen=True)
class Spec:
    """Where an optimizer lives and how it is built (read from its config by :func:`spec_of`)."""

    target: str  # "module.Class"
    takes: str = "params"  # "params" or "model" (Adam-mini wants the module)
    hybrid: bool = False  # hidden matrices to it, the rest to a companion optimizer

    @property
    def source(self) -> str:
        top = self.target.split(".")[0]
        return SOURCES.get(top, top)

    def cls(self) -> type[torch.optim.Optimizer]:
        module, _, name = self.target.rpartition(".")
        try:
            c = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            c = None
        if not (isinstance(c, type) and issubclass(c, torch.optim.Optimizer)):
            raise ValueError(f"optim._target_={self.target!r}: not an importable optimizer class "
                             "(module.Class, e.g. torch.optim.AdamW)")
        return c

    @property
    def consensus(self) -> bool:
        """Whether the class is of the PISA family: it follows :class:`pisa.ConsensusOptimizer`
        (asked of the class, before anything is built)."""
        from pisa import is_consensus

        return is_consensus(self.cls())


def spec_of(cfg: Mapping[str, Any]) -> Spec:
    """The class and build metadata of the optimizer config ``cfg`` (``_target_``, ``takes``,
    ``hybrid``)."""
    target, takes = cfg.get("_target_"), str(cfg.get("takes") or "params")
    if not target:
        raise ValueError(f"optimizer '{cfg.get('name')}': its config names no class (_target_)")
    if takes not in ("params", "model"):
        raise ValueError(f"optim.takes={takes!r}: params or model")
    return Spec(str(target), takes, bool(cfg.get("hybrid", False)))


def family_of(cfg: Mapping[str, Any]) -> str | None:
    """``consensus`` | ``baseline``: the family the trainer records in ``summary.json`` for a run
    of the optimizer config ``cfg`` (:func:`pisa_bench.runtime.family`; with a companion the
    run's :class:`pisa.Hybrid` counts by its main optimizer, this class), decided by
    :attr:`Spec.consensus`; ``None`` when ``cfg`` names no importable optimizer class."""
    try:
        return CONSENSUS if spec_of(cfg).consensus else BASELINE
    except ValueError:
        return None


def _kwargs(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in c.items() if k not in RESERVED}


def needs_create_graph(cfg: DictConfig | dict[str, Any]) -> bool:
    """Whether ``backward`` must build the graph of the gradient (``create_graph=True``) for this
    optimizer: PISA's Hutchinson preconditioner differentiates the gradient."""
    return str(cfg.get("preconditioner", "")) == "hutchinson" and spec_of(cfg).consensus


def _build_plain(
    spec: Spec, model: nn.Module, params: list[nn.Parameter], kw: dict[str, Any]
) -> torch.optim.Optimizer:
    if spec.takes == "model":
        return spec.cls()(model, **kw)
    return spec.cls()(params, **kw)


def build_optimizer(
    model: nn.Module, cfg: DictConfig | dict[str, Any]
) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg._target_`` (labelled ``cfg.name``) over ``model``'s trainable
    parameters.

    Hybrid optimizers (Muon, NSISA), and any optimizer whose config has a ``companion``, get the
    hidden matrices; the embeddings, output head and vectors go to ``cfg.companion`` (AdamW by
    default), built as one :class:`pisa.Hybrid` by :func:`pisa.hybrid` (e.g. Shampoo on GPT-2,
    whose 50k-row embedding no Kronecker preconditioner can hold).
    PISA-family optimizers detect torchrun themselves (one rank is one worker).
    """
    spec = spec_of(cfg)
    kw = _kwargs(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if not (spec.hybrid or cfg.get("companion")):
        return _build_plain(spec, model, params, kw)
    if spec.takes == "model":
        raise ValueError(f"optimizer '{cfg['name']}' takes the whole model: it has no companion")
    from pisa import NoHiddenMatrices, hybrid

    routing = cfg.get("routing") or {}
    exclude = tuple(routing.get("exclude", ()))
    require_2d = bool(routing.get("require_2d", False))

    def companion(rest: list[nn.Parameter]) -> torch.optim.Optimizer:
        comp_cfg = cfg.get("companion") or DEFAULT_COMPANION
        comp_spec = spec_of(comp_cfg)
        if comp_spec.hybrid or comp_spec.takes == "model":
            raise ValueError(f"companion optimizer must be a plain one, not '{comp_cfg['name']}'")
        return _build_plain(comp_spec, model, rest, _kwargs(comp_cfg))

    try:
        return hybrid(
            model, lambda hidden: spec.cls()(hidden, **kw), companion,
            exclude=exclude, require_2d=require_2d,
        )
    except NoHiddenMatrices as err:
        raise Incompatible(
            f"optimizer '{cfg['name']}' trains hidden matrices, and this model has none left "
            f"after routing (exclude={list(exclude)}, require_2d={require_2d})"
        ) from err
