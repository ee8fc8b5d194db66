"""Bytes and time per round of PISA's distributed mode (one rank = one worker) against DDP.

Launches ``--worlds`` (default 2 and 4) gloo processes on this machine (``torch.multiprocessing``,
one torch thread each) and trains the same MLP (``--width`` 256, ``--blocks`` 4 residual blocks
of two matrices, 2,121,482 parameters, 8.5 MB in float32) on random data, one batch per rank and
round, with:

* ``ddp_adamw_fused``: ``DistributedDataParallel`` + ``torch.optim.AdamW(fused=True)``;
  ``ddp_adamw_fused_bf16``: the same with DDP's ``bf16_compress_hook`` (gradients all-reduced in
  bfloat16; registered under another name, as DDP refuses it by name without NCCL);
  ``ddp_muon``: DDP + ``torch.optim.Muon`` on the hidden matrices and fused AdamW on the rest
  (:func:`pisa.hybrid`, not distributed: DDP all-reduces the gradients), the time baseline of
  ``hybrid_nsisa`` (``time_ratio_vs_ddp_muon``), which also runs Newton-Schulz every round;
* ``pisa`` (identity preconditioner), ``sisa``, ``sisa_fused`` (``fused=True``; compiles in the
  warm-up rounds), ``sisa_bf16`` (``comm_dtype=torch.bfloat16``), ``sisa_one_bucket``
  (``bucket_mb=None``: one all-reduce after the whole step, no overlap) and ``hybrid_nsisa``
  (:func:`pisa.hybrid_nsisa`: NSISA on the hidden matrices, fused AdamW on the head and the
  vectors, whose gradients are all-reduced in the same round; Newton-Schulz in float32) and
  ``hybrid_nsisa_bf16`` (the same with Newton-Schulz in bfloat16, as ``torch.optim.Muon`` runs
  it: the like-for-like row against ``ddp_muon``), each in distributed mode (every
  ``step()`` a round, its consensus all-reduced in persistent buckets of ``--bucket-mb`` MiB,
  default 2 so that this 8.5 MB model has several, as the library's 25 MiB gives a 100M-parameter
  model; each bucket started during the step).

Bytes: ``torch.distributed.all_reduce`` is wrapped in every process and counts the payload
(``numel * element_size``) of every call during the measured rounds: PISA's buckets, and DDP's,
whose buckets go through Python because the stock ``allreduce_hook`` (the same communication as
DDP's built-in reducer) or ``bf16_compress_hook`` is registered with the public
``register_comm_hook``. (A ring all-reduce sends ``2 (m - 1) / m`` times the payload per rank;
the same factor for every row.) Time: wall time of a round (``zero_grad``, forward, backward,
``step``; ``step_ms`` the ``step()`` alone, for DDP without its all-reduce, which runs during
backward) after a barrier, the slowest rank's per round, the median over ``--rounds`` after
``--warmup``. The optimizers' rounds are interleaved (round ``r`` of each in a shuffled order) so
that machine noise hits them alike.

Every optimizer starts from the same weights (seed 0) and sees the same batches, so
``rel_err_vs_fp`` of ``sisa_bf16`` is ``||w_bf16 - w_sisa|| / ||w_sisa - w_0||`` after the run.

Usage::

    python scripts/bench_distributed.py --worlds 2,4 --rounds 10 --warmup 2
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pisa  # noqa: E402

OPTIMIZERS = ("ddp_adamw_fused", "ddp_adamw_fused_bf16", "ddp_muon", "pisa", "sisa",
              "sisa_fused", "sisa_bf16", "sisa_one_bucket", "hybrid_nsisa", "hybrid_nsisa_bf16")
#: the DDP row each optimizer is compared with (same communicated dtype)
BASELINE = {"sisa_bf16": "ddp_adamw_fused_bf16", "ddp_adamw_fused_bf16": "ddp_adamw_fused_bf16"}
IN_DIM, OUT_DIM, BATCH = 64, 10, 64


class MLP(nn.Module):
    """``inp``, ``blocks`` residual blocks ``x + fc2(gelu(fc1(x)))`` of width ``width`` (hidden
    ``4 width``), a ``head``: the matrices go to NSISA, the head and vectors to AdamW."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_DIM, width)
        self.fc1 = nn.ModuleList(nn.Linear(width, 4 * width) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(4 * width, width) for _ in range(blocks))
        self.head = nn.Linear(width, OUT_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for fc1, fc2 in zip(self.fc1, self.fc2):
            x = x + fc2(nn.functional.gelu(fc1(x)))
        return self.head(x)


class Counter:
    """Counts the payload bytes and calls of ``dist.all_reduce`` while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.bytes = 0
        self.calls = 0
        self._orig = dist.all_reduce

    def install(self) -> None:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counted


def bf16_hook(state, bucket):  # type: ignore[no-untyped-def]  # (DDP checks annotations)
    """DDP's ``bf16_compress_hook`` under another name: DDP refuses that name without NCCL,
    but gloo reduces bfloat16 too."""
    return default_hooks.bf16_compress_hook(state, bucket)


def build(
    name: str, model: nn.Module, bucket_mb: float | None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The module to call and the optimizer of ``name`` (``model`` holds rank 0's weights)."""
    if name.startswith("ddp"):
        ddp = nn.parallel.DistributedDataParallel(model)
        hook = bf16_hook if name.endswith("bf16") else default_hooks.allreduce_hook
        ddp.register_comm_hook(None, hook)
        if name == "ddp_muon":
            return ddp, pisa.hybrid(model, lambda ps: torch.optim.Muon(ps, lr=0.02),
                                    require_2d=True, distributed=False,
                                    companion_kwargs={"lr": 1e-3, "fused": True})
        return ddp, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if name == "pisa":
        return model, pisa.PISA(model.parameters(), lr=1e-3, sigma=10.0, bucket_mb=bucket_mb)
    if name.startswith("sisa"):
        kwargs: dict[str, Any] = {"bucket_mb": None if name == "sisa_one_bucket" else bucket_mb}
        if name == "sisa_bf16":
            kwargs["comm_dtype"] = torch.bfloat16
        if name == "sisa_fused":
            kwargs["fused"] = True
        return model, pisa.SISA(model.parameters(), lr=1e-3, sigma=10.0, **kwargs)
    if name.startswith("hybrid_nsisa"):
        ns_dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        return model, pisa.hybrid_nsisa(model, lr=1e-3, ns_dtype=ns_dtype,
                                        bucket_mb=bucket_mb,
                                        companion_kwargs={"lr": 1e-3, "fused": True})
    raise ValueError(name)


def _bucket_mb(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def batch(rank: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * r + rank)
    return torch.randn(BATCH, IN_DIM, generator=gen), torch.randint(0, OUT_DIM, (BATCH,),
                                                                   generator=gen)


def measure(rank: int, args: argparse.Namespace, counter: Counter) -> dict[str, dict[str, Any]]:
    """Every optimizer of ``args.optimizers`` on its own copy of the model (seed 0), their
    rounds interleaved: round ``r`` of each, in an order shuffled per round (the same on every
    rank), so machine noise hits them alike."""
    runs: dict[str, dict[str, Any]] = {}
    for name in args.optimizers:
        torch.manual_seed(0)
        model = MLP(args.width, args.blocks)
        net, opt = build(name, model, args.bucket_mb)
        runs[name] = {"model": model, "net": net, "opt": opt, "times": [], "step_times": [],
                      "bytes": 0, "calls": 0,
                      "w0": torch.cat([p.detach().flatten() for p in model.parameters()])}
    loss_fn = nn.CrossEntropyLoss()
    for r in range(args.warmup + args.rounds):
        x, y = batch(rank, r)
        order = list(args.optimizers)
        random.Random(r).shuffle(order)
        for name in order:
            run = runs[name]
            counter.bytes = counter.calls = 0
            dist.barrier()
            counter.on = r >= args.warmup
            start = time.perf_counter()
            run["opt"].zero_grad(set_to_none=True)
            loss = loss_fn(run["net"](x), y)
            loss.backward()
            before_step = time.perf_counter()
            run["opt"].step()
            end = time.perf_counter()
            counter.on = False
            run["loss"] = float(loss.detach())
            if r >= args.warmup:
                run["times"].append(end - start)
                run["step_times"].append(end - before_step)
                run["bytes"] += counter.bytes
                run["calls"] += counter.calls
    out = {}
    for name, run in runs.items():
        model = run.pop("model")
        del run["net"], run["opt"]
        run["bytes"] /= args.rounds  # per round (the same every round)
        run["calls"] /= args.rounds
        run["params"] = sum(p.numel() for p in model.parameters())
        run["w"] = torch.cat([p.detach().flatten() for p in model.parameters()])
        out[name] = run
    return out


def _worker(rank: int, world: int, init: str, out: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    counter = Counter()
    counter.install()
    try:
        results = measure(rank, args, counter)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One launch of ``world`` processes; one row per optimizer."""
    with tempfile.TemporaryDirectory() as tmp:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), tmp, args),
                           nprocs=world, join=True, start_method=method)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True)
                 for r in range(world)]
    rows: list[dict[str, Any]] = []
    for name in args.optimizers:
        per_rank = [res[name] for res in ranks]
        slowest = [max(ts) for ts in zip(*(res["times"] for res in per_rank))]
        slowest_step = [max(ts) for ts in zip(*(res["step_times"] for res in per_rank))]
        rows.append({
            "world": world,
            "optimizer": name,
            "params": per_rank[0]["params"],
            "rounds": args.rounds,
            "bytes_per_round": per_rank[0]["bytes"],
            "calls_per_round": per_rank[0]["calls"],
            "round_ms": 1e3 * statistics.median(slowest),
            "step_ms": 1e3 * statistics.median(slowest_step),
            "final_loss": per_rank[0]["loss"],
            "_w0": per_rank[0]["w0"],
            "_w": per_rank[0]["w"],
        })
    by_name = {row["optimizer"]: row for row in rows}
    adamw, muon = by_name.get("ddp_adamw_fused"), by_name.get("ddp_muon")
    for row in rows:
        base = by_name.get(BASELINE.get(row["optimizer"], "ddp_adamw_fused"))
        row["bytes_ratio_vs_ddp"] = row["bytes_per_round"] / base["bytes_per_round"] if base else ""
        row["time_ratio_vs_ddp_adamw_fused"] = (
            row["round_ms"] / adamw["round_ms"] if adamw else "")
        row["time_ratio_vs_ddp_muon"] = row["round_ms"] / muon["round_ms"] if muon else ""
        row["rel_err_vs_fp"] = ""
    exact, rounded = by_name.get("sisa"), by_name.get("sisa_bf16")
    if exact and rounded:
        moved = (exact["_w"] - exact["_w0"]).norm()
        rounded["rel_err_vs_fp"] = float((rounded["_w"] - exact["_w"]).norm() / moved)
    for row in rows:
        del row["_w0"], row["_w"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--bucket-mb", type=_bucket_mb, default=2.0,
                        help="PISA's bucket_mb, or 'none': one bucket (sisa_one_bucket: none)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "distributed.csv"))
    args = parser.parse_args(argv)
    args.optimizers = [name for name in args.optimizers.split(",") if name]
    unknown = set(args.optimizers) - set(OPTIMIZERS)
    if unknown:
        parser.error(f"unknown optimizers {sorted(unknown)}; choose from {OPTIMIZERS}")
    rows: list[dict[str, Any]] = []
    for world in (int(w) for w in args.worlds.split(",")):
        begin = time.perf_counter()
        rows += run_world(world, args)
        print(f"world {world}: {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    fmt: dict[str, Callable[[Any], str]] = {
        "bytes_per_round": lambda v: f"{v:,.0f}",
        "round_ms": lambda v: f"{v:.1f}",
        "step_ms": lambda v: f"{v:.1f}",
        "final_loss": lambda v: f"{v:.4f}",
    }
    cols = ["world", "optimizer", "bytes_per_round", "calls_per_round", "bytes_ratio_vs_ddp",
            "round_ms", "step_ms", "time_ratio_vs_ddp_adamw_fused", "time_ratio_vs_ddp_muon",
            "rel_err_vs_fp"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = []
        for c in cols:
            v = row[c]
            cells.append(fmt[c](v) if c in fmt else (f"{v:.6g}" if isinstance(v, float) else
                                                     str(v)))
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
