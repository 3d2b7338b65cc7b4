"""Resolving secret references (vault first, then environment) and scrubbing their values from text."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

from patchbay.config.models import SecretRef
from patchbay.errors import SecretMissing

ENV_PREFIX = "PATCHBAY_SECRET_"


def env_name(secret: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", secret).upper()


class SecretResolver:
    """Looks references up; remembers every value it hands out so the redactor can hide them."""

    def __init__(
        self, vault_get: Callable[[str], str | None] | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self._vault_get = vault_get
        self._env = os.environ if env is None else env
        self.redactor = Redactor()

    def lookup(self, ref: SecretRef) -> str | None:
        if ref.env:
            return self._env.get(ref.env)
        assert ref.secret is not None
        value = self._vault_get(ref.secret) if self._vault_get else None
        if value is None:
            value = self._env.get(env_name(ref.secret))
        return value

    def exists(self, ref: SecretRef) -> bool:
        return self.lookup(ref) is not None

    def resolve(self, ref: SecretRef) -> str:
        value = self.lookup(ref)
        if value is None:
            hint = f"patchbay secrets set {ref.secret}" if ref.secret else f"export {ref.env}=..."
            raise SecretMissing(ref.label, hint)
        self.redactor.add(value)
        return value

    def scoped(self, allowed: Iterable[SecretRef]) -> Callable[[SecretRef | None], str]:
        """A resolver that only answers for the references a flow or system declared."""
        allowed_labels = {r.label for r in allowed}

        def get(ref: SecretRef | None) -> str:
            if ref is None or ref.label not in allowed_labels:
                raise SecretMissing(ref.label if ref else "?", "not declared by this flow's systems")
            return self.resolve(ref)

        return get


class Redactor:
    """Replaces every known secret value, and the forms it takes on the wire, in a text with [secret].

    A secret reaches a log line or a response excerpt in more forms than its plain text: a remote
    echoes `Authorization: Basic base64(user:password)`, puts it in a URL (percent-encoded) or quotes
    it in JSON (escaped). Each added value therefore contributes

    - literal forms: plain, JSON-escaped (ASCII or not, with `\\/` or `/`), percent-encoded (`quote`,
      `quote_plus`, upper- and lower-case hex);
    - base64 cores: the characters that are the same in the base64 (standard or URL-safe) of ANY text
      holding the value, one per alignment of the value in 3-byte groups. A match of a core is widened
      to the whole base64 token around it, so `base64(user:password)`, padded or not, is replaced whole
      and no edge character leaks bits of the value.
    """

    MASK = "[secret]"
    MIN_CHARS = 4  # shorter values (a digit, "true") would blank out unrelated text

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._literals: set[str] = set()
        self._cores: set[str] = set()
        self._re: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value) < self.MIN_CHARS or value in self._values:
            return
        self._values.add(value)
        self._literals |= literal_forms(value)
        self._cores |= base64_cores(value.encode()) - self._literals
        needles = sorted(self._literals | self._cores, key=len, reverse=True)
        # Built whole and swapped in one assignment: a reader in another thread sees old or new.
        self._re = re.compile("|".join(re.escape(v) for v in needles))

    def __call__(self, text: str) -> str:
        pattern = self._re
        if pattern is None or not text:
            return text
        out: list[str] = []
        pos = 0
        for m in pattern.finditer(text):
            start, end = m.span()
            if end <= pos:
                continue  # inside a base64 token already replaced
            if m.group() in self._cores:
                start, end = _token_span(text, max(start, pos), end, pos)
            out.append(text[pos:start])
            out.append(self.MASK)
            pos = end
        if not out:
            return text
        out.append(text[pos:])
        return "".join(out)


_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_%")
_TO_URLSAFE = str.maketrans("+/", "-_")


def _token_span(text: str, start: int, end: int, floor: int) -> tuple[int, int]:
    """The base64 token (and its `=` padding, plain or `%3D`) that holds text[start:end]."""
    while start > floor and text[start - 1] in _B64_CHARS:
        start -= 1
    n = len(text)
    while end < n and text[end] in _B64_CHARS:
        end += 1
    while end < n and text[end] == "=":
        end += 1
    return start, end


def literal_forms(value: str, min_chars: int = 4) -> set[str]:
    """`value` as written plainly, JSON-escaped and percent-encoded (forms shorter than `min_chars` left out)."""
    import json
    from urllib.parse import quote, quote_plus

    forms = {value}
    for ascii_only in (True, False):
        escaped = json.dumps(value, ensure_ascii=ascii_only)[1:-1]
        forms |= {escaped, escaped.replace("/", "\\/")}
    for encoded in (quote(value, safe=""), quote(value), quote_plus(value, safe="")):
        forms |= {encoded, re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)}
    return {f for f in forms if len(f) >= min_chars}


def base64_cores(raw: bytes) -> set[str]:
    """For each of the 3 offsets `raw` can start at in a 3-byte group, the base64 characters made
    only of bits of `raw`: a substring of the base64 of any text that holds `raw` at that offset."""
    import base64

    cores: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw).decode()
        first = -(-8 * offset // 6)  # the first character whose 6 bits all come from `raw`
        last = 8 * (offset + len(raw)) // 6  # one past the last such character
        core = encoded[first:last]
        if len(core) >= Redactor.MIN_CHARS:
            cores |= {core, core.translate(_TO_URLSAFE)}
    return cores
