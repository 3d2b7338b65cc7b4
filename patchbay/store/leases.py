"""Named leases (table `leases`): one holder per name at a time, with a fencing token; SQL of both stores.

Take-or-renew is one statement: a free, released or expired lease goes to the taker with its fence raised
by one; the holder's own take renews it (same fence); anyone else gets nothing. A write made under a lease
checks, in its own transaction, that the lease is still the writer's at its token (`check_fence`): on
PostgreSQL the check locks the lease row (FOR SHARE) until the commit, so a node taking the lease over
either comes after that commit (and reads its effects) or makes it fail.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from patchbay.errors import LeaseLost
from patchbay.store.base import Fence, Lease

T = TypeVar("T")

# {now} is the store's clock: a parameter on SQLite (one process), the server's on PostgreSQL (many hosts).
_TAKE = """INSERT INTO leases(name, holder, until, fence, taken_at) VALUES({p}, {p}, {now} + {p}, 1, {now})
ON CONFLICT(name) DO UPDATE SET
  fence = CASE WHEN leases.holder = excluded.holder THEN leases.fence ELSE leases.fence + 1 END,
  taken_at = CASE WHEN leases.holder = excluded.holder THEN leases.taken_at ELSE excluded.taken_at END,
  holder = excluded.holder,
  until = excluded.until
WHERE leases.holder = excluded.holder OR leases.holder IS NULL OR leases.until < excluded.taken_at
RETURNING fence"""
TAKE_SQLITE = _TAKE.format(p="?", now="?")
TAKE_POSTGRES = (
    "WITH clock AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) "
    + _TAKE.replace(
        "VALUES({p}, {p}, {now} + {p}, 1, {now})", "SELECT {p}, {p}, clock.now + {p}, 1, clock.now FROM clock"
    ).format(p="%s", now="")
)


def tx_take(conn: sqlite3.Connection, name: str, holder: str, ttl_s: float) -> int | None:
    now = time.time()
    row = conn.execute(TAKE_SQLITE, (name, holder, now, ttl_s, now)).fetchone()
    return None if row is None else int(row[0])


def tx_release(conn: Any, name: str, holder: str) -> None:
    conn.execute("UPDATE leases SET holder=NULL, until=0 WHERE name=? AND holder=?", (name, holder))


def q_leases(conn: Any) -> list[Lease]:
    rows = conn.execute("SELECT name, holder, until, fence, taken_at FROM leases ORDER BY name").fetchall()
    return [Lease(r[0], r[1], float(r[2]), int(r[3]), float(r[4])) for r in rows]


def check_fence(conn: Any, fence: Fence) -> None:
    """LeaseLost unless `fence` still holds (its holder, its token); on PostgreSQL the row stays locked."""
    sql = "SELECT 1 FROM leases WHERE name=? AND holder=? AND fence=?"
    if not isinstance(conn, sqlite3.Connection):
        sql += " FOR SHARE"  # a takeover waits for this transaction's commit, or this check sees it
    if conn.execute(sql, (fence.name, fence.holder, fence.token)).fetchone() is None:
        raise LeaseLost(
            f"writing under lease {fence.name} (fence {fence.token}): node {fence.holder} no longer holds"
            " it (another node took it over); this node's work under it stops"
        )


def fenced(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn(conn, *args)` as `run(conn, fence, *args)`: the fence checked first, in the same transaction."""

    def run(conn: Any, fence: Fence | None, *args: Any) -> T:
        if fence is not None:
            check_fence(conn, fence)
        return fn(conn, *args)

    run.__name__ = getattr(fn, "__name__", "fenced")
    return run


__all__ = [
    "TAKE_POSTGRES",
    "check_fence",
    "fenced",
    "q_leases",
    "tx_release",
    "tx_take",
]
