"""The config layout may move, run identities may not: every task x optimizer x scale, every
federated task x method x scale and every planned point of every experiment (at every scale)
composes to the identity hash recorded in ``tests/config_identities.json``.

The golden file was written from the layout before the per-task folders (``conf/task_scale/``,
``conf/task_optim/``); committed run tables (``results/*/runs.csv``, column ``identity``) and
run directories depend on these hashes. Combinations added later (a new task, optimizer or
sweep point) are not checked until the file is rewritten; rewrite it only for a change that is
meant to change what runs compute::

    python tests/test_config_layout.py --write
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

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


def identities() -> dict[str, str]:
    """``"<overrides>" -> identity hash`` for every combination and planned point."""
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
    with tempfile.TemporaryDirectory() as tmp:
        for experiment in group_options("experiment"):
            for scale in scales:
                for p in plan(experiment, scale, out_dir=tmp).points:
                    ovr = [o for o in p.overrides if not o.startswith("paths.out_dir=")]
                    out[" ".join(ovr)] = identity_hash(p.cfg)
    return out


@pytest.mark.slow
def test_identities_unchanged() -> None:
    want = json.loads(GOLDEN.read_text())
    got = identities()
    changed = sorted(k for k in want if k in got and got[k] != want[k])
    missing = sorted(set(want) - set(got))
    assert not changed, f"{len(changed)} identities changed, e.g. {changed[:5]}"
    assert not missing, f"{len(missing)} combinations gone, e.g. {missing[:5]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    ids = identities()
    GOLDEN.write_text(json.dumps(ids, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(ids)} identities to {GOLDEN}")
