"""Batch flows from a project folder: checked, run, incremental, and all or nothing under kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from patchbay.config.project import load_or_raise, load_project
from patchbay.engine.batch import run_flow
from patchbay.engine.hub import open_resolver_for
from tests.conftest import write_project
from tests.connectors.bulk_harness import HOST, PORT, database, name

SYSTEMS = """
shop: {kind: sqlite, owner: ops, path: shop.db}
report: {kind: sqlite, owner: data, path: report.db}
"""
FLOW = """
purpose: Orders copied into the reporting file, merged by id.
owner: data
trigger: {manual: true}
steps:
  - map: {id: id, email: lower(trim(email)), total: total, updated_at: updated_at}
  - validate: {email: {required: true, format: email}}
batch:
  from: {system: shop, table: orders}
  to: {system: report, table: orders}
  mode: merge
  key: [id]
  cursor: {column: updated_at}
"""


def shop(root: Path, n: int) -> None:
    with sqlite3.connect(root / "shop.db") as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, total REAL, updated_at TEXT)")
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?)",
            [
                (i, f" Buyer{i}@Shop.io", i * 2.5, f"2024-01-01 00:{i // 60:02d}:{i % 60:02d}")
                for i in range(1, n + 1)
            ],
        )
    sqlite3.connect(root / "report.db").close()


async def test_a_batch_flow_is_checked_run_and_incremental(tmp_path):
    write_project(tmp_path, {"systems.yaml": SYSTEMS, "flows/orders.yaml": FLOW})
    shop(tmp_path, 300)
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("UPDATE orders SET email = 'nope' WHERE id = 7")
    project = load_or_raise(tmp_path)
    flow = project.flows["orders"]
    report = await run_flow(project, open_resolver_for(tmp_path), flow)
    assert report.status == "ok", report.error
    assert (report.read, report.inserted, report.quarantined) == (300, 299, 1)
    assert report.samples[0]["row"]["id"] == 7
    assert report.samples[0]["reason"].startswith("validate: email:")
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("UPDATE orders SET email = 'fixed@shop.io', updated_at = '2025-01-01' WHERE id = 7")
    again = await run_flow(project, open_resolver_for(tmp_path), flow)
    # The fixed row, and the boundary row read again (equal cursor values are never skipped) and left as is.
    assert (again.status, again.read, again.inserted, again.unchanged, again.quarantined) == (
        "ok",
        2,
        1,
        1,
        0,
    )
    with sqlite3.connect(tmp_path / "report.db") as c:
        assert c.execute("SELECT count(*), min(email) FROM orders").fetchone() == (300, "buyer100@shop.io")


def test_check_refuses_a_batch_flow_with_a_webhook_or_destinations(tmp_path):
    bad = FLOW.replace("trigger: {manual: true}", "trigger: {webhook: {system: shop}}")
    bad += "destinations:\n  - {name: x, system: report, table: t}\n"
    write_project(tmp_path, {"systems.yaml": SYSTEMS + "\n", "flows/orders.yaml": bad})
    _, problems = load_project(tmp_path)
    text = "\n".join(str(p) for p in problems)
    assert "flows/orders.yaml:3: a batch flow runs on a schedule or on demand" in text
    assert "a batch flow writes to `batch.to`; remove `destinations`" in text


PG_SYSTEMS = f"""
crm:
  kind: postgres
  owner: data
  host: {HOST}
  port: {PORT}
  database: test
  user: postgres
  allow_private_network: true
"""

RUNNER = """
import asyncio, sys
from pathlib import Path
from patchbay.config.project import load_or_raise
from patchbay.engine.batch import run_flow
from patchbay.engine.hub import open_resolver_for

import time
root, flow, hold_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
project = load_or_raise(root)
def progress(p):
    print(f"read {p.read}", flush=True)
    if hold_at and p.read >= hold_at:
        time.sleep(60)  # hold mid-run, its destination transaction open, until the test kills it
