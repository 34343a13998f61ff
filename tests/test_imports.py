"""Every module imports on its own, and the package's module-level import graph has no cycle.

Imports inside functions are how a module defers a heavy or circular dependency, so the static check reads only
module-level statements (including those under ``if``/``try`` at module level, excluding ``if TYPE_CHECKING:``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prune_peft"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _module_level(body: list[ast.stmt]):
    """Import statements executed at import time: the top level and inside module-level if/try/with blocks."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                yield from _module_level(node.orelse)
                continue
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports at module level (``from . import x`` counts x when x is a module;
    importing ``a.b.c`` also runs ``a`` and ``a.b``, so those count as edges too)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps: set[str] = set()
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(name, node)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    candidate = ".".join(parts[:i])
                    if candidate in MODULES and candidate != name:
                        deps.add(candidate)
        # a package's own parents run before it, but that is an ordering, not a dependency of the module's code
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_resolve():
    node = ast.parse("from ..sparsity import masks").body[0]
    assert _resolve("prune_peft.tuners._base", node) == "prune_peft.sparsity"
    node = ast.parse("from . import config").body[0]
    assert _resolve("prune_peft.tuners.spp", node) == "prune_peft.tuners.spp"


def test_module_level_import_graph_has_no_cycle():
    graph = import_graph()
    assert "prune_peft.hub" in graph and "prune_peft._io" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_leaf_modules_import_nothing_from_the_package():
    graph = import_graph()
    for leaf in ("prune_peft._io", "prune_peft._hf"):
        assert graph[leaf] <= {"prune_peft"}, (leaf, graph[leaf])


def _import_alone(module: str) -> str | None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True, timeout=600
    )
    return None if proc.returncode == 0 else f"import {module} failed:\n{proc.stderr[-2000:]}"


def _loaded_by_the_package() -> set[str]:
    """Modules that ``import prune_peft`` itself loads (a fresh interpreter)."""
    code = "import sys, prune_peft; print(' '.join(m for m in sys.modules if m.startswith('prune_peft')))"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def test_each_module_imports_alone():
    """``python -c "import prune_peft.<mod>"`` succeeds for every module in a fresh interpreter.

    Importing any submodule first runs ``prune_peft/__init__``, so every module that ``import prune_peft`` loads is
    covered by that one import; each of the others (lazily imported: CLI verbs, demo stages, ready-made trainers, …)
    gets its own interpreter (side by side, one per CPU). ``__main__`` modules are scripts and are skipped.
    """
    modules = sorted(m for m in MODULES if not m.endswith(".__main__"))
    assert len(modules) > 20
    loaded = _loaded_by_the_package()
    assert "prune_peft.sparsity.masks" in loaded and "prune_peft.cli.prune" not in loaded
    rest = [m for m in modules if m not in loaded]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [f for f in pool.map(_import_alone, rest) if f]
    assert not failures, "\n\n".join(failures)
