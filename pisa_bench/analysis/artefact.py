"""Render a protocol artefact (:mod:`pisa_bench.protocol`) into ``results/<artefact>/``.

Files::

    runs.csv        one row per (run, role): every summary field, arm, role (trial / tuned /
                    paper), lr_mult, final and best validation metric (``final_val_metric``:
                    the selection criterion), the run's identity hash
    tuning.md       the seed-0 trials: validation metric (selection) and test metric per lr
                    multiple, extra trials of the edge rule marked, the chosen multiple
    table.md        per task and arm, rows "tuned" and "paper settings": final test metric
                    (mean +- std, 95% CI), best-over-training test metric (labelled), ok / n,
                    diverged / failed, optimizer-step ms, wall time, optimizer-state bytes
    verdict.md      paired comparisons, Holm, detectable effect, verdict (analysis.verdict)
    verdict.json    the same, machine-readable (read by ``reproduce.py verdicts``)
    speed.md        with ``protocol.speed_reference``: steps / tokens / seconds of each tuned
                    arm to that arm's final metric (:mod:`pisa_bench.analysis.speed`)
    sensitivity.{png,pdf}   final validation / test metric vs lr multiple, seed 0, per arm
    curves_*.{png,pdf}      test-metric curves of the tuned rows, mean and min-max over seeds
    README.md       setup, command, verdict, caveats
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
import pandas as pd

from pisa_bench.analysis.aggregate import consensus_labels
from pisa_bench.analysis.collect import collect
from pisa_bench.analysis.figures import STYLE, _new_figure, optimizer_colors, plot_curves, save
from pisa_bench.analysis.identity import identity_of
from pisa_bench.analysis.speed import speed_table
from pisa_bench.analysis.stats import mean_ci
from pisa_bench.analysis.tables import fmt_bytes, fmt_num
from pisa_bench.analysis.verdict import ALPHA, compare, comparisons_frame, overall

if TYPE_CHECKING:
    from pisa_bench.protocol import Protocol

ROLE_NAMES = {"tuned": "tuned", "paper": "paper settings"}


# --- tables of runs ---------------------------------------------------------------------------
def hardware(rows: pd.DataFrame) -> list[str]:
    """The runs' devices, each with its CPU where the record names it (``meta.cpu``)."""
    if "meta.device" not in rows:
        return []
    cpus = rows["meta.cpu"] if "meta.cpu" in rows else pd.Series(index=rows.index, dtype=object)
    return sorted({str(d) if pd.isna(c) else f"{d} ({c})"
                   for d, c in zip(rows["meta.device"], cpus) if not pd.isna(d)})


