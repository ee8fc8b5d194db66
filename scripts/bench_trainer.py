"""Harness overhead: the suite's trainer against a bare training loop, same model, data, optimizer.

For each case (a task with its config overrides) and optimizer, both loops run the same number of
steps from the same seed in this process:

* ``trainer``: :func:`pisa_bench.main.execute` (run directory, record, logging every
  ``train.log_every`` steps, telemetry, divergence checks, checkpoint cadence, the timed optimizer
  step) with evaluation only at the end (``train.eval_every=0``: the bare loop evaluates nothing);
* ``bare``: ``for batch in task.train_batches(epoch)``, the batch cut into the optimizer's m
  worker sub-batches, ``zero_grad; task.loss(model, sub).backward(); opt.step()`` per sub-batch,
  ``sched.step()``: the loop a researcher would write by hand around the same task object.

Both are timed by the same clocks: a wrapper around ``task.train_batches`` reads them when
batch ``--skip`` is drawn and when the last batch is drawn, so set-up, compilation of the first
steps, the final evaluation and the record's closing are outside the window, and the window holds
the same steps of work in both. Two clocks: the process's CPU time (``time.process_time``; with
one torch thread it counts this process's work only, so other jobs on a shared machine move it
little) and wall time. The two loops alternate (``--repeats`` each, the order flipped every
repeat) and the median per-step time of each is reported; ``overhead = trainer / bare - 1``.

Writes ``results/bench/trainer_overhead.csv`` (one row per case and optimizer)::

    python scripts/bench_trainer.py --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from pisa_bench.baselines import build_optimizer
from pisa_bench.config import compose_config
from pisa_bench.main import execute
from pisa_bench.runtime import seed_everything, workers_per_round
from pisa_bench.schedules import lr_multiplier
from pisa_bench.tasks import build_task
from pisa_bench.tasks.base import to_device

CASES: dict[str, list[str]] = {
    "quickstart": ["task=quickstart_mnist", "train.epochs=null", "train.max_steps=120"],
    "gpt2_small": [  # the fig2_gpt2 artefact's reduced GPT (0.8M parameters)
        "task=gpt2", "task.model.n_layer=2", "task.model.n_embd=64", "task.model.n_head=2",
        "task.data.seq_len=64", "task.data.val_tokens=8192", "train.max_steps=60",
    ],
}


class Window:
    """Wraps ``task.train_batches``: the times at which batch ``skip`` and the last batch were
    drawn (counted over epochs)."""

    def __init__(self, task: Any, skip: int, total: int) -> None:
        self.task, self.skip, self.total, self.drawn = task, skip, total, 0
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0
        self._inner = task.train_batches

    def __call__(self, epoch: int, start: int = 0) -> Iterator[Any]:
        for batch in self._inner(epoch, start):
            self.drawn += 1
            if self.drawn == self.skip + 1:
                self.t0, self.c0 = time.perf_counter(), time.process_time()
            if self.drawn == self.total:
                self.t1, self.c1 = time.perf_counter(), time.process_time()
            yield batch

    def per_step_ms(self) -> tuple[float, float]:
        """(CPU, wall) milliseconds per step in the window."""
        n = self.total - self.skip - 1
        return 1e3 * (self.c1 - self.c0) / n, 1e3 * (self.t1 - self.t0) / n


def compose(case: str, optim: str, out_dir: str, extra: Iterable[str]) -> Any:
    return compose_config([
        *CASES[case], f"optim={optim}", "train.eval_every=0", "train.threads=1",
        "train.progress=false", f"paths.out_dir={out_dir}", "name=bench_trainer", *extra,
    ])


def run_trainer(case: str, optim: str, skip: int, extra: list[str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        cfg = compose(case, optim, out, extra)
        orig = build_task
        window: list[Window] = []

        def wrapped(cfg_: Any, device: torch.device) -> Any:
            task = orig(cfg_, device)
            w = Window(task, skip, int(cfg_.train.max_steps))
            task.train_batches = w
            window.append(w)
            return task

        import pisa_bench.main as main_mod

        main_mod.build_task = wrapped
        try:
            summary = execute(cfg)
        finally:
            main_mod.build_task = orig
        assert summary["status"] == "ok", summary
        return window[0].per_step_ms()


def run_bare(case: str, optim: str, skip: int, extra: list[str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        cfg = compose(case, optim, out, extra)
        seed_everything(int(cfg.seed))
        torch.set_num_threads(1)
        device = torch.device("cpu")
        task = build_task(cfg, device)
        task.setup()
        total = int(cfg.train.max_steps)
        window = Window(task, skip, total)
        model = task.build_model().to(device)
        opt = build_optimizer(model, cfg.optim)
        spec = OmegaConf.to_container(cfg.train.schedule, resolve=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(spec, total))
        m, step, epoch = workers_per_round(opt), 0, 0
        while step < total:
            for batch in window(epoch):
                model.train()
                for sub in task.split_batch(to_device(batch, device), m):
                    opt.zero_grad(set_to_none=True)
                    task.loss(model, sub).backward()
                    opt.step()
                sched.step()
                step += 1
                if step == total:
                    break
            epoch += 1
        return window.per_step_ms()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="quickstart,gpt2_small")
    ap.add_argument("--optims", default="adamw,sisa")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", type=int, default=5, help="batches before the timed window")
    ap.add_argument("--out", default="results/bench/trainer_overhead.csv")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for both loops")
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        for optim in args.optims.split(","):
            times: dict[str, list[tuple[float, float]]] = {"trainer": [], "bare": []}
            for r in range(args.repeats):
                order = ["trainer", "bare"] if r % 2 == 0 else ["bare", "trainer"]
                for which in order:
                    fn = run_trainer if which == "trainer" else run_bare
                    times[which].append(fn(case, optim, args.skip, args.overrides))
            row: dict[str, object] = {"case": case, "optim": optim, "repeats": args.repeats}
            for k, clock in enumerate(("cpu", "wall")):
                t = statistics.median(x[k] for x in times["trainer"])
                b = statistics.median(x[k] for x in times["bare"])
                row |= {
                    f"trainer_{clock}_ms": round(t, 3), f"bare_{clock}_ms": round(b, 3),
                    f"overhead_{clock}_pct": round(100 * (t / b - 1), 2),
                }
            for which in ("trainer", "bare"):
                row[f"{which}_runs_cpu_wall_ms"] = " ".join(
                    f"{c:.1f}/{w:.1f}" for c, w in times[which])
            print(row, flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
