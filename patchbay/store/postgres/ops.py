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


# ================================================================== the hot path, one statement each
# These take the raw psycopg connection in autocommit mode: one statement is one transaction (and one
# round trip), committed durably by the server before it answers. `native` marks them for PostgresStore._run.


def native(fn: Any) -> Any:
    fn.native = True
    return fn


# Events and their deliveries (store/postgres/group.py gathers concurrent accepts): one statement, one
# COMMIT. Rows go in in the group's order, so the deliveries' ids keep the order of arrival. The arrays go
# in binary (%b): in text, psycopg escapes every JSON text and bytea element in Python, which cost more
# CPU than the rest of the accept.
_ACCEPT_MANY = """
WITH e AS (
  SELECT * FROM unnest(%(id)b::text[], %(flow)b::text[], %(dedupe_key)b::text[], %(body_hash)b::text[],
                       %(received_at)b::float8[], %(status)b::text[], %(record_key)b::text[], %(reason)b::text[],
                       %(payload)b::bytea[], %(meta)b::text[], %(trace)b::text[]) WITH ORDINALITY
    AS e(id, flow, dedupe_key, body_hash, received_at, status, record_key, reason, payload, meta, trace, ord)
), ev AS (
  INSERT INTO events(id, flow, dedupe_key, body_hash, received_at, updated_at, status, record_key, reason,
                     payload, meta, trace)
  SELECT id, flow, dedupe_key, body_hash, received_at, %(now)s, status, record_key, reason, payload, meta, trace
  FROM e ORDER BY ord
  ON CONFLICT (flow, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
  RETURNING id, received_at
), dl AS (
  INSERT INTO deliveries(event_id, flow, destination, status, request, idempotency_key, next_at, last_error,
                         created_at, updated_at)
  SELECT ev.id, d.flow, d.destination, d.status, d.request, d.ikey, ev.received_at, d.err, %(now)s, %(now)s
  FROM unnest(%(d_event)b::text[], %(d_flow)b::text[], %(d_dest)b::text[], %(d_status)b::text[],
              %(d_request)b::text[], %(d_ikey)b::text[], %(d_err)b::text[]) WITH ORDINALITY
    AS d(event_id, flow, destination, status, request, ikey, err, ord)
  JOIN ev ON ev.id = d.event_id
  ORDER BY d.ord
)
SELECT id FROM ev
"""

_DUPLICATES = """
SELECT flow, dedupe_key, id, body_hash FROM events
WHERE (flow, dedupe_key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
"""


@native
def accept_many(conn: Any, events: list[Any]) -> list[Any]:
    """Events and their deliveries in one statement (one round trip, one COMMIT); the duplicates of
    earlier events (a dedupe key seen, in this group or before) cost one more read, for all of them."""
    import time

    from patchbay.store.base import Accepted
    from patchbay.store.common import _j

    deliveries = [(e, d) for e in events for d in e.deliveries]
    rows = conn.execute(
        _ACCEPT_MANY,
        {
            "now": time.time(),
            "id": [e.id for e in events],
            "flow": [e.flow for e in events],
            "dedupe_key": [e.dedupe_key for e in events],
            "body_hash": [e.body_hash for e in events],
            "received_at": [e.received_at for e in events],
            "status": [e.status for e in events],
            "record_key": [e.record_key for e in events],
            "reason": [e.reason for e in events],
            "payload": [e.payload for e in events],
            "meta": [_j(e.meta) for e in events],
            "trace": [_j(e.trace) for e in events],
            "d_event": [e.id for e, _ in deliveries],
            "d_flow": [e.flow for e, _ in deliveries],
            "d_dest": [d.destination for _, d in deliveries],
            "d_status": [d.status for _, d in deliveries],
            "d_request": [_j(d.request) for _, d in deliveries],
            "d_ikey": [d.idempotency_key for _, d in deliveries],
            "d_err": [d.error for _, d in deliveries],
        },
    ).fetchall()
    written = {r[0] for r in rows}
    dups = [e for e in events if e.id not in written]
    found: dict[tuple[str, str], tuple[str, str]] = {}
    if dups:
        for flow, key, eid, body_hash in conn.execute(
            _DUPLICATES, ([e.flow for e in dups], [e.dedupe_key for e in dups])
        ).fetchall():
            found[(flow, key)] = (eid, body_hash)
    out = []
    for e in events:
        if e.id in written:
            out.append(Accepted(e.id))
        else:
            eid, body_hash = found[(e.flow, e.dedupe_key)]
            out.append(Accepted(eid, duplicate=True, conflict=body_hash != e.body_hash))
    return out


@native
def accept(conn: Any, e: Any) -> Any:
    """One event and its deliveries: a group of one."""
    return accept_many(conn, [e])[0]


LEASE_S = 300.0  # a claimed delivery another hub may take over after this long without an answer

