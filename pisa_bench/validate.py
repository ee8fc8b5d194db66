"""Check a resolved config before any run directory exists, so a typo leaves no ``failed`` record.

:func:`validate` raises :class:`ConfigError` (a ``ValueError``) whose message is one line naming
the key, the value given and the valid range or choices. What it checks:

- ``seed`` and the ``train`` keys the shared loop reads: types and ranges; ``train.schedule``
  through :func:`pisa_bench.schedules.lr_multiplier` itself;
- the task: ``task.cls`` is a :class:`~pisa_bench.tasks.base.Task` subclass, ``task.model._target_``
  (where given) an importable model class or factory,
  ``task.explode_above`` (if set) is a number > 0, and every ``task.data`` key is one that the
  task and its loader read (:meth:`Task.accepted_data_keys`);
- the optimizer: ``optim._target_`` is an importable optimizer class; every numeric default of
  ``conf/optim/<name>.yaml`` is given a number; then the optimizer is built, as the run would
  build it, on a tiny dummy model, so that torch's, pytorch-optimizer's and pisa's own checks
  (e.g. SISA's ``lr < 1/sigma``) run. When one refuses, the hyperparameter to blame is found by
  setting the changed keys one at a time on the defaults, and named in the error.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pisa_bench.baselines.registry import RESERVED, Incompatible, Spec, build_optimizer, spec_of
from pisa_bench.config import CONF_DIR
from pisa_bench.errors import ConfigError
from pisa_bench.schedules import SCHEDULES, lr_multiplier


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value of ``cfg`` (see the module doc)."""
    _check_int("seed", cfg.get("seed"), 0, allow_negative=True)
    _check_train(cfg)
    _check_task(cfg)
    _check_optimizer(cfg.optim)


# --- plain values ---------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_int(
    key: str, v: Any, low: int, nullable: bool = False, allow_negative: bool = False
) -> None:
    if v is None and nullable:
        return
    if not _is_int(v) or (not allow_negative and v < low):
        rng = "an integer" if allow_negative else f"an integer >= {low}"
        raise ConfigError(key, v, rng + (" or null" if nullable else ""))


def _check_choice(key: str, v: Any, choices: tuple[str, ...]) -> None:
    if str(v).lower() not in choices:
        raise ConfigError(key, v, f"choose one of {', '.join(choices)}")


def _check_train(cfg: DictConfig) -> None:
    tc = cfg.train
    epochs = tc.get("epochs")
    if epochs is None:
        _check_int("train.max_steps", tc.get("max_steps"), 1)
    elif not _is_number(epochs) or not epochs > 0:
        raise ConfigError("train.epochs", epochs, "a number > 0 or null (then train.max_steps)")
    for key in ("batch_size", "eval_batch_size"):
        if key in tc:
            _check_int(f"train.{key}", tc.get(key), 1)
    for key in ("eval_every", "log_every", "ckpt_every"):
        if key in tc:
            _check_int(f"train.{key}", tc.get(key), 0, nullable=True)
    if "threads" in tc:
        _check_int("train.threads", tc.get("threads"), 1, nullable=True)
    if "preempt_at_step" in tc:
        _check_int("train.preempt_at_step", tc.get("preempt_at_step"), 0, nullable=True)
    device = str(tc.get("device", "auto"))
    if device not in ("auto", "cpu", "cuda") and not (
        device.startswith("cuda:") and device[5:].isdigit()
    ):
        raise ConfigError("train.device", device, "choose one of auto, cpu, cuda, cuda:<index>")
    _check_choice("train.precision", tc.get("precision", "auto"), ("auto", "bf16", "fp32"))
    _check_choice("train.progress", tc.get("progress", "auto"), ("auto", "true", "false"))
    clip = tc.get("grad_clip")
    if clip is not None and (not _is_number(clip) or not clip > 0):
        raise ConfigError("train.grad_clip", clip, "a number > 0 or null (no clipping)")
    spec = OmegaConf.to_container(tc.schedule, resolve=True) if "schedule" in tc else {}
    assert isinstance(spec, dict)
    _check_choice("train.schedule.name", spec.get("name", "constant"), SCHEDULES)
    try:
        f = lr_multiplier(spec, 10)
        for t in (0, 5, 9):
            f(t)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError("train.schedule", spec, _one_line(e)) from None


