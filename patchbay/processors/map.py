"""map: build the outgoing record field by field from expressions over the incoming one."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from pydantic import (
    Field,
    GetJsonSchemaHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails

from patchbay.errors import RecordInvalid, Violation
from patchbay.expressions import DataError, Expr, ExprError, compile_expr, to_bool, to_float
from patchbay.expressions import to_int as _to_int
from patchbay.expressions import to_str as _to_str
from patchbay.processors.base import CheckIssue, Loc, StepConfig
from patchbay.records import flatten
from patchbay.registry import step

Cast = Literal["int", "float", "str", "bool"]
CASTS: dict[str, Callable[[Any], Any]] = {"int": _to_int, "float": to_float, "str": _to_str, "bool": to_bool}


class FieldSpec(StepConfig):
    """The long form of one output field."""

    expr: str | None = Field(
        None,
        description="JMESPath expression evaluated against the incoming record, e.g. `lower(email)`.",
        examples=["lower(trim(email))"],
    )
    value: Any = Field(
        None, description="A constant to write instead of an expression (give one of expr/value)."
    )
    default: Any = Field(None, description="Written when the expression gives null (missing source field).")
    type: Cast | None = Field(
        None,
        description=(
            'Convert the value: int, float, str or bool. Text such as "12" or "yes" is converted;'
            " a value that cannot be converted makes the record invalid (quarantined with the reason)."
        ),
    )

    _inline: bool = PrivateAttr(False)  # written as a bare expression string

    @model_validator(mode="wrap")
    @classmethod
    def _from_text(cls, data: Any, handler: Callable[[Any], FieldSpec]) -> FieldSpec:
        if isinstance(data, str):
            spec = handler({"expr": data})
            spec._inline = True
            return spec
        if data is None or isinstance(data, bool | int | float | list):
            shown = json.dumps(data)
            raise ValueError(
                f"{shown} is not an expression; for a constant write `{{value: {shown}}}`,"
                " for a field name write it as text"
            )
        return handler(data)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # The short form: a bare expression string.
        text = {"type": "string", "description": "A JMESPath expression (the short form of {expr: ...})."}
        return {"anyOf": [text, handler(core_schema)]}

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        if (self.expr is None) == ("value" not in self.model_fields_set):
            raise ValueError("give exactly one of `expr` (an expression) or `value` (a constant)")
        return self


_OPTIONS = frozenset({"fields", "keep", "drop", "flatten", "omit_nulls", "tables"})


class MapConfig(StepConfig):
    """Options of the map step; a mapping without any option key is read as `fields`."""

    fields: dict[str, FieldSpec] = Field(
        default_factory=dict,
        description=(
            "Output field (dotted path; `properties.email` nests) -> JMESPath expression over the"
            " incoming record, or `{expr, default, type}` / `{value}`. A missing source gives null."
            " Parent paths are written before their children; a child of a parent that is not an"
            " object (or null) makes the record invalid."
        ),
        examples=[{"properties.email": "lower(trim(email || customer_email || properties.email))"}],
    )
    keep: bool = Field(
        False,
        description="Start from the incoming record and overlay the fields (default: build a new record).",
    )
    drop: list[str] = Field(
        default_factory=list,
        description="With `keep: true`, dotted paths removed from the record before the fields are written.",
    )
    flatten: bool = Field(False, description='Flatten the output to dotted keys: `{"a.b": 1}`.')
    omit_nulls: bool = Field(
        False, description="Leave out fields whose value is null instead of writing null."
    )
    tables: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Lookup tables for `lookup('name', key)`, e.g. `countries: {FR: France}`. Keys are text.",
    )

    _short_form: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _fields_shorthand(cls, data: Any, handler: Callable[[Any], MapConfig]) -> MapConfig:
        if not isinstance(data, dict) or not data or data.keys() & _OPTIONS:
            return handler(data)
        try:
            config = handler({"fields": data})
        except ValidationError as exc:
            # Report errors where they are in the YAML as written (no `fields:` level).
            errors = []
            for e in exc.errors():
                detail = InitErrorDetails(type=e["type"], loc=tuple(e["loc"][1:]), input=e["input"])
                if "ctx" in e:
                    detail["ctx"] = e["ctx"]
                errors.append(detail)
            raise ValidationError.from_exception_data(exc.title, errors) from None
        config._short_form = True
        return config

    @field_validator("fields")
    @classmethod
    def _targets(cls, fields: dict[str, Any]) -> dict[str, Any]:
        for target in fields:
            if not target or any(not part for part in target.split(".")):
                raise ValueError(f"bad output path {target!r}: use dotted names like properties.email")
        return fields

    @field_validator("tables", mode="before")
    @classmethod
    def _text_keys(cls, tables: Any) -> Any:
        if isinstance(tables, dict):
            for name, table in tables.items():
                if isinstance(table, dict):
                    for key in table:
                        if not isinstance(key, str):
                            raise ValueError(
                                f"table {name!r}: key {key!r} is not text; quote it in YAML"
                                f" (YAML reads NO, yes, on, 1 as booleans/numbers)"
                            )
        return tables

    @model_validator(mode="after")
    def _drop_needs_keep(self) -> MapConfig:
        if self.drop and not self.keep:
            raise ValueError(
                "`drop` only applies with `keep: true` (without it the record is built from scratch)"
            )
        return self

    def field_loc(self, target: str, *rest: str) -> Loc:
        """Where a field's config sits in the YAML as written (the short form has no `fields:`)."""
        return (target, *rest) if self._short_form else ("fields", target, *rest)


