"""Checks of a task's data: every ``task.data`` key is honoured or refused (never ignored), and
the files a dataset needs are there (or :class:`~pisa_bench.errors.DatasetMissing` names them)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pisa_bench.errors import ConfigError, DatasetMissing


def require_files(directory: Path, files: Sequence[str], dataset: str) -> None:
    """Raise :class:`DatasetMissing` (listing every expected file) unless all of ``files`` are
    in ``directory``."""
    if any(not (directory / f).exists() for f in files):
        raise DatasetMissing(dataset, directory, files)


def check_dataset(data: Mapping[str, Any], names: Iterable[str]) -> str:
    """``data.name`` if it is one of ``names`` (synthetic data stands in for one too), else
    :class:`ConfigError` listing them."""
    name, choices = str(data.get("name")), sorted(names)
    if name not in choices:
        raise ConfigError("task.data.name", name, f"choose one of {', '.join(choices)}")
    return name


def loader_keys(
    data: Mapping[str, Any], keys: Mapping[str, frozenset[str]], common: Iterable[str]
) -> frozenset[str]:
    """The ``task.data`` keys a loader family reads: ``common``, those of the named dataset
    (``keys[name]``) and, with ``synthetic: true``, the stand-in's (``keys["synthetic"]``)."""
    name = check_dataset(data, [k for k in keys if k != "synthetic"])
    extra = keys["synthetic"] if data.get("synthetic") else frozenset()
    return frozenset(common) | keys[name] | extra
