"""The `nodes` table: the hub processes sharing a store, their heartbeats, and the claims each holds.

Written in the SQL both stores share (PostgreSQL runs it through postgres/dialect.py).

A node's claims have one rule, `q_nodes`: where leases are in the store (PostgreSQL) they are the deliveries
it holds leased, counted from their rows; where they are not (SQLite: in the one worker's memory) they are
the figure the node wrote with its last heartbeat (`nodes.claims`), as fresh as that heartbeat.
"""

from __future__ import annotations

from typing import Any

from patchbay.store.base import NodeRow

# A stopped node's row is kept this long (the cluster view shows it went away), a lost one's longer.
KEEP_STOPPED_S = 3600.0
KEEP_LOST_S = 86400.0
_COLUMNS = "id, host, pid, roles, version, port, started_at, heartbeat_at, stopped_at"


def _row(r: Any, claims: int = 0) -> NodeRow:
    return NodeRow(
        r[0],
        r[1],
        int(r[2]),
        tuple(x for x in str(r[3]).split(",") if x),
        r[4],
        None if r[5] is None else int(r[5]),
        float(r[6]),
        float(r[7]),
        None if r[8] is None else float(r[8]),
        claims,
    )


def tx_join(conn: Any, node: NodeRow, alive_within: float, force: bool) -> NodeRow | None:
    """Write `node`'s row (replacing one of the same id), unless a process of that id is alive (a
    heartbeat within `alive_within` s and not stopped): then that one's row, and nothing is written."""
    now = node.heartbeat_at
    conn.execute(
        "DELETE FROM nodes WHERE (stopped_at IS NOT NULL AND stopped_at<?) OR heartbeat_at<?",
        (now - KEEP_STOPPED_S, now - KEEP_LOST_S),
    )
    old = conn.execute(f"SELECT {_COLUMNS} FROM nodes WHERE id=?", (node.id,)).fetchone()
    if old is not None:
        held = _row(old)
        if not force and held.stopped_at is None and now - held.heartbeat_at <= alive_within:
            return held
        conn.execute("DELETE FROM nodes WHERE id=?", (node.id,))
    conn.execute(
        f"INSERT INTO nodes({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
        (
            node.id,
            node.host,
            node.pid,
            ",".join(node.roles),
            node.version,
            node.port,
            node.started_at,
            node.heartbeat_at,
        ),
    )
    return None


def tx_heartbeat(
    conn: Any, node_id: str, started_at: float, now: float, port: int | None, claims: int = 0
) -> bool:
    """This process's row is fresh again, with the deliveries it holds claimed now (`claims`, counted in its
    memory); False when the row is no longer this process's (another process took the id over after this
    one's heartbeats stopped)."""
    cur = conn.execute(
        "UPDATE nodes SET heartbeat_at=?, port=COALESCE(?, port), claims=?"
        " WHERE id=? AND started_at=? AND stopped_at IS NULL",
        (now, port, claims, node_id, started_at),
    )
    return bool(cur.rowcount)


def tx_leave(conn: Any, node_id: str, started_at: float, now: float) -> None:
    conn.execute(
        "UPDATE nodes SET stopped_at=?, heartbeat_at=?, claims=0 WHERE id=? AND started_at=?",
        (now, now, node_id, started_at),
    )


def tx_release(conn: Any, node_ids: list[str]) -> int:
    marks = ",".join("?" * len(node_ids))
    cur = conn.execute(
        f"UPDATE deliveries SET leased_by=NULL, lease_until=NULL WHERE status='pending' AND leased_by IN ({marks})",
        tuple(node_ids),
    )
    return int(cur.rowcount or 0)


def q_nodes(conn: Any, now: float, leases_in_store: bool) -> list[NodeRow]:
    """Every node's row, with the deliveries it holds claimed: with `leases_in_store`, those leased to it
    (a lease not yet run out), counted from the deliveries; otherwise its heartbeat's figure."""
    if not leases_in_store:
        rows = conn.execute(f"SELECT {_COLUMNS}, claims FROM nodes ORDER BY id").fetchall()
        return [_row(r, int(r[9])) for r in rows]
    claims = {
        r[0]: int(r[1])
        for r in conn.execute(
            "SELECT leased_by, COUNT(*) FROM deliveries WHERE status='pending' AND leased_by IS NOT NULL"
            " AND lease_until>? GROUP BY leased_by",
            (now,),
        ).fetchall()
    }
    rows = conn.execute(f"SELECT {_COLUMNS} FROM nodes ORDER BY id").fetchall()
    return [_row(r, claims.get(r[0], 0)) for r in rows]
