"""SQL pushdown: the part of a batch flow's steps that the source database computes exactly, in its SELECT.

A map field or a field's validation rules are pushed only when the SQL gives the Python step's value
for every row the SQL keeps on the fast path. Each pushed piece carries guards (ASCII text, a JSON
string, digits only, ...); a row outside a guard, or failing a pushed rule, is read again with its
source columns and goes through the flow's own steps in Python, so its values and quarantine reasons
are the Python path's, byte for byte. Anything not provably equivalent stays in Python, per field, and
`Plan.notes` says which and why (`patchbay run FLOW --explain`).

Comparisons and patterns use the database's default collation (never a column's nondeterministic one).
The traps it refuses or guards: lower/upper only fold ASCII (`COLLATE "C"`), so non-ASCII text takes
the Python path; Python's strip() trims more than SQL's trim() (the ASCII whitespace set is spelled
out); concat() of only nulls is null in Python and '' in SQL; JSON values other than strings render
differently (numbers, booleans, objects); char(n) drops trailing spaces when cast; floats, decimals,
timestamps and json text are never re-rendered by SQL (a copy passes their bytes through untouched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from patchbay.batch.frame import Column
from patchbay.batch.sql_regex import WS_CLASS, NotPushable, translate_regex
from patchbay.expressions import compile_expr

# What Python's str.strip() and the regex class \s remove or match among ASCII characters.
WS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
# validate's formats as PostgreSQL AREs over ASCII text (see processors/validate.py for the Python ones).
_FORMATS = {
    "email": f"^[^@{WS_CLASS}]+@([^@{WS_CLASS}.]+\\.)+[^@{WS_CLASS}.]{{2,}}$",
    "uuid": "^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$",
}
_INT_TEXT = "^[+-]?[0-9]{1,18}$"
_BIGINT = 2**63


@dataclass
class Sql:
    """A SQL expression equal to a Python value whenever every guard is true."""

    text: str
    kind: str  # the frame type of the value: text | int | bool
    guards: list[str] = field(default_factory=list)
    ascii: bool = False  # known to be ASCII text (or null) whenever the guards hold


@dataclass
class PushedRead:
    """What a reader runs, in three layers so each expression is computed once per row: `inner` (the
    pushed expressions over the source's columns), `fast` (over both: the row may skip Python), `select`
    (the fast frames' columns). Rows that are not fast are read with the source's columns for Python."""

    inner: list[tuple[str, str]]  # (_pb_N, SQL expression over the source's columns)
    fast: str  # SQL condition over the source's and the inner columns, never null
    select: list[tuple[str, str]]  # (column name, SQL over the source's and the inner columns)
    columns: list[Column]  # the fast frames' columns
    raw: bool  # the fast rows need no Python at all: hand them over as COPY blocks


@dataclass
class Plan:
    read: PushedRead
    steps: list[Any]  # the steps left for the fast rows, over `read.columns`
    notes: list[str]  # one line per field or rule: pushed, or why not
    pushed: int  # how many fields and rules were pushed

    @classmethod
    def nothing(cls, *notes: str) -> Plan:
        return cls(PushedRead([], "false", [], [], False), [], list(notes), 0)


# ---------------------------------------------------------------- PostgreSQL spelling
def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    if "\x00" in text:
        raise NotPushable("text with a NUL character")
    return "'" + text.replace("'", "''") + "'"


def _ascii(e: str) -> str:
    # In a UTF8 database, a text is ASCII exactly when it has as many bytes as characters.
    return f"(({e}) IS NULL OR octet_length({e}) = char_length({e}))"


def _ascii_guard(s: Sql) -> list[str]:
    return [] if s.ascii else [_ascii(s.text)]


def _text_of(s: Sql) -> Sql:
    """A value as Python's to_text renders it (text as is, integers in decimal)."""
    if s.kind == "text":
        return s
    if s.kind == "int":
        return Sql(f"({s.text})::text", "text", s.guards, ascii=True)
    raise NotPushable(f"a {s.kind} value is rendered differently as text by SQL")


# ---------------------------------------------------------------- expressions
_TEXT_DB_TYPES = ("text",)


def source_kind(c: Column) -> str | None:
    """The kinds SQL can compute with exactly; others are only copied (their bytes pass through)."""
    if c.type == "text" and (c.db_type in _TEXT_DB_TYPES or c.db_type.startswith("character varying")):
        return "text"
    if c.type == "int":
        return "int"
    if c.type == "bool":
        return "bool"
    if c.type == "json" and c.db_type == "jsonb":
        return "jsonb"
    return None


class Compiler:
    def __init__(self, columns: list[Column]) -> None:
        self.columns = {c.name: c for c in columns}

    def column(self, name: str) -> Sql:
        c = self.columns.get(name)
        if c is None:
            raise NotPushable(f"{name} is not a column of the source")
        kind = source_kind(c)
        if kind is None:
            raise NotPushable(f"column {name} is {c.db_type or c.type}, which SQL would render differently")
        return Sql(ident(name), kind)

    def expr(self, node: dict[str, Any]) -> Sql:
        kind = node["type"]
        if kind == "field":
            s = self.column(str(node["value"]))
            if s.kind == "jsonb":
                raise NotPushable(f"{node['value']} is a whole JSON value (copy it as it is instead)")
            return s
        if kind == "subexpression":
            return self._json_path(node)
        if kind == "literal":
            return _literal(node["value"])
        if kind == "function_expression":
            return self._function(str(node["value"]), [self.expr(c) for c in node["children"]])
        if kind == "or_expression":
            a, b = (self.expr(c) for c in node["children"])
            if a.kind == b.kind == "text":
                return Sql(
                    f"CASE WHEN ({a.text}) <> '' THEN {a.text} ELSE {b.text} END", "text", a.guards + b.guards
                )
            if a.kind == b.kind == "int":
                return Sql(f"COALESCE({a.text}, {b.text})", "int", a.guards + b.guards)
            raise NotPushable("`||` over values of different kinds")
        raise NotPushable(f"{kind.replace('_', ' ')} has no exact SQL form here")

    def _json_path(self, node: dict[str, Any]) -> Sql:
        keys: list[str] = []
        cur = node
        while cur["type"] == "subexpression":
            first, *rest = cur["children"]
            if not rest or any(r["type"] != "field" for r in rest):
                raise NotPushable("only plain JSON field paths (a.b.c) are pushed")
            keys[:0] = [str(r["value"]) for r in rest]
            cur = first
        if cur["type"] != "field":
            raise NotPushable("only plain JSON field paths (a.b.c) are pushed")
        base = self.column(str(cur["value"]))
        if base.kind != "jsonb":
            raise NotPushable(f"{cur['value']} is not a jsonb column")
        obj = base.text
        for k in keys[:-1]:
            obj = f"({obj} -> {literal(k)})"
        last = literal(keys[-1])
        # Only JSON strings (and null/missing) read the same: numbers, booleans and objects render differently.
        guard = f"COALESCE(jsonb_typeof({obj} -> {last}), 'null') IN ('string', 'null')"
        return Sql(f"({obj} ->> {last})", "text", [guard])

    def _function(self, name: str, args: list[Sql]) -> Sql:
        guards = [g for a in args for g in a.guards]
        if name in ("lower", "upper", "trim") and len(args) == 1:
            a = _text_of(args[0])
            if args[0].kind == "int":
                return Sql(a.text, "text", guards, ascii=True)  # digits and '-' are unchanged
            if name == "trim":
                text = f"btrim({a.text}, {literal(WS)})"
            else:
                text = f'{name}(({a.text}) COLLATE "C")'  # ASCII letters only, as Python on ASCII text
            return Sql(text, "text", [*guards, *_ascii_guard(a)], ascii=True)
        if name == "concat" and args:
            parts = [_text_of(a) for a in args]
            all_null = " AND ".join(f"({p.text}) IS NULL" for p in parts)
            joined = "concat(" + ", ".join(p.text for p in parts) + ")"
            ascii_ = all(p.ascii for p in parts)
            return Sql(f"CASE WHEN {all_null} THEN NULL ELSE {joined} END", "text", guards, ascii=ascii_)
        if name == "coalesce" and args:
            if all(a.kind == "text" for a in args):
                return Sql(
                    "COALESCE(" + ", ".join(f"NULLIF({a.text}, '')" for a in args) + ")", "text", guards
                )
            if all(a.kind == "int" for a in args):
                return Sql("COALESCE(" + ", ".join(a.text for a in args) + ")", "int", guards)
            raise NotPushable("coalesce() over values of different kinds")
        if name == "default" and len(args) == 2 and args[0].kind == args[1].kind:
            return Sql(f"COALESCE({args[0].text}, {args[1].text})", args[0].kind, guards)
        raise NotPushable(f"{name}() has no exact SQL form here")


def _literal(value: Any) -> Sql:
    if isinstance(value, bool):
        return Sql("true" if value else "false", "bool")
    if isinstance(value, int):
        if not -_BIGINT <= value < _BIGINT:
            raise NotPushable("an integer beyond 64 bits")
        return Sql(f"({value})::bigint", "int")
    if isinstance(value, str):
        return Sql(f"({literal(value)})::text", "text", ascii=value.isascii())
    raise NotPushable(f"a {type(value).__name__} constant")


def field_sql(comp: Compiler, f: Any) -> Sql:
    """A map field (expr or value, default, type) as SQL."""
    if f.expr is None:
        if f.value is None:
            raise NotPushable("a null constant")
        s = _literal(f.value)
    else:
        s = comp.expr(compile_expr(f.expr).ast)
    if f.default is not None:
        d = _literal(f.default)
        if d.kind != s.kind:
            raise NotPushable("a default of another kind than the value")
        s = Sql(f"COALESCE({s.text}, {d.text})", s.kind, s.guards)
    if f.type == "str":
        if s.kind == "bool":
            s = Sql(f"CASE WHEN {s.text} THEN 'true' WHEN NOT {s.text} THEN 'false' END", "text", s.guards)
        else:
            s = _text_of(s)
    elif f.type == "int":
        if s.kind == "text":
            trimmed = f"btrim({s.text}, {literal(WS)})"
            ok = f"(({s.text}) IS NULL OR (octet_length({s.text}) = char_length({s.text}) AND {trimmed} ~ {literal(_INT_TEXT)}))"
            # Cast only what the guard lets through: any other text would fail the whole SELECT.
            cast = f"CASE WHEN {trimmed} ~ {literal(_INT_TEXT)} THEN ({trimmed})::bigint END"
            s = Sql(cast, "int", [*s.guards, ok])
        elif s.kind != "int":
            raise NotPushable(f"type: int of a {s.kind} value")
    elif f.type is not None:
        raise NotPushable(f"type: {f.type}")
    return s


# ---------------------------------------------------------------- validation rules
_TYPE_KINDS = {"string": ("text",), "integer": ("int",), "number": ("int",), "boolean": ("bool",)}


def rule_sql(rules: Any, s: Sql) -> str:
    """SQL that is true only for values that pass every rule in Python (never true for one that fails)."""
    e, kind = s.text, s.kind
    parts: list[str] = []
    if rules.type is not None:
        if kind not in _TYPE_KINDS.get(rules.type, ()):
            raise NotPushable(f"type: {rules.type} of a {kind} value")
    if rules.format is not None or rules.pattern is not None:
        if kind != "text":
            raise NotPushable(f"format/pattern of a {kind} value")
        if rules.format is not None:
            if rules.format not in _FORMATS:
                raise NotPushable(f"format: {rules.format} has no exact SQL form")
            parts.append(f'({e}) COLLATE "default" ~ {literal(_FORMATS[rules.format])}')
        if rules.pattern is not None:
            parts.append(f'({e}) COLLATE "default" ~ {literal(translate_regex(rules.pattern))}')
        parts[:0] = _ascii_guard(s)
    if rules.min_length is not None or rules.max_length is not None:
        if kind != "text":
            raise NotPushable(f"min/max_length of a {kind} value")
        if rules.min_length is not None:
            parts.append(f"char_length({e}) >= {int(rules.min_length)}")
        if rules.max_length is not None:
            parts.append(f"char_length({e}) <= {int(rules.max_length)}")
    if rules.minimum is not None or rules.maximum is not None:
        if kind != "int":
            raise NotPushable(f"minimum/maximum of a {kind} value")
        if rules.minimum is not None:
            parts.append(f"({e})::numeric >= {_number(rules.minimum)}")
        if rules.maximum is not None:
            parts.append(f"({e})::numeric <= {_number(rules.maximum)}")
    if rules.one_of is not None:
        if kind == "text":
            ok = [literal(v) for v in rules.one_of if isinstance(v, str)]
        elif kind == "int":
            ok = [
                str(int(v))
                for v in rules.one_of
                if isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer()
            ]
        else:
            raise NotPushable(f"one_of of a {kind} value")
        # A column's own collation may be nondeterministic (case-insensitive); Python compares code points.
        coll = ' COLLATE "default"' if kind == "text" else ""
        parts.append(f"({e}){coll} IN ({', '.join(ok)})" if ok else "false")
    if rules.not_empty and kind == "text":
        parts.extend(_ascii_guard(s))
        parts.append(f"btrim({e}, {literal(WS)}) <> ''")
    body = " AND ".join(parts) if parts else "true"
    if rules.required or rules.not_empty:
        return f"(({e}) IS NOT NULL AND {body})"
    return f"(({e}) IS NULL OR ({body}))"


def _number(n: int | float) -> str:
    if isinstance(n, float) and not n == n or n in (float("inf"), float("-inf")):
        raise NotPushable("a bound that is not a finite number")
    return str(Decimal(n))  # exact: Python compares an int with a float exactly


# ---------------------------------------------------------------- the plan
def _replace(spec: Any, config: Any) -> Any:
    from dataclasses import replace

    return replace(spec, config=config, step=type(spec.step)(config))


def plan(steps: list[Any], columns: list[Column]) -> Plan:
    """What the source's SELECT computes (`pushed` is 0 when nothing can be)."""
    notes: list[str] = []
    if any(c.name.startswith("_pb_") for c in columns):
        return Plan.nothing("pushdown: a source column's name starts with _pb_; every step runs in Python")
    comp = Compiler(columns)
    steps = list(steps)
    first = steps[0] if steps else None
    has_map = first is not None and first.kind == "map"
    outputs: dict[str, Sql | None] = {}  # output name -> its SQL (None: computed in Python)
    pushed_exprs: dict[str, Sql] = {}  # output name -> a pushed expression (not a plain copy)
    copies: dict[str, str] = {}  # output name -> the source column it copies
    guards: list[str] = []
    virtual: dict[str, str] = {}  # output name -> the inner column that computes it
    reduced: list[Any] = []
    rest = steps
    if has_map:
        assert first is not None
        cfg = first.config
        plain = first.when is None and not (cfg.keep or cfg.flatten or cfg.omit_nulls or cfg.tables)
        if not plain or any("." in t for t in cfg.fields):
            return Plan.nothing(
                f"pushdown: {first.name} has when, keep, flatten, omit_nulls, tables or nested targets;"
                " every step runs in Python"
            )
        kept: dict[str, Any] = {}
        from patchbay.processors.map import FieldSpec

        for target, f in cfg.fields.items():
            src = f.expr.strip() if f.expr is not None else None
            if src is not None and f.default is None and f.type is None and src in comp.columns:
                copies[target] = src
                kind = source_kind(comp.columns[src])
                outputs[target] = Sql(ident(src), kind) if kind and kind != "jsonb" else None
                kept[target] = FieldSpec(expr=src)
                continue
            try:
                s = field_sql(comp, f)
            except NotPushable as exc:
                notes.append(f"{first.name} {target}: Python ({exc})")
                outputs[target] = None
                kept[target] = f
                continue
            vname = f"_pb_{len(pushed_exprs)}"
            outputs[target] = Sql(ident(vname), s.kind, [], s.ascii)  # rules read the inner column
            pushed_exprs[target] = s
            virtual[target] = vname
            guards.extend(s.guards)
            notes.append(
                f"{first.name} {target}: pushed down"
                + (" (guarded: other rows take the Python path)" if s.guards else "")
            )
        rest = steps[1:]
        reduced_fields = {t: (FieldSpec(expr=virtual[t]) if t in virtual else kept[t]) for t in cfg.fields}
        reduced.append(_replace(first, cfg.model_copy(update={"fields": reduced_fields})))
    else:
        for c in columns:
            kind = source_kind(c)
            outputs[c.name] = Sql(ident(c.name), kind) if kind and kind != "jsonb" else None
    # Validation rules right after the map (filters change no value, so rules after them see the same).
    checks: list[str] = []
    pushing = True
    for s in rest:
        if not pushing or s.kind not in ("validate", "filter") or s.when is not None:
            why = (
                "after a step that changes values"
                if not pushing
                else ("a step with `when`" if s.when is not None else f"{s.kind} is not pushed down")
            )
            notes.append(f"{s.name}: Python ({why})")
            pushing = False
            reduced.append(s)
            continue
        if s.kind == "filter":
            notes.append(f"{s.name}: Python (filters are not pushed down)")
            reduced.append(s)
            continue
        left: dict[str, Any] = {}
        for path, rules in s.config.rules.items():
            out = outputs.get(path)
            if out is None:
                why = (
                    "a nested path"
                    if "." in path
                    else (
                        "not a field of the output"
                        if path not in outputs
                        else "its value is computed in Python"
                    )
                )
                notes.append(f"{s.name} {path}: Python ({why})")
                left[path] = rules
                continue
            try:
                checks.append(rule_sql(rules, out))
            except NotPushable as exc:
                notes.append(f"{s.name} {path}: Python ({exc})")
                left[path] = rules
                continue
            notes.append(
                f"{s.name} {path}: pushed down (failing rows take the Python path for their reasons)"
            )
        if left:
            reduced.append(_replace(s, type(s.config).model_validate(left)))
    pushed = len(pushed_exprs) + len(checks)
    if not pushed:
        return Plan.nothing(*notes, "pushdown: nothing to compute in SQL; every step runs in Python")
    conds = list(dict.fromkeys(guards + checks))
    fast = "COALESCE(" + " AND ".join(f"({c})" for c in conds) + ", false)"
    reduced_map = reduced[0] if has_map else None
    only_copies = reduced_map is not None and all(
        (f.expr or "").strip() in virtual.values() or t in copies
        for t, f in reduced_map.config.fields.items()
    )
    raw = len(reduced) == (1 if has_map else 0) and (only_copies or not has_map)
    inner = [(virtual[t], pushed_exprs[t].text) for t in pushed_exprs]
    if raw:
        if has_map:
            select = [(t, ident(virtual[t]) if t in virtual else ident(copies[t])) for t in outputs]
            cols = [
                Column(t, pushed_exprs[t].kind) if t in pushed_exprs else _col(comp, copies[t], t)
                for t in outputs
            ]
        else:
            select = [(c.name, ident(c.name)) for c in columns]
            cols = list(columns)
        return Plan(PushedRead(inner, fast, select, cols, True), [], notes, pushed)
    select = [(c.name, ident(c.name)) for c in columns]
    cols = list(columns)
    for t, name in virtual.items():
        select.append((name, ident(name)))
        cols.append(Column(name, pushed_exprs[t].kind))
    return Plan(PushedRead(inner, fast, select, cols, False), reduced, notes, pushed)


def _col(comp: Compiler, src: str, target: str) -> Column:
    c = comp.columns[src]
    return Column(target, c.type, c.db_type, c.nullable)
