"""The embedded store: one SQLite file in WAL mode, synchronous=FULL, with group commit.

Writes go through one writer thread that takes every operation waiting in its queue, runs them
inside one transaction (each in its own savepoint only when one of them fails), commits once (one fsync for the whole group) and
only then resolves the callers' futures: an acknowledged event is on disk. Reads use a second
connection on a reader thread, so a slow query never blocks the event loop or the writer.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, TypeVar

import orjson

from patchbay.errors import PatchbayError, StoreUnavailable, StoreUnusable
from patchbay.store import api_queries as aq
from patchbay.store import calls as cq
from patchbay.store import queries as rq
from patchbay.store import retention
from patchbay.store import tokens as tq
from patchbay.store import windows as wq
from patchbay.store.base import (
    SCHEDULE_FIELDS,
    Accepted,
    Actor,
    AlertChange,
    AttemptResult,
    AuditFilter,
    CachedAnswer,
    DestinationStates,
    DiscardReport,
    DueDelivery,
    FailedAttempt,
    NewEvent,
    ReplayReport,
    Reprocessor,
    RunFilter,
    Snapshot,
    SourceState,
    TokenInfo,
    WindowState,
)
from patchbay.store.common import _j, refresh_event_status, tx_audit
from patchbay.store.retention import opened

T = TypeVar("T")
log = logging.getLogger("patchbay.store")

SCHEMA_VERSION = 1
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


def init_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    conn.executescript(MONITOR_SCHEMA)
    conn.executescript(wq.WINDOW_SCHEMA)
    conn.executescript(cq.CALLS_SCHEMA)
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))


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


# SQLite result codes (the low byte of sqlite_errorcode) that concern the whole store, not one operation.
_CONDITIONS = {
    13: "the disk is full",  # SQLITE_FULL
    10: "an I/O error",  # SQLITE_IOERR
    8: "the file is read-only",  # SQLITE_READONLY
    14: "the file cannot be opened",  # SQLITE_CANTOPEN
    11: "the file is damaged",  # SQLITE_CORRUPT
    26: "the file is damaged",  # SQLITE_NOTADB
}


def store_condition(exc: BaseException | None) -> str | None:
    """What is wrong with the store when `exc` says so (disk full, I/O error, damage), else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    return _CONDITIONS.get(code & 0xFF)


_STOP = object()