class _OutField:
    __slots__ = ("target", "parts", "expr", "const", "default", "cast", "ancestors")

    def __init__(
        self,
        target: str,
        expr: Expr | None,
        const: Any,
        default: Any,
        cast: Cast | None,
        ancestors: list[str],
    ) -> None:
        self.target = target
        self.ancestors = ancestors  # targets this one is written inside
        self.parts = target.split(".")
        self.expr = expr
        self.const = const
        self.default = default
        self.cast = CASTS[cast] if cast else None


def _ancestors(targets: Iterable[str]) -> dict[str, list[str]]:
    """Each target's ancestors among the targets, outermost first (`a`, `a.b` for `a.b.c`).

    Each target looks up its own prefixes in a set: linear in the total length of the targets."""
    known = set(targets)
    out: dict[str, list[str]] = {}
    for t in known:
        parts = t.split(".")
        out[t] = [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in known]
    return out


def _ordered(targets: list[str], ancestors: dict[str, list[str]]) -> list[str]:
    """Parents before children, so `properties` does not overwrite `properties.email`; else as given."""
    return sorted(targets, key=lambda t: len(ancestors[t]))


def _shape(value: Any) -> str:
    return (
        "null"
        if value is None
        else {bool: "a boolean", int: "a number", float: "a number"}.get(
            type(value), "text" if isinstance(value, str) else f"a {type(value).__name__}"
        )
    )


_FAILED: Any = object()


def _value(f: _OutField, record: Any, problems: list[Violation]) -> Any:
    """One field's value (expression or constant, default, cast), or _FAILED with the problem added."""
    if f.expr is None:
        value = f.const
    else:
        try:
            value = f.expr.search(record)
        except RecordInvalid as exc:
            problems.extend(Violation(f.target, v.message) for v in exc.violations)
            return _FAILED
    if value is None:
        value = f.default
    if f.cast is not None and value is not None:
        try:
            value = f.cast(value)
        except DataError as exc:
            problems.append(Violation(f.target, str(exc)))
            return _FAILED
    return value


def _put(root: dict[str, Any], parts: list[str], value: Any, owned: set[int]) -> None:
    """records.put, but copying any dict not built here first: the input record is never modified."""
    cur = root
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            owned.add(id(nxt))
            cur[part] = nxt
        elif id(nxt) not in owned:
            nxt = dict(nxt)
            owned.add(id(nxt))
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def _delete(root: dict[str, Any], parts: list[str], owned: set[int]) -> None:
    cur = root
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict) or part not in cur:
            return
        if id(nxt) not in owned:
            nxt = dict(nxt)
            owned.add(id(nxt))
            cur[part] = nxt
        cur = nxt
    cur.pop(parts[-1], None)