def val_columns(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run_dir: ``final_val_metric`` (last ``val_<metric>`` row) and ``best_val_metric``."""
    cols = ["run_dir", "final_val_metric", "best_val_metric"]
    if curves is None or curves.empty or runs.empty:
        return pd.DataFrame(columns=cols)
    info = runs[["run_dir", "metric", "lower_is_better"]].drop_duplicates("run_dir")
    c = curves.merge(info, on="run_dir")
    c = c[c["metric_x"] == "val_" + c["metric_y"].astype(str)] if "metric_x" in c else c
    rows = []
    for rd, g in c.groupby("run_dir"):
        v = pd.to_numeric(g["value"], errors="coerce").dropna()
        v = v[np.isfinite(v)]
        if v.empty:
            continue
        lower = str(g["lower_is_better"].iloc[0]).lower() in ("true", "1")
        rows.append([rd, float(v.iloc[-1]), float(v.min() if lower else v.max())])
    return pd.DataFrame(rows, columns=cols)


def protocol_runs(proto: Protocol) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(rows, curves)``: one row per (run, role) of the protocol (runs never started appear
    with status ``not started``), and the curves of the started runs."""
    roles = proto.roles()
    started = [d for d in roles if (d / "summary.json").exists()]
    runs, curves = collect(started) if started else (pd.DataFrame(), pd.DataFrame())
    by_dir = {str(Path(r).resolve()): i for i, r in enumerate(runs.get("run_dir", []))}
    if not runs.empty:
        runs = runs.merge(val_columns(curves, runs), on="run_dir", how="left")
    rows = []
    for rd, entries in roles.items():
        i = by_dir.get(str(rd.resolve()))
        base = runs.iloc[i].to_dict() if i is not None else {
            "run_dir": str(rd.resolve()), "status": "not started"}
        if i is not None:
            base["identity"] = identity_of(rd)
        for arm, role, seed, m in entries:
            task, lower = proto.metric_of(arm)
            rows.append({**base, "family": base.get("family") or arm.family,
                         "arm_task": arm.task, "arm": arm.label, "role": role,
                         "seed": seed, "lr_mult": m, "extra_trial": m in arm.extra,
                         "metric": base.get("metric") or task,
                         "lower_is_better": lower})
    out = pd.DataFrame(rows)
    first = ["arm_task", "arm", "role", "seed", "lr_mult", "status", "final_val_metric",
             "final_metric", "best_metric"]
    out = out[[c for c in first if c in out] + [c for c in out if c not in first]]
    return out, curves


def seed_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The verdict's input: tuned / paper rows as (task, arm, role, seed, status, metric)."""
    s = rows[rows["role"].isin(list(ROLE_NAMES))].copy()
    s = s.rename(columns={"arm_task": "task_label"})
    s["task"] = s["task_label"]
    s = s[s["status"].isin(["ok", "diverged", "failed"])]
    return s[["task", "arm", "role", "seed", "status", "final_metric", "lower_is_better"]]


# --- markdown ---------------------------------------------------------------------------------
def _pm(ci: Any) -> str:
    if ci.n == 0:
        return "–"
    return fmt_num(ci.mean) + (f" ± {fmt_num(ci.std, 2)}" if math.isfinite(ci.std) else "")


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def summary_table(rows: pd.DataFrame, proto: Protocol) -> str:
    """``table.md``: per task, one row per (arm, setting)."""
    lines = []
    refs = set(proto.spec.references)
    for task, g in rows.groupby("arm_task", sort=True):
        metric, lower = str(g["metric"].iloc[0]), bool(g["lower_is_better"].iloc[0])
        lines += [f"### {task}: final test {metric} ({'lower' if lower else 'higher'} is "
                  "better)", "",
                  "| arm | setting | lr × | final test (mean ± std) | 95% CI | best-over-training"
                  " test (mean) | final val (mean) | ok / n | div. / fail. | opt. step (ms) | "
                  "wall (s) | opt. state |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for arm in _arm_order(g, proto):
            for role in ROLE_NAMES:
                r = g[(g["arm"] == arm) & (g["role"] == role)]
                if r.empty:
                    continue
                ok = r[r["status"] == "ok"]
                fin = mean_ci(pd.to_numeric(ok["final_metric"], errors="coerce").to_numpy())
                best = mean_ci(pd.to_numeric(ok["best_metric"], errors="coerce").to_numpy())
                val = mean_ci(pd.to_numeric(ok.get("final_val_metric"), errors="coerce")
                              .to_numpy()) if "final_val_metric" in ok else mean_ci([])
                ci = (f"[{fmt_num(fin.lo)}, {fmt_num(fin.hi)}]" if math.isfinite(fin.lo)
                      else "–")
                nd = int((r["status"] == "diverged").sum())
                nf = int((r["status"] == "failed").sum())
                other = len(r) - len(ok) - nd - nf
                name = f"{arm} (reference)" if arm in refs else arm
                cost = {c: pd.to_numeric(r.get(c), errors="coerce").mean() for c in
                        ("opt_step_ms_mean", "wall_time_s", "optimizer_state_bytes")}
                lines.append(
                    f"| {name} | {ROLE_NAMES[role]} | {float(r['lr_mult'].iloc[0]):.4g} | "
                    f"{_pm(fin)} | {ci} | {fmt_num(best.mean)} | {fmt_num(val.mean)} | "
                    f"{len(ok)} / {len(r)} | {nd} / {nf}"
                    + (f" (+{other} unfinished)" if other else "")
                    + f" | {fmt_num(cost['opt_step_ms_mean'], 3)} | "
                    f"{fmt_num(cost['wall_time_s'], 3)} | "
                    f"{fmt_bytes(cost['optimizer_state_bytes'])} |")
        lines.append("")
    lines.append(
        "*final test: the test metric at the end of training (the reported number); "
        "best-over-training: the best test value seen during training (optimistic, shown for "
        "comparison with the paper's scripts, never used for a verdict); final val: the "
        "validation metric the tuned setting was selected on. Means over ok runs; diverged and "
        "failed runs count as failures in the verdict. lr ×: multiple of the arm's configured "
        "learning rate (1 = paper settings). Costs: means over the row's runs.*")
    return "\n".join(lines) + "\n"


def _arm_order(g: pd.DataFrame, proto: Protocol) -> list[str]:
    arms = list(dict.fromkeys(a.label for a in proto.arms if a.label in set(g["arm"])))
    refs = set(proto.spec.references)
    return sorted(arms, key=lambda a: (a not in proto.spec.claims, a in refs, a))


def tuning_table(rows: pd.DataFrame, proto: Protocol) -> str:
    """``tuning.md``: seed-0 trials per arm (validation metric selects, test shown)."""
    lines = ["Seed-0 trials. Cell: final validation metric (selection) / final test metric; "
             "`div`/`fail`: the trial diverged / failed (ranks last); `+`: extra trial of the "
             "edge rule; **bold**: the chosen multiple.", ""]
    by_arm = {(a.task, a.label): a for a in proto.arms}
    for task, g in rows[rows["role"] == "trial"].groupby("arm_task", sort=True):
        mults = sorted(set(g["lr_mult"]))
        lines += [f"### {task} (final val / final test {g['metric'].iloc[0]})", "",
                  "| arm | " + " | ".join(f"×{m:g}" for m in mults) + " | chosen | note |",
                  "|---|" + "---:|" * len(mults) + "---:|---|"]
        for arm in _arm_order(g, proto):
            a = by_arm[(task, arm)]
            cells = []
            for m in mults:
                r = g[(g["arm"] == arm) & (g["lr_mult"] == m)]
                if r.empty:
                    cells.append("")
                    continue
                r0 = r.iloc[0]
                st = str(r0["status"])
                if st == "ok":
                    cell = f"{fmt_num(_num(r0.get('final_val_metric')))} / " \
                           f"{fmt_num(_num(r0.get('final_metric')))}"
                else:
                    cell = {"diverged": "div", "failed": "fail"}.get(st, st)
                if m in a.extra:
                    cell = "+" + cell
                if a.chosen is not None and math.isclose(m, a.chosen):
                    cell = f"**{cell}**"
                cells.append(cell)
            note = []
            if a.extra:
                note.append(f"{len(a.extra)} extra trial(s): " + ", ".join(f"×{m:g}"
                                                                          for m in a.extra))
            if a.at_edge:
                note.append(f"best still at the {a.at_edge} edge after "
                            f"{proto.spec.max_extend} extra trials: a bound, not an optimum")
            chosen = f"×{a.chosen:g}" if a.chosen is not None else "–"
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {chosen} | "
                         + "; ".join(note) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _f(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}g}" if math.isfinite(x) else "–"


def verdict_records(rows: pd.DataFrame, proto: Protocol) -> list[dict[str, Any]]:
    """Per (task, claimed arm, role): overall verdict, the comparisons, means."""
    seeds = seed_table(rows)
    out = []
    roles = ["tuned", "paper"] if proto.spec.tuned else ["paper"]
    for role in roles:
        comps = compare(seeds, proto.spec.claims, proto.spec.references, role=role)
        df = comparisons_frame(comps)
        for (task, claim), g in df.groupby(["task", "claim"], sort=True):
            mine = [c for c in comps if c.task == task and c.claim == claim]
            sub = seeds[(seeds["task"] == task) & (seeds["role"] == role)]
            means = {a: float(pd.to_numeric(x[x["status"] == "ok"]["final_metric"]).mean())
                     for a, x in sub.groupby("arm")}
            out.append({"task": task, "claim": claim, "role": role,
                        "lower_is_better": bool(sub["lower_is_better"].iloc[0]),
                        "verdict": overall(mine), "n_min": int(g["n"].min()),
                        "means": means, "comparisons": [c.as_dict() for c in mine]})
    return out


def verdict_markdown(records: list[dict[str, Any]], rows: pd.DataFrame) -> str:
    lines = []
    for rec in records:
        lower = bool(rows[rows["arm_task"] == rec["task"]]["lower_is_better"].iloc[0])
        lines += [f"### {rec['task']}: {rec['claim']} vs baselines, {ROLE_NAMES[rec['role']]}",
                  "", f"**Verdict: {rec['verdict']}.**", "",
                  "| baseline | n | effect (+ favours claim) | 95% CI | p | Holm p | "
                  "smallest detectable | claim / baseline failures | verdict |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in rec["comparisons"]:
            lines.append(
                f"| {c['baseline']} | {c['n']} | {_f(c['effect'])} | [{_f(c['ci_lo'])}, "
                f"{_f(c['ci_hi'])}] | {fmt_num(c['p'], 3)} | {fmt_num(c['p_holm'], 3)} | "
                f"{fmt_num(c['mde'], 3)} | {c['claim_failures']} / {c['baseline_failures']} | "
                f"{c['verdict']} |")
        lines += ["", f"effect = {'baseline − claim' if lower else 'claim − baseline'} final "
                  f"test metric, paired by seed; paired t-test, Holm over the "
                  f"{len(rec['comparisons'])} baselines, alpha {ALPHA}; smallest detectable: "
                  "true effect found with 80% power at the strictest Holm level.", ""]
    return "\n".join(lines) + "\n"


# --- figures ----------------------------------------------------------------------------------
def plot_sensitivity(rows: pd.DataFrame, proto: Protocol, path_stem: str | os.PathLike
                     ) -> list[Path]:
    """Final validation (top) and test (bottom) metric vs lr multiple, seed-0 trials; diverged
    / failed trials drawn as crosses at the panel's bottom edge; chosen multiple starred."""
    t = rows[rows["role"] == "trial"]
    tasks = sorted(set(t["arm_task"]))
    if not tasks:
        return []
    colors = optimizer_colors(t["arm"], consensus_labels(t, "arm"))
    chosen = {(a.task, a.label): a.chosen for a in proto.arms}
    with mpl.rc_context(STYLE):
        fig = _new_figure(2, len(tasks), w=4.2, h=2.8)
        axes = fig.subplots(2, len(tasks), squeeze=False)
        for j, task in enumerate(tasks):
            g = t[t["arm_task"] == task]
            for i, (col, name) in enumerate((("final_val_metric", "final val"),
                                             ("final_metric", "final test"))):
                ax = axes[i, j]
                for arm, ga in g.groupby("arm", sort=True):
                    ga = ga.sort_values("lr_mult")
                    ok = ga[ga["status"] == "ok"]
                    y = pd.to_numeric(ok.get(col), errors="coerce")
                    ax.plot(ok["lr_mult"], y, marker="o", markersize=3, color=colors[arm],
                            label=arm)
                    c = chosen.get((task, arm))
                    if c is not None and (ok["lr_mult"] == c).any():
                        ax.plot([c], y[ok["lr_mult"] == c].iloc[:1], marker="*",
                                markersize=10, color=colors[arm], linestyle="none")
                    bad = ga[ga["status"].isin(["diverged", "failed"])]
                    if len(bad):
                        ax.plot(bad["lr_mult"], [ax.get_ylim()[0]] * len(bad), marker="x",
                                color=colors[arm], linestyle="none")
                ax.set_xscale("log")
                ax.set_xlabel("lr multiple of the configured value")
                ax.set_ylabel(f"{name} {g['metric'].iloc[0]}")
                ax.set_title(task)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4),
                   title="seed 0; star: chosen on validation; x: diverged / failed",
                   title_fontsize=7)
    return save(fig, path_stem)


