"""scripts/reproduce.py and pisa_bench/launch/: expansion, the skip/resume filter, local runs,
rendering, the equal-budget lr grid and the USR2 -> checkpoint bridge of launched jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pisa_bench.config import CONF_DIR, compose_config, group_options
from pisa_bench.launch.job import job_entry
from pisa_bench.launch.launchers import launch_local
from pisa_bench.launch.ledger import claim
from pisa_bench.launch.plan import expand, plan
from pisa_bench.launch.reproduce import main as reproduce
from pisa_bench.launch.reproduce import relabel
from pisa_bench.record import run_dir_for
from pisa_bench.rundir import atomic_write_json, cpu_description, read_json

REPO = CONF_DIR.parent

SMOKE = ["--scale", "smoke"]


def _summary(run_dir: Path) -> dict:
    return read_json(run_dir / "summary.json")


def test_quickstart_smoke_runs_renders_and_then_skips(tmp_path: Path, capsys) -> None:
    """The quickstart runs its protocol (no tuning, 3 seeds per optimizer), renders the
    artefact with its verdict, and a second call runs nothing."""
    args = ["quickstart", *SMOKE, "--out-dir", str(tmp_path / "out"),
            "--results-dir", str(tmp_path / "results")]
    assert reproduce(args) == 0
    first = capsys.readouterr().out
    runs = sorted((tmp_path / "out" / "runs" / "quickstart").glob("quickstart_mnist/*/smoke-s*"))
    assert [r.parent.name for r in runs] == [o for o in ("adamw", "muon", "nsisa", "sisa")
                                             for _ in range(3)]
    assert sorted({r.name.split("-")[1] for r in runs}) == ["s0", "s1", "s2"]
    assert all(_summary(r)["status"] == "ok" for r in runs)
    report = tmp_path / "results" / "quickstart_smoke"  # not the experiment's own scale
    table = (report / "table.md").read_text()
    assert all(f"| {o} | paper settings |" in table for o in ("adamw", "muon", "nsisa", "sisa"))
    verdict = json.loads((report / "verdict.json").read_text())
    assert {(r["claim"], r["role"]) for r in verdict["records"]} == {("sisa", "paper"),
                                                                      ("nsisa", "paper")}
    assert all(len(r["comparisons"]) == 2 for r in verdict["records"])  # vs adamw, muon
    assert verdict["hardware"] == [f"cpu ({cpu_description()})"]  # the records' CPU
    assert "quickstart_mnist / sisa (paper settings):" in first  # the verdict is printed
    assert (report / "curves_steps.png").stat().st_size > 0
    assert "python scripts/reproduce.py quickstart --scale smoke" in (report / "README.md"
                                                                       ).read_text()
    stamps = [(r / "summary.json").stat().st_mtime_ns for r in runs]
    assert reproduce(args) == 0
    second = capsys.readouterr().out
    assert "12/12 runs finished" in second
    assert "[1/" not in second  # nothing ran
    assert [(r / "summary.json").stat().st_mtime_ns for r in runs] == stamps


def test_verdicts_lists_run_and_not_yet_run_claims(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    (out / "a").mkdir(parents=True)
    rec = {"task": "t", "claim": "sisa", "role": "tuned", "verdict": "supported", "n_min": 5,
           "means": {"sisa": 90.0, "adam": 80.0}, "comparisons": []}
    (out / "a" / "verdict.json").write_text(json.dumps({
        "artefact": "table6_lstm", "title": "T", "claim": "SISA wins", "command": "cmd",
        "scale": "small", "caveats": ["cut to 1 layer"], "records": [rec],
        "protocol": {"trials": 5, "seeds": 5}}))
    assert reproduce(["verdicts", "--results-dir", str(out)]) == 0
    text = (out / "VERDICTS.md").read_text()
    assert "| [table6_lstm](a/README.md) | SISA wins | t, tuned;" in text
    assert "sisa 90; best baseline adam 80 | **supported** | cut to 1 layer | `cmd` |" in text
    assert "| fig2_gpt2 |" in text and "not run yet" in text  # a claim with no artefact yet
    assert "| table6_lstm |" not in text
    # an artefact rendered before its seeds finished keeps its row, said unfinished
    (out / "b").mkdir()
    (out / "b" / "verdict.json").write_text(json.dumps({
        "artefact": "fig1_vision", "title": "V", "claim": "SISA sees", "command": "cmd2",
        "scale": "small", "caveats": [], "records": [], "runs": {"ok": 3, "not started": 9},
        "protocol": {"trials": 5, "seeds": 5}}))
    assert reproduce(["verdicts", "--results-dir", str(out)]) == 0
    text = (out / "VERDICTS.md").read_text()
    assert ("| [fig1_vision](b/README.md) | SISA sees | small; 5 trials + 5 seeds per arm | – | "
            "not finished | no verdict yet (3 ok, 9 not started): rerun the command | `cmd2` |"
            ) in text
    assert "| fig1_vision |" not in text


def test_verdicts_set_each_rerun_beside_its_committed_verdict(tmp_path: Path) -> None:
    """A rerun (``<artefact>/rerun_<label>/verdict.json``) gets a row per claim and role in its
    own section: both verdicts with their numbers, held or moved, the rerun's hardware."""
    out = tmp_path / "results"
    (out / "a" / "rerun_x").mkdir(parents=True)

    def info(verdicts: dict[str, str], sisa: float, hardware: list[str]) -> str:
        records = [{"task": task_role.split(":")[0], "claim": "sisa",
                    "role": task_role.split(":")[-1], "verdict": v, "n_min": 5,
                    "means": {"sisa": sisa, "adam": 80.0}, "comparisons": []}
                   for task_role, v in verdicts.items()]
        return json.dumps({"artefact": "table6_lstm", "title": "T", "claim": "SISA wins",
                           "command": "cmd", "scale": "small", "caveats": [],
                           "records": records, "protocol": {"trials": 5, "seeds": 5},
                           "hardware": hardware})

    (out / "a" / "verdict.json").write_text(
        info({"t:tuned": "supported", "t:paper": "supported",
              "u:tuned": "contradicted (worse than adam)"}, 90.0, ["cpu"]))
    assert reproduce(["verdicts", "--results-dir", str(out)]) == 0
    assert "another machine" not in (out / "VERDICTS.md").read_text()  # no rerun: no section
    (out / "a" / "rerun_x" / "verdict.json").write_text(
        info({"t:tuned": "supported", "t:paper": "not distinguishable at 5 seeds",
              "u:tuned": "contradicted (worse than adam, sgdm)"}, 85.0, ["cpu (AVX512)"]))
    assert reproduce(["verdicts", "--results-dir", str(out)]) == 0
    text = (out / "VERDICTS.md").read_text()
    assert ("| [table6_lstm](a/rerun_x/README.md) | t, tuned, sisa | supported (sisa 90; best "
            "baseline adam 80) | supported (sisa 85; best baseline adam 80) | held | cpu (AVX512) |"
            ) in text
    assert ("| t, paper settings, sisa | supported (sisa 90; best baseline adam 80) | not "
            "distinguishable at 5 seeds (sisa 85; best baseline adam 80) | **moved** |") in text
    assert ("| u, tuned, sisa | contradicted (worse than adam) (sisa 90; best baseline adam 80) "
            "| contradicted (worse than adam, sgdm) (sisa 85; best baseline adam 80) | held, "
            "other baselines |") in text
    assert text.count("](a/README.md)") == 3  # the main table keeps the committed rows only


