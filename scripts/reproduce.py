#!/usr/bin/env python
"""Reproduce a paper artefact: run its sweep (skipping finished runs), collect, render.

    python scripts/reproduce.py --list
    python scripts/reproduce.py quickstart
    python scripts/reproduce.py fig1_vision --scale paper --launcher slurm --no-wait
    python scripts/reproduce.py fig1_vision --scale paper --collect-only

Run the same command again to resume: only unfinished runs are launched. See
pisa_bench/launch/ (reproduce.py, plan.py, launchers.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pisa_bench.launch.reproduce import main

if __name__ == "__main__":
    raise SystemExit(main())
