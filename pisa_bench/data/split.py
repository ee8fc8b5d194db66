"""The validation split: a fixed share of the *training* data held out for model selection.

``task.data.val_fraction`` (0 or null: no validation split) moves that share of the training
examples into a validation set, chosen by a permutation seeded with :data:`VAL_SPLIT_SEED`
(never the run's seed), so that every optimizer, trial and seed of a study is selected on the
same examples, and the test split is never seen before the final report.
"""

from __future__ import annotations

import torch

VAL_SPLIT_SEED = 20_240_601  # fixed: the same validation examples for every run


def validation_indices(n: int, fraction: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, val_idx)`` of ``n`` training examples; ``len(val_idx) = round(f * n)``.

    Raises ``ValueError`` unless ``0 <= fraction < 1`` and both parts are non-empty.
    """
    f = float(fraction or 0.0)
    if not 0.0 <= f < 1.0:
        raise ValueError(f"task.data.val_fraction must be in [0, 1), got {fraction}")
    n_val = round(f * n)
    if f > 0 and not 0 < n_val < n:
        raise ValueError(f"task.data.val_fraction={fraction} of {n} training examples leaves "
                         f"{n_val} for validation and {n - n_val} for training")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def carve_validation(
    x: torch.Tensor, y: torch.Tensor, fraction: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(train_x, train_y, val_x, val_y)``; the validation pair is ``None`` when fraction is 0."""
    if not fraction:
        return x, y, None, None
    tr, va = validation_indices(len(y), fraction)
    return x[tr], y[tr], x[va], y[va]


def tail_split(
    stream: torch.Tensor, fraction: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A token stream cut into ``(train, validation)``: the last ``round(f * n)`` tokens are the
    validation stream (contiguous, as text splits are; no shuffling of a language stream)."""
    if not fraction:
        return stream, None
    _, va = validation_indices(len(stream), fraction)  # validates fraction and sizes
    k = len(va)
    return stream[: len(stream) - k], stream[len(stream) - k :]
