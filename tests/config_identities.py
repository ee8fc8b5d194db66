"""Run identities of every task x optimizer x scale, every federated task x method x scale and
every planned point of every experiment (at every scale), and the golden file
``tests/config_identities.json`` they must match (see ``tests/test_config_layout.py``).

Two checks, in two test files so that a parallel run (``pytest -n``, one file per worker) runs
them side by side: the combinations (``test_config_layout.py``) and the planned points
(``test_config_identities_planned.py``). Rewrite the golden file only for a change that is meant
to change what runs compute::

    python tests/config_identities.py --write
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from pisa_bench.config import group_options
from pisa_bench.identity import identity_hash
from pisa_bench.launch.plan import composer, plan

GOLDEN = Path(__file__).resolve().parent / "config_identities.json"
FL_TASKS = ("fl_adult", "fl_cifar10")


def _hash(compose, overrides: list[str]) -> str:
    try:
        return identity_hash(compose(overrides))
    except Exception as e:  # a combination that does not compose stays that way
        return f"error: {type(e).__name__}"


def combination_identities() -> dict[str, str]:
    """``"<overrides>" -> identity hash`` for every task x optimizer x scale and federated task x
    method x scale."""
    out: dict[str, str] = {}
    scales = group_options("scale")
    with composer() as compose:
        for task in group_options("task"):
            for scale in scales:
                for optim in group_options("optim"):
                    ovr = [f"task={task}", f"optim={optim}", f"scale={scale}"]
                    out[" ".join(ovr)] = _hash(compose, ovr)
                if task in FL_TASKS:
                    for method in group_options("fl"):
                        ovr = [f"task={task}", f"fl={method}", f"scale={scale}"]
                        out[" ".join(ovr)] = _hash(compose, ovr)
    return out


def planned_identities() -> dict[str, str]:
    """``"<overrides>" -> identity hash`` for every planned point of every experiment and scale
    (their overrides name the experiment: ``experiment=...``)."""
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for experiment in group_options("experiment"):
            for scale in group_options("scale"):
                for p in plan(experiment, scale, out_dir=tmp).points:
                    ovr = [o for o in p.overrides if not o.startswith("paths.out_dir=")]
                    out[" ".join(ovr)] = identity_hash(p.cfg)
    return out


def is_planned(key: str) -> bool:
    """Whether a golden key is a planned point's (else a combination's)."""
    return "experiment=" in key


def check_unchanged(got: dict[str, str], planned: bool) -> None:
    """Assert that ``got`` has every golden key of its kind, each with its golden hash."""
    want = {k: v for k, v in json.loads(GOLDEN.read_text()).items() if is_planned(k) == planned}
    changed = sorted(k for k in want if k in got and got[k] != want[k])
    missing = sorted(set(want) - set(got))
    assert not changed, f"{len(changed)} identities changed, e.g. {changed[:5]}"
    assert not missing, f"{len(missing)} combinations gone, e.g. {missing[:5]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    ids = {**combination_identities(), **planned_identities()}
    GOLDEN.write_text(json.dumps(ids, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(ids)} identities to {GOLDEN}")
