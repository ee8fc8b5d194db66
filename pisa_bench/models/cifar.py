"""CIFAR-style VGG, ResNet and DenseNet (3x3 stem, no initial max-pool), as the PISA paper uses.

The paper's CIFAR-10 scripts build their networks from the AdaBelief benchmark code
(``juntang-zhuang/Adabelief-Optimizer``, ``PyTorch_Experiments/classification_cifar10/models``),
itself the widely used ``kuangliu/pytorch-cifar`` family. These are compact re-writes of the same
architectures (same layers, same parameter counts at the default arguments), with knobs that give
the narrower / shallower variants of the small and smoke scales:

- :class:`VGG`: configuration ``layers`` (ints: 3x3 conv + ReLU [+ BN], ``"M"``: 2x2 max-pool),
  then dropout - fc(hidden) - ReLU - dropout - fc(hidden) - ReLU - fc(classes). Defaults: VGG-11
  ("A") without batch norm, 9,750,922 parameters on CIFAR-10.
- :class:`ResNet`: 3x3 conv stem (64) + BN, four stages of basic blocks (widths 64,128,256,512,
  strides 1,2,2,2), global average pool, fc. Defaults: ResNet-34 ``blocks=(3,4,6,3)``,
  21,282,122 parameters.
- :class:`DenseNet`: 3x3 conv stem (2k channels), four dense stages of BN-ReLU-conv1x1(4k)-BN-ReLU-
  conv3x3(k) bottlenecks (growth ``k``), transitions BN-ReLU-conv1x1(x reduction)-avgpool2,
  final BN-ReLU-global pool-fc. Defaults: DenseNet-121 ``blocks=(6,12,24,16), growth=32``,
  6,956,298 parameters.

``width`` multiplies every channel count (rounded, at least 1). The global pools are adaptive,
which equals the originals' fixed 4x4 pooling at 32x32 input and also serves smaller images.
The output layer is called ``classifier`` in every model, so that parameter routing (Muon /
NSISA: hidden matrices vs the rest) sends it to the companion optimizer; VGG's two hidden fully
connected layers are ``fc``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _scaled(c: int, width: float) -> int:
    return max(1, round(c * width))


class VGG(nn.Module):
    """VGG for 32x32 images: conv stack of ``layers``, then a 3-layer classifier with dropout."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        layers: Sequence[int | str] = VGG11,
        width: float = 1.0,
        hidden: int = 512,
        dropout: float = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c = in_channels
        side = image_size
        for v in layers:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
                side //= 2
                continue
            out = _scaled(int(v), width)
            mods.append(nn.Conv2d(c, out, 3, padding=1))
            if batch_norm:
                mods.append(nn.BatchNorm2d(out))
            mods.append(nn.ReLU(inplace=True))
            c = out
        if side < 1:
            raise ValueError(f"{image_size}x{image_size} images are too small for "
                             f"{list(layers).count('M')} max-pools")
        self.features = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)  # identity when the stack ends at 1x1 (32x32 input)
        h = _scaled(hidden, width)
        self.fc = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c, h), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(h, h), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(h, num_classes)
        # He-normal conv weights with fan-out k*k*out and zero biases (the AdaBelief VGG init).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(torch.flatten(self.pool(self.features(x)), 1)))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with basic blocks: ``blocks`` per stage, widths ``width * (64,128,256,512)``."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        blocks: Sequence[int] = (3, 4, 6, 3),
        width: float = 1.0,
    ) -> None:
        super().__init__()
        del image_size  # global average pooling: any size
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layer = []
            for j in range(n):
                layer.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
            stages.append(nn.Sequential(*layer))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class DenseLayer(nn.Module):
    """Bottleneck BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); its k new maps are put in front of x."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 to ``c_out`` channels, then 2x2 average pooling."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """CIFAR DenseNet-BC: ``blocks`` bottleneck layers per stage, growth k, compression 0.5."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        blocks: Sequence[int] = (6, 12, 24, 16),
        growth: int = 32,
        reduction: float = 0.5,
    ) -> None:
        super().__init__()
        if image_size < 2 ** (len(blocks) - 1):
            raise ValueError(f"{image_size}x{image_size} images are too small for "
                             f"{len(blocks) - 1} transitions")
        c = 2 * growth
        mods: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                mods.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                out = math.floor(c * reduction)
                mods.append(Transition(c, out))
                c = out
        mods += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*mods)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
