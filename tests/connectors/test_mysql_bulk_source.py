"""Batch syncs reading MariaDB in bulk on the local servers: one snapshot streamed out, into PostgreSQL
and SQLite; full, merge with updates, lookback boundary, soft and key deletes, drift, a query source."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, require_service
from tests.connectors.bulk_harness import bulk, database, fetch

if not IN_CI:
    pytest.importorskip("aiomysql", reason="the mysql extra is not installed: pip install 'patchbay[mysql]'")
import aiomysql

from patchbay.config.batch import BatchFrom, BatchSpec
from patchbay.connectors.base import Resources
from patchbay.connectors.bulk_client import BulkSystem, Window
from patchbay.connectors.mysql import MysqlSystem
from patchbay.connectors.mysql_bulk import MysqlBulk
from patchbay.connectors.sqlite import SqliteSystem
from patchbay.connectors.sqlite_bulk import SqliteBulk
from patchbay.engine.batch import BatchRun, RunReport

MY = {"host": "127.0.0.1", "port": 3306, "database": "test", "user": "root"}


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
                await cur.execute(f"DROP TABLE IF EXISTS `{t}`")
    finally:
        conn.close()


@pytest.fixture
async def pg() -> Any:
    async with database() as conn:
        yield conn


async def run(my: Any, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    async with my.cursor() as cur:
        await cur.execute(sql, args)
        return list(await cur.fetchall())


def mysql() -> MysqlBulk:
    return MysqlBulk(MysqlSystem.model_validate(MY), Resources(allow_private=True, system="my"))


async def customers(my: Any, n: int) -> str:
    t = f"src_{uuid.uuid4().hex[:10]}"
    my.made.append(t)
    await run(
        my,
        f"CREATE TABLE `{t}` (id BIGINT PRIMARY KEY, email VARCHAR(200), active TINYINT(1), note TEXT,"
        " price DECIMAL(10,2), born DATE, updated_at DATETIME(6) NOT NULL, deleted_at DATETIME(6) NULL,"
        " raw VARBINARY(16))",
    )
    await run(
        my,
        f"INSERT INTO `{t}` (id, email, active, note, price, born, updated_at, raw) SELECT seq, CONCAT('u', seq,"
        " '@x.io'), seq % 2, 'tab\there, line\nbreak, back\\\\slash', seq / 4, '1990-05-17',"
        " TIMESTAMP('2024-01-01 00:00:00') + INTERVAL seq SECOND, UNHEX('00ff')"
        f" FROM seq_1_to_{n}",
    )
    return t


def flow() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


async def sync(src: BulkSystem, dst: BulkSystem, name: str, spec: dict[str, Any], **kw: Any) -> RunReport:
    try:
        return await BatchRun(name, [], BatchSpec.model_validate(spec), src, dst, **kw).run()
    finally:
        await src.close()
        await dst.close()


def pg_name(pg: Any) -> str:
    t = f"dst_{uuid.uuid4().hex[:10]}"
    pg.made.append(t)
    return t


async def test_mariadb_to_postgres_full_then_merge_keeps_values_and_reads_the_window(my, pg):
    src = await customers(my, 3000)
    dst = pg_name(pg)
    name = flow()
    spec = {
        "from": {"system": "my", "table": src},
        "to": {"system": "db", "table": dst},
        "mode": "merge",
        "key": ["id"],
        "cursor": {"column": "updated_at"},
        "batch_rows": 500,
    }
    first = await sync(mysql(), bulk(), name, spec)
    assert (first.status, first.read, first.inserted) == ("ok", 3000, 3000), first.error
    assert first.cursor_to == "2024-01-01 00:50:00.000000"
    (row,) = await fetch(
        pg,
        f'SELECT id, email, active, note, price::text, born::text, updated_at::text, raw FROM "{dst}" WHERE id = 3',
    )
    assert row == (
        3,
        "u3@x.io",
        True,
        "tab\there, line\nbreak, back\\slash",
        "0.75",
        "1990-05-17",
        "2024-01-01 00:00:03",
        b"\x00\xff",
    )
    await run(my, f"UPDATE `{src}` SET email = 'new@x.io', updated_at = '2024-02-01' WHERE id <= 10")
    second = await sync(mysql(), bulk(), name, spec)
    # The 10 changed rows and the boundary row (equal to the last mark): read again, left as they were.
    assert (second.status, second.read, second.updated, second.unchanged, second.inserted) == (
        "ok",
        11,
        10,
        1,
        0,
    ), second.error
    assert await fetch(pg, f"SELECT count(*) FROM \"{dst}\" WHERE email = 'new@x.io'") == [(10,)]


async def test_lookback_catches_a_row_committed_late_with_an_older_timestamp(my, pg):
    src = await customers(my, 100)
    dst = pg_name(pg)
    name = flow()
    spec = {
        "from": {"system": "my", "table": src},
        "to": {"system": "db", "table": dst},
        "mode": "merge",
        "key": ["id"],
        "cursor": {"column": "updated_at", "lookback": "30s"},
    }
    assert (await sync(mysql(), bulk(), name, spec)).inserted == 100
    # Committed after the run, stamped 20 s before the mark: only the lookback window finds it.
    await run(
        my,
        f"INSERT INTO `{src}` (id, email, active, updated_at) VALUES (1000, 'late@x.io', 1,"
        " TIMESTAMP('2024-01-01 00:01:40') - INTERVAL 20 SECOND)",
    )
    again = await sync(mysql(), bulk(), name, spec)
    assert (again.status, again.inserted, again.read) == ("ok", 1, 32), (
        again.error
    )  # 31 in the window + the late one
    assert await fetch(pg, f'SELECT email FROM "{dst}" WHERE id = 1000') == [("late@x.io",)]


async def test_key_and_soft_deletes_reach_the_destination(my, pg):
    src = await customers(my, 200)
    dst = pg_name(pg)
    keys = {
        "from": {"system": "my", "table": src},
        "to": {"system": "db", "table": dst},
        "mode": "merge",
        "key": ["id"],
        "deletes": {"detect": "keys"},
    }
    name = flow()
    assert (await sync(mysql(), bulk(), name, keys)).inserted == 200
    await run(my, f"DELETE FROM `{src}` WHERE id IN (5, 77, 150)")
    report = await sync(mysql(), bulk(), name, keys)
    assert (report.status, report.deleted) == ("ok", 3), report.error
    assert await fetch(pg, f'SELECT count(*) FROM "{dst}" WHERE id IN (5, 77, 150)') == [(0,)]
    # The hashed key ranges agree with PostgreSQL's: an unchanged source deletes nothing.
    assert (await sync(mysql(), bulk(), name, keys)).deleted == 0

    soft = {**keys, "deletes": {"detect": "soft", "column": "deleted_at"}}
    await run(my, f"UPDATE `{src}` SET deleted_at = '2024-03-01' WHERE id = 9")
    report = await sync(mysql(), bulk(), flow(), {**soft, "to": {"system": "db", "table": dst}})
    assert (report.status, report.deleted) == ("ok", 1), report.error
    assert await fetch(pg, f'SELECT count(*) FROM "{dst}" WHERE id = 9') == [(0,)]


async def test_bucket_summaries_match_postgres_for_the_same_keys(my, pg):
    src = await customers(my, 500)
    dst = pg_name(pg)
    spec = {"from": {"system": "my", "table": src}, "to": {"system": "db", "table": dst}, "mode": "full"}
    assert (await sync(mysql(), bulk(), flow(), spec)).status == "ok"
    a, b = mysql(), bulk()
    try:
        mine = await a.key_buckets(BatchFrom(system="my", table=src), ["id", "email"])
        theirs = await b.key_buckets(BatchFrom(system="db", table=dst), ["id", "email"])
    finally:
        await a.close()
        await b.close()
    assert mine == theirs and sum(n for n, _ in mine.values()) == 500


async def test_drift_stops_then_evolve_adds_the_column(my, pg):
    src = await customers(my, 20)
    dst = pg_name(pg)
    name = flow()
    spec = {
        "from": {"system": "my", "table": src},
        "to": {"system": "db", "table": dst},
        "mode": "merge",
        "key": ["id"],
    }
    assert (await sync(mysql(), bulk(), name, spec)).status == "ok"
    await run(my, f"ALTER TABLE `{src}` ADD COLUMN tier VARCHAR(10) DEFAULT 'pro'")
    stopped = await sync(mysql(), bulk(), name, spec)
    assert stopped.status == "stopped" and "new column tier (text)" in (stopped.error or "")
    evolved = await sync(mysql(), bulk(), name, {**spec, "on_drift": "evolve"})
    assert (evolved.status, evolved.updated) == ("ok", 20), evolved.error
    assert await fetch(pg, f'SELECT DISTINCT tier FROM "{dst}"') == [("pro",)]


async def test_a_query_source_into_sqlite_and_bounded_batches(my, tmp_path: Path):
    src = await customers(my, 1200)
    db = tmp_path / "report.db"
    sqlite3.connect(db).close()
    lite = SqliteBulk(
        SqliteSystem.model_validate({"path": str(db)}), Resources(allow_private=True, system="lite")
    )
    spec = {
        "from": {"system": "my", "query": f"SELECT id, email, price FROM `{src}` WHERE active = 1"},
        "to": {"system": "lite", "table": "active"},
        "mode": "full",
        "batch_rows": 100,
    }
    seen: list[int] = []
    report = await sync(mysql(), lite, flow(), spec, progress=lambda p: seen.append(p.read))
    assert (report.status, report.inserted) == ("ok", 600), report.error
    assert seen == list(range(100, 601, 100))  # one frame of batch_rows at a time
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT email, price FROM active WHERE id = 3").fetchone() == ("u3@x.io", 0.75)


async def test_reading_stopped_half_way_drops_the_stream_and_the_next_read_works(my):
    src = await customers(my, 1000)
    a = mysql()
    try:
        cols = await a.columns(BatchFrom(system="my", table=src))
        reader = a.read(BatchFrom(system="my", table=src), cols, Window(), 100)
        async for _ in reader:
            break
        await reader.aclose()
        frames = [f async for f in a.read(BatchFrom(system="my", table=src), cols, Window(), 400)]
        assert [len(f) for f in frames] == [400, 400, 200]
    finally:
        await a.close()


async def test_a_mariadb_json_column_arrives_as_json(my, pg):
    t = f"src_{uuid.uuid4().hex[:10]}"
    my.made.append(t)
    await run(my, f"CREATE TABLE `{t}` (id INT PRIMARY KEY, attrs JSON, label LONGTEXT)")
    await run(my, f"""INSERT INTO `{t}` VALUES (1, '{{"tier": "pro", "n": [1, 2]}}', 'x'), (2, NULL, NULL)""")
    dst = pg_name(pg)
    a = mysql()
    try:
        cols = await a.columns(BatchFrom(system="my", table=t))
    finally:
        await a.close()
    assert [(c.name, c.type) for c in cols] == [("id", "int"), ("attrs", "json"), ("label", "text")]
    spec = {"from": {"system": "my", "table": t}, "to": {"system": "db", "table": dst}, "mode": "full"}
    report = await sync(mysql(), bulk(), flow(), spec)
    assert report.status == "ok", report.error
    assert await fetch(pg, f"""SELECT attrs->>'tier', jsonb_typeof(attrs) FROM "{dst}" ORDER BY id""") == [
        ("pro", "object"),
        (None, None),
    ]


async def test_append_and_a_dropped_or_retyped_column(my, pg):
    src = await customers(my, 50)
    dst = pg_name(pg)
    name = flow()
    spec = {
        "from": {"system": "my", "table": src},
        "to": {"system": "db", "table": dst},
        "mode": "append",
        "key": ["id"],
        "cursor": {"column": "id"},
    }
    assert (await sync(mysql(), bulk(), name, spec)).inserted == 50
    await run(my, f"INSERT INTO `{src}` (id, email, updated_at) VALUES (51, 'n@x.io', NOW())")
    again = await sync(mysql(), bulk(), name, spec)
    # The boundary row (id 50, equal to the mark) is read again and skipped; the new one is appended.
    assert (again.status, again.read, again.inserted, again.unchanged) == ("ok", 2, 1, 1), again.error

    await run(my, f"ALTER TABLE `{src}` DROP COLUMN note")
    stopped = await sync(mysql(), bulk(), name, spec)
    assert stopped.status == "stopped" and "column note dropped" in (stopped.error or "")
    await run(my, f"ALTER TABLE `{src}` MODIFY price VARCHAR(20)")
    ignored = await sync(mysql(), bulk(), name, {**spec, "on_drift": "ignore"})
    assert ignored.status == "ok", ignored.error
    assert "column price changed type numeric -> text" in ignored.schema_changes
    # Under ignore, the dropped column is left as it was at the destination, never NULLed.
    assert await fetch(pg, f'SELECT count(*) FROM "{dst}" WHERE note IS NULL AND id <= 50') == [(0,)]


RUNNER = """
import asyncio, sys
from pathlib import Path
from patchbay.config.project import load_or_raise
from patchbay.engine.batch import run_flow
from patchbay.engine.hub import open_resolver_for

