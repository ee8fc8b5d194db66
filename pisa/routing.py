"""Parameter routing: hidden matrices to a main optimizer (NSISA, Muon), the rest to a companion.

As in the paper's GPT-2 code (and Muon's usual setup): the orthogonalised update suits the hidden
weight matrices; embeddings, the output head and vectors (biases, norms) go to AdamW.
:func:`split_hidden_matrices` decides, :class:`Hybrid` runs both as one ``torch.optim.Optimizer``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import distributed as pdist
from .protocol import is_consensus, picklable_state

__all__ = [
    "DEFAULT_EXCLUDE",
    "Hybrid",
    "NoHiddenMatrices",
    "hybrid",
    "hybrid_nsisa",
    "split_hidden_matrices",
]

#: name patterns of >= 2-D parameters that are *not* hidden matrices (embeddings, heads)
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "lm_head",
    "head",
    "classifier",
    "wte",
    "wpe",
    "embed",
    "unembed",
    "cls_token",
)

OptimizerFactory = Callable[[list[nn.Parameter]], Optimizer]


class NoHiddenMatrices(ValueError):
    """:func:`hybrid` found no hidden matrices for the main optimizer."""


def _matches(name: str, pattern: str) -> bool:
    """Glob patterns (``*?[``) match the whole dotted name; a plain pattern matches where a
    dotted component, or a ``_``-separated word of one, starts with it (``head`` matches
    ``lm_head`` and ``heads`` but not ``multihead_attn``; ``embed`` matches ``pos_embed`` and
    ``embeddings``)."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return re.search(r"(?:^|[._])" + re.escape(pattern), name) is not None


def split_hidden_matrices(
    model: nn.Module,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    *,
    require_2d: bool = False,
    named: bool = False,
    trainable_only: bool = True,
) -> tuple[list[Any], list[Any]]:
    """Split ``model``'s parameters into ``(hidden, rest)``.

    Hidden: ``ndim >= 2`` (exactly 2 with ``require_2d``, e.g. for ``torch.optim.Muon``), not
    owned by an ``nn.Embedding`` / ``nn.EmbeddingBag`` and whose name matches none of ``exclude``
    (see :func:`_matches`). Tied parameters appear once. With ``named=True`` both lists hold
    ``(name, parameter)`` pairs.
    """
    embedding_ids = {
        id(p)
        for mod in model.modules()
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag))
        for p in mod.parameters(recurse=False)
    }
    hidden: list[Any] = []
    rest: list[Any] = []
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        is_matrix = p.ndim == 2 if require_2d else p.ndim >= 2
        is_hidden = (
            is_matrix
            and id(p) not in embedding_ids
            and not any(_matches(name, pat) for pat in exclude)
        )
        item = (name, p) if named else p
        (hidden if is_hidden else rest).append(item)
    return hidden, rest


class _Groups(Sequence[dict[str, Any]]):
    """``Hybrid.param_groups``: the main optimizer's groups, then the companion's (the same
    dicts), read live, so a group added to either or replaced by its ``load_state_dict`` shows
    at once."""

    def __init__(self, optimizers: tuple[Optimizer, ...]) -> None:
        self._optimizers = optimizers

    def _groups(self) -> list[dict[str, Any]]:
        return [g for opt in self._optimizers for g in opt.param_groups]

    def __getitem__(self, index: Any) -> Any:
        return self._groups()[index]

    def __len__(self) -> int:
        return sum(len(opt.param_groups) for opt in self._optimizers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._groups())

    def __repr__(self) -> str:
        return repr(self._groups())


