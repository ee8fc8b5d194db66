"""Cache-sized pieces of a worker's step on CPU.

The elementwise update reads and writes several parameter-sized tensors (w, g, pi, the
preconditioner's state); on CPU it runs fastest when each pass touches a piece that fits the
cache, so :meth:`pisa.PISA._local_step` walks aligned tensor lists in pieces of about
``chunk_size`` elements (``"auto"``: 2^18 per two threads on CPU, one piece on accelerators).
The pieces are views: updating them updates the tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def resolve_chunk_size(setting: int | str | None, device: torch.device) -> int | None:
    """Elements per piece for ``setting`` (the optimizer's ``chunk_size``) on ``device``;
    None: one piece."""
    if setting == "auto":
        if device.type != "cpu":
            return None
        return (1 << 18) * max(1, torch.get_num_threads() // 2)
    if setting is not None and not isinstance(setting, int):
        raise ValueError(f"chunk_size must be an int, None or 'auto', got {setting!r}")
    return setting


def chunks(lists: list[list[Tensor]], size: int | None) -> Iterator[list[list[Tensor]]]:
    """Cut aligned tensor lists (same shapes position by position) into pieces of about
    ``size`` elements: small tensors are grouped, large contiguous ones split into flat views.
    ``size`` None or <= 0: one piece."""
    n = len(lists[0])
    if not size or size <= 0 or sum(t.numel() for t in lists[0]) <= size:
        yield lists
        return
    piece: list[list[Tensor]] = [[] for _ in lists]
    filled = 0
    for j in range(n):
        numel = lists[0][j].numel()
        splittable = numel > size and all(lst[j].is_contiguous() for lst in lists)
        if not splittable:
            if filled and filled + numel > size:
                yield piece
                piece, filled = [[] for _ in lists], 0
            for out, lst in zip(piece, lists):
                out.append(lst[j])
            filled += numel
            continue
        flats = [lst[j].view(-1) for lst in lists]
        for a in range(0, numel, size):
            b = min(a + size, numel)
            if filled and filled + (b - a) > size:
                yield piece
                piece, filled = [[] for _ in lists], 0
            for out, flat in zip(piece, flats):
                out.append(flat[a:b])
            filled += b - a
    if filled or any(piece):
        yield piece
