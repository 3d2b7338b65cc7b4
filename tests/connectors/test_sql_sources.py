"""SQL sources (postgres, mysql, sqlite) on real databases: pages, ties, resume, reconnects, a flow.

The scenarios run once per database (like dlt's destinations_configs); the config and SQL building are
tested first, without a database.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from patchbay.cli import main
from patchbay.connectors.base import Batch, Resources
from patchbay.connectors.sql_client.source import SqlSource
from patchbay.connectors.sql_client.source_config import SqlSourceConfig, bind_cursor
from patchbay.connectors.sql_client.source_query import SourcePosition, SourceQuery, jsonable
from patchbay.errors import AuthError, TerminalError, TransientError
from tests.conftest import IN_CI, eventually, require_service, write_project
from tests.connectors import closed_port, polls_more

PG: dict[str, Any] = {
    "host": os.environ.get("PATCHBAY_TEST_PG_HOST", "127.0.0.1"),
    "port": 5432,
    "database": "test",
    "user": "postgres",
}
MY: dict[str, Any] = {
    "host": os.environ.get("PATCHBAY_TEST_MYSQL_HOST", "127.0.0.1"),
    "port": 3306,
    "database": "test",
    "user": "root",
}
T0 = dt.datetime(2026, 11, 1, 8, 0, 0, tzinfo=dt.UTC)


def cfg(**kw: Any) -> SqlSourceConfig:
    return SqlSourceConfig.model_validate({"cursor_column": "updated_at", **kw})


def errors_of(**kw: Any) -> str:
    with pytest.raises(ValidationError) as info:
        cfg(**kw)
    return str(info.value)


# ---------------------------------------------------------------- config, SQL and values (no database)
def test_config_needs_a_table_or_a_query_and_coherent_settings():
    assert "give either `table`" in errors_of()
    assert "give either `table`" in errors_of(table="t", query="SELECT 1")
    assert "`schema: crm` and `table: orders`" in errors_of(table="crm.orders")
    assert "bad table name" in errors_of(table='t"; drop table x; --')
    assert "bad column name" in errors_of(table="t", cursor_column="updated at")
    assert "must include the cursor_column 'updated_at'" in errors_of(table="t", columns=["id", "total"])
    assert "must include the id_column 'id'" in errors_of(table="t", columns=["updated_at", "total"])
    assert "`schema` goes with `table`" in errors_of(query="SELECT * FROM t", schema="s")
    assert "`columns` goes with `table`" in errors_of(query="SELECT * FROM t", columns=["id"])
    assert "must be a SELECT" in errors_of(query="DELETE FROM t")
    assert "one SELECT statement" in errors_of(query="SELECT * FROM t; DROP TABLE t")
    assert "one SELECT statement" in errors_of(table="t", where="1=1; DROP TABLE t")
    assert "needs `initial_cursor`" in errors_of(query="SELECT * FROM t WHERE updated_at >= :cursor")
    assert "needs `initial_cursor`" in errors_of(table="t", where="updated_at >= :cursor - 5")
    assert "batch_size" in errors_of(table="t", batch_size=0)
    assert "cursor_column" in str(
        pytest.raises(ValidationError, SqlSourceConfig.model_validate, {"table": "t"}).value
    )
    ok = cfg(query="-- recent orders\nWITH o AS (SELECT * FROM t) SELECT * FROM o;", initial_cursor=0)
    assert (
        ok.query == "-- recent orders\nWITH o AS (SELECT * FROM t) SELECT * FROM o"
    )  # the final `;` dropped
    assert ok.id_column == "id" and ok.batch_size == 1000 and ok.columns is None


def test_cursor_placeholder_is_bound_only_outside_literals_and_percent_is_escaped():
    sql = "SELECT a::text, ':cursor' AS s, \"x:cursor\" FROM t -- :cursor\nWHERE u >= :cursor AND n LIKE 'a%'"
    pg, used = bind_cursor(sql, "postgres")
    assert used
    assert pg == (
        "SELECT a::text, ':cursor' AS s, \"x:cursor\" FROM t -- :cursor\n"
        "WHERE u >= %(cursor)s AND n LIKE 'a%%'"
    )
    lite, _ = bind_cursor(sql, "sqlite")
    assert lite == sql  # SQLite takes :cursor as it is and `%` needs no escape
    assert bind_cursor("SELECT x::cursor FROM t", "postgres") == ("SELECT x::cursor FROM t", False)
    # MySQL strings may escape quotes with a backslash: the `;` and `:cursor` stay inside the literal.
    assert bind_cursor(r"SELECT 'it\'s; :cursor' FROM t", "mysql") == (
        r"SELECT 'it\'s; :cursor' FROM t",
        False,
    )


def test_page_statements_per_dialect():
    c = cfg(
        table="orders",
        schema="shop",
        columns=["id", "updated_at", "total"],
        batch_size=500,
        where="total > 0",
    )
    pg = SourceQuery(c, "postgres")
    sql, params = pg.page(SourcePosition())
    assert sql == (
        'SELECT "id", "updated_at", "total" FROM "shop"."orders" '
        'WHERE "updated_at" IS NOT NULL AND "id" IS NOT NULL'
        ' AND (total > 0\n) ORDER BY "updated_at", "id" LIMIT 500'
    )
    assert params == {}
    sql, params = pg.page(SourcePosition(T0, 7, after=True))
    assert '("updated_at", "id") > (%(pb_value)s, %(pb_id)s) ORDER BY' in sql
    assert params == {"pb_value": T0, "pb_id": 7}
    my, _ = SourceQuery(c, "mysql").page(SourcePosition(T0, 7, after=True))
    assert my.startswith("SELECT `id`, `updated_at`, `total` FROM `shop`.`orders` WHERE")
    assert "`updated_at` >= %(pb_value)s AND (`updated_at` > %(pb_value)s OR `id` > %(pb_id)s)" in my
    lite, params = SourceQuery(cfg(table="orders", initial_cursor="2026-01-01"), "sqlite").page(
        SourcePosition("x")
    )
    assert lite.endswith('AND "updated_at" >= :pb_value ORDER BY "updated_at", "id" LIMIT 1000')
    assert params == {"pb_value": "x"}
    q = SourceQuery(
        cfg(query="SELECT * FROM t WHERE updated_at >= :cursor -- recent", initial_cursor=0), "postgres"
    )
    sql, params = q.page(SourcePosition(T0, 3, after=True))
    assert sql.startswith(
        "SELECT * FROM (\nSELECT * FROM t WHERE updated_at >= %(cursor)s -- recent\n) AS patchbay_src"
    )
    assert params == {"pb_value": T0, "pb_id": 3, "cursor": T0}
    same, params = SourceQuery(cfg(table="t", cursor_column="id"), "sqlite").page(
        SourcePosition(5, 5, after=True)
    )
    assert same == 'SELECT * FROM "t" WHERE "id" IS NOT NULL AND "id" > :pb_value ORDER BY "id" LIMIT 1000'


def test_values_become_json_and_the_cursor_round_trips_typed():
    row = {
        "id": uuid.UUID(int=1),
        "updated_at": dt.datetime(2026, 11, 1, 8, 0, 0, 123456, tzinfo=dt.UTC),
        "day": dt.date(2026, 11, 1),
        "total": Decimal("12.30"),
        "blob": b"\x00\xff",
        "tags": ["a", {"b": Decimal("1")}],
        "wait": dt.timedelta(minutes=1),
    }
    data = jsonable(row)
    assert data == {
        "id": "00000000-0000-0000-0000-000000000001",
        "updated_at": "2026-11-01T08:00:00.123456+00:00",
        "day": "2026-11-01",
        "total": "12.30",
        "blob": "AP8=",
        "tags": ["a", {"b": "1"}],
        "wait": 60.0,
    }
    q = SourceQuery(cfg(table="t"), "postgres")
    batch, pos = q.batch([row])
    assert batch.records[0].id == "00000000-0000-0000-0000-000000000001@2026-11-01T08:00:00.123456+00:00"
    stored = orjson.loads(orjson.dumps(batch.cursor))  # what the store keeps
    assert stored == {
        "column": "updated_at",
        "value": "2026-11-01T08:00:00.123456+00:00",
        "value_type": "datetime",
        "id": "00000000-0000-0000-0000-000000000001",
        "id_type": "uuid",
    }
    assert q.resume(stored) == pos == SourcePosition(row["updated_at"], row["id"], after=True)
    assert q.resume(None) == SourcePosition()
    assert SourceQuery(cfg(table="t", initial_cursor=10), "mysql").resume(None) == SourcePosition(10)
    with pytest.raises(TerminalError, match="not a position in cursor_column 'updated_at'.*--reset"):
        q.resume({"column": "id", "value": 3, "id": 3})
    with pytest.raises(TerminalError, match="cannot read the saved cursor"):
        q.resume({"column": "updated_at", "value": "yesterday", "value_type": "datetime", "id": 1})


# ---------------------------------------------------------------- one database each
class Db:
    """A scratch table `name` in one database, plain connections to change it, and sources reading it."""

    dialect = ""
    system: dict[str, Any]

    def __init__(self, name: str) -> None:
        self.name = name
        self.sources: list[SqlSource[Any]] = []

    def ts(self, t: dt.datetime) -> Any:
        return t

    def expect_ts(self, t: dt.datetime) -> str:
        return t.isoformat()

    def source(self, resources: Resources | None = None, **kw: Any) -> SqlSource[Any]:
        from patchbay import registry

        found = registry.connector_for(self.dialect, "source")
        assert found is not None
        cls, model = found
        system_model = registry.CONNECTORS[self.dialect].system_config
        assert system_model is not None
        src = cls(
            system_model.model_validate(self.system),
            model.model_validate({"table": self.name, "cursor_column": "updated_at", **kw}),
            resources or Resources(system="db", allow_private=True),
        )
        self.sources.append(src)
        return src

    async def insert(self, rows: Sequence[tuple[int, dt.datetime, str]]) -> None:
        await self.executemany(
            f"INSERT INTO {self.q(self.name)} (id, updated_at, total, note, payload) VALUES ({self.values})",
            [(i, self.ts(t), Decimal(total), f"n{i}%", self.blob(bytes([i % 256]))) for i, t, total in rows],
        )

    values = "%s, %s, %s, %s, %s"

    def blob(self, b: bytes) -> Any:
        return b

    async def touch(self, ids: Sequence[int], t: dt.datetime) -> None:
        for i in ids:
            await self.execute(
                f"UPDATE {self.q(self.name)} SET updated_at = {self.ph(1)}, note = 'changed' "
                f"WHERE id = {self.ph(1)}",
                [self.ts(t), i],
            )

    def q(self, name: str) -> str:
        return f'"{name}"'

    def ph(self, n: int) -> str:
        return ", ".join(["%s"] * n)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def kill(self, src: SqlSource[Any]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        for s in self.sources:
            await s.close()


class PgDb(Db):
    dialect = "postgres"
    system = PG
    ddl = "id int PRIMARY KEY, updated_at timestamptz, total numeric(10,2), note text, payload bytea"

    async def open(self) -> PgDb:
        import psycopg

        self.conn = await psycopg.AsyncConnection.connect(
            host=PG["host"], port=PG["port"], dbname="test", user="postgres", autocommit=True
        )
        await self.conn.execute(f'CREATE TABLE "{self.name}" ({self.ddl})')
        return self

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = await self.conn.execute(sql, list(params) or None)
        return await cur.fetchall() if cur.description else []

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.cursor() as cur:
            await cur.executemany(sql, rows)

    async def kill(self, src: SqlSource[Any]) -> None:
        [conn] = src._pool.idle
        pid = conn.info.backend_pid
        await self.execute("SELECT pg_terminate_backend(%s)", [pid])

        async def gone() -> bool:  # pg_terminate_backend only signals the backend
            return (await self.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]))[0][
                0
            ] == 0

        await eventually(gone, timeout=5, what="the terminated backend gone")

    async def close(self) -> None:
        await super().close()
        await self.conn.execute(f'DROP TABLE IF EXISTS "{self.name}"')
        await self.conn.close()


class MyDb(Db):
    dialect = "mysql"
    system = MY
    ddl = "id INT PRIMARY KEY, updated_at DATETIME(6), total DECIMAL(10,2), note TEXT, payload BLOB"

    def ts(self, t: dt.datetime) -> Any:
        return t.replace(tzinfo=None)  # DATETIME holds no zone: read back as it was written

    def expect_ts(self, t: dt.datetime) -> str:
        return t.replace(tzinfo=None).isoformat()

    def q(self, name: str) -> str:
        return f"`{name}`"

    values = "%s, %s, %s, %s, UNHEX(%s)"

    def blob(self, b: bytes) -> Any:
        return b.hex()  # aiomysql 0.3.2 cannot escape bytes with PyMySQL 1.2 (escape_bytes_prefixed)

    async def open(self) -> MyDb:
        import aiomysql  # type: ignore[import-untyped,unused-ignore]

        self.conn = await aiomysql.connect(
            host=MY["host"], port=MY["port"], user="root", password="", db="test", autocommit=True
        )
        await self.execute(f"CREATE TABLE `{self.name}` ({self.ddl})")
        return self

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cur:
            await cur.execute(sql, list(params) or None)
            return list(await cur.fetchall())

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self.conn.begin()  # UNHEX(%s) keeps aiomysql from batching: one commit, not one per row
        async with self.conn.cursor() as cur:
            await cur.executemany(sql, rows)
        await self.conn.commit()

    async def kill(self, src: SqlSource[Any]) -> None:
        [conn] = src._pool.idle
        thread = conn.thread_id()
        await self.execute(f"KILL {thread}")

        async def gone() -> bool:  # KILL returns before the server has closed the connection
            sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
            return (await self.execute(sql, [thread]))[0][0] == 0

        await eventually(gone, timeout=5, what="the killed connection closed by the server")

    async def close(self) -> None:
        await super().close()
        await self.execute(f"DROP TABLE IF EXISTS `{self.name}`")
        self.conn.close()


class LiteDb(Db):
    dialect = "sqlite"
    ddl = "id INTEGER PRIMARY KEY, updated_at TEXT, total TEXT, note TEXT, payload BLOB"

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path
        self.system = {"path": str(path)}

    def ts(self, t: dt.datetime) -> Any:
        return t.isoformat()  # text, as SQLite tables usually hold timestamps: compared as text

    def ph(self, n: int) -> str:
        return ", ".join(["?"] * n)

    values = "?, ?, ?, ?, ?"

    async def open(self) -> LiteDb:
        with sqlite3.connect(self.path) as c:
            c.execute(f'CREATE TABLE "{self.name}" ({self.ddl})')
        return self

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as c:
            return c.execute(sql, [str(p) if isinstance(p, Decimal) else p for p in params]).fetchall()

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with sqlite3.connect(self.path) as c:
            c.executemany(sql, [tuple(str(v) if isinstance(v, Decimal) else v for v in r) for r in rows])


def _require(dialect: str) -> None:
    if dialect == "postgres":
        require_service("PostgreSQL", PG["host"], PG["port"])
        if not IN_CI:
            pytest.importorskip(
                "psycopg", reason="the postgres extra is not installed: pip install 'patchbay[postgres]'"
            )
    elif dialect == "mysql":
        require_service("MariaDB/MySQL", MY["host"], MY["port"])
        if not IN_CI:
            pytest.importorskip(
                "aiomysql", reason="the mysql extra is not installed: pip install 'patchbay[mysql]'"
            )


@pytest.fixture(params=["postgres", "mysql", "sqlite"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    _require(request.param)
    name = f"pb_{uuid.uuid4().hex[:12]}"
    d: PgDb | MyDb | LiteDb
    if request.param == "postgres":
        d = await PgDb(name).open()
    elif request.param == "mysql":
        d = await MyDb(name).open()
    else:
        d = await LiteDb(name, tmp_path / "shop.db").open()
    yield d
    await d.close()


server_db = pytest.mark.parametrize("db", ["postgres", "mysql"], indirect=True)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


async def read(src: SqlSource[Any], cursor: Any = None) -> list[Batch]:
    """Every batch of one poll, each cursor passed through JSON as the store keeps it."""
    out = []
    async for b in src.poll(cursor):
        out.append(Batch(b.records, orjson.loads(orjson.dumps(b.cursor))))
    return out


def ids(batches: list[Batch]) -> list[int]:
    return [r.data["id"] for b in batches for r in b.records]


async def test_initial_read_in_pages_with_json_values(db: Db):
    await db.insert([(i, at(i), f"{i}.50") for i in range(1, 2501)])
    batches = await read(db.source(batch_size=1000))
    assert [len(b.records) for b in batches] == [1000, 1000, 500]
    assert ids(batches) == list(range(1, 2501))
    assert [b.cursor["id"] for b in batches] == [1000, 2000, 2500]
    assert batches[-1].cursor["value"] == db.expect_ts(at(2500))
    first = batches[0].records[0]
    assert first.id == f"1@{db.expect_ts(at(1))}"
    assert first.data == {
        "id": 1,
        "updated_at": db.expect_ts(at(1)),
        "total": "1.50",  # decimals as exact strings
        "note": "n1%",
        "payload": base64.b64encode(b"\x01").decode(),
    }
    orjson.dumps([r.data for b in batches for r in b.records])  # all JSON-able
    assert await read(db.source(batch_size=1000), batches[-1].cursor) == []  # nothing new: no batch at all


async def test_incremental_read_after_inserts_and_updates(db: Db):
    await db.insert([(i, at(i), "1") for i in range(1, 11)])
    src = db.source(batch_size=4)
    cursor = (await read(src))[-1].cursor
    await db.insert([(11, at(11), "1"), (12, at(12), "1")])
    await db.touch([5], at(20))  # a changed row comes again, as a new event
    batches = await read(src, cursor)
    assert ids(batches) == [11, 12, 5]
    assert [r.id for r in batches[0].records] == [
        f"11@{db.expect_ts(at(11))}",
        f"12@{db.expect_ts(at(12))}",
        f"5@{db.expect_ts(at(20))}",  # not 5@<its first value>: not dropped as a duplicate
    ]
    assert batches[0].records[2].data["note"] == "changed"
    assert await read(src, batches[-1].cursor) == []


async def test_ties_across_page_boundaries_are_not_lost(db: Db):
    # 25 rows changed in the same instant, read 10 at a time: every page boundary falls inside the tie.
    await db.insert([(i, at(0), "1") for i in range(1, 26)] + [(26, at(1), "1")])
    src = db.source(batch_size=10)
    batches = await read(src)
    assert [len(b.records) for b in batches] == [10, 10, 6]
    assert ids(batches) == list(range(1, 27))
    assert batches[0].cursor["value"] == db.expect_ts(at(0)) and batches[0].cursor["id"] == 10
    # More rows with the tied value but a higher id (an insert that lands late in the same instant).
    await db.insert([(30, at(1), "1"), (31, at(1), "1")])
    assert ids(await read(src, batches[-1].cursor)) == [30, 31]
    # Resuming from inside the tie reads the rest of it once.
    assert ids(await read(src, batches[0].cursor)) == [*range(11, 27), 30, 31]


async def test_resume_after_a_crash_loses_and_repeats_nothing(db: Db):
    await db.insert([(i, at(i // 7), "1") for i in range(1, 2501)])
    src = db.source(batch_size=1000)
    gen = src.poll(None)
    first = await anext(gen)
    saved = orjson.loads(orjson.dumps(first.cursor))  # committed with the first batch
    await gen.aclose()  # the hub stops here, before asking for the next page
    del gen
    assert src._pool.idle and not src._pool._sem.locked()  # no connection left checked out
    rest = await read(db.source(batch_size=1000), saved)  # after a restart: a new source, the saved cursor
    got = [r.data["id"] for r in first.records] + ids(rest)
    assert got == list(range(1, 2501))
    assert len({r.id for r in first.records} | {r.id for b in rest for r in b.records}) == 2500


async def test_lookback_reads_a_row_committed_late_once_and_never_moves_the_cursor_back(db: Db):
    # Rows 1 and 2 are read; row 3 then commits with an older cursor value (its transaction stamped
    # updated_at before row 2's committed). Without a lookback the cursor has passed it for good.
    await db.insert([(1, at(10), "1"), (2, at(20), "1")])
    src = db.source(batch_size=10, lookback="30s")
    first = await read(src)
    cursor = first[-1].cursor
    assert ids(first) == [1, 2]
    await db.insert([(3, at(15), "1"), (4, at(-20), "1")])  # row 4: older than the lookback reaches
    late = await read(src, cursor)
    assert ids(late) == [3]  # read once; rows 1 and 2, read again in the window, are dropped
    assert late[-1].cursor == cursor  # the position stays at the newest row read (row 2)
    assert await read(src, cursor) == []  # row 3 is not read again either
    await db.touch([1], at(25))
    assert ids(await read(src, cursor)) == [1]  # a change in the window is a new version: read
    # After a restart (a new source) the window is read again; the store's record ids dedupe it.
    again = await read(db.source(batch_size=10, lookback="30s"), cursor)
    assert sorted(ids(again)) == [1, 2, 3]
    assert "lookback" in errors_of(table="t", lookback="-1s")
    assert SqlSourceConfig.model_validate({"table": "t", "cursor_column": "id", "lookback": 5}).lookback == 5


async def test_query_with_cursor_placeholder_and_where(db: Db):
    await db.insert([(i, at(i), "1") for i in range(1, 9)])
    await db.execute(f"UPDATE {db.q(db.name)} SET note = 'draft%' WHERE id IN (3, 4)")
    query = (
        # Trusted project config, so the test may paste the table name.
        f"SELECT id, updated_at, note AS label FROM {db.q(db.name)} "
        "WHERE updated_at >= :cursor AND note NOT LIKE 'draft%' -- the placeholder lets an index work"
    )
    start = db.ts(at(2))
    src = db.source(
        table=None,
        query=query,
        initial_cursor=start if isinstance(start, str) else start.isoformat(),
        where="id <> 7",
        batch_size=2,
    )
    batches = await read(src)
    assert ids(batches) == [2, 5, 6, 8]
    assert batches[0].records[0].data == {"id": 2, "updated_at": db.expect_ts(at(2)), "label": "n2%"}
    await db.touch([3], at(30))  # `note` becomes 'changed': no longer a draft
    assert ids(await read(src, batches[-1].cursor)) == [3]


async def test_id_as_the_cursor_reads_new_rows_only(db: Db):
    await db.insert([(i, at(0), "1") for i in range(1, 6)])
    src = db.source(cursor_column="id", columns=["id", "note"], batch_size=2)
    batches = await read(src)
    assert ids(batches) == [1, 2, 3, 4, 5]
    assert batches[0].records[0].id == "1" and batches[0].records[0].data == {"id": 1, "note": "n1%"}
    assert batches[-1].cursor == {"column": "id", "value": 5, "id": 5}
    await db.touch([2], at(9))
    await db.insert([(6, at(0), "1")])
    assert ids(await read(src, batches[-1].cursor)) == [6]


async def test_a_missing_table_is_terminal(db: Db):
    src = db.source(table="pb_no_such_table")
    with pytest.raises(TerminalError, match="^polling pb_no_such_table on db: ") as info:
        await read(src)
    assert {"postgres": "[42P01]", "mysql": "[1146]", "sqlite": "no such table"}[db.dialect] in str(
        info.value
    )


@server_db
async def test_killed_connection_between_polls_reconnects(db: Db):
    await db.insert([(i, at(i), "1") for i in range(1, 4)])
    src = db.source()
    cursor = (await read(src))[-1].cursor
    await db.kill(src)
    await db.insert([(4, at(4), "1")])
    assert ids(await read(src, cursor)) == [4]  # the dead connection was replaced: the poll still works
    [conn] = src._pool.idle
    assert src._healthy(conn)


@server_db
async def test_a_connection_killed_mid_poll_fails_the_poll_and_the_next_one_resumes(db: Db):
    await db.insert([(i, at(i), "1") for i in range(1, 7)])
    src = db.source(batch_size=2)
    gen = src.poll(None)
    first = await anext(gen)
    await db.kill(src)  # between two pages of one poll: the retry on a fresh connection covers it too
    rest = [b async for b in gen]
    assert ids([first, *rest]) == [1, 2, 3, 4, 5, 6]


@server_db
async def test_a_slow_page_times_out_as_transient_and_the_next_poll_recovers(db: Db):
    await db.insert([(1, at(1), "1"), (2, at(2), "1")])
    await db.execute(f"UPDATE {db.q(db.name)} SET note = 'slow' WHERE id = 2")
    sleep = "pg_sleep(2)::text" if db.dialect == "postgres" else "SLEEP(2)"
    query = f"SELECT t.*, CASE WHEN note = 'slow' THEN {sleep} END AS z FROM {db.q(db.name)} t"
    src = db.source(table=None, query=query, timeout_s=0.3)
    with pytest.raises(TransientError, match=r"^polling the query on db: timed out after 0\.3s$"):
        await read(src)
    assert src._pool.idle == [] and not src._pool._sem.locked()  # mid-statement: not reused
    await db.execute(f"UPDATE {db.q(db.name)} SET note = 'fast' WHERE id = 2")
    assert ids(await read(src)) == [1, 2]


@server_db
async def test_refused_connection_is_transient(db: Db):
    db.system = {**db.system, "port": closed_port()}
    with pytest.raises(TransientError, match="^polling .* on db: "):
        await read(db.source())


@server_db
async def test_refused_credentials_are_an_auth_error(db: Db):
    if db.dialect == "postgres":
        db.system = {**db.system, "user": "pb_no_such_role"}
        expected = 'role "pb_no_such_role" does not exist'
    else:
        db.system = {**db.system, "password": {"env": "PB_TEST_MYSQL_PASSWORD"}}
        expected = r"\[1045\] Access denied"
    secret = "wrong-pass-123"
    src = db.source(
        Resources(
            system="db",
            secret=lambda ref: secret,
            redact=lambda s: s.replace(secret, "***"),
            allow_private=True,
        )
    )
    with pytest.raises(AuthError, match=expected) as info:
        await read(src)
    assert "paused" not in str(info.value)  # a source is not paused: the next poll tries again
    assert secret not in str(info.value)


async def test_sqlite_missing_file_is_transient_and_the_source_never_creates_it(tmp_path: Path):
    later = LiteDb("orders", tmp_path / "later.db")
    try:
        with pytest.raises(TransientError, match="unable to open database file"):
            await read(later.source())
        assert not later.path.exists()  # opened read-only: never created
        await later.open()
        await later.insert([(1, at(1), "1")])
        assert ids(await read(later.sources[0])) == [1]
    finally:
        await later.close()


@server_db
async def test_the_source_session_is_read_only(db: Db):
    await db.insert([(1, at(1), "1")])
    src = db.source()
    await read(src)
    [conn] = src._pool.idle
    with pytest.raises(Exception, match="read-only|READ ONLY"):
        await src._fetch(conn, f"DELETE FROM {db.q(db.name)}", {})
    assert await db.execute(f"SELECT COUNT(*) FROM {db.q(db.name)}") == [(1,)]


# ---------------------------------------------------------------- the hub: postgres end to end
def orders_project(root: Path, sink_url: str, source: dict[str, Any], *, schedule: bool = True) -> Path:
    systems = {
        "db": {"kind": "postgres", "owner": "data", "allow_private_network": True, **PG},
        "reporting": {"kind": "http", "owner": "finance", "url": sink_url, "allow_private_network": True},
    }
    trigger: dict[str, Any] = {"source": {"system": "db", **source}}
    if schedule:
        trigger = {"schedule": {"every": "1s"}, **trigger}
    flow = {
        "purpose": "changed orders reach reporting",
        "owner": "finance",
        "trigger": trigger,
        "record_key": "id",
        "steps": [{"map": {"order_id": "id", "amount": "total", "changed_at": "updated_at"}}],
        "destinations": [{"name": "report", "system": "reporting", "path": "/orders"}],
    }
    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            "flows/orders.yaml": yaml.safe_dump(flow, sort_keys=False),
        },
    )


@pytest.mark.parametrize("db", ["postgres"], indirect=True)
async def test_postgres_table_to_http_end_to_end(tmp_path, db: Db, sink, start_hub, monkeypatch):
    await db.insert([(i, at(i // 2), f"{i}.00") for i in range(1, 6)])  # ties in updated_at
    root = orders_project(
        tmp_path, sink.url, {"table": db.name, "cursor_column": "updated_at", "batch_size": 2}
    )
    hub = await start_hub(root)
    await sink.wait_for(5)
    await db.touch([2], at(60))  # an update is a new event
    await db.insert([(6, at(61), "6.00")])
    await sink.wait_for(7)
    await polls_more(hub, 2)  # polls that find nothing new
    bodies = [r.body for r in sink.received]
    assert sorted(b["order_id"] for b in bodies) == [1, 2, 2, 3, 4, 5, 6]
    assert [b["changed_at"] for b in bodies if b["order_id"] == 2] == [at(1).isoformat(), at(60).isoformat()]
    assert bodies[0]["amount"] == "1.00"

    async def polled_again() -> bool:
        row = await hub.store.read(lambda c: c.execute("SELECT runs, last_status FROM schedules").fetchone())
        return bool(row[0] >= 3 and row[1] == "ok")

    await eventually(polled_again, what="several successful polls")
    monkeypatch.setenv("PATCHBAY_PROJECT", str(root))
    res = CliRunner().invoke(main, ["state", "orders"])
    assert res.exit_code == 0, res.output
    assert '"column": "updated_at"' in res.output and f'"value": "{at(61).isoformat()}"' in res.output
    assert '"id": 6' in res.output and "every 1s" in res.output


def _check(root: Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["check", str(root)])
    return res.exit_code, res.output


def test_check_accepts_a_sql_source_and_requires_a_schedule(tmp_path):
    source = {"table": "orders", "cursor_column": "updated_at"}
    root = orders_project(tmp_path, "http://127.0.0.1:9", source)
    code, out = _check(root)
    assert code == 0, out
    assert "ok: 2 systems, 1 flow\n" in out
    orders_project(tmp_path, "http://127.0.0.1:9", source, schedule=False)
    lines = (root / "flows" / "orders.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(lines, 1) if t.strip() == "source:")
    code, out = _check(root)
    assert code != 0
    assert f"orders.yaml:{line}: a postgres source is polled: add `schedule: {{every: 5m}}`" in out, out


def test_check_locates_bad_source_settings(tmp_path):
    root = orders_project(
        tmp_path, "http://127.0.0.1:9", {"table": "orders", "cursor_column": "updated_at", "batch_sise": 10}
    )
    code, out = _check(root)
    lines = (root / "flows" / "orders.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(lines, 1) if "batch_sise" in t)
    assert (
        code != 0 and f"orders.yaml:{line}: unknown setting 'batch_sise'; did you mean 'batch_size'?" in out
    ), out
    root = orders_project(
        tmp_path,
        "http://127.0.0.1:9",
        {"query": "SELECT * FROM orders WHERE updated_at >= :cursor", "cursor_column": "updated_at"},
    )
    code, out = _check(root)
    assert code != 0 and "`:cursor` needs `initial_cursor`" in out, out
