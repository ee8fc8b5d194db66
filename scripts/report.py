#!/usr/bin/env python
"""Render a report (tables, runs.csv, curve figures, performance profile) into a directory.

    python scripts/report.py --runs multirun/2025-01-01 --out results/my_study --title "My study"
    python scripts/report.py --table results/tables/runs.parquet --out results/my_study
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pisa_bench.analysis.report import render_from_runs, render_from_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", metavar="ROOT", help="roots searched for run dirs")
    src.add_argument("--table", help="runs table from scripts/collect.py (.parquet or .csv)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--title", default=None, help="title of the tables and figures")
    args = p.parse_args(argv)
    missing = [r for r in (args.runs or [args.table]) if not Path(r).exists()]
    if missing:  # one line, no traceback
        what = "run root" if args.runs else "runs table"
        print(f"report.py: no such {what}: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.runs:
        done = render_from_runs(args.runs, args.out, args.title)
    else:
        done = render_from_table(args.table, args.out, args.title)
    for path in done.files:
        print(f"wrote {path}")
    for note in done.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
