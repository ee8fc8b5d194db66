"""The plan of a sweep: an ``experiment=`` config expanded into points, each with its run
directory and status, before anything runs.

An experiment (``conf/experiment/<name>.yaml``) names its sweep the way Hydra's basic sweeper
reads it, ``hydra.sweeper.params`` (``optim: sisa,adamw``, ``seed: 0,1,2``), so that
``python run.py -m experiment=<name>`` runs it too. Its optional ``reproduce:`` block adds what
a plain cartesian product cannot say (read by :func:`plan`, ignored by run.py)::

    reproduce:
      title: "Fig. 1: ..."                     # title of the rendered table / figures
      sweeps:                                  # union of blocks, each a dict of sweep params
        - {}                                   #   laid over hydra.sweeper.params ({}: as is)
        - {task: gpt2_finetune, optim: "nsisa,adamw"}
      scale_sweeps: {paper: [...]}             # blocks used instead of `sweeps` at that scale
      split_task_by: {layers: task.model.num_layers}  # variants of one task: own table rows
      split_optim_by: {method: fl.method}             # variants of one optimizer: own rows

Every point is composed exactly as ``run.py`` would compose it (Hydra's compose API), so its
run directory (:func:`pisa_bench.record.run_dir_for`) is known before anything runs. Points
whose run is finished (status ok / diverged) are skipped; points a live launcher is already
running (:mod:`pisa_bench.launch.ledger`) are skipped too; the rest go to a launcher
(:mod:`pisa_bench.launch.launchers`). Running the same command again therefore relaunches
exactly the incomplete runs, which resume from their checkpoints.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pisa_bench.config import CONF_DIR
from pisa_bench.launch.ledger import read_in_flight
from pisa_bench.record import run_dir_for
from pisa_bench.rundir import OUTCOMES, run_status


# --- the plan ---------------------------------------------------------------------------------
@dataclass
class Point:
    """One run of a sweep: its overrides (as on run.py's command line) and its run directory."""

    overrides: list[str]
    cfg: DictConfig
    run_dir: Path
    status: str | None = None  # summary.json status before launching (None: never started)
    tags: dict[str, Any] = field(default_factory=dict)  # the protocol's, e.g. {"lr_mult": 0.1}

    @property
    def label(self) -> str:
        c = self.cfg
        extra = "".join(f" {k}={v}" for k, v in self.tags.items())
        return f"{c.task.name}/{c.optim.name} {c.scale} seed={c.seed}{extra}"

    @property
    def finished(self) -> bool:
        return self.status in OUTCOMES

    def command(self) -> str:
        """The equivalent single-run command line."""
        return "python run.py " + " ".join(_quote(o) for o in self.overrides)


@dataclass
class Plan:
    """An experiment's points, split by what has to happen to them."""

    experiment: str
    name: str  # config `name` (first level of the run directories)
    scale: str
    out_dir: Path
    base_overrides: list[str]  # experiment=, scale=, paths.out_dir= (common to every point)
    task_overrides: list[str]  # base + the user's overrides (may hold sweeps: a,b)
    hydra_overrides: list[str]  # hydra/... and hydra.... overrides (launcher settings)
    meta: dict[str, Any]  # the experiment's `reproduce:` block
    points: list[Point]
    in_flight: dict[Path, dict[str, Any]] = field(default_factory=dict)  # run dir -> ledger entry

    @property
    def runs_root(self) -> Path:
        return self.out_dir / "runs" / self.name

    @property
    def done(self) -> list[Point]:
        return [p for p in self.points if p.finished]

    @property
    def busy(self) -> list[Point]:
        return [p for p in self.points if not p.finished and p.run_dir in self.in_flight]

    @property
    def todo(self) -> list[Point]:
        return [p for p in self.points if not p.finished and p.run_dir not in self.in_flight]

    def refresh(self) -> None:
        """Re-read every point's status and the in-flight ledger."""
        for p in self.points:
            p.status = run_status(p.run_dir)
        self.in_flight = read_in_flight(self.runs_root)

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for p in self.done:
            counts[str(p.status)] = counts.get(str(p.status), 0) + 1
        done = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        resumable = sum(1 for p in self.todo if p.status is not None)
        parts = [f"{len(self.points)} runs in the sweep",
                 f"{len(self.done)} already finished, skipped" + (f" ({done})" if done else ""),
                 f"{len(self.todo)} to run" + (f" ({resumable} resume a checkpoint or restart)"
                                              if resumable else "")]
        if self.busy:
            pids = sorted({str(e.get("pid")) for e in self.in_flight.values()})
            parts.append(f"{len(self.busy)} in flight in another launcher (pid {', '.join(pids)})"
                         ", skipped")
        return f"{self.experiment} [{self.scale}]: " + "; ".join(parts)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def is_hydra_override(o: str) -> bool:
    key = o.lstrip("+~")
    return key.startswith(("hydra.", "hydra/"))


@contextmanager
def composer() -> Iterator[Callable[..., DictConfig]]:
    """``compose(overrides, with_hydra=False)`` inside one Hydra initialisation (fast)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def _compose(overrides: Sequence[str], with_hydra: bool = False) -> DictConfig:
            return compose("config", overrides=list(overrides), return_hydra_config=with_hydra)

        yield _compose


def _as_sweep_value(v: Any) -> str:
    """A sweep param value as Hydra override text (``[1, 2]`` -> ``1,2``)."""
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def expand(params: dict[str, Any], arguments: Sequence[str]) -> list[list[str]]:
    """The cartesian product of ``params`` (``key: "a,b"``) and ``arguments`` (overrides), in
    the order and with the semantics of Hydra's basic sweeper: one dimension per key, in the
    order the keys first appear, a later override of a key replacing the earlier one (so an
    argument replaces the param of the same key). Only Hydra's public override parser is used."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    texts = [f"{k}={_as_sweep_value(v)}" for k, v in params.items()] + list(arguments)
    dims: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(texts):
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ValueError(f"{key}: only lists (a,b,c), range() and choice() sweeps are "
                                 "supported")
            dims[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            dims[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(p) for p in itertools.product(*dims.values())]


def _blocks(meta: dict[str, Any], scale: str) -> list[dict[str, Any]]:
    by_scale = meta.get("scale_sweeps") or {}
    blocks = by_scale.get(scale) if scale in by_scale else meta.get("sweeps")
    return list(blocks) if blocks else [{}]


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def plan(
    experiment: str,
    scale: str | None = None,
    seeds: int | None = None,
    out_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> Plan:
    """Compose ``experiment=<experiment>`` and every point of its sweep; read their statuses.

    ``overrides``: extra run.py overrides; ``key=a,b`` replaces that sweep dimension,
    ``hydra...`` ones go to the launcher. ``seeds``: seeds 0..seeds-1 instead of the
    experiment's. ``out_dir``: ``paths.out_dir`` (absolute, so that jobs elsewhere agree).
    """
    hydra_ovr = [o for o in overrides if is_hydra_override(o)]
    base = [f"experiment={experiment}"]
    if scale:
        base.append(f"scale={scale}")
    points: list[Point] = []
    seen: set[Path] = set()
    with composer() as compose:
        if out_dir is None:  # pin the configured out_dir as an absolute path (jobs agree)
            out_dir = str(compose(base).paths.out_dir)
        base.append(f"paths.out_dir={Path(out_dir).resolve()}")
        args = [*base, *(o for o in overrides if not is_hydra_override(o))]
        if seeds is not None:
            if seeds < 1:
                raise ValueError("--seeds must be >= 1")
            args.append("seed=" + ",".join(str(s) for s in range(seeds)))
        head = compose(base, with_hydra=True)  # hydra_ovr: applied by launch_hydra
        params = OmegaConf.to_container(head.hydra.sweeper.params or {}, resolve=False)
        assert isinstance(params, dict)
        meta_node = head.get("reproduce")
        meta = OmegaConf.to_container(meta_node, resolve=True) if meta_node is not None else {}
        assert isinstance(meta, dict)
        for block in _blocks(meta, str(head.scale)):
            block_params = {**params, **{str(k): v for k, v in dict(block).items()}}
            for ovr in expand(block_params, args):
                cfg = compose(ovr)
                rd = run_dir_for(cfg)
                if rd in seen:  # the same run reached from two blocks
                    continue
                seen.add(rd)
                points.append(Point(ovr, cfg, rd, run_status(rd)))
    p = Plan(experiment=experiment, name=str(head.name), scale=str(head.scale),
             out_dir=Path(str(head.paths.out_dir)).resolve(), base_overrides=base,
             task_overrides=args,
             hydra_overrides=hydra_ovr, meta=meta, points=points)
    p.in_flight = read_in_flight(p.runs_root)
    return p
