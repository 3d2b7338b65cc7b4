"""What counts as true: one rule for `filter`, a step's or a destination's `when`, and `&&`, `||`, `!`."""

from __future__ import annotations

from typing import Any


def is_false(v: Any) -> bool:
    """JMESPath falsiness: false, null, '', [] and {} are false; every number, 0 included, is true."""
    return v is None or v is False or (isinstance(v, str | list | dict) and not v)


def is_truthy(value: Any) -> bool:
    """The one truthiness rule (JMESPath's): false, null, '', [] and {} are false; 0 is true.

    It is the rule of the language's own `&&`, `||`, `!` and `[?...]`, so `when: count` and
    `when: count && true` always agree, and `count` and `!count` are never both false.
    """
    return not (value is None or value is False or (isinstance(value, str | list | dict) and not value))
