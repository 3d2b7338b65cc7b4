"""CSV, JSON Lines and Parquet files as batch sources and destinations, from project folders: incremental by
files read, bad rows quarantined with file:line reasons, one new file per run written all or nothing
(kill -9 included), and `check` problems for what a files side cannot do."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from patchbay.config.project import load_or_raise, load_project
from patchbay.engine.batch import RunReport, run_flow
from patchbay.engine.hub import open_resolver_for
from tests.conftest import IN_CI, write_project

if not IN_CI:
    pytest.importorskip(
        "pyarrow", reason="the parquet extra is not installed: pip install 'patchbay[parquet]'"
    )
import pyarrow as pa
import pyarrow.parquet as pq

SYSTEMS = """
drop: {kind: files, owner: ops, folder: drop}
out: {kind: files, owner: data, folder: out}
report: {kind: sqlite, owner: data, path: report.db}
"""


def flow(batch: str, steps: str = "") -> str:
    return (
        "purpose: Files in bulk.\nowner: data\ntrigger: {manual: true}\n"
        + (f"steps:\n{steps}" if steps else "")
        + f"batch:\n{batch}"
    )


async def run(root: Path, name: str = "f") -> RunReport:
    project = load_or_raise(root)
    return await run_flow(project, open_resolver_for(root), project.flows[name])


def project(root: Path, batch: str, steps: str = "") -> Path:
    write_project(root, {"systems.yaml": SYSTEMS, "flows/f.yaml": flow(batch, steps)})
    (root / "drop").mkdir(exist_ok=True)
    sqlite3.connect(root / "report.db").close()
    return root


def put(path: Path, text: str, mtime: float | None = None) -> None:
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def table(root: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(root / "report.db") as c:
        return c.execute(sql).fetchall()


CSV_INTO_SQLITE = """
  from: {system: drop, files: "orders-*.csv"}
  to: {system: report, table: orders}
  mode: merge
  key: [id]
"""


async def test_csv_files_are_read_once_each_and_bad_rows_are_quarantined_with_file_and_line(tmp_path):
    root = project(tmp_path, CSV_INTO_SQLITE)
    t = time.time() - 100
    put(root / "drop/orders-1.csv", 'id,email,note\n1,a@x.io,\n2,b@x.io,"two, with comma"\n', t)
    put(root / "drop/orders-2.csv", 'id,email,note\n3,c@x.io,x\n4,broken\n5,e@x.io,"line\nbreak"\n', t + 1)
    put(root / "drop/other.csv", "id,email,note\n99,no@x.io,x\n", t)  # not matched
    put(root / "drop/.orders-9.csv", "id,email,note\n98,no@x.io,x\n", t)  # hidden: never read
    first = await run(root)
    assert (first.status, first.read, first.inserted, first.quarantined) == ("ok", 5, 4, 1), first.error
    assert first.samples[0]["reason"] == "orders-2.csv:3: 2 cells, the header has 3"
    assert table(root, "SELECT id, email, note FROM orders ORDER BY id") == [
        ("1", "a@x.io", None),  # an empty cell is NULL; CSV cells are text
        ("2", "b@x.io", "two, with comma"),
        ("3", "c@x.io", "x"),
        ("5", "e@x.io", "line\nbreak"),
    ]
    assert json.loads(first.cursor_to or "{}").keys() == {"orders-1.csv", "orders-2.csv"}

    again = await run(root)
    assert (again.status, again.read, again.inserted) == ("ok", 0, 0), again.error

    # A new file, and a file that changed (its size and time): only those two are read.
    put(root / "drop/orders-3.csv", "id,email,note\n6,f@x.io,y\n", t + 2)
    put(root / "drop/orders-1.csv", 'id,email,note\n1,a2@x.io,\n2,b@x.io,"two, with comma"\n', t + 3)
    third = await run(root)
    assert (third.status, third.read, third.inserted, third.updated, third.unchanged) == (
        "ok",
        3,
        1,
        1,
        1,
    ), third.error
    assert table(root, "SELECT email FROM orders WHERE id = '1'") == [("a2@x.io",)]


async def test_csv_files_with_another_header_fail_the_run_and_write_nothing(tmp_path):
    root = project(tmp_path, CSV_INTO_SQLITE)
    t = time.time() - 100
    put(root / "drop/orders-1.csv", "id,email\n1,a@x.io\n", t)
    put(root / "drop/orders-2.csv", "id,email,note\n2,b@x.io,x\n", t + 1)
    report = await run(root)
    assert report.status == "failed"
    assert "orders-1.csv: its columns (id, email) are not the source's (id, email, note)" in (
        report.error or ""
    )
    assert table(root, "SELECT name FROM sqlite_master WHERE name = 'orders'") == []


async def test_json_lines_keep_their_types_and_unparsable_lines_are_quarantined(tmp_path):
    root = project(
        tmp_path,
        """
  from: {system: drop, files: "events*.jsonl"}
  to: {system: report, table: events}
  mode: full