class _Writer(threading.Thread):
    """Group commit: one transaction (and one fsync) per batch of queued operations."""

    def __init__(self, path: Path, max_batch: int = 512, probe_s: float = 1.0) -> None:
        super().__init__(name="patchbay-store-writer", daemon=True)
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.path = path
        self.max_batch = max_batch
        self.commits = 0
        self.ops = 0
        # Why writes fail right now (disk full, I/O error, damage), or None. Set and cleared only here,
        # from what a transaction did: one log line when it starts, one when writes succeed again.
        self.problem: str | None = None
        self.probe_s = probe_s
        # Set (under `lock`) when the loop below ends: later work is refused, never left waiting.
        self.stopped = False
        self.lock = threading.Lock()

    def submit(self, item: Any) -> bool:
        with self.lock:
            if self.stopped:
                return False
            self.q.put(item)
            return True

    def run(self) -> None:
        conn = connect(self.path)
        # Checkpoints run on their own thread (_Checkpointer), so no acknowledgement waits for one. Under
        # a sustained burst that thread may never catch the WAL complete; past WAL_LIMIT the writer then
        # checkpoints itself between two groups (nothing new is written meanwhile, so it completes) and
        # the next transaction starts the WAL over, truncated to WAL_LIMIT.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        wal = str(self.path) + "-wal"
        try:
            while True:
                try:
                    # While writes fail and nobody writes, a probe finds out when they succeed again.
                    item = self.q.get(timeout=self.probe_s if self.problem else None)
                except queue.Empty:
                    self._probe(conn)
                    continue
                if item is _STOP:
                    return
                batch = [item]
                while len(batch) < self.max_batch:
                    try:
                        nxt = self.q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        self._run_batch(conn, batch)
                        return
                    batch.append(nxt)
                self._run_batch(conn, batch)
                if self.commits % 64 == 0 and _size(wal) > WAL_LIMIT:
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:
                        log.warning("checkpointing the store's WAL: %s", exc)
        finally:
            conn.close()
            self._refuse_the_rest()

    def _refuse_the_rest(self) -> None:
        with self.lock:
            self.stopped = True
        while True:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                loop, fut, _, _ = item
                loop.call_soon_threadsafe(_resolve, [(fut, False, _closed_error(self.path))])

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        try:
            results = self._transaction(conn, batch, isolate=False)
        except _OpFailed as exc:
            if store_condition(exc.__cause__) is None:  # one operation failed: again, each in a savepoint
                results = self._transaction(conn, batch, isolate=True)
            else:  # the disk is full (or worse) for every operation alike
                results = [(fut, False, exc.__cause__) for _, fut, _, _ in batch]
        problem = None
        for i, (fut, ok, value) in enumerate(results):
            what = None if ok else store_condition(value)
            if what is not None:
                problem = problem or f"{what} ({value})"
                err = StoreUnavailable(f"writing to the store {self.path}: {what} ({value})", what)
                err.__cause__ = value
                results[i] = (fut, False, err)
        self._set_problem(problem)
        by_loop: dict[Any, list[tuple[Any, bool, Any]]] = {}
        for (loop, _, _, _), r in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append(r)
        for loop, rs in by_loop.items():
            loop.call_soon_threadsafe(_resolve, rs)

    def _transaction(
        self, conn: sqlite3.Connection, batch: list[Any], *, isolate: bool
    ) -> list[tuple[Any, bool, Any]]:
        """One transaction for the whole group. The fast path runs the operations back to back; when one
        raises, the group is rolled back and retried with a savepoint per operation (`isolate`), so one bad
        operation fails alone and never sinks the others."""
        results: list[tuple[Any, bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for _loop, fut, fn, args in batch:
                if not isolate:
                    try:
                        results.append((fut, True, fn(conn, *args)))
                    except Exception as exc:
                        raise _OpFailed from exc
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    res = fn(conn, *args)
                    conn.execute("RELEASE op")
                    results.append((fut, True, res))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, False, exc))
            conn.execute("COMMIT")
            self.commits += 1
            self.ops += len(batch)
            return results
        except _OpFailed:
            _rollback(conn)
            raise
        except (
            Exception
        ) as exc:  # the transaction itself failed (disk full, I/O error): every caller hears it
            _rollback(conn)
            return [(fut, False, exc) for _, fut, _, _ in batch]

    def _probe(self, conn: sqlite3.Connection) -> None:
        """A small write of new pages, then undone: does writing succeed again?"""
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('write_probe', zeroblob(16384))")
            conn.execute("DELETE FROM meta WHERE key='write_probe'")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            self._set_problem(f"{store_condition(exc) or 'a write failed'} ({exc})")
            return
        self._set_problem(None)

    def _set_problem(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        if problem is None:
            log.warning("writing to the store %s succeeds again; ready", self.path)
        elif self.problem is None:
            log.error(
                "writing to the store %s fails: %s. Webhooks are answered 503 (the sender retries),"
                " deliveries wait, /readyz is 503 until a write succeeds",
                self.path,
                problem,
            )
        self.problem = problem


class _OpFailed(Exception):
    """An operation of the group raised (the fast path gives way to one savepoint per operation)."""


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


WAL_LIMIT = 64 * 1024 * 1024


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database file twice a second (PASSIVE: it never blocks the writer).

    SQLite would otherwise checkpoint inside whichever commit crosses 1,000 WAL pages, and every event
    acknowledged by that group commit would wait for the copy and its fsync.
    """

    def __init__(self, path: Path, interval_s: float = 0.5) -> None:
        super().__init__(name="patchbay-store-checkpoint", daemon=True)
        self.path = path
        self.interval_s = interval_s
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = connect(self.path)
        failing = False
        try:
            while not self.stopping.wait(self.interval_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy or I/O trouble: the next round tries again
                    if not failing:  # one line per spell of trouble, not two a second
                        log.warning("checkpointing the store's WAL: %s; trying again", exc)
                    failing = True
                    continue
                if failing:
                    log.info("checkpointing the store's WAL succeeds again")
                failing = False
        finally:
            conn.close()


def _closed_error(path: Path) -> StoreClosed:
    return StoreClosed(
        f"writing to the store {path}: it is closed (the hub is stopping); try again once it runs",
        "the store is closed",
    )


def _resolve(results: Iterable[tuple[Any, bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class SqliteStore:
    """The default store. `await` its methods from the hub; the CLI uses `SqliteStore.sync()`."""

    def __init__(self, path: Path, *, check: bool = True) -> None:
        self.path = Path(path)
        # Refuses an empty, foreign or damaged file; `check` adds quick_check (the hub; not each CLI command).
        open_store(self.path, check=check).close()
        self._writer = _Writer(self.path)
        self._writer.start()
        self._checkpointer = _Checkpointer(self.path)
        self._checkpointer.start()
        self._reader_local = threading.local()
        self._rexec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchbay-store-reader")
        self._lock_fd: int | None = None
        self._closed = False
        self._monitor: _MonitorReader | None = None  # created by the first snapshot()

    # -------------------------------------------------------------- plumbing
    def lock(self) -> None:
        """Only one hub may serve a SQLite store; a second `serve` is refused, not corrupting."""
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StoreLocked(
                f"opening the store {self.path}: another `patchbay serve` is using it; stop that one first"
            ) from exc
        self._lock_fd = fd

    def _write(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._closed or not self._writer.submit((loop, fut, fn, args)):
            raise _closed_error(self.path)
        return fut

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._reader_local.conn = connect(self.path)
        return conn

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._rexec, lambda: fn(self._reader(), *args))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            await self._monitor.close()
        self._writer.q.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._checkpointer.stopping.set()
        await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.join)
        self._rexec.submit(
            lambda: getattr(self._reader_local, "conn", None) and self._reader_local.conn.close()
        )
        self._rexec.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def writing(self) -> bool:
        """The writer thread is alive (every write, and so every acknowledgement, goes through it)."""
        return self._writer.is_alive() and not self._closed

    @property
    def problem(self) -> str | None:
        """Why writes fail right now (disk full, I/O error, damage), or None while they succeed."""
        return self._writer.problem

    @property
    def stats(self) -> dict[str, int]:
        return {"commits": self._writer.commits, "ops": self._writer.ops}

    # -------------------------------------------------------------- hot path
    async def accept(self, event: NewEvent) -> Accepted:
        return await self._write(tx_accept, event)

    async def accept_batch(self, events: list[NewEvent], flow: str, cursor: Any) -> list[Accepted]:
        """Several events and the source cursor that covers them, committed together."""
        return await self._write(tx_accept_batch, events, flow, cursor)

    async def due(
        self, flow: str, destination: str, now: float, limit: int, skip: set[int], after_id: int = 0
    ) -> list[DueDelivery]:
        return await self._read(q_due, flow, destination, now, limit, frozenset(skip), after_id)

    async def next_due_at(self, flow: str, destination: str) -> float | None:
        return await self._read(q_next_due_at, flow, destination)

    async def record(self, results: list[AttemptResult]) -> None:
        await self._write(tx_record, results)

    # -------------------------------------------------------------- destinations, cursors, schedules
    async def destination_states(self) -> DestinationStates:
        return await self._read(q_destination_states)

    async def set_destination_state(
        self, flow: str, destination: str, state: str, reason: str | None, by: Actor | None = None
    ) -> None:
        await self._write(tx_set_destination_state, flow, destination, state, reason, by)

    async def cursor(self, flow: str) -> Any:
        return await self._read(q_cursor, flow)

    async def cursor_info(self, flow: str) -> dict[str, Any] | None:
        return await self._read(aq.q_cursor_row, flow)

    async def reset_cursor(self, flow: str, by: Actor | None = None) -> bool:
        return await self._write(tx_reset_cursor, flow, by)

    async def schedule(self, flow: str) -> dict[str, Any] | None:
        return await self._read(q_schedule, flow)

    async def schedules(self) -> dict[str, dict[str, Any]]:
        return await self._read(aq.q_schedules)

    async def update_schedule(self, flow: str, fields: Mapping[str, Any], count_run: bool = False) -> None:
        _check_schedule_fields(fields)
        await self._write(lambda c: tx_schedule(c, flow, **fields, count_run=count_run))

    # -------------------------------------------------------------- runs, dead letters
    async def list_runs(self, f: RunFilter) -> list[dict[str, Any]]:
        return await self._read(rq.list_runs, f)

    async def get_run(self, event_id: str) -> dict[str, Any] | None:
        return await self._read(rq.get_run, event_id)

    async def recent_payloads(self, flow: str, limit: int) -> list[tuple[str, float, bytes]]:
        return await self._read(rq.q_recent_payloads, flow, limit)

    async def recent_answers(self, flow: str, limit: int) -> list[tuple[str, str, float, str]]:
        return await self._read(rq.q_recent_answers, flow, limit)

    async def counts(self) -> dict[str, Any]:
        return await self._read(rq.counts)

    async def counts_by_flow(self) -> dict[str, dict[str, dict[str, int]]]:
        return await self._read(aq.counts_by_flow)

    async def flow_stats(self, flows: list[str], now: float) -> dict[str, dict[str, Any]]:
        return await self._read(aq.flow_stats, flows, now)

    async def destination_backlog(self, now: float) -> dict[tuple[str, str], dict[str, Any]]:
        return await self._read(aq.destination_backlog, now)

    async def list_dead(self, flow: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return await self._read(rq.list_dead, flow, limit)

    async def dead_letters(
        self, flow: str | None, destination: str | None, reason: str | None, limit: int
    ) -> dict[str, Any]:
        return await self._read(aq.dead_letters, flow, destination, reason, limit)

    async def dead_event_ids(
        self, flow: str | None, destination: str | None, reason: str | None
    ) -> list[str]:
        return await self._read(aq.dead_event_ids, flow, destination, reason)

    async def replayable(self, flow: str | None, destination: str | None) -> list[str]:
        return await self._read(rq.q_replayable, flow, destination)

    async def replay(
        self,
        pipelines: Mapping[str, Reprocessor],
        event_ids: Sequence[str],
        destination: str | None,
        by: Actor,
    ) -> ReplayReport:
        return await self._write(rq.tx_replay, pipelines, list(event_ids), destination, by)

    async def discard(self, event_ids: Sequence[str], destination: str | None, by: Actor) -> DiscardReport:
        return await self._write(aq.tx_discard, list(event_ids), destination, by)

    # -------------------------------------------------------------- tokens, audit
    async def create_token(
        self,
        name: str,
        scopes: Sequence[str],
        expires_at: float | None,
        secret_sha256: str,
        by: Actor,
    ) -> TokenInfo:
        return await self._write(
            tq.tx_create_token, name, list(scopes), expires_at, secret_sha256, by, time.time()
        )

    async def tokens(self, include_inactive: bool = True) -> list[TokenInfo]:
        return await self._read(tq.q_tokens, include_inactive)

    async def token_secret(self, token_id: str) -> tuple[TokenInfo, str] | None:
        return await self._read(tq.q_token_secret, token_id)

    async def revoke_token(self, token_id: str, by: Actor | None = None) -> TokenInfo | None:
        return await self._write(tq.tx_revoke_token, token_id, by, time.time())

    async def touch_token(self, token_id: str, at: float) -> None:
        await self._write(tq.tx_touch, token_id, at)

    async def audit(self, action: str, target: str, by: Actor) -> None:
        await self._write(tx_audit, by.name, action, target, dict(by.detail), by.origin)

    async def audit_log(self, f: AuditFilter) -> list[dict[str, Any]]:
        return await self._read(tq.q_audit, f)

    # -------------------------------------------------------------- retention
    async def purge_runs(self, flow: str, statuses: Sequence[str], before: float, limit: int = 500) -> int:
        return await self._write(retention.tx_purge, flow, tuple(statuses), before, limit)

    async def compress_runs(self, flow: str, before: float, limit: int = 500) -> int:
        return await self._write(retention.tx_compress, flow, before, limit)

    # -------------------------------------------------------------- responses
    async def response_fields(self, event_id: str, destination: str) -> dict[str, Any] | None:
        """The fields `destination` mapped from its answer for `event_id` (None before a success)."""
        return await self._read(q_response_fields, event_id, destination)

    # -------------------------------------------------------------- SQLite only
    # -- calls inside flows (store/calls.py)
    async def record_calls(
        self, results: list[AttemptResult], pipeline: Reprocessor, cache: Sequence[CachedAnswer] = ()
    ) -> list[tuple[str, list[str]]]:
        return await self._write(cq.tx_record_calls, results, pipeline, tx_record, list(cache))

    async def call_answers(self, event_id: str) -> dict[str, Any]:
        return await self._read(cq.q_answers, event_id)

    async def cached_answer(self, scope: str, key: str, now: float) -> dict[str, Any] | None:
        return await self._read(cq.q_cached_answer, scope, key, now)

    async def cache_answer(self, scope: str, key: str, answer: dict[str, Any], expires_at: float) -> None:
        await self._write(cq.tx_cache_answer, scope, key, answer, expires_at)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a query function `fn(conn, *args)` on the reader thread (SQLite only: the store's own
        tests and modules; everything else uses the protocol's methods)."""
        return await self._read(fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a transaction function `fn(conn, *args)` through the group-commit writer (SQLite only)."""
        return await self._write(fn, *args)

    # -------------------------------------------------------------- monitoring: alerts, source health
    async def snapshot(
        self,
        now: float,
        after_id: int | None,
        seed_from: float,
        pairs: list[tuple[str, str]],
        dead_windows: set[float | None],
        count_after: int | None,
        drift_since: float | None = None,
        *,
        timeout: float,
    ) -> Snapshot:
        """The alert loop's read, on the monitor's own thread and connection (see `_MonitorReader`)."""
        if self._monitor is None:
            self._monitor = _MonitorReader(self.path)
        return await self._monitor.read(
            q_snapshot,
            now,
            after_id,
            seed_from,
            pairs,
            dead_windows,
            count_after,
            drift_since,
            timeout=timeout,
        )

    async def accept_alert(self, event: NewEvent, change: AlertChange) -> Accepted:
        return await self._write(tx_alert, event, change)

    async def source_states(self) -> dict[str, SourceState]:
        return await self._read(q_source_states)

    # -------------------------------------------------------------- windows and dedupe keys (store/windows.py)
    async def closable_windows(
        self, now: float, limit: int, steps: Sequence[tuple[str, str]]
    ) -> list[WindowState]:
        # Read in the writer's order, not on the reader: a record accepted before `now` is then always seen
        # (even one still in a group about to commit), and every one after it is late (store/windows.py).
        return await self._write(wq.q_closable, now, limit, list(steps))

    async def emit_window(self, event: NewEvent, window: WindowState) -> Accepted:
        return await self._write(wq.tx_emit_window, event, window, tx_accept)

    async def tidy_windows(self, now: float) -> tuple[int, int]:
        return await self._write(wq.tx_tidy, now)

    async def open_windows(self) -> dict[str, int]:
        return await self._read(wq.q_open_windows)

    async def set_source_state(self, state: SourceState) -> None:
        await self._write(tx_set_source_state, state)


def _check_schedule_fields(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - SCHEDULE_FIELDS)
    if unknown:
        raise ValueError(
            f"updating a schedule: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(SCHEDULE_FIELDS))}"
        )


class SyncStore:
    """Direct, synchronous access for the CLI (WAL lets it run beside a serving hub)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.conn = open_store(self.path)

    def read(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self.conn, *args)

    def write(self, fn: Callable[..., T], *args: Any) -> T:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            res = fn(self.conn, *args)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return res

    def close(self) -> None:
        self.conn.close()


# ================================================================== operations
# Each takes a connection first; transactions (tx_*) run inside the writer's group transaction and may be
# run twice (the group is replayed with savepoints when another operation fails): no side effects outside it.


def tx_accept(conn: sqlite3.Connection, e: NewEvent) -> Accepted:
    now = time.time()
    if e.dedupe_key is not None:
        row = conn.execute(
            "SELECT id, body_hash FROM events WHERE flow=? AND dedupe_key=?", (e.flow, e.dedupe_key)
        ).fetchone()
        if row is not None:
            return Accepted(row["id"], duplicate=True, conflict=row["body_hash"] != e.body_hash)
    if e.claims or e.windows:
        e = wq.drop_duplicate_elements(
            conn, e, now
        )  # after a split: an element's duplicate key drops it alone
        seen: wq.Seen = {}
        refused = wq.refusal(conn, e, now, seen)
        if refused is not None:  # a dedupe key held by another run, or too late for its window
            status, reason, trace = refused
            tx_accept(
                conn,
                _replace(e, status=status, reason=reason, trace=trace, deliveries=[], claims=[], windows=[]),
            )
            return Accepted(e.id, status=status, reason=reason)
        wq.apply_gates(conn, e, now, seen)
    conn.execute(
        "INSERT INTO events(id, flow, dedupe_key, body_hash, received_at, updated_at, status, record_key, reason,"
        " payload, meta, trace) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            e.id,
            e.flow,
            e.dedupe_key,
            e.body_hash,
            e.received_at,
            now,
            e.status,
            e.record_key,
            e.reason,
            e.payload,
            _j(e.meta),
            _j(e.trace),
        ),
    )
    if e.deliveries:
        conn.executemany(
            "INSERT INTO deliveries(event_id, flow, destination, status, request, idempotency_key, next_at,"
            " last_error, created_at, updated_at) VALUES(?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    e.id,
                    e.flow,
                    d.destination,
                    d.status,
                    _j(d.request),
                    d.idempotency_key,
                    e.received_at,
                    d.error,
                    now,
                    now,
                )
                for d in e.deliveries
            ],
        )
    return Accepted(e.id)


