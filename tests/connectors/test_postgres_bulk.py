"""Batch syncs on the local PostgreSQL: full, append, merge, cursors with lookback, drift, soft and hard deletes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.connectors.bulk_harness import database, fetch, name, steps, sync


@pytest.fixture
async def pg() -> Any:
    async with database() as conn:
        yield conn


CUSTOMERS = """CREATE TABLE "{t}" (id bigint PRIMARY KEY, email text, first_name text, country char(2),
 updated_at timestamptz NOT NULL, attrs jsonb)"""


async def customers(pg: Any, n: int, start: int = 1) -> str:
    t = name(pg, "src")
    await pg.execute(CUSTOMERS.format(t=t))
    await insert(pg, t, range(start, start + n))
    return t


async def insert(pg: Any, t: str, ids: Any, ts: str = "2024-01-01") -> None:
    await pg.execute(
        f"""INSERT INTO "{t}" SELECT g, '  User' || g || '@Example.com ', 'Ana' || g, 'DE',
        timestamptz '{ts}' + g * interval '1 second', jsonb_build_object('tier', 'pro', 'score', g)
        FROM unnest(%s::bigint[]) g""",
        (list(ids),),
    )


def merge_spec(src: str, dst: str, **more: Any) -> dict[str, Any]:
    """A merge by id from table `src` to table `dst` of the test database."""
    return {
        "from": {"system": "db", "table": src},
        "to": {"system": "db", "table": dst},
        "mode": "merge",
        "key": ["id"],
        **more,
    }


def flow() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


LEAD_STEPS = (
    {"map": {"id": "id", "email": "lower(trim(email))", "first_name": "first_name", "tier": "attrs.tier"}},
    {"validate": {"email": {"required": True, "format": "email"}}},
)


async def test_full_refresh_maps_validates_and_quarantines_invalid_rows(pg):
    src = await customers(pg, 500)
    await pg.execute(f"UPDATE \"{src}\" SET email = 'not an email' WHERE id IN (7, 8)")
    dst = name(pg, "dst")
    report = await sync(
        flow(),
        merge_spec(src, dst, mode="full", key=[]),
        steps(*LEAD_STEPS),
    )
    assert report.status == "ok", report.error
    assert (report.read, report.written, report.inserted, report.quarantined) == (500, 498, 498, 2)
    assert sorted(s["row"]["id"] for s in report.samples) == [7, 8]
    assert report.samples[0]["reason"] == 'validate: email: "not an email" is not a valid email address'
    assert await fetch(pg, f'SELECT id, email, first_name, tier FROM "{dst}" WHERE id = 1') == [
        (1, "user1@example.com", "Ana1", "pro")
    ]
    # Run again: the table is replaced, not doubled.
    await pg.execute(f'DELETE FROM "{src}" WHERE id > 100')
    again = await sync(
        flow(),
        merge_spec(src, dst, mode="full", key=[]),
        steps(*LEAD_STEPS),
    )
    assert again.status == "ok"
    assert await fetch(pg, f'SELECT count(*) FROM "{dst}"') == [(98,)]


async def test_merge_by_cursor_updates_changed_rows_and_counts_unchanged(pg):
    src = await customers(pg, 1000)
    dst = name(pg, "dst")
    f = flow()
    spec = merge_spec(src, dst, cursor={"column": "updated_at"}, batch_rows=100)
    first = await sync(f, spec, steps(*LEAD_STEPS))
    assert (first.status, first.inserted, first.updated) == ("ok", 1000, 0), first.error
    assert first.cursor_to is not None and first.cursor_to.startswith("2024-01-01 00:16:40")
    await pg.execute(f"UPDATE \"{src}\" SET first_name = 'Changed', updated_at = now() WHERE id % 10 = 0")
    await insert(pg, src, range(1001, 1011), ts="2030-01-01")
    second = await sync(f, spec, steps(*LEAD_STEPS))
    assert second.status == "ok", second.error
    # Only the window is read: the 100 changed rows and the 10 new ones.
    assert (second.read, second.inserted, second.updated) == (110, 10, 100)
    assert await fetch(pg, f"SELECT count(*) FROM \"{dst}\" WHERE first_name = 'Changed'") == [(100,)]
    third = await sync(f, spec, steps(*LEAD_STEPS))
    # The boundary row (equal to the cursor) is read again and left as it is.
    assert (third.status, third.inserted, third.updated) == ("ok", 0, 0)
    assert third.unchanged == third.read


async def test_lookback_catches_a_row_committed_late_with_an_older_timestamp(pg):
    src = await customers(pg, 100)
    dst = name(pg, "dst")
    f = flow()
    spec = merge_spec(src, dst, mode="append", cursor={"column": "updated_at", "lookback": "10m"})
    assert (await sync(f, spec)).inserted == 100
    # A transaction that started earlier commits now, stamped 5 minutes before the last cursor.
    await pg.execute(
        f"""INSERT INTO "{src}" SELECT 5000, 'late@x.io', 'Late', 'FR',
        (SELECT max(updated_at) FROM "{src}") - interval '5 minutes', NULL"""
    )
    late = await sync(f, spec)
    assert (late.status, late.inserted) == ("ok", 1), late.error
    # The rows re-read inside the lookback are not appended twice.
    assert await fetch(pg, f'SELECT count(*), count(DISTINCT id) FROM "{dst}"') == [(101, 101)]


async def test_drift_stops_by_default_and_nothing_is_written(pg):
    src = await customers(pg, 50)
    dst = name(pg, "dst")
    f = flow()
    spec = merge_spec(src, dst)
    assert (await sync(f, spec)).status == "ok"
    await pg.execute(f'ALTER TABLE "{src}" ADD COLUMN phone text')
    await pg.execute(f"UPDATE \"{src}\" SET phone = '+49 1', first_name = 'X'")
    stopped = await sync(f, spec)
    assert stopped.status == "stopped"
    assert "new column phone (text)" in (stopped.error or "")
    assert "--accept-schema" in (stopped.error or "")
    assert await fetch(pg, f"SELECT count(*) FROM \"{dst}\" WHERE first_name = 'X'") == [(0,)]
    evolved = await sync(f, {**spec, "on_drift": "evolve"})
    assert evolved.status == "ok", evolved.error
    assert evolved.schema_changes == ["new column phone (text)"]
    assert await fetch(pg, f"SELECT count(*) FROM \"{dst}\" WHERE phone = '+49 1'") == [(50,)]


async def test_dropped_source_column_never_writes_nulls(pg):
    src = await customers(pg, 20)
    dst = name(pg, "dst")
    f = flow()
    spec = merge_spec(src, dst)
    assert (await sync(f, spec)).status == "ok"
    await pg.execute(f'ALTER TABLE "{src}" DROP COLUMN country')
    await pg.execute(f"UPDATE \"{src}\" SET first_name = 'Y'")
    ignored = await sync(f, {**spec, "on_drift": "ignore"})
    assert ignored.status == "ok", ignored.error
    assert ignored.schema_changes == ["column country dropped"]
    # The other columns are updated; country keeps its values at the destination.
    assert await fetch(pg, f"SELECT count(*) FROM \"{dst}\" WHERE first_name = 'Y' AND country = 'DE'") == [
        (20,)
    ]


async def test_soft_and_hard_deletes_follow_with_a_guard(pg):
    src = await customers(pg, 100)
    await pg.execute(f'ALTER TABLE "{src}" ADD COLUMN deleted_at timestamptz')
    dst = name(pg, "dst")
    f = flow()
    spec = merge_spec(src, dst, deletes={"detect": "soft", "column": "deleted_at"})
    assert (await sync(f, spec)).inserted == 100
    await pg.execute(f'UPDATE "{src}" SET deleted_at = now() WHERE id <= 5')
    soft = await sync(f, spec)
    assert (soft.status, soft.deleted) == ("ok", 5), soft.error
    assert await fetch(pg, f'SELECT count(*) FROM "{dst}"') == [(95,)]

    hard = {**spec, "deletes": {"detect": "keys", "max_share": 0.5}}
    await pg.execute(f'DELETE FROM "{src}" WHERE id <= 15')
    gone = await sync(f, hard)
    assert (gone.status, gone.deleted) == ("ok", 10), gone.error
    await pg.execute(f'DELETE FROM "{src}" WHERE id BETWEEN 16 AND 75')
    guarded = await sync(f, hard)
    assert guarded.status == "stopped"
    assert "would delete 60 of 85 rows" in (guarded.error or "")
    assert await fetch(pg, f'SELECT count(*) FROM "{dst}"') == [(85,)]


async def test_merge_of_a_query_that_gives_a_key_twice_keeps_one_row():
    """A stage holding a key twice: the upsert without a sort fails and is run again deduplicated."""
    async with database() as pg:
        src, dst = name(pg, "dup_src"), name(pg, "dup_dst")
        await pg.execute(f"CREATE TABLE {src} (id bigint, v text)")
        await pg.execute(f"INSERT INTO {src} VALUES (1, 'a'), (2, 'b'), (2, 'b'), (3, 'c')")
        spec = {
            "from": {"system": "db", "query": f"SELECT id, v FROM {src}"},
            "to": {"system": "db", "table": dst},
            "mode": "merge",
            "key": ["id"],
        }
        report = await sync("test-dup-merge", spec)
        assert report.status == "ok", report.error
        assert await fetch(pg, f"SELECT id, v FROM {dst} ORDER BY id") == [(1, "a"), (2, "b"), (3, "c")]
        assert (report.inserted, report.updated) == (3, 0)
