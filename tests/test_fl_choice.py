"""``fl=<method>`` is a top-level choice that brings its local optimizer (``fl=fedprox`` alone:
FedProx with the paper's local SGD-momentum), an explicit ``optim=`` replaces it, and a pairing
without meaning fails with one clear line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pisa_bench.config import compose_config, group_options
from pisa_bench.tasks.federated import BASELINES, resolve_method


@pytest.mark.parametrize("method", sorted(set(group_options("fl")) - {"auto"}))
@pytest.mark.parametrize("task", ["fl_adult", "fl_cifar10"])
def test_fl_alone_selects_its_optimizer(task: str, method: str) -> None:
    cfg = compose_config([f"task={task}", f"fl={method}"])
    want = "sisa" if method == "admm" else "sgdm"
    assert cfg.fl.method == method and cfg.optim.name == want
    assert resolve_method(cfg.fl.method, cfg.optim.name) == method
    if want == "sgdm":  # the task's tuned local SGD (task/<task>/optim/sgdm.yaml) came with it
        assert cfg.optim.lr == pytest.approx(0.01) and cfg.optim.momentum == pytest.approx(0.9)
    assert cfg.fl.local_epochs == 1  # the task's own fl settings stay


def test_without_fl_the_method_follows_the_optimizer() -> None:
    cfg = compose_config(["task=fl_adult"])
    assert (cfg.fl.method, cfg.optim.name) == ("auto", "sisa")
    assert resolve_method(cfg.fl.method, cfg.optim.name) == "admm"
    cfg = compose_config(["task=fl_adult", "optim=adam"])
    assert resolve_method(cfg.fl.method, cfg.optim.name) == "fedavg"


def test_explicit_optimizer_replaces_the_methods() -> None:
    cfg = compose_config(["task=fl_adult", "fl=fedprox", "optim=adam"])
    assert (cfg.fl.method, cfg.optim.name) == ("fedprox", "adam")
    cfg = compose_config(["task=fl_adult", "fl=admm", "optim=nsisa"])
    assert (cfg.fl.method, cfg.optim.name) == ("admm", "nsisa")


def test_fl_wins_over_an_experiments_optimizer() -> None:
    cfg = compose_config(["experiment=fl_adult_heterogeneity", "fl=fedprox"])
    assert (cfg.task.name, cfg.fl.method, cfg.optim.name) == ("fl_adult", "fedprox", "sgdm")


@pytest.mark.parametrize("experiment", ["table2_heterogeneity", "fl_adult_heterogeneity"])
def test_experiment_sweep_blocks_compose_to_meaningful_pairs(experiment: str) -> None:
    base = compose_config([f"experiment={experiment}"])
    blocks = OmegaConf.to_container(base.reproduce.sweeps, resolve=True)
    assert isinstance(blocks, list) and blocks
    seen = set()
    for block in blocks:
        for method in str(block["fl"]).split(","):
            cfg = compose_config([f"experiment={experiment}", f"fl={method}",
                                  f"optim={block['optim']}"])
            assert resolve_method(cfg.fl.method, cfg.optim.name) == method
            seen.add(method)
    assert seen == {"admm", *BASELINES}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fl=scaffold", "optim=sisa"], "fl=scaffold trains each client with an ordinary local "
         "optimizer, and optim=sisa is an ADMM method of its own (fl=admm). Drop optim=sisa"),
        (["fl=admm", "optim=sgdm"], "fl=admm runs a PISA-family optimizer as ADMM clients; "
         "optim=sgdm is not one"),
    ],
)
def test_a_wrong_pairing_fails_with_one_line(run_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as e:
        run_cfg(["task=fl_adult", "scale=smoke", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fl_fedprox_alone_runs_with_local_sgd(run_cfg) -> None:
    summary, _ = run_cfg(["task=fl_adult", "scale=smoke", "fl=fedprox"])
    assert summary["status"] == "ok", summary
    assert "federated method fedprox (local optimizer sgdm)" in summary["notes"]
