"""First command on a GPU machine: does this suite run here, and how fast? (< 10 minutes on one GPU)

Checks, one line each (``ok`` / ``FAIL`` with the reason / ``skip`` with the reason), and a CSV
``<out-dir>/<device name>.csv`` (columns ``check, status, seconds, detail, metrics``; ``metrics`` a
JSON object of the figures measured):

- ``cuda``: CUDA visible, device name / count / capability, torch, CUDA and NCCL versions;
- ``bf16_autocast``: a matmul under the trainer's autocast (:func:`pisa_bench.runtime.autocast`)
  is bfloat16 and within bf16 rounding of float32;
- ``smoke:<task>``: every task at ``scale=smoke`` on the device through ``pisa_bench.main.execute``
  (its default optimizer, SISA);
- ``gpt2_124m_nsisa``: GPT-2 124M (the paper-scale model, ``task.compile`` as the paper config)
  trained by NSISA for 100 steps at the paper's per-device batch (16 sequences x 1024 tokens, one
  worker per device, as one rank of the 4-GPU run) on synthetic tokens; prints the step time
  (steps 10..100, after compilation), the optimizer step time and the peak memory;
- ``nccl_pisa_round``: ``torchrun`` over the GPUs present (2 gloo processes on ``cpu``) joins a
  process group (NCCL on GPU, also with one GPU) and runs 3 distributed SISA rounds (float64);
  every rank must hold the weights of the same rounds run by virtual workers in one process;
- ``torchrun_trainer``: the shared trainer under ``torchrun`` on the same processes (GPT-2 smoke,
  NSISA);
- ``bench:<optimizer>``: the optimizer step benchmark of ``scripts/bench_optimizers.py`` (GPT-2
  124M and ViT-B/16 parameter shapes) on the device;
- ``resnet18_imagenet``: torchvision's ResNet-18 through the task's ImageFolder path (loader,
  transforms, seeded augmentation, top-1/top-5) on synthetic JPEG images written to a scratch dir.

``--size tiny`` shrinks the GPT-2 run and the benchmark to seconds (what CI runs on ``cpu``).
Usage::

    python scripts/gpu_check.py                       # CUDA, full size (the command to run first)
    python scripts/gpu_check.py --device cpu --size tiny --out-dir /tmp/gpu_check

Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import pisa  # noqa: E402
from pisa_bench.config import compose_config, group_options  # noqa: E402
from pisa_bench.rundir import read_metrics  # noqa: E402
from pisa_bench.runtime import autocast  # noqa: E402

COLUMNS = ("check", "status", "seconds", "detail", "metrics")
NCCL_ROUNDS = 3


class Skip(Exception):
    """The check does not apply here (the message says why)."""


@dataclass
class Result:
    check: str
    status: str  # ok | failed | skipped
    seconds: float
    detail: str
    metrics: dict[str, Any] = field(default_factory=dict)


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (the reason column)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Checks:
    """Runs checks in order, prints a line per check and collects the rows of the CSV."""

    def __init__(self, device: torch.device, tiny: bool, work: Path, skip: set[str]) -> None:
        self.device, self.tiny, self.work, self.skip = device, tiny, work, skip
        self.blocked = ""  # set: every later check is skipped with this reason
        self.results: list[Result] = []

    def run(self, name: str, fn: Callable[[], tuple[str, dict[str, Any]]]) -> Result:
        t0 = time.perf_counter()
        try:
            if name in self.skip or self.blocked:
                raise Skip(self.blocked or "--skip")
            detail, metrics = fn()
            res = Result(name, "ok", 0.0, detail, metrics)
        except Skip as e:
            res = Result(name, "skipped", 0.0, str(e))
        except Exception as e:  # a check's failure is a row, never the end of the script
            logging.getLogger("gpu_check").debug("%s", traceback.format_exc())
            res = Result(name, "failed", 0.0, one_line(e))
        res.seconds = round(time.perf_counter() - t0, 2)
        tag = {"ok": " ok ", "failed": "FAIL", "skipped": "skip"}[res.status]
        print(f"[{tag}] {name:28s} {res.seconds:7.1f} s  {res.detail}", flush=True)
        self.results.append(res)
        return res

    # --- the checks -------------------------------------------------------------------------
    def cuda(self) -> tuple[str, dict[str, Any]]:
        if self.device.type != "cuda":
            raise Skip(f"device {self.device.type}")
        if not torch.cuda.is_available():
            raise RuntimeError(f"CUDA not available (torch {torch.__version__}, "
                               f"built for CUDA {torch.version.cuda})")
        props = torch.cuda.get_device_properties(self.device)
        m = {"name": props.name, "count": torch.cuda.device_count(),
             "capability": f"{props.major}.{props.minor}",
             "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
             "cuda": torch.version.cuda, "nccl": _nccl_version(),
             "bf16_supported": torch.cuda.is_bf16_supported()}
        return (f"{m['count']} x {m['name']} ({m['memory_gib']} GiB, sm {m['capability']}), torch "
                f"{m['torch']}, CUDA {m['cuda']}, NCCL {m['nccl']}"), m

    def bf16_autocast(self) -> tuple[str, dict[str, Any]]:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(256, 256, generator=g).to(self.device) for _ in range(2))
        with autocast(self.device, "bf16"):
            c = a @ b
        if c.dtype != torch.bfloat16:
            raise RuntimeError(f"autocast produced {c.dtype}, not bfloat16")
        ref = a @ b
        rel = float((c.float() - ref).norm() / ref.norm())
        if not rel < 2e-2:
            raise RuntimeError(f"bf16 matmul relative error {rel:.2e} (want < 2e-2)")
        return f"matmul in bfloat16, relative error {rel:.1e} vs float32", {"rel_error": rel}

    def smoke(self, task: str) -> tuple[str, dict[str, Any]]:
        summary = _execute([f"task={task}", "scale=smoke", f"train.device={self.device.type}",
                            f"paths.out_dir={self.work / 'smoke'}", "name=gpu_check"])
        return (f"{summary['steps']} steps, {summary['metric']}={summary['final_metric']:.4g}",
                {"steps": summary["steps"], "final_metric": summary["final_metric"]})

    def gpt2_124m(self) -> tuple[str, dict[str, Any]]:
        steps, warm = (6, 2) if self.tiny else (100, 10)
        bs, seq = (4, 16) if self.tiny else (16, 1024)
        tokens = (steps + 2) * bs * (seq + 1) * 10 // 9 + 4 * bs * (seq + 1)
        model = ["scale=smoke"] if self.tiny else ["scale=paper", "task.size=124M"]
        over = ["task=gpt2", *model, "optim=nsisa", "optim.n_workers=1",
                f"train.device={self.device.type}", f"train.max_steps={steps}",
                f"train.batch_size={bs}", "train.grad_accum=1", "train.epochs=null",
                "train.eval_every=0", "train.log_every=1", "train.ckpt_every=0",
                f"train.eval_batch_size={bs}", "task.data.synthetic=true",
                f"task.data.seq_len={seq}", f"task.data.val_tokens={2 * bs * seq}",
                f"task.data.synthetic_vocab={64 if self.tiny else 50257}",
                f"task.data.synthetic_tokens={tokens}", f"paths.out_dir={self.work / 'gpt2'}",
                "name=gpu_check"]
        summary = _execute(over)
        rows = [r for r in read_metrics(_run_dir(over) / "metrics.csv")
                if r["split"] == "train" and r["metric"] == "loss"]
        t = {r["step"]: r["wall_time_s"] for r in rows}
        step_ms = 1e3 * (t[steps] - t[warm]) / (steps - warm)
        tok_s = bs * seq / (step_ms / 1e3)
        m = {"steps": summary["steps"], "batch": f"{bs}x{seq}", "step_ms": round(step_ms, 1),
             "tokens_per_s": round(tok_s), "opt_step_ms": round(summary["opt_step_ms_mean"], 2),
             "peak_memory_gib": round(summary["peak_memory_bytes"] / 2**30, 2),
             "n_params": summary["n_params"], "final_val_loss": summary["final_metric"]}
        return (f"{m['n_params']:,} params, {bs}x{seq} tokens/step: "
                f"{m['step_ms']} ms/step (steps {warm}-{steps}), {m['tokens_per_s']} tok/s, "
                f"optimizer {m['opt_step_ms']} ms, peak memory {m['peak_memory_gib']} GiB"), m

    def processes(self) -> int:
        return torch.cuda.device_count() if self.device.type == "cuda" else 2

    def nccl_round(self) -> tuple[str, dict[str, Any]]:
        n = self.processes()
        if n < 1:
            raise RuntimeError("no CUDA device for NCCL")
        out = self.work / "nccl"
        out.mkdir(parents=True, exist_ok=True)
        _torchrun(n, [str(Path(__file__).resolve()), "--nccl-worker", str(out),
                      "--device", self.device.type])
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]
        ref = _sisa_rounds(torch.device("cpu"), n, rank=None)
        worst = 0.0
        for r, state in enumerate(ranks):
            for key, value in ref.items():
                err = float((state["weights"][key] - value).abs().max())
                worst = max(worst, err)
                if not err <= 1e-10:
                    raise RuntimeError(f"rank {r} {key}: {err:.2e} from the virtual-worker run")
        backend = ranks[0]["backend"]
        return (f"{backend}, world {n}: {NCCL_ROUNDS} distributed SISA rounds equal the virtual "
                f"workers' (max |diff| {worst:.1e})"), {"backend": backend, "world": n,
                                                        "max_abs_diff": worst}

    def torchrun_trainer(self) -> tuple[str, dict[str, Any]]:
        n = self.processes()
        out = self.work / "torchrun"
        _torchrun(n, [str(ROOT / "run.py"), "task=gpt2", "scale=smoke", "optim=nsisa",
                      "optim.n_workers=null",  # m = the world size (the paper's 4 on 4 GPUs)
                      f"train.device={self.device.type}", "train.threads=1",
                      f"paths.out_dir={out}", f"hydra.run.dir={out / 'hydra'}"])
        (path,) = out.glob("runs/**/summary.json")
        summary = json.loads(path.read_text())
        if summary["status"] != "ok":
            raise RuntimeError(f"status {summary['status']}: {summary.get('error')}")
        return f"{n} processes, {summary['steps']} steps, status ok", {"world": n}

    def bench(self) -> tuple[str, dict[str, Any]]:
        """The benchmark rows (one CSV row each, after this one) under ``metrics["rows"]``."""
        import bench_optimizers as bench

        names = list(bench.optimizer_factories(self.device))
        if self.tiny:
            sets = {"tiny": [("wte.weight", (96, 16)), ("h.0.mlp.c_fc.weight", (16, 64)),
                             ("h.0.mlp.c_proj.weight", (64, 16)), ("ln_f.weight", (16,))]}
            steps, warmup = 2, 1
        else:
            sets = {k: bench.SHAPE_SETS[k]() for k in ("gpt2", "vit")}
            steps, warmup = 50, 5
        rows: list[dict[str, Any]] = []
        for label, shapes in sets.items():
            rows += bench.bench_shape_set(label, shapes, self.device, names,
                                          dict.fromkeys(names, steps), warmup, 0, "wall")
        return f"{len(rows)} optimizer x shape rows ({', '.join(sets)})", {"rows": rows}

    def resnet18_imagenet(self) -> tuple[str, dict[str, Any]]:
        try:
            import torchvision  # noqa: F401
        except Exception as e:
            raise Skip(f"torchvision does not import here ({one_line(e)}); "
                       "`pip install -e .[vision]` on a CUDA machine") from e
        data = self.work / "imagenet_data"
        per_class = 4 if self.tiny else 32
        _synthetic_imagefolder(data / "imagenet", classes=4, per_class=per_class)
        bs = 4 if self.tiny else 32
        over = ["task=resnet18_imagenet", "scale=paper", f"train.device={self.device.type}",
                "train.epochs=null", "train.max_steps=4", f"train.batch_size={bs}",
                f"train.eval_batch_size={bs}", "train.eval_every=0", "train.log_every=1",
                "train.ckpt_every=0", "task.data.workers=2", f"paths.data_dir={data}",
                f"paths.out_dir={self.work / 'imagenet'}", "name=gpu_check"]
        summary = _execute(over)
        return (f"torchvision ResNet-18 ({summary['n_params'] / 1e6:.1f}M params), ImageFolder "
                f"224px: {summary['steps']} steps, top-1 {summary['final_metric']:.1f}%",
                {"steps": summary["steps"], "final_metric": summary["final_metric"]})


# --- helpers -------------------------------------------------------------------------------
def _nccl_version() -> str:
    v = torch.cuda.nccl.version()  # a tuple in recent torch, an int (e.g. 2708) in older ones
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _execute(overrides: list[str]) -> dict[str, Any]:
    """``python run.py <overrides>`` in this process; a summary with status ``ok`` or an error."""
    from pisa_bench.main import execute

    summary = execute(compose_config(overrides))
    if summary.get("status") != "ok":
        raise RuntimeError(f"run status {summary.get('status')}: {summary.get('error')}")
    return summary


def _run_dir(overrides: list[str]) -> Path:
    from pisa_bench.record import run_dir_for

    return run_dir_for(compose_config(overrides))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(n: int, args: list[str], timeout: float = 420) -> None:
    """``torchrun --nproc_per_node=n <args>`` on this node; raises with the log's last line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
        found = (re.search(r"\b([\w.]*(?:Error|Exception): \S.*)$", x) for x in lines)
        errors = [m.group(1) for m in found if m and "ChildFailedError" not in m.group(1)]
        reason = errors[0] if errors else (lines[-1].strip() if lines else "no output")
        raise RuntimeError(f"torchrun exit {proc.returncode}: {reason}")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x))).squeeze(-1)


