"""DCGAN-style generator and critic (Radford et al. 2016), for WGAN / WGAN-GP at any image size.

The number of stride-2 stages ``n`` is how often the image side halves while staying >= 4 and
even: 28 -> 14 -> 7 (``n = 2``, 7x7 base), 32 -> ... -> 4 (``n = 3``), 64 -> ... -> 4 (``n = 4``,
the paper's 64x64 CIFAR-10 setup). Channel widths double per stage, from ``channels`` at full
resolution to ``channels * 2**(n-1)`` at the base, as the official DCGAN code (ngf/ndf = 64).

- Generator: ``z -> ConvT(k=base) -> [BN, ReLU, ConvT(4, 2, 1)] * n -> tanh`` (images in [-1, 1]).
- Critic: ``[Conv(4, 2, 1), norm, LeakyReLU(0.2)] * n -> flatten -> Linear(., 1)``: an
  unbounded score (no sigmoid: a Wasserstein critic). ``norm`` is ``batch`` (the official WGAN
  and WGAN-GP code), ``layer`` (Gulrajani et al.: batch norm breaks the per-sample gradient
  penalty) or ``none``; the first stage has none, as in DCGAN. The last layer is named ``head``
  so that hybrid optimizers route it like an output layer.

Initialisation as DCGAN: conv weights N(0, 0.02), norm scales N(1, 0.02), norm shifts 0.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def n_stages(image_size: int) -> int:
    """Stride-2 stages from a base side >= 4 up to ``image_size`` (see the module docstring)."""
    n, side = 0, int(image_size)
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        n += 1
    if n == 0:
        raise ValueError(
            f"image size {image_size} is too small or odd for a DCGAN (need >= 8, even)"
        )
    return n


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":  # normalises each sample over (C, H, W), with per-channel affine
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"critic norm must be batch, layer or none, not '{kind}'")


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation (in place)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """``z`` of shape (N, z_dim) -> images (N, C, S, S) in [-1, 1]."""

    def __init__(self, z_dim: int, out_channels: int, image_size: int, channels: int) -> None:
        super().__init__()
        n = n_stages(image_size)
        base = image_size // 2**n
        widths = [channels * 2 ** (n - 1 - i) for i in range(n)]  # base -> full resolution
        self.z_dim = z_dim
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, widths[0], base, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], -1, 1, 1))


class Critic(nn.Module):
    """Images (N, C, S, S) -> scores (N,)."""

    def __init__(self, in_channels: int, image_size: int, channels: int, norm: str) -> None:
        super().__init__()
        n = n_stages(image_size)
        base = image_size // 2**n
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(n):
            c_out = channels * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.Identity() if i == 0 else _norm(norm, c_out),
                nn.LeakyReLU(0.2, True),
            ]
            c_in = c_out
        self.main = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * base * base, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.main(x).flatten(1)).squeeze(1)


class DCGAN(nn.Module):
    """The pair, so that a run counts (and checkpoints) both networks as one model."""

    def __init__(
        self,
        z_dim: int,
        image_channels: int,
        image_size: int,
        g_channels: int,
        d_channels: int,
        critic_norm: str,
    ) -> None:
        super().__init__()
        self.generator = Generator(z_dim, image_channels, image_size, g_channels)
        self.critic = Critic(image_channels, image_size, d_channels, critic_norm)
        dcgan_init(self)

    @property
    def z_dim(self) -> int:
        return self.generator.z_dim
