r"""Split a labelled training set among federated clients: iid, label skew, quantity skew.

A scheme is named by one short string (config ``task.partition``; easy to sweep):

=============  ==========================================================================
``iid``        a uniformly random split into ``m`` (near-)equal parts
``label<k>``   every client holds exactly ``k`` labels (``label1``, ``label2``): client ``i``
               takes label ``i mod K`` and ``k - 1`` other labels drawn at random; every
               label's samples are split evenly among the clients that hold it
               (NIID-Bench's ``noniid-#label<k>``, the PISA paper's "Label1")
``dir<beta>``  Dirichlet label skew (``dir0.5``): for each label ``c``,
               ``p_c ~ Dir(beta * 1_m)`` gives each client's share of label ``c``'s samples;
               clients already holding ``>= N/m`` samples get no more; redrawn until every
               client has ``min_size`` samples (NIID-Bench's ``noniid-labeldir``)
``qty<beta>``  quantity skew (``qty0.5``): client sizes ``N * q``, ``q ~ Dir(beta * 1_m)``,
               redrawn until the smallest has ``min_size`` samples, labels iid
               (NIID-Bench's ``iid-diff-quantity``)
=============  ==========================================================================

Every random choice comes from one ``torch.Generator`` seeded with ``seed``: the same
``(labels, m, scheme, seed)`` always gives the same partition. Every scheme assigns every sample
to exactly one client; ``label<k>`` raises ``ValueError`` when ``m * k`` slots cannot cover all
``K`` labels (fewer clients than labels with ``k = 1``), rather than silently dropping samples.
Small ``beta`` means more skew; large ``beta`` approaches iid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Scheme",
    "dirichlet",
    "label_counts",
    "parse_scheme",
    "partition",
    "sample_gamma",
]

_PATTERN = re.compile(r"^(iid|label(\d+)|dir([0-9.eE+-]+)|qty([0-9.eE+-]+))$")


@dataclass(frozen=True)
class Scheme:
    """A parsed scheme: ``kind`` in ``iid | label | dirichlet | quantity``, ``k``, ``beta``."""

    kind: str
    k: int = 0
    beta: float = 0.0

    def __str__(self) -> str:
        if self.kind == "label":
            return f"label{self.k}"
        if self.kind in ("dirichlet", "quantity"):
            return f"{'dir' if self.kind == 'dirichlet' else 'qty'}{self.beta:g}"
        return "iid"


def parse_scheme(name: str) -> Scheme:
    """``iid | label<k> | dir<beta> | qty<beta>`` -> :class:`Scheme` (else ``ValueError``)."""
    m = _PATTERN.match(str(name).strip())
    if m is None:
        raise ValueError(
            f"unknown partition '{name}': use iid, label<k> (e.g. label1), dir<beta> (e.g. dir0.5) "
            "or qty<beta> (e.g. qty0.5)"
        )
    if m.group(2) is not None:
        k = int(m.group(2))
        if k < 1:
            raise ValueError(f"partition '{name}': k must be >= 1")
        return Scheme("label", k=k)
    for group, kind in ((3, "dirichlet"), (4, "quantity")):
        if m.group(group) is not None:
            try:
                beta = float(m.group(group))
            except ValueError:
                raise ValueError(f"partition '{name}': cannot read beta") from None
            if not (beta > 0 and math.isfinite(beta)):
                raise ValueError(f"partition '{name}': beta must be > 0")
            return Scheme(kind, beta=beta)
    return Scheme("iid")


# --- Dirichlet sampling on a torch.Generator ------------------------------------------------
def sample_gamma(alpha: Tensor, g: torch.Generator) -> Tensor:
    """Gamma(alpha, 1) samples (float64), Marsaglia-Tsang, with ``alpha < 1`` boosted by
    ``Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha)``; all draws from ``g``."""
    alpha = alpha.to(torch.float64)
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while bool(todo.any()):
        idx = todo.nonzero().squeeze(1)
        x = torch.randn(len(idx), generator=g, dtype=torch.float64)
        u = torch.rand(len(idx), generator=g, dtype=torch.float64)
        v = (1 + c[idx] * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x**2 + d[idx] - d[idx] * v
                        + d[idx] * torch.log(v.clamp_min(1e-300)))
        out[idx[ok]] = d[idx[ok]] * v[ok]
        todo[idx[ok]] = False
    if bool(boost.any()):
        u = torch.rand(int(boost.sum()), generator=g, dtype=torch.float64)
        out[boost] = out[boost] * u ** (1.0 / alpha[boost])
    return out


def dirichlet(beta: float, m: int, g: torch.Generator) -> Tensor:
    """One draw of ``Dir(beta * 1_m)`` (float64, sums to 1)."""
    x = sample_gamma(torch.full((m,), float(beta)), g)
    total = x.sum()
    if not total > 0:  # every gamma underflowed (tiny beta): put all mass on one random client
        x = torch.zeros(m, dtype=torch.float64)
        x[int(torch.randint(m, (1,), generator=g))] = 1.0
        return x
    return x / total


# --- the schemes ----------------------------------------------------------------------------
def _cut(idx: Tensor, props: Tensor) -> list[Tensor]:
    """Split ``idx`` at the cumulative proportions ``props`` (NIID-Bench's ``np.split`` rule)."""
    bounds = (torch.cumsum(props, 0) * len(idx)).floor().long()[:-1].clamp(0, len(idx))
    sizes = torch.diff(bounds, prepend=torch.zeros(1, dtype=torch.long),
                       append=torch.tensor([len(idx)]))
    return list(torch.split(idx, sizes.tolist()))


def _iid(n: int, m: int, g: torch.Generator) -> list[Tensor]:
    return list(torch.tensor_split(torch.randperm(n, generator=g), m))


def _labels(y: Tensor, m: int, k: int, n_classes: int, g: torch.Generator) -> list[Tensor]:
    k = min(k, n_classes)
    held: list[list[int]] = []
    for i in range(m):
        mine = [i % n_classes]
        while len(mine) < k:
            c = int(torch.randint(n_classes, (1,), generator=g))
            if c not in mine:
                mine.append(c)
        held.append(mine)
    missing = sorted(set(range(n_classes)) - {c for h in held for c in h})
    if missing:
        raise ValueError(
            f"label{k} with {m} clients leaves labels {missing} of {n_classes} to no client "
            f"(needs m * k >= K slots with client i taking label i mod K); use more clients or k"
        )
    parts: list[list[Tensor]] = [[] for _ in range(m)]
    for c in range(n_classes):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        owners = [i for i in range(m) if c in held[i]]
        for owner, chunk in zip(owners, torch.tensor_split(idx, len(owners))):
            parts[owner].append(chunk)
    return [torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in parts]


def _dirichlet_labels(
    y: Tensor, m: int, beta: float, n_classes: int, min_size: int, g: torch.Generator,
    max_tries: int,
) -> list[Tensor]:
    n = len(y)
    for _ in range(max_tries):
        parts: list[list[Tensor]] = [[] for _ in range(m)]
        sizes = torch.zeros(m, dtype=torch.long)
        for c in range(n_classes):
            idx = (y == c).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=g)]
            p = dirichlet(beta, m, g)
            p = p * (sizes < n / m).to(p.dtype)  # balance: full clients take no more
            p = p / p.sum() if p.sum() > 0 else torch.full((m,), 1.0 / m, dtype=torch.float64)
            for i, chunk in enumerate(_cut(idx, p)):
                parts[i].append(chunk)
                sizes[i] += len(chunk)
        if int(sizes.min()) >= min_size:
            return [torch.cat(p) for p in parts]
    raise ValueError(
        f"dir{beta:g}: no partition with >= {min_size} samples per client in {max_tries} draws "
        f"({n} samples, {m} clients); lower task.partition_min_size or raise beta"
    )


