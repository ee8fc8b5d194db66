"""The compiled step on CPU (``fused=True``): the loop of :mod:`pisa.fused` in C++
(``pisa/csrc/admm_cpu.cpp``), built with the machine's C++ compiler on first use and called
through :mod:`ctypes`.

Why not inductor's kernels on CPU: inductor's loop reloads every coefficient at every vector (its
vector stores may alias them, so the compiler hoists nothing) and ran 5-10% slower than ATen's
fused AdamW over the same bytes; this loop holds them in registers and runs at ATen's speed
(``results/bench``). One call covers every tensor of a dtype, small ones included, so no tensor
takes the foreach path and no Python runs per tensor. Every kernel variant is its own template
instantiation. Threads: ``torch.get_num_threads()`` (OpenMP, over blocks of 2048 elements of the
tensors of at least 32768); the weights do not depend on the thread count, the telemetry's
``sum(e^2)`` only by its rounding.

The library is built once per machine into ``$PISA_KERNEL_CACHE`` (default
``~/.cache/pisa``), under a name that hashes the source, the compiler's version, the flags and the
CPU (the flags include ``-march=native``), into a temporary file renamed into place, so that
concurrent processes never load a partial library; a cached file that fails to load is rebuilt.
No compiler, or a failed build: :func:`library` returns None (one warning) and the step uses
inductor's kernels (:mod:`pisa.fused`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DTYPES", "admm", "library"]

SOURCE = Path(__file__).with_name("csrc") / "admm_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-std=c++17",
         "-shared", "-fPIC"]
#: parameter dtypes the kernel runs (others take inductor's kernels)
DTYPES = {torch.float32: "pisa_admm_f32", torch.float64: "pisa_admm_f64"}
#: preconditioner kinds (pisa.fused.PRECONDITIONERS) as the kernel numbers them
PRECONDITIONERS = {"identity": 0, "second_moment": 1, "abs": 2}
# variant bits, as in admm_cpu.cpp
DUAL, COUPLED, DECOUPLED, TARGET, TRACK = 1, 2, 4, 8, 16


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pisa"
    return Path(os.environ.get("PISA_KERNEL_CACHE", default))


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's flags (Linux), else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(cxx: str, target: Path) -> None:
    """Compile into a temporary file next to ``target`` and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in DTYPES.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 5, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel library, or None (with a warning) when it cannot be built here."""
    cxx = os.environ.get("CXX", "g++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
        key = hashlib.sha256("\0".join(
            [SOURCE.read_text(), cxx, version, *FLAGS, _cpu_id()]).encode()).hexdigest()[:20]
        path = cache_dir() / f"admm_cpu_{key}.so"
        if not path.exists():
            _build(cxx, path)
        try:
            return _load(path)
        except OSError:  # a damaged file (the rename is atomic, so not a partial build)
            _build(cxx, path)
            return _load(path)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(f"pisa: the C++ CPU kernel could not be built with {cxx!r} ({detail}); "
                      "fused=True uses inductor's kernels on CPU", RuntimeWarning, stacklevel=2)
        return None


def _pointers(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def admm(
    lib: ctypes.CDLL, ws: list[Tensor], ds: list[Tensor], pis: list[Tensor],
    vs: list[Tensor] | None, tgts: list[Tensor] | None, coef: list[float], precond: str, *,
    dual: bool, coupled: bool, decoupled: bool, track: bool,
) -> float:
    """One call of the kernel on contiguous CPU tensors of one dtype in :data:`DTYPES` (``vs``:
    second moment only; ``tgts`` None: ``w`` in place; ``dual``: ``s = d + pi``; ``coupled`` /
    ``decoupled``: the weight-decay terms); returns ``sum(e^2)`` when ``track``, else 0."""
    flags = ((DUAL if dual else 0) | (COUPLED if coupled else 0)
             | (DECOUPLED if decoupled else 0) | (TARGET if tgts is not None else 0)
             | (TRACK if track else 0))
    k = len(ws)
    fn = getattr(lib, DTYPES[ws[0].dtype])
    numels = (ctypes.c_int64 * k)(*[w.numel() for w in ws])
    return fn(k, _pointers(ws), _pointers(ds), _pointers(pis),
              None if vs is None else _pointers(vs), None if tgts is None else _pointers(tgts),
              numels, (ctypes.c_double * len(coef))(*coef), PRECONDITIONERS[precond], flags,
              torch.get_num_threads())