@step("map", config=MapConfig)
class MapStep:
    """Rename, nest, flatten, cast and compute fields with JMESPath expressions."""

    def __init__(self, config: MapConfig) -> None:
        self.config = config
        tables = config.tables or None
        self._fields: list[_OutField] = []
        ancestors = _ancestors(config.fields)
        for target in _ordered(list(config.fields), ancestors):
            spec = config.fields[target]
            expr = compile_expr(spec.expr, tables=tables) if spec.expr is not None else None
            self._fields.append(
                _OutField(target, expr, spec.value, spec.default, spec.type, ancestors[target])
            )
        self._drop = [path.split(".") for path in config.drop]

    def apply(self, record: Any) -> dict[str, Any]:
        """The mapped record; RecordInvalid lists every field that could not be computed or cast."""
        if self.config.keep:
            if not isinstance(record, dict):
                got = Violation("", f"keep: true needs an object record, got {type(record).__name__}")
                raise RecordInvalid([got], step="map")
            out = dict(record)
        else:
            out = {}
        owned = {id(out)}
        for parts in self._drop:
            _delete(out, parts, owned)
        omit_nulls = self.config.omit_nulls
        problems: list[Violation] = []
        written: dict[str, Any] = {}  # what each target wrote, for the targets written inside it
        for f in self._fields:
            if f.ancestors:
                clash = next((a for a in f.ancestors if not isinstance(written.get(a), dict | None)), None)
                if clash is not None:
                    problems.append(
                        Violation(
                            f.target,
                            f"cannot write {f.target} inside {clash}, which is {_shape(written[clash])}, "
                            "not an object",
                        )
                    )
                    continue
            value = _value(f, record, problems)
            if value is _FAILED:
                continue
            if value is None and omit_nulls:
                continue
            written[f.target] = value
            _put(out, f.parts, value, owned)
        if problems:
            raise RecordInvalid(problems, step="map")
        return flatten(out) if self.config.flatten else out

    def value_of(self, record: Any, target: str) -> Any:
        """The value this map gives the output field `target` for `record` (the record's own `target` when the
        map does not write it, with `keep: true`); None when it cannot be computed."""
        f = next((f for f in self._fields if f.target == target), None)
        if f is None:
            return record.get(target) if self.config.keep and isinstance(record, dict) else None
        value = _value(f, record, [])
        return None if value is _FAILED else value

    def flat_values(self, record: Any) -> dict[str, Any]:
        """Each field's value, keyed by its target, for a map whose targets are flat names and that has no
        keep, drop, flatten or omit_nulls (a batch sync's row): `apply` without building the output."""
        problems: list[Violation] = []
        out: dict[str, Any] = {}
        for f in self._fields:
            value = _value(f, record, problems)
            if value is not _FAILED:
                out[f.target] = value
        if problems:
            raise RecordInvalid(problems, step="map")
        return out

    @classmethod
    def check(cls, config: MapConfig) -> Iterator[CheckIssue]:
        """Bad expressions, unknown functions or tables, defaults that cannot be cast, empty output."""
        tables = config.tables or None
        for target, spec in config.fields.items():
            if spec.expr is not None:
                try:
                    compile_expr(spec.expr, tables=tables)
                except ExprError as exc:
                    loc = config.field_loc(target) if spec._inline else config.field_loc(target, "expr")
                    yield CheckIssue(loc, exc.message)
            if spec.type:
                for key in ("default", "value"):
                    given = getattr(spec, key)
                    try:
                        CASTS[spec.type](given)
                    except DataError as exc:
                        yield CheckIssue(
                            config.field_loc(target, key), f"{key} is not a valid {spec.type}: {exc}"
                        )
        ancestors = _ancestors(config.fields)
        for target in config.fields:
            for parent in ancestors[target]:
                given = config.fields[parent]
                if given.type is not None or ("value" in given.model_fields_set and given.value is not None):
                    what = f"type: {given.type}" if given.type else "a constant that is not an object"
                    if given.type is None and isinstance(given.value, dict):
                        continue
                    yield CheckIssue(
                        config.field_loc(target),
                        f"{target} is written inside {parent}, which is {what}: the record would be"
                        f" refused; remove one of them or write {parent} as an object",
                    )
                    break
        if not config.fields and not config.keep:
            yield CheckIssue((), "map has no fields and keep is false: every record would come out empty")
