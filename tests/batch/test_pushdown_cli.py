"""`patchbay run FLOW --explain`: which steps the source's SELECT computes, and why the others run in Python."""

from __future__ import annotations

import asyncio
import json
import sqlite3

from click.testing import CliRunner

from patchbay.cli import main
from tests.conftest import write_project
from tests.connectors.bulk_harness import HOST, PORT, database, name

FLOW = """
purpose: Customers copied into the reporting file.
owner: data
trigger: {{manual: true}}
steps:
  - map: {{id: id, email: lower(trim(email)), digest: hash_sha256(email), tier: attrs.tier}}
  - validate: {{email: {{required: true, format: email}}, digest: {{required: true}}}}
batch:
  from: {{system: {src_system}, table: {table}}}
  to: {{system: report, table: customers}}
  mode: full
"""
SYSTEMS = f"""
crm:
  kind: postgres
  owner: data
  host: {HOST}
  port: {PORT}
  database: test
  user: postgres
  allow_private_network: true
shop: {{kind: sqlite, owner: ops, path: shop.db}}
report: {{kind: sqlite, owner: data, path: report.db}}
"""


async def test_explain_lists_pushed_and_python_steps(tmp_path):
    async with database() as pg:
        table = name(pg, "pd_explain")
        await pg.execute(f'CREATE TABLE "{table}" (id bigint PRIMARY KEY, email text, attrs jsonb)')
        write_project(
            tmp_path, {"systems.yaml": SYSTEMS, "flows/copy.yaml": FLOW.format(src_system="crm", table=table)}
        )
        sqlite3.connect(tmp_path / "report.db").close()
        got = await asyncio.to_thread(
            CliRunner().invoke, main, ["run", "copy", "-p", str(tmp_path), "--explain"]
        )
        assert got.exit_code == 0, got.output
        assert "map email: pushed down (guarded: other rows take the Python path)" in got.output
        assert "map digest: Python (hash_sha256() has no exact SQL form here)" in got.output
        assert "validate email: pushed down" in got.output
        assert "validate digest: Python (its value is computed in Python)" in got.output
        args = ["run", "copy", "-p", str(tmp_path), "--explain", "--json"]
        as_json = await asyncio.to_thread(CliRunner().invoke, main, args)
        assert json.loads(as_json.output)["pushdown"][0].startswith("map email: pushed down")
        # Nothing was written: --explain only reads the source's columns.
        with sqlite3.connect(tmp_path / "report.db") as c:
            assert c.execute("SELECT count(*) FROM sqlite_master WHERE name = 'customers'").fetchone() == (0,)


def test_explain_says_when_the_source_cannot_push_down(tmp_path):
    write_project(
        tmp_path, {"systems.yaml": SYSTEMS, "flows/copy.yaml": FLOW.format(src_system="shop", table="c")}
    )
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, email TEXT, attrs JSON)")
    sqlite3.connect(tmp_path / "report.db").close()
    got = CliRunner().invoke(main, ["run", "copy", "-p", str(tmp_path), "--explain"])
    assert got.exit_code == 0, got.output
    assert "the source cannot compute steps in its SELECT; every step runs in Python" in got.output
