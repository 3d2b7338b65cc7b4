"""Batch syncs PostgreSQL -> MariaDB on the local servers: LOAD DATA LOCAL in one transaction, types kept."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import IN_CI, require_service
from tests.connectors.bulk_harness import bulk, database, name

if not IN_CI:
    pytest.importorskip("aiomysql", reason="the mysql extra is not installed: pip install 'patchbay[mysql]'")
import aiomysql

from patchbay.config.batch import BatchSpec
from patchbay.connectors.base import Resources
from patchbay.connectors.mysql import MysqlSystem
from patchbay.connectors.mysql_bulk import MysqlBulk
from patchbay.engine.batch import BatchRun, RunReport

MY = {"host": "127.0.0.1", "port": 3306, "database": "test", "user": "root"}


@pytest.fixture
async def pg() -> Any:
    async with database() as conn:
        yield conn


@pytest.fixture
async def my() -> Any:
    require_service("MariaDB", "127.0.0.1", 3306)
    conn = await aiomysql.connect(host="127.0.0.1", port=3306, user="root", db="test", autocommit=True)
    made: list[str] = []
    conn.made = made
    yield conn
    try:
        async with conn.cursor() as cur:
            for t in made:
                if await cur.execute(f"SHOW TABLES LIKE '{t}'"):
                    await cur.execute(f"DROP TABLE `{t}`")
            if await cur.execute("SHOW TABLES LIKE '_patchbay_sync_state'"):
                await cur.execute("DELETE FROM _patchbay_sync_state WHERE flow LIKE 'test-%'")
    finally:
        conn.close()


async def my_rows(my: Any, sql: str) -> list[tuple[Any, ...]]:
    async with my.cursor() as cur:
        await cur.execute(sql)
        return list(await cur.fetchall())


async def to_mariadb(flow: str, spec: dict[str, Any]) -> RunReport:
    src = bulk()
    dst = MysqlBulk(MysqlSystem.model_validate(MY), Resources(allow_private=True, system="my"))
    try:
        return await BatchRun(flow, [], BatchSpec.model_validate(spec), src, dst).run()
    finally:
        await src.close()
        await dst.close()


async def source_table(pg: Any, n: int) -> str:
    t = name(pg, "src")
    await pg.execute(
        f'CREATE TABLE "{t}" (id bigint PRIMARY KEY, email text, active boolean, note text,'
        " updated_at timestamptz NOT NULL, attrs jsonb)"
    )
    await pg.execute(
        f"""INSERT INTO "{t}" SELECT g, 'u' || g || '@x.io', g % 2 = 0, E'tab\\there, line\\nbreak, back\\\\slash',
        timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', jsonb_build_object('score', g)
        FROM generate_series(1, {n}) g"""
    )
    return t


async def test_full_and_merge_into_mariadb_keep_values_exactly(pg, my):
    src = await source_table(pg, 2000)
    dst = f"dst_{uuid.uuid4().hex[:10]}"
    my.made.append(dst)
    flow = f"test-{uuid.uuid4().hex[:8]}"
    spec = {
        "from": {"system": "pg", "table": src},
        "to": {"system": "my", "table": dst},
        "mode": "merge",
        "key": ["id"],
        "cursor": {"column": "updated_at"},
        "batch_rows": 500,
    }
    first = await to_mariadb(flow, spec)
    assert (first.status, first.inserted) == ("ok", 2000), first.error
    got = await my_rows(
        my,
        f"SELECT id, email, active, note, updated_at, JSON_VALUE(attrs, '$.score') FROM `{dst}` WHERE id = 2",
    )
    (row,) = got
    assert row[:4] == (2, "u2@x.io", 1, "tab\there, line\nbreak, back\\slash")
    assert str(row[4]) == "2024-01-01 00:00:02"
    assert row[5] == "2"
    await pg.execute(f"UPDATE \"{src}\" SET email = 'new@x.io', updated_at = now() WHERE id <= 10")
    second = await to_mariadb(flow, spec)
    # The 10 changed rows, and the boundary row (cursor equal to the last mark), read again and left as is.
    assert (second.status, second.read, second.inserted, second.updated, second.unchanged) == (
        "ok",
        11,
        0,
        10,
        1,
    )
    assert await my_rows(my, f"SELECT COUNT(*) FROM `{dst}` WHERE email = 'new@x.io'") == [(10,)]
    assert await my_rows(my, f"SELECT COUNT(*) FROM `{dst}`") == [(2000,)]


async def test_a_value_the_server_would_truncate_fails_the_run_and_writes_nothing(pg, my):
    src = await source_table(pg, 10)
    await pg.execute(f"UPDATE \"{src}\" SET email = repeat('x', 300) WHERE id = 5")
    dst = f"dst_{uuid.uuid4().hex[:10]}"
    my.made.append(dst)
    async with my.cursor() as cur:
        await cur.execute(
            f"CREATE TABLE `{dst}` (id BIGINT PRIMARY KEY, email VARCHAR(20), active BOOLEAN, note TEXT,"
            " updated_at DATETIME(6), attrs JSON)"
        )
    report = await to_mariadb(
        f"test-{uuid.uuid4().hex[:8]}",
        {"from": {"system": "pg", "table": src}, "to": {"system": "my", "table": dst}, "mode": "full"},
    )
    assert report.status == "failed"
    assert "changed or refused values" in (report.error or "")
    assert await my_rows(my, f"SELECT COUNT(*) FROM `{dst}`") == [(0,)]
