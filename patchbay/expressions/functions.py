"""The expression language's functions: JMESPath's built-ins plus Patchbay's, with argument checks worked out once."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from jmespath import exceptions as jexc
from jmespath import functions as jfn

from patchbay.expressions.conversions import (
    DataError,
    describe,
    iso,
    parse_datetime,
    show,
    to_bool,
    to_float,
    to_int,
    to_text,
)

Tables = Mapping[str, Mapping[str, Any]]

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
        entry = ENTRIES.get(function_name)
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


ENTRIES = {name: _Entry(name, spec) for name, spec in Functions.FUNCTION_TABLE.items()}
DEFAULT_FUNCTIONS = Functions()
FUNCTION_NAMES: tuple[str, ...] = tuple(sorted(ENTRIES))