def test_only_incomplete_runs_are_relaunched(tmp_path: Path, run_cfg) -> None:
    p = plan("quickstart", "smoke", 6, tmp_path, ["optim=adamw"])
    assert [pt.cfg.seed for pt in p.points] == [0, 1, 2, 3, 4, 5]
    ok, preempted, failed, crashed, fresh, busy = p.points
    # seed 0 finished; seed 1 preempted at step 1 (preempt_at_step is not in the run's identity)
    run_cfg(ok.overrides)
    s, d = run_cfg([*preempted.overrides, "train.preempt_at_step=1"])
    assert s["status"] == "preempted" and d == preempted.run_dir
    # seed 2 failed, seed 3 died while running (no launcher alive), seed 5 held by a live launcher
    for pt, status in ((failed, "failed"), (crashed, "running"), (busy, "running")):
        pt.run_dir.mkdir(parents=True)
        atomic_write_json(pt.run_dir / "summary.json", {"status": status})
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim(p, [busy], pid=holder.pid)
        claim(p, [fresh], pid=2**22 + 12345)  # a dead launcher: its claim is dropped
        again = plan("quickstart", "smoke", 6, tmp_path, ["optim=adamw"])
        assert [pt.cfg.seed for pt in again.done] == [0]  # failed: retried, not an outcome
        assert [pt.cfg.seed for pt in again.busy] == [5]
        assert [pt.cfg.seed for pt in again.todo] == [1, 2, 3, 4]
        assert "1 already finished, skipped (1 ok); 4 to run" in again.describe()
        counts = launch_local(again.todo, echo=lambda s: None)
        assert counts == {"ok": 4}
        assert read_json(preempted.run_dir / "meta.json").get("resumes")  # resumed, not redone
        assert _summary(failed.run_dir)["status"] == "ok"  # retried; the failure is kept:
        assert _summary(failed.run_dir / "attempts" / "1-failed") == {"status": "failed"}
        assert _summary(busy.run_dir) == {"status": "running"}
    finally:
        holder.kill()
        holder.wait()
    final = plan("quickstart", "smoke", 6, tmp_path, ["optim=adamw"])
    assert not final.busy and [pt.cfg.seed for pt in final.todo] == [5]


