"""Imports go one way: every module imports on its own, and none imports from a layer above its own.

The layers are drawn in docs/architecture.md; LAYERS below is that drawing, lowest first. A module
may import from its own layer and the layers below. Imports inside functions and under
TYPE_CHECKING count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import patchbay

PACKAGE = Path(patchbay.__file__).parent

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "patchbay",
            "patchbay.errors",
            "patchbay.records",
            "patchbay.logs",
            "patchbay.metrics",
            "patchbay.registry",
            "patchbay.roles",
        ),
    ),
    ("expressions", ("patchbay.expressions",)),
    ("config", ("patchbay.config", "patchbay.presets", "patchbay.contracts")),
    ("store", ("patchbay.store",)),
    ("security", ("patchbay.security",)),
    ("components", ("patchbay.connectors", "patchbay.processors", "patchbay.batch", "patchbay.specdoc")),
    ("engine", ("patchbay.engine",)),
    ("server", ("patchbay.server", "patchbay.testing")),
    ("cli", ("patchbay.cli", "patchbay.scaffold", "patchbay.__main__")),
]

# Upward imports that issue 8 removes in other branches; the lead deletes each line once its fix is merged.
KNOWN_UPWARD: set[tuple[str, str]] = set()

# Run-time import cycles between modules of one layer (issue 8 removed the hub <-> alerts one): none.
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "patchbay" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/architecture.md")
    return best


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str) -> Iterator[Import]:
    """Every patchbay module `module` imports, wherever the import statement is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, type_only: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(sub if sub in MODULES else base, node.lineno, type_only)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, type_only)
        else:
            for child in ast.iter_child_nodes(node):
                yield from visit(child, type_only)

    yield from visit(ast.parse(path.read_text(), str(path)), False)


@cache
def graph() -> dict[str, list[Import]]:
    return {m: [i for i in imports_of(m) if i.target in MODULES and i.target != m] for m in MODULES}


# ---------------------------------------------------------------- (a) each module on its own

# One interpreter loads the third-party packages patchbay's modules import at the top (never a
# patchbay module), then forks a child per patchbay module, a few at a time: each child imports its
# module into a fresh patchbay state, with warnings as errors. Forking saves each module the
# interpreter start and the third-party imports (aiohttp's test_circular_imports.py starts one
# interpreter per module; that took 46 s here for 85 modules).
_BATCH = r"""
import importlib, json, os, sys, tempfile, traceback, warnings

preload, modules, width = json.load(sys.stdin)
for dep, names in preload:
    try:
        mod = importlib.import_module(dep)
        for name in names:  # packages such as pydantic load what a name needs when it is first used
            getattr(mod, name, None)
    except ImportError:
        pass  # not installed: the module that needs it reports it
assert not [m for m in sys.modules if m.split(".")[0] == "patchbay"], "a third-party import loaded patchbay"
out = tempfile.mkdtemp()
running, results = {}, {}


def reap():
    pid, status = os.wait()
    module = running.pop(pid)
    with open(os.path.join(out, module)) as f:
        results[module] = [os.waitstatus_to_exitcode(status), f.read()]
    os.unlink(os.path.join(out, module))


for module in modules:
    if len(running) >= width:
        reap()
    pid = os.fork()
    if pid == 0:
        code = 0
        with open(os.path.join(out, module), "w") as f:
            try:
                warnings.simplefilter("error")
                importlib.import_module(module)
            except BaseException:
                traceback.print_exc(file=f)
                code = 1
        os._exit(code)
    running[pid] = module
while running:
    reap()
os.rmdir(out)
json.dump(results, sys.stdout)
"""

ALONE = [m for m in MODULES if not m.endswith("__main__")]  # __main__ runs the CLI


def third_party() -> list[tuple[str, list[str]]]:
    """The modules (and names from them) patchbay's modules import at their top level, patchbay excepted."""
    found: dict[str, set[str]] = {}
    for path in MODULES.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    found.setdefault(a.name, set())
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.setdefault(node.module, set()).update(a.name for a in node.names)
    return [
        (m, sorted(names))
        for m, names in sorted(found.items())
        if m.split(".")[0] not in ("patchbay", "__future__")
    ]


@pytest.fixture(scope="module")
def alone() -> dict[str, list[Any]]:
    """Every module's (exit code, traceback) when imported on its own."""
    proc = subprocess.run(
        [sys.executable, "-c", _BATCH],
        input=json.dumps([third_party(), ALONE, max(2, os.cpu_count() or 2)]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, list[Any]] = json.loads(proc.stdout)
    return results


@pytest.mark.parametrize("module", ALONE)
def test_module_imports_on_its_own(module: str, alone: dict[str, list[Any]]) -> None:
    code, stderr = alone[module]
    assert code == 0, f"importing {module} on its own failed:\n{stderr}"


# ---------------------------------------------------------------- (b) layers


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer() -> None:
    found = []
    for module, imports in graph().items():
        for imp in imports:
            if layer_of(imp.target) > layer_of(module) and (module, imp.target) not in KNOWN_UPWARD:
                found.append(
                    f"{MODULES[module].relative_to(PACKAGE.parent)}:{imp.line}: {module} "
                    f"({LAYERS[layer_of(module)][0]}) imports {imp.target} ({LAYERS[layer_of(imp.target)][0]})"
                )
    assert found == [], "imports go one way (docs/architecture.md):\n" + "\n".join(found)


def test_known_upward_imports_still_exist() -> None:
    """An exception that is fixed is removed from KNOWN_UPWARD, so it cannot come back unnoticed."""
    edges = {(m, i.target) for m, imports in graph().items() for i in imports}
    assert sorted(KNOWN_UPWARD - edges) == []


def _cycles() -> set[frozenset[str]]:
    """Each set of modules that import one another at run time, directly or around a loop (Tarjan's SCCs).

    A type-only import back to its caller (a driver annotated with the Hub that calls it) is no cycle.
    """
    g = {m: sorted({i.target for i in imports if not i.type_only}) for m, imports in graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.add(frozenset(scc))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    found = _cycles()
    assert sorted(sorted(c) for c in found - KNOWN_CYCLES) == []
    assert sorted(sorted(c) for c in KNOWN_CYCLES - found) == [], "fixed: remove it from KNOWN_CYCLES"
