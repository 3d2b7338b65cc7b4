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

The same file pins the shape of the answers a flow gets, keyed by destination (or `call`/`lookup`
step) name, with paths inside the answer's JSON body; every 2xx answer is checked against it:

    responses:
      crm:                      # a destination (or a call step) of the flow
        fields:
          id: string
          properties.email: string
        new_fields: report

`response_drift(contract, name, body)` is the one hook: what a step or a delivery calls with the
parsed body of a successful answer; it returns the drift as lines naming the answer's source.
A file with only `responses:` pins no input shape: its events are not checked.
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
    # The answers' shapes, by destination or call/lookup step name (paths inside the answer's body).
    responses: dict[str, Contract] = field(default_factory=dict)
    input_pinned: bool = True  # False: the file pins only `responses:`, events are not checked

    def check(self, record: Any) -> list[Drift]:
        """What in `record` differs from the contract (empty: it conforms)."""
        if not self.input_pinned:
            return []
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
        if self.responses:
            head.append("# `responses:` pins the JSON body of each 2xx answer of a destination or call step.")
        if note:
            head.append(f"# {note}")
        body: dict[str, Any] = {"flow": self.flow}
        if self.input_pinned:
            body["new_fields"] = self.new_fields
            body["fields"] = {p: str(r) for p, r in self.fields.items()}
        if self.responses:
            body["responses"] = {
                name: {"new_fields": r.new_fields, "fields": {p: str(x) for p, x in r.fields.items()}}
                for name, r in self.responses.items()
            }
        return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)


def response_drift(contract: Contract | None, name: str, body: Any) -> list[str]:
    """The hook for every answer a flow gets: `body` (a successful answer's JSON body) of destination or
    call/lookup step `name` against the flow's pinned `responses:`. Lines that name the answer
    ("response of crm: id: missing ..."); empty when it conforms or nothing is pinned for `name`."""
    pinned = contract.responses.get(name) if contract is not None else None
    if pinned is None:
        return []
    return [f"response of {name}: {d}" for d in pinned.check(body)]


def parse_answer(text: str | bytes | None) -> Any:
    """A stored or received answer's JSON body; None when it is not JSON (or was cut short)."""
    import orjson

    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


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


def load_contract(path: Path, display: str | None = None, answers: Iterable[str] | None = None) -> Contract:
    """Parse a contract file; ConfigError with file:line for each problem. `answers`: the names a
    `responses:` entry may have (the flow's destinations and call steps); None accepts any."""
    src = load_yaml(path, display or str(path))
    problems: list[Problem] = []
    data = src.data if isinstance(src.data, dict) else {}
    has_fields = isinstance(data.get("fields"), dict)
    if not isinstance(src.data, dict) or not (has_fields or isinstance(data.get("responses"), dict)):
        raise ConfigError(
            [src.problem((), "a contract is a mapping with `fields:` (path: type) and/or `responses:`")]
        )
    unknown = set(data) - {"flow", "fields", "new_fields", "responses"}
    for key in sorted(unknown):
        problems.append(
            src.problem((key,), f"unknown setting {key!r} (known: flow, fields, new_fields, responses)")
        )
    new_fields = _new_fields(src, data, (), problems)
    fields = dict(_rules(src, data["fields"], problems, ())) if has_fields else {}
    flow = str(data.get("flow") or path.name.removesuffix(SUFFIX))
    responses: dict[str, Contract] = {}
    known = sorted(answers) if answers is not None else None
    for name, raw in (data.get("responses") or {}).items():
        loc = ("responses", name)
        if known is not None and name not in known:
            problems.append(
                src.problem(
                    loc,
                    f"responses: flow {flow!r} has no destination or call step {name!r} "
                    f"(it has: {', '.join(known) or 'none'})",
                )
            )
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("fields"), dict):
            problems.append(src.problem(loc, f"responses.{name} is a mapping with `fields:` (path: type)"))
            continue
        for key in sorted(set(raw) - {"fields", "new_fields"}):
            problems.append(src.problem((*loc, key), f"unknown setting {key!r} (known: fields, new_fields)"))
        rules = dict(_rules(src, raw["fields"], problems, loc))
        responses[str(name)] = Contract(flow, rules, _new_fields(src, raw, loc, problems), src.file)
    if problems:
        raise ConfigError(problems)
    return Contract(flow, fields, new_fields, src.file, responses, has_fields)


def _new_fields(src: Located, data: dict[str, Any], loc: tuple[Any, ...], problems: list[Problem]) -> str:
    value = data.get("new_fields", "report")
    if value not in ("report", "ignore"):
        problems.append(src.problem((*loc, "new_fields"), "new_fields is report or ignore"))
        return "report"
    return str(value)


def _rules(
    src: Located, raw: dict[str, Any], problems: list[Problem], loc: tuple[Any, ...]
) -> Iterator[tuple[str, Rule]]:
    for path, text in raw.items():
        m = _RULE_RE.match(str(text).strip()) if isinstance(text, str) else None
        bad = [t for t in m.group(1).split("|") if t not in TYPES] if m else []
        if m is None or bad:
            problems.append(
                src.problem(
                    (*loc, "fields", path),
                    f"{path}: write types from {', '.join(TYPES)}, joined by | and ending in ? if the field "
                    f"may be absent (e.g. string|null?); got {text!r}",
                )
            )
            continue
        yield path, Rule(frozenset(m.group(1).split("|")), bool(m.group(2)))
