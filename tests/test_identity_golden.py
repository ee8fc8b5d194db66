"""Run identities do not move: the identity hash of every composable run (task x optim x scale,
the federated methods of the federated tasks, and every experiment's planned points) equals the
one recorded in ``tests/fixtures/identity_golden.json``.

Run directories end in their identity and committed result tables (``results/*/runs.csv``) hold
it, so a change of config layout or spelling must leave these hashes as they are.

The fixture was written by ``python tests/test_identity_golden.py --write`` from the configs as
they were before the registries became ``_target_`` (commit message of the fixture). Rewrite it
only for a change that means to change what runs compute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pisa_bench.config import group_options
from pisa_bench.identity import identity_hash

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "identity_golden.json"
SCALES = ("smoke", "small", "paper")
FL_TASKS = ("fl_adult", "fl_cifar10")

pytestmark = pytest.mark.slow


def _matrix_overrides(task: str) -> list[list[str]]:
    out = [[f"task={task}", f"optim={o}", f"scale={s}"]
           for o in group_options("optim") for s in SCALES]
    if task in FL_TASKS:
        out += [[f"task={task}", f"fl={m}", f"scale={s}"]
                for m in group_options("fl") for s in SCALES]
    return out


def matrix_identities(task: str) -> dict[str, str]:
    """``"task=.. optim=.. scale=.."`` -> identity hash, for every combination of one task."""
    from pisa_bench.launch.plan import composer

    with composer() as compose:
        return {" ".join(o): identity_hash(compose(o)) for o in _matrix_overrides(task)}


def plan_identities(experiment: str) -> dict[str, str]:
    """The experiment's planned points (seed 0, its own scale): overrides -> identity hash."""
    from pisa_bench.launch.plan import plan

    p = plan(experiment, seeds=1, out_dir="/nonexistent/identity-golden")
    return {" ".join(o for o in pt.overrides if not o.startswith("paths.")): identity_hash(pt.cfg)
            for pt in p.points}


def compute() -> dict[str, dict[str, dict[str, str]]]:
    return {"matrix": {t: matrix_identities(t) for t in group_options("task")},
            "plans": {e: plan_identities(e) for e in group_options("experiment")}}


def _golden() -> dict[str, dict[str, dict[str, str]]]:
    return json.loads(FIXTURE.read_text())


def _diff(want: dict[str, str], got: dict[str, str]) -> list[str]:
    lines = [f"{k}: {want.get(k)} -> {got.get(k)}" for k in sorted(set(want) | set(got))
             if want.get(k) != got.get(k)]
    return lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])


@pytest.mark.parametrize("task", group_options("task"))
def test_matrix_identities_unchanged(task: str) -> None:
    assert not _diff(_golden()["matrix"].get(task, {}), matrix_identities(task))


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_planned_identities_unchanged(experiment: str) -> None:
    assert not _diff(_golden()["plans"].get(experiment, {}), plan_identities(experiment))


def test_a_known_target_hashes_as_its_registry_name_and_no_other() -> None:
    """The rule of identity.py's LEGACY_TARGETS, one case each."""
    h = identity_hash
    model = {"_target_": "pisa_bench.models.cifar.DenseNet", "growth": 8}
    assert h({"task": {"model": model}}) == h({"task": {"model": {"name": "densenet_cifar",
                                                                   "growth": 8}}})
    muon = {"name": "muon", "_target_": "torch.optim.Muon", "hybrid": True}
    assert h({"optim": muon}) == h({"optim": {"name": "muon"}})
    assert h({"optim": {**muon, "hybrid": False}}) != h({"optim": {"name": "muon"}})
    assert h({"optim": {"name": "mine", "_target_": "torch.optim.AdamW"}}) != h(
        {"optim": {"name": "mine"}})  # a known class under another label keeps its _target_
    assert h({"task": {"model": {"_target_": "my.Net"}}}) != h({"task": {"model": {}}})


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_identity_golden.py --write  (rewrites the fixture)")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
