"""Batch syncs into and out of DuckDB files: PostgreSQL -> DuckDB full, append, merge with updates, deletes,
drift, the lookback boundary, all or nothing; DuckDB -> SQLite as a source."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.connectors.bulk_harness import bulk, database, name, steps

if not IN_CI:
    pytest.importorskip("duckdb", reason="the duckdb extra is not installed: pip install 'patchbay[duckdb]'")
import duckdb

from patchbay.config.batch import BatchSpec
from patchbay.connectors.base import Resources
from patchbay.connectors.bulk_client import BulkSystem
from patchbay.connectors.duckdb_bulk import DuckdbBulk, DuckdbSystem
from patchbay.connectors.sqlite import SqliteSystem
from patchbay.connectors.sqlite_bulk import SqliteBulk
from patchbay.engine.batch import BatchRun, RunReport


@pytest.fixture
async def pg() -> Any:
    async with database() as conn:
        yield conn


def duck(path: Path) -> DuckdbBulk:
    return DuckdbBulk(
        DuckdbSystem.model_validate({"path": str(path)}), Resources(allow_private=True, system="duck")
    )


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(path)) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return conn.execute(sql).fetchall()


async def sync(
    src: BulkSystem, dst: BulkSystem, flow: str, spec: dict[str, Any], step_list: Any = None, **kw: Any
) -> RunReport:
    try:
        return await BatchRun(flow, step_list or [], BatchSpec.model_validate(spec), src, dst, **kw).run()
    finally:
        await src.close()
        await dst.close()


async def customers(pg: Any, n: int) -> str:
    t = name(pg, "src")
    await pg.execute(
        f'CREATE TABLE "{t}" (id bigint PRIMARY KEY, email text, active boolean, note text, price numeric(10,2),'
        " updated_at timestamptz NOT NULL, attrs jsonb, raw bytea, deleted_at timestamptz)"
    )
    await pg.execute(
        f"""INSERT INTO "{t}" SELECT g, 'u' || g || '@x.io', g % 2 = 0, E'tab\\there, line\\nbreak, back\\\\slash',
        g / 4.0, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', jsonb_build_object('score', g),
        '\\x00ff'::bytea, NULL FROM generate_series(1, {n}) g"""
    )
    return t


def spec(src: str, **more: Any) -> dict[str, Any]:
    return {"from": {"system": "db", "table": src}, "to": {"system": "duck", "table": "customers"}, **more}


def flow() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


async def test_postgres_to_duckdb_full_keeps_types_and_values(pg, tmp_path):
    src = await customers(pg, 2500)
    db = tmp_path / "a.duckdb"
    report = await sync(bulk(), duck(db), flow(), spec(src, mode="full", batch_rows=1000))
    assert (report.status, report.read, report.inserted) == ("ok", 2500, 2500), report.error
    got = rows(
        db,
        "SELECT id, email, active, note, price, CAST(updated_at AS VARCHAR), attrs->>'score', raw FROM customers"
        " WHERE id = 2",
    )
    assert got[0][:4] == (2, "u2@x.io", True, "tab\there, line\nbreak, back\\slash")
    assert str(got[0][4]) == "0.5000000000"
    assert got[0][5:] == ("2024-01-01 00:00:02+00", "2", b"\x00\xff")
    types = dict(
        rows(
            db, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'customers'"
        )
    )
    assert types["updated_at"] == "TIMESTAMP WITH TIME ZONE" and types["attrs"] == "JSON"
    # A second full refresh replaces the rows (none doubled).
    again = await sync(bulk(), duck(db), flow(), spec(src, mode="full"))
    assert again.status == "ok" and rows(db, "SELECT count(*) FROM customers") == [(2500,)]


async def test_merge_updates_changed_rows_counts_unchanged_and_reads_the_window(pg, tmp_path):
    src = await customers(pg, 1000)
    db = tmp_path / "m.duckdb"
    name_ = flow()
    s = spec(src, mode="merge", key=["id"], cursor={"column": "updated_at"})
    first = await sync(bulk(), duck(db), name_, s)
    assert (first.status, first.inserted) == ("ok", 1000), first.error
    await pg.execute(f"UPDATE \"{src}\" SET email = 'new@x.io', updated_at = '2024-02-01' WHERE id <= 10")
    await pg.execute(f"INSERT INTO \"{src}\" (id, email, updated_at) VALUES (5000, 'n@x.io', '2024-02-01')")
    second = await sync(bulk(), duck(db), name_, s)
    # 10 changed + 1 new, and the boundary row 1000 (equal to the last mark) read again and left as is.
    assert (second.status, second.read, second.updated, second.inserted, second.unchanged) == (
        "ok",
        12,
        10,
        1,
        1,
    ), second.error
    assert rows(db, "SELECT count(*) FROM customers WHERE email = 'new@x.io'") == [(10,)]
    assert rows(db, "SELECT count(*) FROM customers") == [(1001,)]


async def test_append_skips_keys_already_there(pg, tmp_path):
    src = await customers(pg, 100)
    db = tmp_path / "ap.duckdb"
    s = spec(src, mode="append", key=["id"])
    assert (await sync(bulk(), duck(db), flow(), s)).inserted == 100
    await pg.execute(f"INSERT INTO \"{src}\" (id, email, updated_at) VALUES (101, 'x@x.io', now())")
    again = await sync(bulk(), duck(db), flow(), s)
    assert (again.status, again.inserted, again.unchanged) == ("ok", 1, 100), again.error


async def test_key_and_soft_deletes(pg, tmp_path):
    src = await customers(pg, 300)
    db = tmp_path / "d.duckdb"
    name_ = flow()
    s = spec(src, mode="merge", key=["id"], deletes={"detect": "keys"})
    assert (await sync(bulk(), duck(db), name_, s)).inserted == 300
    await pg.execute(f'DELETE FROM "{src}" WHERE id IN (3, 100, 299)')
    report = await sync(bulk(), duck(db), name_, s)
    assert (report.status, report.deleted) == ("ok", 3), report.error
    assert (await sync(bulk(), duck(db), name_, s)).deleted == 0  # DuckDB's buckets agree with PostgreSQL's
    await pg.execute(f'UPDATE "{src}" SET deleted_at = now() WHERE id = 7')
    soft = await sync(
        bulk(),
        duck(db),
        flow(),
        spec(src, mode="merge", key=["id"], deletes={"detect": "soft", "column": "deleted_at"}),
    )
    assert (soft.status, soft.deleted) == ("ok", 1), soft.error
    assert rows(db, "SELECT count(*) FROM customers") == [(296,)]


async def test_drift_stops_and_evolve_adds_the_column(pg, tmp_path):
    src = await customers(pg, 10)
    db = tmp_path / "dr.duckdb"
    name_ = flow()
    s = spec(src, mode="merge", key=["id"])
    assert (await sync(bulk(), duck(db), name_, s)).status == "ok"
    await pg.execute(f"ALTER TABLE \"{src}\" ADD COLUMN tier text DEFAULT 'pro'")
    stopped = await sync(bulk(), duck(db), name_, s)
    assert stopped.status == "stopped" and "new column tier" in (stopped.error or "")
    evolved = await sync(bulk(), duck(db), name_, {**s, "on_drift": "evolve"})
    assert (evolved.status, evolved.updated) == ("ok", 10), evolved.error
    assert rows(db, "SELECT DISTINCT tier FROM customers") == [("pro",)]


async def test_a_failing_run_leaves_table_and_cursor_as_they_were(pg, tmp_path):
    src = await customers(pg, 50)
    db = tmp_path / "f.duckdb"
    name_ = flow()
    s = spec(src, mode="merge", key=["id"], cursor={"column": "updated_at"})
    assert (await sync(bulk(), duck(db), name_, s)).status == "ok"
    await pg.execute(f"UPDATE \"{src}\" SET email = 'changed', updated_at = '2025-01-01' WHERE id = 1")

    async def boom(report: RunReport) -> None:
        raise RuntimeError("killed before commit")

    failed = await sync(bulk(), duck(db), name_, s, before_commit=boom)
    assert failed.status == "failed"
    assert rows(db, "SELECT email FROM customers WHERE id = 1") == [("u1@x.io",)]
    assert rows(db, f"SELECT \"cursor\" FROM _patchbay_sync_state WHERE flow = '{name_}'") == [
        ("2024-01-01 00:00:50+00",)
    ]
    ok = await sync(bulk(), duck(db), name_, s)
    assert (ok.status, ok.updated) == ("ok", 1), ok.error


async def test_duckdb_as_a_source_with_steps_and_a_lookback(tmp_path):
    db = tmp_path / "src.duckdb"
    with duckdb.connect(str(db)) as conn:
        conn.execute("CREATE TABLE events (id BIGINT PRIMARY KEY, email VARCHAR, seen_at TIMESTAMP)")
        conn.execute(
            "INSERT INTO events SELECT i, 'U' || i || '@X.IO', TIMESTAMP '2024-01-01' + to_seconds(i) FROM range(1, 501) t(i)"
        )
    lite = tmp_path / "out.db"
    sqlite3.connect(lite).close()

    def sqlite_dst() -> SqliteBulk:
        return SqliteBulk(
            SqliteSystem.model_validate({"path": str(lite)}), Resources(allow_private=True, system="l")
        )

    s = {
        "from": {"system": "duck", "table": "events"},
        "to": {"system": "l", "table": "events"},
        "mode": "merge",
        "key": ["id"],
        "cursor": {"column": "seen_at", "lookback": "10s"},
        "batch_rows": 100,
    }
    lower = steps({"map": {"id": "id", "email": "lower(email)", "seen_at": "seen_at"}})
    name_ = flow()
    first = await sync(duck(db), sqlite_dst(), name_, s, lower)
    assert (first.status, first.inserted, first.cursor_to) == ("ok", 500, "2024-01-01 00:08:20"), first.error
    with duckdb.connect(str(db)) as conn:  # committed late, 5 s behind the mark
        conn.execute("INSERT INTO events VALUES (900, 'LATE@X.IO', TIMESTAMP '2024-01-01 00:08:15')")
    second = await sync(duck(db), sqlite_dst(), name_, s, lower)
    assert (second.status, second.inserted, second.read) == ("ok", 1, 12), second.error
    with sqlite3.connect(lite) as conn:
        assert conn.execute("SELECT email FROM events WHERE id = 900").fetchone() == ("late@x.io",)


def test_check_names_the_install_hint_when_the_duckdb_extra_is_missing(tmp_path, monkeypatch):
    import importlib.util

    from patchbay.config.project import load_project
    from tests.conftest import write_project

    write_project(
        tmp_path,
        {
            "systems.yaml": "lake: {kind: duckdb, owner: data, path: lake.duckdb}\n"
            "shop: {kind: sqlite, owner: ops, path: shop.db}\n",
            "flows/f.yaml": "purpose: To the lake.\nowner: data\ntrigger: {manual: true}\nbatch:\n"
            "  from: {system: shop, table: orders}\n  to: {system: lake, table: orders}\n  mode: full\n",
        },
    )
    assert load_project(tmp_path)[1] == []
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "duckdb" else real(name, *a)
    )
    text = "\n".join(str(p) for p in load_project(tmp_path)[1])
    assert (
        "flows/f.yaml:6: the duckdb connector needs the duckdb driver: pip install 'patchbay[duckdb]'" in text
    )


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
def test_kill_9_mid_run_leaves_the_duckdb_file_as_it_was_and_the_rerun_writes_each_row_once(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import write_project

    write_project(
        tmp_path,
        {
            "systems.yaml": "lake: {kind: duckdb, owner: data, path: lake.duckdb}\n"
            "shop: {kind: sqlite, owner: ops, path: shop.db}\n",
            "flows/f.yaml": "purpose: To the lake.\nowner: data\ntrigger: {manual: true}\nbatch:\n"
            "  from: {system: shop, table: orders}\n  to: {system: lake, table: orders}\n  mode: merge\n"
            "  key: [id]\n  cursor: {column: id}\n  batch_rows: 1000\n",
        },
    )
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, total REAL)")
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, ?)", [(i, f"u{i}@x.io", i * 1.5) for i in range(1, 200_001)]
        )
    tmp = tmp_path / "tmp"  # the runs' temp folder, where the batch files go
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("read ") and int(line.split()[1]) >= 30000:
            break
    else:
        pytest.fail(f"the run ended before it could be killed (exit {proc.wait()})")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    # the killed run's batch file is left behind (named with its process id) ...
    assert [p.name.split("-")[2] for p in tmp.iterdir()] == [str(proc.pid)]
    db = tmp_path / "lake.duckdb"
    # DuckDB replays its WAL on open: nothing of the killed transaction is there.
    tables = {r[0] for r in rows(db, "SELECT table_name FROM information_schema.tables")}
    if "orders" in tables:
        assert rows(db, "SELECT count(*) FROM orders") == [(0,)]
    if "_patchbay_sync_state" in tables:
        assert rows(db, "SELECT count(*) FROM _patchbay_sync_state") == [(0,)]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path)], capture_output=True, text=True, env=env, timeout=180
    )
    assert "done ok 200000 None" in done.stdout, done.stdout + done.stderr
    assert list(tmp.iterdir()) == []  # ... and the next run removes it (and its own)
    assert rows(db, "SELECT count(*), count(DISTINCT id), sum(id) FROM orders") == [
        (200_000, 200_000, 200_000 * 200_001 // 2)
    ]


PLAIN = ["", " ", "plain", 'a"b', '""', '"', "it's", "é ü ß", "日本語", "😀 emoji", "a,b;c", "  spaced  ", "N",
         "NULL", "null", None]  # fmt: skip
ESCAPED = ["\t", "\n", "\r\n", "\r", "a\\b", "\\", "\\N", "\\\\N", 'tab\there "q"', "line\nbreak\\", "\\x00ff",
           '"\t"', "end\\", "ü\\ü"]  # fmt: skip


async def test_text_values_arrive_byte_exact_through_both_batch_file_forms(pg, tmp_path, monkeypatch):
    """Batches go to DuckDB as files: COPY text as it is when no value needs an escape, quoted CSV
    otherwise. Both keep every value exactly: tabs, newlines, CR, backslashes, `\\N` as text, quotes,
    unicode, and NULL apart from the empty string."""
    from patchbay.connectors import duckdb_bulk

    forms: list[bool] = []
    to_file = duckdb_bulk._DuckLoad._to_file

    def spy(rows: list[list[bytes]], path: str) -> bool:
        forms.append(to_file(rows, path))
        return forms[-1]

    monkeypatch.setattr(duckdb_bulk._DuckLoad, "_to_file", staticmethod(spy))
    t = name(pg, "exact")
    await pg.execute(f'CREATE TABLE "{t}" (id bigint PRIMARY KEY, v text, w text)')
    want: dict[int, tuple[str | None, str | None]] = {}
    for i in range(100):  # the first batch: nothing to escape (quotes, unicode, '' and NULL)
        want[i] = (PLAIN[i % len(PLAIN)], PLAIN[(i * 7) % len(PLAIN)])
    mixed = ESCAPED + PLAIN
    for i in range(100, 230):  # then batches with escapes, NULLs and plain values side by side
        want[i] = (mixed[i % len(mixed)], mixed[(i * 5) % len(mixed)])
    want[0] = ("x" * 3_000_000, None)  # longer than a CSV reader's default line (2 MB)
    want[150] = ("é\t" * 1_000_000, "")
    async with pg.cursor() as cur:
        await cur.executemany(f'INSERT INTO "{t}" VALUES (%s, %s, %s)', [(k, *v) for k, v in want.items()])
    db = tmp_path / "exact.duckdb"
    s = {
        "from": {"system": "db", "table": t},
        "to": {"system": "duck", "table": "exact"},
        "mode": "full",
        "batch_rows": 100,
    }
    report = await sync(bulk(), duck(db), flow(), s)
    assert (report.status, report.inserted) == ("ok", 230), report.error
    assert forms == [False, True, True]  # the plain batch as raw COPY text, the others quoted
    got = {r[0]: (r[1], r[2]) for r in rows(db, "SELECT id, v, w FROM exact")}
    assert got == want
    assert rows(db, "SELECT count(*) FROM exact WHERE v IS NULL") == [
        (sum(v is None for v, _ in want.values()),)
    ]
    assert rows(db, "SELECT count(*) FROM exact WHERE v = ''") == [(sum(v == "" for v, _ in want.values()),)]

    # One column: an empty string or a NULL would be an empty line in the file (CSV readers skip those).
    one = name(pg, "one")
    await pg.execute(f'CREATE TABLE "{one}" (v text)')
    vals = ["", None, "x", "\\", "", None, "\t"] * 20
    async with pg.cursor() as cur:
        await cur.executemany(f'INSERT INTO "{one}" VALUES (%s)', [(v,) for v in vals])
    s1 = {**s, "from": {"system": "db", "table": one}, "to": {"system": "duck", "table": "one"}}
    report = await sync(bulk(), duck(db), flow(), s1)
    assert (report.status, report.inserted) == ("ok", len(vals)), report.error
    got_one = sorted(rows(db, "SELECT v FROM one"), key=repr)
    assert got_one == sorted([(v,) for v in vals], key=repr)


async def test_batch_files_are_private_and_removed_after_the_run(pg, tmp_path, monkeypatch):
    """The batch file holds the rows: it is created 0600 and gone when the run commits or fails."""
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    src = await customers(pg, 300)
    seen: list[int] = []
    from patchbay.connectors import duckdb_bulk

    insert = duckdb_bulk._DuckLoad._insert

    def spy(self: Any, conn: Any, quoted: bool) -> None:
        seen.append(os.stat(self._file).st_mode & 0o777)
        insert(self, conn, quoted)

    monkeypatch.setattr(duckdb_bulk._DuckLoad, "_insert", spy)
    db = tmp_path / "f.duckdb"
    report = await sync(bulk(), duck(db), flow(), spec(src, mode="full", batch_rows=100))
    assert report.status == "ok", report.error
    assert seen == [0o600] * 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("patchbay-duckdb-")] == []

    async def boom(report: RunReport) -> None:
        raise RuntimeError("cut before commit")

    failed = await sync(bulk(), duck(db), flow(), spec(src, mode="full", batch_rows=100), before_commit=boom)
    assert failed.status == "failed"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("patchbay-duckdb-")] == []


async def test_pushed_down_steps_write_copy_blocks_byte_exact(pg, tmp_path, monkeypatch):
    """With the steps computed in PostgreSQL's SELECT, DuckDB gets whole COPY-text blocks (write_raw):
    a block without escapes goes to the batch file as it is, one with escapes is quoted; values exact."""
    from patchbay.connectors import duckdb_bulk

    blocks: list[int] = []
    write_raw = duckdb_bulk._DuckLoad.write_raw

    async def spy(self: Any, block: bytes, n: int) -> None:
        blocks.append(n)
        await write_raw(self, block, n)

    monkeypatch.setattr(duckdb_bulk._DuckLoad, "write_raw", spy)
    t = name(pg, "pushed")
    await pg.execute(f'CREATE TABLE "{t}" (id bigint PRIMARY KEY, v text, w text)')
    mixed = PLAIN + ESCAPED
    want = {i: (mixed[i % len(mixed)], mixed[(i * 3) % len(mixed)]) for i in range(300)}
    async with pg.cursor() as cur:
        await cur.executemany(f'INSERT INTO "{t}" VALUES (%s, %s, %s)', [(k, *v) for k, v in want.items()])
    db = tmp_path / "pushed.duckdb"
    s = {
        "from": {"system": "db", "table": t},
        "to": {"system": "duck", "table": "pushed"},
        "mode": "full",
        "batch_rows": 100,
    }
    report = await sync(
        bulk(), duck(db), flow(), s, steps({"map": {"id": "id", "v": "v", "w": "w", "n": "lower(v)"}})
    )
    assert (report.status, report.inserted) == ("ok", 300), report.error
    assert sum(blocks) >= 200, report.pushdown  # non-ASCII lower() is guarded: those rows take Python
    got = {r[0]: (r[1], r[2]) for r in rows(db, "SELECT id, v, w FROM pushed")}
    assert got == want