def _quantity(n: int, m: int, beta: float, min_size: int, g: torch.Generator,
              max_tries: int) -> list[Tensor]:
    perm = torch.randperm(n, generator=g)
    for _ in range(max_tries):
        p = dirichlet(beta, m, g)
        if float((p * n).min()) >= min_size:
            return _cut(perm, p)
    raise ValueError(
        f"qty{beta:g}: no partition with >= {min_size} samples per client in {max_tries} draws "
        f"({n} samples, {m} clients); lower task.partition_min_size or raise beta"
    )


def partition(
    labels: Tensor | Sequence[int],
    n_clients: int,
    scheme: str | Scheme,
    seed: int,
    *,
    num_classes: int | None = None,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[Tensor]:
    """Client index sets (sorted int64 tensors) that together hold every sample exactly once.

    Args:
        labels: class label of every training sample (``0..K-1``).
        n_clients: ``m >= 1``.
        scheme: a scheme string (module docstring) or :class:`Scheme`.
        seed: seeds the one ``torch.Generator`` all draws come from.
        num_classes: ``K`` (default ``max(labels) + 1``).
        min_size: the smallest client size the Dirichlet schemes accept (NIID-Bench: 10);
            lowered to ``N // m`` when the data is too small for it.
        max_tries: Dirichlet redraws before giving up.
    """
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    n, m = len(y), int(n_clients)
    if m < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n < m:
        raise ValueError(f"{n} samples cannot feed {m} clients")
    s = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    k_classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    g = torch.Generator().manual_seed(int(seed))
    floor = min(int(min_size), n // m)
    if s.kind == "iid":
        parts = _iid(n, m, g)
    elif s.kind == "label":
        parts = _labels(y, m, s.k, k_classes, g)
    elif s.kind == "dirichlet":
        parts = _dirichlet_labels(y, m, s.beta, k_classes, floor, g, max_tries)
    else:
        parts = _quantity(n, m, s.beta, floor, g, max_tries)
    return [p.sort().values for p in parts]


def label_counts(labels: Tensor, parts: Sequence[Tensor], num_classes: int) -> Tensor:
    """``(m, K)`` matrix of samples per client and label."""
    y = torch.as_tensor(labels, dtype=torch.long)
    return torch.stack([torch.bincount(y[p], minlength=num_classes) for p in parts])
