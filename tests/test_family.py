"""The PISA family is told by the optimizer's class (``pisa.ConsensusOptimizer``), never by its
name: the registry, FL method resolution, the protocol's arm labels and ``relabel``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf
from torch import nn

from pisa_bench.baselines import REGISTRY, build_optimizer, family_of, needs_create_graph
from pisa_bench.baselines.registry import Spec
from pisa_bench.launch.reproduce import relabel
from pisa_bench.protocol import arm_labels
from pisa_bench.runtime import family
from pisa_bench.tasks.federated import resolve_method


@pytest.fixture
def renamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """SISA registered as ``mysisa`` (a name in no list), SGD as ``sisa_like``."""
    monkeypatch.setitem(REGISTRY, "mysisa", Spec("pisa:SISA", source="pisa"))
    monkeypatch.setitem(REGISTRY, "sisa_like", Spec("torch.optim:SGD"))


def test_registry_asks_the_class(renamed: None) -> None:
    assert REGISTRY["mysisa"].consensus and not REGISTRY["sisa_like"].consensus
    assert (family_of("mysisa"), family_of("sisa_like"), family_of("nope")) == (
        "consensus", "baseline", None)
    assert needs_create_graph({"name": "mysisa", "preconditioner": "hutchinson"})
    assert not needs_create_graph({"name": "sisa_like", "preconditioner": "hutchinson"})
    assert not needs_create_graph({"name": "mysisa"})


def test_fl_method_follows_the_class(renamed: None) -> None:
    assert resolve_method("auto", "mysisa") == "admm"
    assert resolve_method("auto", "sisa_like") == "fedavg"
    assert resolve_method("fedprox", "sisa_like") == "fedprox"
    with pytest.raises(ValueError, match="optim=mysisa is an ADMM method of its own"):
        resolve_method("fedprox", "mysisa")
    with pytest.raises(ValueError, match=r"optim=sisa_like is not one \(use optim=mysisa\|"):
        resolve_method("admm", "sisa_like")


def test_arm_labels_and_relabel_keep_the_family_names(renamed: None, tmp_path: Path) -> None:
    meta = {"split_optim_by": {"method": "fl.method"}}
    for optim, label in (("mysisa", "mysisa"), ("sisa_like", "sisa_like[method=fedavg]")):
        cfg = OmegaConf.create({"task": {"name": "t"}, "optim": {"name": optim},
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
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_class_family_is_what_the_trainer_records(name: str, companion: bool) -> None:
    """``family_of`` (the class, before any run) agrees with ``runtime.family`` (the built
    optimizer, as ``summary.json`` records it), Hybrids with a companion included: the
    analysis may fill a missing or outdated record from the class."""
    if companion and REGISTRY[name].takes == "model":
        pytest.skip("takes the whole model: no companion")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cfg = {"name": name, "lr": 0.1 if REGISTRY[name].source == "pisa" else 1e-3}
    if companion:
        cfg["companion"] = {"name": "adamw"}
    assert family(build_optimizer(model, cfg)) == family_of(name)