class _State(Mapping[Tensor, Any]):
    """``Hybrid.state``: both optimizers' per-parameter state, read live (each parameter is in
    one of them)."""

    def __init__(self, optimizers: tuple[Optimizer, ...]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, param: Tensor) -> Any:
        for opt in self._optimizers:
            if param in opt.state:  # never ``opt.state[param]`` first: it is a defaultdict
                return opt.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[Tensor]:
        return (p for opt in self._optimizers for p in opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class Hybrid(Optimizer):
    """A main optimizer and a companion optimizer stepped as one.

    A composition: ``main`` and ``companion`` own their groups and state; the Hybrid is a
    ``torch.optim.Optimizer`` (LR schedulers, step hooks, closures, ``torch.compile``'s graph
    break work as for any) that differs from a plain one where ownership demands it, since a
    copy of the groups would go stale when torch's ``load_state_dict`` replaces them:
    ``param_groups`` is a live read-only sequence of the main's groups, then the companion's
    (the same dicts, so a scheduler's ``group['lr']`` reaches them); ``state`` a live read-only
    mapping of every parameter's state; ``add_param_group`` refuses a new group (add it to
    ``main`` or ``companion``; ``param_groups`` shows it at once); ``state_dict`` nests both
    optimizers'. ``step()`` steps the main optimizer on every call. The companion:

    * main is a PISA-family optimizer in virtual mode with ``m > 1`` workers: the companion's
      gradients are accumulated over the ``m`` worker calls with the worker weights ``alpha_i``
      and the companion steps once per round, on ``sum_i alpha_i g_i`` (the full-batch gradient,
      left in the companion parameters' ``.grad``); they do not move inside a round.
    * distributed mode (``torch.distributed`` with world size > 1, or ``distributed=True``): the
      companion's gradients are averaged across ranks (weighted by the main's worker weights when
      it has them) before it steps; a main optimizer without its own communication (not
      PISA-family, e.g. Muon) gets its gradients averaged too, as DDP would. The companion's
      all-reduce (persistent buckets, :class:`pisa.distributed.GradientSum`) is started before
      the main optimizer's step and waited on after it, so it travels in the same round as the
      main's consensus buckets, overlapping the main's local step.
    * otherwise it steps on every call (a main optimizer without ``round_done`` makes every step
      a round).

    ``n_workers``, ``worker_index``, ``round_done`` and ``telemetry()`` are the main optimizer's
    (1, 0, True, ``{}`` when it is not a :class:`~pisa.ConsensusOptimizer`), so a Hybrid always
    satisfies that protocol. ``state_dict`` holds both optimizers' states and the accumulation
    buffers; ``copy.deepcopy`` / ``pickle`` copy everything.

    Schedulers: ``defaults`` has a ``momentum`` key and every group carries one, so momentum
    schedulers (``OneCycleLR`` with its default ``cycle_momentum=True``) run on the wrapper: the
    main's ``momentum`` (NSISA's ``mu``, Muon's, SGD's) is cycled directly; for a group with
    ``betas`` (AdamW) and no momentum of its own, ``group['momentum']`` mirrors ``betas[0]``
    and a change made by a scheduler is copied into ``betas[0]`` at the next ``step()`` (what
    ``OneCycleLR`` does for a plain AdamW).

    Args:
        main: the optimizer of the hidden matrices (a PISA-family optimizer, Muon, ...).
        companion: the optimizer of the rest, or ``None``.
        distributed: ``None``: the main's mode (PISA-family) or auto (world size > 1).
        bucket_mb: distributed mode: MiB per bucket of the gradient all-reduces (``None``: one
            bucket per device and dtype); the main's consensus has its own ``bucket_mb``.
        comm_dtype: distributed mode: the dtype the gradient sums travel in (``None``: the
            gradients' dtype); the main's consensus has its own ``comm_dtype``.
    """

    def __init__(
        self,
        main: Optimizer,
        companion: Optimizer | None = None,
        *,
        distributed: bool | None = None,
        bucket_mb: float | None = 25.0,
        comm_dtype: torch.dtype | None = None,
    ) -> None:
        pdist.check_bucketing(bucket_mb, comm_dtype)
        main_ids = {id(p) for g in main.param_groups for p in g["params"]}
        if companion is not None:
            shared = [p for g in companion.param_groups for p in g["params"] if id(p) in main_ids]
            if shared:
                raise ValueError("a parameter is in both the main and the companion optimizer")
        self.main = main
        self.companion = companion
        # hooks, step patching; the groups are the optimizers' own (see add_param_group)
        super().__init__([g for _, g in self._owned_groups()], {})
        self._attach_views()
        self._main_is_pisa = is_consensus(main)
        if distributed is None and self._main_is_pisa and hasattr(main, "distributed"):
            self._distributed = bool(main.distributed)
        else:
            self._distributed = pdist.resolve_distributed(distributed)
        self._accum: dict[Tensor, Tensor] = {}
        #: persistent gradient all-reduces of the companion and of a main without its own
        self._grad_sums = {
            key: pdist.GradientSum(bucket_mb, comm_dtype) for key in ("main", "companion")
        }
        merged = {k: v for k, v in {**(companion.defaults if companion else {}),
                                     **main.defaults}.items() if k != "betas"}
        merged.setdefault("momentum", 0.0)
        self.defaults = merged
        #: (optimizer, group position) of groups whose ``momentum`` mirrors ``betas[0]`` -> the
        #: value last mirrored
        self._beta1_mirror: dict[tuple[str, int], float] = {}
        for key, group in self._owned_groups():
            if "momentum" not in group and "betas" in group:
                group["momentum"] = group["betas"][0]
                self._beta1_mirror[key] = group["betas"][0]

    # ---------------------------------------------------------------- optimizer plumbing
    def _optimizers(self) -> tuple[Optimizer, ...]:
        return (self.main,) if self.companion is None else (self.main, self.companion)

    def _attach_views(self) -> None:
        """``param_groups`` and ``state`` as live views over both optimizers."""
        self.param_groups = _Groups(self._optimizers())  # type: ignore[assignment]
        self.state = _State(self._optimizers())  # type: ignore[assignment]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refuse a new group (``RuntimeError``): add it to ``main`` or ``companion``, which
        ``param_groups`` shows at once. A group one of them holds already is accepted as is
        (how ``Optimizer.__init__`` registers them)."""
        if not any(param_group is g for _, g in self._owned_groups()):
            raise RuntimeError("add the group to Hybrid.main or Hybrid.companion instead")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main.zero_grad(set_to_none=set_to_none)
        if self.companion is not None:
            self.companion.zero_grad(set_to_none=set_to_none)

    def _owned_groups(self) -> list[tuple[tuple[str, int], dict[str, Any]]]:
        """``((owner, position), group)`` for every group of the main and the companion."""
        out = [(("main", i), g) for i, g in enumerate(self.main.param_groups)]
        if self.companion is not None:
            out += [(("companion", i), g) for i, g in enumerate(self.companion.param_groups)]
        return out

    def _companion_params(self) -> list[Tensor]:
        if self.companion is None:
            return []
        return [p for g in self.companion.param_groups for p in g["params"] if p.requires_grad]

    # ---------------------------------------------------------------- main's attributes
    @property
    def n_workers(self) -> int:
        """The main optimizer's worker count (1 when it has no rounds)."""
        return int(self.main.n_workers) if self._main_is_pisa else 1  # type: ignore[attr-defined]

    @property
    def worker_index(self) -> int:
        """The main optimizer's next worker (0 when it has no rounds)."""
        return int(self.main.worker_index) if self._main_is_pisa else 0  # type: ignore[attr-defined]

    @property
    def round_done(self) -> bool:
        """True after the ``step()`` that closed the main optimizer's round (always without)."""
        return bool(self.main.round_done) if self._main_is_pisa else True  # type: ignore[attr-defined]

    @property
    def distributed(self) -> bool:
        """True in distributed mode (see the class docstring)."""
        return self._distributed

    @property
    def requires_create_graph(self) -> bool:
        """True when either optimizer needs ``backward(create_graph=True)``."""
        return any(
            bool(getattr(o, "requires_create_graph", False)) for o in (self.main, self.companion)
        )

    @property
    def worker_weights(self) -> list[float]:
        """The main optimizer's ``alpha_i`` (equal weights when it has none)."""
        if hasattr(self.main, "worker_weights"):
            return list(self.main.worker_weights)
        return [1.0 / self.n_workers] * self.n_workers

    def set_worker_weights(self, weights: Sequence[float]) -> None:
        """Set the main optimizer's ``alpha_i`` (``AttributeError`` when it has none)."""
        if not hasattr(self.main, "set_worker_weights"):
            raise AttributeError(f"{type(self.main).__name__} has no worker weights")
        self.main.set_worker_weights(weights)

    @property
    def track_residuals(self) -> bool:
        """The main optimizer's ``track_residuals`` (False when it has none); settable between
        rounds (no effect on a main optimizer without it)."""
        return bool(getattr(self.main, "track_residuals", False))

    @track_residuals.setter
    def track_residuals(self, on: bool) -> None:
        if hasattr(self.main, "track_residuals"):
            self.main.track_residuals = on  # type: ignore[attr-defined]

    def telemetry(self) -> dict[str, float]:
        """The main optimizer's :meth:`~pisa.PISA.telemetry` (``{}`` when it has none)."""
        return dict(self.main.telemetry()) if self._main_is_pisa else {}  # type: ignore[attr-defined]

    def _sync_beta1(self) -> None:
        """Copy a scheduler's change of a mirrored ``group['momentum']`` into ``betas[0]``."""
        groups = dict(self._owned_groups())
        for key, last in self._beta1_mirror.items():
            group = groups[key]
            if group["momentum"] != last:
                group["betas"] = (group["momentum"], *group["betas"][1:])
            elif group["betas"][0] != last:  # betas edited directly: follow them
                group["momentum"] = group["betas"][0]
            self._beta1_mirror[key] = group["momentum"]

    # ---------------------------------------------------------------- the step
    def _virtual_rounds(self) -> bool:
        return self._main_is_pisa and not self._distributed and self.n_workers > 1

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step the main optimizer (one worker's step or a round) and, when the round is done
        (every call for a main without rounds), the companion on the round's gradient.

        Virtual rounds: the companion's ``.grad`` of each call is accumulated with the worker's
        ``alpha_i``; at the round's last call ``.grad`` is replaced by ``sum_i alpha_i g_i`` and
        the companion steps. Distributed: the companion's gradients (and, for a main without its
        own communication, the main's) are all-reduced first; a parameter without ``.grad`` on
        every rank keeps ``None`` (skipped, as torch does). Excluded from ``torch.compile``.

        Args:
            closure: optional loss closure, run once with gradients enabled before stepping.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_beta1()
        if self._main_is_pisa:
            alpha = self.worker_weights[self.worker_index]
        else:
            alpha = 1.0 / pdist.world_size() if self._distributed else 1.0
        params = self._companion_params()
        companion_sum = self._grad_sums["companion"]
        if self._distributed and self.companion is not None:
            companion_sum.start(params, alpha)  # in flight during the main's step
        if self._distributed and not self._main_is_pisa:
            main_sum = self._grad_sums["main"]
            main_sum.start(self._params_of(self.main), 1.0 / pdist.world_size())
            main_sum.finish()
        self.main.step()
        if self.companion is None:
            return loss
        if self._virtual_rounds():
            for p in params:
                if p.grad is None:
                    continue
                buf = self._accum.get(p)
                if buf is None:
                    buf = self._accum[p] = torch.zeros_like(p.grad)
                buf.add_(p.grad.detach(), alpha=alpha)
            if self.round_done:
                for p in params:
                    buf = self._accum.pop(p, None)
                    if buf is None:
                        p.grad = None
                    elif p.grad is None:
                        p.grad = buf
                    else:
                        p.grad.copy_(buf)
                self.companion.step()
        elif self._distributed:
            companion_sum.finish()
            self.companion.step()
        else:
            self.companion.step()
        return loss

    @staticmethod
    def _params_of(opt: Optimizer) -> list[Tensor]:
        return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"main": ..., "companion": ..., "hybrid": {"grad_accum": [...]}}``: both
        optimizers' state dicts and the companion's gradient accumulators of an unfinished
        virtual round (``None`` entries outside a round)."""
        params = self._companion_params()
        return {
            "main": self.main.state_dict(),
            "companion": None if self.companion is None else self.companion.state_dict(),
            "hybrid": {"grad_accum": [self._accum.get(p) for p in params]},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into both optimizers (``ValueError`` when the companion's
        parameter count differs)."""
        self.main.load_state_dict(state_dict["main"])
        if self.companion is not None:
            self.companion.load_state_dict(state_dict["companion"])
        params = self._companion_params()
        saved = state_dict.get("hybrid", {}).get("grad_accum", [])
        if saved and len(saved) != len(params):
            raise ValueError("state_dict has a different number of companion parameters")
        self._accum = {
            p: buf.to(device=p.device, dtype=p.dtype).clone()
            for p, buf in zip(params, saved)
            if buf is not None
        }
        for key, group in self._owned_groups():
            if key in self._beta1_mirror:
                group.setdefault("momentum", group["betas"][0])
                self._beta1_mirror[key] = group["momentum"]

    def __getstate__(self) -> dict[str, Any]:
        """Everything (both optimizers, accumulators), so deepcopy / pickle continue exactly;
        the gradient all-reduce buffers start afresh and the views are rebuilt on load."""
        state = picklable_state(self)
        state["_grad_sums"] = {
            key: pdist.GradientSum(gs.bucket_mb, gs.comm_dtype)
            for key, gs in self._grad_sums.items()
        }
        del state["param_groups"], state["state"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._attach_views()
        self.__dict__.setdefault(
            "_grad_sums", {key: pdist.GradientSum() for key in ("main", "companion")}
        )

    def __repr__(self) -> str:
        return f"Hybrid(\n  main={self.main!r},\n  companion={self.companion!r}\n)"


def _build_companion(
    spec: str | OptimizerFactory, params: list[nn.Parameter], kwargs: dict[str, Any]
) -> Optimizer:
    if callable(spec):
        return spec(params, **kwargs)
    name = spec.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, **{"lr": 1e-3, **kwargs})
    if name == "sisa":
        from .sisa import SISA

        return SISA(params, **kwargs)
    raise ValueError(
        f"unknown companion {spec!r}: use 'adamw', 'adam', 'sgd', 'sisa' or a callable"
    )


def hybrid(
    model: nn.Module,
    main: OptimizerFactory,
    companion: str | OptimizerFactory = "adamw",
    *,
    companion_kwargs: dict[str, Any] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    require_2d: bool = False,
    distributed: bool | None = None,
    bucket_mb: float | None = 25.0,
) -> Hybrid:
    """``Hybrid(main(hidden), companion(rest))`` with :func:`split_hidden_matrices`: the one
    builder of hybrids (``NoHiddenMatrices`` when nothing is left for ``main``).

    ``main`` / ``companion`` are callables ``params -> Optimizer`` (``companion`` also a name:
    ``adamw``, ``adam``, ``sgd``, ``sisa``, built with ``companion_kwargs``). The companion is
    omitted when there is nothing left for it; ``bucket_mb`` is :class:`Hybrid`'s (the gradient
    all-reduces in distributed mode). Example (the Muon baseline)::

        hybrid(model, lambda ps: torch.optim.Muon(ps, lr=0.02), require_2d=True,
               companion_kwargs={"lr": 3e-4, "betas": (0.9, 0.95)})
    """
    hidden, rest = split_hidden_matrices(model, exclude, require_2d=require_2d)
    if not hidden:
        raise NoHiddenMatrices("the model has no hidden matrices for the main optimizer")
    main_opt = main(hidden)
    comp = _build_companion(companion, rest, dict(companion_kwargs or {})) if rest else None
    return Hybrid(main_opt, comp, distributed=distributed, bucket_mb=bucket_mb)


def hybrid_nsisa(
    model: nn.Module,
    *,
    companion: str | OptimizerFactory = "adamw",
    companion_kwargs: dict[str, Any] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    **nsisa_kwargs: Any,
) -> Hybrid:
    """NSISA on the hidden matrices and ``companion`` (AdamW) on the rest, as the paper's GPT-2
    code. ``nsisa_kwargs`` go to :class:`~pisa.NSISA` (``lr``, ``sigma``, ``n_workers``, ...).
    The official run used AdamW with ``betas=(0.9, 0.95)``, ``lr=0.0036`` for embeddings/head.
    In distributed mode ``bucket_mb`` also cuts the companion's gradient all-reduce;
    ``comm_dtype`` is the consensus' only (the companion's gradients travel in their dtype)."""
    from .nsisa import NSISA

    distributed = nsisa_kwargs.get("distributed")
    return hybrid(
        model,
        lambda ps: NSISA(ps, **nsisa_kwargs),
        companion,
        companion_kwargs=companion_kwargs,
        exclude=exclude,
        distributed=distributed,
        bucket_mb=nsisa_kwargs.get("bucket_mb", 25.0),
    )

