"""The SQLite store's group-commit writer: one transaction per group, and what happens when part of it fails."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

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
def insert_redoable(conn: sqlite3.Connection, v: str) -> int:
    """An insert that may be lost in a power cut; answers the synchronous level its group commits at."""
    conn.execute("INSERT INTO t(v) VALUES(?)", (v,))
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


def insert_durable(conn: sqlite3.Connection, v: str) -> int:
    conn.execute("INSERT INTO t(v) VALUES(?)", (v,))
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


NORMAL, FULL = 1, 2


async def test_a_group_of_redoable_writes_alone_commits_without_waiting_for_the_disk(store):
    assert await one_group(store, *[(insert_redoable, f"r{i}") for i in range(3)]) == [NORMAL] * 3
    assert store.stats["relaxed_commits"] == 1
    # One write that must survive a power cut in the group: the whole group waits for the disk.
    assert await one_group(store, (insert_redoable, "a"), (insert_durable, "b")) == [FULL, FULL]
    assert await store.write(insert_durable, "c") == FULL
    assert await store.write(insert_redoable, "d") == NORMAL
    assert store.stats["relaxed_commits"] == 2
    # Committed all the same: a new connection reads every row.
    fresh = sqlite3.connect(store.path)
    try:
        assert sorted(r[0] for r in fresh.execute("SELECT v FROM t")) == [
            "a",
            "b",
            "c",
            "d",
            "r0",
            "r1",
            "r2",
        ]
    finally:
        fresh.close()


def test_only_an_attempt_record_is_redoable_on_the_hot_path():
    """An attempt record lost in a power cut means the delivery is sent again under its idempotency key,
    which at-least-once delivery allows; an accepted event must never be lost, so its commit waits."""
    assert is_redoable(tx_record)
    assert not is_redoable(tx_accept) and not is_redoable(tx_accept_batch)
