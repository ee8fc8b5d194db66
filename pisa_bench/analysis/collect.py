"""Turn any set of run directories into two tidy tables.

- runs table: one row per run: every ``summary.json`` field, the identifying config fields
  (task, optim, scale, seed, name), the optimizer hyperparameters flattened as ``optim.<key>``,
  a few ``meta.*`` fields and ``run_dir``;
- curves table: every ``metrics.csv`` row, tagged with the run's identifiers.

A run directory is any directory holding a ``summary.json``; they are found recursively under
the given roots (a Hydra multirun dir, a SLURM sweep dir, ``results/``, ``outputs/``) and the
same directory reached twice (overlapping roots, symlinks) is kept once. Runs of every status
are kept: tables count diverged/failed runs instead of dropping them.

The ``family`` column (``consensus`` for the PISA family, else ``baseline``) is what tells
baselines apart in the analysis; :func:`with_family` fills it from ``summary.json``, checked
against the class of the run's optimizer.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pisa_bench.rundir import METRIC_COLUMNS, STATUSES, SUMMARY_FIELDS, read_json, read_metrics

ID_COLUMNS = ("task", "scale", "optim", "seed", "name")
CURVE_ID_COLUMNS = ("run_dir", *ID_COLUMNS, "status")
META_FIELDS = ("git_sha", "git_dirty", "device", "cpu", "host", "start_time", "slurm_job_id")


def find_run_dirs(roots: Iterable[str | os.PathLike]) -> list[Path]:
    """Directories holding a ``summary.json`` under ``roots``: resolved, deduplicated, sorted."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"no such run root: {root}")
        if (root / "summary.json").is_file():
            found.add(root.resolve())
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if "summary.json" in filenames:
                found.add(Path(dirpath).resolve())
    return sorted(found)


def flatten(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"<prefix>.a.b": 1, "<prefix>.c": "[1, 2]"}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = value
    return out


def _config_name(value: Any) -> Any:
    """A config group entry as a name: ``{"name": "adamw", ...}`` -> ``"adamw"``."""
    return value.get("name") if isinstance(value, Mapping) else value


def load_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    with open(path) as f:
        cfg = yaml.safe_load(f)
    return cfg if isinstance(cfg, dict) else {}


def run_row(run_dir: Path) -> dict[str, Any]:
    """One runs-table row from a run directory (summary + config ids + ``optim.*`` + meta)."""
    summary = read_json(run_dir / "summary.json")
    cfg = load_config(run_dir)
    row: dict[str, Any] = {key: summary.get(key) for key in SUMMARY_FIELDS}
    row.update({k: v for k, v in summary.items() if k not in row})
    for key in ID_COLUMNS:
        if row.get(key) is None:
            row[key] = _config_name(cfg.get(key))
    if isinstance(row.get("notes"), list):
        row["notes"] = "; ".join(map(str, row["notes"])) or None
    optim_cfg = cfg.get("optim")
    if isinstance(optim_cfg, Mapping):
        row.update(flatten(optim_cfg, "optim"))
    meta_path = run_dir / "meta.json"
    if meta_path.is_file():
        meta = read_json(meta_path)
        row.update({f"meta.{k}": meta.get(k) for k in META_FIELDS})
    row["run_dir"] = str(run_dir)
    return row


def run_curves(run_dir: Path, ids: Mapping[str, Any]) -> pd.DataFrame:
    """The run's ``metrics.csv`` rows (torn last line dropped) with its identifiers prepended."""
    path = run_dir / "metrics.csv"
    rows = read_metrics(path) if path.is_file() else []
    df = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    for i, col in enumerate(CURVE_ID_COLUMNS):
        df.insert(i, col, ids.get(col))
    return df


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Make object columns single-typed (mixed types -> str) so that parquet can store them."""
    df = df.copy()
    for col in [c for c in df.columns if pd.api.types.is_object_dtype(df[c])]:
        values = df[col].dropna()
        if values.map(type).nunique() > 1:
            df[col] = df[col].map(lambda v: v if v is None or v is pd.NA else str(v))
    return df


def collect(roots: Iterable[str | os.PathLike]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, curves)`` for every run directory under ``roots`` (see module docstring)."""
    rows, curves = [], []
    for run_dir in find_run_dirs(roots):
        try:
            row = run_row(run_dir)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            warnings.warn(f"skipping unreadable run {run_dir}: {e}", stacklevel=2)
            continue
        rows.append(row)
        curves.append(run_curves(run_dir, row))
    runs = pd.DataFrame(rows)
    if runs.empty:
        runs = pd.DataFrame(columns=[*SUMMARY_FIELDS, "run_dir"])
    first = [c for c in (*ID_COLUMNS, "status") if c in runs.columns]
    runs = with_family(runs[first + [c for c in runs.columns if c not in first]])
    curves_df = (
        pd.concat(curves, ignore_index=True)
        if curves
        else pd.DataFrame(columns=[*CURVE_ID_COLUMNS, *METRIC_COLUMNS])
    )
    return _arrow_safe(runs), _arrow_safe(curves_df)


