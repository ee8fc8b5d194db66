"""The layering of docs/ARCHITECTURE.md, checked on the source: every import of a project module
(at the top of a file or inside a function) must go to a layer the importing module may use."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = ("pisa", "pisa_bench")

# module prefix -> project modules it may import (prefixes); the first matching rule applies
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("pisa", ("pisa",)),
    ("pisa_bench.baselines", ("pisa_bench.baselines", "pisa")),
    ("pisa_bench.errors", ()),
    ("pisa_bench.identity", ()),
    ("pisa_bench.data", ("pisa_bench.data", "pisa_bench.errors")),
    ("pisa_bench.models", ("pisa_bench.models", "pisa")),
    *[(f"pisa_bench.{m}", ("pisa_bench.errors", "pisa_bench.identity", "pisa_bench.rundir",
                            "pisa_bench.checkpoints", "pisa_bench.runlock", "pisa_bench.stop"))
      for m in ("rundir", "checkpoints", "runlock", "stop", "record")],
    ("pisa_bench.analysis", ("pisa_bench.analysis", "pisa_bench.errors",
                              "pisa_bench.identity", "pisa_bench.rundir", "pisa_bench.config",
                              "pisa_bench.protocol", "pisa_bench.baselines.registry")),
    # the training side: everything but analysis and the launch layer (sweep, reproduce)
    ("pisa_bench.", ("pisa", "pisa_bench.baselines", "pisa_bench.errors", "pisa_bench.identity",
                      "pisa_bench.data", "pisa_bench.models", "pisa_bench.rundir",
                      "pisa_bench.checkpoints", "pisa_bench.runlock", "pisa_bench.stop",
                      "pisa_bench.record", "pisa_bench.config", "pisa_bench.runtime",
                      "pisa_bench.schedules", "pisa_bench.loggers", "pisa_bench.fid",
                      "pisa_bench.validate", "pisa_bench.tasks", "pisa_bench.trainer",
                      "pisa_bench.main")),
]
LAUNCH = ("pisa_bench.launch", "pisa_bench.protocol")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute or relative import of a project module in ``path``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # ``from m import x``: m.x (a submodule or not)
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] in PROJECT]
    return out


def allowed(importer: str, imported: str) -> bool:
    if any(importer == m or importer.startswith(m + ".") for m in LAUNCH):
        return True  # the launch layer sits on top of everything
    for prefix, ok in RULES:
        if importer == prefix or importer.startswith(prefix + ".") or (
                prefix.endswith(".") and importer.startswith(prefix)):
            return imported == importer or any(
                imported == o or imported.startswith(o + ".") for o in ok)
    return True


def sources() -> list[Path]:
    return sorted(p for pkg in PROJECT for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_respect_the_layers(path: Path) -> None:
    me = module_name(path)
    bad = [f"line {line}: {me} imports {mod}" for line, mod in project_imports(path)
           if not allowed(me, mod)]
    assert not bad, "layering broken (docs/ARCHITECTURE.md):\n" + "\n".join(bad)


def test_pisa_needs_torch_only() -> None:
    """``pisa`` (the optimizer library, its own distribution) imports the standard library,
    torch and itself, nothing else."""
    bad = []
    for path in sorted((REPO / "pisa").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] not in
                    {*sys.stdlib_module_names, "torch", "pisa", "__future__"}]
    assert not bad, bad


def test_the_checker_catches_a_violation(tmp_path: Path) -> None:
    """The rules refuse what the architecture forbids (so the test above can fail)."""
    assert not allowed("pisa_bench.data.images", "pisa_bench.tasks.base")
    assert not allowed("pisa.admm", "pisa_bench.trainer")
    assert not allowed("pisa_bench.analysis.tables", "pisa_bench.trainer")
    assert not allowed("pisa_bench.trainer", "pisa_bench.launch.plan")
    assert not allowed("pisa_bench.record", "pisa_bench.tasks")
    assert allowed("pisa_bench.launch.reproduce", "pisa_bench.analysis.collect")
    assert allowed("pisa_bench.trainer", "pisa_bench.record")


def test_hydra_through_its_public_api_only() -> None:
    """No module (the planned-sweeper plugin included) imports ``hydra._internal``, so the
    suite does not pin itself to one hydra-core release's internals."""
    bad = []
    for path in [*sources(), *sorted((REPO / "hydra_plugins").rglob("*.py")), REPO / "run.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(REPO)}: {n}" for n in names
                    if n.startswith("hydra._internal")]
    assert not bad, bad


def test_no_list_of_the_family_names() -> None:
    """The PISA family is told by the optimizer's class (``pisa.ConsensusOptimizer``), never by
    a tuple, list or set of its names (``PISA_FAMILY = ("pisa", "sisa", "nsisa")``, ``optim in
    ("sisa", "nsisa")``): no such literal holds two of the family's names in ``pisa_bench/``."""
    names = {"pisa", "sisa", "nsisa"}
    bad = []
    for path in sorted((REPO / "pisa_bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                found = {e.value for e in node.elts if isinstance(e, ast.Constant)} & names
                if len(found) >= 2:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {sorted(found)}")
    assert not bad, "name lists of the PISA family:\n" + "\n".join(bad)