def plot_tuned_curves(rows: pd.DataFrame, curves: pd.DataFrame, out: Path, title: str
                      ) -> list[Path]:
    """The analysis' curve figures for the rows ``tuned`` (or ``paper`` without tuning)."""
    role = "tuned" if (rows["role"] == "tuned").any() else "paper"
    r = rows[(rows["role"] == role) & (rows["status"] != "not started")].copy()
    if r.empty or curves is None or curves.empty:
        return []
    r["task"], r["optim"] = r["arm_task"], r["arm"]
    r = r.drop_duplicates("run_dir")
    files: list[Path] = []
    for stem, x in (("curves_steps", "step"), ("curves_wall", "wall_time_s")):
        files += plot_curves(r, curves, out / stem, x=x, title=f"{title} ({ROLE_NAMES[role]})")
    return files


# --- the whole artefact -----------------------------------------------------------------------
def render_protocol(proto: Protocol, out_dir: str | os.PathLike, artefact: str,
                    command: str) -> str:
    """Write the artefact directory (module docstring); returns a text summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = proto.plan.meta
    title = str(meta.get("title") or artefact)
    rows, curves = protocol_runs(proto)
    rows.to_csv(out / "runs.csv", index=False)
    (out / "table.md").write_text(f"# {title}\n\n" + summary_table(rows, proto))
    if proto.spec.tuned:
        (out / "tuning.md").write_text(f"# {title}: tuning trials\n\n"
                                       + tuning_table(rows, proto))
        plot_sensitivity(rows, proto, out / "sensitivity")
    records = verdict_records(rows, proto)
    vmd = verdict_markdown(records, rows)
    (out / "verdict.md").write_text(f"# {title}: verdict\n\n{vmd}")
    plot_tuned_curves(rows, curves, out, title)
    if proto.spec.speed_reference:
        (out / "speed.md").write_text(f"# {title}: steps and tokens to the target\n\n"
                                      + speed_table(rows, curves, proto.spec.speed_reference))
    status = rows.drop_duplicates("run_dir")["status"].value_counts().to_dict()
    info = {
        "artefact": artefact, "title": title, "claim": str(meta.get("claim") or ""),
        "command": command, "scale": proto.plan.scale, "setup": str(meta.get("setup") or ""),
        "caveats": list(meta.get("caveats") or []), "records": records,
        "runs": {str(k): int(v) for k, v in status.items()},
        "protocol": {"trials": proto.spec.trials, "lr_range": list(proto.spec.lr_range),
                     "max_extend": proto.spec.max_extend, "seeds": proto.spec.seeds,
                     "claims": list(proto.spec.claims),
                     "references": list(proto.spec.references),
                     "adopt_ignore": list(proto.spec.adopt_ignore),
                     "speed_reference": proto.spec.speed_reference},
        "hardware": hardware(rows),
        "edge": {f"{a.task}/{a.label}": a.at_edge for a in proto.arms if a.at_edge},
        "extra_trials": {f"{a.task}/{a.label}": a.extra for a in proto.arms if a.extra},
    }
    (out / "verdict.json").write_text(json.dumps(info, indent=2, default=_json) + "\n")
    (out / "README.md").write_text(readme(info, rows, out))
    lines = [f"{r['task']} / {r['claim']} ({ROLE_NAMES[r['role']]}): {r['verdict']}"
             for r in records]
    return "\n".join([*lines, f"wrote {out}/"]) + "\n"


def _json(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def readme(info: dict[str, Any], rows: pd.DataFrame, out: Path) -> str:
    """The artefact's README: setup, command, verdict, caveats (all from the run record)."""
    sp = info["protocol"]
    runs = ", ".join(f"{v} {k}" for k, v in info["runs"].items())
    lines = [f"# {info['title']}", "",
             f"**Claim of the paper:** {info['claim'] or '(not stated in the experiment)'}", "",
             "## Setup", "", info["setup"] or "(see the experiment config)", "",
             "Protocol (results/PROTOCOL.md): "
             + (f"{sp['trials']} lr trials per arm on seed 0 (×{sp['lr_range'][0]:g} .. "
                f"×{sp['lr_range'][1]:g} of its configured lr, log-spaced; edge rule up to "
                f"{sp['max_extend']} extra trials per side), selection on the validation split, "
                f"then " if sp["trials"] else "no tuning (each arm at its configured settings), ")
             + f"{sp['seeds']} seeds; claimed arm(s): {', '.join(sp['claims'])}; references "
             f"(never the compared baseline): {', '.join(sp['references']) or 'none'}. "
             f"Scale: {info['scale']}. Runs: {runs}. Hardware: "
             f"{', '.join(info['hardware']) or '?'}.", "",
             "## Command", "", "```", f"{info['command']}", "```", "",
             "## Verdict", ""]
    for r in info["records"]:
        lines.append(f"- {r['task']}, {r['claim']} vs baselines ({ROLE_NAMES[r['role']]}): "
                     f"**{r['verdict']}** ({numbers(r, sp)})")
    lines += ["", "Details: `verdict.md`; numbers: `table.md`"
              + (", `tuning.md`, `sensitivity.png`" if sp["trials"] else "")
              + (", `speed.md` (steps / tokens to the tuned "
                 f"{sp['speed_reference']}'s final metric)" if sp.get("speed_reference") else "")
              + "; every run: `runs.csv`.", "", "## Caveats", ""]
    cav = list(info["caveats"])
    for k, side in info["edge"].items():
        cav.append(f"{k}: best lr still at the {side} edge of its grid after the extra "
                   f"trials; its tuned value is a bound.")
    for k, ms in info["extra_trials"].items():
        cav.append(f"{k}: extra trials by the edge rule at " + ", ".join(f"×{m:g}" for m in ms))
    if sp.get("adopt_ignore"):
        cav.append("recorded runs were matched to the config ignoring "
                   + ", ".join(f"`{k}`" for k in sp["adopt_ignore"])
                   + " (reproduce.protocol.adopt_ignore; the reason is in the experiment config)")
    unfinished = {k: v for k, v in info["runs"].items() if k not in ("ok", "diverged", "failed")}
    if unfinished:
        cav.append(f"unfinished runs: {unfinished} (rerun the command to complete them)")
    lines += [f"- {c}" for c in cav] or ["- none recorded"]
    figs = sorted(p.name for p in out.glob("*.png"))
    if figs:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"


