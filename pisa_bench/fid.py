r"""Fréchet distances between image sets, on Inception or on a suite-trained classifier's features.

The Fréchet distance between the Gaussians fitted to two feature sets (Heusel et al. 2017)::

    FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

with means ``mu`` and covariances ``S`` (unbiased, ``n - 1``), the matrix square root by
``scipy.linalg.sqrtm`` in float64, as pytorch-fid computes it (a small ridge ``eps * I`` is
added to both covariances only when the product is singular; an imaginary part beyond 1e-3
on the diagonal is an error). FD is biased upwards for small sample sizes: compare values
computed with the same ``n``. Non-finite statistics (a diverged generator) give ``nan``: the
distance is undefined, and the trainer's divergence check turns it into a ``diverged`` run.

Two feature extractors, never confused (the metric is named ``fid_inception`` or
``fid_classifier`` by the extractor in use):

- ``inception``: the standard FID network, loaded from a local TorchScript file (the one
  StyleGAN2-ADA / clean-fid use, ``inception-2015-12-05.pt``: uint8 images (N, 3, H, W) in,
  2048-d pool features out with ``return_features=True``). The network is not re-implemented
  here and nothing is downloaded: the file's path is configuration.
- ``classifier``: the penultimate (``fc``) features of a small CNN that the suite trains on the
  same dataset, once, and caches with its training seed, configuration and test accuracy. Its
  values measure the same kind of distance but are not comparable with published FIDs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from pisa_bench.models.small import SmallCNN
from pisa_bench.rundir import atomic_save_torch

log = logging.getLogger("pisa-bench")

EXTRACTORS = ("auto", "inception", "classifier")


# --- the distance -------------------------------------------------------------------------
def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` (N, D), in float64."""
    f = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else features
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature matrix, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))`` (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(
            f"shape mismatch: means {mu1.shape} / {mu2.shape}, covariances {s1.shape} / {s2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        return math.nan  # undefined (see the module docstring)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"sqrt(S1 S2) has an imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# --- feature extractors --------------------------------------------------------------------
class FeatureExtractor:
    """Images (N, C, H, W) in [-1, 1] -> features (N, D); ``kind`` names the metric suffix."""

    kind: str = ""
    description: str = ""

    def __init__(self, net: nn.Module, device: torch.device, batch_size: int) -> None:
        self.net = net.to(device).eval()
        self.device = device
        self.batch_size = int(batch_size)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = [
            self._features(images[i : i + self.batch_size].to(self.device).float())
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out).double().cpu()


class InceptionExtractor(FeatureExtractor):
    """2048-d pool features of the standard FID Inception network from a local TorchScript file."""

    kind = "inception"

    def __init__(self, path: str | Path, device: torch.device, batch_size: int) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(inception_missing_message(path))
        net = torch.jit.load(str(path), map_location=device)
        super().__init__(net, device, batch_size)
        self.description = f"Inception FID network (TorchScript {path.name})"

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the network resizes itself
        return self.net(u8, return_features=True)


def inception_missing_message(path: str | Path | None) -> str:
    where = f"at {path}" if path else "(no path configured)"
    return (
        f"the Inception FID network is not available {where}. The standard FID needs the "
        "TorchScript Inception file used by StyleGAN2-ADA and clean-fid (inception-2015-12-05.pt, "
        "uint8 images in, 2048-d features out with return_features=True); put it on this machine "
        "and set task.fid.inception_path (or the PISA_FID_INCEPTION environment variable). "
        "Without it use task.fid.extractor=classifier (or auto), which reports fid_classifier, "
        "an FID on the features of a classifier trained by the suite: not the Inception FID."
    )


class ClassifierExtractor(FeatureExtractor):
    """Penultimate features of the suite-trained :class:`SmallCNN` (its ``fc`` block)."""

    kind = "classifier"

    def __init__(
        self, net: SmallCNN, device: torch.device, batch_size: int, description: str
    ) -> None:
        super().__init__(net, device, batch_size)
        self.description = description

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        assert isinstance(net, SmallCNN)
        return net.fc(net.features(x))


# --- the suite's feature classifier --------------------------------------------------------
def classifier_key(dataset: str, spec: Mapping[str, Any]) -> str:
    """Cache file stem: dataset name + hash of everything that determines the classifier."""
    blob = json.dumps({"dataset": dataset, **spec}, sort_keys=True, default=str)
    return f"{dataset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def train_classifier(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    spec: Mapping[str, Any],
    to_input: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[SmallCNN, float]:
    """Train :class:`SmallCNN` with Adam on ``to_input(train_x)``; return it and its test accuracy.

    ``spec``: ``model`` (SmallCNN kwargs), ``epochs``, ``batch_size``, ``lr``, ``seed``,
    ``n_train`` (null: all). Every random choice comes from ``seed`` (the global RNG is left as is).
    """
    seed = int(spec["seed"])
    g = torch.Generator().manual_seed(seed)
    n = len(train_x) if spec.get("n_train") is None else min(int(spec["n_train"]), len(train_x))
    idx = torch.randperm(len(train_x), generator=g)[:n]
    x_all, y_all = train_x[idx], train_y[idx]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallCNN(
            in_channels=train_x.shape[1],
            num_classes=num_classes,
            image_size=int(to_input(train_x[:1]).shape[-1]),
            **dict(spec["model"]),
        )
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=float(spec["lr"]))
    bs = min(int(spec["batch_size"]), n)
    net.train()
    for _ in range(int(spec["epochs"])):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            j = perm[i : i + bs]
            x, y = to_input(x_all[j]).to(device), y_all[j].to(device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_x), 1024):
            x, y = to_input(test_x[i : i + 1024]).to(device), test_y[i : i + 1024].to(device)
            correct += int((net(x).argmax(1) == y).sum())
    return net.cpu(), 100.0 * correct / max(len(test_x), 1)


