"""Gradient accumulation in the shared trainer (``train.grad_accum``).

k micro-batches per worker gradient must give the run of one piece per worker: the same weights
after every step (float64, tight tolerance) for SISA with m = 1 and m = 4 virtual workers and for
AdamW, with the loss evaluated k times as often on k-times smaller pieces.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from pisa_bench.baselines import Incompatible
from pisa_bench.config import compose_config
from pisa_bench.runtime import Dist
from pisa_bench.tasks.base import Task
from pisa_bench.trainer import Trainer

D_IN = 5


class Regression(Task):
    """A float64 two-layer regression on fixed random data; records every loss call's rows."""

    def setup(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        n = 4 * int(self.cfg.train.batch_size)
        self.x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.randn(D_IN, 1, generator=g, dtype=torch.float64) + 0.1
        self.calls: list[int] = []
        self.model: nn.Module | None = None

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        self.model = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        self.init = [p.detach().clone() for p in self.model.parameters()]
        return self.model

    def steps_per_epoch(self) -> int:
        return len(self.x) // int(self.cfg.train.batch_size)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        bs = int(self.cfg.train.batch_size)
        for i in range(start, self.steps_per_epoch()):
            yield self.x[i * bs : (i + 1) * bs], self.y[i * bs : (i + 1) * bs]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        self.calls.append(len(x))
        return (model(x) - y).pow(2).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {self.metric: float((model(self.x) - self.y).pow(2).mean())}


def _train(tmp: Path, optim: list[str], batch: int, accum: int) -> Regression:
    cfg = compose_config([
        "task=quickstart_mnist", "scale=smoke", *optim, "train.max_steps=3",
        f"train.batch_size={batch}", f"train.grad_accum={accum}", "train.precision=fp32",
        "train.eval_every=0", f"paths.out_dir={tmp}",
    ])
    task = Regression(cfg, torch.device("cpu"))
    task.setup()
    Trainer(cfg, task, None, tmp / f"run{accum}", torch.device("cpu"), Dist()).fit(task)
    return task


@pytest.mark.parametrize(
    ("optim", "m", "batch", "accum"),
    [
        (["optim=sisa", "optim.n_workers=1"], 1, 16, 4),
        (["optim=sisa", "optim.n_workers=4"], 4, 32, 4),
        (["optim=adamw"], 1, 16, 4),
        (["optim=adamw"], 1, 30, 4),  # uneven micro-batches 8, 8, 7, 7: weighted by rows
    ],
)
def test_accumulation_equals_one_step_on_the_whole_batch(
    tmp_path: Path, optim: list[str], m: int, batch: int, accum: int
) -> None:
    whole = _train(tmp_path, optim, batch, 1)
    acc = _train(tmp_path, optim, batch, accum)
    assert whole.calls == [batch // m] * (3 * m)  # one piece per worker, 3 steps
    per_worker = torch.tensor_split(torch.arange(batch // m), accum)
    assert acc.calls == [len(p) for p in per_worker] * (3 * m)  # k micro-batches per worker
    assert whole.model is not None and acc.model is not None
    for a, b in zip(whole.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    assert any(not torch.equal(p, q) for p, q in zip(whole.init, whole.model.parameters()))


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_grad_accum_is_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match=r"train\.grad_accum must be an integer >= 1"):
        _train(tmp_path, ["optim=adamw"], 16, bad)  # type: ignore[arg-type]


def test_grad_accum_is_refused_by_custom_loops(run_cfg) -> None:
    with pytest.raises(Incompatible, match=r"train\.grad_accum applies to the shared supervised"):
        run_cfg(["task=wgan_cifar10", "scale=smoke", "optim=adam", "train.grad_accum=2"])


def test_grad_accum_is_refused_by_the_lstm(run_cfg) -> None:
    with pytest.raises(ValueError, match=r"task lstm1_ptb takes no train\.grad_accum"):
        run_cfg(["task=lstm1_ptb", "scale=smoke", "optim=sisa", "train.grad_accum=2"])


def test_gpt2_xl_paper_config_accumulates_4x4_at_65536_tokens() -> None:
    sizes = {"124M": 1, "350M": 1, "1558M": 4}
    for size, accum in sizes.items():
        cfg = compose_config(["task=gpt2", "scale=paper", "optim=nsisa", f"task.size={size}"])
        tc, m = cfg.train, int(cfg.optim.n_workers)
        assert tc.grad_accum == accum
        micro = tc.batch_size // m // tc.grad_accum  # sequences per device per backward
        assert tc.batch_size * cfg.task.data.seq_len == 65536
        assert (micro, tc.grad_accum, m) == ((16, 1, 4) if accum == 1 else (4, 4, 4))


@pytest.mark.distributed
@pytest.mark.parametrize(("optim", "single"), [("sisa", ["optim.n_workers=2"]), ("adamw", [])])
def test_accumulation_under_torchrun_equals_whole_pieces(
    optim: str, single: list[str], run_cfg, tmp_path: Path
) -> None:
    """2 ranks x 2 micro-batches each = one process whose workers (SISA: 2 virtual workers,
    AdamW: the whole batch) take their pieces whole: a round still has m = 2 workers."""
    from test_distributed_trainer import BASE, _losses, _torchrun

    dist_dir = _torchrun([*BASE, f"optim={optim}", "train.grad_accum=2"], tmp_path / "dist")
    ref, ref_dir = run_cfg([*BASE, f"optim={optim}", *single, "name=single"])
    got, want = _losses(dist_dir), _losses(ref_dir)
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    summary = json.loads((dist_dir / "summary.json").read_text())
    assert summary["final_metric"] == pytest.approx(ref["final_metric"], abs=1e-9)
