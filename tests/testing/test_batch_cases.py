"""Batch flows in `patchbay test`: a case gives rows of the source table and expects the rows written,
the quarantined ones with their reasons and the filtered count; they run through the transform a real
run uses. The nightly-orders-export template: its tests, its real run, and its drift stop."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.config.project import load_or_raise
from patchbay.scaffold import create_project
from patchbay.testing.harness import simulate_batch
from tests.conftest import write_project

FLOW = """
purpose: Orders into the reporting table.
owner: data
trigger: {manual: true}
steps:
  - map:
      order_id: id
      total: "divide(total_cents, `100`)"
batch:
  from: {system: shop, table: orders}
  to: {system: report, table: orders}
  mode: merge
  key: [order_id]
"""
SYSTEMS = """
shop: {kind: sqlite, owner: ops, path: shop.db}
report: {kind: sqlite, owner: data, path: report.db}
"""


def test_a_computed_column_of_whole_and_fractional_numbers_is_written_as_float(tmp_path):
    # divide() gives 42 for 4200 cents and 19.99 for 1999: the column is a float column, not an int
    # one that refuses the second row.
    write_project(tmp_path, {"systems.yaml": SYSTEMS, "flows/orders.yaml": FLOW})
    flow = load_or_raise(tmp_path).flows["orders"]
    run = simulate_batch(flow, [{"id": 1, "total_cents": 4200}, {"id": 2, "total_cents": 1999}])
    assert run.rows == [{"order_id": 1, "total": 42.0}, {"order_id": 2, "total": 19.99}]
    assert isinstance(run.rows[0]["total"], float)


def _template(tmp_path: Path) -> Path:
    root = tmp_path / "nightly"
    create_project(root, template="nightly-orders-export")
    return root


def _reporting(root: Path) -> list[dict[str, object]]:
    with sqlite3.connect(root / "data" / "reporting.db") as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM orders_daily ORDER BY order_id")]
    conn.close()
    return rows


def test_the_templates_tests_expect_what_its_real_run_writes(tmp_path):
    """Each test case's rows, put in a real shop database and synced by `patchbay run`, give exactly the
    rows the case expects in the reporting table, and the quarantined rows with the expected reasons."""
    root = _template(tmp_path)
    cases = yaml.safe_load((root / "flows" / "nightly-orders-export.test.yaml").read_text())["tests"]
    schema = (root / "data" / "shop.sql").read_text().split("INSERT INTO")[0]
    for i, case in enumerate(cases):
        shop, reporting = root / "data" / "shop.db", root / "data" / "reporting.db"
        shop.unlink()
        reporting.unlink()
        sqlite3.connect(reporting).close()
        with sqlite3.connect(shop) as conn:
            conn.executescript(schema)
            cols = list(case["rows"][0])
            conn.executemany(
                f"INSERT INTO orders({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [[r[c] for c in cols] for r in case["rows"]],
            )
        conn.close()
        res = CliRunner().invoke(main, ["run", "nightly-orders-export", "-p", str(root)])
        assert res.exit_code == 0, (case["name"], res.output)
        want = sorted(case["expect"]["rows"], key=lambda r: r["order_id"])
        assert _reporting(root) == want, case["name"]
        for q in case["expect"].get("quarantined", []):
            assert f"quarantined: validate: {q['reason']}" in res.output, (case["name"], res.output)
        if "filtered" in case["expect"]:
            assert f"filtered {case['expect']['filtered']}" in res.output, (case["name"], res.output)
        assert i < len(cases)


def test_a_mapping_change_fails_the_batch_test_with_a_readable_diff(tmp_path):
    root = _template(tmp_path)
    flow_file = root / "flows" / "nightly-orders-export.yaml"
    flow_file.write_text(flow_file.read_text().replace("lower(trim(email))", "trim(email)"))
    res = CliRunner().invoke(main, ["test", str(root)])
    assert res.exit_code == 1, res.output
    assert "FAIL  an order becomes a row in euros, its email cleaned" in res.output
    assert 'rows.0.customer_email: expected "ada@example.com", got "Ada@Example.com"' in res.output
    assert '-    "customer_email": "ada@example.com",' in res.output
    assert '+    "customer_email": "Ada@Example.com",' in res.output
    assert '"total"' not in res.output  # only what differs is marked; the diff shows the row around it
    assert "PASS  a refunded order keeps its status" in res.output


def test_batch_and_event_tests_each_need_their_own_input(tmp_path):
    root = _template(tmp_path)
    test_file = root / "flows" / "nightly-orders-export.test.yaml"
    test_file.write_text(
        "tests:\n"
        "  - name: an event\n"
        "    event: {id: 1}\n"
        "    expect: {filtered: true}\n"
        "  - name: bad type\n"
        "    rows: [{id: 1}]\n"
        "    columns: {id: integer}\n"
        "    expect: {rows: []}\n"
    )
    res = CliRunner().invoke(main, ["test", str(root)])
    assert res.exit_code == 2, res.output
    assert (
        "nightly-orders-export.test.yaml:2: flow 'nightly-orders-export' is a batch flow: give" in res.output
    )
    assert "nightly-orders-export.test.yaml:7: id: unknown column type 'integer'; use one of text, int" in (
        res.output
    )
    test_file.write_text(
        "tests:\n  - name: no rows expected\n    rows: [{id: 1}]\n    expect: {filtered: 1}\n"
    )
    res = CliRunner().invoke(main, ["test", str(root)])
    assert res.exit_code == 2, res.output
    assert "nightly-orders-export.test.yaml:4: " in res.output
    assert "is for a batch flow's test: expect `rows:` too (the rows written; [] for none)" in res.output


def test_an_event_flow_test_cannot_give_rows(tmp_path):
    root = tmp_path / "pay"
    create_project(root, template="payment-reporting")
    (root / "flows" / "payment-to-reporting.test.yaml").write_text(
        "tests:\n  - name: rows\n    rows: [{id: 1}]\n    expect: {rows: []}\n"
    )
    res = CliRunner().invoke(main, ["test", str(root)])
    assert res.exit_code == 2, res.output
    assert (
        "payment-to-reporting.test.yaml:2: flow 'payment-to-reporting' is an event flow: give an `event:`"
        in (res.output)
    )


def test_the_shop_dropping_a_column_stops_the_next_nightly_run_and_writes_nothing(tmp_path):
    """The batch half of "a source that drops a field is reported within one run": the run after the
    change stops before writing, names the column, and is recorded as a failed run of the flow."""
    root = _template(tmp_path)
    res = CliRunner().invoke(main, ["run", "nightly-orders-export", "-p", str(root)])
    assert res.exit_code == 0, res.output
    before = _reporting(root)
    assert len(before) == 3
    with sqlite3.connect(root / "data" / "shop.db") as conn:
        conn.execute("ALTER TABLE orders DROP COLUMN currency")
        conn.execute("UPDATE orders SET updated_at = '2026-01-02T00:00:00Z' WHERE id = 1001")
    conn.close()
    res = CliRunner().invoke(main, ["run", "nightly-orders-export", "-p", str(root)])
    assert res.exit_code != 0, res.output
    assert "source column(s) currency dropped but the flow reads them; nothing was written" in res.output
    assert _reporting(root) == before
    res = CliRunner().invoke(main, ["runs", "-p", str(root), "--flow", "nightly-orders-export"])
    assert "failed" in res.output, res.output
    assert pytest is not None


async def test_a_dropped_source_column_raises_the_contract_drift_alert(tmp_path, sink):
    """The run that meets the change stops, and its run (kept in the store) carries the drift: the hub's
    `contract_drift` rule alerts on it, naming the column, as it does for an event flow's input."""
    from patchbay.engine.hub import Hub
    from tests.conftest import resolver

    root = _template(tmp_path)
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["ops-hook"] = {"kind": "http", "owner": "ops", "url": sink.url, "allow_private_network": True}
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    flow_file = root / "flows" / "nightly-orders-export.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["alerts"] = [{"when": "contract_drift", "notify": ["ops-hook"], "window": "24h"}]
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))

    def run() -> Any:  # the CLI runs its own event loop: off this test's
        return asyncio.to_thread(CliRunner().invoke, main, ["run", "nightly-orders-export", "-p", str(root)])

    assert (await run()).exit_code == 0
    with sqlite3.connect(root / "data" / "shop.db") as conn:
        conn.execute("ALTER TABLE orders DROP COLUMN currency")
    conn.close()
    res = await run()
    assert res.exit_code != 0, res.output
    hub = Hub(load_or_raise(root), resolver=resolver())
    await hub.start()
    try:
        assert hub.alert_manager is not None
        await hub.alert_manager.evaluate()
        await sink.wait_for(1)
        [alert] = hub.alert_manager.active
        assert alert.title == "ALERT nightly-orders-export: the source's columns changed"
        text = sink.received[0].body["text"]
        assert "that met changed source columns: 1; the latest, run_" in text, text
        assert "column currency dropped" in text, text
        assert "`patchbay run nightly-orders-export --accept-schema`" in text
    finally:
        await hub.stop()