def numbers(rec: dict[str, Any], sp: dict[str, Any]) -> str:
    """``sisa 82.85; best baseline sgdm[method=fedavg] 82.35`` (final test, mean over seeds)."""
    means, lower = rec["means"], bool(rec.get("lower_is_better", False))
    base = {a: v for a, v in means.items()
            if a != rec["claim"] and a not in sp.get("references", [])
            and a not in sp.get("claims", []) and v is not None and math.isfinite(v)}
    text = f"{rec['claim']} {fmt_num(means.get(rec['claim'], math.nan))}"
    if base:
        best = (min if lower else max)(base, key=base.__getitem__)
        text += f"; best baseline {best} {fmt_num(base[best])}"
    return text


# --- results/VERDICTS.md ----------------------------------------------------------------------
def verdicts_markdown(results_dir: Path) -> str:
    """One row per claim: the committed artefacts' verdicts, and the artefacts not run yet."""
    import yaml

    from pisa_bench.config import CONF_DIR

    lines = ["# Verdicts on the paper's claims", "",
             "Generated by `python scripts/reproduce.py verdicts` from the committed artefacts "
             "(`results/<artefact>/verdict.json`); protocol: [PROTOCOL.md](PROTOCOL.md). "
             "Small scale on shared CPU cores unless the row says otherwise: a verdict holds for "
             "the setup it names, not for the paper's scale.", "",
             "| artefact | paper's claim | our setup and scale | numbers (final test, mean "
             "over seeds) | verdict | caveats | command |", "|---|---|---|---|---|---|---|"]
    done = set()
    for path in sorted(results_dir.glob("*/verdict.json")):
        info = json.loads(path.read_text())
        done.add(info["artefact"])
        sp = info["protocol"]
        setup = (f"{info['scale']}; {sp['trials']} trials + {sp['seeds']} seeds per arm"
                 if sp["trials"] else f"{info['scale']}; untuned, {sp['seeds']} seeds per arm")
        link = f"[{info['artefact']}]({path.parent.name}/README.md)"
        if not info["records"]:  # rendered before its seeds finished
            runs = ", ".join(f"{v} {k}" for k, v in info.get("runs", {}).items())
            lines.append(f"| {link} | {info['claim']} | {setup} | – | not finished | "
                         f"no verdict yet ({runs}): rerun the command | `{info['command']}` |")
        for r in info["records"]:
            nums = numbers(r, sp)
            cav = "; ".join(info["caveats"][:2]) or "–"
            lines.append(f"| {link} | {info['claim']} | {r['task']}, "
                         f"{ROLE_NAMES[r['role']]}; {setup} | {nums} | **{r['verdict']}** | "
                         f"{cav} | `{info['command']}` |")
    for f in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        data = yaml.safe_load(f.read_text()) or {}
        rep = data.get("reproduce") or {}
        if f.stem in done or not rep.get("claim"):
            continue
        why = ("protocol ready (reproduce.protocol), checked at smoke scale" if
               rep.get("protocol") else "no protocol yet: the task has no validation split to "
               "select on; a plain sweep only (`--sweep-only`)")
        lines.append(f"| {f.stem} | {rep['claim']} | – | – | not run yet | {why} | "
                     f"`python scripts/reproduce.py {f.stem}` |")
    return "\n".join([*lines, *rerun_lines(results_dir)]) + "\n"


