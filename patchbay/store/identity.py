"""The identity map's SQL (SQLite): identities as documents, their links and match keys, conflicts, reviews."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import orjson

from patchbay.store.base import Identity, IdentityChanges, IdentityLookup
from patchbay.store.common import _j, tx_audit

IDENTITY_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities(
  id TEXT PRIMARY KEY,
  entity TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'active',
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS identities_entity ON identities(entity, id);
CREATE TABLE IF NOT EXISTS identity_links(
  entity TEXT NOT NULL,
  system TEXT NOT NULL,
  record_id TEXT NOT NULL,
  identity_id TEXT NOT NULL,
  PRIMARY KEY(entity, system, record_id)
);
CREATE INDEX IF NOT EXISTS identity_links_identity ON identity_links(identity_id);
CREATE TABLE IF NOT EXISTS identity_keys(
  entity TEXT NOT NULL,
  rule TEXT NOT NULL,
  key TEXT NOT NULL,
  identity_id TEXT NOT NULL,
  PRIMARY KEY(entity, rule, key, identity_id)
);
CREATE INDEX IF NOT EXISTS identity_keys_identity ON identity_keys(identity_id);
CREATE TABLE IF NOT EXISTS identity_conflicts(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  entity TEXT NOT NULL,
  identity_id TEXT NOT NULL,
  field TEXT NOT NULL,
  kind TEXT NOT NULL,
  vals TEXT NOT NULL,
  winner TEXT,
  winner_value TEXT,
  rule TEXT NOT NULL,
  reason TEXT NOT NULL,
  status TEXT NOT NULL,
  at REAL NOT NULL,
  resolved_at REAL,
  resolution TEXT
);
CREATE INDEX IF NOT EXISTS identity_conflicts_status ON identity_conflicts(status, entity, id);
CREATE INDEX IF NOT EXISTS identity_conflicts_identity ON identity_conflicts(identity_id);
CREATE TABLE IF NOT EXISTS identity_reviews(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  entity TEXT NOT NULL,
  system TEXT NOT NULL,
  record_id TEXT NOT NULL,
  vals TEXT NOT NULL,
  candidates TEXT NOT NULL,
  reason TEXT NOT NULL,
  event_id TEXT,
  status TEXT NOT NULL DEFAULT 'open',
  at REAL NOT NULL,
  resolved_at REAL,
  resolution TEXT
);
CREATE INDEX IF NOT EXISTS identity_reviews_status ON identity_reviews(status, entity, id);
CREATE UNIQUE INDEX IF NOT EXISTS identity_reviews_open ON identity_reviews(entity, system, record_id)
  WHERE status = 'open';
CREATE TABLE IF NOT EXISTS identity_pending(
  identity_id TEXT NOT NULL,
  system TEXT NOT NULL,
  entity TEXT NOT NULL,
  event_id TEXT NOT NULL,
  destination TEXT NOT NULL,
  since REAL NOT NULL,
  overdue REAL,
  PRIMARY KEY(identity_id, system)
);
CREATE INDEX IF NOT EXISTS identity_pending_since ON identity_pending(entity, since);
CREATE INDEX IF NOT EXISTS identity_pending_event ON identity_pending(event_id);
"""


def _identity(row: sqlite3.Row) -> Identity:
    d = orjson.loads(row["doc"])
    return Identity(
        d["id"],
        d["entity"],
        d["created_at"],
        d["updated_at"],
        d.get("golden", {}),
        d.get("systems", {}),
        [(k[0], k[1]) for k in d.get("keys", [])],
        d.get("status", "active"),
    )


def _chunks(items: Sequence[Any], n: int = 400) -> list[Sequence[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def q_identities(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, Identity]:
    out: dict[str, Identity] = {}
    for part in _chunks(list(dict.fromkeys(ids))):
        marks = ",".join("?" * len(part))
        for row in conn.execute(f"SELECT doc FROM identities WHERE id IN ({marks})", tuple(part)):
            ident = _identity(row)
            out[ident.id] = ident
    return out


def q_lookup(
    conn: sqlite3.Connection, entity: str, links: Sequence[tuple[str, str]], keys: Sequence[tuple[str, str]]
) -> IdentityLookup:
    out = IdentityLookup()
    for system, record_id in dict.fromkeys(links):
        row = conn.execute(
            "SELECT identity_id FROM identity_links WHERE entity=? AND system=? AND record_id=?",
            (entity, system, record_id),
        ).fetchone()
        if row is not None:
            out.by_link[(system, record_id)] = row[0]
        rev = conn.execute(
            "SELECT id FROM identity_reviews WHERE entity=? AND system=? AND record_id=? AND status='open'",
            (entity, system, record_id),
        ).fetchone()
        if rev is not None:
            out.open_reviews[(system, record_id)] = rev[0]
    for rule, key in dict.fromkeys(keys):
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT identity_id FROM identity_keys WHERE entity=? AND rule=? AND key=? ORDER BY identity_id",
                (entity, rule, key),
            )
        ]
        if ids:
            out.by_key[(rule, key)] = ids
    out.identities = q_identities(conn, [*out.by_link.values(), *(i for v in out.by_key.values() for i in v)])
    return out


