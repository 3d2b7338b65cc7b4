"""Hiding a flow's sensitive fields (`sensitive: [card.number]`) wherever a record is shown.

Two passes: by path (the field itself becomes [redacted]) and by value (the same value inside
any text, e.g. a validation message or a response the remote echoed back, becomes [redacted]).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

from patchbay.records import dig, has_path, put

REDACTED = "[redacted]"
MIN_VALUE_CHARS = 3  # shorter values (a flag, a digit) would blank out unrelated text
# A sensitive value encrypted at rest (security/fields.py): key id, then base64url of nonce + ciphertext.
SEALED_RE = re.compile(r"\[\[pb-sealed:([0-9a-f]{8}):([A-Za-z0-9_-]+)\]\]")


def redact_paths(record: Any, paths: Iterable[str]) -> Any:
    """A copy of `record` with each of `paths` that exists replaced by [redacted]."""
    paths = list(paths)
    if not paths or not isinstance(record, dict):
        return record
    out = copy.deepcopy(record)
    for path in paths:
        if has_path(out, path):
            put(out, path, REDACTED)
    return out


def sensitive_values(record: Any, paths: Iterable[str]) -> set[str]:
    """The scalar values at `paths` in `record` (every leaf, when a path names an object or array)."""
    found: set[str] = set()

    def leaves(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                leaves(x)
        elif isinstance(v, list):
            for x in v:
                leaves(x)
        elif isinstance(v, str | int | float) and not isinstance(v, bool):
            text = str(v)
            if len(text) >= MIN_VALUE_CHARS and text != REDACTED:
                found.add(text)

    if isinstance(record, dict):
        for path in paths:
            v = dig(record, path)
            if v is not None:
                leaves(v)
    return found


class Scrubber:
    """Replaces known sensitive values wherever they appear in strings, and equal scalars, recursively;
    values encrypted at rest (sealed tokens) are shown as [redacted] too."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = frozenset(values)
        needles = [re.escape(v) for v in sorted(self.values, key=len, reverse=True)]
        self._re = re.compile("|".join([*needles, SEALED_RE.pattern])) if needles else SEALED_RE

    def __bool__(self) -> bool:
        return bool(self.values)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._re.sub(REDACTED, value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, int | float) and not isinstance(value, bool) and str(value) in self.values:
            return REDACTED
        return value
