#!/usr/bin/env python
"""Collect run directories into a runs table and a curves table (CSV + parquet).

    python scripts/collect.py multirun/2025-01-01 results/ --out results/tables/runs

writes ``runs.csv``, ``runs.parquet``, ``runs_curves.csv``, ``runs_curves.parquet`` and prints
the number of runs per status (diverged / failed runs are kept, not dropped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pisa_bench.analysis.collect import collect, status_counts, write_collected


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("roots", nargs="+", help="directories searched recursively for run dirs")
    p.add_argument("--out", required=True, help="output path stem (no extension)")
    args = p.parse_args(argv)
    missing = [r for r in args.roots if not Path(r).exists()]
    if missing:  # one line, no traceback
        print(f"collect.py: no such run root: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs, curves = collect(args.roots)
    for path in write_collected(runs, curves, args.out):
        print(f"wrote {path}")
    counts = ", ".join(f"{k}: {v}" for k, v in status_counts(runs).items()) or "none"
    print(f"{len(runs)} runs ({counts}); {len(curves)} metric rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