""",
        steps="  - map: {id: id, score: score, tags: tags, vip: vip, city: address.city}\n",
    )
    lines = [
        {"id": 1, "score": 1.5, "tags": ["a"], "vip": True, "address": {"city": "Köln"}},
        {"id": 2, "score": 2, "tags": [], "vip": False, "address": {"city": "Oslo"}},
        "not json",
        {"id": "three", "score": 1.0, "tags": [], "vip": False, "address": {}},
        {"id": 4, "score": 1.0, "tags": [], "vip": False, "address": {}},
        {"id": 5, "score": None, "tags": None, "vip": None, "address": None},
    ]
    # The columns come from the newest file; an older one with a field none of them has: that line is quarantined.
    put(root / "drop/events-0.jsonl", json.dumps({"id": 7, "surprise": 1}) + "\n", time.time() - 100)
    put(
        root / "drop/events.jsonl",
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
    )
    report = await run(root)
    assert (report.status, report.read, report.inserted, report.quarantined) == ("ok", 7, 4, 3), report.error
    reasons = [s["reason"] for s in report.samples]
    assert reasons[0] == "events-0.jsonl:1: field(s) surprise not among the columns"
    assert reasons[1].startswith("events.jsonl:3: not JSON")
    assert reasons[2] == "events.jsonl:4: id is not int"
    assert table(root, "SELECT id, score, tags, vip, city FROM events ORDER BY id") == [
        (1, 1.5, '["a"]', 1, "Köln"),
        (2, 2.0, "[]", 0, "Oslo"),
        (4, 1.0, "[]", 0, None),
        (5, None, None, None, None),
    ]


def seed_sqlite(root: Path, n: int) -> None:
    with sqlite3.connect(root / "report.db") as c:
        c.execute(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, score REAL, active BOOLEAN,"
            " attrs JSON, seen_at TIMESTAMP, note TEXT)"
        )
        c.executemany(
            "INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (i, f"u{i}@x.io", i / 4, i % 2, json.dumps({"tier": "pro", "n": i}),
                 f"2024-01-01 00:00:{i % 60:02d}", "tab\there, line\nbreak" if i == 2 else None)
                for i in range(1, n + 1)
            ],
        )  # fmt: skip


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
async def test_a_files_destination_writes_one_file_per_run_and_reads_back_the_same_rows(tmp_path, fmt):
    write_project(
        tmp_path,
        {
            "systems.yaml": SYSTEMS,
            "flows/out.yaml": flow(
                f"""
  from: {{system: report, table: customers}}
  to: {{system: out, table: customers, format: {fmt}}}
  mode: append
  key: [id]
  cursor: {{column: id}}
