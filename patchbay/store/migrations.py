"""Versioned migrations of the store's schema, for both stores.

A store records its schema version in `meta` (key `schema_version`). Tables and indexes that are new
in a release are created by `CREATE … IF NOT EXISTS` when the store opens (sqlite_schema.schema_parts);
every change to a table that exists is a numbered step here, with its SQL for SQLite and for
PostgreSQL. Opening a store applies the steps it lacks, in order, each in its own transaction with the
new version (so a crash leaves the store at a whole version); `patchbay store migrate` does the same
ahead of a start and says what it applied. A store newer than the code is refused, never downgraded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Each hub process's row (engine/roles.py: Node): written at start, its heartbeat every few seconds, marked
# stopped at a clean stop. A new table, but in a numbered step: the cluster view is version 3's.
NODES = """CREATE TABLE IF NOT EXISTS nodes(
  id TEXT PRIMARY KEY,
  host TEXT NOT NULL,
  pid INTEGER NOT NULL,
  roles TEXT NOT NULL,
  version TEXT NOT NULL,
  port INTEGER,
  started_at DOUBLE PRECISION NOT NULL,
  heartbeat_at DOUBLE PRECISION NOT NULL,
  stopped_at DOUBLE PRECISION
)"""

_LEASES_SQLITE = """CREATE TABLE IF NOT EXISTS leases(
  name TEXT PRIMARY KEY,
  holder TEXT,
  until REAL NOT NULL,
  fence INTEGER NOT NULL,
  taken_at REAL NOT NULL
)"""
_LEASES_POSTGRES = _LEASES_SQLITE.replace("REAL", "DOUBLE PRECISION").replace("INTEGER", "BIGINT")


@dataclass(frozen=True)
class Migration:
    version: int  # the schema version once applied
    what: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        "deliveries: lease columns (leased_by, lease_until), so several hubs can share one store",
        (
            "ALTER TABLE deliveries ADD COLUMN leased_by TEXT",
            "ALTER TABLE deliveries ADD COLUMN lease_until REAL",
        ),
        (
            "ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS leased_by TEXT",
            "ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS lease_until DOUBLE PRECISION",
        ),
    ),
    Migration(
        3,
        "nodes: the processes sharing the store (id, roles, heartbeat), for the cluster view",
        (NODES.replace("DOUBLE PRECISION", "REAL"),),
        (NODES,),
    ),
    Migration(
        4,
        "leases: one holder per schedule, source and singleton across hubs (engine/leader.py); schedules:"
        " the tick of the last run started (last_due_at), fired again as the same tick when it did not finish",
        (_LEASES_SQLITE, "ALTER TABLE schedules ADD COLUMN last_due_at REAL"),
        (_LEASES_POSTGRES, "ALTER TABLE schedules ADD COLUMN IF NOT EXISTS last_due_at DOUBLE PRECISION"),
    ),
    Migration(
        5,
        "deliveries: order_key (a destination's `order_by`); PostgreSQL: sending slots and token buckets shared"
        " by every worker",
        (
            "ALTER TABLE deliveries ADD COLUMN order_key TEXT",
            "CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(flow, destination, order_key, id)"
            " WHERE order_key IS NOT NULL",
        ),
        (
            "ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS order_key TEXT",
            "CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(flow, destination, order_key, id)"
            " WHERE order_key IS NOT NULL",
            "CREATE TABLE IF NOT EXISTS delivery_slots(flow TEXT NOT NULL, destination TEXT NOT NULL,"
            " slot INTEGER NOT NULL, holder TEXT, until DOUBLE PRECISION NOT NULL DEFAULT 0,"
            " PRIMARY KEY(flow, destination, slot))",
            "CREATE TABLE IF NOT EXISTS delivery_wants(flow TEXT NOT NULL, destination TEXT NOT NULL,"
            " holder TEXT NOT NULL, until DOUBLE PRECISION NOT NULL, PRIMARY KEY(flow, destination, holder))",
            "CREATE TABLE IF NOT EXISTS delivery_buckets(flow TEXT NOT NULL, destination TEXT NOT NULL,"
            " tokens DOUBLE PRECISION NOT NULL, at DOUBLE PRECISION NOT NULL, PRIMARY KEY(flow, destination))",
        ),
    ),
    Migration(
        6,
        "nodes: claims, the deliveries a node holds claimed as it counted them at its last heartbeat (the"
        " cluster view's figure where claims live in the worker's memory: SQLite)",
        ("ALTER TABLE nodes ADD COLUMN claims INTEGER NOT NULL DEFAULT 0",),
        ("ALTER TABLE nodes ADD COLUMN IF NOT EXISTS claims INTEGER NOT NULL DEFAULT 0",),
    ),
)
BASELINE = 1  # the version a store created by the schema alone has
LATEST = MIGRATIONS[-1].version if MIGRATIONS else BASELINE


def pending(version: int) -> list[Migration]:
    return [m for m in MIGRATIONS if m.version > version]


def read_version(conn: Any) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else BASELINE


def apply_sqlite(conn: Any) -> list[Migration]:
    """Apply what the SQLite store at `conn` (autocommit) lacks; each step one IMMEDIATE transaction."""
    done: list[Migration] = []
    for m in pending(read_version(conn)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if read_version(conn) >= m.version:  # another opener applied it meanwhile
                conn.execute("ROLLBACK")
                continue
            for sql in m.sqlite:
                conn.execute(sql)
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(m.version),))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        done.append(m)
    return done


def apply_postgres(conn: Any) -> list[Migration]:
    """Apply what the PostgreSQL store lacks (psycopg connection, the caller holds the schema lock)."""
    done: list[Migration] = []
    for m in pending(read_version(conn)):
        for sql in m.postgres:
            conn.execute(sql)
        conn.execute("UPDATE meta SET value=%s WHERE key='schema_version'", (str(m.version),))
        done.append(m)
    return done
