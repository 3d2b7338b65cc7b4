"""The SQLite store's group-commit writer: one transaction per group, and what happens when part of it fails."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from patchbay.errors import StoreUnavailable
from patchbay.store.common import is_redoable, redoable
from patchbay.store.sqlite import SqliteStore, StoreClosed
from patchbay.store.sqlite_ops import tx_accept, tx_accept_batch, tx_record


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "store.db")
    await s.write(lambda c: c.execute("CREATE TABLE t(v TEXT NOT NULL UNIQUE)"))
    yield s
    await s.close()


def insert(conn: sqlite3.Connection, v: str) -> str:
    conn.execute("INSERT INTO t(v) VALUES(?)", (v,))
    return v


def insert_then_fail(conn: sqlite3.Connection, v: str) -> None:
    conn.execute("INSERT INTO t(v) VALUES(?)", (v,))
    raise RuntimeError(f"op {v} failed")


async def values(store: SqliteStore) -> list[str]:
    return await store.read(lambda c: [r[0] for r in c.execute("SELECT v FROM t ORDER BY v")])


async def one_group(store: SqliteStore, *ops: tuple[object, ...]) -> list[object]:
    """Queue `ops` while the writer is held inside another operation, so they form one group."""
    entered, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(10)

    held = asyncio.ensure_future(store.write(hold))
    await asyncio.to_thread(entered.wait, 10)
    futures = [asyncio.ensure_future(store.write(fn, *args)) for fn, *args in ops]  # type: ignore[arg-type]
    await asyncio.sleep(0)  # each has queued its operation behind the held one
    release.set()
    await held
    return await asyncio.gather(*futures, return_exceptions=True)


async def test_a_group_is_one_transaction(store):
    before = store.stats["commits"]
    got = await one_group(store, *[(insert, f"v{i}") for i in range(50)])
    assert got == [f"v{i}" for i in range(50)]
    assert store.stats["commits"] - before == 2  # the holding operation's group, then these 50
    assert len(await values(store)) == 50


async def test_one_failing_operation_fails_alone(store):
    got = await one_group(store, (insert, "a"), (insert_then_fail, "b"), (insert, "c"), (insert, "a"))
    assert got[0] == "a" and got[2] == "c"
    assert isinstance(got[1], RuntimeError) and str(got[1]) == "op b failed"
    assert isinstance(got[3], sqlite3.IntegrityError)  # the duplicate of "a" in the same group
    assert await values(store) == ["a", "c"]  # b's insert was rolled back with it, nothing else
    assert await store.write(insert, "d") == "d"  # and the writer goes on


async def test_an_error_at_commit_reaches_every_caller_of_the_group(store):
    await store.write(lambda c: c.execute("CREATE TABLE parent(id INTEGER PRIMARY KEY)"))
    await store.write(
        lambda c: c.execute(
            "CREATE TABLE child(p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
        )
    )

    def orphan(conn: sqlite3.Connection) -> str:  # legal until COMMIT checks the deferred key
        conn.execute("INSERT INTO child(p) VALUES(42)")
        return "queued"

    got = await one_group(store, (insert, "x"), (orphan,), (insert, "y"))
    assert all(isinstance(r, sqlite3.IntegrityError) and "FOREIGN KEY" in str(r) for r in got)
    assert await values(store) == []  # the whole group was rolled back
    assert await store.read(lambda c: c.execute("SELECT COUNT(*) FROM child").fetchone()[0]) == 0
    assert await store.write(insert, "z") == "z" and store.writing


async def test_work_queued_before_close_commits_and_later_work_is_refused(store):
    entered, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(10)

    held = asyncio.ensure_future(store.write(hold))
    await asyncio.to_thread(entered.wait, 10)
    queued = [asyncio.ensure_future(store.write(insert, f"q{i}")) for i in range(5)]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)  # close() has queued the writer's stop behind the work
    release.set()
    await held
    assert await asyncio.gather(*queued) == [f"q{i}" for i in range(5)]
    await closing
    assert not store.writing
    with pytest.raises(StoreClosed, match="closed"):
        await asyncio.wait_for(store.write(insert, "late"), 5)


async def test_work_stranded_behind_the_stop_fails_instead_of_waiting_forever(tmp_path):
    store = SqliteStore(tmp_path / "s.db")
    await store.write(lambda c: c.execute("CREATE TABLE t(v TEXT)"))
    store._writer.q.put(_stop())  # the writer stops as close() would make it, then work arrives
    await asyncio.to_thread(store._writer.join, 10)
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(store.write(insert, "late"), 5)
    await store.close()


def _stop() -> object:
    from patchbay.store.sqlite import _STOP

    return _STOP


@redoable
def insert_redoable(conn: sqlite3.Connection, v: str) -> str:
    """An insert that may be lost in a power cut (an attempt record is one)."""
    conn.execute("INSERT INTO t(v) VALUES(?)", (v,))
    return v


def fresh_values(store: SqliteStore) -> list[str]:
    """What another connection reads: what is committed, on disk or not yet."""
    conn = sqlite3.connect(store.path)
    try:
        return sorted(r[0] for r in conn.execute("SELECT v FROM t"))
    finally:
        conn.close()


async def test_a_group_of_redoable_writes_alone_is_answered_without_waiting_for_the_disk(store):
    syncs = store._writer.syncer.syncs
    assert await one_group(store, *[(insert_redoable, f"r{i}") for i in range(3)]) == ["r0", "r1", "r2"]
    assert store.stats["relaxed_commits"] == 1
    assert store._writer.syncer.syncs == syncs + 1  # the holding operation's group (one_group) alone
    # One write that must survive a power cut in the group: the group is answered after an fsync.
    syncs = store._writer.syncer.syncs
    assert await one_group(store, (insert_redoable, "a"), (insert, "b")) == ["a", "b"]
    assert store._writer.syncer.syncs >= syncs + 1  # the holder's and this group's: one fsync or two
    syncs = store._writer.syncer.syncs
    assert await store.write(insert, "c") == "c"
    assert store._writer.syncer.syncs == syncs + 1
    assert fresh_values(store) == ["a", "b", "c", "r0", "r1", "r2"]


async def test_the_writer_goes_on_while_a_group_is_put_on_disk_and_its_callers_wait_for_that(
    store, monkeypatch
):
    """The fsync runs after the write lock is let go: the next group (here a record) commits and is
    answered meanwhile; the caller of the group being put on disk hears only once it is there."""
    from patchbay.store import sqlite_writer

    entered, release, fsync = threading.Event(), threading.Event(), sqlite_writer.os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        release.wait(10)
        fsync(fd)

    monkeypatch.setattr(sqlite_writer.os, "fsync", slow_fsync)
    try:
        first = asyncio.ensure_future(store.write(insert, "accepted"))
        await asyncio.to_thread(entered.wait, 10)
        assert await asyncio.wait_for(store.write(insert_redoable, "record"), 5) == "record"
        assert fresh_values(store) == ["accepted", "record"]  # both committed...
        await asyncio.sleep(0.1)
        assert not first.done()  # ...but the first caller waits for its fsync
    finally:
        release.set()
    assert await first == "accepted"


async def test_a_failed_fsync_fails_its_callers_says_why_and_the_next_one_recovers(store, monkeypatch):
    from patchbay.store import sqlite_writer

    fsync, fail = sqlite_writer.os.fsync, [True]

    def failing_fsync(fd: int) -> None:
        if fail:
            fail.clear()
            raise OSError(5, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(sqlite_writer.os, "fsync", failing_fsync)
    with pytest.raises(StoreUnavailable, match="putting the WAL on disk"):
        await store.write(insert, "a")
    assert "I/O error" in (store.problem or "")
    assert await store.write(insert, "b") == "b"
    assert store.problem is None


def test_only_an_attempt_record_is_redoable_on_the_hot_path():
    """An attempt record lost in a power cut means the delivery is sent again under its idempotency key,
    which at-least-once delivery allows; an accepted event must never be lost, so its commit waits."""
    assert is_redoable(tx_record)
    assert not is_redoable(tx_accept) and not is_redoable(tx_accept_batch)


async def test_due_deliveries_are_on_disk_before_they_are_handed_out(tmp_path):
    """A commit is seen before its fsync (another process's too): what `due` hands out to be sent is synced
    first, so an event lost in a power cut was never sent."""
    from tests.store.test_conformance import due, event

    store = SqliteStore(tmp_path / "s.db")
    try:
        syncs = store._writer.syncer.syncs
        assert await due(store) == []
        assert store._writer.syncer.syncs == syncs  # nothing to hand out, nothing to sync
        await store.accept(event())
        syncs = store._writer.syncer.syncs
        assert len(await due(store)) == 1
        assert store._writer.syncer.syncs == syncs + 1
    finally:
        await store.close()
