"""Checkpoint files of one rank: the newest and the one before it, and which of them loads.

``ckpt/rank{r}.pt`` is the newest, ``ckpt/rank{r}.prev.pt`` the one before. Saving writes the new
file atomically beside them, then moves the newest to ``.prev`` and the new one into place; a
crash at any moment leaves at least one complete checkpoint (or none before the first save).
Loading tries the newest first and falls back to the older one when the newest is unreadable
(truncated, corrupt, deleted), saying so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pisa_bench.rundir import atomic_save_torch, fault_point, fsync_dir, remove_temporaries


@dataclass
class Loaded:
    """A checkpoint that loaded: its content and file."""

    state: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return int(self.state["trainer"]["step"])


class CheckpointStore:
    """The checkpoints of rank ``rank`` under ``<run_dir>/ckpt``."""

    def __init__(self, run_dir: Path, rank: int = 0) -> None:
        self.dir = Path(run_dir) / "ckpt"
        self.newest = self.dir / f"rank{rank}.pt"
        self.previous = self.dir / f"rank{rank}.prev.pt"

    def save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        staged = self.dir / f".{self.newest.name}.staged"
        atomic_save_torch(staged, state)
        if self.newest.exists():
            os.replace(self.newest, self.previous)
        fault_point()  # a crash here leaves .prev and the staged file: clean() completes it
        os.replace(staged, self.newest)
        fsync_dir(self.dir)

    def clean(self) -> None:
        """Remove what killed writers left (temporary and staged files)."""
        if not self.dir.is_dir():
            return
        remove_temporaries(self.dir)
        staged = self.dir / f".{self.newest.name}.staged"
        if staged.exists():  # complete (renamed into place after its fsync): finish that save
            if self.newest.exists():
                os.replace(self.newest, self.previous)
            os.replace(staged, self.newest)

    def candidates(self) -> list[Path]:
        return [p for p in (self.newest, self.previous) if p.exists()]

    def load(
        self, map_location: Any = "cpu", max_step: int | None = None
    ) -> tuple[Loaded | None, list[str]]:
        """The newest checkpoint that loads (and whose step is <= ``max_step``; None: none
        does), and remarks on the files that did not load."""
        notes: list[str] = []
        for path in self.candidates():
            try:
                state = torch.load(path, map_location=map_location, weights_only=False)
                step = int(state["trainer"]["step"])
            except Exception as e:
                notes.append(f"checkpoint {path} is unreadable ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''}); skipped")
                continue
            if max_step is not None and step > max_step:
                continue
            return Loaded(state, path), notes
        return None, notes
