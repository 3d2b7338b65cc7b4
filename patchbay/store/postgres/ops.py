"""Operations the PostgreSQL store does its own way (the rest are the shared query functions)."""

from __future__ import annotations

import time
import zlib
from base64 import b64encode
from typing import Any

from patchbay.store.common import _j, attempt_row, delivery_row, redoable
from patchbay.store.retention import ZMARK, due_for_compression
from patchbay.store.sqlite_ops import HEAD


def tx_compress(
    conn: Any, flow: str, before: float, limit: int, after: float | None = None
) -> tuple[int, float | None]:
    """Compress the payload of up to `limit` finished runs (as retention.tx_compress does). The trace stays
    text: PostgreSQL compresses a long text value itself (TOAST), and a text column cannot hold bytes."""
    rows = due_for_compression(conn, "id, payload", flow, before, limit, after)
    if rows:
        conn.executemany(
            "UPDATE events SET payload=? WHERE id=?",
            [(ZMARK + zlib.compress(bytes(payload), 6), eid) for eid, payload, _ in rows],
        )
    return len(rows), (rows[-1][-1] if rows else None)


# ================================================================== the hot path, one statement each
# These take the raw psycopg connection in autocommit mode: one statement is one transaction (and one
# round trip), committed durably by the server before it answers. `native` marks them for PostgresStore._run.


def native(fn: Any) -> Any:
    fn.native = True
    return fn


# Events and their deliveries (store/postgres/group.py gathers concurrent accepts): one statement, one
# COMMIT. Rows go in in the group's order, so the deliveries' ids keep the order of arrival.
# A group's rows go as one JSON text a table, each made by one orjson call: psycopg adapts every element of
# an array parameter in Python, which cost the hub 12 us an event as binary arrays and 18-24 us an attempt
# as text ones, against 1.5 and 0.6 us as JSON. The server reads it as jsonb, parsed once (as json, each
# `->>` parsed the row again: ~35 % more of the server's CPU per accept; as jsonb about the arrays'). A
# payload goes in base64, and a JSON value (meta, trace, request) as its text inside the text: PostgreSQL
# refuses a \u0000 escape anywhere in a JSON value it takes apart, and a NUL in a string is common enough.
_ACCEPT_MANY = """
WITH e AS (
  SELECT v->>0 AS id, v->>1 AS flow, v->>2 AS dedupe_key, v->>3 AS body_hash, (v->>4)::float8 AS received_at,
         v->>5 AS status, v->>6 AS record_key, v->>7 AS reason, decode(v->>8, 'base64') AS payload,
         v->>9 AS meta, v->>10 AS trace, ord
  FROM jsonb_array_elements(%(events)s::jsonb) WITH ORDINALITY AS j(v, ord)
), ev AS (
  INSERT INTO events(id, flow, dedupe_key, body_hash, received_at, updated_at, status, record_key, reason,
                     payload, meta, trace)
  SELECT id, flow, dedupe_key, body_hash, received_at, %(now)s, status, record_key, reason, payload, meta, trace
  FROM e ORDER BY ord
  ON CONFLICT (flow, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
  RETURNING id, received_at
), dl AS (
  INSERT INTO deliveries(event_id, flow, destination, status, request, idempotency_key, next_at, last_error,
                         created_at, updated_at, order_key)
  SELECT ev.id, v->>1, v->>2, v->>3, v->>4, v->>5, ev.received_at, v->>6, %(now)s, %(now)s, v->>7  -- delivery_row
  FROM jsonb_array_elements(%(deliveries)s::jsonb) WITH ORDINALITY AS d(v, ord)
  JOIN ev ON ev.id = v->>0
  ORDER BY d.ord
)
SELECT id FROM ev
"""

_DUPLICATES = """
SELECT flow, dedupe_key, id, body_hash FROM events
WHERE (flow, dedupe_key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
"""


def _accept_params(events: list[Any]) -> dict[str, Any]:
    return {
        "now": time.time(),
        "events": _j(
            [
                (
                    e.id,
                    e.flow,
                    e.dedupe_key,
                    e.body_hash,
                    e.received_at,
                    e.status,
                    e.record_key,
                    e.reason,
                    b64encode(e.payload).decode(),
                    _j(e.meta),
                    _j(e.trace),
                )
                for e in events
            ]
        ),
        "deliveries": _j([delivery_row(e, d) for e in events for d in e.deliveries]),
    }


