"""Input contracts: the shape of a flow's events pinned in `flows/<flow>.contract.yaml` (kept in git),
checked on every event so that a field that disappears, changes type or appears is reported as drift.

A contract maps dotted paths to JSON types; `[]` stands for the elements of an array:

    fields:
      email: string
      age: number|null          # either type
      company: string?          # may be absent
      items: array
      items[].sku: string       # in each element of items
    new_fields: report          # or ignore

A field is checked where its parent is present: `address.city` is not missing when `address` is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from patchbay.config.source import Located, load_yaml
from patchbay.errors import ConfigError, Problem

TYPES = ("string", "number", "boolean", "object", "array", "null")
MAX_DEPTH = 8  # deeper fields are not part of a contract
MAX_FIELDS = 500
SUFFIX = ".contract.yaml"
_RULE_RE = re.compile(r"^([a-z]+(?:\|[a-z]+)*)(\?)?$")


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object" if isinstance(v, dict) else type(v).__name__


def observe(record: Any) -> dict[str, set[str]]:
    """Every dotted path in `record` (to MAX_DEPTH) and the types seen there."""
    seen: dict[str, set[str]] = {}

    def walk(v: Any, path: str, depth: int) -> None:
        if len(seen) >= MAX_FIELDS or depth > MAX_DEPTH:
            return
        if path:
            seen.setdefault(path, set()).add(json_type(v))
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(v, list) and path:
            for x in v:
                walk(x, f"{path}[]", depth + 1)

    walk(record, "", 0)
    return seen


def parent(path: str) -> str:
    """`a.b` -> `a`, `a[]` -> `a`, `a[].b` -> `a[]`, `a` -> `` (the record itself)."""
    if path.endswith("[]"):
        return path[:-2]
    return path.rsplit(".", 1)[0] if "." in path else ""


@dataclass(frozen=True)
class Rule:
    types: frozenset[str]
    optional: bool = False

    def __str__(self) -> str:
        return "|".join(t for t in TYPES if t in self.types) + ("?" if self.optional else "")


@dataclass(frozen=True)
class Drift:
    kind: str  # missing | type | new
    path: str
    expected: str  # the contract's rule ("" for a new field)
    got: str  # the types seen ("" for a missing field)

    def __str__(self) -> str:
        if self.kind == "missing":
            return f"{self.path}: missing (the contract says {self.expected})"
        if self.kind == "type":
            return f"{self.path}: {self.got} where the contract says {self.expected}"
        return f"{self.path}: new field ({self.got}), not in the contract"


@dataclass
class Contract:
    flow: str
    fields: dict[str, Rule] = field(default_factory=dict)
    new_fields: str = "report"  # report | ignore
    file: str = ""

    def check(self, record: Any) -> list[Drift]:
        """What in `record` differs from the contract (empty: it conforms)."""
        seen = observe(record)
        out: list[Drift] = []
        for path, rule in self.fields.items():
            got = seen.get(path)
            if got is None:
                if not rule.optional and _parent_here(parent(path), seen):
                    out.append(Drift("missing", path, str(rule), ""))
                continue
            extra = got - rule.types
            if extra:
                out.append(Drift("type", path, str(rule), "|".join(t for t in TYPES if t in extra)))
        if self.new_fields == "report":
            for path, types in seen.items():
                if path not in self.fields and _parent_pinned(path, self.fields):
                    out.append(Drift("new", path, "", "|".join(t for t in TYPES if t in types)))
        return out

    def dump(self, note: str = "") -> str:
        head = [
            f"# Input contract of flow {self.flow}: every event is checked against it, and a field that is",
            "# missing, of another type or new is reported as drift. Edit it freely: `string?` may be absent,",
            "# `number|null` is either type, `items[].sku` is a field of each element of items.",
        ]
        if note:
            head.append(f"# {note}")
        body = {
            "flow": self.flow,
            "new_fields": self.new_fields,
            "fields": {p: str(r) for p, r in self.fields.items()},
        }
        return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)


def _parent_pinned(path: str, fields: dict[str, Rule]) -> bool:
    """A new field is reported under the record or a pinned object; below a new one only the top counts."""
    up = parent(path)
    return up == "" or up in fields


def learn(flow: str, records: Iterable[Any]) -> Contract:
    """The contract the records conform to: the types seen at each path, optional (`?`) where a
    record had the field's parent object without the field."""
    seen = [observe(r) for r in records]
    types: dict[str, set[str]] = {}
    for s in seen:
        for path, ts in s.items():
            types.setdefault(path, set()).update(ts)
    fields = {}
    for path, ts in sorted(types.items()):
        up = parent(path)
        optional = any(path not in s and _parent_here(up, s) for s in seen)
        fields[path] = Rule(frozenset(ts), optional)
    return Contract(flow, fields)


def _parent_here(up: str, seen: dict[str, set[str]]) -> bool:
    """The record has the object a field belongs in (array elements are never "missing")."""
    return up == "" or "object" in seen.get(up, ())


def contract_path(root: Path, flow: str) -> Path:
    return root / "flows" / f"{flow}{SUFFIX}"


def is_contract_file(path: Path) -> bool:
    return path.name.endswith(SUFFIX)


def load_contract(path: Path, display: str | None = None) -> Contract:
    """Parse a contract file; ConfigError with file:line for each problem."""
    src = load_yaml(path, display or str(path))
    problems: list[Problem] = []
    data = src.data if isinstance(src.data, dict) else {}
    if not isinstance(src.data, dict) or not isinstance(data.get("fields"), dict):
        raise ConfigError([src.problem((), "a contract is a mapping with `fields:` (path: type)")])
    unknown = set(data) - {"flow", "fields", "new_fields"}
    for key in sorted(unknown):
        problems.append(src.problem((key,), f"unknown setting {key!r} (known: flow, fields, new_fields)"))
    new_fields = data.get("new_fields", "report")
    if new_fields not in ("report", "ignore"):
        problems.append(src.problem(("new_fields",), "new_fields is report or ignore"))
    fields = dict(_rules(src, data["fields"], problems))
    if problems:
        raise ConfigError(problems)
    flow = str(data.get("flow") or path.name.removesuffix(SUFFIX))
    return Contract(flow, fields, str(new_fields), src.file)


def _rules(src: Located, raw: dict[str, Any], problems: list[Problem]) -> Iterator[tuple[str, Rule]]:
    for path, text in raw.items():
        m = _RULE_RE.match(str(text).strip()) if isinstance(text, str) else None
        bad = [t for t in m.group(1).split("|") if t not in TYPES] if m else []
        if m is None or bad:
            problems.append(
                src.problem(
                    ("fields", path),
                    f"{path}: write types from {', '.join(TYPES)}, joined by | and ending in ? if the field "
                    f"may be absent (e.g. string|null?); got {text!r}",
                )
            )
            continue
        yield path, Rule(frozenset(m.group(1).split("|")), bool(m.group(2)))
