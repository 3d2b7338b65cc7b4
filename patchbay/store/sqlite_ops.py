"""The SQLite store's hot path and state operations: accept, due, record, cursors, schedules, destination states.

Each takes a connection first; transactions (tx_*) run inside the writer's group transaction and may be
run twice (the group is replayed with savepoints when another operation fails): no side effects outside it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from dataclasses import replace as _replace
from typing import Any

import orjson

from patchbay.store import windows as wq
from patchbay.store.base import (
    Accepted,
    Actor,
    AttemptResult,
    DueDelivery,
    IdentityChanges,
    NewEvent,
)
from patchbay.store.common import _j, attempt_row, delivery_row, redoable, refresh_event_status, tx_audit
from patchbay.store.identity import tx_identity_changes


def tx_accept(conn: sqlite3.Connection, e: NewEvent) -> Accepted:
    now = time.time()
    if e.dedupe_key is not None:
        row = conn.execute(
            "SELECT id, body_hash FROM events WHERE flow=? AND dedupe_key=?", (e.flow, e.dedupe_key)
        ).fetchone()
        if row is not None:
            return Accepted(row["id"], duplicate=True, conflict=row["body_hash"] != e.body_hash)
    if e.claims or e.windows:
        e = wq.drop_duplicate_elements(
            conn, e, now
        )  # after a split: an element's duplicate key drops it alone
        seen: wq.Seen = {}
        refused = wq.refusal(conn, e, now, seen)
        if refused is not None:  # a dedupe key held by another run, or too late for its window
            status, reason, trace = refused
            tx_accept(
                conn,
                _replace(e, status=status, reason=reason, trace=trace, deliveries=[], claims=[], windows=[]),
            )
            return Accepted(e.id, status=status, reason=reason)
        wq.apply_gates(conn, e, now, seen)
    conn.execute(
        "INSERT INTO events(id, flow, dedupe_key, body_hash, received_at, updated_at, status, record_key, reason,"
        " payload, meta, trace) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            e.id,
            e.flow,
            e.dedupe_key,
            e.body_hash,
            e.received_at,
            now,
            e.status,
            e.record_key,
            e.reason,
            e.payload,
            _j(e.meta),
            _j(e.trace),
        ),
    )
    if e.deliveries:
        conn.executemany(
            "INSERT INTO deliveries(event_id, flow, destination, status, request, idempotency_key, last_error,"
            " order_key, next_at, created_at, updated_at) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
            [(*delivery_row(e, d), e.received_at, now, now) for d in e.deliveries],
        )
    return Accepted(e.id)


def tx_accept_batch(
    conn: sqlite3.Connection, events: list[NewEvent], flow: str, cursor: Any
) -> list[Accepted]:
    out = [tx_accept(conn, e) for e in events]
    if cursor is not None:
        tx_set_cursor(conn, flow, cursor)
    return out


def tx_accept_synced(
    conn: sqlite3.Connection, events: list[NewEvent], changes: IdentityChanges, cursors: dict[str, Any]
) -> list[Accepted]:
    """A sync step: its events, the identity map's changes and the source cursor, together."""
    out = [tx_accept(conn, e) for e in events]
    tx_identity_changes(conn, changes)
    for flow, cursor in cursors.items():
        if cursor is not None:
            tx_set_cursor(conn, flow, cursor)
    return out


def tx_set_cursor(conn: sqlite3.Connection, flow: str, cursor: Any) -> None:
    conn.execute(
        "INSERT INTO cursors(flow, value, updated_at) VALUES(?,?,?)"
        " ON CONFLICT(flow) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
        (flow, _j(cursor), time.time()),
    )


def q_cursor(conn: sqlite3.Connection, flow: str) -> Any:
    row = conn.execute("SELECT value FROM cursors WHERE flow=?", (flow,)).fetchone()
    return None if row is None else orjson.loads(row[0])


def tx_reset_cursor(conn: sqlite3.Connection, flow: str, by: Actor | None = None) -> bool:
    done = conn.execute("DELETE FROM cursors WHERE flow=?", (flow,)).rowcount > 0
    if by is not None:
        tx_audit(conn, by.name, "cursor.reset", flow, {**by.detail, "had_cursor": done}, by.origin)
    return done


