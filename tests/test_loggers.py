"""Optional sinks: TensorBoard event files and an offline Weights & Biases run."""

from __future__ import annotations

import pytest

RUN = ["task=quickstart_mnist", "scale=smoke", "optim=adamw", "train.max_steps=2"]


def test_tensorboard_sink_writes_events(run_cfg) -> None:
    pytest.importorskip("tensorboard")
    summary, run_dir = run_cfg([*RUN, "logger=tensorboard"])
    assert summary["status"] == "ok"
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert len(acc.Scalars("train/loss")) == 2


def test_wandb_sink_runs_offline(run_cfg, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary, run_dir = run_cfg([*RUN, "logger=wandb"])
    assert summary["status"] == "ok"
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "wandb did not write an offline run"
    assert list(offline[0].glob("*.wandb"))
