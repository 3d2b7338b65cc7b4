"""Scoped API tokens: `pbt_<id>_<secret>`, looked up by id, stored as the SHA-256 of the secret.

The secret part is 32 random bytes, so one SHA-256 is enough (no password stretching needed);
the comparison is constant-time and an unknown id costs the same hash as a known one. The
plaintext is shown once, at creation, and never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets as _random
import time
from collections.abc import Iterable

from patchbay.errors import PatchbayError
from patchbay.store.base import Actor, Store, TokenInfo

__all__ = [
    "SCOPES",
    "TOKEN_PREFIX",
    "TokenError",
    "TokenInfo",
    "check_scopes",
    "create_token",
    "normalise_id",
    "parse_bearer",
    "revoke_token",
    "verify",
]

TOKEN_PREFIX = "pbt_"
SCOPES: dict[str, str] = {
    "flows:read": "Read systems, flows, the map, destinations, schedules, cursors and the cluster's nodes.",
    "runs:read": "Read runs, traces, dead letters and counts.",
    "runs:replay": "Replay or discard dead letters and quarantined events; reset a source cursor.",
    "runs:start": "Start a run: a batch flow's sync now, or an event into a `manual: true` flow.",
    "destinations:write": "Pause and resume destinations; resume a paused or stopped source.",
    "secrets:read": "List secret names and which flows use them (never values).",
    "secrets:write": "Set, rotate and delete secrets.",
    "identities:read": "Read entities, identities across systems, conflicts and the review queue.",
    "identities:write": "Resolve conflicts and decide reviews (written to the systems; audited).",
    "admin": "Everything, including tokens and the audit log.",
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_TOKEN_RE = re.compile(r"^pbt_([0-9a-f]{12})_([A-Za-z0-9_\-]{20,200})$")
_DUMMY = hashlib.sha256(b"patchbay: no such token").hexdigest()


class TokenError(PatchbayError):
    """A presented token was refused; `code` is the API's error code, the message says how to fix it."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes, deduplicated in a stable order; ValueError naming an unknown one and the known ones."""
    out: list[str] = []
    for s in scopes:
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s!r}; scopes are: {', '.join(SCOPES)}")
        if s not in out:
            out.append(s)
    if not out:
        raise ValueError(f"give at least one scope: {', '.join(SCOPES)}")
    return tuple(out)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_token(
    store: Store, name: str, scopes: Iterable[str], expires_at: float | None, by: Actor
) -> tuple[str, TokenInfo]:
    """A new token, audited: returns its plaintext (show it once) and what is stored about it."""
    if not NAME_RE.match(name):
        raise ValueError(f"bad token name {name!r}: 1-64 letters, digits, '_', '-', '.'")
    checked = check_scopes(scopes)
    secret = _random.token_urlsafe(32)
    info = await store.create_token(name, checked, expires_at, _hash(secret), by)
    return f"{TOKEN_PREFIX}{info.id}_{secret}", info


async def revoke_token(store: Store, token_id: str, by: Actor | None = None) -> TokenInfo | None:
    """Revoke by id (`ID`, `pbt_ID` or the whole token); None if there is no such token."""
    return await store.revoke_token(normalise_id(token_id), by)


def normalise_id(value: str) -> str:
    """A token id from `ID`, `pbt_ID` or a whole token."""
    v = value.strip()
    m = _TOKEN_RE.match(v)
    if m:
        return m.group(1)
    return v.removeprefix(TOKEN_PREFIX)


def parse_bearer(header: str | None) -> str:
    """The token in an `Authorization: Bearer pbt_...` header."""
    if not header:
        raise TokenError(
            "missing_token",
            "this endpoint needs a token: send `Authorization: Bearer pbt_...` "
            "(create one with `patchbay tokens create NAME --scope ...`)",
        )
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise TokenError("bad_token", "expected `Authorization: Bearer pbt_...`")
    return value.strip()


async def verify(store: Store, presented: str, now: float | None = None) -> TokenInfo:
    """The token's record, or TokenError: bad_token, revoked_token or expired_token."""
    now = time.time() if now is None else now
    m = _TOKEN_RE.match(presented)
    if m is None:
        raise TokenError("bad_token", "not a Patchbay token: they look like pbt_<12 hex digits>_<secret>")
    tid, secret = m.groups()
    found = await store.token_secret(tid)
    stored = found[1] if found is not None else _DUMMY
    if not hmac.compare_digest(_hash(secret), stored) or found is None:
        raise TokenError("bad_token", "unknown or wrong token")
    info = found[0]
    status = info.status(now)
    if status == "revoked":
        raise TokenError("revoked_token", f"token {tid} ({info.name}) was revoked; ask an admin for another")
    if status == "expired":
        raise TokenError("expired_token", f"token {tid} ({info.name}) has expired; ask an admin for another")
    return info