def test_expand_follows_hydra_sweeper_semantics() -> None:
    points = expand({"optim": "sisa,adamw", "seed": "0,1"}, ["experiment=quickstart",
                                                             "optim=muon", "seed=range(2)"])
    assert points == [["optim=muon", "seed=0", "experiment=quickstart"],
                      ["optim=muon", "seed=1", "experiment=quickstart"]]


def test_plan_overrides_seeds_and_dry_run(tmp_path: Path, capsys) -> None:
    p = plan("quickstart", "smoke", 2, tmp_path, ["optim=adamw,sgdm", "train.max_steps=2",
                                                 "hydra.launcher.timeout_min=5"])
    assert [(pt.cfg.optim.name, pt.cfg.seed, pt.cfg.train.max_steps) for pt in p.points] == [
        ("adamw", 0, 2), ("adamw", 1, 2), ("sgdm", 0, 2), ("sgdm", 1, 2)]
    assert p.hydra_overrides == ["hydra.launcher.timeout_min=5"]
    assert all(str(pt.run_dir).startswith(str(tmp_path.resolve())) for pt in p.points)
    assert reproduce(["quickstart", "--scale", "smoke", "--out-dir", str(tmp_path), "--dry-run",
                      "optim=adamw", "--sweep-only"]) == 0
    out = capsys.readouterr().out
    assert "python run.py optim=adamw seed=0 experiment=quickstart scale=smoke" in out
    assert not (tmp_path / "runs").exists()


def test_tune_grid_is_equal_budget(tmp_path: Path) -> None:
    from pisa_bench.protocol import ProtocolSpec, drive

    p = plan("tune_quickstart", "smoke", 1, tmp_path)
    spec = ProtocolSpec.from_meta(p.meta)
    assert spec is not None
    mults = spec.multipliers()
    proto = drive(p, spec, None)  # nothing launched: the trials of stage 1
    by_optim = {a.label: list(a.trials.values()) for a in proto.arms}
    assert sorted(by_optim) == ["adamw", "muon", "nsisa", "sisa"]
    for name, pts in by_optim.items():
        assert len(pts) == len(mults) == 5  # the same number of trials for everyone
        default = compose_config([f"optim={name}"]).optim
        for pt, m in zip(pts, mults):
            assert pt.tags["lr_mult"] == m and int(pt.cfg.seed) == 0
            assert pt.cfg.task.data.val_fraction > 0  # selection on a validation split
            assert pt.cfg.optim.lr == pytest.approx(default.lr * m, rel=1e-5)
            if "companion" in default:
                assert pt.cfg.optim.companion.lr == pytest.approx(default.companion.lr * m,
                                                                  rel=1e-5)
            if "sigma" in default:  # lr = 1/(sigma + rho): both scale by 1/m, rho stays > 0
                assert pt.cfg.optim.sigma == pytest.approx(default.sigma / m, rel=1e-5)
                assert 1 / pt.cfg.optim.lr - pt.cfg.optim.sigma == pytest.approx(
                    (1 / default.lr - default.sigma) / m, rel=1e-4)
    assert len({pt.run_dir for pt in proto.points()}) == 20


GROUPS = ("task", "optim", "scale", "fl")


