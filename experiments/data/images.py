"""Image-classification datasets held in memory as uint8 tensors (N, C, H, W).

Each loader returns an :class:`ImageData`; :func:`load_images` picks one by ``data.name``.
Real data is read from the data directory (or, for ``mnist_shipped``, from the project);
``data.synthetic: true`` (the smoke scale) gives random images of the same shape instead.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from experiments.tasks.base import DatasetMissing

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class ImageData:
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]  # per channel, in [0, 1]
    std: tuple[float, ...]
    num_classes: int
    note: str = ""  # plain-language remark for the run's summary (non-standard split, ...)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: images (magic 2051) as (N, H, W) uint8, labels (2049) as (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic == 2051:
        n, h, w = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
    if magic == 2049:
        return np.frombuffer(raw, np.uint8, offset=8).copy()
    raise ValueError(f"{path}: not an IDX file (magic {magic})")


def _require(directory: Path, files: list[str], dataset: str) -> None:
    missing = [f for f in files if not (directory / f).exists()]
    if missing:
        raise DatasetMissing(dataset, directory, files)


def _idx_pair(directory: Path, images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(read_idx(directory / images).copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(directory / labels).astype(np.int64))
    return x, y


def mnist_shipped(cfg: DictConfig, data_dir: Path) -> ImageData:
    """The MNIST test set shipped in the project: 8,000 images to train on, the last 2,000 to test."""
    d = ASSETS / "mnist"
    x, y = _idx_pair(d, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    n_train = int(cfg.get("n_train", 8000))
    return ImageData(
        x[:n_train], y[:n_train], x[n_train:], y[n_train:], (0.1325,), (0.3105,), 10,
        note=f"MNIST test set split {n_train}/{len(x) - n_train} (shipped data; non-standard split)",
    )


def mnist(cfg: DictConfig, data_dir: Path) -> ImageData:
    """MNIST from ``<data_dir>/mnist``: the first 10k training images (all that is offline) and test."""
    d = data_dir / "mnist"
    files = ["train-first10k-images-idx3-ubyte.gz", "train-first10k-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if (d / "train-images-idx3-ubyte.gz").exists():
        files[:2] = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    _require(d, files, "mnist")
    tx, ty = _idx_pair(d, files[0], files[1])
    vx, vy = _idx_pair(d, files[2], files[3])
    note = "" if len(tx) == 60000 else f"MNIST trained on the first {len(tx)} training images"
    return ImageData(tx, ty, vx, vy, (0.1307,), (0.3081,), 10, note=note)


def fashion_mnist(cfg: DictConfig, data_dir: Path) -> ImageData:
    d = data_dir / "fashion-mnist"
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    _require(d, files, "fashion-mnist")
    tx, ty = _idx_pair(d, files[0], files[1])
    vx, vy = _idx_pair(d, files[2], files[3])
    return ImageData(tx, ty, vx, vy, (0.2860,), (0.3530,), 10)


def synthetic(cfg: DictConfig, data_dir: Path) -> ImageData:
    """Random images with learnable labels (class = brightest quadrant pattern), for smoke runs."""
    c, h, w = (int(v) for v in cfg.get("shape", (3, 32, 32)))
    k = int(cfg.get("num_classes", 10))
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, k, (n,), generator=g)
        x = torch.randint(0, 128, (n, c, h, w), generator=g, dtype=torch.uint8)
        x[torch.arange(n), :, (y % h)] += 100  # a class-dependent bright row
        return x, y

    tx, ty = make(int(cfg.get("n_train", 64)))
    vx, vy = make(int(cfg.get("n_test", 32)))
    return ImageData(tx, ty, vx, vy, (0.5,) * c, (0.25,) * c, k, note="synthetic data")


LOADERS: dict[str, Callable[[DictConfig, Path], ImageData]] = {
    "mnist_shipped": mnist_shipped,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
}


def load_images(cfg: DictConfig, data_dir: Path) -> ImageData:
    """The dataset ``cfg.name`` (or synthetic data of its shape when ``cfg.synthetic``)."""
    if cfg.get("synthetic"):
        return synthetic(cfg, data_dir)
    name = str(cfg.name)
    if name not in LOADERS:
        raise KeyError(f"unknown image dataset '{name}'; choose one of: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](cfg, data_dir)