def _sisa_rounds(device: torch.device, world: int, rank: int | None) -> dict[str, torch.Tensor]:
    """``NCCL_ROUNDS`` SISA rounds (float64): ``rank=None`` runs the ``world`` workers virtually in
    this process; otherwise this rank's worker of a distributed run. Final weights on CPU."""
    torch.manual_seed(0)
    model = _Net().to(device=device, dtype=torch.float64)
    mode: dict[str, Any] = {"n_workers": world} if rank is None else {"distributed": True}
    opt = pisa.SISA(model.parameters(), lr=0.05, sigma=2.0, l2_lambda=1e-3, **mode)
    for r in range(NCCL_ROUNDS):
        for i in range(world) if rank is None else [rank]:
            g = torch.Generator().manual_seed(1000 * r + i)
            x = torch.randn(12, 8, generator=g, dtype=torch.float64).to(device)
            y = torch.randn(12, generator=g, dtype=torch.float64).to(device)
            opt.zero_grad(set_to_none=True)
            (model(x) - y).pow(2).mean().backward()
            opt.step()
        if not opt.round_done:
            raise RuntimeError(f"round {r} not completed after {world} worker steps")
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def nccl_worker(out: Path, device_type: str) -> None:
    """One torchrun rank of ``nccl_pisa_round``: join the group (a 1-process world too)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    try:
        weights = _sisa_rounds(device, dist.get_world_size(), dist.get_rank())
        torch.save({"weights": weights, "backend": dist.get_backend()},
                   out / f"rank{dist.get_rank()}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _synthetic_imagefolder(root: Path, classes: int, per_class: int) -> None:
    """``root/{train,val}/c<k>/*.JPEG``: random RGB JPEGs of 64..320 px a side (sizes vary, as
    ImageNet's)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", max(per_class // 4, 1))):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in torch.randint(64, 321, (2,), generator=g))
                px = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(d / f"img{i}.JPEG", quality=85)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        name = f"cpu-{name}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def write_csv(path: Path, results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in results:
        w.writerow([r.check, r.status, f"{r.seconds:.2f}", r.detail,
                    json.dumps(r.metrics, sort_keys=True, default=str)])
    path.write_text(buf.getvalue())


@contextlib.contextmanager
def _scratch(keep: str | None) -> Iterator[Path]:
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as d:
        yield Path(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", default="full", choices=["full", "tiny"],
                    help="full: GPT-2 124M at 16x1024 for 100 steps, full benchmark shapes;\n"
                         "tiny: seconds (CI on cpu)")
    ap.add_argument("--out-dir", default=str(ROOT / "results" / "gpu_check"),
                    help="where the CSV goes")
    ap.add_argument("--work-dir", default=None, help="scratch runs (default: a temp dir, removed)")
    ap.add_argument("--tasks", default="", help="comma list of smoke tasks (default: every task)")
    ap.add_argument("--skip", default="", help="comma list of checks to leave out (reported as\n"
                    "skipped), e.g. torchrun_trainer,bench")
    ap.add_argument("--nccl-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.nccl_worker:
        nccl_worker(Path(args.nccl_worker), args.device)
        return 0
    logging.getLogger("pisa-bench").setLevel(logging.WARNING)
    device = torch.device(args.device)
    tasks = [t for t in args.tasks.split(",") if t] or group_options("task")
    unknown = sorted(set(tasks) - set(group_options("task")))
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {group_options('task')}")
    print(f"gpu_check on {device.type} ({_device_label(device)}), size {args.size}, "
          f"{socket.gethostname()}", flush=True)
    with _scratch(args.work_dir) as work:
        c = Checks(device, args.size == "tiny", work, {x for x in args.skip.split(",") if x})
        if c.run("cuda", c.cuda).status == "failed":
            c.blocked = "CUDA is not usable (the cuda line says why)"
        c.run("bf16_autocast", c.bf16_autocast)
        for task in tasks:
            c.run(f"smoke:{task}", lambda t=task: c.smoke(t))
        c.run("gpt2_124m_nsisa", c.gpt2_124m)
        c.run("nccl_pisa_round", c.nccl_round)
        c.run("torchrun_trainer", c.torchrun_trainer)
        bench = c.run("bench", c.bench)
        for r in bench.metrics.pop("rows", []):
            c.results.append(Result(
                f"bench:{r['shapes']}:{r['optimizer']}", "ok", 0.0,
                f"{r['median_step_ms']:.2f} ms/step, state {r['state_copies']:.2f} x params",
                {k: r[k] for k in ("median_step_ms", "state_bytes", "state_copies",
                                   "ratio_vs_adamw_foreach", "ratio_vs_muon", "n_params")}))
            print(f"[ ok ] {c.results[-1].check:28s}            {c.results[-1].detail}")
        c.run("resnet18_imagenet", c.resnet18_imagenet)
    out = Path(args.out_dir) / f"{_device_label(device)}.csv"
    write_csv(out, c.results)
    failed = [r.check for r in c.results if r.status == "failed"]
    n_ok = sum(r.status == "ok" for r in c.results)
    print(f"{n_ok} ok, {len(failed)} failed, {sum(r.status == 'skipped' for r in c.results)} "
          f"skipped; wrote {out}")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