def q_schedule(conn: sqlite3.Connection, flow: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM schedules WHERE flow=?", (flow,)).fetchone()
    return None if row is None else dict(row)


def tx_schedule(conn: sqlite3.Connection, flow: str, **fields: Any) -> None:
    conn.execute("INSERT OR IGNORE INTO schedules(flow) VALUES(?)", (flow,))
    if fields.pop("count_run", False):
        conn.execute("UPDATE schedules SET runs=runs+1 WHERE flow=?", (flow,))
    if fields:
        cols = ", ".join(f"{k}=?" for k in fields)
        conn.execute(f"UPDATE schedules SET {cols} WHERE flow=?", (*fields.values(), flow))


# A delivery with an order key (its destination's `order_by`) is due only as the oldest pending or dead one
# of its key to that destination: one at a time, in arrival order; a retrying or dead one holds the rest.
HEAD = (
    "(d.order_key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.flow=d.flow"
    " AND e.destination=d.destination AND e.order_key=d.order_key AND e.id<d.id"
    " AND e.status IN ('pending','dead')))"
)


def q_due(
    conn: sqlite3.Connection,
    flow: str,
    destination: str,
    now: float,
    limit: int,
    skip: frozenset[int],
    after_id: int = 0,
) -> list[DueDelivery]:
    """Pending deliveries due by `now`, oldest first, past `after_id` and not in `skip` (already leased);
    of an ordered key only its oldest (HEAD)."""
    rows = conn.execute(
        "SELECT id, event_id, request, idempotency_key, attempts, retries, next_at FROM deliveries d"
        " WHERE flow=? AND destination=? AND status='pending' AND next_at<=? AND id>? AND "
        + HEAD
        + " ORDER BY id LIMIT ?",
        (flow, destination, now, after_id, limit + len(skip)),
    ).fetchall()
    out = []
    for r in rows:
        if r["id"] in skip:
            continue
        out.append(
            DueDelivery(
                r["id"],
                r["event_id"],
                flow,
                destination,
                orjson.loads(r["request"]),
                r["idempotency_key"],
                r["attempts"],
                r["retries"],
                r["next_at"],
            )
        )
        if len(out) >= limit:
            break
    return out


def q_next_due(conn: sqlite3.Connection, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], float]:
    sql = (
        "SELECT MIN(next_at) FROM deliveries d WHERE flow=? AND destination=? AND status='pending' AND "
        + HEAD
    )
    found = {pair: conn.execute(sql, pair).fetchone()[0] for pair in dict.fromkeys(pairs)}
    return {pair: at for pair, at in found.items() if at is not None}


def q_pending_of(conn: sqlite3.Connection, ids: frozenset[int]) -> set[int]:
    marks = ",".join("?" * len(ids))
    return {
        r[0]
        for r in conn.execute(
            f"SELECT id FROM deliveries WHERE status='pending' AND id IN ({marks})", tuple(ids)
        )
    }


def q_held_keys(conn: sqlite3.Connection, flow: str, destination: str, limit: int) -> list[dict[str, Any]]:
    """Ordered keys whose oldest delivery is retrying or dead, with how many later ones wait behind it."""
    rows = conn.execute(
        "SELECT d.order_key, d.id, d.event_id, d.status, d.next_at, d.attempts, d.last_error,"
        " (SELECT COUNT(*) FROM deliveries w WHERE w.flow=d.flow AND w.destination=d.destination"
        "  AND w.order_key=d.order_key AND w.id>d.id AND w.status='pending') AS waiting"
        " FROM deliveries d WHERE d.flow=? AND d.destination=? AND d.order_key IS NOT NULL"
        " AND (d.status='dead' OR (d.status='pending' AND d.attempts>0)) AND "
        + HEAD.replace("d.order_key IS NULL OR ", "")
        + " ORDER BY d.id LIMIT ?",
        (flow, destination, limit),
    ).fetchall()
    out = []
    for r in rows:
        error = r["last_error"] or "failed"
        if r["status"] == "dead":
            status = "dead"
            reason = (
                f"key {r['order_key']!r} held: event {r['event_id']} is a dead letter ({error}); its {r['waiting']}"
                " later deliveries wait until you replay or discard it"
            )
        else:
            status = "retrying"
            reason = (
                f"key {r['order_key']!r} held: event {r['event_id']} is retrying after {r['attempts']} attempts"
                f" ({error}); its {r['waiting']} later deliveries wait for it"
            )
        out.append(
            {
                "key": r["order_key"],
                "delivery_id": r["id"],
                "event_id": r["event_id"],
                "status": status,
                "next_at": r["next_at"] if status == "retrying" else None,
                "attempts": r["attempts"],
                "waiting": r["waiting"],
                "reason": reason,
            }
        )
    return out


