"""The folder tree is the architecture: imports only go down the layers, never in a circle.

Every module of the package (``attncompiler/``, ``codegen/``, ``patterns/``) is read with ``ast``;
module-level and function-level imports both count, relative imports are resolved. A deliberate
late import is exempt only when its line carries ``# late import: <why>``. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder in the repository -> package name it is installed as
SOURCES = {"attncompiler": "attncompiler", "codegen": "attncompiler.codegen", "patterns": "attncompiler.patterns"}

# Layers, lowest first. A module may import modules of its own layer's unit and of lower layers only.
# The key is the longest matching module prefix.
LAYERS: list[tuple[str, ...]] = [
    ("attncompiler.errors", "attncompiler.version"),
    ("attncompiler.ir",),
    ("attncompiler.dsl",),
    ("attncompiler.layout",),
    ("attncompiler.program",),
    ("attncompiler.families",),
    ("attncompiler.patterns",),
    ("attncompiler.analysis",),
    ("attncompiler.codegen",),
    ("attncompiler.runtime",),
    ("attncompiler.nn", "attncompiler.distributed", "attncompiler.integrations"),
    ("attncompiler.bench",),
    ("attncompiler.cli",),
]
FACE = "attncompiler"  # the package root: public face only, imported by no module of the package
LATE = "# late import:"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's ``__init__``)."""
    mods = {}
    for folder, pkg in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "templates" in path.parts:
                continue  # kernel templates are data, not modules
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join([pkg] + parts)] = (path, is_pkg)
    return mods


MODULES = _modules()


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(mod: str) -> list[tuple[str, str, int, bool]]:
    """(imported module, name or '', line, marked late) for every import of ``mod`` into the package."""
    path, is_pkg = MODULES[mod]
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        late = isinstance(node, (ast.Import, ast.ImportFrom)) and LATE in lines[node.lineno - 1]
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno, late) for a in node.names if a.name.split(".")[0] == "attncompiler"]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, is_pkg, node.level, node.module) if node.level else node.module or ""
            if base.split(".")[0] != "attncompiler":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, "", node.lineno, late) if sub in MODULES else (base, a.name, node.lineno, late))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _, late in _imports(m) if t in MODULES and t != m and not late} for m in MODULES}


def _layer(mod: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that returns to its start), or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if color.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in color and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        color[node] = 2
        return None

    for start in sorted(graph):
        if start not in color and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_has_a_layer():
    assert MODULES, "no module found"
    unplaced = [m for m in MODULES if m != FACE and _layer(m) < 0]
    assert not unplaced, f"modules outside every layer of LAYERS: {unplaced}"


def test_no_import_circle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_import_of_the_package_root():
    bad = [f"{m}:{line} imports {name or t}" for m in MODULES if m != FACE
           for t, name, line, _ in _imports(m) if t == FACE]
    assert not bad, "modules import the package root (import from the defining module instead): " + "; ".join(bad)


def test_imports_go_down_the_layers():
    bad = []
    for m in MODULES:
        if m == FACE:
            continue
        for t, _, line, late in _imports(m):
            if t in MODULES and t != FACE and not late and _layer(t) > _layer(m):
                bad.append(f"{m}:{line} -> {t}")
    assert not bad, "upward imports: " + "; ".join(bad)


def test_no_private_name_crosses_a_module():
    bad = [f"{m}:{line} takes {name} from {t}" for m in MODULES for t, name, line, _ in _imports(m)
           if name.startswith("_") and not name.startswith("__")]
    assert not bad, "private names imported from another module (make them public): " + "; ".join(bad)


def test_late_imports_are_few_and_explained():
    late = [(m, line) for m in MODULES for _, _, line, is_late in _imports(m) if is_late]
    for m, line in late:
        comment = MODULES[m][0].read_text().splitlines()[line - 1].split(LATE, 1)[1].strip()
        assert comment, f"{m}:{line}: a late import says why"
    assert len(late) <= 2, f"too many late imports ({len(late)}): {late}"


def test_families_do_not_import_each_other():
    bad = []
    for m in MODULES:
        parts = m.split(".")
        if parts[:2] != ["attncompiler", "families"] or len(parts) < 3:
            continue
        for t, _, line, _ in _imports(m):
            tp = t.split(".")
            if tp[:2] == ["attncompiler", "families"] and len(tp) > 2 and tp[2] != parts[2]:
                bad.append(f"{m}:{line} -> {t}")
    assert not bad, "a family imports another family: " + "; ".join(bad)


def test_import_of_the_package_loads_no_heavy_optional_part():
    """sympy (cost model), networkx (analysis) and triton load when first used, not on ``import attncompiler``."""
    import subprocess
    import sys

    code = ("import sys, attncompiler as ac; assert 'analyze' in dir(ac); "
            "print(sorted(m for m in ('sympy', 'networkx', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_cycle_finder_reports_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("mod", ["attncompiler.ir.expr", "attncompiler.dsl.pattern", "attncompiler.codegen.registry"])
def test_layers_rank_as_drawn(mod):
    assert _layer("attncompiler.errors") < _layer(mod) < _layer("attncompiler.cli.main")
