r"""Federated learning under data heterogeneity (``task=fl_adult``, ``task=fl_cifar10``).

The PISA paper's data-heterogeneity study: ``m`` clients hold partitions of the training set
(``task.partition``: ``iid``, ``label<k>``, ``dir<beta>``, ``qty<beta>``; see
:mod:`pisa_bench.data.partition`), the server holds a global model, and every method gets the
same number of communication rounds (``train.max_steps``). Metric: the global model's test
accuracy, logged every ``train.eval_every`` rounds.

Which method runs (``fl.method``, the top-level config group ``fl=``, which brings its local
optimizer: ``fl=admm`` selects ``optim=sisa``, every baseline ``optim=sgdm``; an explicit ``optim=``
replaces it):

- ``admm``: the PISA family (``optim=sisa|pisa|nsisa``, any class following
  :class:`pisa.ConsensusOptimizer`) as ADMM clients. The optimizer runs in
  virtual-worker mode with ``n_workers = m`` and ``alpha_i = n_i / n``; in each round every
  client computes its gradient on its own data at the global weights and takes one
  preconditioned local step (``optimizer.step()``), the ``m``-th step forms the global weights.
  ``fl.admm.gradient``: ``batch_sum`` (the tasks' default: the official code accumulates
  ``loss.backward()`` of every mini-batch mean loss over the client's data, i.e.
  ``ceil(n_i / B) * grad F_i``, ``F_i`` the client's mean loss, and the paper's sigma, rho and
  lambda are tuned for that scale; computed here as that multiple of the exact mean gradient,
  equal to the official sum in expectation over the shuffle and exactly when ``B`` divides
  ``n_i``), ``mean`` (``grad F_i`` itself) or ``minibatch`` (one mini-batch of ``B`` per round).
  The paper's sigma schedule ``sigma /= sigma_factor`` every ``sigma_every`` rounds with rho
  fixed is applied through the param groups (``lr = 1/(sigma+rho)``, see :func:`set_sigma_rho`);
  ``fl.admm.bias_correction=official`` reproduces the official code's frozen bias correction
  ``1 - beta`` (SISA) by scaling rho by ``sqrt((1 - beta^t) / (1 - beta))``.
- ``fedavg``, ``fedprox``, ``scaffold``, ``fednova``, ``moon``, ``local``, ``central``:
  :mod:`pisa_bench.baselines.federated`, with ``optim=`` (any non-PISA optimizer; the paper:
  SGD with momentum, ``optim=sgdm``) as the clients' local optimizer for ``fl.local_epochs`` epochs
  (or ``fl.local_steps`` steps) of ``train.batch_size`` batches per round. ``local``: every
  client trains alone (metric: mean over the clients' models); ``central``: one model on the
  union of the data, one pass of the same local budget per round.
- ``auto`` (the default): ``admm`` for a PISA-family optimizer, else ``fedavg`` with it.

A PISA-family optimizer with a baseline method, or ``admm`` with another optimizer, is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from pisa_bench.baselines.federated import (
    ALGORITHMS,
    FedAlgorithm,
    build_algorithm,
    set_flat_params,
)
from pisa_bench.baselines.registry import CONSENSUS, family_of, needs_create_graph
from pisa_bench.config import group_options, optim_config
from pisa_bench.data.partition import label_counts, parse_scheme, partition
from pisa_bench.data.split import carve_validation
from pisa_bench.models import build_model
from pisa_bench.runtime import round_telemetry
from pisa_bench.schedules import lr_multiplier
from pisa_bench.tasks.base import Task, to_device
from pisa_bench.trainer import Trainer

__all__ = ["ADMMClients", "Federated", "resolve_method", "set_sigma_rho", "sigma_rho"]

BASELINES = tuple(ALGORITHMS)


def consensus_names() -> list[str]:
    """The PISA-family choices of ``optim=`` (for messages: told by their classes)."""
    return [n for n in group_options("optim") if family_of(optim_config(n)) == CONSENSUS]


def resolve_method(method: str, optim_cfg: Mapping[str, Any] | str) -> str:
    """The method that runs for ``fl.method`` and the optimizer config ``optim_cfg`` (or the
    name of a ``conf/optim`` file) with ``auto`` resolved; raises ``ValueError`` for a
    combination that has no meaning. The family is the optimizer class's
    (:func:`~pisa_bench.baselines.registry.family_of`)."""
    if isinstance(optim_cfg, str):
        optim_cfg = optim_config(optim_cfg)
    optim = str(optim_cfg.get("name"))
    pisa = family_of(optim_cfg) == CONSENSUS
    if method == "auto":
        return "admm" if pisa else "fedavg"
    if method == "admm":
        if not pisa:
            raise ValueError(
                f"fl=admm runs a PISA-family optimizer as ADMM clients; optim={optim} is not one "
                f"(use optim={'|'.join(consensus_names())}, or fl=fedavg to train clients with "
                f"{optim})"
            )
        return method
    if method not in BASELINES:
        raise ValueError(f"unknown fl.method '{method}'; choose auto, admm or one of {BASELINES}")
    if pisa:
        raise ValueError(
            f"fl={method} trains each client with an ordinary local optimizer, and optim={optim} "
            f"is an ADMM method of its own (fl=admm). Drop optim={optim} (fl={method} brings the "
            f"paper's local SGD, optim=sgdm) or give a non-PISA optimizer."
        )
    return method


# --- ADMM clients ---------------------------------------------------------------------------
def sigma_rho(group: dict[str, Any]) -> tuple[float, float]:
    """``(sigma_t, rho_t)`` of a PISA-family param group at its current ``lr``."""
    sigma = group["sigma"] * group["lr0"] / group["lr"]
    return sigma, 1.0 / group["lr"] - sigma


def set_sigma_rho(group: dict[str, Any], sigma: float, rho: float) -> None:
    """Give a PISA-family param group the penalties ``(sigma, rho)`` from its next round on.

    The library reads ``sigma_t = group['sigma'] * group['lr0'] / group['lr']`` and
    ``rho_t = 1 / lr - sigma_t``, so ``lr = 1 / (sigma + rho)`` and
    ``group['sigma'] = sigma * lr / lr0`` set both (``lr0`` unchanged).
    """
    if not (sigma > 0 and rho > 0):
        raise ValueError(f"sigma and rho must be > 0, got {sigma}, {rho}")
    lr = 1.0 / (sigma + rho)
    group["lr"] = lr
    group["sigma"] = sigma * lr / group["lr0"]


class ADMMClients:
    r"""A PISA-family optimizer in virtual-worker mode driven as ``m`` federated clients.

    Round ``t`` (1-based), for each client ``i``: zero the gradients, accumulate client ``i``'s
    gradient at the global weights over its batches, ``optimizer.step()``. Before the round the
    penalties of every PISA group are set to::

        sigma_t = sigma_0 * s_t / f_t ,   rho_t = rho_0 * b_t / f_t
        s_t = sigma_factor ** -floor((t - 1) / sigma_every)        (the paper's sigma schedule)
        b_t = sqrt((1 - beta^t) / (1 - beta))  if bias_correction == 'official' else 1
        f_t = the lr multiplier of train.schedule (ratio-keeping; 1 when constant)

    ``(sigma_0, rho_0)`` are the optimizer's values when this object is made.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        count_fn: Callable[[Any], int],
        client_sizes: Sequence[int],
        *,
        step_fn: Callable[[torch.optim.Optimizer], None] | None = None,
        gradient: str = "batch_sum",
        batch_size: int = 64,
        sigma_every: int | None = None,
        sigma_factor: float | None = None,
        bias_correction: str = "paper",
        create_graph: bool = False,
    ) -> None:
        if gradient not in ("mean", "batch_sum", "minibatch"):
            raise ValueError(f"fl.admm.gradient must be mean, batch_sum or minibatch: {gradient}")
        if bias_correction not in ("paper", "official"):
            raise ValueError(f"fl.admm.bias_correction must be paper or official: "
                             f"{bias_correction}")
        m = int(getattr(opt, "n_workers", 1))
        if m != len(client_sizes):
            raise ValueError(f"optimizer has n_workers={m} for {len(client_sizes)} clients")
        self.model, self.opt, self.loss_fn, self.count_fn = model, opt, loss_fn, count_fn
        self.sizes = [int(n) for n in client_sizes]
        self.step_fn = step_fn if step_fn is not None else (lambda o: o.step())
        self.gradient = gradient
        # batch_sum: the client's loss is its mean loss times its number of mini-batches
        self.scale = [math.ceil(n / int(batch_size)) if gradient == "batch_sum" else 1
                      for n in self.sizes]
        self.sigma_every = int(sigma_every or 0)
        self.sigma_factor = float(sigma_factor or 1.0)
        self.bias_correction = bias_correction
        self.create_graph = create_graph  # Hutchinson preconditioner: Hessian-vector products
        self.pisa_groups = [g for g in opt.param_groups if "sigma" in g and "lr0" in g]
        if not self.pisa_groups:
            raise ValueError("ADMM clients need a PISA-family optimizer")
        if bias_correction == "official" and any("beta" not in g for g in self.pisa_groups):
            raise ValueError("fl.admm.bias_correction=official applies to SISA (a beta) only")
        self.base = [sigma_rho(g) for g in self.pisa_groups]
        self.rounds = 0  # completed rounds (the library's bias-correction counter t - 1)
        self.other_groups = [g for g in opt.param_groups if g not in self.pisa_groups]
        self.other_lr = [g["lr"] for g in self.other_groups]

    def _set_round(self, t: int, lr_scale: float) -> None:
        s = self.sigma_factor ** -((t - 1) // self.sigma_every) if self.sigma_every else 1.0
        for g, (sigma0, rho0) in zip(self.pisa_groups, self.base):
            b = 1.0
            if self.bias_correction == "official":
                beta = float(g["beta"])
                b = math.sqrt((1 - beta**t) / (1 - beta))
            set_sigma_rho(g, sigma0 * s / lr_scale, rho0 * b / lr_scale)
        for g, lr in zip(self.other_groups, self.other_lr):
            g["lr"] = lr * lr_scale

    def run_round(self, client_batches: Sequence[Any], lr_scale: float = 1.0) -> dict[str, Tensor]:
        """One round; returns ``loss`` ``= sum_i alpha_i F_i(w)`` (the clients' mean losses at the
        global weights, weighted by data share), a float64 device tensor not yet read (the
        optimizer's telemetry is read at the log cadence: :func:`round_telemetry`)."""
        opt = self.opt
        if not getattr(opt, "round_done", True):
            raise RuntimeError("a round is already under way")
        self._set_round(self.rounds + 1, lr_scale)
        self.model.train()
        losses = []
        for i, batches in enumerate(client_batches):
            opt.zero_grad(set_to_none=True)
            loss_sum, n_seen = 0.0, 0
            for batch in batches:
                n = self.count_fn(batch)
                loss = self.loss_fn(self.model, batch)
                weight = 1.0 if self.gradient == "minibatch" else self.scale[i] * n / self.sizes[i]
                (loss * weight).backward(create_graph=self.create_graph)
                loss_sum += loss.detach().double() * n
                n_seen += n
            if n_seen == 0:
                raise ValueError(f"client {i} got no batch this round")
            self.step_fn(opt)
            losses.append(loss_sum / n_seen)
        if not getattr(opt, "round_done", True):
            raise RuntimeError("the optimizer did not complete its round after m client steps")
        self.rounds += 1
        total = sum(self.sizes)
        return {"loss": sum(n * v for n, v in zip(self.sizes, losses)) / total}

    def eval_points(self) -> list[tuple[float, Tensor | None]]:
        return [(1.0, None)]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.rounds = int(state["rounds"])


# --- the task -------------------------------------------------------------------------------
class Federated(Task):
    """Clients, partitions and the round loop; data from ``task.data.kind`` (tabular | images)."""

    @classmethod
    def accepted_data_keys(cls, data: DictConfig) -> frozenset[str]:
        from pisa_bench.data.images import image_data_keys
        from pisa_bench.data.tabular import tabular_data_keys

        keys = {"tabular": tabular_data_keys, "images": image_data_keys}.get(str(data.get("kind")))
        if keys is None:
            from pisa_bench.errors import ConfigError

            raise ConfigError("task.data.kind", data.get("kind"), "choose one of images, tabular")
        return keys(data) | {"kind", "val_fraction"}

    def setup(self) -> None:
        d = self.tcfg.data
        kind = str(d.get("kind", "tabular"))
        if kind == "tabular":
            from pisa_bench.data.tabular import load_tabular

            data = load_tabular(d, self.data_dir)
            self.mean = self.std = None
        elif kind == "images":
            from pisa_bench.data.images import load_images

            data = load_images(d, self.data_dir)
            self.mean = torch.tensor(data.mean).view(1, -1, 1, 1)
            self.std = torch.tensor(data.std).view(1, -1, 1, 1)
        else:
            raise ValueError(f"task.data.kind must be tabular or images, got {kind}")
        self.kind = kind
        if data.note:
            self.notes.append(data.note)
        # task.data.val_fraction: a held-out share of the training data (before partitioning)
        # on which the global model is also scored (val_accuracy / val_loss), for selection
        self.train_x, self.train_y, self.val_x, self.val_y = carve_validation(
            data.train_x, data.train_y, d.get("val_fraction"))
        if self.val_x is not None:
            self.notes.append(f"validation split: {len(self.val_y)} training examples held out "
                              f"before partitioning (val_accuracy / val_loss)")
        self.test_x, self.test_y = data.test_x, data.test_y
        self.num_classes = int(data.num_classes)
        self.m = int(self.tcfg.n_clients)
        self.scheme = parse_scheme(str(self.tcfg.partition))
        pseed = self.tcfg.get("partition_seed")
        self.parts = partition(
            self.train_y, self.m, self.scheme, int(self.seed if pseed is None else pseed),
            num_classes=self.num_classes, min_size=int(self.tcfg.get("partition_min_size", 10)),
        )
        self.sizes = [len(p) for p in self.parts]
        counts = label_counts(self.train_y, self.parts, self.num_classes)
        held = [int((c > 0).sum()) for c in counts]
        self.notes.append(
            f"partition {self.scheme} over {self.m} clients: sizes {self.sizes}, labels held "
            f"{held}"
        )

    # --- model, loss, evaluation ---------------------------------------------------------
    def build_model(self) -> nn.Module:
        x = self.train_x
        if self.kind == "tabular":
            return build_model(self.tcfg.model, in_features=x.shape[1],
                               num_classes=self.num_classes)
        return build_model(self.tcfg.model, in_channels=x.shape[1], num_classes=self.num_classes,
                           image_size=x.shape[-1])

    def _inputs(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x.float()
        return (x.float() / 255.0 - self.mean) / self.std

    def _batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return to_device((self._inputs(self.train_x[idx]), self.train_y[idx]), self.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def count(self, batch: Any) -> int:
        return int(batch[1].shape[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``accuracy`` / ``loss`` on test and, with a validation split, ``val_accuracy`` /
        ``val_loss`` on it."""
        out = self._scores(model, self.test_x, self.test_y)
        if self.val_x is not None:
            out.update({f"val_{k}": v for k, v in
                        self._scores(model, self.val_x, self.val_y).items()})
        return out

    def _scores(self, model: nn.Module, xs: Tensor, ys: Tensor) -> dict[str, float]:
        bs = int(self.cfg.train.eval_batch_size)
        correct, loss_sum, n = 0, 0.0, len(xs)
        model.eval()
        for i in range(0, n, bs):
            x = self._inputs(xs[i : i + bs]).to(self.device)
            y = ys[i : i + bs].to(self.device)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return {"accuracy": 100.0 * correct / n, "loss": loss_sum / n}

    # --- batches of one round --------------------------------------------------------------
    def _generator(self, rnd: int, client: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + rnd) * 10_007 + client)

    def _local_batches(self, idx: Tensor, rnd: int, client: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``fl.local_steps`` batches, or ``fl.local_epochs`` shuffled passes, of ``idx``."""
        fl = self.cfg.fl
        bs = min(int(self.cfg.train.batch_size), len(idx))
        steps = fl.get("local_steps")
        if steps is not None and len(idx) == len(self.train_y) and self.m > 1:
            steps = int(steps) * self.m  # central: the clients' steps together
        g = self._generator(rnd, client)
        done = 0
        epoch = 0
        while True:
            perm = idx[torch.randperm(len(idx), generator=g)]
            for j in range(0, len(perm), bs):
                if steps is not None and done >= int(steps):
                    return
                yield self._batch(perm[j : j + bs])
                done += 1
            epoch += 1
            if steps is None and epoch >= int(fl.local_epochs):
                return

    def _admm_batches(self, idx: Tensor, rnd: int, client: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``minibatch``: one random batch; else the client's data in large fixed chunks."""
        bs = min(int(self.cfg.train.batch_size), len(idx))
        if str(self.cfg.fl.admm.gradient) == "minibatch":
            g = self._generator(rnd, client)
            yield self._batch(idx[torch.randperm(len(idx), generator=g)[:bs]])
            return
        chunk = max(int(self.cfg.train.eval_batch_size), bs)
        for j in range(0, len(idx), chunk):
            yield self._batch(idx[j : j + chunk])

    def _round_samples(self, method: str) -> int:
        fl, bs = self.cfg.fl, int(self.cfg.train.batch_size)
        if method == "admm":
            mode = str(fl.admm.gradient)
            return sum(min(bs, n) for n in self.sizes) if mode == "minibatch" else sum(self.sizes)
        steps = fl.get("local_steps")
        if steps is not None:
            if method == "central":
                return min(bs, sum(self.sizes)) * int(steps) * self.m
            return sum(min(bs, n) * int(steps) for n in self.sizes)
        return int(fl.local_epochs) * sum(self.sizes)

    # --- the loop --------------------------------------------------------------------------
    def _build_method(self, trainer: Trainer, model: nn.Module, method: str) -> Any:
        fl = self.cfg.fl
        alphas = [n / sum(self.sizes) for n in self.sizes]
        create_graph = needs_create_graph(self.cfg.optim)
        if method == "admm":
            ocfg = OmegaConf.create(OmegaConf.to_container(self.cfg.optim, resolve=True))
            with open_dict(ocfg):
                ocfg.n_workers = self.m
                ocfg.worker_weights = alphas
            opt = trainer.make_optimizer(model, ocfg)
            a = fl.admm
            return ADMMClients(
                model, opt, self.loss, self.count, self.sizes, step_fn=trainer.optimizer_step,
                gradient=str(a.gradient), batch_size=int(self.cfg.train.batch_size),
                sigma_every=a.get("sigma_every"),
                sigma_factor=a.get("sigma_factor"),
                bias_correction=str(a.get("bias_correction", "paper")), create_graph=create_graph,
            )
        hyper: dict[str, Any] = {"server_lr": float(fl.get("server_lr", 1.0)),
                                 "create_graph": create_graph}
        if method in ("fedprox", "moon"):
            hyper["mu"] = float(fl.mu)
        if method == "moon":
            hyper["temperature"] = float(fl.temperature)
            hyper["rep_module"] = str(fl.get("rep_module", "classifier"))
        weights = [1.0] if method == "central" else alphas
        return build_algorithm(method, model, weights, trainer.make_optimizer, self.loss,
                               step_fn=trainer.optimizer_step, **hyper)

    def _round_batches(self, method: str, rnd: int) -> list[Iterator[Any]]:
        if method == "admm":
            return [self._admm_batches(p, rnd, i) for i, p in enumerate(self.parts)]
        if method == "central":
            return [self._local_batches(torch.cat(self.parts), rnd, 0)]
        return [self._local_batches(p, rnd, i) for i, p in enumerate(self.parts)]

    def _evaluate_points(self, model: nn.Module, algo: Any) -> dict[str, float]:
        points = algo.eval_points()
        if len(points) == 1 and points[0][1] is None:
            return self.evaluate(model)
        out: dict[str, float] = {}
        accs = []
        for w, vec in points:
            set_flat_params(model, vec)
            res = self.evaluate(model)
            accs.append(res["accuracy"])
            for k, v in res.items():
                out[k] = out.get(k, 0.0) + w * v
        if isinstance(algo, FedAlgorithm):
            set_flat_params(model, algo.x)
        if len(points) > 1:
            out["accuracy_min"], out["accuracy_max"] = min(accs), max(accs)
        return out

    def run(self, trainer: Trainer) -> None:
        if trainer.dist.world > 1:
            raise ValueError("federated tasks simulate their clients in one process; "
                             "run them without torchrun")
        tc = self.cfg.train
        optim_name = str(self.cfg.optim.name)
        method = resolve_method(str(self.cfg.fl.method), self.cfg.optim)
        detail = "ADMM clients" if method == "admm" else f"local optimizer {optim_name}"
        self.notes.append(f"federated method {method} ({detail})")
        model = self.build_model().to(self.device)
        algo = self._build_method(trainer, model, method)
        total = trainer.max_steps = int(tc.max_steps)
        spec = OmegaConf.to_container(tc.schedule, resolve=True)
        assert isinstance(spec, dict)
        lr_at = lr_multiplier(spec, total)
        state = trainer.load_checkpoint()
        if state is not None:
            algo.load_state_dict(state["method"])
            model.load_state_dict(state["model"])
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_train = len(self.train_y)
        per_round = self._round_samples(method)
        bar = trainer.progress(total, initial=trainer.step)
        while trainer.step < total:
            batches = self._round_batches(method, trainer.step)
            row = algo.run_round(batches, lr_scale=lr_at(trainer.step))
            trainer.end_round()
            trainer.step += 1
            trainer.samples += per_round
            trainer.epoch = trainer.samples // n_train
            trainer.watch({"training loss": row["loss"]})  # read now on CPU, at the cadence on GPU
            bar.update(1)
            log_due, eval_due = trainer.log_due(), trainer.eval_due()
            trainer.read_watched_if(log_due or eval_due)
            if log_due:
                lr = algo.opt.param_groups[0]["lr"] if method == "admm" else (
                    algo.last_optimizer.param_groups[0]["lr"] if algo.last_optimizer else math.nan)
                telemetry = round_telemetry(algo.opt) if method == "admm" else {}
                trainer.log("train", {**{k: float(v) for k, v in row.items()}, **telemetry,
                                      "lr": lr})
            if eval_due:
                trainer.record_eval(self._evaluate_points(model, algo))
            trainer.checkpoint_or_stop(
                lambda: {"model": model.state_dict(), "method": algo.state_dict()})
        bar.close()
        trainer.finish(algo.optimizers(), n_params)
