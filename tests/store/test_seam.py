"""The store seam holds: only patchbay/store/ talks SQL to the hub's store, and the store sits below security."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "patchbay"
# connectors/sqlite.py and sqlite_bulk.py reach a user's SQLite database, not the hub's store
# (scaffold/ creates the example project's such databases). engine/alerts.py is behind the protocol
# too (its `snapshot`).
NOT_THE_STORE = {
    "connectors/sqlite.py",
    "connectors/sqlite_bulk.py",
    "scaffold/__init__.py",
}  # the last: demo databases
# What the rest of the code may take from store/sqlite.py: the class that implements Store, its errors,
# and the file's open and integrity checks (the vault shares the file; `patchbay store check`).
PUBLIC = {"SqliteStore", "StoreLocked", "StoreClosed", "open_store", "check_file", "RESTORE"}
# `serve` catches sqlite3.DatabaseError for damage met after the start; a store-neutral error
# raised by the store would let this entry go.
CATCHES_SQLITE_ERRORS = {"cli/main.py"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _modules(under: Path) -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PKG)), p) for p in sorted(under.rglob("*.py"))]


def test_only_the_store_uses_sqlite_and_its_query_functions() -> None:
    found = []
    for rel, path in _modules(PKG):
        if rel.startswith("store/") or rel in NOT_THE_STORE:
            continue
        for module, names in _imports(path):
            if module == "sqlite3" and rel not in CATCHES_SQLITE_ERRORS:
                found.append(f"{rel}: import sqlite3")
            elif module in ("patchbay.store.queries", "patchbay.store.api_queries", "patchbay.store.tokens"):
                found.append(f"{rel}: from {module} import {', '.join(names)}")
            elif module == "patchbay.store.sqlite" and set(names) - PUBLIC:
                found.append(f"{rel}: from {module} import {', '.join(sorted(set(names) - PUBLIC))}")
    assert found == [], "use the Store protocol's methods (store/base.py) instead:\n" + "\n".join(found)


def test_the_store_never_imports_from_layers_above_it() -> None:
    above = ("patchbay.security", "patchbay.engine", "patchbay.server", "patchbay.cli", "patchbay.config")
    found = [
        f"{rel}: {module}"
        for rel, path in _modules(PKG / "store")
        for module, _ in _imports(path)
        if module.startswith(above)
    ]
    assert found == []