def test_a_batch_flows_dry_run_shows_the_row_it_would_write(tmp_path):
    root = _template(tmp_path)
    row = '{"id": 7, "email": " Bo@Example.com", "status": "paid", "total_cents": 250, "currency": "sek"}'
    res = CliRunner().invoke(main, ["run", "nightly-orders-export", "-p", str(root), "--dry-run", "-d", row])
    assert res.exit_code == 0, res.output
    assert "would write to reporting.orders_daily: " in res.output
    assert '"customer_email": "bo@example.com"' in res.output and '"total": 2.5' in res.output
    bad = '{"id": 8, "email": "nope", "status": "paid", "total_cents": 1, "currency": "sek"}'
    res = CliRunner().invoke(main, ["run", "nightly-orders-export", "-p", str(root), "--dry-run", "-d", bad])
    assert 'result: quarantined: validate: customer_email: "nope" is not a valid email address' in res.output
    assert not (root / "data" / "reporting.db").stat().st_size  # nothing was written


def test_contracts_are_not_learned_from_a_batch_flows_run_reports(tmp_path):
    root = _template(tmp_path)
    assert CliRunner().invoke(main, ["run", "nightly-orders-export", "-p", str(root)]).exit_code == 0
    for cmd in ("learn", "check"):
        res = CliRunner().invoke(main, ["contract", cmd, "nightly-orders-export", "-p", str(root)])
        assert res.exit_code == 2, res.output
        assert "nightly-orders-export is a batch flow: its source's shape is its columns" in res.output
    assert not (root / "flows" / "nightly-orders-export.contract.yaml").exists()