def _duplicates_params(events: list[Any], written: set[str]) -> tuple[list[str], list[str]] | None:
    dups = [e for e in events if e.id not in written]
    return ([e.flow for e in dups], [e.dedupe_key for e in dups]) if dups else None


def _accepted(events: list[Any], written: set[str], found_rows: list[Any]) -> list[Any]:
    from patchbay.store.base import Accepted

    found = {(flow, key): (eid, body_hash) for flow, key, eid, body_hash in found_rows}
    out = []
    for e in events:
        if e.id in written:
            out.append(Accepted(e.id))
        else:
            eid, body_hash = found[(e.flow, e.dedupe_key)]
            out.append(Accepted(eid, duplicate=True, conflict=body_hash != e.body_hash))
    return out


@native
def accept_many(conn: Any, events: list[Any]) -> list[Any]:
    """Events and their deliveries in one statement (one round trip, one COMMIT); the duplicates of
    earlier events (a dedupe key seen, in this group or before) cost one more read, for all of them."""
    written = {r[0] for r in conn.execute(_ACCEPT_MANY, _accept_params(events)).fetchall()}
    dups = _duplicates_params(events, written)
    return _accepted(events, written, conn.execute(_DUPLICATES, dups).fetchall() if dups else [])


async def accept_many_async(conn: Any, events: list[Any]) -> list[Any]:
    """`accept_many` on an asyncio connection (`group.AsyncRaw`): the hot path on the hub's event loop."""
    written = {r[0] for r in await (await conn.execute(_ACCEPT_MANY, _accept_params(events))).fetchall()}
    dups = _duplicates_params(events, written)
    found = await (await conn.execute(_DUPLICATES, dups)).fetchall() if dups else []
    return _accepted(events, written, found)


@native
def accept(conn: Any, e: Any) -> Any:
    """One event and its deliveries: a group of one."""
    return accept_many(conn, [e])[0]


# Claims across workers (docs/delivery.md, "Many workers"): a claimed delivery (queued or in flight) carries its
# holder and lease in the row; the holder renews it every lease/3 while it holds it, so one whose holder died
# is taken over once the lease runs out (the hub's `claim_lease`, this by default).
LEASE_S = 30.0

_DUE = (
    """
UPDATE deliveries SET leased_by=%(holder)s, lease_until=%(until)s
WHERE id IN (
  SELECT d.id FROM deliveries d
  WHERE d.flow=%(flow)s AND d.destination=%(dest)s AND d.status='pending' AND d.next_at<=%(now)s
    AND d.id>%(after)s AND NOT (d.id = ANY(%(skip)s::bigint[]))
    AND (d.leased_by IS NULL OR d.leased_by=%(holder)s OR d.lease_until<%(now)s)
    AND """
    + HEAD
    + """
  ORDER BY d.id LIMIT %(limit)s
  FOR UPDATE OF d SKIP LOCKED
)
RETURNING id, event_id, request, idempotency_key, attempts, retries, next_at
"""
)

_NEXT_DUE = (
    """
SELECT p.flow, p.dest, (
  SELECT MIN(next_at) FROM deliveries d
  WHERE d.flow=p.flow AND d.destination=p.dest AND d.status='pending'
    AND (d.leased_by IS NULL OR d.leased_by=%(holder)s OR d.lease_until<%(now)s) AND """
    + HEAD
    + """
) FROM unnest(%(flows)s::text[], %(dests)s::text[]) AS p(flow, dest)
"""
)

_RENEW = """
UPDATE deliveries SET lease_until=%(until)s
WHERE id = ANY(%(ids)s::bigint[]) AND leased_by=%(holder)s AND status='pending'
RETURNING id
"""

_RELEASE = """
UPDATE deliveries SET leased_by=NULL, lease_until=NULL
WHERE id = ANY(%(ids)s::bigint[]) AND leased_by=%(holder)s AND status='pending'
"""


