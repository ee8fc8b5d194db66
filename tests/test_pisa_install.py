"""The torch-only distribution: ``pip install ./pisa`` builds ``pisa-optim`` from ``pisa/``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("hydra", "omegaconf", "transformers", "pandas", "pyarrow", "scipy", "matplotlib",
         "pisa_bench")


@pytest.mark.slow
def test_pisa_optim_wheel_needs_torch_only(tmp_path: Path) -> None:
    src = tmp_path / "src" / "pisa"
    shutil.copytree(ROOT / "pisa", src, ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                     "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("pisa_optim-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
        zf.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names} == {"pisa", "pisa_optim-0.1.0.dist-info"}
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == ["Requires-Dist: torch>=2.6"]
    assert not any(n.endswith("pyproject.toml") for n in names)
    assert "pisa/csrc/admm_cpu.cpp" in names
    # the installed package imports and trains (the fused step builds its CPU kernel from the
    # wheel's source) with nothing from the suite loaded
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torch, pisa;"
        "assert pisa.__file__.startswith(sys.argv[1]), pisa.__file__;"
        "p = torch.nn.Parameter(torch.ones(3, 3)); opt = pisa.NSISA([p]);"
        "p.grad = torch.ones(3, 3); opt.step();"
        "q = torch.nn.Parameter(torch.ones(4)); q.grad = torch.ones(4);"
        "pisa.SISA([q], fused=True).step(); assert pisa.cpu_kernel.library() is not None;"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r});"
        "assert not bad, bad; print('ok')"
    )
    env = {**os.environ, "PISA_KERNEL_CACHE": str(tmp_path / "kernels")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], check=True,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.stdout.strip() == "ok"