def _sweep_blocks(data: dict) -> list[dict]:
    params = ((data.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    meta = data.get("reproduce") or {}
    blocks = [*(meta.get("sweeps") or [{}])]
    for extra in (meta.get("scale_sweeps") or {}).values():
        blocks += extra
    return [{**params, **b} for b in blocks]


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_sweeps_name_existing_configs(experiment: str) -> None:
    """Every task / optim / fl value an experiment sweeps over exists in conf/."""
    data = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())
    parents = [e for e in data.get("defaults") or [] if isinstance(e, str) and e != "_self_"]
    # its own run directories (name = the experiment), or a variant of one parent experiment
    # that reads the parent's (table6_lstm2: the 2-layer rows of table6_lstm)
    assert data.get("name") == experiment or (
        "name" not in data and len(parents) == 1 and parents[0] in group_options("experiment")
    ), f"{experiment}: name must be the experiment's, or inherited from one parent experiment"
    missing = set()
    for entry in data.get("defaults") or []:  # e.g. {"override /task": "vgg11_cifar10"}
        for k, v in (entry.items() if isinstance(entry, dict) else ()):
            group = k.split("/")[-1]
            if group in GROUPS and v not in group_options(group):
                missing.add(f"{group}={v}")
    for block in _sweep_blocks(data):
        for key in GROUPS:
            if key in block:
                for v in str(block[key]).split(","):
                    if v.strip() not in group_options(key):
                        missing.add(f"{key}={v.strip()}")
    assert not missing, f"{experiment} sweeps over configs that do not exist: {sorted(missing)}"


def test_job_entry_turns_usr2_into_a_checkpoint(tmp_path: Path) -> None:
    """USR2 (SLURM's time-limit warning) makes the trainer checkpoint and stop (status
    preempted); only then is the previous (submitit's requeue) handler called."""
    cfg = compose_config(["scale=smoke", "optim=adamw", f"paths.out_dir={tmp_path}",
                          "train.max_steps=100000", "train.log_every=1"])
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    run_dir = run_dir_for(cfg)

    def send_when_training() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "metrics.csv").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    t = threading.Thread(target=send_when_training, daemon=True)
    t.start()
    try:
        summary = job_entry(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    t.join()
    assert summary["status"] == "preempted" and 0 < summary["steps"] < 100000
    assert (run_dir / "ckpt" / "rank0.pt").exists()
    assert calls == [signal.SIGUSR2]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"


def test_relabel_gives_variants_their_own_rows(tmp_path: Path) -> None:
    rows = []
    for i, (optim, method, layers) in enumerate((("sisa", "admm", 1), ("sgdm", "fedprox", 2))):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(
            {"fl": {"method": method}, "task": {"model": {"num_layers": layers}}}))
        rows.append({"task": "t", "optim": optim, "run_dir": str(d)})
    runs = pd.DataFrame(rows)
    curves = pd.DataFrame({"run_dir": [str(tmp_path / "1")] * 2, "task": "t", "optim": "sgdm"})
    relabel(runs, curves, {"split_optim_by": {"method": "fl.method"},
                           "split_task_by": {"layers": "task.model.num_layers"}})
    assert list(runs["optim"]) == ["sisa", "sgdm[method=fedprox]"]  # PISA family keeps its name
    assert list(runs["task"]) == ["t[layers=1]", "t[layers=2]"]
    assert set(curves["optim"]) == {"sgdm[method=fedprox]"}
    assert set(curves["task"]) == {"t[layers=2]"}


def test_no_wait_detaches_claims_and_finishes(tmp_path: Path, capsys) -> None:
    """--no-wait: returns at once; the background launcher holds the runs (a second command
    skips them as in flight), runs them (here with submitit_local) and renders."""
    args = ["quickstart", *SMOKE, "--out-dir", str(tmp_path / "out"), "--results-dir",
            str(tmp_path / "results"), "--launcher", "submitit_local", "optim=adamw",
            "--sweep-only", "--seeds", "1"]
    assert reproduce([*args, "--no-wait"]) == 0
    out = capsys.readouterr().out
    pid = int(out.split("background process ")[1].split()[0])
    log = Path(out.split("log:")[1].split()[0])
    try:
        again = plan("quickstart", "smoke", 1, tmp_path / "out", ["optim=adamw"])
        if _alive(pid):  # still launching: its run must not be launched a second time
            assert len(again.busy) == 1 and not again.todo
        deadline = time.time() + 240
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(pid), f"background launcher still running:\n{log.read_text()}"
    finally:
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    text = log.read_text()
    assert "1/1 runs finished" in text, text
    (run,) = plan("quickstart", "smoke", 1, tmp_path / "out", ["optim=adamw"]).done
    assert run.status == "ok"
    assert (tmp_path / "results" / "quickstart_smoke" / "table.md").exists()
    assert not list((tmp_path / "out" / "runs" / "quickstart" / ".inflight").glob("*.json"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a finished child we started is a zombie until reaped: count it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_planned_sweeper_launches_exactly_the_plan_file_jobs(tmp_path: Path) -> None:
    """``run.py -m hydra/sweeper=planned``: the jobs of the plan file, no more (the
    experiment's own ``hydra.sweeper.params`` would make 4 x 3 runs), through Hydra's basic
    launcher here (the launch layer passes submitit_local or slurm instead)."""
    out = tmp_path / "out"
    jobs = [["experiment=quickstart", "scale=smoke", f"paths.out_dir={out}", "optim=adamw",
             "seed=1"],
            ["experiment=quickstart", "scale=smoke", f"paths.out_dir={out}", "optim=sisa",
             "seed=0"]]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"jobs": jobs}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "-m", "hydra/sweeper=planned",
         f"hydra.sweeper.plan_file={plan_file}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
         "experiment=quickstart", "scale=smoke", f"paths.out_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((out / "runs").rglob("summary.json"))
    got = sorted((json.loads(s.read_text())["optim"], json.loads(s.read_text())["seed"])
                 for s in summaries)
    assert got == [("adamw", 1), ("sisa", 0)]
