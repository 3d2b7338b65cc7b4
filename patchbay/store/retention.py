"""Retention in the SQLite store: finished runs removed whole, and old payloads and traces compressed.

Both work in bounded chunks, each one small transaction through the writer, so ingest never waits
behind a cleanup. A compressed value starts with ZMARK (no JSON document starts with a NUL byte);
`opened` is the one reader of a stored payload or trace, used by every query that returns one.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Sequence
from typing import Any

ZMARK = b"\x00zl"
FINISHED = ("delivered", "filtered", "discarded", "aggregated")
FAILED = ("dead", "quarantined")


def opened(value: Any) -> Any:
    """A stored payload or trace as written: bytes or text, decompressed when it was compressed."""
    if isinstance(value, bytes) and value.startswith(ZMARK):
        return zlib.decompress(value[len(ZMARK) :])
    return value


def tx_purge(conn: sqlite3.Connection, flow: str, statuses: Sequence[str], before: float, limit: int) -> int:
    """Remove up to `limit` runs of `flow` in `statuses` whose last change is before `before`: the event, its
    deliveries, their attempts and response fields. A run with a delivery still pending is never removed, nor
    one whose create the identity map still waits to link (identity_pending)."""
    marks = ",".join("?" * len(statuses))
    ids = [
        r[0]
        for r in conn.execute(
            f"SELECT e.id FROM events e WHERE e.flow=? AND e.received_at<? AND e.updated_at<? AND e.status IN ({marks})"
            " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id=e.id AND d.status='pending')"
            # A create whose id the identity map still waits for: its response holds the id.
            " AND NOT EXISTS (SELECT 1 FROM identity_pending p WHERE p.event_id=e.id)"
            " ORDER BY e.received_at LIMIT ?",
            (flow, before, before, *statuses, limit),
        )
    ]
    if not ids:
        return 0
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS purging(id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM purging")
    conn.executemany("INSERT INTO purging(id) VALUES(?)", [(i,) for i in ids])
    doomed = "SELECT d.id FROM deliveries d JOIN purging p ON d.event_id=p.id"
    conn.execute(f"DELETE FROM attempts WHERE delivery_id IN ({doomed})")
    conn.execute(f"DELETE FROM responses WHERE delivery_id IN ({doomed})")
    conn.execute("DELETE FROM deliveries WHERE event_id IN (SELECT id FROM purging)")
    conn.execute("DELETE FROM events WHERE id IN (SELECT id FROM purging)")
    conn.execute("DELETE FROM purging")
    return len(ids)


def tx_compress(conn: sqlite3.Connection, flow: str, before: float, limit: int) -> int:
    """Compress the payload and trace of up to `limit` finished runs of `flow` last changed before `before`."""
    statuses = FINISHED + FAILED
    marks = ",".join("?" * len(statuses))
    rows = conn.execute(
        f"SELECT id, payload, trace FROM events WHERE flow=? AND received_at<? AND updated_at<?"
        f" AND status IN ({marks}) AND substr(payload,1,3)!=? ORDER BY received_at LIMIT ?",
        (flow, before, before, *statuses, ZMARK, limit),
    ).fetchall()
    for eid, payload, trace in rows:
        raw = payload if isinstance(payload, bytes) else str(payload).encode()
        text = trace if isinstance(trace, bytes) else str(trace).encode()
        conn.execute(
            "UPDATE events SET payload=?, trace=? WHERE id=?",
            (ZMARK + zlib.compress(raw, 6), ZMARK + zlib.compress(text, 6), eid),
        )
    return len(rows)
