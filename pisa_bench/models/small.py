"""Small models: a two-conv CNN (quickstart, federated CIFAR) and an MLP (Adult)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv(c1) - pool - conv(c2) - pool - fc(hidden) - fc(classes), ReLU, 5x5 or 3x3 kernels."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        kernel: int = 3,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.features(x)))


class MLP(nn.Module):
    """Fully connected ReLU network ``in -> hidden[0] -> ... -> num_classes``."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (32, 16, 8)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))