def q_identity(conn: sqlite3.Connection, identity_id: str) -> Identity | None:
    return q_identities(conn, [identity_id]).get(identity_id)


def q_search(conn: sqlite3.Connection, entity: str | None, text: str, limit: int) -> list[Identity]:
    ent = "" if entity is None else " AND entity=?"
    args: tuple[Any, ...] = (text,) if entity is None else (text, entity)
    ids = [r[0] for r in conn.execute(f"SELECT identity_id FROM identity_keys WHERE key=?{ent}", args)]
    ids += [
        r[0] for r in conn.execute(f"SELECT identity_id FROM identity_links WHERE record_id=?{ent}", args)
    ]
    ids += [r[0] for r in conn.execute(f"SELECT id FROM identities WHERE id=?{ent}", args)]
    found = q_identities(conn, ids[: limit * 4])
    return [found[i] for i in dict.fromkeys(ids) if i in found][:limit]


def q_all(conn: sqlite3.Connection, entity: str, after: str, limit: int) -> list[Identity]:
    rows = conn.execute(
        "SELECT doc FROM identities WHERE entity=? AND id>? ORDER BY id LIMIT ?", (entity, after, limit)
    )
    return [_identity(r) for r in rows]


def tx_identity_changes(conn: sqlite3.Connection, ch: IdentityChanges) -> None:
    now = time.time()
    for ident in ch.identities:
        conn.execute(
            "INSERT INTO identities(id, entity, status, created_at, updated_at, doc) VALUES(?,?,?,?,?,?)"
            " ON CONFLICT(id) DO UPDATE SET status=excluded.status, updated_at=excluded.updated_at,"
            " doc=excluded.doc",
            (ident.id, ident.entity, ident.status, ident.created_at, ident.updated_at, _j(ident.as_dict())),
        )
        conn.execute("DELETE FROM identity_links WHERE identity_id=?", (ident.id,))
        conn.executemany(
            "INSERT OR REPLACE INTO identity_links(entity, system, record_id, identity_id) VALUES(?,?,?,?)",
            [
                (ident.entity, system, str(v["id"]), ident.id)
                for system, v in ident.systems.items()
                if v.get("id") is not None
            ],
        )
        # Creates whose id the map waits for: the sweep finds them, and retention keeps their runs.
        conn.execute("DELETE FROM identity_pending WHERE identity_id=?", (ident.id,))
        conn.executemany(
            "INSERT INTO identity_pending(identity_id, system, entity, event_id, destination, since, overdue)"
            " VALUES(?,?,?,?,?,?,?)",
            [
                (
                    ident.id,
                    system,
                    ident.entity,
                    p["event"],
                    p["destination"],
                    float(p.get("checked") or p.get("at") or ident.updated_at),  # when to look again
                    p.get("overdue"),
                )
                for system, v in ident.systems.items()
                if v.get("id") is None and (p := v.get("pending"))
            ],
        )
        conn.execute("DELETE FROM identity_keys WHERE identity_id=?", (ident.id,))
        if ident.status != "deleted":
            conn.executemany(
                "INSERT OR IGNORE INTO identity_keys(entity, rule, key, identity_id) VALUES(?,?,?,?)",
                [(ident.entity, rule, key, ident.id) for rule, key in ident.keys],
            )
    for c in ch.conflicts:
        conn.execute(
            "INSERT INTO identity_conflicts(entity, identity_id, field, kind, vals, winner, winner_value, rule,"
            " reason, status, at) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
            (
                c.entity,
                c.identity_id,
                c.field,
                c.kind,
                _j(c.values),
                c.winner,
                _j(c.winner_value),
                c.rule,
                c.reason,
                c.status,
                c.at,
            ),
        )
    for r in ch.reviews:
        conn.execute(
            "INSERT INTO identity_reviews(entity, system, record_id, vals, candidates, reason, event_id, at)"
            " VALUES(?,?,?,?,?,?,?,?) ON CONFLICT(entity, system, record_id) WHERE status='open'"
            " DO UPDATE SET vals=excluded.vals, candidates=excluded.candidates, reason=excluded.reason,"
            " event_id=excluded.event_id, at=excluded.at",
            (r.entity, r.system, r.record_id, _j(r.values), _j(r.candidates), r.reason, r.event_id, r.at),
        )
    for cid, status, how in ch.resolve_conflicts:
        conn.execute(
            "UPDATE identity_conflicts SET status=?, resolved_at=?, resolution=? WHERE id=?",
            (status, now, _j(how), cid),
        )
        if ch.by is not None:
            tx_audit(conn, ch.by.name, "conflict.resolve", str(cid), {**ch.by.detail, **how}, ch.by.origin)
    for rid, status, how in ch.resolve_reviews:
        conn.execute(
            "UPDATE identity_reviews SET status=?, resolved_at=?, resolution=? WHERE id=?",
            (status, now, _j(how), rid),
        )
        if ch.by is not None:
            tx_audit(conn, ch.by.name, "review.resolve", str(rid), {**ch.by.detail, **how}, ch.by.origin)


