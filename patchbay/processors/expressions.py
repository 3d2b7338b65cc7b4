"""The expression language of map, filter, routes and templates: JMESPath plus Patchbay's functions."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, TypeAlias, cast

from jmespath import exceptions as jexc
from jmespath import functions as jfn
from jmespath.lexer import Lexer
from jmespath.parser import Parser
from jmespath.visitor import Options, TreeInterpreter

from patchbay.errors import ConfigError, RecordInvalid, Violation

Node: TypeAlias = Any  # a jmespath AST node: {"type", "children", "value"}
Tables = Mapping[str, Mapping[str, Any]]


class ExprError(ConfigError, ValueError):
    """An expression that cannot run: bad syntax, unknown function, wrong argument count.

    `position` is the 0-based column in the text given to compile_expr/render_template.
    """

    def __init__(self, message: str, position: int = 0) -> None:
        self.message = message
        self.position = position
        super().__init__(message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


class DataError(ValueError):
    """Raised by a function on data it cannot handle; Expr.search turns it into RecordInvalid."""


# -- value helpers shared with the steps ------------------------------------------------------------


def type_name(value: Any) -> str:
    """The JSON type name of a decoded value: string, number, boolean, null, object, array."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def show(value: Any, limit: int = 60) -> str:
    """A short JSON-ish rendering of a value for error messages."""
    if isinstance(value, str):
        if len(value) > limit:
            value = value[: limit - 1] + "…"
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict | list):
        return type_name(value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def describe(value: Any) -> str:
    """`string "12x"`, `number 5`, `object`: a value with its type, for error messages."""
    kind = type_name(value)
    return kind if value is None or isinstance(value, dict | list) else f"{kind} {show(value)}"


def to_text(value: Any) -> str:
    """Render a value as text: null -> '', booleans as true/false, objects and arrays as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def to_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise DataError(f"{show(value)} is not a whole number")
    if isinstance(value, str):
        s = value.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            raise DataError(f"{show(value)} is not an integer") from None
        if math.isfinite(f) and f.is_integer():
            return int(f)
        raise DataError(f"{show(value)} is not a whole number")
    raise DataError(f"cannot convert {describe(value)} to an integer")


def to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            raise DataError(f"{show(value)} is not a number") from None
        if not math.isfinite(f):
            raise DataError(f"{show(value)} is not a finite number")
        return f
    raise DataError(f"cannot convert {describe(value)} to a number")


_TRUE = frozenset({"true", "yes", "y", "1", "on", "t"})
_FALSE = frozenset({"false", "no", "n", "0", "off", "f"})


def to_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if value in (0, 1):
            return bool(value)
        raise DataError(f"{show(value)} is not a boolean (numbers must be 0 or 1)")
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        if not s:
            return None
        raise DataError(f"{show(value)} is not a boolean (use true/false, yes/no, 1/0 or on/off)")
    raise DataError(f"cannot convert {describe(value)} to a boolean")


def to_str(value: Any) -> str | None:
    return None if value is None else to_text(value)


_TIME_DIRECTIVES = re.compile(r"%[-#]?[HIMSfpXcTRrsz]")


def parse_datetime(value: Any, fmt: str | None = None) -> datetime | date | None:
    """A date or datetime from ISO 8601 text, RFC 2822 text, Unix seconds, or text in strptime `fmt`."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise DataError(f"{show(value)} is out of range for a Unix timestamp") from None
    if not isinstance(value, str):
        raise DataError(f"cannot read a date from {describe(value)}")
    s = value.strip()
    if fmt is not None:
        try:
            dt = datetime.strptime(s, fmt)
        except ValueError:
            raise DataError(f"{show(value)} does not match the date format {show(fmt)}") from None
        return dt if _TIME_DIRECTIVES.search(fmt) else dt.date()
    if len(s) == 10 and s[4:5] == "-":
        try:
            return date.fromisoformat(s)
        except ValueError:
            pass
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(s)
    except (TypeError, ValueError, IndexError):
        raise DataError(
            f"{show(value)} is not a date (expected ISO 8601, e.g. 2024-01-31T09:30:00Z)"
        ) from None


def iso(value: datetime | date) -> str:
    """ISO 8601; aware datetimes are converted to UTC and written with a Z."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"
    return value.isoformat()


# -- functions --------------------------------------------------------------------------------------

_TEXT = ["string", "number", "null"]
_ANY: list[str] = []
# Functions whose trailing arguments may be left out: name -> smallest argument count.
_MIN_ARGS = {"parse_date": 1, "lookup": 2, "substring": 2}


def _sig(*types: list[str], variadic: bool = False) -> Callable[[Any], Any]:
    args: list[dict[str, Any]] = [{"types": t} for t in types]
    if variadic:
        args[-1]["variadic"] = True
    return jfn.signature(*cast(Any, args))  # type: ignore[no-any-return, unused-ignore]


def _index(value: Any, what: str) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise DataError(f"{what} must be a whole number, got {describe(value)}")


class Functions(jfn.Functions):  # type: ignore[misc, unused-ignore]
    """JMESPath's built-ins plus Patchbay's; `tables` feed lookup('name', key)."""

    def __init__(self, tables: Tables | None = None) -> None:
        self.tables: Tables = tables or {}

    def call_function(self, function_name: str, resolved_args: Iterable[Any]) -> Any:
        """What jmespath's interpreter calls; the compiled fast path calls _Entry.call directly."""
        entry = _ENTRIES.get(function_name)
        if entry is None:
            raise jexc.UnknownFunctionError(f"unknown function {function_name}()")
        args = list(resolved_args)
        if not entry.lo <= len(args) <= entry.hi:
            raise DataError(f"{function_name}() got {len(args)} arguments")
        return entry.call(self, args)

    @_sig(_TEXT)
    def _func_lower(self, s: Any) -> str | None:
        return None if s is None else to_text(s).lower()

    @_sig(_TEXT)
    def _func_upper(self, s: Any) -> str | None:
        return None if s is None else to_text(s).upper()

    @_sig(_TEXT)
    def _func_trim(self, s: Any) -> str | None:
        return None if s is None else to_text(s).strip()

    @_sig(_TEXT, ["string"])
    def _func_split(self, s: Any, sep: str) -> list[str] | None:
        if s is None:
            return None
        text = to_text(s)
        if not text:
            return []
        return text.split(sep) if sep else list(text)

    @_sig(_ANY, variadic=True)
    def _func_concat(self, *parts: Any) -> str | None:
        texts = []
        for p in parts:
            if isinstance(p, dict | list):
                raise DataError(f"concat() takes text, numbers and booleans, got {describe(p)}")
            if p is not None:
                texts.append(to_text(p))
        return "".join(texts) if texts or not parts else None

    @_sig(_TEXT, ["string"], ["string"])
    def _func_replace(self, s: Any, old: str, new: str) -> str | None:
        return None if s is None else to_text(s).replace(old, new)

    @_sig(_ANY, variadic=True)
    def _func_coalesce(self, *values: Any) -> Any:
        for v in values:
            if v is not None and v != "":
                return v
        return None

    @_sig(_ANY, _ANY)
    def _func_default(self, value: Any, fallback: Any) -> Any:
        return fallback if value is None else value

    @_sig(_ANY)
    def _func_to_int(self, value: Any) -> int | None:
        return to_int(value)

    @_sig(_ANY)
    def _func_to_float(self, value: Any) -> float | None:
        return to_float(value)

    @_sig(_ANY)
    def _func_to_bool(self, value: Any) -> bool | None:
        return to_bool(value)

    # Arithmetic (JMESPath has none). Text that holds a number is read as one; null in, null out.
    @_sig(_TEXT, _TEXT)
    def _func_add(self, a: Any, b: Any) -> float | int | None:
        return None if a is None or b is None else _num(_number(a) + _number(b))

    @_sig(_TEXT, _TEXT)
    def _func_subtract(self, a: Any, b: Any) -> float | int | None:
        return None if a is None or b is None else _num(_number(a) - _number(b))

    @_sig(_TEXT, _TEXT)
    def _func_multiply(self, a: Any, b: Any) -> float | int | None:
        return None if a is None or b is None else _num(_number(a) * _number(b))

    @_sig(_TEXT, _TEXT)
    def _func_divide(self, a: Any, b: Any) -> float | int | None:
        if a is None or b is None:
            return None
        d = _number(b)
        if d == 0:
            raise DataError("divide: division by zero")
        return _num(_number(a) / d)

    @_sig(_TEXT, ["number", "null"])
    def _func_round(self, value: Any, digits: Any = None) -> float | int | None:
        if value is None:
            return None
        return _num(round(_number(value), int(digits or 0)))

    @_sig(["string", "number", "null"], ["string", "null"])
    def _func_parse_date(self, value: Any, fmt: str | None = None) -> str | None:
        parsed = parse_datetime(value, fmt)
        return None if parsed is None else iso(parsed)

    @_sig(["string", "number", "null"], ["string"])
    def _func_format_date(self, value: Any, fmt: str) -> str | None:
        parsed = parse_datetime(value)
        return None if parsed is None else parsed.strftime(fmt)

    @_sig()
    def _func_now(self) -> str:
        return iso(datetime.now(UTC))

    @_sig(["string", "object"], _ANY, _ANY)
    def _func_lookup(self, table: str | dict[str, Any], key: Any, default: Any = None) -> Any:
        if isinstance(table, str):
            if table not in self.tables:
                raise DataError(f"lookup(): no table named {show(table)}")
            found: Mapping[str, Any] = self.tables[table]
        else:
            found = table
        if isinstance(key, int | float) and not isinstance(key, bool):
            key = to_text(key)
        if not isinstance(key, str):
            return default
        return found.get(key, default)

    @_sig(_TEXT, ["string"], ["string"])
    def _func_regex_replace(self, s: Any, pattern: str, replacement: str) -> str | None:
        if s is None:
            return None
        try:
            return re.sub(pattern, replacement, to_text(s))
        except re.error as exc:
            raise DataError(f"regex_replace(): {exc}") from None

    @_sig(_TEXT, ["number"], ["number", "null"])
    def _func_substring(self, s: Any, start: Any, length: Any = None) -> str | None:
        if s is None:
            return None
        text = to_text(s)
        i = _index(start, "substring() start")
        if i < 0:
            i = max(len(text) + i, 0)
        if length is None:
            return text[i:]
        n = _index(length, "substring() length")
        if n < 0:
            raise DataError(f"substring() length must not be negative, got {n}")
        return text[i : i + n]

    @_sig(_TEXT)
    def _func_email_domain(self, s: Any) -> str | None:
        if s is None:
            return None
        local, at, domain = to_text(s).strip().rpartition("@")
        return domain.lower() if at and local and domain else None

    @_sig(_TEXT)
    def _func_hash_sha256(self, s: Any) -> str | None:
        return None if s is None else hashlib.sha256(to_text(s).encode()).hexdigest()

    @_sig(_TEXT)
    def _func_hash_md5(self, s: Any) -> str | None:
        # Not for security: some APIs key records by it (Mailchimp's subscriber hash of the email).
        return None if s is None else hashlib.md5(to_text(s).encode(), usedforsecurity=False).hexdigest()


def _number(value: Any) -> float:
    """An arithmetic operand: a number, or text that holds one (the signature checks let nothing else in)."""
    n = to_float(value)
    if n is None:
        raise DataError(f"{show(value)} is not a number")
    return n


def _num(x: float) -> float | int:
    """Whole results as integers (12.0 -> 12), so ids and counts stay integers."""
    return int(x) if x == int(x) and abs(x) < 2**53 else x


# jmespath type names -> Python type names, as jmespath checks them (bool is not a number).
_PY_TYPES = {
    "boolean": frozenset({"bool"}),
    "array": frozenset({"list", "_Projection"}),
    "object": frozenset({"dict", "OrderedDict"}),
    "null": frozenset({"NoneType"}),
    "string": frozenset({"str"}),
    "number": frozenset({"float", "int"}),
    "expref": frozenset({"_Expression"}),
}


class _Param(NamedTuple):
    types: tuple[str, ...]  # as declared, for messages
    allowed: frozenset[str]  # Python type names; empty: anything
    element: tuple[frozenset[str], ...]  # typed arrays (array-number): the element types to choose from


class _Entry:
    """One function with its argument checks worked out once (jmespath re-derives them on every call)."""

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.fn: Callable[..., Any] = spec["function"]
        sig = spec["signature"]
        self.params = tuple(_param(arg["types"]) for arg in sig)
        if name in _MIN_ARGS:
            self.lo, self.hi = _MIN_ARGS[name], float(len(sig))
        elif sig and sig[-1].get("variadic"):
            self.lo, self.hi = len(sig), math.inf
        else:
            self.lo, self.hi = len(sig), float(len(sig))

    def call(self, funcs: Functions, args: list[Any]) -> Any:
        for value, p in zip(args, self.params, strict=False):
            if p.allowed and (type(value).__name__ not in p.allowed or p.element):
                self.check(value, p)
        return self.fn(funcs, *args)

    def check(self, value: Any, p: _Param) -> None:
        expected = " or ".join(p.types)
        if type(value).__name__ not in p.allowed:
            raise DataError(f"{self.name}() expected {expected}, got {describe(value)}")
        if not p.element or not isinstance(value, list) or not value:
            return
        first = type(value[0]).__name__
        allowed = next((e for e in p.element if first in e), frozenset())
        for item in value:
            if type(item).__name__ not in allowed:
                raise DataError(
                    f"{self.name}() expected {expected}, got an array containing {describe(item)}"
                )


def _param(types: list[str]) -> _Param:
    allowed: set[str] = set()
    element = []
    for t in types:
        outer, _, inner = t.partition("-")
        allowed |= _PY_TYPES[outer]
        if inner:
            element.append(_PY_TYPES[inner])
    return _Param(tuple(types), frozenset(allowed), tuple(element))


_ENTRIES = {name: _Entry(name, spec) for name, spec in Functions.FUNCTION_TABLE.items()}
_DEFAULT_FUNCTIONS = Functions()
FUNCTION_NAMES: tuple[str, ...] = tuple(sorted(_ENTRIES))


# -- compiling --------------------------------------------------------------------------------------


def _is_false(v: Any) -> bool:
    # JMESPath truthiness: 0 is true; empty text, arrays and objects are false.
    return v is None or v is False or v == "" or v == [] or v == {}


def is_truthy(value: Any) -> bool:
    """JMESPath truthiness (what a filter's `when` means): false, null, '', [] and {} are false."""
    return not _is_false(value)


class Expr:
    """A compiled expression; `search(data)` evaluates it against a record."""

    __slots__ = ("text", "ast", "_run")

    def __init__(self, text: str, ast: Node, functions: Functions) -> None:
        self.text = text
        self.ast = ast
        self._run = _Compiler(functions).compile(ast)

    def search(self, data: Any) -> Any:
        """Evaluate against `data`; bad data (to_int('abc')) raises RecordInvalid."""
        try:
            return self._run(data)
        except jexc.JMESPathTypeError as exc:
            msg = f"{exc.function_name}() expected {' or '.join(exc.expected_types)}, got {exc.actual_type}"
            if exc.actual_type not in ("null", "object", "array"):
                msg += f" {show(exc.current_value)}"
            raise self._invalid(msg) from exc
        except (DataError, jexc.JMESPathError) as exc:
            raise self._invalid(str(exc)) from exc
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            raise self._invalid(f"{type(exc).__name__}: {exc}") from exc

    def _invalid(self, message: str) -> RecordInvalid:
        return RecordInvalid([Violation("", f"{message} (in `{self.text}`)")], step="expression")

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


class _Compiler:
    """Turns the common node types into closures (the hot path); the rest run on jmespath's interpreter."""

    def __init__(self, functions: Functions) -> None:
        self.functions = functions
        self.interp = TreeInterpreter(Options(custom_functions=functions))

    def compile(self, node: Node) -> Callable[[Any], Any]:
        kind = node["type"]
        kids = node.get("children", [])
        if kind == "field":
            key = node["value"]
            return lambda v: v.get(key) if isinstance(v, dict) else None
        if kind in ("subexpression", "pipe"):
            if kind == "subexpression" and all(k["type"] == "field" for k in kids):
                keys = tuple(k["value"] for k in kids)

                def path(v: Any) -> Any:
                    for key in keys:
                        if not isinstance(v, dict):
                            return None
                        v = v.get(key)
                    return v

                return path
            steps = [self.compile(k) for k in kids]

            def chain(v: Any) -> Any:
                for step in steps:
                    v = step(v)
                return v

            return chain
        if kind == "literal":
            const = node["value"]
            return lambda v: const
        if kind in ("current", "identity"):
            return lambda v: v
        if kind == "or_expression":
            left, right = self.compile(kids[0]), self.compile(kids[1])

            def or_(v: Any) -> Any:
                got = left(v)
                return right(v) if _is_false(got) else got

            return or_
        if kind == "and_expression":
            left, right = self.compile(kids[0]), self.compile(kids[1])

            def and_(v: Any) -> Any:
                got = left(v)
                return got if _is_false(got) else right(v)

            return and_
        if kind == "not_expression":
            inner = self.compile(kids[0])

            def not_(v: Any) -> Any:
                got = inner(v)
                if got == 0 and isinstance(got, int | float) and not isinstance(got, bool):
                    return False  # JMESPath: !0 is false
                return not got

            return not_
        if kind == "function_expression":
            return self._function(node["value"], [self.compile(k) for k in kids])
        visit = self.interp.visit
        return lambda v: visit(node, v)

    def _function(self, name: str, args: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
        entry, funcs = _ENTRIES[name], self.functions
        if len(args) == 1:
            (arg,) = args
            return lambda v: entry.call(funcs, [arg(v)])
        return lambda v: entry.call(funcs, [a(v) for a in args])


def _walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.get("children", ()):
        if isinstance(child, dict):
            yield from _walk(child)


def _function_position(text: str, name: str) -> int:
    m = re.search(rf"(?<![\w'\"`]){re.escape(name)}\s*\(", text)
    return m.start() if m else 0


def _parse(text: str) -> Node:
    """The AST of `text`, or ExprError for a syntax error."""
    shown = text.strip()
    if not shown:
        raise ExprError("empty expression", 0)
    try:
        # The lexer accepts `text` (not JSON) with a deprecation warning; we reject it instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for token in Lexer().tokenize(text):
                if caught:
                    raise ExprError(
                        f"invalid expression `{shown}`: `{token['value']}` between backticks must be JSON;"
                        f" for text write '{token['value']}' in single quotes",
                        token["start"],
                    )
        return Parser().parse(text).parsed
    except jexc.IncompleteExpressionError:
        raise ExprError(f"invalid expression `{shown}`: incomplete expression", len(text.rstrip())) from None
    except jexc.LexerError as exc:
        pos = exc.lexer_position
        raise ExprError(f"invalid expression `{shown}`: {exc.message} at column {pos}", pos) from None
    except jexc.ParseError as exc:
        pos = exc.lex_position
        if exc.token_type == "EOF":
            raise ExprError(
                f"invalid expression `{shown}`: incomplete expression", len(text.rstrip())
            ) from None
        raise ExprError(
            f"invalid expression `{shown}`: unexpected {exc.token_value!r} at column {pos}", pos
        ) from None


def _check(text: str, ast: Node, tables: Tables | None) -> None:
    for node in _walk(ast):
        if node["type"] != "function_expression":
            continue
        name, args = node["value"], node["children"]
        pos = _function_position(text, name)
        if name not in _ENTRIES:
            close = difflib.get_close_matches(name, FUNCTION_NAMES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ExprError(f"unknown function '{name}'{hint} (functions: {', '.join(FUNCTION_NAMES)})", pos)
        entry = _ENTRIES[name]
        lo, hi = entry.lo, entry.hi
        if not lo <= len(args) <= hi:
            want = f"{lo}" if lo == hi else f"at least {lo}" if hi == math.inf else f"{lo} to {int(hi)}"
            raise ExprError(f"{name}() takes {want} argument(s), got {len(args)} (in `{text}`)", pos)
        literal = [a["value"] if a["type"] == "literal" else None for a in args]
        if name == "lookup" and isinstance(literal[0], str) and literal[0] not in (tables or {}):
            known = sorted(tables or {})
            close = difflib.get_close_matches(literal[0], known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            listed = (
                f"tables: {', '.join(known)}" if known else "no tables are defined; add them under `tables:`"
            )
            raise ExprError(f"lookup(): unknown table '{literal[0]}'{hint} ({listed})", pos)
        if name == "regex_replace" and isinstance(literal[1], str):
            try:
                re.compile(literal[1])
            except re.error as exc:
                raise ExprError(f"regex_replace(): bad pattern {literal[1]!r}: {exc}", pos) from None


def compile_expr(text: str, *, tables: Tables | None = None) -> Expr:
    """Compile a JMESPath expression once; raises ExprError on bad syntax or an unknown function.

    Args:
        tables: lookup tables that `lookup('name', key)` may refer to.
    """
    ast = _parse(text)
    _check(text, ast, tables)
    return Expr(text.strip(), ast, Functions(tables) if tables else _DEFAULT_FUNCTIONS)


_DYNAMIC = frozenset({"field", "current", "identity", "function_expression"})


def _constant_truth(node: Node, interp: TreeInterpreter) -> bool | None:
    """True/False when `node` has the same truthiness on every record, None when it depends."""
    if not any(n["type"] in _DYNAMIC for n in _walk(node)):
        try:
            return not _is_false(interp.visit(node, None))
        except (ValueError, TypeError):
            return None
    kind, kids = node["type"], node.get("children", [])
    if kind == "not_expression":
        inner = _constant_truth(kids[0], interp)
        return None if inner is None else not inner
    if kind in ("and_expression", "or_expression"):
        sides = [_constant_truth(k, interp) for k in kids]
        decisive: bool = kind == "or_expression"  # true decides an or, false decides an and
        if decisive in sides:
            return decisive
        if sides[0] is not None and sides[0] == sides[1]:
            return sides[0]
    return None


def is_constant_false(expr: Expr | str) -> bool:
    """True when the expression is false for every record (`false`, `null`, `x && false`...)."""
    if isinstance(expr, str):
        expr = compile_expr(expr)
    return _constant_truth(expr.ast, TreeInterpreter(Options(custom_functions=_DEFAULT_FUNCTIONS))) is False


# -- templates --------------------------------------------------------------------------------------


class Template:
    """A string with `{{ expr }}` placeholders, compiled once."""

    __slots__ = ("text", "_parts", "expressions")

    def __init__(self, text: str, parts: list[str | Expr]) -> None:
        self.text = text
        self._parts = parts
        self.expressions: list[Expr] = [p for p in parts if isinstance(p, Expr)]

    @property
    def is_static(self) -> bool:
        return not self.expressions

    def render(self, data: Any, quote: Callable[[str], str] | None = None) -> str:
        """Fill the placeholders from `data` (null -> ''); `quote` escapes each value (e.g. for URLs)."""
        if not self.expressions:
            return self.text
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            else:
                s = to_text(part.search(data))
                out.append(quote(s) if quote is not None and s else s)
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def render_template(text: str, *, tables: Tables | None = None) -> Template:
    """Compile a string with `{{ expr }}` placeholders; ExprError positions are columns in `text`."""
    if "{{" not in text:
        return Template(text, [text])
    parts: list[str | Expr] = []
    i = 0
    while (start := text.find("{{", i)) >= 0:
        if start > i:
            parts.append(text[i:start])
        body = start + 2
        end = text.find("}}", body)
        if end < 0:
            raise ExprError(f"unclosed placeholder at column {start}: '{{{{' without '}}}}'", start)
        first_error: ExprError | None = None
        # A `}}` may belong to the expression (`{a: {b: c}}`): try each closing `}}` until one parses.
        while end >= 0:
            inner = text[body:end]
            try:
                ast = _parse(inner)
                break
            except ExprError as exc:
                if not inner.strip():
                    raise ExprError(f"empty placeholder at column {start}", start) from None
                first_error = first_error or ExprError(exc.message, body + exc.position)
                end = text.find("}}", end + 1)
        else:
            assert first_error is not None
            raise first_error
        try:
            _check(inner, ast, tables)
        except ExprError as exc:
            raise ExprError(exc.message, body + exc.position) from None
        parts.append(Expr(inner.strip(), ast, Functions(tables) if tables else _DEFAULT_FUNCTIONS))
        i = end + 2
    if i < len(text):
        parts.append(text[i:])
    return Template(text, parts)