def tx_accept_batch(
    conn: sqlite3.Connection, events: list[NewEvent], flow: str, cursor: Any
) -> list[Accepted]:
    out = [tx_accept(conn, e) for e in events]
    if cursor is not None:
        tx_set_cursor(conn, flow, cursor)
    return out


def tx_set_cursor(conn: sqlite3.Connection, flow: str, cursor: Any) -> None:
    conn.execute(
        "INSERT INTO cursors(flow, value, updated_at) VALUES(?,?,?)"
        " ON CONFLICT(flow) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
        (flow, _j(cursor), time.time()),
    )


def q_cursor(conn: sqlite3.Connection, flow: str) -> Any:
    row = conn.execute("SELECT value FROM cursors WHERE flow=?", (flow,)).fetchone()
    return None if row is None else orjson.loads(row[0])


def tx_reset_cursor(conn: sqlite3.Connection, flow: str, by: Actor | None = None) -> bool:
    done = conn.execute("DELETE FROM cursors WHERE flow=?", (flow,)).rowcount > 0
    if by is not None:
        tx_audit(conn, by.name, "cursor.reset", flow, {**by.detail, "had_cursor": done}, by.origin)
    return done


def q_schedule(conn: sqlite3.Connection, flow: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM schedules WHERE flow=?", (flow,)).fetchone()
    return None if row is None else dict(row)


def tx_schedule(conn: sqlite3.Connection, flow: str, **fields: Any) -> None:
    conn.execute("INSERT OR IGNORE INTO schedules(flow) VALUES(?)", (flow,))
    if fields.pop("count_run", False):
        conn.execute("UPDATE schedules SET runs=runs+1 WHERE flow=?", (flow,))
    if fields:
        cols = ", ".join(f"{k}=?" for k in fields)
        conn.execute(f"UPDATE schedules SET {cols} WHERE flow=?", (*fields.values(), flow))


def q_due(
    conn: sqlite3.Connection,
    flow: str,
    destination: str,
    now: float,
    limit: int,
    skip: frozenset[int],
    after_id: int = 0,
) -> list[DueDelivery]:
    """Pending deliveries due by `now`, oldest first, past `after_id` and not in `skip` (already leased)."""
    rows = conn.execute(
        "SELECT id, event_id, request, idempotency_key, attempts, retries FROM deliveries"
        " WHERE flow=? AND destination=? AND status='pending' AND next_at<=? AND id>? ORDER BY id LIMIT ?",
        (flow, destination, now, after_id, limit + len(skip)),
    ).fetchall()
    out = []
    for r in rows:
        if r["id"] in skip:
            continue
        out.append(
            DueDelivery(
                r["id"],
                r["event_id"],
                flow,
                destination,
                orjson.loads(r["request"]),
                r["idempotency_key"],
                r["attempts"],
                r["retries"],
            )
        )
        if len(out) >= limit:
            break
    return out


def q_next_due_at(conn: sqlite3.Connection, flow: str, destination: str) -> float | None:
    row = conn.execute(
        "SELECT MIN(next_at) FROM deliveries WHERE flow=? AND destination=? AND status='pending'",
        (flow, destination),
    ).fetchone()
    return row[0]


def tx_record(conn: sqlite3.Connection, results: list[AttemptResult]) -> None:
    now = time.time()
    events: set[str] = set()
    for r in results:
        conn.execute(
            "UPDATE deliveries SET status=?, attempts=attempts+1, retries=retries+?, next_at=COALESCE(?, next_at),"
            " last_error=?, updated_at=? WHERE id=?",
            (
                r.new_status,
                1 if r.consumed_retry else 0,
                r.next_at,
                None if r.outcome == "success" else (r.error or f"HTTP {r.status_code}"),
                now,
                r.delivery_id,
            ),
        )
        conn.execute(
            "INSERT INTO attempts(delivery_id, n, started_at, latency_ms, status_code, outcome, excerpt, error)"
            " VALUES(?, (SELECT attempts FROM deliveries WHERE id=?), ?, ?, ?, ?, ?, ?)",
            (
                r.delivery_id,
                r.delivery_id,
                r.started_at,
                r.latency_ms,
                r.status_code,
                r.outcome,
                r.excerpt,
                r.error,
            ),
        )
        if r.response is not None:
            conn.execute(
                "INSERT OR REPLACE INTO responses(delivery_id, fields, at) VALUES(?,?,?)",
                (r.delivery_id, _j(r.response), now),
            )
        if r.new_status != "pending":
            events.add(r.event_id)
    for ev in events:
        refresh_event_status(conn, ev, now)


def q_response_fields(conn: sqlite3.Connection, event_id: str, destination: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT r.fields FROM responses r JOIN deliveries d ON d.id=r.delivery_id"
        " WHERE d.event_id=? AND d.destination=? ORDER BY d.id DESC LIMIT 1",
        (event_id, destination),
    ).fetchone()
    return None if row is None else orjson.loads(row[0])


def q_destination_states(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[str, str | None, float]]:
    return {
        (r["flow"], r["destination"]): (r["state"], r["reason"], r["since"])
        for r in conn.execute("SELECT * FROM destinations")
    }


def tx_set_destination_state(
    conn: sqlite3.Connection,
    flow: str,
    destination: str,
    state: str,
    reason: str | None,
    by: Actor | None = None,
) -> None:
    conn.execute(
        "INSERT INTO destinations(flow, destination, state, reason, since) VALUES(?,?,?,?,?)"
        " ON CONFLICT(flow, destination) DO UPDATE SET state=excluded.state, reason=excluded.reason,"
        " since=CASE WHEN destinations.state=excluded.state THEN destinations.since ELSE excluded.since END",
        (flow, destination, state, reason, time.time()),
    )
    if by is not None:
        action = "resume" if state == "active" else state
        tx_audit(conn, by.name, action, f"{flow}/{destination}", dict(by.detail), by.origin)


# ================================================================== monitoring: alert state, source health
# The alert loop's snapshot reads on a connection and thread of their own, with a timeout: a slow read
# never delays the delivery feed on the shared reader. Alert states and source health have their tables.

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
        # SQLite takes the bare columns from the row holding MAX(a.id): the latest attempt per destination.
        last = {
            (flow, dest): (at, outcome == "success")
            for flow, dest, _, at, outcome in conn.execute(
                "SELECT d.flow, d.destination, MAX(a.id), a.started_at, a.outcome"
                " FROM attempts a JOIN deliveries d ON d.id=a.delivery_id WHERE a.id>? AND a.id<=?"
                " GROUP BY d.flow, d.destination",
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
        queue: dict[tuple[str, str], tuple[int, float | None]] = {}
        for flow, dest in pairs:  # the due index covers count and min id: no row is read but the oldest
            n, first = conn.execute(
                "SELECT COUNT(*), MIN(id) FROM deliveries"
                " WHERE flow=? AND destination=? AND status='pending'",
                (flow, dest),
            ).fetchone()
            oldest = (
                conn.execute("SELECT created_at FROM deliveries WHERE id=?", (first,)).fetchone()
                if n
                else None
            )
            queue[(flow, dest)] = (n, oldest[0] if oldest else None)
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