root = Path(sys.argv[1])
project = load_or_raise(root)
def progress(p):
    print(f"read {p.read}", flush=True)
report = asyncio.run(run_flow(project, open_resolver_for(root), project.flows["f"], progress=progress))
print(f"done {report.status} {report.inserted} {report.error}", flush=True)
"""


@pytest.mark.slow
async def test_kill_9_mid_run_into_mariadb_leaves_nothing_and_the_rerun_writes_each_row_once(my, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import write_project

    dst = f"dst_{uuid.uuid4().hex[:10]}"
    my.made.append(dst)
    name = f"test-{uuid.uuid4().hex[:8]}"
    write_project(
        tmp_path,
        {
            "systems.yaml": "shop: {kind: sqlite, owner: ops, path: shop.db}\n"
            "mart: {kind: mysql, owner: data, host: 127.0.0.1, port: 3306, database: test, user: root,"
            " allow_private_network: true}\n",
            f"flows/{name}.yaml": "purpose: Into the mart.\nowner: data\ntrigger: {manual: true}\nbatch:\n"
            f"  from: {{system: shop, table: orders}}\n  to: {{system: mart, table: {dst}}}\n  mode: merge\n"
            "  key: [id]\n  cursor: {column: id}\n  batch_rows: 1000\n",
        },
    )
    runner = RUNNER.replace('project.flows["f"]', f'project.flows["{name}"]')
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, total REAL)")
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, ?)", [(i, f"u{i}@x.io", i * 1.5) for i in range(1, 100_001)]
        )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", runner, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("read ") and int(line.split()[1]) >= 20000:
            break
    else:
        pytest.fail(f"the run ended before it could be killed (exit {proc.wait()})")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    # The server rolls the dead client's transaction back (the table itself was created before it: DDL).
    for _ in range(50):
        if await run(my, f"SHOW TABLES LIKE '{dst}'") and await run(my, f"SELECT COUNT(*) FROM `{dst}`") == [
            (0,)
        ]:
            break
        await asyncio.sleep(0.1)
    assert await run(my, f"SELECT COUNT(*) FROM `{dst}`") == [(0,)]
    assert await run(my, "SELECT COUNT(*) FROM _patchbay_sync_state WHERE flow = %s", (name,)) == [(0,)]
    done = subprocess.run(
        [sys.executable, "-c", runner, str(tmp_path)], capture_output=True, text=True, env=env, timeout=180
    )
    assert "done ok 100000 None" in done.stdout, done.stdout + done.stderr
    assert await run(my, f"SELECT COUNT(*), COUNT(DISTINCT id), SUM(id) FROM `{dst}`") == [
        (100_000, 100_000, 100_000 * 100_001 // 2)
    ]
    await run(my, "DELETE FROM _patchbay_sync_state WHERE flow = %s", (name,))
