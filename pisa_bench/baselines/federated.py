r"""Federated-learning baselines: FedAvg, FedProx, SCAFFOLD, FedNova, MOON, local-only, centralised.

No maintained package provides these for plain PyTorch, so each is a small class here, written
from its paper's update rule (cited in its docstring). They share one round structure: the
server holds the global weights ``x``; every client ``i`` (data share ``p_i = n_i / n``) starts
from ``x``, runs local steps of an ordinary local optimizer (any ``torch.optim.Optimizer``, built
fresh each round as in the NIID-Bench code the PISA paper's baselines come from) over the batches
the caller gives it for this round, and ends with weights ``y_i`` after ``tau_i`` steps; the
server then forms the new ``x``. All clients take part in every round.

The caller owns data and models: it passes the working ``model`` (which holds ``x`` between
rounds), ``make_optimizer(model)``, ``loss_fn(model, batch)`` and per round one iterable of
batches per client; an optional ``step_fn(opt)`` lets a trainer time the optimizer steps.
Parameters are aggregated; floating-point buffers (e.g. BatchNorm statistics) are averaged with
the ``p_i``; other buffers keep the last client's values.

Conventions (stated where they matter): ``eta`` is the local optimizer's current ``lr``; the
SCAFFOLD correction is applied after each local optimizer step as ``y -= eta (c - c_i)`` (for
plain SGD exactly the paper's rule; with momentum or Adam it is not amplified by the optimizer,
as in NIID-Bench); FedNova's ``a_i`` accounts for SGD momentum as in NIID-Bench.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "ALGORITHMS",
    "SCAFFOLD",
    "Central",
    "FedAlgorithm",
    "FedAvg",
    "FedNova",
    "FedProx",
    "LocalOnly",
    "Moon",
    "build_algorithm",
    "flat_params",
    "set_flat_params",
]

Batch = Any
LossFn = Callable[[nn.Module, Batch], Tensor]
MakeOptimizer = Callable[[nn.Module], Optimizer]
StepFn = Callable[[Optimizer], None]


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_params(model: nn.Module) -> Tensor:
    """The trainable parameters as one detached vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in _params(model)]).clone()


def set_flat_params(model: nn.Module, vec: Tensor) -> None:
    """Write ``vec`` (as from :func:`flat_params`) into the trainable parameters."""
    offset = 0
    with torch.no_grad():
        for p in _params(model):
            n = p.numel()
            p.copy_(vec[offset : offset + n].view_as(p))
            offset += n
    if offset != vec.numel():
        raise ValueError(f"vector of {vec.numel()} entries for {offset} parameters")


