"""A run's identity: what it computes, whatever its seed, paths and bookkeeping.

Two runs with the same identity differ only by seed: they are repetitions of one configuration
(analysis pools them into one row). The identity is the resolved config minus

- ``seed``, and every key named ``*seed`` whose value equals the run's seed (values that follow
  it, such as ``task.partition_seed: ${seed}``);
- the keys that do not change what a run computes: :data:`NOT_IDENTITY` at the top level (the
  experiment ``name`` only picks a directory) and :data:`TRAIN_NOT_IDENTITY` under ``train``.

Class paths in a config (``task.cls``) are hashed as spelled before the harness moved into the
``pisa_bench`` package (``experiments.*``, ``baselines.*``; :data:`LEGACY_MODULES`), so runs
recorded before the move keep their identities and directories.

The run directory's name ends with the first 8 digits of :func:`identity_hash`, and
``summary.json`` and ``meta.json`` record the whole hash (``identity``).

Classes named by ``_target_`` (``task.model``, ``optim``) are hashed as the registry names that
configs used before (``{_target_: pisa_bench.models.cifar.DenseNet}`` as
``{name: densenet_cifar}``; :data:`LEGACY_TARGETS`), so those runs keep their identities too.
The rule, per mapping anywhere in the config: if its ``_target_`` is in the table, its ``name``
is absent or equals the legacy name, and each key the legacy name implied (``hybrid``,
``takes``) is absent or has the implied value, then the mapping is hashed without ``_target_``
and those keys, with ``name: <legacy name>``. Any other ``_target_`` (a user's own class, or a
known class under another name or with other metadata) is hashed as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

NOT_IDENTITY = ("seed", "name", "paths", "run", "logger", "hydra", "reproduce")
TRAIN_NOT_IDENTITY = ("device", "threads", "progress", "preempt_at_step", "ckpt_every",
                      "ckpt_every_min", "ckpt_at_eval")
#: (module prefix now, as identities spell it): the harness's packages before ``pisa_bench``
LEGACY_MODULES = (("pisa_bench.baselines.", "baselines."), ("pisa_bench.", "experiments."))


def _legacy(name: str, **implied: Any) -> tuple[str, dict[str, Any]]:
    return name, implied


#: ``_target_`` -> (the registry name it was spelled by, the metadata keys that name implied)
LEGACY_TARGETS: dict[str, tuple[str, dict[str, Any]]] = {
    # task.model (the former registry pisa_bench.models.MODELS)
    "pisa_bench.models.small.SmallCNN": _legacy("small_cnn"),
    "pisa_bench.models.small.MLP": _legacy("mlp"),
    "pisa_bench.models.cifar.VGG": _legacy("vgg_cifar"),
    "pisa_bench.models.cifar.ResNet": _legacy("resnet_cifar"),
    "pisa_bench.models.cifar.DenseNet": _legacy("densenet_cifar"),
    "pisa_bench.models.vit.ViT": _legacy("vit"),
    "pisa_bench.tasks.imagenet.resnet18": _legacy("resnet18_torchvision"),
    # optim (the former registry pisa_bench.baselines.registry.REGISTRY; also a companion)
    "pisa.PISA": _legacy("pisa"),
    "pisa.SISA": _legacy("sisa"),
    "pisa.NSISA": _legacy("nsisa", hybrid=True),
    "torch.optim.SGD": _legacy("sgdm"),
    "torch.optim.Adam": _legacy("adam"),
    "torch.optim.AdamW": _legacy("adamw"),
    "torch.optim.RMSprop": _legacy("rmsprop"),
    "torch.optim.Muon": _legacy("muon", hybrid=True),
    "pytorch_optimizer.Adan": _legacy("adan"),
    "pytorch_optimizer.AdaBelief": _legacy("adabelief"),
    "pytorch_optimizer.AdaBound": _legacy("adabound"),
    "pytorch_optimizer.Yogi": _legacy("yogi"),
    "pytorch_optimizer.MSVAG": _legacy("msvag"),
    "pytorch_optimizer.RAdam": _legacy("radam"),
    "pytorch_optimizer.Fromage": _legacy("fromage"),
    "pytorch_optimizer.AdamP": _legacy("adamp"),
    "pytorch_optimizer.SGDP": _legacy("sgdp"),
    "pytorch_optimizer.Lion": _legacy("lion"),
    "pytorch_optimizer.DiffGrad": _legacy("diffgrad"),
    "pytorch_optimizer.SGDSaI": _legacy("sgdsai"),
    "pytorch_optimizer.SOAP": _legacy("soap"),
    "pytorch_optimizer.Shampoo": _legacy("shampoo"),
    "pytorch_optimizer.AdamMini": _legacy("adammini", takes="model"),
}


def _legacy_spelling(value: Any) -> Any:
    """A ``pisa_bench.*`` module path as the identity spells it (its pre-``pisa_bench`` name)."""
    if isinstance(value, str):
        for now, before in LEGACY_MODULES:
            if value.startswith(now):
                return before + value[len(now):]
    return value


def _legacy_target(d: dict[str, Any]) -> dict[str, Any]:
    """A mapping whose ``_target_`` a registry name spelled before, as that name (module doc)."""
    known = LEGACY_TARGETS.get(str(d.get("_target_")))
    if known is None:
        return d
    name, implied = known
    if d.get("name", name) != name or any(d.get(k, v) != v for k, v in implied.items()):
        return d
    out = {k: v for k, v in d.items() if k != "_target_" and k not in implied}
    out["name"] = name
    return out


def identity_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (a ``DictConfig`` or plain mapping) that is its identity."""
    if not isinstance(cfg, dict):  # a DictConfig: resolve it
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    seed = cfg.get("seed")

    def strip(d: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in _legacy_target(dict(d)).items():
            if str(k).endswith("seed") and seed is not None and v == seed:
                continue
            out[k] = strip(v) if isinstance(v, Mapping) else _legacy_spelling(v)
        return out

    c = strip({k: v for k, v in cfg.items() if k not in NOT_IDENTITY})
    if isinstance(c.get("train"), dict):
        c["train"] = {k: v for k, v in c["train"].items() if k not in TRAIN_NOT_IDENTITY}
    return c


def identity_hash(cfg: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of :func:`identity_config` as sorted JSON."""
    blob = json.dumps(identity_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
