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
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from patchbay.errors import PatchbayError

__all__ = [
    "SCHEMA",
    "SCOPES",
    "TOKEN_PREFIX",
    "TokenError",
    "TokenInfo",
    "check_scopes",
    "ensure_schema",
    "normalise_id",
    "parse_bearer",
    "q_token",
    "q_tokens",
    "tx_create_token",
    "tx_revoke_token",
    "tx_touch",
    "verify",
]

TOKEN_PREFIX = "pbt_"
ID_HEX = 12
SCOPES: dict[str, str] = {
    "flows:read": "Read systems, flows, the map, destinations, schedules and cursors.",
    "runs:read": "Read runs, traces, dead letters and counts.",
    "runs:replay": "Replay or discard dead letters and quarantined events; reset a source cursor.",
    "destinations:write": "Pause and resume destinations; resume a paused or stopped source.",
    "secrets:read": "List secret names and which flows use them (never values).",
    "secrets:write": "Set, rotate and delete secrets.",
    "admin": "Everything, including tokens and the audit log.",
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_TOKEN_RE = re.compile(r"^pbt_([0-9a-f]{12})_([A-Za-z0-9_\-]{20,200})$")
_DUMMY = hashlib.sha256(b"patchbay: no such token").hexdigest()

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens(
  id TEXT PRIMARY KEY,             -- 12 hex digits; the token is pbt_<id>_<secret>
  name TEXT NOT NULL,
  secret_sha256 TEXT NOT NULL,     -- hex SHA-256 of <secret>; the plaintext is never stored
  scopes TEXT NOT NULL,            -- JSON list
  created_at REAL NOT NULL,
  created_by TEXT NOT NULL DEFAULT '',
  expires_at REAL,
  last_used_at REAL,
  revoked_at REAL
);
"""


class TokenError(PatchbayError):
    """A presented token was refused; `code` is the API's error code, the message says how to fix it."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class TokenInfo:
    """Everything about a token but its secret."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    created_by: str
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None

    def allows(self, scope: str | None) -> bool:
        return scope is None or "admin" in self.scopes or scope in self.scopes

    def status(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (time.time() if now is None else now):
            return "expired"
        return "active"

    @property
    def actor(self) -> str:
        """How the audit log names whoever used this token."""
        return f"token {self.id} ({self.name})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "last_used_at": self.last_used_at,
            "revoked_at": self.revoked_at,
            "status": self.status(),
        }


def ensure_schema(conn: sqlite3.Connection) -> None:
    conn.execute(SCHEMA)


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


def _row(r: Any) -> TokenInfo:
    return TokenInfo(
        r["id"],
        r["name"],
        tuple(orjson.loads(r["scopes"])),
        r["created_at"],
        r["created_by"],
        r["expires_at"],
        r["last_used_at"],
        r["revoked_at"],
    )


def _rows(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[TokenInfo]:
    conn.row_factory = sqlite3.Row
    return [_row(r) for r in conn.execute(sql, args)]


def tx_create_token(
    conn: sqlite3.Connection, name: str, scopes: Iterable[str], expires_at: float | None, created_by: str = ""
) -> tuple[str, TokenInfo]:
    """A new token: returns its plaintext (show it once) and what is stored about it."""
    if not NAME_RE.match(name):
        raise ValueError(f"bad token name {name!r}: 1-64 letters, digits, '_', '-', '.'")
    scopes = check_scopes(scopes)
    ensure_schema(conn)
    secret = _random.token_urlsafe(32)
    for _ in range(5):  # 48-bit ids: a clash is astronomically rare, but never overwrite
        tid = _random.token_hex(ID_HEX // 2)
        if conn.execute("SELECT 1 FROM api_tokens WHERE id=?", (tid,)).fetchone() is None:
            break
    now = time.time()
    conn.execute(
        "INSERT INTO api_tokens(id, name, secret_sha256, scopes, created_at, created_by, expires_at)"
        " VALUES(?,?,?,?,?,?,?)",
        (tid, name, _hash(secret), orjson.dumps(list(scopes)).decode(), now, created_by, expires_at),
    )
    info = TokenInfo(tid, name, scopes, now, created_by, expires_at, None, None)
    return f"{TOKEN_PREFIX}{tid}_{secret}", info


def normalise_id(value: str) -> str:
    """A token id from `ID`, `pbt_ID` or a whole token."""
    v = value.strip()
    m = _TOKEN_RE.match(v)
    if m:
        return m.group(1)
    return v.removeprefix(TOKEN_PREFIX)


def q_tokens(conn: sqlite3.Connection, include_inactive: bool = True) -> list[TokenInfo]:
    ensure_schema(conn)
    rows = _rows(conn, "SELECT * FROM api_tokens ORDER BY created_at, id")
    return rows if include_inactive else [t for t in rows if t.status() == "active"]


def q_token(conn: sqlite3.Connection, token_id: str) -> TokenInfo | None:
    rows = _rows(conn, "SELECT * FROM api_tokens WHERE id=?", (normalise_id(token_id),))
    return rows[0] if rows else None


def tx_revoke_token(conn: sqlite3.Connection, token_id: str) -> TokenInfo | None:
    """Revoke; None if there is no such token. Revoking twice keeps the first time."""
    ensure_schema(conn)
    tid = normalise_id(token_id)
    conn.execute("UPDATE api_tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (time.time(), tid))
    return q_token(conn, tid)


def tx_touch(conn: sqlite3.Connection, token_id: str, at: float) -> None:
    conn.execute("UPDATE api_tokens SET last_used_at=? WHERE id=?", (at, token_id))


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


def verify(conn: sqlite3.Connection, presented: str, now: float | None = None) -> TokenInfo:
    """The token's record, or TokenError: bad_token, revoked_token or expired_token."""
    now = time.time() if now is None else now
    m = _TOKEN_RE.match(presented)
    if m is None:
        raise TokenError("bad_token", "not a Patchbay token: they look like pbt_<12 hex digits>_<secret>")
    tid, secret = m.groups()
    conn.row_factory = sqlite3.Row
    row = conn.execute("SELECT * FROM api_tokens WHERE id=?", (tid,)).fetchone()
    stored = row["secret_sha256"] if row is not None else _DUMMY
    if not hmac.compare_digest(_hash(secret), stored) or row is None:
        raise TokenError("bad_token", "unknown or wrong token")
    info = _row(row)
    status = info.status(now)
    if status == "revoked":
        raise TokenError("revoked_token", f"token {tid} ({info.name}) was revoked; ask an admin for another")
    if status == "expired":
        raise TokenError("expired_token", f"token {tid} ({info.name}) has expired; ask an admin for another")
    return info
