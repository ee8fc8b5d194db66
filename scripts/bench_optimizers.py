"""Per-step time and state memory of SISA / NSISA / PISA against torch AdamW and torch Muon.

Parameter shapes (random gradients, fixed for the run) of:

* ``gpt2``: GPT-2 124M (wte 50257x768 tied with the head, wpe 1024x768, 12 blocks of
  c_attn 768x2304, attn c_proj 768x768, c_fc 768x3072, mlp c_proj 3072x768, LayerNorm vectors,
  biases; 124,439,808 parameters);
* ``vit``: ViT-B/16 at 224x224 for 1000 classes (patch conv 768x3x16x16, cls token, position
  embedding 197x768, 12 blocks of qkv 2304x768, proj 768x768, fc1 3072x768, fc2 768x3072,
  LayerNorm vectors, biases, head 1000x768; 86,567,656 parameters).

Optimizers (one worker, ``n_workers = 1``; library defaults otherwise):

* ``adamw_foreach`` / ``adamw_fused``: ``torch.optim.AdamW(foreach=True)`` / ``(fused=True)``;
* ``pisa`` (identity preconditioner), ``sisa``, ``sisa_no_telemetry`` (``track_residuals=False``)
  on every parameter; ``pisa_fused``, ``sisa_fused``, ``sisa_fused_no_telemetry``: the same with
  ``fused=True`` (the compiled elementwise step: on CPU the C++ kernel, :mod:`pisa.cpu_kernel`,
  one call per step; on CUDA inductor's, :mod:`pisa.fused`: one compiled call per pack of up to
  32 tensors); ``sisa_fused_inductor``: ``sisa_fused`` with inductor's kernels on CPU too
  (``fused_cpu_backend = "inductor"``); ``sisa_fused_per_tensor``: that with one compiled call per
  tensor (``fused_max_pack = 1``);
* ``muon``: ``torch.optim.Muon`` on the hidden 2-D matrices + ``AdamW(foreach=True)`` on the rest
  (embeddings, head, vectors, the patch convolution), routed by
  :func:`pisa.split_hidden_matrices` and wrapped in :class:`pisa.Hybrid`, as the project's Muon
  baseline;
* ``nsisa_fused`` / ``nsisa_bf16_fused``: ``nsisa_fp32`` / ``nsisa_bf16`` with ``fused=True``
  (the update after the direction and the vectors' step compiled; the Newton-Schulz iteration
  as before);
* ``nsisa``: :func:`pisa.hybrid_nsisa` with the same routing (Newton-Schulz in the default
  dtype: bfloat16 on accelerators, float32 on CPU); ``nsisa_bf16`` / ``nsisa_fp32``: the
  iteration in bfloat16 (the dtype torch Muon always uses) / float32. The default list measures
  the two explicit dtypes only (one of them is the device's default, so ``nsisa`` would time it
  twice). (The committed CPU CSV
  ran on a CPU where bfloat16 was faster at 768 wide: its ``nsisa`` row is float32, its
  ``nsisa_bf16`` row bfloat16; on an AVX2 AMD EPYC bfloat16 is 30-60x slower instead.)

Every optimizer updates the same parameter tensors (values drift; timing does not depend on
them). Steps are interleaved (one step of each optimizer in turn, in a shuffled order per cycle)
so that machine noise hits all of them alike; the median over ``--steps`` cycles after
``--warmup`` is reported. ``first_step_s`` is the wall time of each optimizer's first step, which
for the ``*_fused`` rows includes compiling its kernels (inductor caches them on disk, so a second
run of the script compiles less); it is not part of the medians. ``state_bytes`` counts distinct
tensors in ``optimizer.state_dict()``; ``state_copies = state_bytes / parameter bytes``.
``telemetry_ms`` (PISA family) is the median time of ``opt.telemetry()`` read right after a step,
outside the step's timing: in virtual mode the dual norm is computed there, from the duals, and
not in the step (the trainer reads it every ``train.log_every`` rounds, 10 by default, so a
training step costs ``step + telemetry / log_every`` on average).

Usage::

    python scripts/bench_optimizers.py --device cpu --steps 50 --warmup 5 --shapes gpt2,vit
"""

