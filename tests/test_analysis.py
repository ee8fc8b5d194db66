"""Analysis layer: collect, statistics, tables, profiles, figures, report (synthetic run dirs)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from pisa_bench.analysis.aggregate import (
    best_baselines,
    consensus_labels,
    significance,
    summarize,
)
from pisa_bench.analysis.collect import collect, load_collected, write_collected
from pisa_bench.analysis.curves import seed_band
from pisa_bench.analysis.figures import optimizer_colors
from pisa_bench.analysis.profiles import performance_profile, performance_ratios, target_costs
from pisa_bench.analysis.report import render
from pisa_bench.analysis.tables import render_tables
from pisa_bench.rundir import SUMMARY_FIELDS, MetricsWriter, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
NAN = math.nan
TASKS = {
    "cls": {"metric": "accuracy", "lower_is_better": False, "target": 0.8},
    "lm": {"metric": "val_loss", "lower_is_better": True, "target": 3.0},
}
OPTIMS = {"adamw": 1e-3, "sgd": 0.1, "sisa": 0.05}
SEEDS = (0, 1, 2)
# final metric per seed; NaN marks the failed / diverged runs below
FINAL = {
    ("cls", "adamw"): [0.82, NAN, 0.83],
    ("cls", "sgd"): [0.78, 0.80, 0.79],
    ("cls", "sisa"): [0.85, 0.86, 0.88],
    ("lm", "adamw"): [3.10, 3.05, 3.20],
    ("lm", "sgd"): [3.50, 3.40, NAN],
    ("lm", "sisa"): [2.90, 2.95, 3.05],
}
STATUS = {("cls", "adamw", 1): "failed", ("lm", "sgd", 2): "diverged"}
STEPS_TO_TARGET = {
    ("cls", "adamw"): [250, None, 350],
    ("cls", "sgd"): [None, 400, None],
    ("cls", "sisa"): [100, 300, 200],
    ("lm", "adamw"): [None, None, None],
    ("lm", "sgd"): [None, None, 150],  # reached, then diverged: not counted
    ("lm", "sisa"): [500, 450, None],
}
EVAL_STEPS = (0, 10, 20, 30)


def write_run(
    run_dir: Path, task: str, optim: str, seed: int, final: float, *, status: str = "ok",
    steps_to_target: int | None = None, lr: float = 1e-3, scale: str = "smoke",
    task_spec: dict | None = None, torn: bool = False, family: str | None = None,
) -> None:
    """A run directory as the trainer writes it (config, meta, metrics, summary)."""
    spec = task_spec or TASKS[task]
    run_dir.mkdir(parents=True)
    cfg = {"name": "study", "seed": seed, "scale": scale,
           "task": {"name": task, "metric": {"name": spec["metric"], "split": "val",
                                             "lower_is_better": spec["lower_is_better"],
                                             "target": spec["target"]}},
           "optim": {"name": optim, "lr": lr, "betas": [0.9, 0.999], "extra": {"k": 3}}}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg))
    atomic_write_json(run_dir / "meta.json", {"git_sha": "abc", "git_dirty": False,
                                              "device": "cpu", "host": "h"})
    w = MetricsWriter(run_dir / "metrics.csv")
    slow = 1 + 0.1 * seed  # different wall-clock grids per seed
    for i, step in enumerate(EVAL_STEPS):
        value = final if step == EVAL_STEPS[-1] else final * (0.5 + 0.1 * i)
        w.write(step, step / 10, step * 8, step * 0.1 * slow, "train", {"loss": 2.0 / (1 + i)})
        w.write(step, step / 10, step * 8, step * 0.1 * slow, "val", {spec["metric"]: value})
    w.close()
    if torn:
        with open(run_dir / "metrics.csv", "a") as f:
            f.write("40,4,320,4.")  # crash mid-row
    best = final + (-0.02 if spec["lower_is_better"] else 0.01)
    summary = {k: None for k in SUMMARY_FIELDS} | {
        "status": status, "name": "study", "task": task, "optim": optim, "scale": scale,
        "seed": seed, "metric": spec["metric"], "metric_split": "val",
        "lower_is_better": spec["lower_is_better"], "target": spec["target"],
        "final_metric": None if math.isnan(final) else final,
        "best_metric": None if math.isnan(final) else best,
        "steps_to_target": steps_to_target,
        "time_to_target_s": None if steps_to_target is None else steps_to_target * 0.1,
        "steps": 30, "opt_step_ms_mean": 2.0 + seed, "peak_memory_bytes": 2**20 * (1 + seed),
        "optimizer_state_bytes": 4096, "notes": ["synthetic"],
        "error": "boom" if status == "failed" else None, "family": family,
    }
    atomic_write_json(run_dir / "summary.json", summary)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multirun")
    for (task, optim), finals in FINAL.items():
        for seed, final in zip(SEEDS, finals):
            sub = "sweepA" if task == "cls" else "sweepB"
            status = STATUS.get((task, optim, seed), "ok")
            write_run(root / sub / f"{task}-{optim}-{seed}", task, optim, seed,
                      9.99 if status == "diverged" else final,  # last value before NaN
                      status=status,
                      steps_to_target=STEPS_TO_TARGET[(task, optim)][seed], lr=OPTIMS[optim],
                      torn=(task, optim, seed) == ("cls", "sisa", 0))
    return root


@pytest.fixture(scope="module")
def collected(sweep: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return collect([sweep, sweep / "sweepA"])  # overlapping roots: duplicates


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(summary: pd.DataFrame, task: str, optim: str) -> pd.Series:
    hit = summary[(summary["task"] == task) & (summary["optim"] == optim)]
    assert len(hit) == 1
    return hit.iloc[0]


# --- collect ------------------------------------------------------------------------------


def test_collect_finds_all_runs_once_and_keeps_failures(collected):
    runs, _ = collected
    assert len(runs) == len(FINAL) * len(SEEDS)
    assert runs["run_dir"].is_unique
    assert runs["status"].value_counts().to_dict() == {"ok": 16, "diverged": 1, "failed": 1}
    failed = runs[runs["status"] == "failed"].iloc[0]
    assert (failed["task"], failed["optim"], failed["seed"]) == ("cls", "adamw", 1)
    assert failed["error"] == "boom"


def test_collect_flattens_optimizer_hyperparameters(collected):
    runs, _ = collected
    for optim, lr in OPTIMS.items():
        assert set(runs.loc[runs["optim"] == optim, "optim.lr"]) == {lr}
    assert set(runs["optim.betas"]) == {"[0.9, 0.999]"}
    assert set(runs["optim.extra.k"]) == {3}
    assert set(runs["scale"]) == {"smoke"} and set(runs["name"]) == {"study"}


def test_collect_round_trips_through_parquet_and_csv(collected, tmp_path):
    runs, curves = collected
    written = write_collected(runs, curves, tmp_path / "out" / "runs")
    assert sorted(p.name for p in written) == [
        "runs.csv", "runs.parquet", "runs_curves.csv", "runs_curves.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "runs.parquet"), runs)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "out" / "runs_curves.parquet"), curves)
    back, back_curves = load_collected(tmp_path / "out" / "runs.csv")
    assert len(back) == len(runs) and len(back_curves) == len(curves)
    assert back.set_index("run_dir")["final_metric"].equals(
        runs.set_index("run_dir")["final_metric"])


def test_torn_last_metrics_line_is_dropped(collected):
    _, curves = collected
    per_run = curves.groupby("run_dir").size()
    assert set(per_run) == {2 * len(EVAL_STEPS)}  # the torn row of cls-sisa-0 is gone
    torn = curves[curves["run_dir"].str.endswith("cls-sisa-0")]
    assert torn["step"].max() == EVAL_STEPS[-1]
    assert {"task", "optim", "seed", "status", "metric", "value"} <= set(curves.columns)


def test_collect_script_prints_counts_by_status(sweep, tmp_path, capsys):
    assert load_script("collect").main([str(sweep), "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "18 runs (ok: 16, diverged: 1, failed: 1)" in out
    assert (tmp_path / "t.parquet").stat().st_size > 0
    assert (tmp_path / "t_curves.csv").stat().st_size > 0


# --- statistics and tables ----------------------------------------------------------------

T_975 = {1: 12.706204736174698, 2: 4.302652729911275}  # t quantiles, df = 1, 2


@pytest.mark.parametrize("task,optim", sorted(FINAL))
def test_table_means_stds_cis_match_numpy(collected, task, optim):
    s = row(summarize(collected[0]), task, optim)
    x = np.array([v for v in FINAL[(task, optim)] if not math.isnan(v)])
    n = x.size
    assert s["final_n"] == n
    assert s["final_mean"] == pytest.approx(x.mean())
    assert s["final_std"] == pytest.approx(x.std(ddof=1))
    half = T_975[n - 1] * x.std(ddof=1) / math.sqrt(n)
    assert s["final_ci_lo"] == pytest.approx(x.mean() - half)
    assert s["final_ci_hi"] == pytest.approx(x.mean() + half)
    shift = -0.02 if TASKS[task]["lower_is_better"] else 0.01
    assert s["best_mean"] == pytest.approx((x + shift).mean())
    assert s["n"] == 3
    assert s["n_diverged"] == (1 if (task, optim) == ("lm", "sgd") else 0)
    assert s["n_failed"] == (1 if (task, optim) == ("cls", "adamw") else 0)
    assert s["opt_step_ms_mean"] == pytest.approx(np.mean([2.0, 3.0, 4.0]))  # all runs


def test_time_to_target_median_over_ok_runs_that_reached(collected):
    summary = summarize(collected[0])
    expected = {  # (median steps, k reached); diverged lm-sgd-2 reached but is not ok
        ("cls", "adamw"): (300, 2), ("cls", "sgd"): (400, 1), ("cls", "sisa"): (200, 3),
        ("lm", "adamw"): (NAN, 0), ("lm", "sgd"): (NAN, 0), ("lm", "sisa"): (475, 2),
    }
    for (task, optim), (med, k) in expected.items():
        s = row(summary, task, optim)
        assert s["reached"] == k
        np.testing.assert_equal(s["steps_to_target_median"], med)
        np.testing.assert_allclose(s["time_to_target_median"], med * 0.1)


def _final_cells(markdown: str, caption_start: str) -> dict[str, str]:
    """``{optimizer: final cell}`` of the Markdown table under the heading of one task."""
    section = markdown.split(f"### {caption_start}")[1].split("###")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    return {cells[1].strip(): cells[2].strip() for cells in (r.split("|") for r in rows)}


def test_table_bolds_best_mean_respecting_lower_is_better(collected):
    md, tex = render_tables(collected[0], title="Synthetic")
    cls, lm = _final_cells(md, "cls"), _final_cells(md, "lm")
    assert [o for o, c in cls.items() if "**" in c] == ["sisa"]  # highest accuracy
    assert [o for o, c in lm.items() if "**" in c] == ["sisa"]  # lowest loss
    assert cls["sisa"].startswith(f"**{np.mean([0.85, 0.86, 0.88]):.4g}**")
    assert lm["sisa"].startswith(f"**{np.mean([2.90, 2.95, 3.05]):.4g}**")
    assert "diverged, failed" in md and "treated as missing" in md
    assert rf"\textbf{{{np.mean([2.90, 2.95, 3.05]):.4g}}}" in tex
    assert r"val\_loss" in tex and r"\toprule" in tex


def test_table_reports_reached_counts_and_divergences(collected):
    md, _ = render_tables(collected[0])
    lm = md.split("### lm")[1]
    sgd = next(ln for ln in lm.splitlines() if ln.startswith("| sgd "))
    assert "| 0/3 |" in sgd and "| 1 / 0 |" in sgd


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_paired_test_against_best_baseline_matches_scipy(collected):
    runs = collected[0]
    tests = significance(runs)
    # best baseline: cls -> adamw (higher accuracy), lm -> adamw (lower loss; sgd if ignored)
    assert set(zip(tests["task"], tests["baseline"])) == {("cls", "adamw"), ("lm", "adamw")}
    for _, t in tests.iterrows():
        a, b = FINAL[(t["task"], t["optim"])], FINAL[(t["task"], t["baseline"])]
        pairs = [(x, y) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))]
        xa, xb = np.array(pairs).T
        assert t["n"] == len(pairs)
        np.testing.assert_allclose(t["t_p"], stats.ttest_rel(xa, xb).pvalue)
        assert t["mean_diff"] == pytest.approx(np.mean(xa - xb))
        assert math.isnan(t["wilcoxon_p"])  # n < 5


@pytest.mark.parametrize("n_seeds", [4, 6])
def test_wilcoxon_only_from_five_pairs(tmp_path, n_seeds):
    rng = np.random.default_rng(0)
    spec = {"metric": "accuracy", "lower_is_better": False, "target": None}
    vals = {"adamw": rng.uniform(0.7, 0.8, n_seeds), "nsisa": rng.uniform(0.75, 0.85, n_seeds)}
    for optim, xs in vals.items():
        for seed, x in enumerate(xs):
            write_run(tmp_path / f"{optim}-{seed}", "t", optim, seed, float(x), task_spec=spec)
    t = significance(collect([tmp_path])[0]).iloc[0]
    assert (t["optim"], t["baseline"], t["n"]) == ("nsisa", "adamw", n_seeds)
    np.testing.assert_allclose(t["t_p"], stats.ttest_rel(vals["nsisa"], vals["adamw"]).pvalue)
    if n_seeds >= 5:
        np.testing.assert_allclose(
            t["wilcoxon_p"], stats.wilcoxon(vals["nsisa"], vals["adamw"]).pvalue)
    else:
        assert math.isnan(t["wilcoxon_p"])


# --- curves and profiles ------------------------------------------------------------------


def test_seed_band_interpolates_differing_grids():
    df = pd.DataFrame({"run_dir": ["a"] * 3 + ["b"] * 3, "x": [0, 10, 20, 5, 15, 25],
                       "value": [1, 2, 3, 2, 4, 6]})
    b = seed_band(df, "x")
    np.testing.assert_allclose(b["x"], [5, 10, 15, 20])  # union of grids inside the overlap
    a_i, b_i = np.array([1.5, 2, 2.5, 3]), np.array([2, 3, 4, 5])
    np.testing.assert_allclose(b["mean"], (a_i + b_i) / 2)
    np.testing.assert_allclose(b["min"], a_i)
    np.testing.assert_allclose(b["max"], b_i)
    np.testing.assert_allclose(b["std"], np.std([a_i, b_i], axis=0, ddof=1))


def test_performance_profile_hand_example():
    def runs_of(task, optim, times, target=1.0, statuses=None):
        statuses = statuses or ["ok"] * len(times)
        return [{"task": task, "scale": "", "optim": optim, "seed": i, "status": s,
                 "target": target, "time_to_target_s": t, "steps_to_target": t}
                for i, (t, s) in enumerate(zip(times, statuses))]

    runs = pd.DataFrame(
        runs_of("T1", "A", [10, 12, 11]) + runs_of("T1", "B", [22, 20, 24])
        + runs_of("T2", "A", [None, None, 5]) + runs_of("T2", "B", [5, 7, 1],
                                                       statuses=["ok", "ok", "diverged"])
        + runs_of("T3", "A", [None]) + runs_of("T3", "B", [None])  # nobody reaches
        + runs_of("T4", "A", [None], target=None) + runs_of("T4", "B", [3], target=None)
    )
    costs = target_costs(runs)  # medians; not reached / not ok -> inf; T4 has no target
    assert list(costs.index) == ["T1", "T2", "T3"]
    np.testing.assert_array_equal(costs["A"], [11, np.inf, np.inf])
    np.testing.assert_array_equal(costs["B"], [22, 7, np.inf])
    ratios = performance_ratios(costs)
    np.testing.assert_array_equal(ratios["A"], [1, np.inf, np.inf])
    np.testing.assert_array_equal(ratios["B"], [2, 1, np.inf])
    rho = performance_profile(ratios, np.array([1.0, 1.5, 2.0, 100.0]))
    np.testing.assert_allclose(rho["A"], [1 / 3, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(rho["B"], [1 / 3, 1 / 3, 2 / 3, 2 / 3])


# --- figures and report -------------------------------------------------------------------


def test_report_writes_tables_and_nonempty_figures(sweep, tmp_path, capsys):
    load_script("collect").main([str(sweep), "--out", str(tmp_path / "tables" / "runs")])
    out = tmp_path / "report"
    load_script("report").main(["--table", str(tmp_path / "tables" / "runs.parquet"),
                                "--out", str(out), "--title", "Synthetic"])
    capsys.readouterr()
    names = ["table.md", "table.tex", "runs.csv"] + [
        f"{stem}.{ext}" for stem in ("curves_steps", "curves_wall", "curves_samples", "profile")
        for ext in ("png", "pdf")]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "profile.pdf").read_bytes()[:5] == b"%PDF-"
    assert len(pd.read_csv(out / "runs.csv")) == 18


def test_report_skips_profile_with_fewer_than_two_target_tasks(collected, tmp_path):
    runs = collected[0]
    done = render(runs[runs["task"] == "cls"], None, tmp_path)
    assert not (tmp_path / "profile.png").exists()
    assert any("profile skipped: 1 task(s) with a target (cls (smoke))" in n for n in done.notes)
    assert (tmp_path / "table.md").stat().st_size > 0


# --- grouping by run identity (issue 9 item 6) -----------------------------------------------


def _identity_sweep(root: Path) -> Path:
    """adamw at two lrs (two identities, two seeds each), one duplicate of (lr 1e-3, seed 0)
    under another experiment name, and a federated reference."""
    for i, (lr, seed, final) in enumerate([(1e-3, 0, 0.80), (1e-3, 1, 0.82), (0.3, 0, 0.10),
                                           (0.3, 1, 0.12), (1e-3, 0, 0.99)]):
        write_run(root / f"r{i}", "cls", "adamw", seed, final, lr=lr)
    write_run(root / "ref", "cls", "sgd", 0, 0.95, lr=0.1)
    cfg = yaml.safe_load((root / "ref" / "config.yaml").read_text())
    cfg["fl"] = {"method": "central"}
    atomic_write_text(root / "ref" / "config.yaml", yaml.safe_dump(cfg))
    write_run(root / "base", "cls", "sgd", 0, 0.50, lr=0.05)
    return root


def test_rows_are_run_identities_labelled_by_what_differs(tmp_path):
    from pisa_bench.analysis.identity import identity_hash, label_identities

    runs, _ = collect([_identity_sweep(tmp_path)])
    df = label_identities(runs).set_index(runs["run_dir"].map(lambda d: Path(d).name))
    assert df.loc["r0", "label"] == "adamw[lr=0.001]" and df.loc["r2", "label"] == "adamw[lr=0.3]"
    assert df.loc["r0", "identity"] == df.loc["r1", "identity"] != df.loc["r2", "identity"]
    assert df["duplicate"].to_dict() == {k: k == "r4" for k in df.index}
    assert bool(df.loc["ref", "reference"]) and not bool(df.loc["base", "reference"])
    # seed and values that follow it (partition_seed: ${seed}) are not identity; name neither
    a = {"seed": 1, "name": "x", "task": {"partition_seed": 1, "split_seed": 7}, "optim": {}}
    b = {"seed": 2, "name": "y", "task": {"partition_seed": 2, "split_seed": 7}, "optim": {}}
    assert identity_hash(a) == identity_hash(b)
    assert identity_hash(a) != identity_hash({**b, "task": {"partition_seed": 2,
                                                            "split_seed": 8}})


def test_identities_survive_the_move_into_pisa_bench(tmp_path):
    """Every run the committed quickstart artefact plans today has the identity its committed
    row recorded before the harness moved into ``pisa_bench`` (its ``task.cls`` was spelled
    ``experiments.tasks...``): so committed run directories are found, not run again."""
    import csv

    from pisa_bench.identity import identity_hash
    from pisa_bench.launch.plan import plan

    rows = list(csv.DictReader((REPO / "results" / "quickstart" / "runs.csv").open()))
    recorded = {r["identity"] for r in rows}
    p = plan("quickstart", None, None, tmp_path, ["train.threads=1"])
    assert str(p.points[0].cfg.task.cls).startswith("pisa_bench.tasks.")
    planned = {identity_hash(pt.cfg) for pt in p.points}
    assert planned == recorded and len(planned) == 4  # one per optimizer
    assert identity_hash({"task": {"cls": "pisa_bench.tasks.x:Y"}}) == identity_hash(
        {"task": {"cls": "experiments.tasks.x:Y"}}) != identity_hash({"task": {"cls": "x:Y"}})


def test_table_never_pools_identities_and_flags_duplicates(tmp_path):
    runs, curves = collect([_identity_sweep(tmp_path)])
    done = render(runs, curves, tmp_path / "out")
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| adamw[lr=0.001] | 0.81 ± 0.014 |" in table  # r4 (0.99) left out as duplicate
    assert "| adamw[lr=0.3] | 0.11 ± 0.014 |" in table
    assert any("1 duplicate run(s) left out" in n and "r4" in n for n in done.notes)
    # the reference (centralised, 0.95) is shown but is not the best baseline: lr 1e-3 adamw is
    assert "| sgd[fl.method=central,lr=0.1] (reference) |" in table
    assert table.count("reference |") == 1  # the test column's "reference": the best baseline
    line = next(ln for ln in table.splitlines() if ln.startswith("| adamw[lr=0.001] |"))
    assert line.rstrip().endswith("| reference |")


# --- family: PISA family or baseline, from the runs, never from names ----------------------------
ACC = {"metric": "accuracy", "lower_is_better": False, "target": None}


def test_family_column_not_names_tells_baselines(tmp_path):
    """A PISA-family optimizer under a name no list holds (``mysisa``, recorded ``consensus``)
    is never the best baseline and leads the legend; a baseline named like the family
    (``sisa_like``, recorded ``baseline``) is a baseline."""
    for optim, family, finals in (("mysisa", "consensus", [0.90, 0.92, 0.91]),
                                  ("sisa_like", "baseline", [0.80, 0.82, 0.81]),
                                  ("adamw", "baseline", [0.70, 0.72, 0.71])):
        for seed, final in enumerate(finals):
            write_run(tmp_path / f"{optim}-{seed}", "t", optim, seed, final, task_spec=ACC,
                      family=family)
    runs, _ = collect([tmp_path])
    assert dict(zip(runs["optim"], runs["family"])) == {
        "mysisa": "consensus", "sisa_like": "baseline", "adamw": "baseline"}
    summary = summarize(runs)
    assert dict(zip(summary["optim"], summary["family"])) == {
        "mysisa": "consensus", "sisa_like": "baseline", "adamw": "baseline"}
    assert best_baselines(summary) == {("t", "smoke"): "sisa_like"}
    tests = significance(runs, summary)
    assert set(tests["optim"]) == {"mysisa", "adamw"} and set(tests["baseline"]) == {"sisa_like"}
    assert consensus_labels(runs) == {"mysisa"}
    assert list(optimizer_colors(runs["optim"], consensus_labels(runs))) == [
        "mysisa", "adamw", "sisa_like"]


def test_family_of_old_records_follows_the_optimizer_class(tmp_path):
    """Summaries without ``family`` (written before the field, or by a run that failed before
    building its optimizer) get the family of the config's optimizer class; a Muon Hybrid
    recorded ``consensus`` (before the trainer followed a Hybrid's main optimizer) is a baseline;
    for a name the registry does not know the record stands. The same from a runs CSV whose
    ``family`` column is wrong or blank."""
    records = {"sisa": None, "adamw": None, "muon": "consensus", "nsisa": "consensus",
               "mysisa": "consensus", "sisa_like": None}
    for optim, family in records.items():
        write_run(tmp_path / "runs" / optim, "t", optim, 0, 0.5, task_spec=ACC, family=family)
    want = {"sisa": "consensus", "adamw": "baseline", "muon": "baseline", "nsisa": "consensus",
            "mysisa": "consensus", "sisa_like": None}
    runs, curves = collect([tmp_path / "runs"])
    assert families(runs) == want
    runs["family"] = runs["optim"].map(records)  # the old records, as a committed runs.csv has
    write_collected(runs, curves, tmp_path / "table" / "runs")
    assert families(load_collected(tmp_path / "table" / "runs.csv")[0]) == want


def families(runs: pd.DataFrame) -> dict[str, str | None]:
    return {o: None if pd.isna(f) else f for o, f in zip(runs["optim"], runs["family"])}


def test_artefact_hardware_names_the_cpu_where_recorded() -> None:
    """An artefact's hardware line: each device with the CPU its records name; records without
    ``meta.cpu`` (written before it) give the device alone."""
    import pandas as pd

    from pisa_bench.analysis.artefact import hardware

    epyc = "EPYC (AVX512, 2 cores)"
    rows = pd.DataFrame({"meta.device": ["cpu", "cpu", "cpu", None],
                         "meta.cpu": [epyc, None, epyc, "x"]})
    assert hardware(rows) == ["cpu", "cpu (EPYC (AVX512, 2 cores))"]
    assert hardware(rows.drop(columns="meta.cpu")) == ["cpu"]
    assert hardware(pd.DataFrame()) == []
