"""Operations the PostgreSQL store does its own way (the rest are the shared query functions)."""

from __future__ import annotations

import zlib
from typing import Any

from patchbay.store.retention import FAILED, FINISHED, ZMARK


def tx_compress(conn: Any, flow: str, before: float, limit: int) -> int:
    """Compress the payload of up to `limit` finished runs (as retention.tx_compress does). The trace stays
    text: PostgreSQL compresses a long text value itself (TOAST), and a text column cannot hold bytes."""
    statuses = FINISHED + FAILED
    marks = ",".join("?" * len(statuses))
    rows = conn.execute(
        f"SELECT id, payload FROM events WHERE flow=? AND received_at<? AND updated_at<?"
        f" AND status IN ({marks}) AND substr(payload,1,3)!=? ORDER BY received_at LIMIT ?",
        (flow, before, before, *statuses, ZMARK, limit),
    ).fetchall()
    if rows:
        conn.executemany(
            "UPDATE events SET payload=? WHERE id=?",
            [(ZMARK + zlib.compress(bytes(payload), 6), eid) for eid, payload in rows],
        )
    return len(rows)
