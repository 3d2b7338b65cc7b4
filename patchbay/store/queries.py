"""Queries of runs, traces and dead letters, and replay: what the CLI and the API show and do."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from patchbay.errors import PatchbayError
from patchbay.store import windows as wq
from patchbay.store.base import Actor, NewEvent, ReplayReport, Reprocessor, RunFilter
from patchbay.store.calls import q_answers
from patchbay.store.common import _j, refresh_event_status, tx_audit
from patchbay.store.retention import opened

QUARANTINE_PREFIX = "quarantine:"  # a split element's quarantine row (engine/pipeline.py)

__all__ = ["RunFilter", "counts", "get_run", "list_dead", "list_runs", "q_replayable", "tx_replay"]


def list_runs(conn: sqlite3.Connection, f: RunFilter) -> list[dict[str, Any]]:
    where: list[str] = []
    args: list[Any] = []
    if f.flow:
        where.append("e.flow=?")
        args.append(f.flow)
    if f.status:
        where.append("e.status=?")
        args.append(f.status)
    if f.since is not None:
        where.append("e.received_at>=?")
        args.append(f.since)
    if f.until is not None:
        where.append("e.received_at<?")
        args.append(f.until)
    if f.key:
        where.append("(e.record_key=? OR e.record_key=lower(?))")
        args += [f.key, f.key]
    sql = (
        "SELECT e.id, e.flow, e.status, e.received_at, e.updated_at, e.record_key,"
        # Why it is not delivered: the step's reason, else the failing destination's last error.
        " COALESCE(e.reason, (SELECT d.destination || ': ' || d.last_error FROM deliveries d"
        "   WHERE d.event_id=e.id AND d.last_error IS NOT NULL AND d.status!='delivered'"
        "   ORDER BY d.status='dead' DESC, d.id LIMIT 1)) AS reason,"
        " (SELECT COUNT(*) FROM deliveries d WHERE d.event_id=e.id) AS deliveries,"
        " (SELECT COALESCE(SUM(d.attempts),0) FROM deliveries d WHERE d.event_id=e.id) AS attempts"
        " FROM events e" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.seq DESC LIMIT ?"
    )
    args.append(f.limit)
    return [dict(r) for r in conn.execute(sql, args)]


def get_run(conn: sqlite3.Connection, event_id: str) -> dict[str, Any] | None:
    """One run as stored: the event, its deliveries and their attempts (redacting is the caller's)."""
    row = conn.execute("SELECT * FROM events WHERE id=? OR id=?", (event_id, f"evt_{event_id}")).fetchone()
    if row is None:
        return None
    run = dict(row)
    run["payload"] = _loads(opened(run["payload"]))
    run["meta"] = orjson.loads(run["meta"])
    run["trace"] = orjson.loads(opened(run["trace"]))
    run["deliveries"] = []
    for d in conn.execute("SELECT * FROM deliveries WHERE event_id=? ORDER BY id", (run["id"],)):
        dd = dict(d)
        dd["request"] = orjson.loads(dd["request"])
        dd["attempts_log"] = [
            dict(a)
            for a in conn.execute("SELECT * FROM attempts WHERE delivery_id=? ORDER BY n, id", (d["id"],))
        ]
        resp = conn.execute("SELECT fields FROM responses WHERE delivery_id=?", (d["id"],)).fetchone()
        dd["response"] = None if resp is None else orjson.loads(resp[0])
        run["deliveries"].append(dd)
    return run


def q_recent_payloads(conn: sqlite3.Connection, flow: str, limit: int) -> list[tuple[str, float, bytes]]:
    rows = conn.execute(
        "SELECT id, received_at, payload FROM events WHERE flow=? ORDER BY received_at DESC, id DESC LIMIT ?",
        (flow, limit),
    ).fetchall()
    return [(r[0], r[1], opened(r[2])) for r in rows]


def q_recent_answers(conn: sqlite3.Connection, flow: str, limit: int) -> list[tuple[str, str, float, str]]:
    rows = conn.execute(
        "SELECT d.destination, d.event_id, a.started_at, a.excerpt FROM attempts a"
        " JOIN deliveries d ON d.id = a.delivery_id"
        " WHERE d.flow=? AND a.outcome='success' ORDER BY a.started_at DESC, a.id DESC LIMIT ?",
        (flow, limit),
    ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def list_dead(conn: sqlite3.Connection, flow: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Dead deliveries and quarantined events, newest first, each with its reason and the destination's
    last answer (`response`); as stored (scrubbing sensitive values is the caller's)."""
    args: list[Any] = []
    fl = ""
    if flow:
        fl = " AND flow=?"
        args.append(flow)
    rows = conn.execute(
        "SELECT 'delivery' AS kind, d.event_id, d.flow, d.destination, d.last_error AS reason, d.updated_at AS at,"
        " d.attempts, e.record_key, (SELECT a.excerpt FROM attempts a WHERE a.delivery_id=d.id"
        "   ORDER BY a.n DESC, a.id DESC LIMIT 1) AS response"
        " FROM deliveries d JOIN events e ON e.id=d.event_id WHERE d.status='dead'"
        + fl.replace("flow", "d.flow")
        + " UNION ALL SELECT 'quarantine', id, flow, NULL, reason, updated_at, 0, record_key, '' FROM events"
        " WHERE status='quarantined'" + fl + " ORDER BY at DESC LIMIT ?",
        [*args, *args, limit],
    ).fetchall()
    out = [dict(r) for r in rows]
    for r in out:
        r["response"] = r["response"] or ""
    return out


def counts(conn: sqlite3.Connection) -> dict[str, Any]:
    ev = {r[0]: r[1] for r in conn.execute("SELECT status, COUNT(*) FROM events GROUP BY status")}
    dl = {r[0]: r[1] for r in conn.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status")}
    return {"events": ev, "deliveries": dl}


def _loads(b: bytes) -> Any:
    try:
        return orjson.loads(b)
    except orjson.JSONDecodeError:
        return b.decode("utf-8", "replace")


def q_replayable(conn: sqlite3.Connection, flow: str | None, destination: str | None) -> list[str]:
    """Events with a dead delivery (to `destination`) or quarantined, in arrival order."""
    where = [
        "(e.status='quarantined' OR EXISTS(SELECT 1 FROM deliveries d WHERE d.event_id=e.id AND d.status='dead'"
        + (" AND d.destination=?" if destination else "")
        + "))"
    ]
    args: list[Any] = [destination] if destination else []
    if flow:
        where.append("e.flow=?")
        args.append(flow)
    sql = "SELECT e.id FROM events e WHERE " + " AND ".join(where) + " ORDER BY e.seq"
    return [r[0] for r in conn.execute(sql, args)]


def tx_replay(
    conn: sqlite3.Connection,
    pipelines: Mapping[str, Reprocessor],
    event_ids: Sequence[str],
    destination: str | None,
    by: Actor,
) -> ReplayReport:
    """Re-run each event's steps from its original payload and requeue what is dead or was quarantined."""
    rep = ReplayReport()
    now = time.time()
    for eid in event_ids:
        row = conn.execute(
            "SELECT id, flow, status, payload, received_at, meta FROM events WHERE id=?", (eid,)
        ).fetchone()
        if row is None:
            rep.skipped.append((eid, "no such event"))
            continue
        pipe = pipelines.get(row["flow"])
        if pipe is None:
            rep.skipped.append((eid, f"flow {row['flow']!r} is no longer configured"))
            continue
        dead = {  # by (destination, key): after a split an event has one delivery per element
            (d["destination"], d["idempotency_key"]): d["id"]
            for d in conn.execute(
                "SELECT id, destination, idempotency_key FROM deliveries WHERE event_id=? AND status='dead'",
                (eid,),
            )
        }
        if row["status"] != "quarantined" and not dead:
            rep.skipped.append((eid, f"nothing to replay (status {row['status']})"))
            continue
        try:
            record = pipe.load_payload(opened(row["payload"]))
        except PatchbayError as exc:  # e.g. encrypted fields whose key is gone: say so, replay the rest
            rep.skipped.append((eid, str(exc)))
            continue
        meta = orjson.loads(row["meta"] or "{}")
        after = meta.get("after_step")  # a window's record runs the steps after its aggregate
        answers = q_answers(conn, eid)  # answered calls are not asked again: the run resumes where it stopped
        processed = pipe.process(
            record,
            eid,
            answers=answers or None,
            received_at=row["received_at"],
            after=after,
            note=meta.get("window") if after else None,
        )
        status, reason, trace = processed.status, processed.reason, processed.trace
        if processed.claims or processed.windows:  # dedupe keys and windows, settled here as at accept
            gated = NewEvent(
                eid, row["flow"], row["received_at"], b"", "", None, status, trace=trace,
                claims=processed.claims, windows=processed.windows,
            )  # fmt: skip
            gated.reason, gated.deliveries = reason, processed.deliveries
            gated = wq.drop_duplicate_elements(
                conn, gated, now
            )  # a split element's duplicate key: dropped alone
            status, reason, trace, processed.deliveries = (
                gated.status,
                gated.reason,
                gated.trace,
                gated.deliveries,
            )
            seen: wq.Seen = {}
            refused = wq.refusal(conn, gated, now, seen)
            if refused is not None:
                status, reason, trace = refused
            else:
                wq.apply_gates(conn, gated, now, seen)
        if status == "aggregated":  # counted into its window now; the window's record goes on later
            conn.execute(
                "UPDATE events SET status='aggregated', trace=?, reason=NULL, updated_at=? WHERE id=?",
                (_j(trace), now, eid),
            )
            tx_audit(conn, by.name, "replay", eid, {"destination": destination, **by.detail}, by.origin)
            rep.requeued.append(eid)
            continue
        if status != "pending":
            conn.execute(
                "UPDATE events SET trace=?, reason=?, updated_at=? WHERE id=?",
                (_j(trace), reason, now, eid),
            )
            rep.still_invalid.append((eid, reason or status))
            continue
        existing = {
            (d["destination"], d["idempotency_key"])
            for d in conn.execute(
                "SELECT destination, idempotency_key FROM deliveries WHERE event_id=?", (eid,)
            )
        }
        touched = False
        wanted = set()
        for nd in processed.deliveries:
            at = (nd.destination, nd.idempotency_key)
            wanted.add(at)
            if destination and nd.destination != destination:
                continue
            if nd.status != "pending":  # a split element still quarantined: its dead row stays
                continue
            if at in dead:
                conn.execute(
                    "UPDATE deliveries SET status='pending', request=?, retries=0, next_at=?, updated_at=?,"
                    " order_key=? WHERE id=?",
                    (_j(nd.request), now, now, nd.order_key, dead[at]),
                )
                touched = True
            elif at not in existing:
                conn.execute(
                    "INSERT INTO deliveries(event_id, flow, destination, status, request, idempotency_key, next_at,"
                    " created_at, updated_at, order_key) VALUES(?,?,?,'pending',?,?,?,?,?,?)",
                    (
                        eid,
                        row["flow"],
                        nd.destination,
                        _j(nd.request),
                        nd.idempotency_key,
                        now,
                        now,
                        now,
                        nd.order_key,
                    ),
                )
                touched = True
        for at, did in dead.items():  # a split element that was quarantined and now passes
            if at[0].startswith(QUARANTINE_PREFIX) and at not in wanted and not destination:
                conn.execute("UPDATE deliveries SET status='discarded', updated_at=? WHERE id=?", (now, did))
                touched = True
        if not touched:
            rep.skipped.append((eid, "no dead delivery matches"))
            continue
        conn.execute(
            "UPDATE events SET status='pending', trace=?, reason=NULL, record_key=COALESCE(?, record_key),"
            " updated_at=? WHERE id=?",
            (_j(processed.trace), processed.record_key, now, eid),
        )
        refresh_event_status(conn, eid, now)
        tx_audit(conn, by.name, "replay", eid, {"destination": destination, **by.detail}, by.origin)
        rep.requeued.append(eid)
    return rep
