"""SQL of calls inside flows: a call's answer recorded with the rest of its run, and the answers' cache.

A call step's request is a delivery row (destination `call:<step>`); its answer is the `responses`
row of that delivery. When a call succeeds, `tx_record_calls` records the attempt and, in the same
transaction, runs the flow again from the stored payload with every recorded answer bound
(`Reprocessor.process(..., answers)`), inserting the deliveries (or next calls) it did not have yet:
a crash before the commit leaves the call pending (sent again with the same key), after it the rest
of the run is on disk.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import orjson

from patchbay.errors import PatchbayError
from patchbay.store.base import AttemptResult, CachedAnswer, NewEvent, Reprocessor
from patchbay.store.common import _j, refresh_event_status
from patchbay.store.retention import opened
from patchbay.store.windows import drop_duplicate_elements

CALLS_SCHEMA = """
CREATE TABLE IF NOT EXISTS call_cache(
  scope TEXT NOT NULL,
  key TEXT NOT NULL,
  answer TEXT NOT NULL,
  expires_at REAL NOT NULL,
  PRIMARY KEY(scope, key)
);
CREATE INDEX IF NOT EXISTS call_cache_expiry ON call_cache(expires_at);
"""

CALL_PREFIX = "call:"


def q_answers(conn: sqlite3.Connection, event_id: str) -> dict[str, Any]:
    """The recorded answers of an event's calls, by idempotency key."""
    rows = conn.execute(
        "SELECT d.idempotency_key, r.fields FROM deliveries d JOIN responses r ON r.delivery_id=d.id"
        " WHERE d.event_id=? AND d.status='delivered' AND d.destination LIKE 'call:%'",
        (event_id,),
    ).fetchall()
    return {r[0]: orjson.loads(r[1]) for r in rows}


def tx_continue(conn: sqlite3.Connection, event_id: str, pipe: Reprocessor, now: float) -> list[str]:
    """Run the event's flow again with its answers; insert what it now delivers. The destinations added."""
    row = conn.execute("SELECT status, payload FROM events WHERE id=?", (event_id,)).fetchone()
    if row is None or row["status"] in ("discarded",):
        return []
    try:
        record = pipe.load_payload(opened(row["payload"]))  # a dead run's payload may be compressed
        processed = pipe.process(record, event_id, answers=q_answers(conn, event_id))
    except Exception as exc:  # sealed fields whose key is gone, a custom step's bug: the run stops here,
        # visibly and replayably, and the answer is still recorded (a failed write would send the call again)
        what = str(exc) if isinstance(exc, PatchbayError) else f"{type(exc).__name__}: {exc}"
        conn.execute(
            "UPDATE events SET status='quarantined', reason=?, updated_at=? WHERE id=?",
            (f"continuing after a call: {what}", now, event_id),
        )
        return []
    flow = conn.execute("SELECT flow FROM events WHERE id=?", (event_id,)).fetchone()[0]
    if any(c.element is not None for c in processed.claims):  # a split element dropped as a duplicate at
        # accept stays dropped (its key is held by a sibling or another run): its calls are not asked
        e = drop_duplicate_elements(
            conn,
            NewEvent(
                event_id, flow, now, b"", "", None, processed.status, trace=processed.trace,
                reason=processed.reason, deliveries=processed.deliveries, claims=processed.claims,
            ),
            now,
        )  # fmt: skip
        processed.status, processed.reason, processed.trace = e.status, e.reason, e.trace
        processed.deliveries = e.deliveries
    existing = {
        (r[0], r[1])
        for r in conn.execute(
            "SELECT destination, idempotency_key FROM deliveries WHERE event_id=?", (event_id,)
        )
    }
    added: list[str] = []
    for d in processed.deliveries:
        if (d.destination, d.idempotency_key) in existing:
            continue
        conn.execute(
            "INSERT INTO deliveries(event_id, flow, destination, status, request, idempotency_key, next_at,"
            " last_error, created_at, updated_at, order_key) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
            (
                event_id,
                flow,
                d.destination,
                getattr(d, "status", "pending"),
                _j(d.request),
                d.idempotency_key,
                now,
                getattr(d, "error", None),
                now,
                now,
                getattr(d, "order_key", None),
            ),
        )
        added.append(d.destination)
    conn.execute(
        "UPDATE events SET trace=?, reason=?, record_key=COALESCE(?, record_key), updated_at=? WHERE id=?",
        (_j(processed.trace), processed.reason, processed.record_key, now, event_id),
    )
    if processed.status in ("quarantined", "filtered"):
        conn.execute("UPDATE events SET status=?, updated_at=? WHERE id=?", (processed.status, now, event_id))
    else:
        refresh_event_status(conn, event_id, now)
    return added


def tx_record_calls(
    conn: sqlite3.Connection,
    results: list[AttemptResult],
    pipe: Reprocessor,
    record: Callable[[sqlite3.Connection, list[AttemptResult]], None],
    cache: list[CachedAnswer] | None = None,
) -> list[tuple[str, list[str]]]:
    """The attempts (as `record` does), then the run of each answered call goes on; (event, destinations)."""
    record(conn, results)
    for c in cache or ():
        tx_cache_answer(conn, c.scope, c.key, c.answer, c.expires_at)
    now = time.time()
    answered = dict.fromkeys(r.event_id for r in results if r.new_status == "delivered")
    return [(eid, tx_continue(conn, eid, pipe, now)) for eid in answered]  # once per event: all its answers


def q_cached_answer(conn: sqlite3.Connection, scope: str, key: str, now: float) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT answer FROM call_cache WHERE scope=? AND key=? AND expires_at>?", (scope, key, now)
    ).fetchone()
    return None if row is None else orjson.loads(row[0])


def tx_cache_answer(
    conn: sqlite3.Connection, scope: str, key: str, answer: dict[str, Any], expires_at: float
) -> None:
    now = time.time()
    conn.execute("DELETE FROM call_cache WHERE expires_at<=?", (now,))
    conn.execute(
        "INSERT INTO call_cache(scope, key, answer, expires_at) VALUES(?,?,?,?)"
        " ON CONFLICT(scope, key) DO UPDATE SET answer=excluded.answer, expires_at=excluded.expires_at",
        (scope, key, _j(answer), expires_at),
    )