_DUE = """
UPDATE deliveries SET leased_by=%(holder)s, lease_until=%(until)s
WHERE id IN (
  SELECT id FROM deliveries
  WHERE flow=%(flow)s AND destination=%(dest)s AND status='pending' AND next_at<=%(now)s AND id>%(after)s
    AND NOT (id = ANY(%(skip)s::bigint[]))
    AND (leased_by IS NULL OR leased_by=%(holder)s OR lease_until<%(now)s)
  ORDER BY id LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED
)
RETURNING id, event_id, request, idempotency_key, attempts, retries
"""


def due_for(holder: str) -> Any:
    @native
    def due(
        conn: Any, flow: str, destination: str, now: float, limit: int, skip: Any, after_id: int = 0
    ) -> list[Any]:
        """Claim the due deliveries (a lease in the row, SKIP LOCKED): several hubs can share the feed."""
        import orjson

        from patchbay.store.base import DueDelivery

        rows = conn.execute(
            _DUE,
            {
                "holder": holder,
                "until": now + LEASE_S,
                "flow": flow,
                "dest": destination,
                "now": now,
                "after": after_id,
                "skip": sorted(skip),
                "limit": limit,
            },
        ).fetchall()
        rows.sort(key=lambda r: r[0])  # RETURNING has no order: arrival order is the id's
        return [
            DueDelivery(r[0], r[1], flow, destination, orjson.loads(r[2]), r[3], r[4], r[5]) for r in rows
        ]

    return due


_RECORD = """
WITH r AS (
  SELECT * FROM unnest(%(did)s::bigint[], %(status)s::text[], %(consumed)s::int[], %(next_at)s::float8[],
                       %(last_error)s::text[], %(started)s::float8[], %(latency)s::float8[], %(code)s::int[],
                       %(outcome)s::text[], %(excerpt)s::text[], %(error)s::text[], %(response)s::text[])
    AS r(did, status, consumed, next_at, last_error, started, latency, code, outcome, excerpt, error, response)
), upd AS (
  UPDATE deliveries d SET status=r.status, attempts=d.attempts+1, retries=d.retries+r.consumed,
    next_at=COALESCE(r.next_at, d.next_at), last_error=r.last_error, updated_at=%(now)s,
    leased_by=NULL, lease_until=NULL
  FROM r WHERE d.id=r.did
  RETURNING d.id, d.attempts, d.event_id, d.status
), att AS (
  INSERT INTO attempts(delivery_id, n, started_at, latency_ms, status_code, outcome, excerpt, error)
  SELECT r.did, upd.attempts, r.started, r.latency, r.code, r.outcome, r.excerpt, r.error
  FROM r JOIN upd ON upd.id=r.did ORDER BY r.did
), resp AS (
  INSERT INTO responses(delivery_id, fields, at)
  SELECT r.did, r.response, %(now)s FROM r WHERE r.response IS NOT NULL
  ON CONFLICT (delivery_id) DO UPDATE SET fields=excluded.fields, at=excluded.at
), ev AS (
  SELECT d.event_id,
    SUM(CASE WHEN COALESCE(u.status, d.status)='pending' THEN 1 ELSE 0 END) AS pending,
    SUM(CASE WHEN COALESCE(u.status, d.status)='dead' THEN 1 ELSE 0 END) AS dead,
    SUM(CASE WHEN COALESCE(u.status, d.status)='delivered' THEN 1 ELSE 0 END) AS delivered
  FROM deliveries d LEFT JOIN upd u ON u.id=d.id
  WHERE d.event_id IN (SELECT event_id FROM upd WHERE status!='pending')
  GROUP BY d.event_id
)
UPDATE events e SET updated_at=%(now)s, status=CASE WHEN ev.pending>0 THEN 'pending' WHEN ev.dead>0 THEN 'dead'
  WHEN ev.delivered>0 THEN 'delivered' ELSE 'discarded' END
FROM ev WHERE e.id=ev.event_id AND e.status NOT IN ('quarantined','filtered')
"""


@native
def record(conn: Any, results: list[Any]) -> None:
    """Every attempt, its delivery's new status (the lease let go) and the events that follow: one statement."""
    import time

    from patchbay.store.common import _j

    if not results:
        return
    if len({r.delivery_id for r in results}) != len(results):  # the same delivery twice: in order, one by one
        with conn.conn.transaction():
            for r in results:
                record(conn, [r])
        return
    conn.execute(
        _RECORD,
        {
            "now": time.time(),
            "did": [r.delivery_id for r in results],
            "status": [r.new_status for r in results],
            "consumed": [1 if r.consumed_retry else 0 for r in results],
            "next_at": [r.next_at for r in results],
            "last_error": [
                None if r.outcome == "success" else (r.error or f"HTTP {r.status_code}") for r in results
            ],
            "started": [r.started_at for r in results],
            "latency": [r.latency_ms for r in results],
            "code": [r.status_code for r in results],
            "outcome": [r.outcome for r in results],
            "excerpt": [r.excerpt for r in results],
            "error": [r.error for r in results],
            "response": [None if r.response is None else _j(r.response) for r in results],
        },
    )