class Claims:
    """The statements of one holder's claims: deliveries (`due`), sending slots, leases' renewal."""

    def __init__(self, holder: str, lease_s: float = LEASE_S) -> None:
        self.holder = holder
        self.lease_s = lease_s

    @native
    def due(
        self, conn: Any, flow: str, destination: str, now: float, limit: int, skip: Any, after_id: int = 0
    ) -> list[Any]:
        """Claim the due deliveries (a lease in the row, SKIP LOCKED): several hubs can share the feed."""
        import orjson

        from patchbay.store.base import DueDelivery

        rows = conn.execute(
            _DUE,
            {
                "holder": self.holder,
                "until": now + self.lease_s,
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
            DueDelivery(r[0], r[1], flow, destination, orjson.loads(r[2]), r[3], r[4], r[5], r[6])
            for r in rows
        ]

    @native
    def next_due(self, conn: Any, pairs: Any) -> dict[tuple[str, str], float]:
        """The earliest each destination's deliveries this holder could claim come due (other holders' live
        claims are theirs), all in one statement."""
        import time

        pairs = list(dict.fromkeys(pairs))
        rows = conn.execute(
            _NEXT_DUE,
            {
                "flows": [f for f, _ in pairs],
                "dests": [d for _, d in pairs],
                "holder": self.holder,
                "now": time.time(),
            },
        ).fetchall()
        return {(r[0], r[1]): r[2] for r in rows if r[2] is not None}

    @native
    def renew(self, conn: Any, ids: Any) -> set[int]:
        import time

        rows = conn.execute(
            _RENEW, {"ids": sorted(ids), "holder": self.holder, "until": time.time() + self.lease_s}
        ).fetchall()
        return {r[0] for r in rows}

    @native
    def release(self, conn: Any, ids: Any) -> None:
        conn.execute(_RELEASE, {"ids": sorted(ids), "holder": self.holder})

    def take_slots(
        self, conn: Any, flow: str, destination: str, limit: int, want: int, busy: int, now: float
    ) -> int:
        """Sending slots 0..limit-1 of the destination, each held by one holder for the lease (one transaction,
        takers of one destination's slots one at a time). A holder's share is the limit divided by the holders
        that want slots now, rounded up; it keeps what it sends on (`busy`) even past its share."""
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (f"slots\x1f{flow}\x1f{destination}",)
        )
        conn.execute(
            "INSERT INTO delivery_slots(flow, destination, slot, holder, until)"
            " SELECT ?, ?, g, NULL, 0 FROM generate_series(0, ?) g ON CONFLICT DO NOTHING",
            (flow, destination, limit - 1),
        )
        if want > 0:
            conn.execute(
                "INSERT INTO delivery_wants(flow, destination, holder, until) VALUES(?,?,?,?)"
                " ON CONFLICT (flow, destination, holder) DO UPDATE SET until=excluded.until",
                (flow, destination, self.holder, now + self.lease_s),
            )
        else:
            conn.execute(
                "DELETE FROM delivery_wants WHERE flow=? AND destination=? AND (holder=? OR until<?)",
                (flow, destination, self.holder, now),
            )
        wanting = conn.execute(
            "SELECT COUNT(*) FROM delivery_wants WHERE flow=? AND destination=? AND until>=?",
            (flow, destination, now),
        ).fetchone()[0]
        rows = conn.execute(
            "SELECT slot, holder, until FROM delivery_slots WHERE flow=? AND destination=? ORDER BY slot",
            (flow, destination),
        ).fetchall()
        mine = [r[0] for r in rows if r[1] == self.holder and r[0] < limit]
        free = [r[0] for r in rows if r[0] < limit and r[1] != self.holder and (r[1] is None or r[2] < now)]
        share = -(-limit // max(1, wanting))
        target = max(min(want, share, len(mine) + len(free)), min(busy, len(mine)))
        keep = mine[:target] + free[: max(0, target - len(mine))]
        drop = [r[0] for r in rows if r[1] == self.holder and r[0] not in keep]
        if keep:
            conn.execute(
                "UPDATE delivery_slots SET holder=?, until=? WHERE flow=? AND destination=? AND slot = ANY(?)",
                (self.holder, now + self.lease_s, flow, destination, keep),
            )
        if drop:
            conn.execute(
                "UPDATE delivery_slots SET holder=NULL, until=0 WHERE flow=? AND destination=? AND slot = ANY(?)",
                (flow, destination, drop),
            )
        return len(keep)


def take_tokens(
    conn: Any, flow: str, destination: str, rate: float, burst: float, want: int, now: float
) -> tuple[int, float]:
    """Up to `want` tokens from the destination's bucket, one row shared by every holder (locked while taken)."""
    from patchbay.store.common import grant_tokens

    conn.execute(
        "INSERT INTO delivery_buckets(flow, destination, tokens, at) VALUES(?,?,?,?) ON CONFLICT DO NOTHING",
        (flow, destination, burst, now),
    )
    tokens, at = conn.execute(
        "SELECT tokens, at FROM delivery_buckets WHERE flow=? AND destination=? FOR UPDATE",
        (flow, destination),
    ).fetchone()
    left, granted, wait = grant_tokens(tokens, at, rate, burst, want, now)
    conn.execute(
        "UPDATE delivery_buckets SET tokens=?, at=? WHERE flow=? AND destination=?",
        (left, max(at, now), flow, destination),
    )
    return granted, wait


_RECORD = """
WITH r AS (
  SELECT (v->>0)::bigint AS did, v->>1 AS status, (v->>2)::int AS consumed, (v->>3)::float8 AS next_at,
         v->>4 AS last_error, (v->>5)::float8 AS started, (v->>6)::float8 AS latency, (v->>7)::int AS code,
         v->>8 AS outcome, v->>9 AS excerpt, v->>10 AS error, v->>11 AS response
  FROM jsonb_array_elements(%(results)s::jsonb) AS j(v)
), upd AS (
  UPDATE deliveries d SET status=r.status, attempts=d.attempts+1, retries=d.retries+r.consumed,
    next_at=COALESCE(r.next_at, d.next_at), last_error=r.last_error, updated_at=%(now)s,
    leased_by=NULL, lease_until=NULL
  FROM r WHERE d.id=r.did AND d.id = ANY(%(ids)b::bigint[])
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
  WHERE d.event_id = ANY(ARRAY(SELECT event_id FROM upd WHERE status!='pending'))
  GROUP BY d.event_id
)
UPDATE events e SET updated_at=%(now)s, status=CASE WHEN ev.pending>0 THEN 'pending' WHEN ev.dead>0 THEN 'dead'
  WHEN ev.delivered>0 THEN 'delivered' ELSE 'discarded' END
FROM ev WHERE e.id=ev.event_id AND e.status NOT IN ('quarantined','filtered')
  AND e.id = ANY(ARRAY(SELECT event_id FROM upd WHERE status!='pending'))
"""


def _record_params(results: list[Any]) -> dict[str, Any]:
    """The group's attempts as one JSON text (see _ACCEPT_MANY): each `attempt_row` and its answer's fields.
    Their ids go as an array too: PostgreSQL guesses 100 rows for any JSON set, and planned a scan of all of
    deliveries for that many; for an array it knows the length and looks each up in the primary key."""
    rows = [[*attempt_row(r), None if r.response is None else _j(r.response)] for r in results]
    return {"now": time.time(), "results": _j(rows), "ids": [r.delivery_id for r in results]}


def _distinct(results: list[Any]) -> bool:
    return len({r.delivery_id for r in results}) == len(results)


@redoable
@native
def record(conn: Any, results: list[Any]) -> None:
    """Every attempt, its delivery's new status (the lease let go) and the events that follow: one statement."""
    if not results:
        return
    if not _distinct(results):  # the same delivery twice: in order, one by one
        with conn.conn.transaction():
            for r in results:
                record(conn, [r])
        return
    conn.execute(_RECORD, _record_params(results))


@redoable
async def record_async(conn: Any, results: list[Any]) -> None:
    """`record` on an asyncio connection (`group.AsyncRaw`)."""
    if not results:
        return
    if not _distinct(results):  # the same delivery twice: in order, one by one
        async with conn.conn.transaction():
            for r in results:
                await record_async(conn, [r])
        return
    await conn.execute(_RECORD, _record_params(results))
