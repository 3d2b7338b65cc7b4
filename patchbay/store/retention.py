"""Retention: finished runs removed whole, and old payloads and traces compressed (SQLite; PostgreSQL runs
the purge through its SQL dialect and compresses its own way, `postgres/ops.py`).

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
    one whose create the identity map still waits to link (identity_pending).

    The rows go by their ids, listed in each statement (`_by_ids`), so that every delete is an index lookup
    on both engines. A join with a temporary table of the ids, as before, left PostgreSQL without a row
    count for it: it hashed it and read whole tables for every chunk, a chunk's cost growing with the store
    (tests/store/test_postgres_store.py; bench/retention.py --postgres, before statistics: 274 runs/s)."""
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
    deliveries = [
        r[0] for part in _by_ids(conn, "SELECT id FROM deliveries WHERE event_id IN ({})", ids) for r in part
    ]
    for table in ("attempts", "responses"):
        _by_ids(conn, f"DELETE FROM {table} WHERE delivery_id IN ({{}})", deliveries)
    _by_ids(conn, "DELETE FROM deliveries WHERE id IN ({})", deliveries)
    _by_ids(conn, "DELETE FROM events WHERE id IN ({})", ids)
    return len(ids)


_IDS_A_STATEMENT = 500  # far below SQLite's limit of bound values (32,766)


def _by_ids(conn: sqlite3.Connection, sql: str, ids: Sequence[Any]) -> list[list[Any]]:
    """`sql` with its `{}` replaced by a list of `ids`' placeholders, run for each slice of `ids`; the rows."""
    out = []
    for at in range(0, len(ids), _IDS_A_STATEMENT):
        part = ids[at : at + _IDS_A_STATEMENT]
        out.append(conn.execute(sql.format(",".join("?" * len(part))), part).fetchall())
    return out


def due_for_compression(
    conn: Any, columns: str, flow: str, before: float, limit: int, after: float | None
) -> list[Any]:
    """`columns` (then received_at, last) of up to `limit` finished runs of `flow` last changed before `before`,
    received at `after` or later, not compressed yet, the oldest first: what both stores' compressions read."""
    statuses = FINISHED + FAILED
    marks = ",".join("?" * len(statuses))
    return list(
        conn.execute(
            f"SELECT {columns}, received_at FROM events WHERE flow=? AND received_at>=? AND received_at<?"
            f" AND updated_at<? AND status IN ({marks}) AND substr(payload,1,3)!=? ORDER BY received_at LIMIT ?",
            (flow, after or 0.0, before, before, *statuses, ZMARK, limit),
        ).fetchall()
    )


def tx_compress(
    conn: sqlite3.Connection, flow: str, before: float, limit: int, after: float | None = None
) -> tuple[int, float | None]:
    """Compress the payload and trace of up to `limit` finished runs of `flow` last changed before `before`,
    received at `after` or later (see `Retention.compress_runs`): how many, and the last one's arrival."""
    rows = due_for_compression(conn, "id, payload, trace", flow, before, limit, after)
    for eid, payload, trace, _ in rows:
        raw = payload if isinstance(payload, bytes) else str(payload).encode()
        text = trace if isinstance(trace, bytes) else str(trace).encode()
        conn.execute(
            "UPDATE events SET payload=?, trace=? WHERE id=?",
            (ZMARK + zlib.compress(raw, 6), ZMARK + zlib.compress(text, 6), eid),
        )
    return len(rows), (rows[-1][-1] if rows else None)