def run_family(recorded: Any, optim_cfg: Mapping[str, Any] | None) -> str | None:
    """One run's family: ``summary.json``'s ``family`` (``recorded``), checked against the class
    of the run's optimizer config (``optim_cfg``: its ``_target_`` through
    :class:`pisa.ConsensusOptimizer`, as the trainer decides it today:
    :func:`pisa_bench.baselines.registry.family_of`). The class decides where the record is
    missing (summaries written before the field existed, runs that failed before building their
    optimizer) or disagrees (Muon / Shampoo Hybrids recorded ``consensus`` before the trainer
    followed a Hybrid's main optimizer); the record stands where no class is known; ``None``
    when neither tells."""
    from pisa_bench.baselines.registry import FAMILIES, family_of

    derived = family_of(optim_cfg) if optim_cfg is not None else None
    if derived is not None:
        return derived
    return str(recorded) if recorded in FAMILIES else None


def row_optim_config(target: Any, name: Any) -> dict[str, Any] | None:
    """The optimizer config of a runs-table row: its ``optim._target_``, or for a run recorded
    before configs named the class, the ``conf/optim/<name>.yaml`` its name stood for."""
    from pisa_bench.config import optim_config

    if isinstance(target, str) and target:
        return {"name": name, "_target_": target}
    try:
        return optim_config(str(name)) if isinstance(name, str) else None
    except ValueError:
        return None


def with_family(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with its ``family`` column settled by :func:`run_family` for every row (the
    optimizer's class: ``optim._target_``, else the config file of ``optim.name`` / ``optim``),
    set in place and returned."""
    none = pd.Series(None, index=runs.index, dtype=object)
    recorded = runs.get("family", none)
    names = [n if isinstance(n, str) else o if isinstance(o, str) else None for n, o in
             zip(runs.get("optim.name", none), runs.get("optim", none))]
    targets = [t if isinstance(t, str) else None for t in runs.get("optim._target_", none)]
    # one class lookup (and config file read) per distinct optimizer, not per run
    cfgs = {key: row_optim_config(*key) for key in set(zip(targets, names))}
    runs["family"] = pd.Series([run_family(r, cfgs[key]) for r, key in
                                zip(recorded, zip(targets, names))], index=runs.index)
    return runs


def status_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Runs per status, in the order of :data:`pisa_bench.rundir.STATUSES` (others last)."""
    counts = runs["status"].fillna("unknown").value_counts().to_dict()
    ordered = {s: int(counts.pop(s)) for s in STATUSES if s in counts}
    return ordered | {str(k): int(v) for k, v in sorted(counts.items())}


def _stem_path(stem: str | os.PathLike, suffix: str) -> Path:
    return Path(f"{os.fspath(stem)}{suffix}")


def write_collected(
    runs: pd.DataFrame, curves: pd.DataFrame, stem: str | os.PathLike
) -> list[Path]:
    """Write ``STEM.csv``, ``STEM.parquet``, ``STEM_curves.csv``, ``STEM_curves.parquet``."""
    _stem_path(stem, "").parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for df, suffix in ((runs, ""), (curves, "_curves")):
        csv_path, pq_path = _stem_path(stem, f"{suffix}.csv"), _stem_path(stem, f"{suffix}.parquet")
        df.to_csv(csv_path, index=False)
        df.to_parquet(pq_path, index=False)
        paths += [csv_path, pq_path]
    return paths


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def load_collected(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read a runs table written by :func:`write_collected` (``.parquet``/``.csv`` or the stem)
    and its sibling curves table when present (``None`` otherwise)."""
    path = Path(path)
    if path.suffix in (".parquet", ".csv"):
        stem, suffixes = path.with_suffix(""), (path.suffix, ".parquet", ".csv")
    else:
        stem, suffixes = path, (".parquet", ".csv")
    runs_path = next((p for s in suffixes if (p := _stem_path(stem, s)).is_file()), None)
    if runs_path is None:
        raise FileNotFoundError(f"no runs table at {path} (.parquet or .csv)")
    curves_path = next(
        (p for s in suffixes if (p := _stem_path(f"{stem}_curves", s)).is_file()), None
    )
    curves = _read_table(curves_path) if curves_path else None
    return with_family(_read_table(runs_path)), curves
