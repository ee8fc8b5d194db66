"""Models by name: ``build_model(cfg.task.model)`` with ``cfg.task.model.name`` a key of MODELS."""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

# name -> "module:factory"; each factory takes the model config's other keys as kwargs.
MODELS: dict[str, str] = {
    "small_cnn": "pisa_bench.models.small:SmallCNN",
    "mlp": "pisa_bench.models.small:MLP",
    # CIFAR-style networks of the paper (3x3 stem); defaults: VGG-11 / ResNet-34 / DenseNet-121
    "vgg_cifar": "pisa_bench.models.cifar:VGG",
    "resnet_cifar": "pisa_bench.models.cifar:ResNet",
    "densenet_cifar": "pisa_bench.models.cifar:DenseNet",
    "vit": "pisa_bench.models.vit:ViT",  # transformers ViT, freshly initialised
    # torchvision's ImageNet ResNet-18 (optional extra `pip install -e .[vision]`, imported lazily)
    "resnet18_torchvision": "pisa_bench.tasks.imagenet:resnet18",
}


def build_model(cfg: DictConfig | dict[str, Any], **extra: Any) -> nn.Module:
    """Build the model ``cfg.name`` with the remaining keys (and ``extra``) as arguments."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    name = c.pop("name")
    if name not in MODELS:
        raise KeyError(f"unknown model '{name}'; choose one of: {', '.join(sorted(MODELS))}")
    module, factory = MODELS[name].split(":")
    return getattr(importlib.import_module(module), factory)(**c, **extra)
