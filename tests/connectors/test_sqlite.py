"""sqlite destination on real database files: rows moved, errors classified, and a flow through the hub."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.sql_client.config import SqlSinkConfig
from patchbay.connectors.sqlite import SqliteSink, SqliteSystem
from tests.connectors import (
    CONTACT_EVENTS,
    CONTACT_ROWS,
    contacts_project,
    post_and_deliver,
    stop_hub,
)

DDL = """CREATE TABLE contacts (
    id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT NOT NULL DEFAULT '',
    score INTEGER CHECK (score >= 0), tags TEXT)"""

Make = Callable[..., SqliteSink]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "crm.db"
    with sqlite3.connect(path) as c:
        c.execute(DDL)
    return path


@pytest.fixture
async def make(db: Path) -> AsyncIterator[Make]:
    made: list[SqliteSink] = []

    def make(
        operation: str = "upsert",
        key: tuple[str, ...] = ("id",),
        path: Path = db,
        timeout_s: float = 2.0,
        **cfg: Any,
    ) -> SqliteSink:
        config = SqlSinkConfig.model_validate(
            {"table": "contacts", "write_mode": operation, "key": list(key), **cfg}
        )
        sink = SqliteSink(
            SqliteSystem(path=str(path)), config, DeliveryPolicy(timeout_s=timeout_s), Resources()
        )
        made.append(sink)
        return sink

    yield make
    for s in made:
        await s.close()


def rows(
    path: Path, sql: str = "SELECT id, email, name, score FROM contacts ORDER BY id"
) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as c:
        return c.execute(sql).fetchall()


async def write(sink: SqliteSink, record: dict[str, Any]) -> Any:
    return await sink.send(sink.render(record, "k"), "k")


async def test_insert_upsert_update_delete_move_rows(db, make):
    ins = make("insert", key=())
    assert (await write(ins, {"id": 1, "email": "a@x", "name": "A", "score": 1})).cls is OutcomeClass.SUCCESS
    up = make("upsert")
    out = await write(up, {"id": 1, "email": "a@x", "name": "A2", "score": 2})
    assert out.cls is OutcomeClass.SUCCESS and out.excerpt == "upsert into contacts: written"
    await write(up, {"id": 2, "email": "b@x", "name": "B", "score": 0})
    out = await write(
        make("update", columns={"id": "id", "score": "score"}), {"id": 2, "score": 9, "name": "ignored"}
    )
    assert out.cls is OutcomeClass.SUCCESS and out.excerpt == "update contacts: 1 row"
    assert rows(db) == [(1, "a@x", "A2", 2), (2, "b@x", "B", 9)]
    dele = make("delete")
    assert (await write(dele, {"id": 1})).excerpt == "delete from contacts: 1 row"
    out = await write(dele, {"id": 1})  # already gone: a retried delete still succeeds
    assert out.cls is OutcomeClass.SUCCESS and out.excerpt == "delete from contacts: 0 rows"
    assert rows(db) == [(2, "b@x", "B", 9)]


async def test_upsert_on_another_unique_key_and_json_values(db, make):
    up = make("upsert", key=("email",), columns={"email": "email", "name": "name", "tags": "tags"})
    await write(up, {"email": "a@x", "name": "A", "tags": ["x", {"y": 1}]})
    await write(up, {"email": "a@x", "name": "A!", "tags": []})
    assert rows(db, "SELECT email, name, tags FROM contacts") == [("a@x", "A!", "[]")]


async def test_unique_violation_on_insert_is_terminal_with_the_message(db, make):
    ins = make("insert", key=())
    await write(ins, {"id": 1, "email": "a@x"})
    out = await write(ins, {"id": 2, "email": "a@x"})
    assert out.cls is OutcomeClass.TERMINAL
    assert (
        out.error
        == "insert into contacts: [SQLITE_CONSTRAINT_UNIQUE] UNIQUE constraint failed: contacts.email"
    )
    out = await write(ins, {"id": 3, "email": "c@x", "score": -1})
    assert out.cls is OutcomeClass.TERMINAL and "CHECK constraint failed" in out.error
    assert (await write(ins, {"id": 4, "email": "d@x"})).cls is OutcomeClass.SUCCESS  # the connection is fine


async def test_bad_column_and_missing_table_are_terminal(db, make):
    out = await write(make("insert", key=()), {"id": 1, "nickname": "x"})
    assert out.cls is OutcomeClass.TERMINAL and "table contacts has no column named nickname" in out.error
    out = await write(make("insert", key=(), table="nope"), {"id": 1})
    assert out.cls is OutcomeClass.TERMINAL and "no such table" in out.error


async def test_update_of_a_missing_row_is_dead_lettered_unless_ignored(db, make):
    out = await write(make("update"), {"id": 42, "name": "x"})
    assert out.cls is OutcomeClass.TERMINAL and "no row has the key (id=42)" in out.error
    out = await write(make("update", if_missing="ignore"), {"id": 42, "name": "x"})
    assert out.cls is OutcomeClass.SUCCESS and out.excerpt == "update contacts: 0 rows"


async def test_missing_file_is_transient_and_a_later_send_succeeds(tmp_path, make):
    path = tmp_path / "later.db"
    sink = make("insert", key=(), path=path)
    out = await write(sink, {"id": 1})
    assert out.cls is OutcomeClass.TRANSIENT and "unable to open database file" in out.error
    assert not path.exists()  # never created by us
    with sqlite3.connect(path) as c:
        c.execute(DDL)
    assert (await write(sink, {"id": 1})).cls is OutcomeClass.SUCCESS
    assert rows(path) == [(1, None, "", None)]


async def test_a_locked_database_is_transient(db, make):
    sink = make("upsert", timeout_s=0.2)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        out = await write(sink, {"id": 1, "name": "x"})
        assert out.cls is OutcomeClass.TRANSIENT and "database is locked" in out.error
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (await write(sink, {"id": 1, "name": "x"})).cls is OutcomeClass.SUCCESS


async def test_webhook_to_sqlite_upsert_end_to_end(tmp_path, start_hub):
    path = tmp_path / "warehouse.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE people (email TEXT PRIMARY KEY, name TEXT, score INTEGER, tags TEXT)")
    hub = await start_hub(contacts_project(tmp_path, {"kind": "sqlite", "path": str(path)}, "people"))
    runs = await post_and_deliver(hub, CONTACT_EVENTS)
    await stop_hub(hub)
    assert rows(path, "SELECT email, name, score FROM people ORDER BY email") == CONTACT_ROWS
    assert rows(path, "SELECT tags FROM people ORDER BY email") == [('["vip"]',), ("[]",)]
    attempt = runs[0]["deliveries"][0]["attempts_log"][0]
    assert attempt["outcome"] == "success" and attempt["excerpt"] == "upsert into people: written"


CANCEL_THEN_CLOSE = """
import asyncio, sqlite3, sys
from pathlib import Path
from patchbay.connectors.base import Resources
from patchbay.connectors.sql_client.source_config import SqlSourceConfig
from patchbay.connectors.sqlite import SqliteSource, SqliteSystem

async def main(db):
    config = SqlSourceConfig.model_validate({
        "query": "SELECT a.id AS id, a.v AS v FROM t a JOIN t b ON b.id = a.id ORDER BY a.v DESC",
        "cursor_column": "id", "id_column": "id"})
    for _ in range(80):
        src = SqliteSource(SqliteSystem(path=db), config, Resources(allow_private=True))
        async def poll():
            async for _ in src.poll(None):
                pass
        task = asyncio.create_task(poll())
        await asyncio.sleep(0.05)
        task.cancel()  # the statement goes on in its worker thread
        await asyncio.gather(task, return_exceptions=True)
        await src.close()  # must not free the connection under it
    print("survived")

asyncio.run(main(sys.argv[1]))
"""


def test_closing_a_source_whose_cancelled_poll_still_runs_waits_for_it(tmp_path):
    """A cancelled poll leaves its SQLite statement running in a thread; closing the connection from another
    thread freed it under the statement and crashed the process (segfault, seen in the full suite)."""
    import subprocess
    import sys

    db = tmp_path / "s.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        c.executemany("INSERT INTO t VALUES (?, ?)", [(i, "x" * 50) for i in range(200_000)])
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", CANCEL_THEN_CLOSE, str(db)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr[-2000:])
