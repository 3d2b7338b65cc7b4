"""postgres destination on the local server: rows moved, errors classified, reconnects, a flow end to end."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.sql_client.config import SqlSinkConfig
from tests.conftest import IN_CI, eventually, require_service
from tests.connectors import (
    CONTACT_EVENTS,
    CONTACT_ROWS,
    closed_port,
    contacts_project,
    post_and_deliver,
    stop_hub,
)

if not IN_CI:
    pytest.importorskip(
        "psycopg", reason="the postgres extra is not installed: pip install 'patchbay[postgres]'"
    )
import psycopg

from patchbay.connectors.postgres import PostgresSink, PostgresSystem

HOST, PORT = os.environ.get("PATCHBAY_TEST_PG_HOST", "127.0.0.1"), 5432
SERVER = {"host": HOST, "port": PORT, "database": "test", "user": "postgres"}

Make = Callable[..., PostgresSink]


@pytest.fixture
async def admin() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    require_service("PostgreSQL", HOST, PORT)
    conn = await psycopg.AsyncConnection.connect(
        host=HOST, port=PORT, dbname="test", user="postgres", autocommit=True
    )
    yield conn
    await conn.close()


@pytest.fixture
async def table(admin) -> AsyncIterator[str]:
    name = f"pb_{uuid.uuid4().hex[:12]}"
    await admin.execute(
        f"CREATE TABLE \"{name}\" (id int PRIMARY KEY, email text UNIQUE, name text NOT NULL DEFAULT '', "
        "score int CHECK (score >= 0), tags jsonb)"
    )
    yield name
    await admin.execute(f'DROP TABLE IF EXISTS "{name}"')


@pytest.fixture
async def make(table) -> AsyncIterator[Make]:
    made: list[PostgresSink] = []

    def make(
        operation: str = "upsert",
        key: tuple[str, ...] = ("id",),
        server: dict[str, Any] | None = None,
        timeout_s: float = 5.0,
        **cfg: Any,
    ) -> PostgresSink:
        config = SqlSinkConfig.model_validate(
            {"table": table, "write_mode": operation, "key": list(key), **cfg}
        )
        system = PostgresSystem.model_validate({**SERVER, **(server or {})})
        sink = PostgresSink(
            system, config, DeliveryPolicy(timeout_s=timeout_s), Resources(allow_private=True)
        )
        made.append(sink)
        return sink

    yield make
    for s in made:
        await s.close()


async def rows(admin, table: str, cols: str = "id, email, name, score") -> list[tuple[Any, ...]]:
    cur = await admin.execute(f'SELECT {cols} FROM "{table}" ORDER BY 1')
    return await cur.fetchall()


async def write(sink: PostgresSink, record: dict[str, Any]) -> Any:
    return await sink.send(sink.render(record, "k"), "k")


async def test_insert_upsert_update_delete_move_rows(admin, table, make):
    ins = make("insert", key=())
    out = await write(
        ins, {"id": 1, "email": "a@x", "name": "A", "score": "1"}
    )  # text into int: the server casts
    assert out.cls is OutcomeClass.SUCCESS, out
    up = make("upsert")
    await write(up, {"id": 1, "email": "a@x", "name": "A2", "score": 2, "tags": {"vip": True}})
    await write(up, {"id": 2, "email": "b@x", "name": "B", "score": 0, "tags": ["x"]})
    out = await write(make("update", columns={"id": "id", "score": "score"}), {"id": 2, "score": 9})
    assert out.cls is OutcomeClass.SUCCESS and out.excerpt == f"update {table}: 1 row"
    assert await rows(admin, table) == [(1, "a@x", "A2", 2), (2, "b@x", "B", 9)]
    assert await rows(admin, table, "id, tags") == [(1, {"vip": True}), (2, ["x"])]
    dele = make("delete")
    assert (await write(dele, {"id": 1})).excerpt == f"delete from {table}: 1 row"
    assert (await write(dele, {"id": 1})).cls is OutcomeClass.SUCCESS  # already gone
    assert await rows(admin, table) == [(2, "b@x", "B", 9)]


async def test_update_with_expect_changes_only_columns_still_holding_the_expected_value(admin, table, make):
    await write(make("upsert"), {"id": 1, "email": "a@x", "name": "A", "score": 1})
    cas = make(
        "update",
        columns={"id": "id", "name": "fields.name", "score": "fields.score"},
        expect={"name": "expected.name", "score": "expected.score"},
    )
    out = await write(
        cas, {"id": 1, "fields": {"name": "B", "score": 2}, "expected": {"name": "A", "score": 1}}
    )
    assert out.cls is OutcomeClass.SUCCESS, out
    assert await rows(admin, table) == [(1, "a@x", "B", 2)]
    # Someone changed the score since the hub read 2: the hub's stale write leaves it, the name still moves.
    await admin.execute(f'UPDATE "{table}" SET score = 7 WHERE id = 1')
    out = await write(
        cas, {"id": 1, "fields": {"name": "C", "score": 3}, "expected": {"name": "B", "score": 2}}
    )
    assert out.cls is OutcomeClass.SUCCESS, out
    assert await rows(admin, table) == [(1, "a@x", "C", 7)]
    # Null is a value like any other: expected null matches a null column.
    await admin.execute(f'UPDATE "{table}" SET score = NULL WHERE id = 1')
    await write(cas, {"id": 1, "fields": {"name": "C", "score": 4}, "expected": {"name": "C", "score": None}})
    assert await rows(admin, table) == [(1, "a@x", "C", 4)]


async def test_schema_and_upsert_on_another_unique_key(admin, table, make):
    up = make(
        "upsert", key=("email",), schema="public", columns={"id": "id", "email": "email", "name": "name"}
    )
    await write(up, {"id": 1, "email": "a@x", "name": "A"})
    await write(up, {"id": 1, "email": "a@x", "name": "A!"})
    assert await rows(admin, table) == [(1, "a@x", "A!", None)]


async def test_unique_violation_on_insert_is_terminal_with_the_message(admin, table, make):
    ins = make("insert", key=())
    await write(ins, {"id": 1, "email": "a@x"})
    out = await write(ins, {"id": 2, "email": "a@x"})
    assert out.cls is OutcomeClass.TERMINAL
    assert out.error == (
        f"insert into {table}: [23505] duplicate key value violates unique constraint "
        f'"{table}_email_key" (Key (email)=(a@x) already exists)'
    )
    for record, code in [
        ({"id": 3, "name": None}, "23502"),
        ({"id": 4, "score": -1}, "23514"),
        ({"id": 5, "score": "many"}, "22P02"),
        ({"id": 6, "score": 2**40}, "22003"),
    ]:
        out = await write(ins, record)
        assert out.cls is OutcomeClass.TERMINAL and f"[{code}]" in out.error, (record, out)
    assert (await write(ins, {"id": 7})).cls is OutcomeClass.SUCCESS  # the connection survived the errors


async def test_bad_column_and_missing_table_are_terminal(make):
    out = await write(make("insert", key=()), {"id": 1, "nickname": "x"})
    assert out.cls is OutcomeClass.TERMINAL and "[42703]" in out.error and 'column "nickname"' in out.error
    assert "LINE 1" not in out.error and "LINE 1" in out.excerpt  # the caret stays in the excerpt
    out = await write(make("insert", key=(), table="pb_no_such_table"), {"id": 1})
    assert out.cls is OutcomeClass.TERMINAL and "[42P01]" in out.error


async def test_connection_refused_is_transient(make):
    out = await write(make(server={"port": closed_port()}), {"id": 1})
    assert out.cls is OutcomeClass.TRANSIENT and "Connection refused" in out.error, out


async def test_unknown_role_pauses_the_destination(make):
    out = await write(make(server={"user": "pb_no_such_role"}), {"id": 1})
    assert out.cls is OutcomeClass.AUTH and 'role "pb_no_such_role" does not exist' in out.error, out
    assert "destination paused" in out.error


async def test_killed_connection_is_transient_then_reconnects_without_duplicates(admin, table, make):
    sink = make("upsert")
    assert (await write(sink, {"id": 1, "name": "first"})).cls is OutcomeClass.SUCCESS
    [conn] = sink._pool.idle
    await admin.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])

    async def gone() -> bool:  # pg_terminate_backend only signals the backend
        cur = await admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [conn.info.backend_pid]
        )
        return (await cur.fetchone())[0] == 0

    await eventually(gone, timeout=5, what="the terminated backend gone")
    record = {"id": 2, "name": "second"}
    out = await write(sink, record)
    assert out.cls is OutcomeClass.TRANSIENT, out
    assert "[57P01]" in out.error or "closed" in out.error
    assert sink._pool.idle == []  # the dead connection was dropped
    for _ in range(2):  # the retry, and a duplicate retry: upsert writes the row once
        assert (await write(sink, record)).cls is OutcomeClass.SUCCESS
    assert await rows(admin, table) == [(1, None, "first", None), (2, None, "second", None)]


async def test_timeout_is_transient_and_the_statement_is_cancelled(admin, table, make):
    sink = make("update", timeout_s=0.5)
    await write(make("insert", key=()), {"id": 1, "name": "old"})
    async with admin.transaction():
        await admin.execute(f'SELECT * FROM "{table}" WHERE id = 1 FOR UPDATE')
        out = await write(sink, {"id": 1, "name": "new"})
        assert out.cls is OutcomeClass.TRANSIENT and "timed out after 0.5s" in out.error
    assert await rows(admin, table, "name") == [("old",)]
    assert (await write(sink, {"id": 1, "name": "new"})).cls is OutcomeClass.SUCCESS
    assert await rows(admin, table, "name") == [("new",)]


async def test_webhook_to_postgres_upsert_end_to_end(tmp_path, start_hub, admin, table):
    await admin.execute(f'DROP TABLE "{table}"')  # the fixture drops this one after the test
    await admin.execute(f'CREATE TABLE "{table}" (email text PRIMARY KEY, name text, score int, tags jsonb)')
    hub = await start_hub(contacts_project(tmp_path, {"kind": "postgres", **SERVER}, table))
    await post_and_deliver(hub, CONTACT_EVENTS)
    await stop_hub(hub)
    assert await rows(admin, table, "email, name, score") == CONTACT_ROWS
    assert await rows(admin, table, "email, tags") == [("ann@example.com", ["vip"]), ("bob@example.com", [])]
