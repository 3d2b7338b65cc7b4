"""Aggregate windows and dedupe keys in SQLite: decided and written inside the accept's transaction.

A record adds deltas to its window (`n = n + 1`, `total = total + x`, ...) in the transaction that
stores its event, so a crash never counts it twice or loses it. A window is emitted once per revision:
its record is an event whose dedupe key names the window and revision, stored with the window's
`emitted_adds` in one transaction (`tx_emit_window`).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from typing import Any

from patchbay.store.base import (
    Accepted,
    DedupeClaim,
    NewEvent,
    ValueState,
    WindowAdd,
    WindowState,
)

WINDOW_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows(
  flow TEXT NOT NULL,
  step TEXT NOT NULL,
  start REAL NOT NULL,
  key TEXT NOT NULL,
  end_at REAL NOT NULL,
  close_at REAL NOT NULL,      -- emit when now >= close_at and adds > emitted_adds
  purge_at REAL NOT NULL,      -- let the state go when now >= purge_at and nothing is left to emit
  label TEXT NOT NULL,
  adds INTEGER NOT NULL DEFAULT 0,
  emitted_adds INTEGER NOT NULL DEFAULT 0,
  revisions INTEGER NOT NULL DEFAULT 0,
  opened_at REAL NOT NULL,
  PRIMARY KEY(flow, step, start, key)
);
CREATE INDEX IF NOT EXISTS windows_due ON windows(close_at) WHERE adds>emitted_adds;
CREATE INDEX IF NOT EXISTS windows_purge ON windows(purge_at);
CREATE INDEX IF NOT EXISTS windows_open ON windows(flow) WHERE adds>emitted_adds;
CREATE TABLE IF NOT EXISTS window_values(
  flow TEXT NOT NULL,
  step TEXT NOT NULL,
  start REAL NOT NULL,
  key TEXT NOT NULL,
  name TEXT NOT NULL,
  n INTEGER NOT NULL DEFAULT 0,
  total REAL NOT NULL DEFAULT 0,
  scale INTEGER NOT NULL DEFAULT 0,
  is_float INTEGER NOT NULL DEFAULT 0,
  lo,
  hi,
  PRIMARY KEY(flow, step, start, key, name)
);
CREATE TABLE IF NOT EXISTS window_items(
  flow TEXT NOT NULL,
  step TEXT NOT NULL,
  start REAL NOT NULL,
  key TEXT NOT NULL,
  name TEXT NOT NULL,
  item TEXT NOT NULL,
  PRIMARY KEY(flow, step, start, key, name, item)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedupe_keys(
  flow TEXT NOT NULL,
  step TEXT NOT NULL,
  key TEXT NOT NULL,
  run TEXT NOT NULL,
  expires_at REAL NOT NULL,
  PRIMARY KEY(flow, step, key)
);
CREATE INDEX IF NOT EXISTS dedupe_expiry ON dedupe_keys(expires_at);
"""

# A late record that revises an emitted window waits this long for others to join its revision.
REVISE_AFTER_S = 2.0

_PK = "flow=? AND step=? AND start=? AND key=?"


def _late(conn: sqlite3.Connection, flow: str, w: WindowAdd, now: float) -> tuple[bool, Any]:
    """Is the record late for its window (past end + grace, or the window already emitted), and its row."""
    row = conn.execute(
        f"SELECT close_at, revisions, adds, emitted_adds FROM windows WHERE {_PK}",
        (flow, w.step, w.start, w.key),
    ).fetchone()
    if row is None:
        return w.end + w.grace_s <= now, None
    return row["revisions"] > 0 or row["close_at"] <= now, row


def gates(e: NewEvent) -> tuple[list[DedupeClaim], list[WindowAdd]]:
    """What of `e`'s claims and windows counts: a key is claimed only by a record that gets through
    (pending or aggregated: a record filtered later must not shadow the next one), a window counts
    every record that passed its step unless it was quarantined (replay counts it once fixed)."""
    claims = e.claims if e.status in ("pending", "aggregated") else []
    windows = e.windows if e.status != "quarantined" else []
    return claims, windows


def owner(event_id: str, claim: DedupeClaim) -> str:
    """Who holds a dedupe key: the run, or after a split one element of it (`<run>#<element>`)."""
    return event_id if claim.element is None else f"{event_id}#{claim.element}"


def _held_by(holder: str) -> str:
    run, _, element = holder.partition("#")
    return f"run {run}" + (f" (element {element})" if element else "")


def _of(element: str | None, dropped: str) -> bool:
    return element is not None and (element == dropped or element.startswith(dropped + "."))


