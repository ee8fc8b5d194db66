"""Federated tasks: partitions, the Adult reader, the FL baselines' update rules, ADMM clients,
and smoke runs of fl_adult with SISA and every FL baseline."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pisa_bench.baselines.federated import (
    SCAFFOLD,
    FedAvg,
    FedNova,
    FedProx,
    LocalOnly,
    Moon,
    flat_params,
)
from pisa_bench.data import tabular
from pisa_bench.data.partition import label_counts, parse_scheme, partition
from pisa_bench.errors import DatasetMissing
from pisa_bench.rundir import read_metrics
from pisa_bench.tasks.federated import ADMMClients, resolve_method, set_sigma_rho

SCHEMES = ["iid", "label1", "label2", "dir0.05", "dir0.5", "dir1000", "qty0.5"]


def _labels(n: int = 3000, k: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def _tv_to_global(y: torch.Tensor, parts: list[torch.Tensor], k: int) -> float:
    """Mean over clients of the total-variation distance of its label mix to the global mix."""
    counts = label_counts(y, parts, k).double()
    local = counts / counts.sum(1, keepdim=True)
    glob = counts.sum(0) / counts.sum()
    return float(0.5 * (local - glob).abs().sum(1).mean())


# --- partitions -----------------------------------------------------------------------------
@pytest.mark.parametrize("m,k", [(10, 10), (4, 2)])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_covers_every_sample_once(scheme: str, m: int, k: int) -> None:
    y = _labels(3000, k)
    parts = partition(y, m, scheme, seed=3, num_classes=k)
    assert len(parts) == m
    allidx = torch.cat(parts)
    assert len(allidx) == len(y)
    assert torch.equal(allidx.sort().values, torch.arange(len(y)))


@pytest.mark.parametrize("m,k,labels", [(10, 10, 1), (10, 10, 2), (4, 2, 1), (12, 10, 3)])
def test_label_k_clients_hold_exactly_k_labels(m: int, k: int, labels: int) -> None:
    y = _labels(4000, k)
    parts = partition(y, m, f"label{labels}", seed=1, num_classes=k)
    held = (label_counts(y, parts, k) > 0).sum(1)
    assert held.tolist() == [labels] * m


def test_label_k_refuses_to_drop_labels() -> None:
    with pytest.raises(ValueError, match="no client"):
        partition(_labels(1000, 10), 4, "label1", seed=0, num_classes=10)


def test_dirichlet_skew_follows_beta() -> None:
    y = _labels(5000, 10)
    tv = {s: _tv_to_global(y, partition(y, 10, s, seed=0), 10)
          for s in ("iid", "dir1000", "dir0.05")}
    assert tv["iid"] < 0.06
    assert tv["dir1000"] < 0.06  # large beta: about iid
    assert tv["dir0.05"] > 0.5  # small beta: clients dominated by a few labels


def test_quantity_skew_sizes_differ_labels_do_not() -> None:
    y = _labels(6000, 10)
    parts = partition(y, 8, "qty0.5", seed=2)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 3 * sizes[0]
    assert min(sizes) >= 10
    big = [p for p in parts if len(p) >= 500]
    assert big and _tv_to_global(y, big, 10) < 0.1  # iid labels within each client
    iid_sizes = [len(p) for p in partition(y, 8, "iid", seed=2)]
    assert max(iid_sizes) - min(iid_sizes) <= 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_a_function_of_its_seed(scheme: str) -> None:
    y = _labels(2000, 5)  # 10 clients on 5 labels: label1 shares each label between 2 clients
    a = partition(y, 10, scheme, seed=7)
    b = partition(y, 10, scheme, seed=7)
    c = partition(y, 10, scheme, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_parse_scheme() -> None:
    assert str(parse_scheme("dir0.5")) == "dir0.5" and parse_scheme("dir0.5").beta == 0.5
    assert parse_scheme("label2").k == 2 and parse_scheme("qty1").kind == "quantity"
    for bad in ("dirichlet", "label0", "dir0", "qty-1", "iid2"):
        with pytest.raises(ValueError):
            parse_scheme(bad)


# --- Adult LIBSVM reader --------------------------------------------------------------------
def test_adult_reader_pads_and_maps_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tabular, "ASSETS", tmp_path / "no-assets")
    d = tmp_path / "adult-a9a"
    d.mkdir()
    (d / "a9a").write_text("-1 1:1 3:1 5:1\n+1 2:1 4:0.5\n-1 5:1\n")
    (d / "a9a.t").write_text("+1 1:1 2:1\n-1 3:1 4:1\n")  # never uses feature 5
    cfg = OmegaConf.create({"name": "adult_a9a", "dir": "adult-a9a", "n_features": 5})
    data = tabular.load_tabular(cfg, tmp_path)
    assert data.train_x.shape == (3, 5) and data.test_x.shape == (2, 5)
    assert data.train_x.dtype == torch.float32
    assert data.train_x.tolist() == [[1, 0, 1, 0, 1], [0, 1, 0, 0.5, 0], [0, 0, 0, 0, 1]]
    assert data.test_x.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]
    assert data.train_y.tolist() == [0, 1, 0] and data.test_y.tolist() == [1, 0]
    assert data.num_classes == 2
    with pytest.raises(ValueError, match="exceeds"):
        tabular.read_libsvm(d / "a9a", n_features=4)


def test_adult_missing_names_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tabular, "ASSETS", tmp_path / "no-assets")
    cfg = OmegaConf.create({"name": "adult_a9a", "dir": "adult-a9a"})
    with pytest.raises(DatasetMissing) as e:
        tabular.load_tabular(cfg, tmp_path)
    assert "a9a.t" in str(e.value) and str(tmp_path / "adult-a9a") in str(e.value)


# --- FL baselines ---------------------------------------------------------------------------
def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(n_clients: int, steps: int, seed: int = 0) -> list[list[Batch]]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
             for _ in range(steps)] for _ in range(n_clients)]


def _sgd(lr: float = 0.1, momentum: float = 0.0):
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)


def test_fedavg_one_client_one_step_is_sgd() -> None:
    batch = _batches(1, 1)[0][0]
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    _ce(ref, batch).backward()
    opt.step()
    algo = FedAvg(_model(), [1.0], _sgd(0.1, 0.9), _ce)
    algo.run_round([[batch]])
    assert torch.allclose(flat_params(algo.model), flat_params(ref), atol=1e-7)
    assert not torch.allclose(flat_params(algo.model), flat_params(_model()))


def test_fedavg_averages_clients_by_data_share() -> None:
    b = _batches(2, 3)
    algo = FedAvg(_model(), [1.0, 3.0], _sgd(), _ce)
    x0 = algo.x.clone()
    ys = []
    for i in range(2):  # each client alone, from x0
        solo = FedAvg(_model(), [1.0], _sgd(), _ce)
        solo.run_round([b[i]])
        ys.append(solo.x)
    algo.run_round(b)
    assert torch.allclose(algo.x, 0.25 * ys[0] + 0.75 * ys[1], atol=1e-6)
    assert not torch.allclose(algo.x, x0)


def test_fedprox_mu_zero_is_fedavg_and_mu_pulls_to_global() -> None:
    b = _batches(3, 4)
    avg = FedAvg(_model(), [1, 2, 3], _sgd(0.3), _ce)
    prox0 = FedProx(_model(), [1, 2, 3], _sgd(0.3), _ce, mu=0.0)
    prox = FedProx(_model(), [1, 2, 3], _sgd(0.3), _ce, mu=2.0)
    d_avg = avg.run_round(b)["client_drift"]
    prox0.run_round(b)
    d_prox = prox.run_round(b)["client_drift"]
    assert torch.allclose(avg.x, prox0.x, atol=1e-7)
    assert d_prox < d_avg


class _Point(nn.Module):
    """A model that is just a vector ``w``; with :func:`_quad` each client's loss is
    ``F_i(w) = 0.5 ||w - a_i||^2`` (the batch carries ``a_i``)."""

    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w0.clone())


def _quad(model: nn.Module, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model.w - a).pow(2).sum()


def test_scaffold_control_variates_follow_the_formula() -> None:
    eta, tau = 0.1, 3
    a = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])]
    p = [0.25, 0.75]
    x = torch.tensor([0.0, 1.0])
    algo = SCAFFOLD(_Point(x), [1.0, 3.0], _sgd(eta), _quad)
    c, c_i = torch.zeros(2), [torch.zeros(2), torch.zeros(2)]
    for _ in range(3):  # reference: y <- y - eta (y - a_i - c_i + c); option II
        ys, new_ci = [], []
        for i in range(2):
            y = x.clone()
            for _ in range(tau):
                y = y - eta * ((y - a[i]) - c_i[i] + c)
            ys.append(y)
            new_ci.append(c_i[i] - c + (x - y) / (tau * eta))
        c = c + sum(n - o for n, o in zip(new_ci, c_i)) / 2
        c_i = new_ci
        x = p[0] * ys[0] + p[1] * ys[1]
        algo.run_round([[a[0]] * tau, [a[1]] * tau])
        assert torch.allclose(algo.x, x, atol=1e-6)
        assert torch.allclose(algo.c, c, atol=1e-5)
        assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(algo.c_i, c_i))
    assert not torch.allclose(algo.c, torch.zeros(2))


def test_fednova_normalises_unequal_local_steps() -> None:
    eta = 0.1
    a = [torch.tensor([1.0, -1.0]), torch.tensor([-2.0, 4.0])]
    x = torch.tensor([0.5, 0.5])
    steps = [1, 4]
    algo = FedNova(_Point(x), [1.0, 1.0], _sgd(eta), _quad)
    algo.run_round([[a[0]] * steps[0], [a[1]] * steps[1]])
    d, tau_eff = torch.zeros(2), 0.0
    for i in range(2):
        y = x.clone()
        for _ in range(steps[i]):
            y = y - eta * (y - a[i])
        d += 0.5 * (x - y) / steps[i]
        tau_eff += 0.5 * steps[i]
    assert torch.allclose(algo.x, x - tau_eff * d, atol=1e-6)
    # equal steps and plain SGD: FedNova is FedAvg
    b = _batches(2, 3)
    nova, avg = FedNova(_model(), [1, 2], _sgd(), _ce), FedAvg(_model(), [1, 2], _sgd(), _ce)
    nova.run_round(b)
    avg.run_round(b)
    assert torch.allclose(nova.x, avg.x, atol=1e-6)


def test_moon_adds_its_contrastive_term_from_the_second_round() -> None:
    b1, b2 = _batches(2, 2, seed=1), _batches(2, 2, seed=2)
    runs = {}
    for name, mu in (("avg", None), ("moon0", 0.0), ("moon", 5.0)):
        algo = FedAvg(_model(), [1, 1], _sgd(0.5), _ce) if mu is None else Moon(
            _model(), [1, 1], _sgd(0.5), _ce, mu=mu, rep_module="2")
        first = algo.run_round(b1)
        after1 = algo.x.clone()
        second = algo.run_round(b2)
        runs[name] = (after1, algo.x.clone(), first["loss"], second["loss"])
    assert torch.allclose(runs["moon"][0], runs["avg"][0], atol=1e-7)  # round 1: no negative
    assert torch.allclose(runs["moon0"][1], runs["avg"][1], atol=1e-7)
    assert not torch.allclose(runs["moon"][1], runs["avg"][1], atol=1e-4)
    assert runs["moon"][3] > runs["avg"][3]  # the loss carries mu * l_con >= 0


def test_local_only_clients_never_mix() -> None:
    b = _batches(2, 2)
    algo = LocalOnly(_model(), [1, 1], _sgd(), _ce)
    for _ in range(2):
        algo.run_round(b)
    solo = FedAvg(_model(), [1.0], _sgd(), _ce)  # client 1 alone, optimizer kept: plain SGD
    ref = copy.deepcopy(solo.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        for batch in b[1]:
            opt.zero_grad()
            _ce(ref, batch).backward()
            opt.step()
    assert torch.allclose(algo.w[1], flat_params(ref), atol=1e-6)
    assert [w for w, _ in algo.eval_points()] == [0.5, 0.5]


# --- ADMM clients ---------------------------------------------------------------------------
def test_method_resolution() -> None:
    assert resolve_method("auto", "sisa") == "admm"
    assert resolve_method("auto", "adamw") == "fedavg"
    assert resolve_method("fedprox", "sgdm") == "fedprox"
    with pytest.raises(ValueError, match="optim=sgdm"):
        resolve_method("fedprox", "sisa")
    with pytest.raises(ValueError, match="PISA-family"):
        resolve_method("admm", "adamw")


def test_set_sigma_rho_through_the_param_group() -> None:
    from pisa import SISA

    opt = SISA(_model().parameters(), rho=100.0, sigma=1000.0)
    assert opt.current_sigma_rho() == pytest.approx((1000.0, 100.0))
    set_sigma_rho(opt.param_groups[0], 1234.0, 77.0)
    assert opt.current_sigma_rho() == pytest.approx((1234.0, 77.0))


def _official_sisa(w0, grads_at, alphas, rounds, sigma0, rho, lam, beta, every, factor):
    """The official FL code's SISA round (frozen bias correction 1 - beta), on flat vectors."""
    m = len(alphas)
    w = w0.clone()
    pi = [torch.zeros_like(w) for _ in range(m)]
    v = [torch.zeros_like(w) for _ in range(m)]
    sigma = sigma0
    for t in range(1, rounds + 1):
        wi = []
        for i in range(m):
            s = grads_at(i, w) + pi[i]
            v[i] = beta * v[i] + (1 - beta) * s * s
            wi.append(w - s / (sigma + rho * torch.sqrt(v[i] / (1 - beta))))
            pi[i] = pi[i] + sigma * (wi[i] - w)
        w = sum(a * (sigma * x + p) for a, x, p in zip(alphas, wi, pi)) / (sigma + lam)
        if t % every == 0:
            sigma = sigma / factor
    return w


