"""The SQLite store's file: its schema, its connections, and the checks every opener makes."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from patchbay.errors import PatchbayError, StoreUnavailable, StoreUnusable
from patchbay.store.migrations import BASELINE, LATEST, apply_sqlite

log = logging.getLogger("patchbay.store")

SCHEMA_VERSION = LATEST  # the newest schema this code reads: store/migrations.py
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  flow TEXT NOT NULL,
  dedupe_key TEXT,
  body_hash TEXT NOT NULL,
  received_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  status TEXT NOT NULL,
  record_key TEXT,
  reason TEXT,
  payload BLOB NOT NULL,
  meta TEXT NOT NULL DEFAULT '{}',
  trace TEXT NOT NULL DEFAULT '[]'
);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe ON events(flow, dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_flow_time ON events(flow, received_at);
CREATE INDEX IF NOT EXISTS events_status ON events(status, received_at);
CREATE INDEX IF NOT EXISTS events_key ON events(record_key) WHERE record_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS deliveries(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id TEXT NOT NULL,
  flow TEXT NOT NULL,
  destination TEXT NOT NULL,
  status TEXT NOT NULL,
  request TEXT NOT NULL,
  idempotency_key TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  retries INTEGER NOT NULL DEFAULT 0,
  next_at REAL NOT NULL,
  last_error TEXT,
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL
);
-- The feed reads pending deliveries in id order (arrival order) from a cursor, filtering on next_at:
-- an index by next_at first would make it sort the whole backlog on every read.
DROP INDEX IF EXISTS deliveries_due;
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(flow, destination, status, id, next_at);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_id);
CREATE INDEX IF NOT EXISTS deliveries_status ON deliveries(status, updated_at);
CREATE TABLE IF NOT EXISTS attempts(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  delivery_id INTEGER NOT NULL,
  n INTEGER NOT NULL,
  started_at REAL NOT NULL,
  latency_ms REAL NOT NULL,
  status_code INTEGER,
  outcome TEXT NOT NULL,
  excerpt TEXT NOT NULL DEFAULT '',
  error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts(delivery_id, n);
-- Fields a destination mapped from its successful answer (`response: {id: body.id}`), one row per delivery.
CREATE TABLE IF NOT EXISTS responses(
  delivery_id INTEGER PRIMARY KEY,
  fields TEXT NOT NULL,
  at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS destinations(
  flow TEXT NOT NULL,
  destination TEXT NOT NULL,
  state TEXT NOT NULL,
  reason TEXT,
  since REAL NOT NULL,
  PRIMARY KEY(flow, destination)
);
CREATE TABLE IF NOT EXISTS cursors(
  flow TEXT PRIMARY KEY,
  value TEXT NOT NULL,
  updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules(
  flow TEXT PRIMARY KEY,
  last_started_at REAL,
  last_finished_at REAL,
  last_status TEXT,
  last_error TEXT,
  next_due_at REAL,
  runs INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS api_tokens(
  id TEXT PRIMARY KEY,             -- 12 hex digits; the token is pbt_<id>_<secret>
  name TEXT NOT NULL,
  secret_sha256 TEXT NOT NULL,     -- hex SHA-256 of <secret>; the plaintext is never stored
  scopes TEXT NOT NULL,            -- JSON list
  created_at REAL NOT NULL,
  created_by TEXT NOT NULL DEFAULT '',
  expires_at REAL,
  last_used_at REAL,
  revoked_at REAL
);
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  at REAL NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  target TEXT NOT NULL DEFAULT '',
  detail TEXT NOT NULL DEFAULT '{}',
  origin TEXT NOT NULL DEFAULT ''
);
"""

MONITOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts(
  rule TEXT NOT NULL,
  subject TEXT NOT NULL,
  state TEXT NOT NULL,
  since REAL NOT NULL,
  fired_at REAL,
  cleared_at REAL,
  detail TEXT NOT NULL DEFAULT '',
  event_id TEXT,
  updated_at REAL NOT NULL,
  PRIMARY KEY(rule, subject)
);
CREATE TABLE IF NOT EXISTS sources(
  flow TEXT PRIMARY KEY,
  state TEXT NOT NULL,
  failures INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  since REAL NOT NULL,
  updated_at REAL NOT NULL
);
"""


EVENT_FINAL = ("delivered", "dead", "quarantined", "filtered", "discarded")


class StoreLocked(PatchbayError):
    pass


class StoreClosed(StoreUnavailable):
    """A write reached the store after its writer stopped (the hub is stopping)."""


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # an acknowledged event survives power loss, not only a crash
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


def schema_parts() -> list[str]:
    """Every table of the store, in order: the core, the monitoring block, each concern's own tables.
    The PostgreSQL store translates the same list (store/postgres/schema.py)."""
    from patchbay.store import calls as cq
    from patchbay.store import windows as wq
    from patchbay.store.identity import IDENTITY_SCHEMA

    return [SCHEMA, MONITOR_SCHEMA, IDENTITY_SCHEMA, wq.WINDOW_SCHEMA, cq.CALLS_SCHEMA]


def init_schema(conn: sqlite3.Connection) -> None:
    for part in schema_parts():
        conn.executescript(part)
    # A new store starts at the baseline and takes every migration, as an old one does.
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', ?)", (str(BASELINE),))
    apply_sqlite(conn)


# ================================================================== opening the file
# One rule for every opener (the hub, the CLI, the vault): a missing file becomes a new store, created
# complete and private before it appears under its name; an existing file must already be a Patchbay
# store. An empty or foreign file is never taken for a new store (that would hide lost data).
FILE_MODE = 0o600
RESTORE = "restore it from a backup, or move it aside to start with an empty store"


def unusable(path: Path, what: str, fix: str = RESTORE) -> StoreUnusable:
    return StoreUnusable(f"opening the store {path}: {what}; {fix}")


def open_store(path: Path, *, check: bool = False) -> sqlite3.Connection:
    """A connection to the store at `path`, created (mode 600) when no file is there.

    An existing file is read, never repaired: an empty, foreign, damaged or newer file raises
    StoreUnusable with a one-line message that names the file and what to do. `check` adds SQLite's
    quick_check (it reads every page: about 2 ms per MB), which the hub runs before it serves.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        _create(path)
    _make_private(path)
    validate_file(path)
    try:
        conn = connect(path)
    except sqlite3.DatabaseError as exc:
        raise unusable(path, _damage(exc)) from exc
    try:
        version = schema_version(conn, path)
        if check:
            problems = _check_lines(conn, "quick_check", 20)
            if problems != ["ok"]:
                raise unusable(
                    path,
                    f"the file is damaged ({problems[0]}"
                    + (f", and {len(problems) - 1} more problems" if len(problems) > 1 else "")
                    + ")",
                    RESTORE + " (`patchbay store check` lists what is damaged)",
                )
        del version
        init_schema(conn)  # creates what an older store lacks; writes nothing when all is there
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise unusable(path, _damage(exc)) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def validate_file(path: Path) -> None:
    """Refuse an empty file: SQLite would take it for a new, empty database.

    Only stat() here: opening and closing the file in Python would drop every POSIX lock SQLite's
    connections of this process hold on it (locks are per process), and another process closing
    its last connection could then delete the -wal and -shm files still in use here. SQLite reads
    the header itself and answers "file is not a database" for a foreign or truncated file.
    """
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise unusable(path, f"cannot read it ({exc.strerror})", "check its owner and mode") from exc
    if size == 0:
        raise unusable(path, "the file is empty (0 bytes): truncated, or never written")


def _damage(exc: sqlite3.Error) -> str:
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF == 26:  # SQLITE_NOTADB
        return "the file is not a SQLite database (damaged, or another program's file)"
    return f"the file is damaged ({exc})"


def schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """The store's schema version; StoreUnusable for a SQLite file without Patchbay's tables or a newer one."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    row = (
        conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if "meta" in tables
        else None
    )
    if row is None or not str(row[0]).isdigit() or not {"events", "deliveries"} <= tables:
        raise unusable(
            path,
            "it is a SQLite database but not a Patchbay store (no schema version or runs table)",
            "point `store:` in patchbay.yaml at the project's store, or " + RESTORE,
        )
    version = int(row[0])
    if version > SCHEMA_VERSION:
        raise unusable(
            path,
            f"it was written by a newer Patchbay (schema {version}; this one reads up to {SCHEMA_VERSION})",
            "run the newer version",
        )
    return version


def check_file(path: Path, *, quick: bool = False, limit: int = 20) -> dict[str, Any]:
    """What `patchbay store check` reports: the file's first bytes, schema version, size and row count,
    and SQLite's integrity_check (or quick_check). Changes nothing and creates nothing."""
    path = Path(path)
    pragma = "quick_check" if quick else "integrity_check"
    out: dict[str, Any] = {"path": str(path), "ok": False, "check": pragma, "problems": []}
    if not path.exists():
        out["problems"] = [f"no store at {path}"]
        return out
    out["size_bytes"] = sum(p.stat().st_size for p in _files(path) if p.exists())
    try:
        validate_file(path)
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except (StoreUnusable, sqlite3.Error) as exc:
        out["problems"] = [str(exc)]
        return out
    try:
        t0 = time.perf_counter()
        found = _check_lines(conn, pragma, limit)
        out["seconds"] = round(time.perf_counter() - t0, 3)
        if found != ["ok"]:
            out["problems"] = found
        out["schema_version"] = schema_version(conn, path)
        out["runs"] = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    except (StoreUnusable, sqlite3.Error) as exc:
        out["problems"].append(str(exc))
    finally:
        conn.close()
    out["ok"] = not out["problems"]
    return out


def _check_lines(conn: sqlite3.Connection, pragma: str, limit: int) -> list[str]:
    """SQLite's check result, one problem per item ("ok" alone when whole)."""
    rows = conn.execute(f"PRAGMA {pragma}({int(limit)})").fetchall()
    lines = [ln.strip() for r in rows for ln in str(r[0]).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("***")][:limit]


def _create(path: Path) -> None:
    """A new, complete store at `path`: built under a temporary name (mode 600), then linked into place."""
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{threading.get_ident()}")
    for p in _files(tmp):
        _unlink(p)
    os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
    try:
        conn = connect(tmp)
        try:
            init_schema(conn)
        finally:
            conn.close()
        try:
            os.link(tmp, path)  # never over a file another opener made meanwhile
        except FileExistsError:
            pass
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for p in _files(tmp):
            _unlink(p)


def _files(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")]


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make_private(path: Path) -> None:
    """The store holds payloads and the vault: owner-only, as SQLite's -wal and -shm follow its mode."""
    for p in _files(path):
        try:
            mode = os.stat(p).st_mode & 0o777
            if mode & 0o077:
                os.chmod(p, mode & 0o700)
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("the store file %s is readable by others; make it private: chmod 600 %s", p, p)
