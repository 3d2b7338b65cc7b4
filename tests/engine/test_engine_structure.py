"""The engine's seams: the alert loop uses only the hub's public API and the Store protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import patchbay.engine.alerts as alerts_module

ALERTS = Path(alerts_module.__file__)


def test_alerts_does_not_import_the_hub_nor_touch_its_private_parts():
    tree = ast.parse(ALERTS.read_text())
    imports = [
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module is not None
    ] + [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert "patchbay.engine.hub" not in imports, "the hub imports alerts; alerts knows the hub by a protocol"
    assert not any(m.startswith("patchbay.store.sqlite") or m == "sqlite3" for m in imports), (
        "alerts reads and writes through the Store protocol, not SQLite"
    )
    private = sorted(
        {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Attribute | ast.Name)
            and (getattr(node.value, "attr", None) == "hub" or getattr(node.value, "id", None) == "hub")
        }
    )
    assert private == [], f"alerts calls private hub members: {private}"


def test_the_alert_flow_joins_the_hub_like_any_flow():
    from patchbay.engine.hub import Hub

    assert "install" not in vars(alerts_module.AlertManager)
    assert callable(Hub.add_flow)
