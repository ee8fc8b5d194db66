"""The shared trainer: one loop for every supervised task, services for the others.

One global step (an optimizer *round*) of the supervised loop::

    batch  <- next batch of task.train_batches(epoch)          (same on every rank)
    batch  <- this rank's 1/world share                          (torchrun only)
    for each of the m worker sub-batches (m = optimizer.n_workers in virtual mode, else 1):
        zero grads
        for each of the k micro-batches of the sub-batch (k = train.grad_accum):
            loss = task.loss(model, micro) under autocast; backward of (n_micro / n_sub) * loss
        clip; optimizer.step()    (PISA family: one worker's local step; the m-th ends the round)
    scheduler.step(); log; evaluate / checkpoint on cadence

In torchrun mode PISA-family optimizers run their distributed round (one all-reduce); every
other optimizer gets its gradients averaged across ranks first (what DDP does).

On GPU the loop does not wait for the device between steps: each step's loss stays a device
tensor, queued and read (one copy, checked for divergence at its own step) at the log, evaluation
and checkpoint cadence; the optimizer step is timed by CUDA events, read when the summary is
written; round telemetry is summed and read at the log cadence only. On CPU, where a read
costs nothing, the loss is read and checked every step.

Services for tasks with their own loop (GAN, RL, federated): :meth:`make_optimizer`,
:meth:`make_scheduler`, :meth:`optimizer_step` (timed), :meth:`log`, :meth:`record_eval`,
:meth:`check_finite`, :meth:`watch` / :meth:`read_watched` (losses checked without a device sync
per step), :meth:`load_checkpoint`, :meth:`checkpoint_or_stop` (once per step),
:meth:`progress`.

Checkpoints (``ckpt/rank{r}.pt`` and the one before, :mod:`pisa_bench.checkpoints`) are written
every ``train.ckpt_every`` steps (0: off), every ``train.ckpt_every_min`` minutes of wall time,
after each evaluation (``train.ckpt_at_eval``), at the end, and on a stop request; each carries
the metric rows logged so far, so a resume rewrites ``metrics.csv`` exactly to its step.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from pisa import is_consensus
from pisa.distributed import GradientSum
from pisa_bench import stop
from pisa_bench.baselines import Incompatible, build_optimizer, needs_create_graph
from pisa_bench.checkpoints import CheckpointStore, Loaded
from pisa_bench.record import RunRecord
from pisa_bench.runtime import (
    Dist,
    autocast,
    family,
    ns_dtypes,
    optimizer_state_bytes,
    peak_memory_bytes,
    reset_peak_memory,
    rng_state,
    round_telemetry,
    set_rng_state,
    workers_per_round,
)
from pisa_bench.schedules import lr_multiplier
from pisa_bench.tasks.base import Task, to_device

log = logging.getLogger("pisa-bench")


#: Default of ``task.explode_above``: a watched quantity whose magnitude exceeds it has exploded
#: (e.g. a perplexity above 1e10, a loss of 23 nats on a word model, is divergence, not a result).
EXPLODE_ABOVE = 1e10


class Diverged(RuntimeError):
    """A watched quantity (loss, evaluation metric) became NaN, infinite or exploded."""

    def __init__(self, step: int, what: str, value: float, limit: float | None = None) -> None:
        why = f" (|value| above task.explode_above={limit:g})" if limit is not None else ""
        super().__init__(f"{what} is {value} at step {step}{why}")
        self.step = step


class Preempted(RuntimeError):
    """Stopped by a signal (or ``train.preempt_at_step``) after saving a checkpoint."""


@dataclass(frozen=True)
class Cadence:
    """When the loops log, evaluate, checkpoint and stop: the ``train`` keys, read once per run
    (a config lookup per step and key costs more than a small model's step on GPU)."""

    log_every: int  # steps between training rows (>= 1)
    eval_every: int  # steps between evaluations (0: only at the end)
    ckpt_every: int  # steps between checkpoints (0: off)
    ckpt_every_min: float  # minutes of wall time between checkpoints (0: off)
    ckpt_at_eval: bool  # a checkpoint after each evaluation
    preempt_at_step: int | None  # simulate a preemption at this step (tests)

    @classmethod
    def of(cls, tc: DictConfig) -> Cadence:
        at = tc.get("preempt_at_step")
        return cls(
            log_every=max(int(tc.get("log_every") or 1), 1),
            eval_every=int(tc.get("eval_every") or 0),
            ckpt_every=int(tc.get("ckpt_every") or 0),
            ckpt_every_min=float(tc.get("ckpt_every_min") or 0),
            ckpt_at_eval=bool(tc.get("ckpt_at_eval", True)),
            preempt_at_step=None if at is None else int(at),
        )


class Trainer:
    """Runs a :class:`Task` under the ``train`` config and records it in a :class:`RunRecord`."""

    def __init__(
        self,
        cfg: DictConfig,
        task: Task,
        record: RunRecord | None,
        run_dir: Path,
        device: torch.device,
        dist_info: Dist,
        resume: Loaded | None = None,
    ) -> None:
        self.cfg, self.tc, self.task = cfg, cfg.train, task
        self.cadence = Cadence.of(cfg.train)
        limit = task.tcfg.get("explode_above")
        self.explode_above = EXPLODE_ABOVE if limit is None else float(limit)
        self.record = record  # None on ranks other than 0
        self.run_dir = run_dir
        self.store = CheckpointStore(run_dir, dist_info.rank)
        self._resume = resume  # the checkpoint this run continues from (None: step 0)
        self.device, self.dist = device, dist_info
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples = 0
        self._opt_time = 0.0
        self._opt_steps = 0
        self._opt_events: list[tuple[Any, Any]] = []  # CUDA (start, end) events not yet read
        self._watched: list[tuple[int, str, torch.Tensor]] = []  # (step, name, value) not yet read
        self._signals: Any = None
        self._state_fn: Callable[[], dict[str, Any]] | None = None
        self._last_ckpt = (-1, -1, time.monotonic())  # (step, metric rows, time) of the last one
        self._evaluated = False
        self.best: float | None = None
        self.max_steps = 0
        self.extra_loggers: list[Any] = []
        self._built: list[tuple[nn.Module, torch.optim.Optimizer]] = []  # by make_optimizer

    # --- signals --------------------------------------------------------------------------
    def __enter__(self) -> Trainer:
        self._signals = stop.handle_signals()
        self._signals.__enter__()
        reset_peak_memory(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self._signals.__exit__(*exc)

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over the torchrun ranks (one tiny all-reduce; as is in one process)."""
        if self.dist.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _local_stop(self) -> bool:
        at = self.cadence.preempt_at_step
        return stop.STOP.is_set() or (
            at is not None and self.step == at and self.step < self.max_steps
        )

    def _late(self) -> bool:
        minutes = self.cadence.ckpt_every_min
        return bool(minutes) and time.monotonic() - self._last_ckpt[2] >= 60 * minutes

    def stop_requested(self) -> bool:
        """True once a stop was asked (signal, or ``train.preempt_at_step`` reached).

        Under torchrun the ranks agree (one tiny all-reduce), so all stop at the same step.
        Call it once per step (as :meth:`checkpoint_or_stop` does).
        """
        return self._agree(self._local_stop())[0]

    def checkpoint_due(self, late: bool | None = None) -> bool:
        """Whether the cadence asks for a checkpoint now (see the module docstring). ``late``:
        the wall-time cadence already agreed across ranks (else agreed here, so that torchrun
        ranks save the same step)."""
        if self.step == self._last_ckpt[0]:
            return False
        every = self.cadence.ckpt_every
        due = bool(every and self.step % every == 0)
        due |= self.cadence.ckpt_at_eval and self._evaluated
        due |= self.max_steps > 0 and self.step >= self.max_steps
        return due or (self._agree(self._late())[0] if late is None else late)

    def log_due(self, step: int | None = None) -> bool:
        """A training row is due after ``step`` (default: the current one): every
        ``train.log_every`` steps and at the last one."""
        step = self.step if step is None else step
        return step % self.cadence.log_every == 0 or step >= self.max_steps

    def eval_due(self) -> bool:
        """An evaluation is due: every ``train.eval_every`` steps (0: never) and at the last."""
        every = self.cadence.eval_every
        return bool(every and self.step % every == 0) or self.step >= self.max_steps

    def set_checkpoint_state(self, state: Callable[[], dict[str, Any]]) -> None:
        """Name what a checkpoint saves (done by :meth:`checkpoint_or_stop`; loops that save by
        themselves call it, so that :meth:`finish` can write the final checkpoint)."""
        self._state_fn = state

    def checkpoint_or_stop(self, state: Callable[[], dict[str, Any]]) -> None:
        """At the end of a step: checkpoint when due (:meth:`checkpoint_due`: ``train.ckpt_every``
        / ``ckpt_every_min`` / ``ckpt_at_eval``), and on a stop request checkpoint and raise
        :class:`Preempted`."""
        self._state_fn = state
        stop_now, late = self._agree(self._local_stop(), self._late())  # one all-reduce a step
        if stop_now or self.checkpoint_due(late):
            self.save_checkpoint(state())
        if stop_now:
            bar = getattr(self, "_bar", None)
            if bar is not None:
                bar.close()
            raise Preempted(f"stopped at step {self.step}; resume with the same command")

    # --- services -------------------------------------------------------------------------
    def make_optimizer(
        self, model: nn.Module, optim_cfg: DictConfig | None = None
    ) -> torch.optim.Optimizer:
        ocfg = self.cfg.optim if optim_cfg is None else optim_cfg
        if not getattr(self, "_supervised", False) and self.grad_accum() != 1:
            raise Incompatible(
                f"train.grad_accum applies to the shared supervised loop; task "
                f"'{self.task.tcfg.name}' has its own loop (set train.grad_accum=1)"
            )
        opt = build_optimizer(model, ocfg)
        if self.record is not None and str(ocfg.name) == str(self.cfg.optim.name):
            # the run's optimizer (as configured, or derived from it: FL's ADMM clients)
            self.record.update(family=family(opt), ns_dtype=ns_dtypes(opt))
        self._built.append((model, opt))
        return opt

    def make_scheduler(
        self, opt: torch.optim.Optimizer, total_steps: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        spec = OmegaConf.to_container(self.tc.schedule, resolve=True)
        assert isinstance(spec, dict)
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(spec, total_steps))

    def optimizer_step(self, opt: torch.optim.Optimizer, closure: Any = None) -> None:
        """``opt.step()`` with its time measured apart from forward/backward: by the host clock on
        CPU, by a pair of CUDA events on GPU (read at the next :meth:`write_progress`, so timing
        never synchronises the device)."""
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            opt.step(closure) if closure is not None else opt.step()
            end.record()
            self._opt_events.append((start, end))
            return
        t0 = time.perf_counter()
        opt.step(closure) if closure is not None else opt.step()
        self._opt_time += time.perf_counter() - t0

    def _collect_opt_events(self) -> None:
        """Add the CUDA-event times recorded so far to the optimizer time (synchronises once)."""
        if self._opt_events:
            self._opt_events[-1][1].synchronize()
            self._opt_time += 1e-3 * sum(s.elapsed_time(e) for s, e in self._opt_events)
            self._opt_events.clear()

    def end_round(self) -> None:
        """Count one global step of optimizer time (call once per round in custom loops)."""
        self._opt_steps += 1

    def check_finite(self, value: float, what: str, step: int | None = None) -> None:
        """Raise :class:`Diverged` when ``value`` (of ``step``, default the current one) is NaN,
        infinite or exploded: ``|value| > task.explode_above`` (default :data:`EXPLODE_ABOVE`)."""
        step = self.step if step is None else step
        if not math.isfinite(value):
            raise Diverged(step, what, value)
        limit = self.explode_above
        if abs(value) > limit:
            raise Diverged(step, what, value, limit)

    def reads_loss_every_step(self) -> bool:
        """Whether the loops read (and check) each step's watched losses (:meth:`watch`) at once:
        on CPU, where it costs nothing. On GPU they read them at the log / evaluation / checkpoint
        cadence instead, so they never wait for the device; a non-finite loss still ends the run
        as diverged at its own step, and no checkpoint is written after it."""
        return self.device.type != "cuda"

    def watch(self, values: Mapping[str, torch.Tensor | float]) -> None:
        """Queue this step's watched values (0-d tensors, not yet read; a float is accepted) for
        :meth:`read_watched`."""
        for name, v in values.items():
            t = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self._watched.append((self.step, name, t))

    def read_watched(self) -> dict[str, float]:
        """Read the queued values (one device-to-host copy; under torchrun one all-reduce, the
        mean over ranks as one process would log it), check each with :meth:`check_finite` at
        its own step, and return the last step's."""
        steps, names, values = zip(*self._watched)
        t = torch.stack([v.to(self.device, torch.float64) for v in values])
        if self.dist.world > 1:
            dist.all_reduce(t)
            t = t / self.dist.world
        self._watched.clear()
        host = t.tolist()
        for step, name, value in zip(steps, names, host):
            self.check_finite(value, name, step)
        return {n: v for s, n, v in zip(steps, names, host) if s == steps[-1]}

    def read_watched_if(self, due: bool) -> dict[str, float]:
        """:meth:`read_watched` when ``due`` (the step is logged or evaluated) or every step on
        CPU (:meth:`reads_loss_every_step`); else ``{}``, the values left queued."""
        return self.read_watched() if due or self.reads_loss_every_step() else {}

    def check_metrics(self, metrics: dict[str, float], keys: Iterable[str] | None = None) -> None:
        """:meth:`check_finite` on every entry of ``metrics`` (or on those of ``keys`` it has)."""
        for k in metrics if keys is None else [k for k in keys if k in metrics]:
            self.check_finite(float(metrics[k]), k)

    def log(self, split: str, metrics: dict[str, float], step: int | None = None) -> None:
        if self.record is None or not metrics:
            return
        spe = self.task.steps_per_epoch()
        epoch = self.epoch + (self.batch_in_epoch / spe if spe else 0.0)
        self.record.log(self.step if step is None else step, epoch, self.samples, split, metrics)
        for lg in self.extra_loggers:
            lg.log(split, metrics, self.step if step is None else step)

    def record_eval(self, metrics: dict[str, float]) -> None:
        """Log evaluation metrics and track final / best / time-to-target of the primary metric."""
        task = self.task
        if task.metric not in metrics:
            raise KeyError(f"task {task.tcfg.name} evaluation lacks its metric '{task.metric}'")
        self.log(task.metric_split, metrics)
        self._evaluated = True
        value = float(metrics[task.metric])
        self.check_metrics(metrics)
        better = self.best is None or (
            value < self.best if task.lower_is_better else value > self.best
        )
        if self.record is None:
            if better:
                self.best = value
            return
        rec = self.record
        rec.update(final_metric=value)
        if better:
            self.best = value
            rec.update(best_metric=value, best_step=self.step)
        target = task.target
        reached = target is not None and (
            value <= target if task.lower_is_better else value >= target
        )
        if reached and rec.summary.get("steps_to_target") is None:
            rec.update(steps_to_target=self.step, time_to_target_s=round(rec.wall_time(), 3))
        self._progress_note(f"{task.metric}={value:.4g}")

    def progress(self, total: int, initial: int = 0) -> Any:
        """A tqdm bar when interactive (``train.progress``: auto | true | false)."""
        setting = str(self.tc.get("progress", "auto")).lower()
        show = setting == "true" or (setting == "auto" and sys.stderr.isatty())
        self._bar = tqdm(
            total=total,
            initial=initial,
            disable=not show or not self.dist.is_main,
            desc=f"{self.task.tcfg.name}/{self.cfg.optim.name}",
            dynamic_ncols=True,
        )
        return self._bar

    def _progress_note(self, text: str) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None and not bar.disable:
            bar.set_postfix_str(text)
        elif self.dist.is_main:
            log.info("step %d/%d  %s", self.step, self.max_steps, text)

    # --- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Save ``state`` (models, optimizers, ...), the trainer position, RNG and the metric rows
        so far (two checkpoints kept; a second signal waits for the write to finish). Losses
        not yet read are checked first: a checkpoint never holds a diverged state."""
        if self._watched:
            self.read_watched()
        rec = self.record
        full = {
            "user": state,
            "trainer": {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "samples": self.samples,
                "opt_time": self._opt_time,
                "opt_steps": self._opt_steps,
                "best": self.best,
                "wall_time_s": rec.wall_time() if rec is not None else None,
                "summary": dict(rec.summary) if rec is not None else None,
                "metric_rows": list(rec.metrics.rows) if rec is not None else None,
            },
            "task": self.task.state_dict(),
            "rng": rng_state(),
        }
        with stop.critical():
            self.store.save(full)
            if rec is not None:
                self.write_progress()
        rows = len(rec.metrics.rows) if rec is not None else 0
        self._last_ckpt = (self.step, rows, time.monotonic())
        self._evaluated = False

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The ``state`` of the checkpoint this run continues from, with the trainer position,
        task state and RNG restored; None on a fresh run. (Which checkpoint, and the metric rows
        it carries, was decided when the run was opened: :func:`pisa_bench.main.execute`.)"""
        if self._resume is None:
            return None
        full = self._resume.state
        t = full["trainer"]
        self.step, self.epoch, self.batch_in_epoch = t["step"], t["epoch"], t["batch_in_epoch"]
        self.samples, self._opt_time, self._opt_steps = t["samples"], t["opt_time"], t["opt_steps"]
        self.best = t["best"]
        self.task.load_state_dict(full["task"])
        set_rng_state(full["rng"])
        rows = len(self.record.metrics.rows) if self.record is not None else 0
        self._last_ckpt = (self.step, rows, time.monotonic())
        log.info("resumed from %s at step %d", self._resume.path, self.step)
        return full["user"]

    def write_progress(self) -> None:
        """Write the position and resource figures so far into the summary."""
        self._collect_opt_events()
        if self.record is None:
            return
        self.record.update(
            steps=self.step,
            samples_or_tokens=self.samples,
            opt_step_ms_mean=1e3 * self._opt_time / max(self._opt_steps, 1),
            peak_memory_bytes=peak_memory_bytes(self.device),
        )
        self.record.write_summary()

    def write_resources(self) -> None:
        """Parameters and optimizer-state bytes of what :meth:`make_optimizer` built, into the
        summary (a run that ends early, diverged or stopped, records them too)."""
        if self.record is None or not self._built or self.record.summary.get("n_params"):
            return
        params = {id(p): p for m, _ in self._built for p in m.parameters() if p.requires_grad}
        self.record.update(
            optimizer_state_bytes=sum(optimizer_state_bytes(o) for _, o in self._built),
            n_params=sum(p.numel() for p in params.values()),
        )

    def finish(self, optimizers: Iterable[torch.optim.Optimizer], n_params: int) -> None:
        """Write the end-of-run resource figures into the summary."""
        rows = len(self.record.metrics.rows) if self.record is not None else 0
        if self._state_fn is not None and (self.step, rows) != self._last_ckpt[:2]:
            self.save_checkpoint(self._state_fn())  # the final state: a lost record is restored
        if self.record is None:
            return
        self.record.update(
            optimizer_state_bytes=sum(optimizer_state_bytes(o) for o in optimizers),
            n_params=n_params,
        )
        self.write_progress()

    # --- the supervised loop --------------------------------------------------------------
    def total_steps(self) -> int:
        epochs = self.tc.get("epochs")
        spe = self.task.steps_per_epoch()
        if epochs is not None:
            if spe is None:
                raise ValueError(
                    f"train.epochs is set but task {self.task.tcfg.name} has no epoch length"
                )
            return math.ceil(float(epochs) * spe)
        return int(self.tc.max_steps)

    def batches(self) -> Iterator[Any]:
        """Endless batches from the current position: an epoch resumed at batch ``b`` starts
        ``task.train_batches(epoch, b)`` there (the batches before are not produced)."""
        while True:
            empty, start = True, self.batch_in_epoch
            for i, batch in enumerate(self.task.train_batches(self.epoch, start), start=start):
                empty = False
                self.batch_in_epoch = i + 1
                yield batch
            if empty and start == 0:
                raise RuntimeError(f"task {self.task.tcfg.name} yielded no training batch")
            self.epoch += 1
            self.batch_in_epoch = 0

    def grad_accum(self) -> int:
        """``train.grad_accum`` (micro-batches per worker gradient), checked."""
        k = self.tc.get("grad_accum")
        k = 1 if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"train.grad_accum must be an integer >= 1, not {k!r}")
        return k

    def worker_gradient(
        self, task: Task, model: nn.Module, sub: Any, accum: int, create_graph: bool
    ) -> torch.Tensor:
        r"""Accumulate one worker's gradient over ``accum`` micro-batches of ``sub``; its loss
        (a detached 0-d tensor: reading it would synchronise the device).

        Micro-batch :math:`j` (:math:`n_j` samples of :meth:`Task.count`, :math:`n = \sum_j n_j`)
        adds :math:`(n_j/n)\,\nabla \ell_j`, so the gradient is
        :math:`\sum_j (n_j/n)\nabla \ell_j`: the average over the micro-batches, which equals the
        gradient of ``sub`` in one piece for a per-sample mean loss. The optimizer step (one
        worker's local step for the PISA family, so a round still has m workers) follows once.
        """
        micro = task.split_batch(sub, accum) if accum > 1 else [sub]
        counts = [task.count(b) for b in micro]
        total = float(sum(counts))
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        for b, n in zip(micro, counts):
            w = n / total
            with autocast(self.device, self.tc.precision):
                loss = task.loss(model, b)
            (loss * w if len(micro) > 1 else loss).backward(create_graph=create_graph)
            value = value + w * loss.detach().double()
        return value

    def fit(self, task: Task) -> None:
        """Train a supervised task to ``train.max_steps`` (or ``train.epochs``)."""
        tc = self.tc
        self._supervised = True
        model = task.build_model().to(self.device)
        opt = self.make_optimizer(model)
        create_graph = needs_create_graph(self.cfg.optim)
        pisa_family = is_consensus(opt)
        distributed = self.dist.world > 1
        m = 1 if distributed else workers_per_round(opt)
        accum = self.grad_accum()
        self.max_steps = total = self.total_steps()
        sched = self.make_scheduler(opt, total)
        state = self.load_checkpoint()
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        clip = tc.get("grad_clip")
        params = list(model.parameters())
        # non-PISA optimizers under torchrun: gradients averaged in persistent buckets
        grad_sum = GradientSum() if distributed and not pisa_family else None

        def ckpt_state() -> dict[str, Any]:
            return {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
            }

        bar = self.progress(total, initial=self.step)
        batches = self.batches()
        # a consensus optimizer sums its round telemetry only for the rounds that are logged
        track = bool(getattr(opt, "track_residuals", False))
        while self.step < total:
            if track:
                opt.track_residuals = self.log_due(self.step + 1)
            batch = next(batches)
            n_batch = task.count(batch)
            if distributed:
                batch = task.split_batch(batch, self.dist.world)[self.dist.rank]
            batch = to_device(batch, self.device)
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            subs = task.split_batch(batch, m)
            for sub in subs:
                opt.zero_grad(set_to_none=True)
                loss_sum += self.worker_gradient(task, model, sub, accum, create_graph)
                if grad_sum is not None:  # what DDP does: the gradients averaged over ranks
                    grad_sum.start(params, scale=1.0 / self.dist.world)
                    grad_sum.finish()
                if clip:
                    nn.utils.clip_grad_norm_(model.parameters(), float(clip))
                self.optimizer_step(opt)
            sched.step()
            self.end_round()
            self.step += 1
            self.samples += n_batch
            self.watch({"training loss": loss_sum / len(subs)})
            bar.update(1)
            log_due, eval_due = self.log_due(), self.eval_due()
            read = self.read_watched_if(log_due or eval_due)
            if log_due:
                row = {"loss": read["training loss"], "lr": opt.param_groups[0]["lr"]}
                row.update(round_telemetry(opt))
                self.log("train", row)
                bar.set_postfix_str(f"loss={row['loss']:.4g}")
            if eval_due:
                model.eval()
                with torch.no_grad(), autocast(self.device, tc.precision):
                    self.record_eval(task.evaluate(model))
            self.checkpoint_or_stop(ckpt_state)
        bar.close()
        self.finish([opt], n_params)
