"""Queries the REST API needs beyond store/queries.py: flow statistics, destination backlogs, dead
letters grouped by reason, discards, schedules and cursors."""

from __future__ import annotations

import math
import sqlite3
import time
from typing import Any

import orjson

from patchbay.store.base import Actor, DiscardReport
from patchbay.store.common import refresh_event_status, tx_audit

WINDOWS = {"hour": 3600.0, "day": 86400.0}
FAILED = ("dead", "quarantined")
P95_SAMPLE = 10_000  # percentiles over the newest runs of the window: bounded work per request


def _p95(conn: sqlite3.Connection, sql: str, args: list[Any]) -> float | None:
    """The 95th percentile (nearest rank) of the column `sql` selects, over its newest P95_SAMPLE rows."""
    rows = conn.execute(sql + " ORDER BY e.received_at DESC LIMIT ?", [*args, P95_SAMPLE])
    values = sorted(r[0] for r in rows if r[0] is not None)
    if not values:
        return None
    return round(float(values[max(1, math.ceil(0.95 * len(values))) - 1]), 2)


def flow_stats(
    conn: sqlite3.Connection, flows: list[str], now: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per flow: the last run, and for the last hour and day the runs by outcome, the success rate
    (delivered / (delivered + dead + quarantined); pending and filtered runs are not counted), the
    p95 latency of delivery attempts and the p95 time from receipt to delivery."""
    now = time.time() if now is None else now
    out: dict[str, dict[str, Any]] = {}
    for flow in flows:
        last = conn.execute(
            "SELECT id, status, received_at, record_key FROM events WHERE flow=?"
            " ORDER BY received_at DESC, seq DESC LIMIT 1",
            (flow,),
        ).fetchone()
        stats: dict[str, Any] = {"last_run": dict(last) if last else None}
        for window, seconds in WINDOWS.items():
            since = now - seconds
            by_status = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT status, COUNT(*) FROM events WHERE flow=? AND received_at>=? GROUP BY status",
                    (flow, since),
                )
            }
            delivered = by_status.get("delivered", 0)
            failed = sum(by_status.get(s, 0) for s in FAILED)
            attempts = (
                "SELECT a.latency_ms FROM events e JOIN deliveries d ON d.event_id=e.id"
                " JOIN attempts a ON a.delivery_id=d.id WHERE e.flow=? AND e.received_at>=?"
            )
            e2e = (
                "SELECT (e.updated_at - e.received_at) * 1000.0 FROM events e"
                " WHERE e.flow=? AND e.received_at>=? AND e.status='delivered'"
            )
            stats[window] = {
                "runs": sum(by_status.values()),
                "by_status": by_status,
                "success_rate": round(delivered / (delivered + failed), 4) if delivered + failed else None,
                "p95_latency_ms": _p95(conn, attempts, [flow, since]),
                "p95_end_to_end_ms": _p95(conn, e2e, [flow, since]),
            }
        out[flow] = stats
    return out


def destination_backlog(
    conn: sqlite3.Connection, now: float | None = None
) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (flow, destination): deliveries pending, of those retrying, dead, and dead in the last hour."""
    now = time.time() if now is None else now
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in conn.execute(
        "SELECT flow, destination, SUM(status='pending') AS pending,"
        " SUM(status='pending' AND retries>0) AS retrying, SUM(status='dead') AS dead,"
        " SUM(status='dead' AND updated_at>=?) AS dead_last_hour,"
        " MIN(CASE WHEN status='pending' THEN next_at END) AS next_due_at"
        " FROM deliveries WHERE status IN ('pending','dead') GROUP BY flow, destination",
        (now - 3600.0,),
    ):
        out[(r["flow"], r["destination"])] = {
            "pending": r["pending"] or 0,
            "retrying": r["retrying"] or 0,
            "dead": r["dead"] or 0,
            "dead_last_hour": r["dead_last_hour"] or 0,
            "next_due_at": r["next_due_at"],
        }
    return out


def _dead_union(flow: str | None, destination: str | None, reason: str | None) -> tuple[str, list[Any]]:
    d_where, e_where = ["d.status='dead'"], ["e.status='quarantined'"]
    d_args: list[Any] = []
    e_args: list[Any] = []
    if flow:
        d_where.append("d.flow=?")
        d_args.append(flow)
        e_where.append("e.flow=?")
        e_args.append(flow)
    if reason is not None:  # a prefix, so a long reason can be named by its start
        d_where.append("substr(COALESCE(d.last_error,''), 1, ?)=?")
        d_args += [len(reason), reason]
        e_where.append("substr(COALESCE(e.reason,''), 1, ?)=?")
        e_args += [len(reason), reason]
    if destination:
        d_where.append("d.destination=?")
        d_args.append(destination)
        e_where.append("1=0")  # a quarantined event never reached a destination
    sql = (
        "SELECT 'delivery' AS kind, d.event_id, d.flow, d.destination, COALESCE(d.last_error,'') AS reason,"
        " d.updated_at AS at, d.attempts, e.record_key, e.received_at"
        " FROM deliveries d JOIN events e ON e.id=d.event_id"
        " WHERE "
        + " AND ".join(d_where)
        + " UNION ALL SELECT 'quarantine', e.id, e.flow, NULL, COALESCE(e.reason,''), e.updated_at, 0,"
        " e.record_key, e.received_at FROM events e WHERE " + " AND ".join(e_where)
    )
    return sql, [*d_args, *e_args]


def dead_letters(
    conn: sqlite3.Connection,
    flow: str | None = None,
    destination: str | None = None,
    reason: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Dead deliveries and quarantined events: grouped by flow, destination and reason; the newest items."""
    sql, args = _dead_union(flow, destination, reason)
    groups = [
        dict(r)
        for r in conn.execute(
            f"SELECT kind, flow, destination, reason, COUNT(*) AS count, MIN(at) AS first_at,"
            f" MAX(at) AS last_at FROM ({sql}) AS dl GROUP BY kind, flow, destination, reason"
            " ORDER BY last_at DESC",
            args,
        )
    ]
    items = [
        dict(r) for r in conn.execute(f"SELECT * FROM ({sql}) AS dl ORDER BY at DESC LIMIT ?", [*args, limit])
    ]
    total = sum(g["count"] for g in groups)
    return {"total": total, "groups": groups, "items": items}


def dead_event_ids(
    conn: sqlite3.Connection, flow: str | None, destination: str | None, reason: str | None
) -> list[str]:
    """Ids of the events with a matching dead delivery or quarantine, oldest first, each once."""
    sql, args = _dead_union(flow, destination, reason)
    sql = f"SELECT event_id FROM ({sql}) AS dl GROUP BY event_id ORDER BY MIN(received_at)"
    return [r[0] for r in conn.execute(sql, args)]


def tx_discard(
    conn: sqlite3.Connection,
    event_ids: list[str],
    destination: str | None,
    by: Actor,
) -> DiscardReport:
    """Give up on dead deliveries (status `discarded`) and quarantined events; audited one by one."""
    rep = DiscardReport()
    now = time.time()
    for raw in event_ids:
        eid = raw if raw.startswith("evt_") else f"evt_{raw}"
        row = conn.execute("SELECT status FROM events WHERE id=?", (eid,)).fetchone()
        if row is None:
            rep.skipped.append((eid, "no such event"))
            continue
        n = 0
        if row["status"] == "quarantined" and destination is None:
            conn.execute("UPDATE events SET status='discarded', updated_at=? WHERE id=?", (now, eid))
            n = 1
        else:
            sql = "UPDATE deliveries SET status='discarded', updated_at=? WHERE event_id=? AND status='dead'"
            args: list[Any] = [now, eid]
            if destination:
                sql += " AND destination=?"
                args.append(destination)
            n = conn.execute(sql, args).rowcount
            if n:
                refresh_event_status(conn, eid, now)
        if not n:
            rep.skipped.append((eid, f"nothing to discard (status {row['status']})"))
            continue
        detail = {**by.detail, "destination": destination, "deliveries": n}
        tx_audit(conn, by.name, "discard", eid, detail, by.origin)
        rep.discarded.append(eid)
    return rep


def q_schedules(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    return {r["flow"]: dict(r) for r in conn.execute("SELECT * FROM schedules")}


def q_cursor_row(conn: sqlite3.Connection, flow: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT value, updated_at FROM cursors WHERE flow=?", (flow,)).fetchone()
    if row is None:
        return None
    return {"value": orjson.loads(row["value"]), "updated_at": row["updated_at"]}


def counts_by_flow(conn: sqlite3.Connection) -> dict[str, dict[str, dict[str, int]]]:
    """Per flow: events by status and deliveries by status, over all time."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for r in conn.execute("SELECT flow, status, COUNT(*) FROM events GROUP BY flow, status"):
        out.setdefault(r[0], {"events": {}, "deliveries": {}})["events"][r[1]] = r[2]
    for r in conn.execute("SELECT flow, status, COUNT(*) FROM deliveries GROUP BY flow, status"):
        out.setdefault(r[0], {"events": {}, "deliveries": {}})["deliveries"][r[1]] = r[2]
    return out