def _views(vec: Tensor, model: nn.Module) -> list[Tensor]:
    """Per-parameter views of a flat vector."""
    out, offset = [], 0
    for p in _params(model):
        out.append(vec[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _sgd_momentum(opt: Optimizer) -> float:
    """The heavy-ball momentum of a ``torch.optim.SGD`` (0 for any other optimizer)."""
    if isinstance(opt, torch.optim.SGD) and not opt.param_groups[0].get("nesterov", False):
        return float(opt.param_groups[0].get("momentum", 0.0) or 0.0)
    return 0.0


class FedAlgorithm:
    r"""FedAvg and the base of the others (McMahan et al., AISTATS 2017)::

        for each client i:  y_i <- tau_i local optimizer steps from x on F_i
        x <- x + eta_g * sum_i p_i (y_i - x)            (eta_g = server_lr, 1: x = sum_i p_i y_i)

    Subclasses change the local loss / gradient (:meth:`correct_gradient`, :meth:`client_loss`)
    and the server step (:meth:`_client_done`, :meth:`_server_update`).
    """

    name = "fedavg"
    #: keep one local optimizer per client across rounds (local-only, centralised)
    persistent_optimizers = False

    def __init__(
        self,
        model: nn.Module,
        client_weights: Sequence[float],
        make_optimizer: MakeOptimizer,
        loss_fn: LossFn,
        *,
        step_fn: StepFn | None = None,
        server_lr: float = 1.0,
        create_graph: bool = False,
    ) -> None:
        w = torch.tensor([float(v) for v in client_weights], dtype=torch.float64)
        if len(w) < 1 or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError(f"client weights must be >= 0 with a positive sum: {client_weights}")
        self.model = model
        self.p = (w / w.sum()).tolist()
        self.m = len(self.p)
        self.make_optimizer = make_optimizer
        self.loss_fn = loss_fn
        self.step_fn: StepFn = step_fn if step_fn is not None else (lambda opt: opt.step())
        self.server_lr = float(server_lr)
        self.create_graph = bool(create_graph)  # local optimizers that need Hessian products
        self.x = flat_params(model)
        self.rounds = 0
        self._optimizers: dict[int, Optimizer] = {}
        self.last_optimizer: Optimizer | None = None

    # --- hooks ---------------------------------------------------------------------------
    def client_loss(self, i: int, batch: Batch) -> Tensor:
        """Local training loss of client ``i`` on ``batch`` (FedAvg: the task loss)."""
        return self.loss_fn(self.model, batch)

    def correct_gradient(self, i: int) -> None:
        """Edit ``.grad`` before the local step (FedAvg: nothing)."""

    def after_step(self, i: int, opt: Optimizer) -> None:
        """Edit the weights after the local step (FedAvg: nothing)."""

    def _begin_round(self) -> None:
        self._acc = torch.zeros_like(self.x)

    def _client_done(self, i: int, y: Tensor, tau: int, opt: Optimizer) -> None:
        self._acc.add_(y - self.x, alpha=self.p[i])

    def _server_update(self) -> None:
        self.x = self.x + self.server_lr * self._acc

    def _start_weights(self, i: int) -> Tensor:
        return self.x

    # --- the round -----------------------------------------------------------------------
    def _optimizer(self, i: int, lr_scale: float) -> Optimizer:
        opt = self._optimizers.get(i) if self.persistent_optimizers else None
        if opt is None:
            opt = self.make_optimizer(self.model)
            for g in opt.param_groups:
                g.setdefault("fl_base_lr", g["lr"])
            if self.persistent_optimizers:
                self._optimizers[i] = opt
        for g in opt.param_groups:
            g["lr"] = g["fl_base_lr"] * lr_scale
        return opt

    def run_round(
        self, client_batches: Sequence[Iterable[Batch]], lr_scale: float = 1.0
    ) -> dict[str, Tensor | float]:
        """One communication round; returns ``loss`` (mean local training loss over all local
        steps), ``local_steps`` and ``client_drift`` ``= sqrt(sum_i p_i ||y_i - x||^2)``; the loss
        and the drift are float64 device tensors, not yet read (no device sync per local step)."""
        if len(client_batches) != self.m:
            raise ValueError(f"{len(client_batches)} clients' batches for {self.m} clients")
        self._begin_round()
        buffers = _BufferAverage(self.model)
        loss_sum, steps, drift = 0.0, 0, 0.0
        self.model.train()
        for i, batches in enumerate(client_batches):
            start = self._start_weights(i)
            set_flat_params(self.model, start)
            buffers.load_start()
            opt = self._optimizer(i, lr_scale)
            tau = 0
            for batch in batches:
                opt.zero_grad(set_to_none=True)
                loss = self.client_loss(i, batch)
                loss.backward(create_graph=self.create_graph)
                self.correct_gradient(i)
                self.step_fn(opt)
                self.after_step(i, opt)
                tau += 1
                loss_sum += loss.detach().double()
            if tau == 0:
                raise ValueError(f"client {i} got no batch this round")
            y = flat_params(self.model)
            drift += self.p[i] * (y - start).pow(2).sum().double()
            self._client_done(i, y, tau, opt)
            buffers.add(self.p[i])
            steps += tau
            self.last_optimizer = opt
        self._server_update()
        set_flat_params(self.model, self.x)
        buffers.finish()
        self.rounds += 1
        return {"loss": loss_sum / max(steps, 1), "local_steps": float(steps),
                "client_drift": drift**0.5}

    # --- evaluation and state ------------------------------------------------------------
    def eval_points(self) -> list[tuple[float, Tensor]]:
        """``(weight, flat weights)`` of the model(s) whose test metrics are reported, averaged
        with these weights: the global model, or each client's own model for local-only."""
        return [(1.0, self.x)]

    def optimizers(self) -> list[Optimizer]:
        """Optimizers whose state is the method's optimizer state (for resource accounting)."""
        if self._optimizers:
            return list(self._optimizers.values())
        return [self.last_optimizer] if self.last_optimizer is not None else []

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "x": self.x.clone(),
            "rounds": self.rounds,
            "optimizers": {i: o.state_dict() for i, o in self._optimizers.items()},
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of '{state.get('name')}' given to '{self.name}'")
        self.x = state["x"].to(self.x.device, self.x.dtype).clone()
        self.rounds = int(state["rounds"])
        for i, sd in state["optimizers"].items():
            opt = self._optimizer(int(i), 1.0)
            opt.load_state_dict(sd)
        self._load_extra_state(state["extra"])
        set_flat_params(self.model, self.x)


class _BufferAverage:
    """Average floating-point buffers (BatchNorm statistics) over clients with the ``p_i``."""

    def __init__(self, model: nn.Module) -> None:
        self.bufs = [b for b in model.buffers() if b.is_floating_point()]
        self.start = [b.detach().clone() for b in self.bufs]
        self.acc = [torch.zeros_like(b) for b in self.bufs]

    def load_start(self) -> None:
        with torch.no_grad():
            for b, s in zip(self.bufs, self.start):
                b.copy_(s)

    def add(self, weight: float) -> None:
        for a, b in zip(self.acc, self.bufs):
            a.add_(b.detach(), alpha=weight)

    def finish(self) -> None:
        with torch.no_grad():
            for b, a in zip(self.bufs, self.acc):
                b.copy_(a)


class FedAvg(FedAlgorithm):
    __doc__ = FedAlgorithm.__doc__


class FedProx(FedAlgorithm):
    r"""FedProx (Li et al., MLSys 2020): the local objective gets a proximal term::

        h_i(y) = F_i(y) + (mu / 2) ||y - x||^2      (gradient: g_i(y) + mu (y - x))

    added to the gradient before each local step; aggregation as FedAvg. ``mu = 0`` is FedAvg.
    """

    name = "fedprox"

    def __init__(self, *args: Any, mu: float = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not mu >= 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def correct_gradient(self, i: int) -> None:
        if not self.mu:
            return
        for p, x in zip(_params(self.model), _views(self.x, self.model)):
            if p.grad is not None:
                p.grad.add_(p.detach() - x, alpha=self.mu)


class SCAFFOLD(FedAlgorithm):
    r"""SCAFFOLD (Karimireddy et al., ICML 2020), control variates with option II::

        local step:   y <- y - eta (g_i(y) - c_i + c)   (the optimizer's step on g_i, then
                                                         y -= eta (c - c_i))
        after tau_i steps:  c_i+ = c_i - c + (x - y_i) / (tau_i * eta)
        server:  x <- x + eta_g sum_i p_i (y_i - x) ,   c <- c + (1/m) sum_i (c_i+ - c_i)

    ``c`` and every ``c_i`` start at zero. With every client in every round ``|S| / N = 1``.
    The paper averages ``y_i - x`` uniformly over the sampled clients; like the NIID-Bench code
    the PISA paper used, we weight it by data share ``p_i`` (the same when shares are equal).
    """

    name = "scaffold"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.c = torch.zeros_like(self.x)
        self.c_i = [torch.zeros_like(self.x) for _ in range(self.m)]

    def after_step(self, i: int, opt: Optimizer) -> None:
        eta = float(opt.param_groups[0]["lr"])
        diff = self.c - self.c_i[i]
        with torch.no_grad():
            for p, d in zip(_params(self.model), _views(diff, self.model)):
                p.add_(d, alpha=-eta)

    def _begin_round(self) -> None:
        super()._begin_round()
        self._dc = torch.zeros_like(self.x)

    def _client_done(self, i: int, y: Tensor, tau: int, opt: Optimizer) -> None:
        super()._client_done(i, y, tau, opt)
        eta = float(opt.param_groups[0]["lr"])
        new = self.c_i[i] - self.c + (self.x - y) / (tau * eta)
        self._dc.add_(new - self.c_i[i])
        self.c_i[i] = new

    def _server_update(self) -> None:
        super()._server_update()
        self.c = self.c + self._dc / self.m

    def _extra_state(self) -> dict[str, Any]:
        return {"c": self.c.clone(), "c_i": [c.clone() for c in self.c_i]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.c = state["c"].to(self.x)
        self.c_i = [c.to(self.x) for c in state["c_i"]]


class FedNova(FedAlgorithm):
    r"""FedNova (Wang et al., NeurIPS 2020): normalised averaging of the local updates::

        a_i = tau_i                                           (plain local steps)
        a_i = [tau_i - r (1 - r^tau_i) / (1 - r)] / (1 - r)   (SGD with momentum r, NIID-Bench)
        d_i = (x - y_i) / a_i
        x  <- x - eta_g * (sum_i p_i a_i) * sum_i p_i d_i

    so clients that took more steps do not pull ``x`` further. Local optimizers other than
    ``torch.optim.SGD`` count plain steps (``a_i = tau_i``).
    """

    name = "fednova"

    def _begin_round(self) -> None:
        super()._begin_round()
        self._tau_eff = 0.0

    def _client_done(self, i: int, y: Tensor, tau: int, opt: Optimizer) -> None:
        r = _sgd_momentum(opt)
        a = float(tau) if r == 0 else (tau - r * (1 - r**tau) / (1 - r)) / (1 - r)
        self._acc.add_(self.x - y, alpha=self.p[i] / a)
        self._tau_eff += self.p[i] * a

    def _server_update(self) -> None:
        self.x = self.x - self.server_lr * self._tau_eff * self._acc


class Moon(FedAlgorithm):
    r"""MOON, model-contrastive federated learning (Li, He, Song, CVPR 2021)::

        l = CE(f(y; batch)) + mu * l_con ,
        l_con = -log  exp(cos(z, z_glob)/T) / (exp(cos(z, z_glob)/T) + exp(cos(z, z_prev)/T))

    with ``z`` the representation of the batch under the local model being trained, ``z_glob``
    under the global model ``x`` and ``z_prev`` under this client's model of the previous round
    (no negative in a client's first round, where MOON is FedAvg). The representation is the
    input of the module named ``rep_module`` (the classifier head), i.e. the penultimate
    features; MOON's projection head is left out (its "no header" variant). Aggregation as
    FedAvg.
    """

    name = "moon"

    def __init__(
        self, *args: Any, mu: float = 1.0, temperature: float = 0.5,
        rep_module: str = "classifier", **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mu, self.temperature = float(mu), float(temperature)
        self.rep_module = rep_module
        self.prev: list[Tensor | None] = [None] * self.m
        self._global_net = copy.deepcopy(self.model)  # evaluated under no_grad only
        self._prev_net = copy.deepcopy(self.model)
        self._captured: dict[int, Tensor] = {}
        for net in (self.model, self._global_net, self._prev_net):
            self._hook(net)

    def _hook(self, net: nn.Module) -> None:
        try:
            head = net.get_submodule(self.rep_module)
        except AttributeError:
            raise ValueError(
                f"MOON needs the model's head module '{self.rep_module}' (its input is the "
                f"representation); set fl.rep_module"
            ) from None

        def grab(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            self._captured[id(net)] = inputs[0].flatten(1)

        head.register_forward_pre_hook(grab)

    def _rep(self, net: nn.Module, batch: Batch) -> Tensor:
        with torch.no_grad():
            self.loss_fn(net, batch)
        return self._captured.pop(id(net))

    def _begin_round(self) -> None:
        super()._begin_round()
        set_flat_params(self._global_net, self.x)
        self._global_net.eval()
        self._prev_net.eval()

    def client_loss(self, i: int, batch: Batch) -> Tensor:
        loss = self.loss_fn(self.model, batch)
        z = self._captured.pop(id(self.model))
        if not self.mu or self.prev[i] is None:
            return loss
        if getattr(self, "_prev_loaded", None) != i:
            set_flat_params(self._prev_net, self.prev[i])
            self._prev_loaded = i
        z_glob = self._rep(self._global_net, batch)
        z_prev = self._rep(self._prev_net, batch)
        logits = torch.stack([F.cosine_similarity(z, z_glob, dim=1),
                              F.cosine_similarity(z, z_prev, dim=1)], dim=1) / self.temperature
        target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        return loss + self.mu * F.cross_entropy(logits, target)

    def _client_done(self, i: int, y: Tensor, tau: int, opt: Optimizer) -> None:
        super()._client_done(i, y, tau, opt)
        self.prev[i] = y
        self._prev_loaded = None

    def _extra_state(self) -> dict[str, Any]:
        return {"prev": [None if p is None else p.clone() for p in self.prev]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.prev = [None if p is None else p.to(self.x) for p in state["prev"]]


class LocalOnly(FedAlgorithm):
    r"""Local-only training: every client trains its own model on its own data, no
    communication; each keeps its weights and its local optimizer across rounds::

        y_i <- tau_i local steps from y_i ;   reported metric: mean over clients of the
        metric of y_i (unweighted, as NIID-Bench reports it)

    All clients start from the same initial weights.
    """

    name = "local"
    persistent_optimizers = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.w = [self.x.clone() for _ in range(self.m)]

    def _start_weights(self, i: int) -> Tensor:
        return self.w[i]

    def _client_done(self, i: int, y: Tensor, tau: int, opt: Optimizer) -> None:
        self.w[i] = y

    def _server_update(self) -> None:
        self.x = sum(p * w for p, w in zip(self.p, self.w))  # only to leave sane weights

    def eval_points(self) -> list[tuple[float, Tensor]]:
        return [(1.0 / self.m, w) for w in self.w]

    def _extra_state(self) -> dict[str, Any]:
        return {"w": [w.clone() for w in self.w]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.w = [w.to(self.x) for w in state["w"]]


class Central(FedAlgorithm):
    r"""Centralised training: one model on the union of the clients' data (the caller passes
    a single "client" holding all of it), its optimizer kept across rounds; a round is the same
    local budget (``E`` epochs of the union), so the curves compare per round."""

    name = "central"
    persistent_optimizers = True


ALGORITHMS: dict[str, type[FedAlgorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, SCAFFOLD, FedNova, Moon, LocalOnly, Central)
}


def build_algorithm(
    name: str,
    model: nn.Module,
    client_weights: Sequence[float],
    make_optimizer: MakeOptimizer,
    loss_fn: LossFn,
    *,
    step_fn: StepFn | None = None,
    **hyper: Any,
) -> FedAlgorithm:
    """The algorithm ``name`` (a key of :data:`ALGORITHMS`) with its hyperparameters."""
    if name not in ALGORITHMS:
        raise KeyError(f"unknown federated method '{name}'; choose one of: {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[name]
    return cls(model, client_weights, make_optimizer, loss_fn, step_fn=step_fn, **hyper)