def test_admm_clients_match_the_official_round_and_sigma_schedule() -> None:
    from pisa import SISA

    a = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-3.0, 0.5, 2.0])]
    sizes = [30, 90]
    alphas = [0.25, 0.75]
    sigma0, rho, lam, beta = 5.0, 2.0, 0.1, 0.9
    w0 = torch.tensor([0.2, 0.1, -0.3])
    model = _Point(w0)
    opt = SISA(model.parameters(), rho=rho, sigma=sigma0, beta=beta, eps=0.0, l2_lambda=lam,
               n_workers=2, worker_weights=alphas)

    def loss_fn(mdl: nn.Module, batch: tuple[int, torch.Tensor]) -> torch.Tensor:
        return _quad(mdl, batch[1])

    admm = ADMMClients(model, opt, loss_fn, lambda batch: batch[0], sizes, gradient="mean",
                       sigma_every=3, sigma_factor=0.5, bias_correction="official")
    rounds = 7
    for _ in range(rounds):
        admm.run_round([[(sizes[i], a[i])] for i in range(2)])
    ref = _official_sisa(w0, lambda i, w: w - a[i], alphas, rounds, sigma0, rho, lam, beta, 3, 0.5)
    assert torch.allclose(model.w.detach(), ref, atol=1e-5)
    assert opt.current_sigma_rho()[0] == pytest.approx(sigma0 / 0.5**2)  # rounds 7-9
    assert not torch.allclose(ref, w0)