report = asyncio.run(run_flow(project, open_resolver_for(root), project.flows[flow], progress=progress))
print(f"done {report.status} {report.inserted} {report.error}", flush=True)
"""


@pytest.mark.slow
async def test_kill_9_mid_run_leaves_nothing_half_written_and_the_rerun_completes(tmp_path):
    async with database() as pg:
        src, dst = name(pg, "src"), name(pg, "dst")
        await pg.execute(f'CREATE TABLE "{src}" (id bigint PRIMARY KEY, email text, at timestamptz NOT NULL)')
        await pg.execute(
            f"""INSERT INTO "{src}" SELECT g, 'u' || g || '@x.io', timestamptz '2024-01-01' + g * interval '1 s'
            FROM generate_series(1, 200000) g"""
        )
        flow = textwrap.dedent(
            f"""
            purpose: A copy that is killed half way.
            owner: data
            trigger: {{manual: true}}
            steps:
              - map: {{id: id, email: upper(email), at: at}}
            batch:
              from: {{system: crm, table: {src}}}
              to: {{system: crm, table: {dst}}}
              mode: merge
              key: [id]
              cursor: {{column: at}}
              batch_rows: 2000
            """
        )
        # A unique flow name per test run keeps the shared state table apart (and the harness cleans it up).
        flow_name = f"test-copy-{uuid.uuid4().hex[:8]}"
        write_project(tmp_path, {"systems.yaml": PG_SYSTEMS, f"flows/{flow_name}.yaml": flow})
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(tmp_path), flow_name, "60000"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("read ") and int(line.split()[1]) >= 60000:
                    break  # the runner now holds, mid-run, until it is killed
            else:
                pytest.fail(f"the run ended before it could be killed (exit {proc.wait()})")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        # Nothing of the killed run is visible: no table rows, no moved cursor.
        exists = await (await pg.execute("SELECT to_regclass(%s)", (dst,))).fetchone()
        if exists and exists[0]:
            assert await (await pg.execute(f'SELECT count(*) FROM "{dst}"')).fetchone() == (0,)
        if (await (await pg.execute("SELECT to_regclass('_patchbay_sync_state')")).fetchone())[0]:
            state = await (
                await pg.execute("SELECT count(*) FROM _patchbay_sync_state WHERE flow = %s", (flow_name,))
            ).fetchone()
            assert state == (0,)
        await asyncio.sleep(0.2)  # the server notices the dead client and rolls back
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, str(tmp_path), flow_name, "0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert "done ok 200000 None" in done.stdout, done.stdout + done.stderr
        got = await (
            await pg.execute(f"""SELECT count(*), count(DISTINCT id), sum(id), min(email) FROM "{dst}" """)
        ).fetchone()
        assert got == (200000, 200000, 200000 * 200001 // 2, "U100000@X.IO")
        await pg.execute("DELETE FROM _patchbay_sync_state WHERE flow = %s", (flow_name,))


def test_patchbay_run_syncs_a_batch_flow_and_keeps_its_report_and_quarantined_rows(tmp_path):
    from click.testing import CliRunner

    from patchbay.cli import main

    write_project(tmp_path, {"systems.yaml": SYSTEMS, "flows/orders.yaml": FLOW})
    shop(tmp_path, 120)
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("UPDATE orders SET email = 'nope' WHERE id = 7")
    runner = CliRunner()
    got = runner.invoke(main, ["run", "orders", "-p", str(tmp_path)])
    assert got.exit_code == 0, got.output
    assert "orders: ok: read 120, inserted 119, updated 0, deleted 0, quarantined 1" in got.output
    assert 'quarantined: validate: email: "nope" is not a valid email address' in got.output
    runs = runner.invoke(main, ["runs", "-p", str(tmp_path), "--json"])
    statuses = sorted(r["status"] for r in json.loads(runs.output))
    assert statuses == ["delivered", "quarantined"]
    dead = runner.invoke(main, ["dead", "-p", str(tmp_path)])
    assert "nope" in dead.output
    # A source column the flow reads is dropped: the run stops, exit 1, nothing written, the run listed as failed.
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("ALTER TABLE orders DROP COLUMN total")
    stopped = runner.invoke(main, ["run", "orders", "-p", str(tmp_path)])
    assert stopped.exit_code == 1
    assert "source column(s) total dropped but the flow reads them" in stopped.output
    runs = json.loads(runner.invoke(main, ["runs", "-p", str(tmp_path), "--json"]).output)
    assert [r["status"] for r in runs].count("failed") == 1


def test_a_quarantined_row_is_listed_by_its_key_when_the_map_renames_the_key_column(tmp_path):
    """The key is named after mapping; the quarantined row is the source's, so its key comes through the map."""
    from click.testing import CliRunner

    from patchbay.cli import main

    renamed = FLOW.replace("map: {id: id,", "map: {order_id: id,").replace("key: [id]", "key: [order_id]")
    write_project(tmp_path, {"systems.yaml": SYSTEMS, "flows/orders.yaml": renamed})
    shop(tmp_path, 20)
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("UPDATE orders SET email = 'nope' WHERE id = 7")
    runner = CliRunner()
    got = runner.invoke(main, ["run", "orders", "-p", str(tmp_path)])
    assert got.exit_code == 0, got.output
    runs = json.loads(runner.invoke(main, ["runs", "-p", str(tmp_path), "--json"]).output)
    quarantined = [r for r in runs if r["status"] == "quarantined"]
    assert [r["record_key"] for r in quarantined] == ["7"], quarantined
