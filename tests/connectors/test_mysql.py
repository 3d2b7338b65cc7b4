"""mysql destination on the local MariaDB: rows moved, errors classified, reconnects, a flow end to end."""

from __future__ import annotations

import os
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors import tls_client
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.sql_client.config import SqlSinkConfig
from tests.conftest import IN_CI, eventually, require_service
from tests.connectors import (
    CONTACT_EVENTS,
    CONTACT_ROWS,
    closed_port,
    contacts_project,
    declared_secrets,
    post_and_deliver,
    stop_hub,
)

if not IN_CI:
    pytest.importorskip("aiomysql", reason="the mysql extra is not installed: pip install 'patchbay[mysql]'")
import aiomysql

from patchbay.connectors.mysql import MysqlSink, MysqlSystem

HOST, PORT = os.environ.get("PATCHBAY_TEST_MYSQL_HOST", "127.0.0.1"), 3306
SERVER = {"host": HOST, "port": PORT, "database": "test", "user": "root"}

Make = Callable[..., MysqlSink]


class Admin:
    """A plain connection for setting up tables and reading them back."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            return list(await cur.fetchall())


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    require_service("MariaDB/MySQL", HOST, PORT)
    conn = await aiomysql.connect(host=HOST, port=PORT, user="root", password="", db="test", autocommit=True)
    yield Admin(conn)
    conn.close()


@pytest.fixture
async def table(admin) -> AsyncIterator[str]:
    name = f"pb_{uuid.uuid4().hex[:12]}"
    await admin.execute(
        f"CREATE TABLE `{name}` (id INT PRIMARY KEY, email VARCHAR(100) UNIQUE, "
        "name VARCHAR(20) NOT NULL DEFAULT '', score INT, tags JSON, CHECK (score >= 0))"
    )
    yield name
    await admin.execute(f"DROP TABLE IF EXISTS `{name}`")


@pytest.fixture
async def make(table) -> AsyncIterator[Make]:
    made: list[MysqlSink] = []

    def make(
        operation: str = "upsert",
        key: tuple[str, ...] = ("id",),
        server: dict[str, Any] | None = None,
        timeout_s: float = 5.0,
        **cfg: Any,
    ) -> MysqlSink:
        config = SqlSinkConfig.model_validate(
            {"table": table, "write_mode": operation, "key": list(key), **cfg}
        )
        system = MysqlSystem.model_validate({**SERVER, **(server or {})})
        sink = MysqlSink(system, config, DeliveryPolicy(timeout_s=timeout_s), Resources(allow_private=True))
        made.append(sink)
        return sink

    yield make
    for s in made:
        await s.close()


async def rows(admin: Admin, table: str, cols: str = "id, email, name, score") -> list[tuple[Any, ...]]:
    return await admin.execute(f"SELECT {cols} FROM `{table}` ORDER BY 1")


async def write(sink: MysqlSink, record: dict[str, Any]) -> Any:
    return await sink.send(sink.render(record, "k"), "k")


async def test_insert_upsert_update_delete_move_rows(admin, table, make):
    ins = make("insert", key=())
    assert (
        await write(ins, {"id": 1, "email": "a@x", "name": "A", "score": "1"})
    ).cls is OutcomeClass.SUCCESS
    up = make("upsert")
    await write(up, {"id": 1, "email": "a@x", "name": "A2", "score": 2, "tags": {"vip": True}})
    await write(up, {"id": 2, "email": "b@x", "name": "B", "score": 0, "tags": ["x"]})
    upd = make("update", columns={"id": "id", "score": "score"})
    assert (await write(upd, {"id": 2, "score": 9})).excerpt == f"update {table}: 1 row"
    # Same value again: still one row matched (not "0 changed"), so no false dead letter on a retry.
    assert (await write(upd, {"id": 2, "score": 9})).excerpt == f"update {table}: 1 row"
    assert await rows(admin, table) == [(1, "a@x", "A2", 2), (2, "b@x", "B", 9)]
    assert await rows(admin, table, "id, tags") == [(1, '{"vip":true}'), (2, '["x"]')]
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
    await admin.execute(f"UPDATE `{table}` SET score = 7 WHERE id = 1")
    out = await write(
        cas, {"id": 1, "fields": {"name": "C", "score": 3}, "expected": {"name": "B", "score": 2}}
    )
    assert out.cls is OutcomeClass.SUCCESS, out
    assert await rows(admin, table) == [(1, "a@x", "C", 7)]
    # Null is a value like any other: expected null matches a null column.
    await admin.execute(f"UPDATE `{table}` SET score = NULL WHERE id = 1")
    await write(cas, {"id": 1, "fields": {"name": "C", "score": 4}, "expected": {"name": "C", "score": None}})
    assert await rows(admin, table) == [(1, "a@x", "C", 4)]


async def test_unique_violation_on_insert_is_terminal_with_the_message(admin, table, make):
    ins = make("insert", key=())
    await write(ins, {"id": 1, "email": "a@x"})
    out = await write(ins, {"id": 2, "email": "a@x"})
    assert out.cls is OutcomeClass.TERMINAL
    assert out.error == f"insert into {table}: [1062] Duplicate entry 'a@x' for key 'email'"
    for record, code in [
        ({"id": 3, "name": None}, "1048"),
        ({"id": 4, "name": "x" * 21}, "1406"),
        ({"id": 5, "score": "many"}, "1366"),
        ({"id": 6, "score": -1}, "4025"),
    ]:
        out = await write(ins, record)
        assert out.cls is OutcomeClass.TERMINAL and f"[{code}]" in out.error, (record, out)
    assert (await write(ins, {"id": 7})).cls is OutcomeClass.SUCCESS  # the connection survived the errors


async def test_bad_column_and_missing_table_are_terminal(make):
    out = await write(make("insert", key=()), {"id": 1, "nickname": "x"})
    assert out.cls is OutcomeClass.TERMINAL and "[1054] Unknown column 'nickname'" in out.error
    out = await write(make("insert", key=(), table="pb_no_such_table"), {"id": 1})
    assert out.cls is OutcomeClass.TERMINAL and "[1146]" in out.error


async def test_connection_refused_is_transient(make):
    out = await write(make(server={"port": closed_port()}), {"id": 1})
    assert out.cls is OutcomeClass.TRANSIENT and "[2003]" in out.error, out


async def test_wrong_password_pauses_the_destination_without_leaking_it(make, monkeypatch):
    monkeypatch.setenv("PB_TEST_MYSQL_PASSWORD", "wrong-pass-123")
    sink = make(server={"password": {"env": "PB_TEST_MYSQL_PASSWORD"}})
    sink.resources.secret = lambda ref: os.environ[ref.env]
    out = await write(sink, {"id": 1})
    assert out.cls is OutcomeClass.AUTH and "[1045] Access denied" in out.error, out
    assert "wrong-pass-123" not in out.error + out.excerpt
    assert declared_secrets(sink.system) == ["env:PB_TEST_MYSQL_PASSWORD"]


async def test_the_tls_context_is_built_once_per_system_in_a_worker_thread(table, make, monkeypatch):
    """Each connect used to build two contexts on the event loop (100-150 ms, the CAs loaded twice)."""
    tls_client.forget()
    built: list[int] = []
    real_new = ssl.SSLContext.__new__

    def counting_new(cls: type[ssl.SSLContext], *args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(threading.get_ident())
        return real_new(cls, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "__new__", staticmethod(counting_new))
    sink = make("upsert")  # a loopback host: ssl_mode prefer, so a context is built
    for i in range(3):
        assert (await write(sink, {"id": i})).cls is OutcomeClass.SUCCESS
        await sink._pool.clear()  # the next send connects again
    assert len(built) == 1, built
    assert built[0] != threading.get_ident()


async def test_killed_connection_is_transient_then_reconnects_without_duplicates(admin, table, make):
    sink = make("upsert")
    assert (await write(sink, {"id": 1, "name": "first"})).cls is OutcomeClass.SUCCESS
    [conn] = sink._pool.idle
    await admin.execute(f"KILL {conn.thread_id()}")

    async def gone() -> bool:  # KILL returns before the server has closed the connection
        sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
        return (await admin.execute(sql, [conn.thread_id()]))[0][0] == 0

    await eventually(gone, timeout=5, what="the killed connection closed by the server")
    record = {"id": 2, "name": "second"}
    out = await write(sink, record)
    assert out.cls is OutcomeClass.TRANSIENT and "[2013]" in out.error, out
    assert sink._pool.idle == []
    for _ in range(2):  # the retry, and a duplicate retry: upsert writes the row once
        assert (await write(sink, record)).cls is OutcomeClass.SUCCESS
    assert await rows(admin, table) == [(1, None, "first", None), (2, None, "second", None)]


async def test_lock_wait_is_transient(admin, table, make):
    await write(make("insert", key=()), {"id": 1, "name": "old"})
    holder = await aiomysql.connect(
        host=HOST, port=PORT, user="root", password="", db="test", autocommit=False
    )
    try:
        async with holder.cursor() as cur:
            await cur.execute(f"SELECT * FROM `{table}` WHERE id = 1 FOR UPDATE")
        out = await write(make("update", timeout_s=1.0), {"id": 1, "name": "new"})
        assert out.cls is OutcomeClass.TRANSIENT, out
        assert "timed out" in out.error or "[1205]" in out.error
        await holder.rollback()
    finally:
        holder.close()
    assert (await write(make("update"), {"id": 1, "name": "new"})).cls is OutcomeClass.SUCCESS


async def test_webhook_to_mysql_upsert_end_to_end(tmp_path, start_hub, admin, table):
    await admin.execute(f"DROP TABLE `{table}`")  # the fixture drops this one after the test
    await admin.execute(
        f"CREATE TABLE `{table}` (email VARCHAR(100) PRIMARY KEY, name TEXT, score INT, tags JSON)"
    )
    hub = await start_hub(contacts_project(tmp_path, {"kind": "mysql", **SERVER}, table))
    await post_and_deliver(hub, CONTACT_EVENTS)
    await stop_hub(hub)
    assert await rows(admin, table, "email, name, score") == [tuple(r) for r in CONTACT_ROWS]
    assert await rows(admin, table, "email, tags") == [
        ("ann@example.com", '["vip"]'),
        ("bob@example.com", "[]"),
    ]
