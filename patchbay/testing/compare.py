"""Compare an expected value with what a flow produced: every difference by path, and a readable diff."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

_MISSING: Any = object()


@dataclass(frozen=True)
class Mismatch:
    path: str  # e.g. crm.body.properties.email
    expected: Any
    actual: Any  # _MISSING when the field is absent

    def __str__(self) -> str:
        if self.actual is _MISSING:
            return f"{self.path}: expected {_show(self.expected)}, but there is no such field"
        if self.expected is _MISSING:
            return f"{self.path}: not expected, got {_show(self.actual)}"
        return f"{self.path}: expected {_show(self.expected)}, got {_show(self.actual)}"


def missing() -> Any:
    return _MISSING


def compare(expected: Any, actual: Any, path: str, *, subset: bool) -> list[Mismatch]:
    """Differences between `expected` and `actual`. With `subset`, a mapping may hold more keys than
    expected, and a string at the top level only has to contain the expected text."""
    if subset and isinstance(expected, str) and isinstance(actual, str):
        return [] if expected in actual else [Mismatch(path, expected, actual)]
    return _compare(expected, actual, path, subset)


def _compare(expected: Any, actual: Any, path: str, subset: bool) -> list[Mismatch]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out: list[Mismatch] = []
        for k, v in expected.items():
            where = f"{path}.{k}" if path else str(k)
            if k not in actual:
                out.append(Mismatch(where, v, _MISSING))
            else:
                out += _compare(v, actual[k], where, subset)
        if not subset:
            for k in actual:
                if k not in expected:
                    out.append(Mismatch(f"{path}.{k}" if path else str(k), _MISSING, actual[k]))
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [Mismatch(path, expected, actual)]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += _compare(e, a, f"{path}.{i}", subset)
        return out
    if _same(expected, actual):
        return []
    return [Mismatch(path, expected, actual)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def unified(expected: Any, actual: Any, label: str) -> list[str]:
    """A unified diff of two JSON values, pretty-printed with sorted keys; empty when equal."""
    a = _pretty(expected).splitlines()
    b = _pretty(actual).splitlines()
    if a == b:
        return []
    return list(difflib.unified_diff(a, b, f"expected {label}", f"actual {label}", lineterm="", n=2))


def _pretty(v: Any) -> str:
    return json.dumps(v, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= 200 else text[:200] + "…"