# --- runs -----------------------------------------------------------------------------------
METHODS = [("admm", "sisa"), ("fedavg", "sgdm"), ("fedprox", "sgdm"), ("scaffold", "sgdm"),
           ("fednova", "sgdm"), ("moon", "sgdm"), ("local", "sgdm"), ("central", "sgdm")]


@pytest.mark.parametrize("method,optim", METHODS)
def test_fl_adult_smoke_run(method: str, optim: str, run_cfg) -> None:
    summary, run_dir = run_cfg(["task=fl_adult", f"fl={method}", f"optim={optim}", "scale=smoke",
                                "train.eval_every=1", "task.partition=label1"])
    assert summary["status"] == "ok", summary.get("error")
    assert summary["steps"] == 3
    rows = [r for r in read_metrics(run_dir / "metrics.csv")
            if r["metric"] == "accuracy" and r["split"] == "test"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(0.0 <= float(r["value"]) <= 100.0 for r in rows)
    assert math.isfinite(summary["final_metric"])
    assert any(f"federated method {method}" in n for n in summary["notes"])
    assert any("partition label1 over 4 clients" in n for n in summary["notes"])


def test_fl_adult_rejects_sisa_with_a_baseline(run_cfg) -> None:
    with pytest.raises(ValueError, match="optim=sgdm"):
        run_cfg(["task=fl_adult", "fl=fedprox", "optim=sisa", "scale=smoke"])


@pytest.mark.parametrize("method,optim", [("admm", "sisa"), ("scaffold", "sgdm")])
def test_fl_adult_resume_is_exact(method: str, optim: str, preempt_and_resume) -> None:
    base = ["task=fl_adult", f"fl={method}", f"optim={optim}", "scale=smoke", "train.max_steps=4",
            "train.eval_every=1"]
    full, cut, resumed, cut_dir = preempt_and_resume(base)
    assert cut["status"] == "preempted"
    assert resumed["status"] == "ok" and resumed["steps"] == 4
    assert resumed["final_metric"] == pytest.approx(full["final_metric"], abs=1e-9)
    acc = [float(r["value"]) for r in read_metrics(cut_dir / "metrics.csv")
           if r["metric"] == "accuracy"]
    assert len(acc) == 4


@pytest.mark.parametrize("method,optim", [("admm", "sisa"), ("fedprox", "sgdm")])
def test_fl_losses_read_at_the_log_cadence_log_the_same_rows(
    method: str, optim: str, run_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round loop reads its training losses (and the ADMM telemetry) every round on CPU and
    at the log / evaluation cadence on GPU (no device sync per local step or round): both log
    the same rows, and a loss limit below any loss still ends the run at round 1."""
    from pisa_bench.trainer import Trainer

    base = ["task=fl_adult", f"fl={method}", f"optim={optim}", "scale=smoke",
            "train.max_steps=6", "train.log_every=2", "train.eval_every=3"]
    rows = {}
    for every_step in (True, False):
        monkeypatch.setattr(Trainer, "reads_loss_every_step", lambda self, e=every_step: e)
        summary, run_dir = run_cfg([*base, f"name=rows_{every_step}"])
        assert summary["status"] == "ok", summary.get("error")
        rows[every_step] = [(r["step"], r["split"], r["metric"], r["value"])
                            for r in read_metrics(run_dir / "metrics.csv")]
        low, _ = run_cfg([*base, "+task.explode_above=1e-9", f"name=low_{every_step}"])
        assert low["status"] == "diverged" and low["diverged_step"] == 1
        assert "training loss is" in low["error"]
    train = {m for _, split, m, _ in rows[True] if split == "train"}
    assert {"loss", "lr"} <= train
    assert method != "admm" or "admm_dual_norm" in train
    assert method == "admm" or "client_drift" in train
    assert rows[True] == rows[False]
