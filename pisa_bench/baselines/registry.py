"""Every optimizer by name: the PISA family and the maintained competitors.

An ``optim`` config is ``{name: <registry name>, <hyperparameter>: <value>, ...}``; every key but
the reserved ones below is passed to the optimizer's constructor, so the config owns every
hyperparameter. Reserved keys:

- ``routing``: for hybrid optimizers (Muon, NSISA), which parameters are *not* hidden matrices
  (``exclude``: name patterns; embeddings and vectors always go to the companion;
  ``require_2d``: only 2-D matrices are hidden, conv kernels go to the companion too);
- ``companion``: an ``optim``-style config of the optimizer that trains those parameters
  (AdamW by default).

Nothing is re-implemented here: torch.optim, the ``pytorch-optimizer`` package and ``pisa``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

RESERVED = ("name", "routing", "companion")
CONSENSUS, BASELINE = "consensus", "baseline"  # summary.json's ``family``
FAMILIES = (CONSENSUS, BASELINE)


class Incompatible(ValueError):
    """This optimizer cannot train this model or task (refused before any step)."""


@dataclass(frozen=True)
class Spec:
    """Where an optimizer lives and how it is built."""

    target: str  # "module:Class"
    takes: str = "params"  # "params" or "model" (Adam-mini wants the module)
    hybrid: bool = False  # hidden matrices to it, the rest to a companion optimizer
    source: str = "torch"

    def cls(self) -> type[torch.optim.Optimizer]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def consensus(self) -> bool:
        """Whether the class is of the PISA family: it follows :class:`pisa.ConsensusOptimizer`
        (asked of the class, before anything is built)."""
        from pisa import is_consensus

        return is_consensus(self.cls())


def _po(name: str, **kw: Any) -> Spec:
    return Spec(f"pytorch_optimizer:{name}", source="pytorch-optimizer", **kw)


REGISTRY: dict[str, Spec] = {
    # ours
    "pisa": Spec("pisa:PISA", source="pisa"),
    "sisa": Spec("pisa:SISA", source="pisa"),
    "nsisa": Spec("pisa:NSISA", hybrid=True, source="pisa"),
    # torch.optim
    "sgdm": Spec("torch.optim:SGD"),
    "adam": Spec("torch.optim:Adam"),
    "adamw": Spec("torch.optim:AdamW"),
    "rmsprop": Spec("torch.optim:RMSprop"),
    "muon": Spec("torch.optim:Muon", hybrid=True),
    # pytorch-optimizer
    "adan": _po("Adan"),
    "adabelief": _po("AdaBelief"),
    "adabound": _po("AdaBound"),
    "yogi": _po("Yogi"),
    "msvag": _po("MSVAG"),
    "radam": _po("RAdam"),
    "fromage": _po("Fromage"),
    "adamp": _po("AdamP"),
    "sgdp": _po("SGDP"),
    "lion": _po("Lion"),
    "diffgrad": _po("DiffGrad"),
    "sgdsai": _po("SGDSaI"),
    "soap": _po("SOAP"),
    "shampoo": _po("Shampoo"),
    "adammini": _po("AdamMini", takes="model"),
}


def available() -> list[str]:
    return sorted(REGISTRY)


def spec_of(name: str) -> Spec:
    if name not in REGISTRY:
        raise KeyError(f"unknown optimizer '{name}'; choose one of: {', '.join(available())}")
    return REGISTRY[name]


def consensus_names() -> list[str]:
    """The registered PISA-family optimizers (for messages; ask :attr:`Spec.consensus`)."""
    return [name for name in available() if REGISTRY[name].consensus]


def family_of(name: str) -> str | None:
    """``consensus`` | ``baseline``: the family the trainer records in ``summary.json`` for a run
    of the optimizer registered as ``name`` (:func:`pisa_bench.runtime.family`; with a companion
    the run's :class:`pisa.Hybrid` counts by its main optimizer, this class), decided by
    :attr:`Spec.consensus`; ``None`` for a name the registry does not know."""
    if name not in REGISTRY:
        return None
    return CONSENSUS if REGISTRY[name].consensus else BASELINE


def _kwargs(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in c.items() if k not in RESERVED}


def needs_create_graph(cfg: DictConfig | dict[str, Any]) -> bool:
    """Whether ``backward`` must build the graph of the gradient (``create_graph=True``) for this
    optimizer: PISA's Hutchinson preconditioner differentiates the gradient."""
    return (
        str(cfg.get("preconditioner", "")) == "hutchinson" and spec_of(str(cfg["name"])).consensus
    )


def _build_plain(
    spec: Spec, model: nn.Module, params: list[nn.Parameter], kw: dict[str, Any]
) -> torch.optim.Optimizer:
    if spec.takes == "model":
        return spec.cls()(model, **kw)
    return spec.cls()(params, **kw)


def build_optimizer(
    model: nn.Module, cfg: DictConfig | dict[str, Any]
) -> torch.optim.Optimizer:
    """Build the optimizer named ``cfg.name`` over ``model``'s trainable parameters.

    Hybrid optimizers (Muon, NSISA), and any optimizer whose config has a ``companion``, get the
    hidden matrices; the embeddings, output head and vectors go to ``cfg.companion`` (AdamW by
    default), built as one :class:`pisa.Hybrid` by :func:`pisa.hybrid` (e.g. Shampoo on GPT-2,
    whose 50k-row embedding no Kronecker preconditioner can hold).
    PISA-family optimizers detect torchrun themselves (one rank is one worker).
    """
    spec = spec_of(str(cfg["name"]))
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
        comp_cfg = cfg.get("companion") or {"name": "adamw"}
        comp_spec = spec_of(str(comp_cfg["name"]))
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
