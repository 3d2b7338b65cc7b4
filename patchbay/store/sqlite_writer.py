"""The SQLite store's writer: one thread, group commit, and the conditions (disk full, damage) it reports."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from patchbay.errors import StoreUnavailable
from patchbay.store.common import is_redoable
from patchbay.store.sqlite_schema import StoreClosed, connect

log = logging.getLogger("patchbay.store")

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
    """Group commit: one transaction per batch of queued operations, put on disk by the syncer (_Syncer)
    outside the write lock; a batch of redoable writes alone (attempt records) does not wait for it."""

    def __init__(self, path: Path, max_batch: int = 512, probe_s: float = 1.0) -> None:
        super().__init__(name="patchbay-store-writer", daemon=True)
        # Several processes may write one file (web processes beside a worker): each transaction holds an
        # flock on `<store>.write.lock` from BEGIN to COMMIT. A process waiting for it is woken the moment the
        # other releases it, where SQLite's own busy handler would sleep 1, 2, 5, 10... ms between tries.
        self._wlock = WriteLock(path)
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.path = path
        self.max_batch = max_batch
        self.commits = 0
        self.relaxed_commits = 0  # of those, groups of redoable writes alone (store/common.py `redoable`)
        self.ops = 0
        self.syncer = _Syncer(path)
        # Why transactions fail right now (disk full, I/O error, damage), or None. Set and cleared only
        # here, from what a transaction did: one log line when it starts, one when writes succeed again.
        self._problem: str | None = None
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

    @property
    def problem(self) -> str | None:
        """Why writes fail right now: a transaction's condition, or the WAL that cannot be put on disk."""
        return self._problem or self.syncer.problem

    def run(self) -> None:
        conn = connect(self.path)
        # A commit does not wait for the disk here: the syncer puts it there after the write lock is let go
        # (_Syncer), so that the next group, or another process's, commits during the fsync.
        conn.execute("PRAGMA synchronous=NORMAL")
        self.syncer.start()
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
                # The write lock first, then the group: what is queued while another process writes joins
                # this group instead of waiting for a turn of its own.
                with self._wlock:
                    batch, stop = self._gather(item)
                    self._run_batch(conn, batch)
                if stop:
                    return
                if self.commits % 64 == 0 and _size(wal) > WAL_LIMIT:
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:
                        log.warning("checkpointing the store's WAL: %s", exc)
        finally:
            self.syncer.q.put(_STOP)
            self.syncer.join()  # every group committed is answered before the rest is refused
            conn.close()
            if self._wlock.turns:
                log.info(
                    "store writer: %d transactions, %.1f s waiting for %s, %.1f s holding it",
                    self._wlock.turns,
                    self._wlock.waited_s,
                    self._wlock.path,
                    self._wlock.held_s,
                )
            self._wlock.close()
            self._refuse_the_rest()

    def _gather(self, first: Any) -> tuple[list[Any], bool]:
        """`first` and what is queued behind it (up to max_batch); True when the stop came among them."""
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                nxt = self.q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)
        return batch, False

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
        answers = [(loop, r) for (loop, _, _, _), r in zip(batch, results, strict=True)]
        # What holds a promise (an accept, a decision) is answered once it is on disk; a group of redoable
        # writes alone, or one where nothing was written, at once.
        written = any(ok for _, ok, _ in results)
        if written and all(is_redoable(fn) for _, _, fn, _ in batch):
            self.relaxed_commits += 1
            _answer(answers)
        elif written:
            self.syncer.q.put(answers)
        else:
            _answer(answers)

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
        with self._wlock:
            self._probe_locked(conn)

    def _probe_locked(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('write_probe', zeroblob(16384))")
            conn.execute("DELETE FROM meta WHERE key='write_probe'")
            conn.execute("COMMIT")
            self.syncer.sync()
        except (sqlite3.Error, OSError) as exc:
            _rollback(conn)
            self._set_problem(f"{store_condition(exc) or 'a write failed'} ({exc})")
            return
        self._set_problem(None)

    def _set_problem(self, problem: str | None) -> None:
        if problem == self._problem:
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
        self._problem = problem


class WriteLock:
    """A blocking flock on `<store>.write.lock`, held around one write transaction (see `_Writer`). Opened at
    the first use; when the lock file cannot be opened (a read-only folder) SQLite's busy handler is all."""

    def __init__(self, path: Path) -> None:
        self.path = str(path) + ".write.lock"
        self.fd: int | None = None
        self.failed = False
        # Seconds spent waiting for the lock and holding it, and how many times: logged when the writer stops.
        self.waited_s = self.held_s = 0.0
        self.turns = 0
        self._at = 0.0

    def __enter__(self) -> None:
        if self.fd is None and not self.failed:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                self.failed = True
                log.warning(
                    "opening %s: %s; writers of this store wait in SQLite's busy handler", self.path, exc
                )
        if self.fd is not None:
            t0 = time.perf_counter()
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._at = time.perf_counter()
            self.waited_s += self._at - t0
            self.turns += 1

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held_s += time.perf_counter() - self._at

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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


class _Syncer(threading.Thread):
    """Puts committed groups on disk: one fsync of the WAL answers every group committed before it.

    The writer commits with synchronous=NORMAL, releases the write lock and hands a group that holds a
    promise (an accept, a decision) here; its callers hear of it after the fsync. The WAL's frames are then
    on disk, or already in the database file (a checkpoint syncs the WAL before it copies, and the file after).
    Durability is FULL's, but the write lock is no longer held through the fsync: measured on the SQLite split
    (web + worker processes, docs/scaling.md), the web process held it twice as long with the fsync inside.
    A reader may see a commit before its fsync: `SqliteStore.due` syncs before what it read is sent."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="patchbay-store-syncer", daemon=True)
        self.path = path
        self.wal = str(path) + "-wal"
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.syncs = 0
        self._fd: int | None = None
        self._lock = threading.Lock()
        # Why the WAL cannot be put on disk right now, or None; cleared by the next fsync that succeeds.
        self.problem: str | None = None

    def sync(self) -> None:
        """fsync the WAL (from any thread); OSError when it fails."""
        with self._lock:
            try:
                if self._fd is None:
                    self._fd = os.open(self.wal, os.O_RDONLY)
                os.fsync(self._fd)
            except FileNotFoundError:  # no WAL (nothing written since the last close): all is in the file
                return
            except OSError as exc:
                if self.problem is None:
                    log.error("putting the store's WAL %s on disk fails: %s", self.wal, exc)
                self.problem = f"an I/O error (fsync: {exc})"
                raise
            if self.problem is not None:
                log.warning("putting the store's WAL %s on disk succeeds again", self.wal)
            self.problem = None
            self.syncs += 1

    def run(self) -> None:
        try:
            while True:
                groups, stop = [self.q.get()], False
                while True:
                    try:
                        groups.append(self.q.get_nowait())
                    except queue.Empty:
                        break
                if _STOP in groups:
                    stop = True
                    groups = [g for g in groups if g is not _STOP]
                if groups:
                    self._answer(groups)
                if stop:
                    return
        finally:
            with self._lock:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None

    def on_disk(self, doing: str) -> None:
        """`sync`, its failure a StoreUnavailable that says what was being done (`doing` the store ...)."""
        try:
            self.sync()
        except OSError as exc:
            err = StoreUnavailable(
                f"{doing} the store {self.path}: an I/O error (putting the WAL on disk: {exc})",
                "an I/O error",
            )
            raise err from exc

    def _answer(self, groups: list[list[tuple[Any, tuple[Any, bool, Any]]]]) -> None:
        try:
            self.on_disk("writing to")
        except StoreUnavailable as err:  # committed, but not known to be on disk: the callers hear it failed
            groups = [
                [(loop, (fut, False, err) if ok else (fut, ok, v)) for loop, (fut, ok, v) in g]
                for g in groups
            ]
        for g in groups:
            _answer(g)


def _answer(answers: list[tuple[Any, tuple[Any, bool, Any]]]) -> None:
    """Each caller's result, on its own event loop."""
    by_loop: dict[Any, list[tuple[Any, bool, Any]]] = {}
    for loop, r in answers:
        by_loop.setdefault(loop, []).append(r)
    for loop, rs in by_loop.items():
        loop.call_soon_threadsafe(_resolve, rs)


def _resolve(results: Iterable[tuple[Any, bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