from __future__ import annotations

import argparse
import csv
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pisa
from pisa_bench.baselines.registry import CONSENSUS
from pisa_bench.runtime import family, tensor_bytes

Shapes = list[tuple[str, tuple[int, ...]]]


def gpt2_124m() -> Shapes:
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: Shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        b = f"h.{i}."
        shapes += [
            (b + "ln_1.weight", (d,)),
            (b + "ln_1.bias", (d,)),
            (b + "attn.c_attn.weight", (d, 3 * d)),
            (b + "attn.c_attn.bias", (3 * d,)),
            (b + "attn.c_proj.weight", (d, d)),
            (b + "attn.c_proj.bias", (d,)),
            (b + "ln_2.weight", (d,)),
            (b + "ln_2.bias", (d,)),
            (b + "mlp.c_fc.weight", (d, 4 * d)),
            (b + "mlp.c_fc.bias", (4 * d,)),
            (b + "mlp.c_proj.weight", (4 * d, d)),
            (b + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]  # lm_head is tied to wte
    return shapes


def vit_b16() -> Shapes:
    d, layers, patch, tokens, classes = 768, 12, 16, 197, 1000
    shapes: Shapes = [
        ("patch_embed.proj.weight", (d, 3, patch, patch)),
        ("patch_embed.proj.bias", (d,)),
        ("cls_token", (1, 1, d)),
        ("pos_embed", (1, tokens, d)),
    ]
    for i in range(layers):
        b = f"blocks.{i}."
        shapes += [
            (b + "norm1.weight", (d,)),
            (b + "norm1.bias", (d,)),
            (b + "attn.qkv.weight", (3 * d, d)),
            (b + "attn.qkv.bias", (3 * d,)),
            (b + "attn.proj.weight", (d, d)),
            (b + "attn.proj.bias", (d,)),
            (b + "norm2.weight", (d,)),
            (b + "norm2.bias", (d,)),
            (b + "mlp.fc1.weight", (4 * d, d)),
            (b + "mlp.fc1.bias", (4 * d,)),
            (b + "mlp.fc2.weight", (d, 4 * d)),
            (b + "mlp.fc2.bias", (d,)),
        ]
    shapes += [
        ("norm.weight", (d,)),
        ("norm.bias", (d,)),
        ("head.weight", (classes, d)),
        ("head.bias", (classes,)),
    ]
    return shapes


SHAPE_SETS: dict[str, Callable[[], Shapes]] = {"gpt2": gpt2_124m, "vit": vit_b16}


def build_model(shapes: Shapes, device: torch.device, seed: int) -> nn.Module:
    """A module whose named parameters have exactly these names and shapes, with random grads."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    root = nn.Module()
    for name, shape in shapes:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        p = nn.Parameter((0.02 * torch.randn(shape, generator=gen)).to(device))
        p.grad = (1e-3 * torch.randn(shape, generator=gen)).to(device)
        mod.register_parameter(leaf, p)
    return root


def optimizer_factories(device: torch.device) -> dict[str, Callable[[nn.Module], Any]]:
    lr = 1e-4

    def adamw(model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, **kw)

    def muon(model: nn.Module) -> pisa.Hybrid:
        return pisa.hybrid(
            model,
            lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.01),
            require_2d=True,
            companion_kwargs={"lr": lr, "weight_decay": 0.01, "foreach": True},
        )

    def nsisa(model: nn.Module, **kw: Any) -> pisa.Hybrid:
        return pisa.hybrid_nsisa(
            model,
            sigma=80.0,
            rho=100.0,
            companion_kwargs={"lr": lr, "weight_decay": 0.01, "foreach": True},
            **kw,
        )

    def sisa_inductor(model: nn.Module, per_tensor: bool = False) -> pisa.SISA:
        opt = pisa.SISA(model.parameters(), lr=lr, sigma=1.0, fused=True)
        opt.fused_cpu_backend = "inductor"  # inductor's kernels also on CPU
        if per_tensor:
            opt.fused_max_pack = 1  # one compiled call per tensor (before packs)
        return opt

    out: dict[str, Callable[[nn.Module], Any]] = {
        "adamw_foreach": lambda m: adamw(m, foreach=True),
        "pisa": lambda m: pisa.PISA(m.parameters(), lr=lr, sigma=1.0),
        "sisa": lambda m: pisa.SISA(m.parameters(), lr=lr, sigma=1.0),
        "sisa_no_telemetry": lambda m: pisa.SISA(
            m.parameters(), lr=lr, sigma=1.0, track_residuals=False
        ),
        "pisa_fused": lambda m: pisa.PISA(m.parameters(), lr=lr, sigma=1.0, fused=True),
        "sisa_fused": lambda m: pisa.SISA(m.parameters(), lr=lr, sigma=1.0, fused=True),
        "sisa_fused_no_telemetry": lambda m: pisa.SISA(
            m.parameters(), lr=lr, sigma=1.0, track_residuals=False, fused=True
        ),
        "sisa_fused_inductor": sisa_inductor,
        "sisa_fused_per_tensor": lambda m: sisa_inductor(m, per_tensor=True),
        "muon": muon,
        "nsisa": nsisa,
        "nsisa_bf16": lambda m: nsisa(m, ns_dtype=torch.bfloat16),
        "nsisa_fp32": lambda m: nsisa(m, ns_dtype=torch.float32),
        "nsisa_fused": lambda m: nsisa(m, ns_dtype=torch.float32, fused=True),
        "nsisa_bf16_fused": lambda m: nsisa(m, ns_dtype=torch.bfloat16, fused=True),
    }
    if fused_adamw_supported(device):
        out["adamw_fused"] = lambda m: adamw(m, fused=True)
    return out


def fused_adamw_supported(device: torch.device) -> bool:
    try:
        p = nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros(2, device=device)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_shape_set(
    label: str,
    shapes: Shapes,
    device: torch.device,
    names: list[str],
    steps: dict[str, int],
    warmup: int,
    seed: int,
    timer: str,
) -> list[dict[str, Any]]:
    model = build_model(shapes, device, seed)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    factories = optimizer_factories(device)
    opts = {name: factories[name](model) for name in names if name in factories}
    wall: dict[str, list[float]] = {name: [] for name in opts}
    first: dict[str, float] = {}
    cpu: dict[str, list[float]] = {name: [] for name in opts}
    tel: dict[str, list[float]] = {name: [] for name in opts}
    rng = random.Random(seed)
    order = list(opts)
    cycles = warmup + max(steps[name] for name in opts)
    for cycle in range(cycles):
        rng.shuffle(order)
        for name in order:
            if cycle >= warmup + steps[name]:
                continue
            opt = opts[name]
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            opt.step()
            sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if cycle == 0:
                first[name] = t1 - t0
            if cycle >= warmup:
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
                if family(opt) == CONSENSUS:  # the PISA family (also as a Hybrid's main)
                    c2, t2 = time.process_time(), time.perf_counter()
                    opt.telemetry()
                    sync(device)
                    t3, c3 = time.perf_counter(), time.process_time()
                    tel[name].append((t3 - t2) if timer == "wall" else (c3 - c2))
        if cycle == warmup - 1 or (cycle + 1) % 10 == 0:
            print(f"[{label}] cycle {cycle + 1}/{cycles}", file=sys.stderr, flush=True)
    rows = []
    for name, opt in opts.items():
        state = tensor_bytes(opt.state_dict())
        rows.append(
            {
                "device": device.type,
                "shapes": label,
                "optimizer": name,
                "n_params": n_params,
                "median_step_ms": 1e3 * statistics.median(wall[name]),
                "median_cpu_ms": 1e3 * statistics.median(cpu[name]),
                "state_bytes": state,
                "state_copies": state / param_bytes,
                "telemetry_ms": 1e3 * statistics.median(tel[name]) if tel[name] else "",
                "first_step_s": first[name],
                "steps": steps[name],
                "threads": torch.get_num_threads(),
                "timer": timer,
            }
        )
    key = "median_step_ms" if timer == "wall" else "median_cpu_ms"
    by_name = {r["optimizer"]: r for r in rows}
    for r in rows:
        ref = by_name.get("adamw_foreach")
        fused = by_name.get("adamw_fused")
        mu = by_name.get("muon")
        r["ratio_vs_adamw_foreach"] = r[key] / ref[key] if ref else ""
        r["ratio_vs_adamw_fused"] = r[key] / fused[key] if fused else ""
        r["ratio_vs_muon"] = r[key] / mu[key] if mu else ""
    del opts, model
    gc.collect()
    return rows


COLUMNS = [
    "device",
    "shapes",
    "optimizer",
    "n_params",
    "median_step_ms",
    "median_cpu_ms",
    "state_bytes",
    "state_copies",
    "ratio_vs_adamw_foreach",
    "ratio_vs_adamw_fused",
    "ratio_vs_muon",
    "telemetry_ms",
    "first_step_s",
    "steps",
    "threads",
    "timer",
]


def _fmt(key: str, value: Any) -> Any:
    if not isinstance(value, float):
        return value
    return f"{value:.1f}" if key.endswith(("_ms", "_s")) else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=50, help="measured steps after warm-up")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--shapes", default="gpt2,vit", help="comma list of: " + ",".join(SHAPE_SETS))
    ap.add_argument(
        "--optimizers",
        default="adamw_foreach,adamw_fused,pisa,sisa,sisa_no_telemetry,pisa_fused,sisa_fused,"
        "sisa_fused_no_telemetry,muon,nsisa_bf16,nsisa_fp32,nsisa_fused",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="what the ratios use: wall-clock or process CPU time (user + sys) per step; CPU\n"
        "time is the robust choice with --threads 1 on a machine shared with other jobs",
    )
    ap.add_argument(
        "--slow",
        default="",
        help="comma list of optimizers measured for --slow-steps only (e.g. nsisa_fp32 on a CPU\n"
        "with fast bfloat16, or nsisa_bf16 and muon on one without)",
    )
    ap.add_argument("--slow-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench/optimizer_step.csv")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n for n in args.optimizers.split(",") if n]
    rows: list[dict[str, Any]] = []
    for label in [s for s in args.shapes.split(",") if s]:
        if label not in SHAPE_SETS:
            ap.error(f"unknown shape set {label!r}; choose from {sorted(SHAPE_SETS)}")
        slow = {n for n in args.slow.split(",") if n}
        steps = {n: (args.slow_steps if n in slow else args.steps) for n in names}
        rows += bench_shape_set(
            label, SHAPE_SETS[label](), device, names, steps, args.warmup, args.seed, args.timer
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(k, v) for k, v in r.items()})
    print(
        f"{'shapes':6} {'optimizer':24} {'wall ms':>9} {'cpu ms':>9} {'x AdamW':>8} "
        f"{'x fused':>8} {'x Muon':>7} {'state':>6} {'steps':>5} {'first s':>8}"
    )

    def ratio(value: Any, width: int) -> str:
        return f"{'' if value == '' else f'{value:.2f}':>{width}}"

    for r in rows:
        print(
            f"{r['shapes']:6} {r['optimizer']:24} {r['median_step_ms']:9.1f} "
            f"{r['median_cpu_ms']:9.1f} {ratio(r['ratio_vs_adamw_foreach'], 8)} "
            f"{ratio(r['ratio_vs_adamw_fused'], 8)} {ratio(r['ratio_vs_muon'], 7)} "
            f"{r['state_copies']:6.2f} {r['steps']:5d} {r['first_step_s']:8.1f}"
        )
    print(
        f"wrote {out} (device={device.type}, threads={torch.get_num_threads()}, "
        f"ratios from {args.timer} time)"
    )


if __name__ == "__main__":
    main()