def _kind(verdict: str) -> str:
    """``supported`` / ``contradicted`` / ``not distinguishable at n seeds``: a verdict without
    the baselines it names."""
    return verdict.split(" (")[0].split(";")[0]


def rerun_lines(results_dir: Path) -> list[str]:
    """The section of ``VERDICTS.md`` that sets each committed verdict beside the same command's
    rerun (``results/<artefact>/rerun_<label>/verdict.json``, e.g. on another CPU): held, held
    with other baselines named, or moved, with both sets of numbers. Empty without a rerun."""
    rows = []
    for path in sorted(results_dir.glob("*/rerun_*/verdict.json")):
        committed = path.parent.parent / "verdict.json"
        if not committed.exists():
            continue
        new, old = json.loads(path.read_text()), json.loads(committed.read_text())
        before = {(r["task"], r["claim"], r["role"]): r for r in old["records"]}
        link = f"[{new['artefact']}]({path.parent.parent.name}/{path.parent.name}/README.md)"
        where = ", ".join(new.get("hardware") or []) or "–"
        for r in new["records"]:
            o = before.get((r["task"], r["claim"], r["role"]))
            if o is None:
                continue
            held = ("held" if o["verdict"] == r["verdict"] else
                    "held, other baselines" if _kind(o["verdict"]) == _kind(r["verdict"]) else
                    "**moved**")
            rows.append(
                f"| {link} | {r['task']}, {ROLE_NAMES[r['role']]}, {r['claim']} | "
                f"{o['verdict']} ({numbers(o, old['protocol'])}) | "
                f"{r['verdict']} ({numbers(r, new['protocol'])}) | {held} | {where} |")
    if not rows:
        return []
    return ["", "## The same commands on another machine", "",
            "Reruns of committed artefacts with the same command (`results/<artefact>/rerun_*/`): "
            "floating-point results differ across CPUs (torch picks kernels by instruction set), "
            "so a verdict near the edge can move. Which machine ran the committed records is not "
            "recorded for records older than `meta.cpu`.", "",
            "| rerun | task, role, claim | committed verdict | rerun's verdict | | rerun's "
            "hardware |", "|---|---|---|---|---|---|", *rows]