def load_or_train_classifier(
    cache_dir: Path,
    dataset: str,
    spec: Mapping[str, Any],
    data: Any,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[SmallCNN, dict[str, Any]]:
    """The cached classifier of ``(dataset, spec)``, trained (and cached atomically) if absent.

    ``data``: an :class:`~pisa_bench.data.images.ImageData`. Returns the network and its record
    (dataset, spec incl. seed, test accuracy, cache path).
    """
    spec = dict(spec)
    path = Path(cache_dir) / f"{classifier_key(dataset, spec)}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        with torch.random.fork_rng(devices=[]):  # leave the run's RNG as a fresh training would
            net = SmallCNN(
                in_channels=int(blob["in_channels"]),
                num_classes=int(blob["num_classes"]),
                image_size=int(blob["image_size"]),
                **dict(blob["spec"]["model"]),
            )
        net.load_state_dict(blob["state_dict"])
        info = {k: blob[k] for k in ("dataset", "spec", "test_accuracy")}
        return net.eval(), {**info, "path": str(path), "cached": True}
    log.info("training the FID feature classifier for %s (cached at %s)", dataset, path)
    net, acc = train_classifier(
        data.train_x,
        data.train_y,
        data.test_x,
        data.test_y,
        data.num_classes,
        spec,
        to_input,
        device,
    )
    blob = {
        "state_dict": net.state_dict(),
        "dataset": dataset,
        "spec": spec,
        "test_accuracy": acc,
        "in_channels": int(data.train_x.shape[1]),
        "num_classes": int(data.num_classes),
        "image_size": int(to_input(data.train_x[:1]).shape[-1]),
        "torch": torch.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_torch(path, blob)
    info = {"dataset": dataset, "spec": spec, "test_accuracy": acc}
    return net.eval(), {**info, "path": str(path), "cached": False}


def resolve_extractor(kind: str, inception_path: str | None) -> str:
    """``auto`` -> ``inception`` when its file is present, else ``classifier``."""
    if kind not in EXTRACTORS:
        raise ValueError(f"task.fid.extractor must be one of {', '.join(EXTRACTORS)}, not '{kind}'")
    if kind != "auto":
        return kind
    return (
        "inception"
        if inception_path and Path(inception_path).expanduser().is_file()
        else "classifier"
    )
