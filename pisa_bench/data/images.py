"""Image-classification datasets held in memory as uint8 tensors (N, C, H, W).

Each loader returns an :class:`ImageData`; :func:`load_images` picks one by ``data.name``.
Real data is read from the data directory (or, for ``mnist_shipped``, from the project);
``data.synthetic: true`` (the smoke scale) gives random images of the same shape instead.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from pisa_bench.data.keys import require_files

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


def _idx_pair(directory: Path, images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(read_idx(directory / images).copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(directory / labels).astype(np.int64))
    return x, y


def mnist_shipped(cfg: DictConfig, data_dir: Path) -> ImageData:
    """The MNIST test set shipped in the project: 8,000 images to train on, the last 2,000 to test
    on."""
    d = ASSETS / "mnist"
    x, y = _idx_pair(d, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    n_train = int(cfg.get("n_train", 8000))
    return ImageData(
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
        (0.1325,),
        (0.3105,),
        10,
        note=f"MNIST test set split {n_train}/{len(x) - n_train} "
        "(shipped data; non-standard split)",
    )


def mnist(cfg: DictConfig, data_dir: Path) -> ImageData:
    """MNIST from ``<data_dir>/mnist``: the first 10k training images (all offline), test set."""
    d = data_dir / "mnist"
    files = [
        "train-first10k-images-idx3-ubyte.gz",
        "train-first10k-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    if (d / "train-images-idx3-ubyte.gz").exists():
        files[:2] = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    require_files(d, files, "mnist")
    tx, ty = _idx_pair(d, files[0], files[1])
    vx, vy = _idx_pair(d, files[2], files[3])
    note = "" if len(tx) == 60000 else f"MNIST trained on the first {len(tx)} training images"
    tx, ty, vx, vy, sub = _subsets(cfg, tx, ty, vx, vy)
    note = "; ".join(n for n in (note, sub) if n)
    return ImageData(tx, ty, vx, vy, (0.1307,), (0.3081,), 10, note=note)


def fashion_mnist(cfg: DictConfig, data_dir: Path) -> ImageData:
    d = data_dir / "fashion-mnist"
    files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    require_files(d, files, "fashion-mnist")
    tx, ty = _idx_pair(d, files[0], files[1])
    vx, vy = _idx_pair(d, files[2], files[3])
    tx, ty, vx, vy, note = _subsets(cfg, tx, ty, vx, vy)
    return ImageData(tx, ty, vx, vy, (0.2860,), (0.3530,), 10, note=note)


def _subsets(
    cfg: DictConfig, tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Class-balanced ``n_train`` / ``n_test`` subsets (:func:`balanced_subset`) and a note."""
    notes, out = [], []
    for key, x, y, verb in (("n_train", tx, ty, "trained on"), ("n_test", vx, vy, "evaluated on")):
        n = cfg.get(key)
        idx = torch.from_numpy(balanced_subset(y.numpy(), None if n is None else int(n)))
        if len(idx) < len(y):
            notes.append(f"{verb} a class-balanced subset of {len(idx)} of {len(y)} images")
        out += [x[idx], y[idx]]
    return out[0], out[1], out[2], out[3], "; ".join(notes)


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

    tx, ty = make(int(cfg.get("n_train") or 64))
    vx, vy = make(int(cfg.get("n_test") or 32))
    return ImageData(tx, ty, vx, vy, (0.5,) * c, (0.25,) * c, k, note="synthetic data")


CIFAR10_FILES = ("cifar10_train_jpeg.npz", "cifar10_test_jpeg.npz")
# Per-channel statistics of the decoded JPEG training set (all 50,000 images), as measured in
# <data_dir>/cifar10-jpeg/README.md. The official CIFAR-10 values are mean (0.4914, 0.4822, 0.4465),
# std (0.2470, 0.2435, 0.2616): JPEG smoothing lowers the std a little. (The AdaBelief / PISA
# scripts normalise with std (0.2023, 0.1994, 0.2010), the mean per-image std, a rescaling only.)
CIFAR10_MEAN = (0.4913, 0.4821, 0.4465)
CIFAR10_STD = (0.2452, 0.2428, 0.2606)

