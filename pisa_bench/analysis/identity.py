"""A run's identity: what it computes, whatever its seed, paths and bookkeeping.

Two runs with the same identity differ only by seed: tables pool them into one row (and only
them: adamw at lr 1e-3 and at lr 0.3 are two rows, labelled by what differs). Two runs with the
same identity *and* seed are a duplicate, flagged and counted once (the earliest).

The identity itself is defined in :mod:`pisa_bench.identity`; here it is read from the run
directory's ``summary.json`` (``identity``) when the run recorded it, and otherwise recomputed
from ``config.yaml`` (:func:`identity_of`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pisa_bench.analysis.collect import load_config
from pisa_bench.identity import identity_config, identity_hash

SUMMARY_KEYS = ("identity", "identity_hash")


def identity_of(run_dir: str | Path) -> str | None:
    """The run's identity: the one ``summary.json`` recorded, else from ``config.yaml``
    (``None`` when neither exists)."""
    d = Path(run_dir)
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    for key in SUMMARY_KEYS:
        if isinstance(summary, dict) and summary.get(key):
            return str(summary[key])
    cfg = load_config(d)
    return identity_hash(cfg) if cfg else None


def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def differing_keys(configs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Flattened keys whose value is not the same in every config (absent counts as a value)."""
    flats = [flat(identity_config(c)) for c in configs]
    keys = sorted({k for f in flats for k in f})
    missing = object()
    return [k for k in keys if len({repr(f.get(k, missing)) for f in flats}) > 1]


def short_key(key: str) -> str:
    """``optim.lr`` -> ``lr``; ``fl.method`` -> ``fl.method`` (optimizer keys lose the prefix)."""
    return key[len("optim."):] if key.startswith("optim.") else key


REFERENCE_METHODS = ("local", "central")  # federated references: shown, never the baseline


def _method(cfg: Mapping[str, Any]) -> Any:
    fl = cfg.get("fl")
    return fl.get("method") if isinstance(fl, Mapping) else None


def label_identities(runs: pd.DataFrame) -> pd.DataFrame:
    """Copy of a runs table with ``identity`` and ``label`` columns.

    ``label``: the optimizer name, plus ``[k=v,...]`` of the hyperparameters that differ
    between the identities sharing that (task, scale, optimizer name); a plain name when one
    identity has it. ``duplicate``: True for every run after the first (by ``meta.start_time``,
    then run directory) of an (identity, seed) pair. ``reference``: a federated reference
    (``fl.method`` local-only or centralised). Rows whose run directory is gone are identified
    by their own ``task`` / ``scale`` / ``optim.*`` columns.
    """
    df = runs.copy()
    if df.empty:
        return df.assign(identity=pd.Series(dtype=object), label=pd.Series(dtype=object),
                         duplicate=pd.Series(dtype=bool), reference=pd.Series(dtype=bool))
    cfgs = {str(rd): load_config(Path(str(rd))) for rd in df["run_dir"]}
    for rd, c in cfgs.items():
        if not c:  # a runs table without its run directories: what the row itself says
            row = df[df["run_dir"].astype(str) == rd].iloc[0]
            cfgs[rd] = {k: (None if pd.isna(v) else v) for k, v in row.items()
                        if k in ("task", "scale", "optim") or str(k).startswith("optim.")}
    df["identity"] = [identity_hash(cfgs[str(rd)]) for rd in df["run_dir"]]
    df["reference"] = [str(_method(cfgs[str(rd)])) in REFERENCE_METHODS for rd in df["run_dir"]]
    labels = {}
    for _, g in df.groupby(["task", "scale", "optim"], dropna=False, sort=False):
        ids = list(dict.fromkeys(g["identity"]))
        if len(ids) == 1:
            labels.update({i: str(g["optim"].iloc[0]) for i in g.index})
            continue
        first = {i: cfgs[str(g.loc[g["identity"] == i, "run_dir"].iloc[0])] for i in ids}
        keys = differing_keys(first.values())
        for ident in ids:
            f = flat(identity_config(first[ident]))
            parts = ",".join(f"{short_key(k)}={f.get(k, '-')}" for k in keys)
            name = f"{g['optim'].iloc[0]}[{parts}]" if parts else f"{g['optim'].iloc[0]}"
            for i in g.index[g["identity"] == ident]:
                labels[i] = name
    df["label"] = pd.Series(labels)
    order = df.sort_values([c for c in ("meta.start_time", "run_dir") if c in df]).index
    dup = df.loc[order].duplicated(subset=["identity", "seed"], keep="first")
    df["duplicate"] = dup.reindex(df.index).fillna(False).astype(bool)
    return df