# An attempt record's writes over the whole group at once, a few statements whatever its size: the writer
# thread gives the GIL away inside every statement, and in a busy process each time costs a wait for it back
# (while the store's one write lock is held). Measured: per record, one statement each was 17 us alone and
# ~10 ms beside a busy thread; see docs/scaling.md.
_RECORD_ROWS = (
    "SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS status,"
    " json_extract(value, '$[2]') AS retry, json_extract(value, '$[3]') AS next_at,"
    " json_extract(value, '$[4]') AS last_error, json_extract(value, '$[5]') AS started_at,"
    " json_extract(value, '$[6]') AS latency_ms, json_extract(value, '$[7]') AS status_code,"
    " json_extract(value, '$[8]') AS outcome, json_extract(value, '$[9]') AS excerpt,"
    " json_extract(value, '$[10]') AS error, key FROM json_each(?)"
)
_RECORD_DELIVERIES = (
    "UPDATE deliveries SET status=r.status, attempts=deliveries.attempts+1, retries=deliveries.retries+r.retry,"
    " next_at=COALESCE(r.next_at, deliveries.next_at), last_error=r.last_error, updated_at=?"
    f" FROM ({_RECORD_ROWS}) AS r WHERE deliveries.id=r.id"
)
_RECORD_ATTEMPTS = (
    "INSERT INTO attempts(delivery_id, n, started_at, latency_ms, status_code, outcome, excerpt, error)"
    " SELECT r.id, d.attempts, r.started_at, r.latency_ms, r.status_code, r.outcome, r.excerpt, r.error"
    f" FROM ({_RECORD_ROWS}) AS r JOIN deliveries d ON d.id=r.id ORDER BY r.key"
)
_RECORD_EVENTS = (
    "UPDATE events SET updated_at=?, status=(SELECT CASE WHEN SUM(d.status='pending') THEN 'pending'"
    " WHEN SUM(d.status='dead') THEN 'dead' WHEN SUM(d.status='delivered') THEN 'delivered'"
    " ELSE 'discarded' END FROM deliveries d WHERE d.event_id=events.id)"
    " WHERE id IN (SELECT value FROM json_each(?)) AND status NOT IN ('quarantined','filtered')"
    " AND EXISTS(SELECT 1 FROM deliveries d WHERE d.event_id=events.id)"
)


@redoable
def tx_record(conn: sqlite3.Connection, results: list[AttemptResult]) -> None:
    # Row by row: a batch's member split or sent again (several attempts of one delivery), or PostgreSQL's
    # dialect (a call's record, store/calls.py; its hot path has its own set-based `ops.record`).
    if len({r.delivery_id for r in results}) < len(results) or not isinstance(conn, sqlite3.Connection):
        _record_each(conn, results)
        return
    now = time.time()
    rows = orjson.dumps([attempt_row(r) for r in results]).decode()
    conn.execute(_RECORD_DELIVERIES, (now, rows))
    conn.execute(_RECORD_ATTEMPTS, (rows,))
    answered = [(r.delivery_id, _j(r.response), now) for r in results if r.response is not None]
    if answered:
        conn.executemany("INSERT OR REPLACE INTO responses(delivery_id, fields, at) VALUES(?,?,?)", answered)
    events = sorted({r.event_id for r in results if r.new_status != "pending"})
    if events:
        conn.execute(_RECORD_EVENTS, (now, orjson.dumps(events).decode()))


def _record_each(conn: sqlite3.Connection, results: list[AttemptResult]) -> None:
    """One delivery's attempts in order (a batch member split or sent again has several in one record)."""
    now = time.time()
    events: set[str] = set()
    for r in results:
        d, status, retry, next_at, last_error, *attempt = attempt_row(r)
        conn.execute(
            "UPDATE deliveries SET status=?, attempts=attempts+1, retries=retries+?, next_at=COALESCE(?, next_at),"
            " last_error=?, updated_at=? WHERE id=?",
            (status, retry, next_at, last_error, now, d),
        )
        conn.execute(
            "INSERT INTO attempts(delivery_id, n, started_at, latency_ms, status_code, outcome, excerpt, error)"
            " VALUES(?, (SELECT attempts FROM deliveries WHERE id=?), ?, ?, ?, ?, ?, ?)",
            (d, d, *attempt),
        )
        if r.response is not None:
            conn.execute(
                "INSERT OR REPLACE INTO responses(delivery_id, fields, at) VALUES(?,?,?)",
                (r.delivery_id, _j(r.response), now),
            )
        if r.new_status != "pending":
            events.add(r.event_id)
    for ev in events:
        refresh_event_status(conn, ev, now)


def q_response_fields(conn: sqlite3.Connection, event_id: str, destination: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT r.fields FROM responses r JOIN deliveries d ON d.id=r.delivery_id"
        " WHERE d.event_id=? AND d.destination=? ORDER BY d.id DESC LIMIT 1",
        (event_id, destination),
    ).fetchone()
    return None if row is None else orjson.loads(row[0])


def q_destination_states(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[str, str | None, float]]:
    return {
        (r["flow"], r["destination"]): (r["state"], r["reason"], r["since"])
        for r in conn.execute("SELECT * FROM destinations")
    }


def tx_set_destination_state(
    conn: sqlite3.Connection,
    flow: str,
    destination: str,
    state: str,
    reason: str | None,
    by: Actor | None = None,
) -> None:
    conn.execute(
        "INSERT INTO destinations(flow, destination, state, reason, since) VALUES(?,?,?,?,?)"
        " ON CONFLICT(flow, destination) DO UPDATE SET state=excluded.state, reason=excluded.reason,"
        " since=CASE WHEN destinations.state=excluded.state THEN destinations.since ELSE excluded.since END",
        (flow, destination, state, reason, time.time()),
    )
    if by is not None:
        action = "resume" if state == "active" else state
        tx_audit(conn, by.name, action, f"{flow}/{destination}", dict(by.detail), by.origin)