_DECODED: dict[tuple[str, int, int, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def balanced_subset(labels: np.ndarray, n: int | None) -> np.ndarray:
    """Indices of the first ``n`` rows in a class-balanced order, returned sorted.

    Row ``i`` gets the rank ``r_i`` it has among the rows of its class (file order); rows are
    taken by ``(r_i, label)``, so every class gets ``n // K`` rows and the remainder goes to the
    lowest labels. ``n=None`` or ``n >= len(labels)``: all rows. Deterministic (no seed): the
    subset is part of the dataset definition, not of a run's randomness.
    """
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    order = np.lexsort((labels, rank))  # primary key: rank, then label
    return np.sort(order[:n])


def decode_jpeg_npz(path: Path, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 ``(N, 3, H, W)``) and labels (int64) of a JPEG ``.npz`` file.

    The file holds ``jpeg`` (every JPEG file concatenated), ``offsets`` (N + 1) and ``labels``.

    Image ``i`` is the JPEG file ``jpeg[offsets[i]:offsets[i+1]]``, decoded with Pillow to RGB.
    ``n``: a class-balanced subset (:func:`balanced_subset`), decoded alone. Decoded arrays are
    cached in memory per (file, size, mtime, n), so repeated runs in one process decode once.
    """
    from PIL import Image

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, n)
    if key in _DECODED:
        return _DECODED[key]
    with np.load(path, allow_pickle=False) as z:
        jpeg, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
    if len(offsets) != len(labels) + 1:
        raise ValueError(f"{path}: {len(offsets)} offsets for {len(labels)} labels (want N+1)")
    idx = balanced_subset(labels, n)
    images = [
        np.asarray(Image.open(io.BytesIO(jpeg[a:b].tobytes())).convert("RGB"))
        for a, b in zip(offsets[idx], offsets[idx + 1])
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels[idx].astype(np.int64))
    _DECODED[key] = (x, y)
    return x, y


def cifar10(cfg: DictConfig, data_dir: Path) -> ImageData:
    """CIFAR-10 from ``<data_dir>/cifar10-jpeg``: 50,000 train / 10,000 test 32x32 RGB images.

    The images are JPEG copies (quality 75) of CIFAR-10, close to but not identical with the
    original pixels. ``n_train`` / ``n_test`` (optional) take class-balanced subsets.
    """
    d = data_dir / "cifar10-jpeg"
    require_files(d, list(CIFAR10_FILES), "cifar10")
    n_train, n_test = cfg.get("n_train"), cfg.get("n_test")
    tx, ty = decode_jpeg_npz(d / CIFAR10_FILES[0], None if n_train is None else int(n_train))
    vx, vy = decode_jpeg_npz(d / CIFAR10_FILES[1], None if n_test is None else int(n_test))
    notes = ["CIFAR-10 from JPEG copies (quality 75): pixels close to the original, not identical"]
    if len(tx) < 50000:
        notes.append(f"trained on a class-balanced subset of {len(tx)} of 50,000 training images")
    if len(vx) < 10000:
        notes.append(f"evaluated on a class-balanced subset of {len(vx)} of 10,000 test images")
    return ImageData(tx, ty, vx, vy, CIFAR10_MEAN, CIFAR10_STD, 10, note="; ".join(notes))


#: The ``task.data`` keys each loader reads besides ``name`` and ``synthetic`` (synthetic data also
#: takes those of the dataset it stands in for, which stay in its config). ``shape`` and
#: ``num_classes`` describe the synthetic stand-in (smoke scale) and are accepted in either mode.
LOADER_KEYS: dict[str, frozenset[str]] = {
    "mnist_shipped": frozenset({"n_train"}),
    "mnist": frozenset({"n_train", "n_test"}),
    "fashion_mnist": frozenset({"n_train", "n_test"}),
    "cifar10": frozenset({"n_train", "n_test"}),
    "synthetic": frozenset({"n_train", "n_test"}),
}


def image_data_keys(cfg: DictConfig) -> frozenset[str]:
    """The ``task.data`` keys that :func:`load_images` reads for ``cfg`` (its dataset and mode)."""
    from pisa_bench.data.keys import loader_keys

    return loader_keys(cfg, LOADER_KEYS, ("name", "synthetic", "shape", "num_classes"))


LOADERS: dict[str, Callable[[DictConfig, Path], ImageData]] = {
    "mnist_shipped": mnist_shipped,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
}


def load_images(cfg: DictConfig, data_dir: Path) -> ImageData:
    """The dataset ``cfg.name`` (or synthetic data of its shape when ``cfg.synthetic``)."""
    if cfg.get("synthetic"):
        return synthetic(cfg, data_dir)
    name = str(cfg.name)
    if name not in LOADERS:
        raise KeyError(
            f"unknown image dataset '{name}'; choose one of: {', '.join(sorted(LOADERS))}"
        )
    return LOADERS[name](cfg, data_dir)
