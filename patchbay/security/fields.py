"""A flow's sensitive fields encrypted at rest: sealed in the stored payload and requests, opened to send or replay.

With `encrypt_sensitive: true`, every value at a flow's `sensitive` paths is replaced, wherever it
occurs in the stored payload and in each rendered request (a JSON field, a substring of a body, a
URL or a header, plain, JSON-escaped or percent-encoded), by a token
`[[pb-sealed:<key id>:<base64url of nonce + AES-256-GCM ciphertext>]]`. A token holds the exact
text (or JSON scalar) it replaced, so opening gives back the request byte for byte.

The field key is a random 256-bit key kept in the vault as the secret `patchbay.fields-key`, so it
is encrypted under the master key: rotating the master key re-encrypts that one secret and every
sealed row stays readable. Deleting the secret makes every sealed value unreadable.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from patchbay.errors import PatchbayError
from patchbay.security.redaction import SEALED_RE
from patchbay.security.secrets import literal_forms
from patchbay.security.vault import Vault

__all__ = ["KEY_SECRET", "MARKER", "FieldCipher", "FieldError"]

KEY_SECRET = "patchbay.fields-key"
MARKER = "[[pb-sealed:"
_AD = b"patchbay sensitive field v1"
_NONCE = 12


class FieldError(PatchbayError):
    """A sealed value could not be opened; the message names the key id, never a value."""


class FieldCipher:
    """Seals and opens sensitive values under the project's field key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.id = hashlib.sha256(key).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"FieldCipher(id={self.id!r})"

    @classmethod
    def from_vault(cls, vault: Vault, *, create: bool) -> FieldCipher | None:
        """The project's cipher; with `create`, the field key is generated the first time it is needed."""
        text = vault.get(KEY_SECRET)
        if text is None:
            if not create:
                return None
            text = vault.setdefault(KEY_SECRET, base64.urlsafe_b64encode(os.urandom(32)).decode())
        return cls(base64.urlsafe_b64decode(text))

    # -- sealing ------------------------------------------------------------------------------
    def seal(self, value: Any, secrets: Iterable[str]) -> Any:
        """A copy of `value` (JSON-shaped) with every occurrence of each of `secrets` sealed."""
        forms = {f for s in secrets for f in literal_forms(s, min_chars=1)}
        if not forms:
            return value
        secret_set = set(secrets)
        pattern = re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                return pattern.sub(lambda m: self._token(m.group()), v)
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, int | float) and not isinstance(v, bool) and str(v) in secret_set:
                return self._token(v)  # opened back to the number it was
            return v

        return walk(value)

    def _token(self, plain: Any) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, orjson.dumps(plain), _AD)
        return f"{MARKER}{self.id}:{base64.urlsafe_b64encode(nonce + sealed).decode().rstrip('=')}]]"

    # -- opening ------------------------------------------------------------------------------
    def open(self, value: Any) -> tuple[Any, set[str]]:
        """`value` with every token replaced by what it sealed, and the set of those plain values
        (to scrub them from whatever a remote answers)."""
        revealed: set[str] = set()

        def plain(m: re.Match[str]) -> Any:
            v = self._reveal(m)
            revealed.add(v if isinstance(v, str) else orjson.dumps(v).decode())
            return v

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                if MARKER not in v:
                    return v
                whole = SEALED_RE.fullmatch(v)
                if whole is not None:
                    return plain(whole)
                return SEALED_RE.sub(lambda m: _text(plain(m)), v)
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list):
                return [walk(x) for x in v]
            return v

        return walk(value), revealed

    def _reveal(self, m: re.Match[str]) -> Any:
        key_id, data = m.group(1), m.group(2)
        if key_id != self.id:
            raise FieldError(
                f"opening an encrypted sensitive field: it was sealed with field key {key_id}, but the "
                f"vault's secret {KEY_SECRET} is key {self.id}; restore the store's vault or a backup of it"
            )
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        try:
            return orjson.loads(self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], _AD))
        except (InvalidTag, ValueError):
            raise FieldError(
                f"opening an encrypted sensitive field: decryption with field key {key_id} failed: "
                "the stored row was altered"
            ) from None


def _text(v: Any) -> str:
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def open_field_cipher(vault: Vault | None, *, needed_by: list[str]) -> FieldCipher | None:
    """The project's cipher: created when a flow (named in `needed_by`) encrypts its sensitive fields,
    else loaded only if one exists (rows sealed earlier stay readable after a flow stops encrypting)."""
    if vault is None:
        if needed_by:
            raise PatchbayError(
                f"flow {needed_by[0]} sets encrypt_sensitive, which keeps its field key in the vault, "
                "but this project has no master key: run `patchbay secrets init` or set $PATCHBAY_MASTER_KEY"
            )
        return None
    return FieldCipher.from_vault(vault, create=bool(needed_by))