def test_a_quarantined_row_of_a_real_run_becomes_a_passing_batch_test(tmp_path):
    root = _template(tmp_path)
    res = CliRunner().invoke(main, ["run", "nightly-orders-export", "-p", str(root)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["dead", "-p", str(root), "--json"])
    [row] = [r for r in json.loads(res.output) if r.get("kind", "quarantine") == "quarantine"]
    run_id = row.get("run") or row.get("event_id") or row.get("id")
    res = CliRunner().invoke(main, ["runs", "export", run_id, "-p", str(root), "--as-test"])
    assert res.exit_code == 0, res.output
    tests = yaml.safe_load((root / "flows" / "nightly-orders-export.test.yaml").read_text())["tests"]
    exported = tests[-1]
    assert exported["rows"][0] == {
        "id": 1004,
        "email": "not-an-email",
        "status": "paid",
        "total_cents": 500,
        "currency": "eur",
        "created_at": "2026-01-01T12:45:00Z",
        "updated_at": "2026-01-01T12:45:00Z",
    }
    assert exported["expect"]["rows"] == []
    assert exported["expect"]["quarantined"][0].startswith("validate: customer_email:")
    res = CliRunner().invoke(main, ["test", str(root)])
    assert res.exit_code == 0 and "4 passed, 0 failed" in res.output, res.output
    runs = json.loads(CliRunner().invoke(main, ["runs", "-p", str(root), "--json"]).output)
    [report] = [r["id"] for r in runs if r["status"] == "delivered"]
    res = CliRunner().invoke(main, ["runs", "export", report, "-p", str(root), "--as-test"])
    assert res.exit_code != 0
    assert "is a run of batch flow nightly-orders-export (its report), not a row" in res.output
