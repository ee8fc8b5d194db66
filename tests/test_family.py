"""The PISA family is told by the optimizer's class (``pisa.ConsensusOptimizer``), never by its
name: the registry, FL method resolution, the protocol's arm labels and ``relabel``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf
from torch import nn

from pisa_bench.baselines import build_optimizer, family_of, needs_create_graph, spec_of
from pisa_bench.config import group_options, optim_config
from pisa_bench.launch.reproduce import relabel
from pisa_bench.protocol import arm_labels
from pisa_bench.runtime import family
from pisa_bench.tasks.federated import resolve_method

#: SISA under a name in no list, and SGD under a name like the family's
MYSISA = {"name": "mysisa", "_target_": "pisa.SISA"}
SISA_LIKE = {"name": "sisa_like", "_target_": "torch.optim.SGD"}


def test_registry_asks_the_class() -> None:
    assert spec_of(MYSISA).consensus and not spec_of(SISA_LIKE).consensus
    nope = {"name": "nope", "_target_": "torch.optim.Nope"}
    assert (family_of(MYSISA), family_of(SISA_LIKE), family_of(nope)) == (
        "consensus", "baseline", None)
    assert needs_create_graph({**MYSISA, "preconditioner": "hutchinson"})
    assert not needs_create_graph({**SISA_LIKE, "preconditioner": "hutchinson"})
    assert not needs_create_graph(MYSISA)


def test_fl_method_follows_the_class() -> None:
    assert resolve_method("auto", MYSISA) == "admm"
    assert resolve_method("auto", SISA_LIKE) == "fedavg"
    assert resolve_method("fedprox", SISA_LIKE) == "fedprox"
    with pytest.raises(ValueError, match="optim=mysisa is an ADMM method of its own"):
        resolve_method("fedprox", MYSISA)
    with pytest.raises(ValueError, match=r"sisa_like is not one \(use optim=nsisa\|pisa\|sisa,"):
        resolve_method("admm", SISA_LIKE)


def test_arm_labels_and_relabel_keep_the_family_names(tmp_path: Path) -> None:
    meta = {"split_optim_by": {"method": "fl.method"}}
    for optim, label in ((MYSISA, "mysisa"), (SISA_LIKE, "sisa_like[method=fedavg]")):
        cfg = OmegaConf.create({"task": {"name": "t"}, "optim": optim,
                                "fl": {"method": "fedavg"}})
        assert arm_labels(cfg, meta) == ("t", label)
    rows = []
    for optim, fam in (("mysisa", "consensus"), ("sisa_like", "baseline")):
        (tmp_path / optim).mkdir()
        (tmp_path / optim / "config.yaml").write_text(yaml.safe_dump({"fl": {"method": "x"}}))
        rows.append({"task": "t", "optim": optim, "family": fam,
                     "run_dir": str(tmp_path / optim)})
    runs = pd.DataFrame(rows)
    relabel(runs, None, meta)
    assert list(runs["optim"]) == ["mysisa", "sisa_like[method=x]"]


@pytest.mark.parametrize("companion", [False, True])
@pytest.mark.parametrize("name", group_options("optim"))
def test_class_family_is_what_the_trainer_records(name: str, companion: bool) -> None:
    """``family_of`` (the class, before any run) agrees with ``runtime.family`` (the built
    optimizer, as ``summary.json`` records it), Hybrids with a companion included: the
    analysis may fill a missing or outdated record from the class."""
    conf = optim_config(name)
    spec = spec_of(conf)
    if companion and spec.takes == "model":
        pytest.skip("takes the whole model: no companion")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cfg = {"name": name, "_target_": conf["_target_"], "hybrid": spec.hybrid,
           "takes": spec.takes, "lr": 0.1 if spec.source == "pisa" else 1e-3}
    if companion:
        cfg["companion"] = {"name": "adamw", "_target_": "torch.optim.AdamW"}
    assert family(build_optimizer(model, cfg)) == family_of(conf)
