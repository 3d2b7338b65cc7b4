"""Conversions between the JSON values records hold: text, numbers, booleans, dates; short renderings for messages."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Any


class DataError(ValueError):
    """Raised by a conversion or a function on data it cannot handle; Expr.search turns it into RecordInvalid."""


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
