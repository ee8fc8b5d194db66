"""Where a run executes: device, precision, processes, seeds, RNG state and resource readings."""

from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pisa_bench.baselines.registry import BASELINE, CONSENSUS


@dataclass(frozen=True)
class Dist:
    """Process layout: ``world == 1`` for a single process; set by torchrun otherwise."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_spec != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local)


def pick_device(spec: str, d: Dist) -> torch.device:
    """``auto`` picks CUDA (this process's local GPU) when present, else CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda", d.local_rank)
    return torch.device(spec)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPU when ``precision`` is ``auto`` or ``bf16``; full precision otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, not '{precision}'")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor storage inside a nested dict / list / tuple (views of one
    buffer count once, for the whole buffer)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state (duals, moments, buffers), nested optimizers included."""
    return tensor_bytes(opt.state_dict())


def family(opt: torch.optim.Optimizer) -> str:
    """``consensus`` for a PISA-family optimizer (a :class:`pisa.Hybrid` counts by its main
    optimizer: NSISA + AdamW is one, Muon + AdamW is not, though every Hybrid drives its own
    rounds and communication), else ``baseline``: the ``family`` of ``summary.json``."""
    from pisa import is_consensus

    return CONSENSUS if is_consensus(getattr(opt, "main", opt)) else BASELINE


def ns_dtypes(opt: torch.optim.Optimizer) -> str | None:
    """The dtype(s) an optimizer's Newton-Schulz iterations run in, as resolved for the devices
    and dtypes of its matrices (``ns_dtype: null`` in a config means "the device's default",
    :func:`pisa.newton_schulz.default_ns_dtype`), comma-joined; None without Newton-Schulz.
    The identity of a run leaves the device out, so this is what records the rounding."""
    from pisa.newton_schulz import default_ns_dtype

    names = {
        str(group["ns_dtype"] or default_ns_dtype(p.device, p.dtype)).removeprefix("torch.")
        for group in opt.param_groups
        if "ns_dtype" in group
        for p in group["params"]
        if p.ndim >= 2 and p.numel() > 0
    }
    return ",".join(sorted(names)) or None


def workers_per_round(opt: Any) -> int:
    """Steps per optimizer round in one process: ``opt.n_workers`` for a consensus (PISA-family)
    optimizer, else 1 (under torchrun a rank is one worker: the trainer uses 1)."""
    from pisa import is_consensus

    return int(opt.n_workers) if is_consensus(opt) else 1


def round_telemetry(opt: Any, prefix: str = "admm_") -> dict[str, float]:
    """The consensus telemetry of a round just closed (``{}`` for other optimizers or mid-round),
    keys prefixed for ``metrics.csv``."""
    from pisa import is_consensus

    if not is_consensus(opt) or not opt.round_done:
        return {}
    return {f"{prefix}{k}": float(v) for k, v in opt.telemetry().items()}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of all data randomness of one epoch (shuffling, augmentation, samples), so
    that a resumed epoch draws exactly what the uninterrupted one did."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars over torchrun ranks in float64 (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