# --- the task ---------------------------------------------------------------------------------
def _check_task(cfg: DictConfig) -> None:
    from pisa_bench.tasks.base import Task

    where = str(cfg.task.get("cls"))
    try:
        module, name = where.split(":")
        cls = getattr(importlib.import_module(module), name)
    except (ValueError, ImportError, AttributeError) as e:
        expected = f"a Task class as module:Class ({_one_line(e)})"
        raise ConfigError("task.cls", where, expected) from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError("task.cls", where, "a subclass of pisa_bench.tasks.base.Task")
    model = cfg.task.get("model")
    if isinstance(model, DictConfig) and "_target_" in model:
        from pisa_bench.models import model_factory

        try:
            model_factory(model._target_)
        except ValueError as e:
            raise ConfigError("task.model._target_", str(model._target_),
                              _one_line(e).split(": ", 1)[-1]) from None
    limit = cfg.task.get("explode_above")
    if limit is not None and (not _is_number(limit) or not limit > 0):
        raise ConfigError("task.explode_above", limit, "a number > 0 or null (the default)")
    data = cfg.task.get("data")
    frac = data.get("val_fraction") if isinstance(data, DictConfig) else None
    if frac is not None and (not _is_number(frac) or not 0 <= frac < 1):
        raise ConfigError("task.data.val_fraction", frac,
                          "a number in [0, 1) or null (no validation split)")
    if isinstance(data, DictConfig):
        accepted_keys = getattr(cls, "accepted_data_keys", None)
        accepted = accepted_keys(data) if accepted_keys is not None else None
        if accepted is not None:
            for key in data:
                if key not in accepted:
                    raise ConfigError(
                        f"task.data.{key}",
                        data.get(key),
                        f"not read by task {cfg.task.get('name')} with dataset "
                        f"'{data.get('name')}'; its keys are {', '.join(sorted(accepted))}",
                    )


# --- the optimizer ------------------------------------------------------------------------
class _Dummy(nn.Module):
    """Two hidden matrices, vectors and a ``head``: enough for every optimizer and hybrid."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.body(x)))


def _leaves(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _with(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of nested dict ``d`` with the leaf at dotted ``path`` set to ``value``."""
    out = dict(d)
    head, _, rest = path.partition(".")
    if rest:
        out[head] = _with(dict(out.get(head) or {}), rest, value)
    else:
        out[head] = value
    return out


def _defaults(name: str) -> dict[str, Any]:
    path = CONF_DIR / "optim" / f"{name}.yaml"
    if not path.is_file():
        return {"name": name}
    d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(d, dict)
    return {**d, "name": name}


def _build(ocfg: dict[str, Any]) -> BaseException | None:
    try:
        with torch.random.fork_rng(devices=[]):
            build_optimizer(_Dummy(), ocfg)
    except Incompatible:
        return None  # about the model, not the config: the run says so itself
    except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as e:
        return e
    return None


#: Modules whose optimizer constructors only check and store (built on a dummy model here).
LIBRARIES = ("pisa", "torch.optim", "pytorch_optimizer")

#: The valid range of common hyperparameters, added to messages that do not state it.
RANGES = {
    "lr": "a number > 0",
    "eps": "a number >= 0",
    "weight_decay": "a number >= 0",
    "momentum": "a number in [0, 1)",
    "betas": "numbers in [0, 1)",
}


def _check_optimizer(optim: DictConfig) -> None:
    name = str(optim.get("name"))
    try:
        spec = spec_of(optim)
        spec.cls()
    except ValueError as e:
        key, _, rest = _one_line(e).partition("=")
        if not key.startswith("optim."):
            raise ConfigError("optim._target_", optim.get("_target_"), _one_line(e)) from None
        raise ConfigError(key, optim.get(key[len("optim."):]), rest.split(": ", 1)[-1]) from None
    given = OmegaConf.to_container(optim, resolve=True)
    assert isinstance(given, dict)
    base = _defaults(name)
    base_leaves = dict(_leaves(base))
    for key, value in _leaves(given):
        default = base_leaves.get(key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"optim.{key}", value, "true or false")
        if _is_number(default) and not (_is_number(value) or value is None):
            raise ConfigError(f"optim.{key}", value, f"a number (default {default})")
    params = _accepted_kwargs(spec)
    if params is not None:
        for key in given:
            if key not in params and key not in RESERVED:
                raise ConfigError(
                    f"optim.{key}",
                    given[key],
                    f"not a hyperparameter of {name}; it takes {', '.join(sorted(params))}",
                )
    if spec.target.rsplit(".", 1)[0] not in LIBRARIES or _build(given) is None:
        return  # (an optimizer registered from elsewhere, e.g. by a test, is not built twice)
    changed = [(k, v) for k, v in _leaves(given) if base_leaves.get(k, _MISSING) != v]
    candidates = [_with(base, k, v) for k, v in changed]  # one at a time on the defaults ...
    probe = base
    for k, v in changed:  # ... then cumulatively: the first key that breaks the build
        probe = _with(probe, k, v)
        candidates.append(probe)
    for (key, value), ocfg in zip(changed + changed, candidates):
        err = _build(ocfg)
        if err is not None:
            message = f"invalid for {name}: {_one_line(err)}"
            leaf = key.rsplit(".", 1)[-1]
            if spec.source != "pisa" and leaf in RANGES:
                message += f" (valid: {RANGES[leaf]})"
            raise ConfigError(f"optim.{key}", value, message)
    raise ConfigError("optim", name, f"cannot be built: {_one_line(_build(given) or '')}")


_MISSING = object()


def _accepted_kwargs(spec: Spec) -> set[str] | None:
    """Keyword names the optimizer's constructor takes (None: it takes ``**kwargs``)."""
    sig = inspect.signature(spec.cls().__init__)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {k for k in sig.parameters if k not in ("self", "params", "model")}


# --- helpers for the loaders' key checks ------------------------------------------------------
