"""validate: check fields against rules; an invalid record is quarantined with every reason."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from patchbay.errors import RecordInvalid, Violation
from patchbay.expressions import describe, show
from patchbay.processors.base import CheckIssue, StepConfig
from patchbay.records import dig
from patchbay.registry import step

JsonType = Literal["string", "integer", "number", "boolean", "object", "array"]
Format = Literal["email", "url", "date", "datetime", "uuid", "phone"]

_MISSING: Any = object()
# Pragmatic: something@label.label.tld, no spaces, a 2+ character TLD; no DNS.
_EMAIL = re.compile(r"[^@\s]+@(?:[^@\s.]+\.)+[^@\s.]{2,}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_PHONE = re.compile(r"\+?[0-9 ().\-]{7,25}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}.*")


def _is_url(s: str) -> bool:
    try:
        parts = urlsplit(s)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in s)


def _is_date(s: str) -> bool:
    try:
        return bool(_DATE.fullmatch(s)) and bool(date.fromisoformat(s))
    except ValueError:
        return False


def _is_datetime(s: str) -> bool:
    try:
        return bool(_DATETIME.fullmatch(s)) and bool(datetime.fromisoformat(s))
    except ValueError:
        return False


def _is_phone(s: str) -> bool:
    return bool(_PHONE.fullmatch(s)) and 7 <= sum(c.isdigit() for c in s) <= 15


FORMATS: dict[str, tuple[Callable[[str], bool], str]] = {
    "email": (lambda s: bool(_EMAIL.fullmatch(s)), "email address"),
    "url": (_is_url, "http(s) URL"),
    "date": (_is_date, "date (YYYY-MM-DD)"),
    "datetime": (_is_datetime, "date-time (ISO 8601, e.g. 2024-01-31T09:30:00Z)"),
    "uuid": (lambda s: bool(_UUID.fullmatch(s)), "UUID"),
    "phone": (_is_phone, "phone number"),
}


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    # Not a private attribute of the model: pydantic's __getattr__ for those costs more than the check.
    return re.compile(pattern)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: _is_number(v) and (isinstance(v, int) or v.is_integer()),
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python, not in JSON
        return type(a) is type(b) and a == b
    return bool(a == b)


def _num(n: int | float) -> str:
    return str(int(n)) if isinstance(n, float) and n.is_integer() else str(n)


class FieldRules(StepConfig):
    """Rules for one field. A missing or null field passes every rule unless required (or not_empty)."""

    required: bool = Field(False, description="The field must be present and not null.")
    type: JsonType | None = Field(
        None,
        description="Expected JSON type: string, integer, number, boolean, object or array (no conversion).",
    )
    format: Format | None = Field(
        None,
        description=(
            "Text format: email (name@domain.tld, no DNS lookup), url (http/https), date (YYYY-MM-DD),"
            " datetime (ISO 8601), uuid, phone (7 to 15 digits; +, spaces, dashes, dots, brackets allowed)."
        ),
    )
    one_of: list[Any] | None = Field(None, description="Accepted values; anything else is invalid.")
    pattern: str | None = Field(
        None,
        description="Regular expression (Python syntax) found anywhere in the text; anchor it with ^...$.",
        examples=["^[A-Z]{2}$"],
    )
    min_length: int | None = Field(
        None, ge=0, description="Fewest characters (text) or items (array/object)."
    )
    max_length: int | None = Field(None, ge=0, description="Most characters (text) or items (array/object).")
    minimum: int | float | None = Field(None, description="Smallest accepted number (inclusive).")
    maximum: int | float | None = Field(None, description="Largest accepted number (inclusive).")
    not_empty: bool = Field(
        False, description="The field must be present and not blank text, an empty array or an empty object."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return pattern

    def problems(self, value: Any) -> list[str]:
        """Why `value` breaks these rules (empty when it passes); `value` may be MISSING."""
        if value is _MISSING or value is None:
            if self.required or self.not_empty:
                return ["required but missing" if value is _MISSING else "required but null"]
            return []
        if self.type is not None and not TYPES[self.type](value):
            return [f"expected {self.type}, got {describe(value)}"]
        out: list[str] = []
        if self.format is not None or self.pattern is not None:
            if not isinstance(value, str):
                out.append(f"expected string, got {describe(value)}")
            else:
                if self.format is not None:
                    ok, name = FORMATS[self.format]
                    if not ok(value):
                        out.append(f"{show(value)} is not a valid {name}")
                if self.pattern is not None and not _compiled(self.pattern).search(value):
                    out.append(f"{show(value)} does not match the pattern {self.pattern}")
        if self.min_length is not None or self.max_length is not None:
            out.extend(self._length(value))
        if self.minimum is not None or self.maximum is not None:
            if not _is_number(value):
                out.append(f"expected number, got {describe(value)}")
            elif self.minimum is not None and value < self.minimum:
                out.append(f"{_num(value)} is less than the minimum {_num(self.minimum)}")
            elif self.maximum is not None and value > self.maximum:
                out.append(f"{_num(value)} is more than the maximum {_num(self.maximum)}")
        if self.one_of is not None and not any(_same(value, ok) for ok in self.one_of):
            accepted = ", ".join(v if isinstance(v, str) else show(v) for v in self.one_of)
            out.append(f"{show(value)} is not one of {accepted}")
        if (
            self.not_empty
            and isinstance(value, str | list | dict)
            and not (value.strip() if isinstance(value, str) else value)
        ):
            out.append("must not be empty")
        return out

    def _length(self, value: Any) -> list[str]:
        if isinstance(value, str):
            n, unit, what = len(value), "characters", show(value)
        elif isinstance(value, list | dict):
            n, unit, what = (
                len(value),
                "items",
                f"{'array' if isinstance(value, list) else 'object'} of {len(value)}",
            )
        else:
            return [f"expected string or array, got {describe(value)}"]
        if self.min_length is not None and n < self.min_length:
            return [f"{what} is shorter than {self.min_length} {unit}"]
        if self.max_length is not None and n > self.max_length:
            return [f"{what} is longer than {self.max_length} {unit}"]
        return []


class ValidateConfig(StepConfig):
    """Each key is a dotted field path (`properties.email`, `items.0.sku`) and its value the rules."""

    model_config = {"extra": "allow"}
    __pydantic_extra__: dict[str, FieldRules] = Field(init=False)

    @property
    def rules(self) -> dict[str, FieldRules]:
        return dict(self.__pydantic_extra__ or {})

    @model_validator(mode="after")
    def _paths(self) -> ValidateConfig:
        for path in self.rules:
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"bad field path {path!r}: use dotted names like properties.email")
        return self


@step("validate", config=ValidateConfig)
class ValidateStep:
    """Check required fields, types, formats, accepted values, lengths and ranges."""

    def __init__(self, config: ValidateConfig) -> None:
        self.config = config
        self._rules = list(config.rules.items())

    def apply(self, record: Any) -> Any:
        """The record unchanged, or RecordInvalid listing every rule it breaks."""
        violations = [
            Violation(path, message)
            for path, rules in self._rules
            for message in rules.problems(dig(record, path, _MISSING))
        ]
        if violations:
            raise RecordInvalid(violations, step="validate")
        return record

    @classmethod
    def check(cls, config: ValidateConfig) -> Iterator[CheckIssue]:
        """Rules no value can pass."""
        if not config.rules:
            yield CheckIssue((), "validate has no rules: list field paths with their rules")
        for path, r in config.rules.items():
            if r.min_length is not None and r.max_length is not None and r.min_length > r.max_length:
                yield CheckIssue((path, "min_length"), "min_length is greater than max_length")
            if r.minimum is not None and r.maximum is not None and r.minimum > r.maximum:
                yield CheckIssue((path, "minimum"), "minimum is greater than maximum")
            if r.type not in (None, "string"):
                for key in ("format", "pattern"):
                    if getattr(r, key) is not None:
                        yield CheckIssue((path, key), f"{key} applies to text but type is {r.type}")
            if r.one_of is not None:
                if not r.one_of:
                    yield CheckIssue((path, "one_of"), "one_of is empty: no value can pass")
                elif r.type is not None and not any(TYPES[r.type](v) for v in r.one_of):
                    yield CheckIssue((path, "one_of"), f"none of the accepted values is of type {r.type}")
