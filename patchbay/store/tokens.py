"""API tokens and the audit log in the SQLite store (the secrets' hashes only; `security/tokens.py` makes them)."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from patchbay.store.base import Actor, AuditFilter, TokenInfo
from patchbay.store.common import tx_audit

ID_HEX = 12  # a token is pbt_<id>_<secret>; the id is 12 hex digits


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


def tx_create_token(
    conn: sqlite3.Connection,
    name: str,
    scopes: Sequence[str],
    expires_at: float | None,
    secret_sha256: str,
    by: Actor,
    now: float,
) -> TokenInfo:
    for _ in range(5):  # 48-bit ids: a clash is astronomically rare, but never overwrite
        tid = secrets.token_hex(ID_HEX // 2)
        if conn.execute("SELECT 1 FROM api_tokens WHERE id=?", (tid,)).fetchone() is None:
            break
    conn.execute(
        "INSERT INTO api_tokens(id, name, secret_sha256, scopes, created_at, created_by, expires_at)"
        " VALUES(?,?,?,?,?,?,?)",
        (tid, name, secret_sha256, orjson.dumps(list(scopes)).decode(), now, by.name, expires_at),
    )
    info = TokenInfo(tid, name, tuple(scopes), now, by.name, expires_at, None, None)
    detail = {**by.detail, "name": name, "scopes": list(scopes), "expires_at": expires_at}
    tx_audit(conn, by.name, "token.create", tid, detail, by.origin)
    return info


def q_tokens(conn: sqlite3.Connection, include_inactive: bool = True) -> list[TokenInfo]:
    rows = [_row(r) for r in conn.execute("SELECT * FROM api_tokens ORDER BY created_at, id")]
    return rows if include_inactive else [t for t in rows if t.status() == "active"]


def q_token_secret(conn: sqlite3.Connection, token_id: str) -> tuple[TokenInfo, str] | None:
    row = conn.execute("SELECT * FROM api_tokens WHERE id=?", (token_id,)).fetchone()
    return None if row is None else (_row(row), row["secret_sha256"])


def tx_revoke_token(
    conn: sqlite3.Connection, token_id: str, by: Actor | None, now: float
) -> TokenInfo | None:
    conn.execute("UPDATE api_tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (now, token_id))
    found = q_token_secret(conn, token_id)
    if found is None:
        return None
    info = found[0]
    if by is not None:
        tx_audit(conn, by.name, "token.revoke", info.id, {**by.detail, "name": info.name}, by.origin)
    return info


def tx_touch(conn: sqlite3.Connection, token_id: str, at: float) -> None:
    conn.execute("UPDATE api_tokens SET last_used_at=? WHERE id=?", (at, token_id))


def q_audit(conn: sqlite3.Connection, f: AuditFilter) -> list[dict[str, Any]]:
    """Audit rows, newest first. `action` matches exactly or as a prefix ending in '.' (e.g. `secret.`)."""
    where: list[str] = []
    args: list[Any] = []
    if f.since is not None:
        where.append("at>=?")
        args.append(f.since)
    if f.until is not None:
        where.append("at<?")
        args.append(f.until)
    if f.action:
        if f.action.endswith("."):
            where.append("substr(action, 1, ?)=?")
            args += [len(f.action), f.action]
        else:
            where.append("action=?")
            args.append(f.action)
    if f.actor:
        where.append("instr(actor, ?)>0")
        args.append(f.actor)
    if f.target:
        where.append("target=?")
        args.append(f.target)
    sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY id DESC LIMIT ?"
    rows = []
    for r in conn.execute(sql, [*args, f.limit]):
        d = dict(r)
        try:
            d["detail"] = orjson.loads(d["detail"])
        except orjson.JSONDecodeError:
            d["detail"] = {"text": d["detail"]}
        rows.append(d)
    return rows
