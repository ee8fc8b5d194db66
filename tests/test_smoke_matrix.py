"""Every task x optimizer at scale=smoke runs on CPU and writes a valid run directory."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from pisa_bench.baselines import Incompatible, family_of
from pisa_bench.config import group_options, optim_config
from pisa_bench.rundir import METRIC_COLUMNS, SUMMARY_FIELDS, read_metrics

TASKS = group_options("task")
OPTIMS = group_options("optim")
# Pairs refused before any step, with the reason: torch's Muon takes 2-D matrices only, and these
# networks are convolutions plus an output layer (routed to the companion, as Muon users do).
REFUSED = {
    (task, "muon"): "has none left after routing"
    for task in ("wgan_cifar10", "wgan_gp_cifar10", "resnet34_cifar10", "densenet121_cifar10",
                 "resnet18_imagenet")
}


@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("task", TASKS)
def test_smoke(task: str, optim: str, run_cfg) -> None:
    overrides = [f"task={task}", f"optim={optim}", "scale=smoke"]
    if (task, optim) in REFUSED:
        with pytest.raises(Incompatible, match=REFUSED[task, optim]):
            run_cfg(overrides)
        return
    summary, run_dir = run_cfg(overrides)
    assert summary["status"] in ("ok", "diverged"), summary.get("error")
    assert set(SUMMARY_FIELDS) <= set(summary)
    assert summary["task"] == task and summary["optim"] == optim and summary["scale"] == "smoke"
    assert summary["steps"] and summary["steps"] > 0
    assert summary["n_params"] and summary["n_params"] > 0
    assert summary["optimizer_state_bytes"] is not None
    # the Newton-Schulz dtype as resolved on this CPU (float32), recorded for NSISA and Muon-like
    # runs only: the identity leaves the device, and so this rounding, out
    assert summary["ns_dtype"] == ("float32" if optim == "nsisa" else None)
    assert summary["family"] == ("consensus" if optim in ("pisa", "sisa", "nsisa") else "baseline")
    # the class's, as the analysis derives it
    assert summary["family"] == family_of(optim_config(optim))
    if summary["status"] == "ok":
        assert summary["final_metric"] is not None and math.isfinite(summary["final_metric"])
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["task"]["name"] == task and cfg["optim"]["name"] == optim
    meta = json.loads((run_dir / "meta.json").read_text())
    assert {"git_sha", "git_dirty", "packages", "device", "host", "command", "start_time"} <= set(
        meta
    )
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == METRIC_COLUMNS
    rows = read_metrics(run_dir / "metrics.csv")
    if summary["status"] == "ok":  # a run may diverge before its first evaluation
        assert any(
            r["metric"] == summary["metric"] and r["split"] == summary["metric_split"]
            for r in rows
        )
    else:
        assert summary["diverged_step"] and rows
    assert not list(run_dir.glob(".*.tmp")), "a temporary file was left behind"