def drop_duplicate_elements(conn: sqlite3.Connection, e: NewEvent, now: float) -> NewEvent:
    """After a split, each element claims its own key: an element whose key another element holds (of
    this run or of another within the window) is dropped alone (its deliveries, calls, later claims and
    windows), with the reason in the trace; its siblings go on. An event left with nothing is filtered."""
    if e.status not in ("pending", "aggregated") or not any(c.element is not None for c in e.claims):
        return e
    claimed: dict[tuple[str, str], str] = {}
    dropped: list[str] = []
    trace = list(e.trace)
    reasons: list[str] = []
    for c in sorted(e.claims, key=lambda c: c.trace_at):
        if c.element is None or any(_of(c.element, d) for d in dropped):
            continue
        mine = owner(e.id, c)
        holder = claimed.get((c.step, c.key))
        if holder is None:
            row = conn.execute(
                "SELECT run, expires_at FROM dedupe_keys WHERE flow=? AND step=? AND key=?",
                (e.flow, c.step, c.key),
            ).fetchone()
            if row is not None and row["expires_at"] > now and row["run"] != mine:
                holder = row["run"]
        if holder is None or holder == mine:
            claimed[(c.step, c.key)] = mine
            continue
        reason = f"{c.step}: duplicate of {_held_by(holder)}"
        dropped.append(c.element)
        reasons.append(f"element {c.element}: {reason}")
        trace.append({"step": c.step, "kind": "dedupe", "element": c.element, "dropped": reason})
    if not dropped:
        return e
    gone = [f"{e.id}.{d}." for d in dropped]
    deliveries = [nd for nd in e.deliveries if not any(nd.idempotency_key.startswith(g) for g in gone)]
    claims = [c for c in e.claims if not any(_of(c.element, d) for d in dropped)]
    windows = [w for w in e.windows if not any(_of(w.element, d) for d in dropped)]
    status, reason = e.status, "; ".join(filter(None, [e.reason, *reasons]))
    if not any(nd.status == "pending" for nd in deliveries):
        if any(nd.status == "dead" for nd in deliveries):  # as a split with no element left to deliver:
            status, deliveries = "quarantined", []  # the event is quarantined, replay takes it up
        elif windows:
            status, deliveries = "aggregated", []
        else:
            status, deliveries = "filtered", []
    return replace(
        e, status=status, reason=reason, trace=trace, deliveries=deliveries, claims=claims, windows=windows
    )


Seen = dict[tuple[str, float, str], tuple[bool, Any]]  # a window's lateness and row, read once per accept


def refusal(
    conn: sqlite3.Connection, e: NewEvent, now: float, seen: Seen | None = None
) -> tuple[str, str, list[dict[str, Any]]] | None:
    """Whether a claim or window of `e` refuses it: (status, reason, trace), first refusal in step order.
    The windows' rows read are left in `seen` for `apply_gates`."""
    claims, windows = gates(e)
    ordered: list[DedupeClaim | WindowAdd] = sorted([*claims, *windows], key=lambda g: g.trace_at)
    for g in ordered:
        if isinstance(g, DedupeClaim):
            row = conn.execute(
                "SELECT run, expires_at FROM dedupe_keys WHERE flow=? AND step=? AND key=?",
                (e.flow, g.step, g.key),
            ).fetchone()
            if row is not None and row["expires_at"] > now and row["run"] != owner(e.id, g):
                reason = f"{g.step}: duplicate of {_held_by(row['run'])}"
                return (
                    "filtered",
                    reason,
                    [*e.trace[: g.trace_at], {"step": g.step, "kind": "dedupe", "dropped": reason}],
                )
            continue
        late, row = _late(conn, e.flow, g, now)
        if seen is not None:
            seen[(g.step, g.start, g.key)] = (late, row)
        if not late:
            continue
        closed = g.end + g.grace_s
        if g.keep_s is None:
            reason = (
                f"{g.step}: late for window {g.label} (it closed at {_iso(closed)}, grace included);"
                " give the step a longer `late` grace, or `too_late: revise`"
            )
        elif now >= closed + g.keep_s:
            reason = (
                f"{g.step}: too late for window {g.label}: it is revised only until {_iso(closed + g.keep_s)}"
                " (`keep`)"
            )
        else:
            continue  # revises the window
        return (
            "quarantined",
            reason,
            [*e.trace[: g.trace_at], {"step": g.step, "kind": "aggregate", "error": [reason]}],
        )
    return None


