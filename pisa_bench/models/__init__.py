"""Models by class: ``build_model(cfg.task.model)`` calls ``cfg.task.model._target_`` (a class or
factory, e.g. ``pisa_bench.models.cifar.DenseNet``) with the model config's other keys.

The project's models: ``pisa_bench.models.small`` (``SmallCNN``, ``MLP``), the CIFAR-style
networks of the paper (3x3 stem; ``pisa_bench.models.cifar``: ``VGG``, ``ResNet``, ``DenseNet``),
``pisa_bench.models.vit.ViT`` (transformers ViT, freshly initialised) and torchvision's ImageNet
ResNet-18 (``pisa_bench.tasks.imagenet.resnet18``; the optional extra ``pip install -e .[vision]``,
imported lazily).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from torch import nn


def model_factory(target: object) -> Callable[..., nn.Module]:
    """The class or function ``target`` names (``module.Name``); ValueError (one line) if none."""
    hydra_log = logging.getLogger("hydra.utils")
    quiet, hydra_log.disabled = hydra_log.disabled, True  # the one-line error says it all
    try:
        return get_method(str(target))
    except (ImportError, ValueError, AttributeError):
        raise ValueError(f"task.model._target_={str(target)!r}: not an importable model class "
                         "or factory (module.Name, e.g. pisa_bench.models.cifar.ResNet)") from None
    finally:
        hydra_log.disabled = quiet


def build_model(cfg: DictConfig | dict[str, Any], **extra: Any) -> nn.Module:
    """Build the model ``cfg._target_`` with the remaining keys (and ``extra``) as arguments."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    if "_target_" not in c:
        raise ValueError(f"task.model: no _target_ (the model's class or factory) in {c}")
    return model_factory(c.pop("_target_"))(**c, **extra)
