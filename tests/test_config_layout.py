"""The config layout may move, run identities may not: every task x optimizer x scale, every
federated task x method x scale and every planned point of every experiment (at every scale)
composes to the identity hash recorded in ``tests/config_identities.json`` (the planned points
are checked by ``test_config_identities_planned.py``; the helpers are ``config_identities.py``).

The golden file was written from the layout before the per-task folders (``conf/task_scale/``,
``conf/task_optim/``); committed run tables (``results/*/runs.csv``, column ``identity``) and
run directories depend on these hashes. Combinations added later (a new task, optimizer or
sweep point) are not checked until the file is rewritten; rewrite it only for a change that is
meant to change what runs compute::

    python tests/config_identities.py --write
"""

from __future__ import annotations

import pytest
import yaml
from config_identities import check_unchanged, combination_identities

from pisa_bench.config import CONF_DIR, group_options, specialise_folders
from pisa_bench.identity import identity_hash


@pytest.mark.slow
def test_identities_unchanged() -> None:
    """Every task x optimizer x scale and federated task x method x scale (the planned points:
    ``test_config_identities_planned.py``)."""
    check_unchanged(combination_identities(), planned=False)


def test_a_known_target_hashes_as_its_registry_name_and_no_other() -> None:
    """The rule of identity.py's LEGACY_TARGETS (the registries became ``_target_``), one case
    each: a known class under its old name hashes as that name, any other spelling as it is."""
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


def _hubs() -> dict[str, dict]:
    return {d.name: yaml.safe_load((d / "specialise.yaml").read_text())
            for d in (CONF_DIR / "task").iterdir() if (d / "specialise.yaml").exists()}


def test_every_task_folder_is_a_task_and_picked() -> None:
    """conf/task/<task>/ belongs to task=<task>; each of its scale/ and optim/ files is an option
    of that group and picked by some task's specialise.yaml, which names its own folder last (a
    folder it shares comes first): no file is silently never read."""
    tasks, hubs = set(group_options("task")), _hubs()
    picked = {(f, kind) for hub in hubs.values() for kind in ("scale", "optim")
              for f in specialise_folders(hub, kind)}
    for d in (CONF_DIR / "task").iterdir():
        if d.is_dir():
            assert d.name in tasks, f"conf/task/{d.name}/ is no task's folder"
            assert d.name in hubs, f"conf/task/{d.name}/specialise.yaml missing"
    for kind in ("scale", "optim"):
        for task, hub in hubs.items():
            assert specialise_folders(hub, kind)[-1:] == [task], (task, kind)
        for f in (CONF_DIR / "task").glob(f"*/{kind}/*.yaml"):
            assert f.stem in group_options(kind), f"{f}: no {kind}={f.stem}"
            assert (f.parent.parent.name, kind) in picked, f"{f}: no specialise.yaml picks it"


def _keys(node: object, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    return {k for key, v in node.items() if key != "defaults" for k in _keys(v, f"{prefix}{key}.")}


def test_own_optimizer_file_overrides_a_shared_one_whole() -> None:
    """Where a task reads a related task's optim/ first (lstm1_ptb: lstm2_ptb's), its own file
    for the same optimizer sets every key the shared one sets: an optimizer's settings are read
    in one file, never half from another task's."""
    for task, hub in _hubs().items():
        folders = specialise_folders(hub, "optim")
        for own in (CONF_DIR / "task" / task / "optim").glob("*.yaml"):
            mine = _keys(yaml.safe_load(own.read_text()))
            for shared in folders[:-1]:
                other = CONF_DIR / "task" / shared / "optim" / own.name
                if other.exists():
                    left = _keys(yaml.safe_load(other.read_text())) - mine
                    assert not left, f"{own} leaves {sorted(left)} to {other}"