def apply_gates(conn: sqlite3.Connection, e: NewEvent, now: float, seen: Seen | None = None) -> None:
    """Write what a record that got through claims and adds (after `refusal` found nothing)."""
    claims, windows = gates(e)
    for claim in claims:
        conn.execute(
            "INSERT INTO dedupe_keys(flow, step, key, run, expires_at) VALUES(?,?,?,?,?)"
            " ON CONFLICT(flow, step, key) DO UPDATE SET run=excluded.run, expires_at=excluded.expires_at"
            " WHERE dedupe_keys.run!=excluded.run",
            (e.flow, claim.step, claim.key, owner(e.id, claim), now + claim.within_s),
        )
    for w in windows:
        known = seen.pop((w.step, w.start, w.key), None) if seen is not None else None
        late, row = known if known is not None else _late(conn, e.flow, w, now)
        close_at = w.end + w.grace_s
        if late:  # revising (refusal() let it through): emitted shortly, or with the revision on its way
            pending = row is not None and row["adds"] > row["emitted_adds"] and row["close_at"] > now
            close_at = row["close_at"] if pending else now + REVISE_AFTER_S
        purge_at = w.end + w.grace_s + (w.keep_s or 0.0)
        pk = (e.flow, w.step, w.start, w.key)
        conn.execute(
            "INSERT INTO windows(flow, step, start, key, end_at, close_at, purge_at, label, adds, opened_at)"
            " VALUES(?,?,?,?,?,?,?,?,1,?) ON CONFLICT(flow, step, start, key) DO UPDATE SET"
            " adds=windows.adds+1, close_at=excluded.close_at",
            (*pk, w.end, close_at, purge_at, w.label, now),
        )
        conn.executemany(
            "INSERT INTO window_values(flow, step, start, key, name, n, total, scale, is_float, lo, hi)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(flow, step, start, key, name) DO UPDATE SET"
            # Columns named with their table: PostgreSQL finds a bare name ambiguous beside `excluded`.
            " n=window_values.n+excluded.n, total=window_values.total+excluded.total,"
            " scale=MAX(window_values.scale, excluded.scale), is_float=MAX(window_values.is_float, excluded.is_float),"
            " lo=CASE WHEN excluded.lo IS NULL THEN window_values.lo WHEN window_values.lo IS NULL THEN excluded.lo"
            "   ELSE MIN(window_values.lo, excluded.lo) END,"
            " hi=CASE WHEN excluded.hi IS NULL THEN window_values.hi WHEN window_values.hi IS NULL THEN excluded.hi"
            "   ELSE MAX(window_values.hi, excluded.hi) END",
            [
                (*pk, name, c.n, c.num, c.scale, int(c.is_float), c.extreme, c.extreme)
                for name, c in w.values.items()
            ],
        )
        items = [(*pk, name, c.item) for name, c in w.values.items() if c.item is not None]
        if items:
            conn.executemany(
                "INSERT OR IGNORE INTO window_items(flow, step, start, key, name, item) VALUES(?,?,?,?,?,?)",
                items,
            )


def q_closable(
    conn: sqlite3.Connection, now: float, limit: int, steps: list[tuple[str, str]]
) -> list[WindowState]:
    if not steps:
        return []
    which = " OR ".join(["(flow=? AND step=?)"] * len(steps))
    rows = conn.execute(
        # The partial index holds only windows with records to emit: emitted ones kept for revisions
        # (`keep`) and open ones not due yet are never read.
        f"SELECT * FROM windows INDEXED BY windows_due WHERE close_at<=? AND adds>emitted_adds AND ({which})"
        " ORDER BY close_at LIMIT ?",
        (now, *(x for pair in steps for x in pair), limit),
    ).fetchall()
    out = []
    for r in rows:
        pk = (r["flow"], r["step"], r["start"], r["key"])
        values = {}
        for v in conn.execute(f"SELECT * FROM window_values WHERE {_PK}", pk):
            distinct = conn.execute(
                f"SELECT COUNT(*) FROM window_items WHERE {_PK} AND name=?", (*pk, v["name"])
            ).fetchone()[0]
            values[v["name"]] = ValueState(
                v["n"], v["total"], v["scale"], bool(v["is_float"]), v["lo"], v["hi"], distinct
            )
        out.append(
            WindowState(
                r["flow"],
                r["step"],
                r["key"],
                r["start"],
                r["end_at"],
                r["label"],
                r["revisions"] + 1,
                r["adds"],
                values,
            )
        )
    return out


def tx_emit_window(conn: sqlite3.Connection, event: NewEvent, w: WindowState, accept: Any) -> Accepted:
    """The window's record and its new emitted mark, together; `accept` is the store's tx_accept."""
    accepted: Accepted = accept(conn, event)
    conn.execute(
        f"UPDATE windows SET emitted_adds=MAX(emitted_adds, ?), revisions=MAX(revisions, ?) WHERE {_PK}",
        (w.adds, w.revision, w.flow, w.step, w.start, w.key),
    )
    return accepted


def tx_tidy(conn: sqlite3.Connection, now: float) -> tuple[int, int]:
    gone = conn.execute(
        "SELECT flow, step, start, key FROM windows WHERE purge_at<=? AND adds=emitted_adds", (now,)
    ).fetchall()
    for r in gone:
        pk = tuple(r)
        for table in ("window_items", "window_values", "windows"):
            conn.execute(f"DELETE FROM {table} WHERE {_PK}", pk)
    keys = conn.execute("DELETE FROM dedupe_keys WHERE expires_at<=?", (now,)).rowcount
    return len(gone), keys


def q_open_windows(conn: sqlite3.Connection) -> dict[str, int]:
    return {
        r[0]: r[1]
        for r in conn.execute("SELECT flow, COUNT(*) FROM windows WHERE adds>emitted_adds GROUP BY flow")
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
