#!/usr/bin/env python
"""Free the disk that finished runs' checkpoints hold: delete ``ckpt/`` of every finished run
(ok / diverged) under the given roots whose record is whole; unfinished runs and runs another
process holds are left alone.

    python scripts/prune_checkpoints.py outputs/runs/fig1_vision [--dry-run]

A finished run's checkpoint only serves to repair its ``metrics.csv`` if rows go missing later;
that repair is done (when needed) before the checkpoint is deleted, and is impossible after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pisa_bench.record import prune_checkpoints


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("roots", nargs="+", help="directories searched recursively for run dirs")
    p.add_argument("--dry-run", action="store_true", help="report what would be freed only")
    args = p.parse_args(argv)
    missing = [r for r in args.roots if not Path(r).is_dir()]
    if missing:
        print(f"prune_checkpoints.py: no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = sorted({s.parent for r in args.roots for s in Path(r).rglob("summary.json")
                   if (s.parent / "ckpt").is_dir()})
    total, pruned = 0, 0
    for run in runs:
        freed = prune_checkpoints(run, dry_run=args.dry_run)
        if freed:
            pruned += 1
            total += freed
            print(f"{freed / 2**20:9.1f} MiB  {run}")
    verb = "would free" if args.dry_run else "freed"
    print(f"{pruned} of {len(runs)} runs with checkpoints pruned; {verb} {total / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
