"""Tabular classification datasets held in memory as float32 tensors (N, d).

:func:`load_tabular` picks a loader by ``data.name``; ``data.synthetic: true`` (the smoke scale)
gives a small learnable random problem of the same width instead.

Adult (a9a) is read from ``<data_dir>/adult-a9a/{a9a, a9a.t}`` (LIBSVM format, 123 binary
features, labels -1/+1; on these machines ``../shared/data/adult-a9a``), falling back to a copy
shipped under ``pisa_bench/data/assets/adult-a9a`` when there is one. ``a9a.t`` never uses
feature 123, so its rows are padded to the training width; labels become {0, 1}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from pisa_bench.data.images import balanced_subset
from pisa_bench.errors import DatasetMissing

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class TabularData:
    train_x: torch.Tensor  # float32 (N, d)
    train_y: torch.Tensor  # int64 (N,), labels 0..num_classes-1
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    note: str = ""  # plain-language remark for the run's summary


def read_libsvm(path: Path, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``(x float32 (N, d), raw labels float64 (N,))`` from a LIBSVM text file.

    Feature indices are 1-based; ``d`` is ``n_features`` (rows with fewer features are zero
    padded; an index above it is an error) or else the largest index in the file.
    """
    labels: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    with open(path) as f:
        for r, line in enumerate(f):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            head, *feats = line.split()
            labels.append(float(head))
            i = len(labels) - 1
            for item in feats:
                k, _, v = item.partition(":")
                if not _:
                    raise ValueError(f"{path}:{r + 1}: feature '{item}' is not index:value")
                rows.append(i)
                cols.append(int(k) - 1)
                vals.append(float(v))
    c = np.asarray(cols, dtype=np.int64)
    if len(c) and c.min() < 0:
        raise ValueError(f"{path}: feature indices are 1-based; found index {c.min() + 1}")
    width = int(c.max()) + 1 if len(c) else 0
    if n_features is not None:
        if width > n_features:
            raise ValueError(f"{path}: feature index {width} exceeds n_features={n_features}")
        width = int(n_features)
    x = np.zeros((len(labels), width), dtype=np.float32)
    x[np.asarray(rows, dtype=np.int64), c] = np.asarray(vals, dtype=np.float32)
    return x, np.asarray(labels, dtype=np.float64)


@lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, n_features: int | None) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_libsvm(Path(path), n_features)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def read_libsvm_cached(path: Path, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_libsvm`, parsed once per process (sweeps run many jobs in one process)."""
    x, y = _read_cached(str(path.resolve()), path.stat().st_mtime_ns, n_features)
    return x.copy(), y.copy()


def encode_labels(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map the sorted distinct training labels to ``0..K-1`` (-1/+1 -> 0/1) in both splits."""
    classes = np.unique(train)
    unseen = np.setdiff1d(np.unique(test), classes)
    if len(unseen):
        raise ValueError(f"test labels {unseen.tolist()} never occur in the training set")
    enc = {float(v): i for i, v in enumerate(classes)}
    ty = torch.tensor([enc[float(v)] for v in train], dtype=torch.long)
    vy = torch.tensor([enc[float(v)] for v in test], dtype=torch.long)
    return ty, vy, len(classes)


def adult_a9a(cfg: DictConfig, data_dir: Path) -> TabularData:
    """Adult (a9a): 32,561 training and 16,281 test rows, 123 binary features, 2 classes."""
    files = ["a9a", "a9a.t"]
    sub = str(cfg.get("dir", "adult-a9a"))
    candidates = [data_dir / sub, ASSETS / "adult-a9a"]
    d = next((c for c in candidates if all((c / f).is_file() for f in files)), None)
    if d is None:
        raise DatasetMissing(
            "adult-a9a", data_dir / sub, files,
            hint="LIBSVM's a9a / a9a.t (https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/"
                 "binary.html#a9a), as in the PISA repository's 'Data Heterogenerity/data'.",
        )
    n_features = int(cfg.get("n_features", 123))
    tx, ty_raw = read_libsvm_cached(d / files[0], n_features)
    vx, vy_raw = read_libsvm_cached(d / files[1], n_features)
    ty, vy, k = encode_labels(ty_raw, vy_raw)
    x, y, notes = [torch.from_numpy(tx), torch.from_numpy(vx)], [ty, vy], []
    for i, (key, verb) in enumerate((("n_train", "trained on"), ("n_test", "evaluated on"))):
        n = cfg.get(key)  # a class-balanced subset (null: all rows)
        idx = torch.from_numpy(balanced_subset(y[i].numpy(), None if n is None else int(n)))
        if len(idx) < len(y[i]):
            notes.append(f"{verb} a class-balanced subset of {len(idx)} of {len(y[i])} rows")
        x[i], y[i] = x[i][idx], y[i][idx]
    return TabularData(x[0], y[0], x[1], y[1], k, note="; ".join(notes))


def synthetic(cfg: DictConfig, data_dir: Path) -> TabularData:
    """A random binary-feature problem with a planted linear rule, for smoke runs (fixed seed)."""
    d = int(cfg.get("n_features", 123))
    k = int(cfg.get("num_classes", 2))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, k, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (torch.rand(n, d, generator=g) < 0.1).float()
        return x, (x @ w + 0.5 * torch.randn(n, k, generator=g)).argmax(1)

    tx, ty = make(int(cfg.get("n_train") or 256))
    vx, vy = make(int(cfg.get("n_test") or 128))
    return TabularData(tx, ty, vx, vy, k, note="synthetic data")


LOADERS: dict[str, Callable[[DictConfig, Path], TabularData]] = {
    "adult_a9a": adult_a9a,
}

#: The ``task.data`` keys each loader reads besides ``name``, ``synthetic`` and ``n_features``
#: (``num_classes`` describes the synthetic stand-in and is accepted in either mode).
LOADER_KEYS: dict[str, frozenset[str]] = {
    "adult_a9a": frozenset({"dir", "n_train", "n_test"}),
    "synthetic": frozenset({"n_train", "n_test"}),
}


def tabular_data_keys(cfg: DictConfig) -> frozenset[str]:
    """The ``task.data`` keys that :func:`load_tabular` reads for ``cfg`` (dataset and mode)."""
    from pisa_bench.data.keys import loader_keys

    return loader_keys(cfg, LOADER_KEYS, ("name", "synthetic", "n_features", "num_classes"))


def load_tabular(cfg: DictConfig, data_dir: Path) -> TabularData:
    """The dataset ``cfg.name`` (or synthetic data of its width when ``cfg.synthetic``)."""
    if cfg.get("synthetic"):
        return synthetic(cfg, data_dir)
    name = str(cfg.name)
    if name not in LOADERS:
        known = ", ".join(sorted(LOADERS))
        raise KeyError(f"unknown tabular dataset '{name}'; choose one of: {known}")
    return LOADERS[name](cfg, data_dir)
