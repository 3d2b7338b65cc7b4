"""Batch syncs from and to SQLite files: one transaction per run, values kept, merge by key, PG -> SQLite."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from patchbay.config.batch import BatchSpec
from patchbay.connectors.base import Resources
from patchbay.connectors.sqlite import SqliteSystem
from patchbay.connectors.sqlite_bulk import SqliteBulk
from patchbay.engine.batch import BatchRun, RunReport
from tests.connectors.bulk_harness import bulk, database, name, steps


def lite(path: Path) -> SqliteBulk:
    return SqliteBulk(SqliteSystem(path=str(path)), Resources(system="lite"))


async def run(
    source: Any, dest: Any, spec: dict[str, Any], step_list: Any = (), flow: str = "orders"
) -> RunReport:
    try:
        return await BatchRun(flow, list(step_list), BatchSpec.model_validate(spec), source, dest).run()
    finally:
        await source.close()
        await dest.close()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "shop.db", tmp_path / "report.db"
    with sqlite3.connect(src) as c:
        c.execute(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, total REAL, paid BOOLEAN,"
            " updated_at TIMESTAMP, items JSON, raw BLOB)"
        )
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    i,
                    f"A{i}@Shop.io",
                    i * 1.5,
                    i % 2,
                    f"2024-01-01 00:00:{i:02d}",
                    f'{{"n": {i}}}',
                    b"\x00\t\n",
                )
                for i in range(1, 51)
            ],
        )
    sqlite3.connect(dst).close()
    return src, dst


SPEC = {
    "from": {"system": "shop", "table": "orders"},
    "to": {"system": "report", "table": "orders"},
    "mode": "merge",
    "key": ["id"],
    "cursor": {"column": "updated_at"},
}


async def test_sqlite_to_sqlite_merge_keeps_values_and_reads_only_the_window(files):
    src, dst = files
    first = await run(lite(src), lite(dst), SPEC)
    assert (first.status, first.inserted) == ("ok", 50), first.error
    with sqlite3.connect(dst) as c:
        assert c.execute("SELECT email, total, paid, items, raw FROM orders WHERE id = 3").fetchone() == (
            "A3@Shop.io",
            4.5,
            1,
            '{"n": 3}',
            b"\x00\t\n",
        )
    with sqlite3.connect(src) as c:
        c.execute("UPDATE orders SET total = 0, updated_at = '2024-02-01 00:00:00' WHERE id <= 5")
    second = await run(lite(src), lite(dst), SPEC)
    # The 5 changed rows and the boundary row (cursor equal to the mark: equal timestamps are read again).
    assert (second.status, second.read, second.updated, second.inserted, second.unchanged) == (
        "ok",
        6,
        5,
        0,
        1,
    )
    with sqlite3.connect(dst) as c:
        assert c.execute("SELECT count(*) FROM orders WHERE total = 0").fetchone() == (5,)
        assert c.execute("SELECT runs FROM _patchbay_sync_state WHERE flow = 'orders'").fetchone() == (2,)


async def test_a_failing_run_leaves_the_destination_and_cursor_as_they_were(files):
    src, dst = files
    assert (await run(lite(src), lite(dst), SPEC)).status == "ok"
    with sqlite3.connect(src) as c:
        c.execute("UPDATE orders SET email = NULL, updated_at = '2024-03-01' WHERE id = 9")
        c.execute("UPDATE orders SET total = -1, updated_at = '2024-03-01' WHERE id = 10")
    with sqlite3.connect(dst) as c:  # a constraint the new data breaks: the whole run rolls back
        c.execute(
            "CREATE TRIGGER no_negative BEFORE UPDATE ON orders WHEN NEW.total < 0 BEGIN SELECT RAISE(ABORT, 'negative total'); END"
        )
        c.execute(
            "CREATE TRIGGER no_negative_ins BEFORE INSERT ON orders WHEN NEW.total < 0 BEGIN SELECT RAISE(ABORT, 'negative total'); END"
        )
    failed = await run(lite(src), lite(dst), SPEC)
    assert failed.status == "failed" and "negative total" in (failed.error or "")
    with sqlite3.connect(dst) as c:
        assert c.execute("SELECT email FROM orders WHERE id = 9").fetchone() == ("A9@Shop.io",)
        assert c.execute('SELECT "cursor" FROM _patchbay_sync_state').fetchone() == ("2024-01-01 00:00:50",)


async def test_postgres_to_sqlite_with_steps(tmp_path):
    dst = tmp_path / "report.db"
    sqlite3.connect(dst).close()
    async with database() as pg:
        t = name(pg, "src")
        await pg.execute(
            f'CREATE TABLE "{t}" (id bigint PRIMARY KEY, email text, at timestamptz, attrs jsonb)'
        )
        await pg.execute(
            f"""INSERT INTO "{t}" SELECT g, ' U' || g || '@X.io', timestamptz '2024-01-01 00:00:00+00'
            + g * interval '1 hour', jsonb_build_object('tier', 'pro') FROM generate_series(1, 20) g"""
        )
        report = await run(
            bulk(),
            lite(dst),
            {
                "from": {"system": "pg", "table": t},
                "to": {"system": "lite", "table": "contacts"},
                "mode": "full",
            },
            steps({"map": {"id": "id", "email": "lower(trim(email))", "at": "at", "tier": "attrs.tier"}}),
            flow=f"test-{uuid.uuid4().hex[:8]}",
        )
    assert (report.status, report.inserted) == ("ok", 20), report.error
    with sqlite3.connect(dst) as c:
        assert c.execute("SELECT id, email, at, tier FROM contacts WHERE id = 2").fetchone() == (
            2,
            "u2@x.io",
            "2024-01-01 02:00:00+00",
            "pro",
        )
