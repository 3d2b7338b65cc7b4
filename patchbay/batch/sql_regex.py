"""Python regular expressions as PostgreSQL AREs that never match more, for pushed-down `pattern` rules."""

from __future__ import annotations

import re

# What Python's \s matches among ASCII characters, as ARE escapes (\u takes exactly 4 digits).
WS_CLASS = " \\t\\n\\r\\u000b\\u000c\\u001c-\\u001f"


class NotPushable(Exception):
    """Why a field or rule stays in Python."""


_REGEX_ESCAPES = {"d": "0-9", "w": "A-Za-z0-9_", "s": WS_CLASS}
_META = set(".^$*+?{}[]\\|()")


def translate_regex(pattern: str) -> str:
    """A Python regex as a PostgreSQL ARE that matches no string the Python one does not match, on ASCII text.

    Only a plain subset is taken (literals, escapes, classes, quantifiers, groups, alternation, ^ $);
    `.` becomes [^\\n] (Python's does not match a newline), and `$` (which in Python also matches before a
    final newline) becomes the end of the text: stricter, so such a row takes the Python path."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ord(ch) > 127 or ch == "\x00":
            raise NotPushable("a pattern with non-ASCII characters")
        if ch == "\\":
            i += 1
            if i >= n:
                raise NotPushable("a pattern ending in \\")
            e = pattern[i]
            if e in _REGEX_ESCAPES:
                out.append(f"[{_REGEX_ESCAPES[e]}]")
            elif e in _META or e in "-/#&~'\"!@%,;:=<> ":
                out.append("\\" + e if e in _META else e)
            else:
                raise NotPushable(f"the pattern escape \\{e}")
        elif ch == "[":
            j, cls = _regex_class(pattern, i + 1)
            out.append(cls)
            i = j
            continue
        elif ch == "(":
            if pattern.startswith("(?:", i):
                out.append("(?:")
                i += 3
                continue
            if pattern.startswith("(?", i):
                raise NotPushable("a pattern with (?...) groups or flags")
            out.append("(")
        elif ch == "{":
            m = re.match(r"\{(\d+)(,(\d*))?\}", pattern[i:])
            if m is None:
                raise NotPushable("a pattern with a literal {")
            out.append(m.group(0))
            i += len(m.group(0))
            if i < n and pattern[i] in "?+":
                if pattern[i] == "+":
                    raise NotPushable("a possessive quantifier")
                i += 1  # lazy or greedy: the same strings match
            continue
        elif ch == ".":
            out.append("[^\\n]")
        elif ch in "*+?":
            out.append(ch)
            if i + 1 < n and pattern[i + 1] in "?+":
                if pattern[i + 1] == "+":
                    raise NotPushable("a possessive quantifier")
                i += 1
        elif ch in "^$|)":
            out.append(ch)
        elif ch.isalnum() or ch in "-_/#&~'\"!@%,;:=<> ":
            out.append(ch)
        else:
            raise NotPushable(f"the pattern character {ch!r}")
        i += 1
    return "".join(out)


def _regex_class(pattern: str, i: int) -> tuple[int, str]:
    """A [...] class from index i (after the '['): (index after the ']', the ARE class)."""
    out = ["["]
    n = len(pattern)
    if i < n and pattern[i] == "^":
        out.append("^")
        i += 1
    first = True
    while i < n:
        ch = pattern[i]
        if ch == "]" and not first:
            out.append("]")
            return i + 1, "".join(out)
        first = False
        if ord(ch) > 127 or ch == "\x00":
            raise NotPushable("a pattern with non-ASCII characters")
        if ch == "\\":
            i += 1
            if i >= n:
                break
            e = pattern[i]
            if e in _REGEX_ESCAPES:
                out.append(_REGEX_ESCAPES[e])
            elif e in "\\]-^[":
                out.append("\\" + e)
            elif e in ".$*+?{}()|/#&~'\"!@%,;:=<> ":
                out.append(e)
            else:
                raise NotPushable(f"the pattern escape \\{e} in a class")
        elif ch == "[":
            raise NotPushable("a [ inside a class")
        elif ch == "]":
            out.append("\\]")
        else:
            out.append(ch)
        i += 1
    raise NotPushable("an unclosed [ in the pattern")
