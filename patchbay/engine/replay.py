"""Replay dead letters and quarantined events through the flow as it is configured now."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from patchbay.engine.pipeline import Pipeline
from patchbay.errors import PatchbayError
from patchbay.store.sqlite import _j, refresh_event_status, tx_audit


@dataclass
class ReplayReport:
    requeued: list[str] = field(default_factory=list)  # event ids with deliveries due again
    still_invalid: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_replayable(
    conn: Any, *, event_ids: list[str] | None, flow: str | None, destination: str | None
) -> list[str]:
    if event_ids:
        return [e if e.startswith("evt_") else f"evt_{e}" for e in event_ids]
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
    conn: Any,
    pipelines: dict[str, Pipeline],
    event_ids: list[str],
    destination: str | None,
    actor: str = "cli",
    origin: str = "",
) -> ReplayReport:
    """Re-run each event's steps from its original payload and requeue what is dead or was quarantined."""
    rep = ReplayReport()
    now = time.time()
    for eid in event_ids:
        row = conn.execute("SELECT id, flow, status, payload FROM events WHERE id=?", (eid,)).fetchone()
        if row is None:
            rep.skipped.append((eid, "no such event"))
            continue
        pipe = pipelines.get(row["flow"])
        if pipe is None:
            rep.skipped.append((eid, f"flow {row['flow']!r} is no longer configured"))
            continue
        dead = {
            d["destination"]: d["id"]
            for d in conn.execute(
                "SELECT id, destination FROM deliveries WHERE event_id=? AND status='dead'", (eid,)
            )
        }
        if row["status"] != "quarantined" and not dead:
            rep.skipped.append((eid, f"nothing to replay (status {row['status']})"))
            continue
        try:
            record = pipe.load_payload(row["payload"])
        except PatchbayError as exc:  # e.g. encrypted fields whose key is gone: say so, replay the rest
            rep.skipped.append((eid, str(exc)))
            continue
        processed = pipe.process(record, eid)
        if processed.status != "pending":
            conn.execute(
                "UPDATE events SET trace=?, reason=?, updated_at=? WHERE id=?",
                (_j(processed.trace), processed.reason, now, eid),
            )
            rep.still_invalid.append((eid, processed.reason or processed.status))
            continue
        existing = {
            d["destination"]
            for d in conn.execute("SELECT destination FROM deliveries WHERE event_id=?", (eid,))
        }
        touched = False
        for nd in processed.deliveries:
            if destination and nd.destination != destination:
                continue
            if nd.destination in dead:
                conn.execute(
                    "UPDATE deliveries SET status='pending', request=?, retries=0, next_at=?, updated_at=? WHERE id=?",
                    (_j(nd.request), now, now, dead[nd.destination]),
                )
                touched = True
            elif nd.destination not in existing:
                conn.execute(
                    "INSERT INTO deliveries(event_id, flow, destination, status, request, idempotency_key, next_at,"
                    " created_at, updated_at) VALUES(?,?,?,'pending',?,?,?,?,?)",
                    (eid, row["flow"], nd.destination, _j(nd.request), nd.idempotency_key, now, now, now),
                )
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
        tx_audit(conn, actor, "replay", eid, {"destination": destination}, origin)
        rep.requeued.append(eid)
    return rep
