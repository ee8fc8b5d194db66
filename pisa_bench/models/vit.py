"""Vision Transformer from Hugging Face transformers, freshly initialised, for small images.

``ViTForImageClassification`` (pre-norm encoder, [CLS] token, learned position embeddings, linear
head on the final layer-normed [CLS] state) built from a ``ViTConfig``; with 32x32 CIFAR images a
patch size of 4 gives 8x8 = 64 patch tokens (+1 [CLS]). The wrapper returns the logits tensor so
that the task's loss sees a plain classifier.
"""

from __future__ import annotations

import torch
from torch import nn


class ViT(nn.Module):
    """``ViTForImageClassification``, ``depth`` layers of width ``hidden``; forward -> logits."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        hidden: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp: int = 768,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is no multiple of patch size {patch_size}")
        config = ViTConfig(
            image_size=image_size, patch_size=patch_size, num_channels=in_channels,
            hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
            intermediate_size=mlp, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=attention_dropout,
            initializer_range=initializer_range, num_labels=num_classes,
        )
        self.config = config
        self.net = ViTForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits
