"""The SQLite store's monitoring block: alert state, source health, and the alert loop's snapshot.

The alert loop's snapshot reads on a connection and thread of their own, with a timeout: a slow read
never delays the delivery feed on the shared reader. Alert states and source health have their tables.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from patchbay.store.base import (
    Accepted,
    AlertChange,
    FailedAttempt,
    NewEvent,
    Snapshot,
    SourceState,
)
from patchbay.store.retention import opened
from patchbay.store.sqlite_ops import q_destination_states, tx_accept
from patchbay.store.sqlite_schema import connect

T = TypeVar("T")


class _MonitorReader:
    """One thread and connection for the monitor's reads; a read past its timeout is interrupted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchbay-monitor")

    async def read(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        def run() -> T:
            if self.conn is None:
                self.conn = connect(self.path)
            return fn(self.conn, *args)

        fut = asyncio.get_running_loop().run_in_executor(self.exec, run)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            if self.conn is not None:
                self.conn.interrupt()  # the query stops; the next read tries again
            raise

    async def close(self) -> None:
        def shut() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

        await asyncio.get_running_loop().run_in_executor(self.exec, shut)
        self.exec.shutdown(wait=True)


def _first_attempt_at(conn: sqlite3.Connection, t: float) -> int:
    """The id just before the first attempt started at or after `t` (ids follow time closely: bisect them)."""
    lo, hi = conn.execute("SELECT MIN(id), MAX(id) FROM attempts").fetchone()
    if lo is None:
        return 0
    hi += 1
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute(
            "SELECT started_at FROM attempts WHERE id>=? ORDER BY id LIMIT 1", (mid,)
        ).fetchone()
        if row is None or row[0] >= t:
            hi = mid
        else:
            lo = mid + 1
    return int(lo) - 1


QUEUES_AT_ONCE = 400  # destinations a statement (two parameters each)
_PENDING = "FROM deliveries d WHERE d.flow=p.flow AND d.destination=p.dest AND d.status='pending'"


def _queues(
    conn: sqlite3.Connection, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, float | None]]:
    """Each destination's pending count and its oldest pending delivery's creation, a few hundred destinations
    a statement (one each cost an idle cluster's alert node a statement per destination every few seconds).
    The due index covers the count and the least id: no row is read but the oldest."""
    queue: dict[tuple[str, str], tuple[int, float | None]] = {}
    for i in range(0, len(pairs), QUEUES_AT_ONCE):
        part = pairs[i : i + QUEUES_AT_ONCE]
        rows = conn.execute(
            f"WITH p(flow, dest) AS (VALUES {','.join(['(?, ?)'] * len(part))})"
            f" SELECT p.flow, p.dest, (SELECT COUNT(*) {_PENDING}),"
            f" (SELECT created_at FROM deliveries WHERE id=(SELECT MIN(id) {_PENDING})) FROM p",
            [x for pair in part for x in pair],
        ).fetchall()
        queue.update({(r[0], r[1]): (r[2], r[3]) for r in rows})
    return queue


def q_snapshot(
    conn: sqlite3.Connection,
    now: float,
    after_id: int | None,
    seed_from: float,
    pairs: list[tuple[str, str]],
    dead_windows: set[float | None],
    count_after: int | None = None,
    drift_since: float | None = None,
) -> Snapshot:
    """One consistent read of all the rules and metrics need.

    New attempts are aggregated in SQL (only failures come back as rows): at thousands of deliveries
    a second, building a row per attempt here would hold the GIL long enough to delay webhook acks.
    """
    conn.execute("BEGIN")
    try:
        max_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM attempts").fetchone()[0]
        if after_id is None:
            after_id = _first_attempt_at(conn, seed_from)
        attempts = [
            FailedAttempt(*r)
            for r in conn.execute(
                "SELECT a.id, a.started_at, a.outcome, a.n, a.status_code, a.error, d.flow, d.destination"
                " FROM attempts a JOIN deliveries d ON d.id=a.delivery_id WHERE a.id>? AND a.id<=?"
                " AND a.outcome!='success' ORDER BY a.id",
                (after_id, max_id),
            )
        ]
        # The latest attempt per destination: its id per group, then those rows (by primary key).
        last = {
            (flow, dest): (at, outcome == "success")
            for flow, dest, at, outcome in conn.execute(
                "SELECT d.flow, d.destination, a.started_at, a.outcome"
                " FROM attempts a JOIN deliveries d ON d.id=a.delivery_id WHERE a.id IN ("
                "  SELECT MAX(a2.id) FROM attempts a2 JOIN deliveries d2 ON d2.id=a2.delivery_id"
                "  WHERE a2.id>? AND a2.id<=? GROUP BY d2.flow, d2.destination)",
                (after_id, max_id),
            )
        }
        retries: dict[tuple[str, str], int] = {}
        if count_after is not None:
            for flow, dest, n in conn.execute(
                "SELECT d.flow, d.destination, COUNT(*) FROM attempts a JOIN deliveries d ON d.id=a.delivery_id"
                " WHERE a.id>? AND a.id<=? AND a.n>1 GROUP BY d.flow, d.destination",
                (max(after_id, count_after), max_id),
            ):
                retries[(flow, dest)] = n
        queue = _queues(conn, pairs)
        dead: dict[float | None, dict[str, tuple[int, int]]] = {}
        for window in dead_windows:
            since = now - window if window is not None else 0.0
            per: dict[str, list[int]] = {}
            for flow, n in conn.execute(
                "SELECT flow, COUNT(*) FROM deliveries WHERE status='dead' AND updated_at>=? GROUP BY flow",
                (since,),
            ):
                per.setdefault(flow, [0, 0])[0] = n
            for flow, n in conn.execute(
                "SELECT flow, COUNT(*) FROM events"
                " WHERE status='quarantined' AND updated_at>=? GROUP BY flow",
                (since,),
            ):
                per.setdefault(flow, [0, 0])[1] = n
            dead[window] = {f: (v[0], v[1]) for f, v in per.items()}
        snap = Snapshot(
            now,
            q_destination_states(conn),
            queue,
            attempts,
            last,
            retries,
            {r["flow"]: dict(r) for r in conn.execute("SELECT * FROM schedules")},
            dead,
            {(r["rule"], r["subject"]): dict(r) for r in conn.execute("SELECT * FROM alerts")},
            q_source_states(conn),
            _drifted(conn, drift_since) if drift_since is not None else [],
            max(after_id, max_id),
            max_id,
        )
    finally:
        if conn.in_transaction:  # an interrupted query may have ended it already
            conn.execute("COMMIT")
    return snap


def _drifted(conn: sqlite3.Connection, since: float) -> list[tuple[str, int, int, str, list[str]]]:
    """Events since `since` whose trace has a contract drift entry, per flow and second: (flow, second,
    count, the latest event's id, its drift). Read once at start; later ones are fed as they happen."""
    out: list[tuple[str, int, int, str, list[str]]] = []
    for flow, second, n, last in conn.execute(
        "SELECT flow, CAST(received_at AS INTEGER), COUNT(*), MAX(id) FROM events"
        " WHERE received_at>=? AND trace LIKE ? GROUP BY flow, 2",
        (since, '%"kind":"contract"%'),
    ):
        trace = orjson.loads(
            opened(conn.execute("SELECT trace FROM events WHERE id=?", (last,)).fetchone()[0])
        )
        drift: list[str] = next((s["drift"] for s in trace if s.get("kind") == "contract"), [])
        out.append((flow, second, n, last, drift))
    # Answers that drifted from the flow's response contract: the attempt's note holds "DRIFT a; b".
    for flow, second, n, last_event, note in conn.execute(
        "SELECT d.flow, CAST(a.started_at AS INTEGER), COUNT(*), MAX(d.event_id), MAX(a.error) FROM attempts a"
        " JOIN deliveries d ON d.id = a.delivery_id"
        " WHERE a.started_at>=? AND a.outcome='success' AND a.error LIKE 'DRIFT response of %'"
        " GROUP BY d.flow, 2",
        (since,),
    ):
        out.append((flow, second, n, last_event, note.removeprefix("DRIFT ").split("; ")))
    return out


def tx_alert(conn: sqlite3.Connection, event: NewEvent, change: AlertChange) -> Accepted:
    """The message and the rule's new state, in one transaction: told once, whatever crashes when."""
    accepted = tx_accept(conn, event)
    firing = change.state == "firing"
    conn.execute(
        "INSERT INTO alerts(rule, subject, state, since, fired_at, cleared_at, detail, event_id, updated_at)"
        " VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(rule, subject) DO UPDATE SET state=excluded.state,"
        " since=excluded.since, fired_at=COALESCE(excluded.fired_at, alerts.fired_at),"
        " cleared_at=COALESCE(excluded.cleared_at, alerts.cleared_at), detail=excluded.detail,"
        " event_id=excluded.event_id, updated_at=excluded.updated_at",
        (
            change.rule,
            change.subject,
            change.state,
            change.since,
            change.at if firing else None,
            None if firing else change.at,
            change.detail,
            accepted.event_id,
            change.at,
        ),
    )
    return accepted


def q_source_states(conn: sqlite3.Connection) -> dict[str, SourceState]:
    return {
        r["flow"]: SourceState(r["flow"], r["state"], r["failures"], r["error"], r["since"], r["updated_at"])
        for r in conn.execute("SELECT * FROM sources")
    }


def tx_set_source_state(conn: sqlite3.Connection, s: SourceState) -> None:
    conn.execute(
        "INSERT INTO sources(flow, state, failures, error, since, updated_at) VALUES(?,?,?,?,?,?)"
        " ON CONFLICT(flow) DO UPDATE SET state=excluded.state, failures=excluded.failures,"
        " error=excluded.error, since=excluded.since, updated_at=excluded.updated_at",
        (s.flow, s.state, s.failures, s.error, s.since, s.updated_at),
    )