"""
            ),
            "flows/back.yaml": flow(
                f"  from: {{system: out, files: 'customers-*', format: {fmt}}}\n"
                "  to: {system: report, table: back}\n  mode: full\n"
            ),
        },
    )
    sqlite3.connect(tmp_path / "report.db").close()
    seed_sqlite(tmp_path, 250)
    first = await run(tmp_path, "out")
    assert (first.status, first.inserted) == ("ok", 250), first.error
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert len(files) == 1 and files[0].startswith("customers-") and files[0].endswith(f".{fmt}")
    with sqlite3.connect(tmp_path / "report.db") as c:
        c.execute("INSERT INTO customers VALUES (300, 'n@x.io', 1.0, 1, '{}', '2024-02-01 00:00:00', NULL)")
    second = await run(tmp_path, "out")
    # The boundary row (cursor equal to the mark) is read again: append files hold what each run read.
    assert (second.status, second.inserted) == ("ok", 2), second.error
    third = await run(tmp_path, "out")
    assert (third.status, third.read) == ("ok", 1)  # the boundary row again, written to a third file
    assert len([p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]) == 3

    back = await run(tmp_path, "back")
    assert (back.status, back.read, back.quarantined) == ("ok", 253, 0), back.error
    got = table(tmp_path, "SELECT DISTINCT id, email, score, note FROM back WHERE id IN (2, 300) ORDER BY id")
    if fmt == "csv":  # CSV cells are text
        assert got == [("2", "u2@x.io", "0.5", "tab\there, line\nbreak"), ("300", "n@x.io", "1.0", None)]
    else:
        assert got == [(2, "u2@x.io", 0.5, "tab\there, line\nbreak"), (300, "n@x.io", 1.0, None)]
    if fmt == "parquet":
        schema = pq.read_schema(tmp_path / "out" / files[0])
        assert schema.field("id").type == pa.int64() and schema.field("active").type == pa.bool_()
        assert schema.field("seen_at").type == pa.timestamp("us")


async def test_a_full_refresh_replaces_the_file_and_an_empty_append_writes_none(tmp_path):
    write_project(
        tmp_path,
        {
            "systems.yaml": SYSTEMS,
            "flows/f.yaml": flow(
                "  from: {system: report, table: customers}\n  to: {system: out, table: all}\n  mode: full\n"
            ),
            "flows/g.yaml": flow(
                "  from: {system: report, table: customers}\n  to: {system: out, table: inc}\n  mode: append\n"
                "  key: [id]\n  cursor: {column: id}\n"
            ),
        },
    )
    sqlite3.connect(tmp_path / "report.db").close()
    seed_sqlite(tmp_path, 10)
    assert (await run(tmp_path)).status == "ok"
    with sqlite3.connect(tmp_path / "report.db") as c:
        c.execute("DELETE FROM customers WHERE id > 3")
    assert (await run(tmp_path)).status == "ok"
    with open(tmp_path / "out/all.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "email", "score", "active", "attrs", "seen_at", "note"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    assert (await run(tmp_path, "g")).inserted == 3
    with sqlite3.connect(tmp_path / "report.db") as c:
        c.execute("DELETE FROM customers")
    empty = await run(tmp_path, "g")
    assert (empty.status, empty.read) == ("ok", 0)
    assert len(list((tmp_path / "out").glob("inc-*.csv"))) == 1


async def test_a_commit_cut_after_its_state_is_completed_when_the_state_is_next_read(tmp_path, monkeypatch):
    write_project(
        tmp_path,
        {
            "systems.yaml": SYSTEMS,
            "flows/f.yaml": flow(
                "  from: {system: report, table: customers}\n  to: {system: out, table: all}\n  mode: full\n"
            ),
        },
    )
    sqlite3.connect(tmp_path / "report.db").close()
    seed_sqlite(tmp_path, 5)
    real = os.replace

    def cut(src: Any, dst: Any) -> None:
        if str(dst).endswith("all.csv"):
            raise OSError("power cut")
        real(src, dst)

    monkeypatch.setattr(os, "replace", cut)
    report = await run(tmp_path)
    monkeypatch.setattr(os, "replace", real)
    assert report.status == "failed" and "power cut" in (report.error or "")
    state = orjson.loads((tmp_path / "out/.patchbay-sync/f.json").read_bytes())
    assert state["pending"]["file"] == "all.csv" and not (tmp_path / "out/all.csv").exists()
    # The next run finds the committed file under its temporary name and puts it in place first.
    again = await run(tmp_path)
    assert again.status == "ok", again.error
    with open(tmp_path / "out/all.csv", newline="") as fh:
        assert len(list(csv.reader(fh))) == 6  # the header and 5 rows
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name != ".patchbay-sync"] == ["all.csv"]


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
async def test_kill_9_while_writing_a_file_leaves_no_file_and_the_rerun_writes_each_row_once(tmp_path):
    write_project(
        tmp_path,
        {
            "systems.yaml": SYSTEMS,
            "flows/f.yaml": flow(
                "  from: {system: report, table: customers}\n  to: {system: out, table: dump, format: jsonl}\n"
                "  mode: append\n  key: [id]\n  cursor: {column: id}\n  batch_rows: 1000\n"
            ),
        },
    )
    sqlite3.connect(tmp_path / "report.db").close()
    seed_sqlite(tmp_path, 200_000)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
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
    out = tmp_path / "out"
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    assert not (out / ".patchbay-sync/f.json").exists()
    await asyncio.sleep(0)
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path)], capture_output=True, text=True, env=env, timeout=180
    )
    assert "done ok 200000 None" in done.stdout, done.stdout + done.stderr
    (written,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    ids = [orjson.loads(line)["id"] for line in written.read_bytes().splitlines()]
    assert len(ids) == len(set(ids)) == 200_000
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # the killed run's temp is gone


def problems(root: Path, batch: str) -> str:
    write_project(
        root,
        {
            "systems.yaml": SYSTEMS + "lake: {kind: duckdb, owner: data, path: lake.duckdb}\n",
            "flows/f.yaml": flow(batch),
        },
    )
    _, found = load_project(root)
    return "\n".join(str(p) for p in found)


def test_check_knows_what_a_files_side_can_do(tmp_path):
    text = problems(
        tmp_path,
        '  from: {system: drop, files: "../secret/*.csv"}\n  to: {system: report, table: t}\n  mode: full\n',
    )
    assert "bad files '../secret/*.csv': give a file name or a glob inside the system's folder" in text
    text = problems(
        tmp_path, "  from: {system: drop, table: orders}\n  to: {system: report, table: t}\n  mode: full\n"
    )
    assert "flows/f.yaml:5: a files system is read with `files:`" in text
    text = problems(
        tmp_path,
        "  from: {system: drop, files: orders.txt}\n  to: {system: report, table: t}\n  mode: full\n",
    )
    assert "orders.txt: cannot tell the format from the name; set `format: csv|jsonl|parquet`" in text
    text = problems(
        tmp_path,
        "  from: {system: report, table: t}\n  to: {system: out, table: t}\n  mode: merge\n  key: [id]\n",
    )
    assert "a files destination takes mode full or append" in text
    text = problems(
        tmp_path, "  from: {system: report, files: a.csv}\n  to: {system: lake, table: t}\n  mode: full\n"
    )
    assert "system 'report' (sqlite) is a database: read it with `table` or `query`" in text
    assert "duckdb" not in text.split("is a database")[1]  # the duckdb extra is installed here


def test_check_refuses_format_on_a_table_destination(tmp_path):
    text = problems(
        tmp_path,
        "  from: {system: report, table: t}\n  to: {system: report, table: t, format: csv}\n  mode: full\n",
    )
    assert "`format` is for a files destination; sqlite writes a table" in text
    text = problems(
        tmp_path,
        "  from: {system: report, table: t}\n  to: {system: lake, table: t, format: csv}\n  mode: full\n",
    )
    assert "`format` is for a files destination; duckdb writes a table" in text


async def test_a_file_with_a_new_or_a_missing_column_follows_the_drift_policy(tmp_path):
    root = project(tmp_path, CSV_INTO_SQLITE)
    t = time.time() - 100
    put(root / "drop/orders-1.csv", "id,email\n1,a@x.io\n", t)
    assert (await run(root)).inserted == 1
    put(root / "drop/orders-2.csv", "id,email,tier\n2,b@x.io,pro\n", t + 1)
    stopped = await run(root)
    assert stopped.status == "stopped" and "new column tier (text)" in (stopped.error or "")
    evolve = project(tmp_path, CSV_INTO_SQLITE + "  on_drift: evolve\n")
    evolved = await run(evolve)
    assert (evolved.status, evolved.read, evolved.inserted) == ("ok", 1, 1), evolved.error
    assert table(root, "SELECT id, tier FROM orders ORDER BY id") == [("1", None), ("2", "pro")]
    put(root / "drop/orders-3.csv", "id,tier\n3,free\n", t + 2)
    dropped = await run(root)
    # Under evolve a dropped column is reported and left alone at the destination, never written as NULL.
    assert (dropped.status, dropped.schema_changes) == ("ok", ["column email dropped"]), dropped.error
    assert table(root, "SELECT email FROM orders WHERE id = '1'") == [("a@x.io",)]