def q_pending_creates(
    conn: sqlite3.Connection, entity: str, older_than: float, limit: int
) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT identity_id, system, event_id, destination, since FROM identity_pending"
        " WHERE entity=? AND since<? ORDER BY since LIMIT ?",
        (entity, older_than, limit),
    )
    return [dict(r) for r in rows]


def _conflict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["values"] = orjson.loads(d.pop("vals"))
    d["winner_value"] = orjson.loads(d["winner_value"]) if d["winner_value"] is not None else None
    d["resolution"] = orjson.loads(d["resolution"]) if d["resolution"] else None
    return d


def q_conflicts(
    conn: sqlite3.Connection, entity: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    where, args = _filters(entity, status)
    rows = conn.execute(f"SELECT * FROM identity_conflicts{where} ORDER BY id DESC LIMIT ?", (*args, limit))
    return [_conflict(r) for r in rows]


def q_conflict(conn: sqlite3.Connection, cid: int) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM identity_conflicts WHERE id=?", (cid,)).fetchone()
    return None if row is None else _conflict(row)


def _review(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["values"] = orjson.loads(d.pop("vals"))
    d["candidates"] = orjson.loads(d["candidates"])
    d["resolution"] = orjson.loads(d["resolution"]) if d["resolution"] else None
    return d


def q_reviews(
    conn: sqlite3.Connection, entity: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    where, args = _filters(entity, status)
    rows = conn.execute(f"SELECT * FROM identity_reviews{where} ORDER BY id DESC LIMIT ?", (*args, limit))
    return [_review(r) for r in rows]


def q_review(conn: sqlite3.Connection, rid: int) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM identity_reviews WHERE id=?", (rid,)).fetchone()
    return None if row is None else _review(row)


def _filters(entity: str | None, status: str | None) -> tuple[str, tuple[Any, ...]]:
    parts, args = [], []
    if entity is not None:
        parts.append("entity=?")
        args.append(entity)
    if status is not None:
        parts.append("status=?")
        args.append(status)
    return (" WHERE " + " AND ".join(parts) if parts else ""), tuple(args)


def q_stats(conn: sqlite3.Connection, entity: str, closed_since: float | None = None) -> dict[str, Any]:
    status = dict(
        conn.execute(
            "SELECT status, COUNT(*) FROM identities WHERE entity=? GROUP BY status", (entity,)
        ).fetchall()
    )
    linked = dict(
        conn.execute(
            "SELECT system, COUNT(*) FROM identity_links WHERE entity=? GROUP BY system", (entity,)
        ).fetchall()
    )
    conflicts = dict(
        conn.execute(
            "SELECT status, COUNT(*) FROM identity_conflicts WHERE entity=? GROUP BY status", (entity,)
        ).fetchall()
    )
    reviews = dict(
        conn.execute(
            "SELECT status, COUNT(*) FROM identity_reviews WHERE entity=? GROUP BY status", (entity,)
        ).fetchall()
    )
    closed = None
    if closed_since is not None:
        closed = conn.execute(
            "SELECT COUNT(*) FROM identities WHERE entity=? AND status IN ('deleted', 'archived')"
            " AND updated_at >= ?",
            (entity, closed_since),
        ).fetchone()[0]
    waiting, overdue = conn.execute(
        "SELECT COUNT(*), COUNT(overdue) FROM identity_pending WHERE entity=?", (entity,)
    ).fetchone()
    return {
        **({"closed_since": closed} if closed is not None else {}),
        "pending": {"waiting": waiting, "overdue": overdue},
        "identities": sum(status.values()),
        "status": status,
        "linked": linked,
        "conflicts": conflicts,
        "reviews": reviews,
    }
