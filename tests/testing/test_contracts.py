"""Input contracts: learned from traffic, pinned beside the flow, checked on every event and source run."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import yaml
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.config.project import load_or_raise
from patchbay.contracts import learn
from patchbay.engine.hub import Hub
from patchbay.engine.sources import poll_once
from patchbay.store.queries import get_run
from tests.conftest import eventually, resolver, write_project


def test_learn_then_check_names_each_kind_of_drift():
    c = learn(
        "f",
        [
            {"email": "a@b.co", "age": 3, "items": [{"sku": "x"}], "address": {"city": "Oslo"}},
            {"email": "c@d.co", "age": None, "items": [], "address": {}},
        ],
    )
    assert {p: str(r) for p, r in c.fields.items()} == {
        "address": "object",
        "address.city": "string?",
        "age": "number|null",
        "email": "string",
        "items": "array",
        "items[]": "object",
        "items[].sku": "string",
    }
    drift = c.check({"email": 5, "items": [{"qty": 1}], "address": {"city": "x"}, "coupon": {"code": "A"}})
    assert [str(d) for d in drift] == [
        "age: missing (the contract says number|null)",
        "email: number where the contract says string",
        "items[].sku: missing (the contract says string)",
        "items[].qty: new field (number), not in the contract",
        "coupon: new field (object), not in the contract",  # its own fields are not listed again
    ]
    assert c.check({"email": "e@f.co", "age": 1, "items": [], "address": {}}) == []


def _source_project(root: Path, alert_url: str = "http://127.0.0.1:9") -> Path:
    db = root / "data" / "shop.db"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY, email TEXT, total REAL)")
        conn.executemany("INSERT INTO orders VALUES(?,?,?)", [(1, "a@b.co", 9.5), (2, "c@d.co", 12.0)])
    conn.close()
    return write_project(
        root,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": """
            shop_db: {kind: sqlite, owner: shop, path: data/shop.db}
            files: {kind: files, owner: ops, folder: out}
            ops-hook: {kind: http, owner: ops, url: "ALERT_URL", allow_private_network: true}
            """.replace("ALERT_URL", alert_url),
            "flows/orders.yaml": """
            purpose: orders reach the export folder
            owner: ops
            trigger:
              schedule: {every: 24h, catch_up: skip}
              source: {system: shop_db, table: orders, cursor_column: id}
            destinations:
              - {name: export, system: files, file: orders.jsonl}
            alerts:
              - {when: contract_drift, notify: [ops-hook]}
            """,
        },
    )


async def _poll(root: Path, events: int) -> tuple[Hub, list[str]]:
    """Start a hub and poll; returns once `events` events are stored: the schedule's first tick at the start
    polls too, and may be the one that takes the records while this poll finds none."""
    hub = Hub(load_or_raise(root), resolver=resolver())
    await hub.start()
    fr = hub.flows["orders"]
    await poll_once(hub, fr, fr.source)
    store = hub.store
    assert store is not None
    ids: list[str] = []

    async def stored() -> bool:
        ids[:] = await store.read(lambda c: [r[0] for r in c.execute("SELECT id FROM events ORDER BY id")])
        return len(ids) >= events

    await eventually(stored, what=f"{events} events stored")
    return hub, ids


async def test_a_source_that_drops_a_field_raises_a_drift_alert_in_the_next_run(tmp_path, caplog, sink):
    root = _source_project(tmp_path, sink.url)
    (root / "out").mkdir()
    hub, ids = await _poll(root, 2)
    assert hub.alert_manager is not None
    assert await hub.alert_manager.evaluate() == []  # no contract yet: nothing to drift from
    await hub.stop()
    assert len(ids) == 2

    res = CliRunner().invoke(main, ["contract", "learn", "orders", "-p", str(root)])
    assert res.exit_code == 0, res.output
    pinned = yaml.safe_load((root / "flows" / "orders.contract.yaml").read_text())
    assert pinned["fields"] == {"email": "string", "id": "number", "total": "number"}
    res = CliRunner().invoke(main, ["check", str(root)])  # the contract is not read as a flow
    assert res.exit_code == 0 and "1 flow" in res.output, res.output
    res = CliRunner().invoke(main, ["contract", "check", "orders", "-p", str(root)])
    assert res.exit_code == 0, res.output

    # Upstream drops `total` (and adds `currency`): the very next poll shows it.
    with sqlite3.connect(root / "data" / "shop.db") as conn:
        conn.execute("ALTER TABLE orders DROP COLUMN total")
        conn.execute("ALTER TABLE orders ADD COLUMN currency TEXT")
        conn.execute("INSERT INTO orders(id, email, currency) VALUES(3, 'e@f.co', 'EUR')")
    conn.close()
    hub, ids = await _poll(root, 3)
    try:
        run = await hub.store.read(get_run, ids[-1])  # type: ignore[union-attr]
        assert run is not None and run["status"] in ("pending", "delivered")
        [entry] = [s for s in run["trace"] if s["kind"] == "contract"]
        assert entry["drift"] == [
            "total: missing (the contract says number)",
            "currency: new field (string), not in the contract",
        ]
        # Counted once the event's accept is answered (after its fsync; a reader may see it before).
        await eventually(lambda: hub.metrics.drift.labels("orders")._value.get() == 1, what="drift counted")
        assert f"contract drift in orders, event {ids[-1]}: total: missing" in caplog.text
        # The drifted event wakes the alert loop: the alert goes out without waiting for its next tick.
        await sink.wait_for(1)  # delivered to the notify system like any alert
        assert hub.alert_manager is not None
        [alert] = hub.alert_manager.active
        assert alert.title == "ALERT orders: input differs from its contract"
        text = sink.received[0].body["text"]
        assert "Events of flow orders in the last 10m 00s that differ from" in text
        assert f"the latest, {ids[-1]}: total: missing (the contract says number)" in text
    finally:
        await hub.stop()

    res = CliRunner().invoke(main, ["contract", "check", "orders", "-p", str(root)])
    assert res.exit_code == 1, res.output
    assert f"total: missing (the contract says number)  in 1 event, e.g. {ids[-1]}" in res.output
    res = CliRunner().invoke(main, ["runs", "show", ids[-1], "-p", str(root)])
    assert "DRIFT from the flow's input contract:" in res.output

    # After a restart the drift within the window is read back: the alert stays, it does not resolve.
    hub = Hub(load_or_raise(root), resolver=resolver())
    await hub.start()
    try:
        assert hub.alert_manager is not None
        await hub.alert_manager.evaluate()
        assert [f.title for f in hub.alert_manager.active] == [
            "ALERT orders: input differs from its contract"
        ]
    finally:
        await hub.stop()


def test_a_bad_contract_is_a_check_problem_with_its_line(tmp_path):
    root = _source_project(tmp_path)
    (root / "flows" / "orders.contract.yaml").write_text("fields:\n  id: number\n  email: text\n")
    res = CliRunner().invoke(main, ["check", str(root)])
    assert res.exit_code == 2
    assert "orders.contract.yaml:3: email: write types from string, number" in res.output


def test_a_flow_test_sees_drift_in_the_dry_run(tmp_path):
    root = _source_project(tmp_path)
    (root / "flows" / "orders.contract.yaml").write_text("fields:\n  id: number\n  total: number\n")
    res = CliRunner().invoke(main, ["run", "orders", "-p", str(root), "--dry-run", "-d", '{"id": 1}'])
    assert res.exit_code == 0, res.output
    assert "DRIFT: total: missing (the contract says number)" in res.output


async def test_learning_from_encrypted_events_sees_the_types_the_sender_sent(tmp_path):
    import orjson

    from patchbay.security.project import open_project_secrets
    from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, lead_project

    root = lead_project(tmp_path, "http://127.0.0.1:9", hub={"encrypt_sensitive": True})
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["sensitive"] = ["salary"]
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    vault, secrets = open_project_secrets(root, create_key=True)
    assert vault is not None
    vault.set("website_whsec", SECRET_WHSEC)
    vault.set("crm_token", SECRET_TOKEN)
    hub = Hub(load_or_raise(root), resolver=secrets)
    await hub.start()
    try:
        for lead in ({"email": "a@b.co", "salary": 52000}, {"email": "c@d.co", "salary": 61000}):
            await hub.ingest("lead-capture", orjson.dumps(lead), lead)
        assert hub.store is not None
        stored = await hub.store.read(lambda c: c.execute("SELECT payload FROM events").fetchone()[0])
        assert b"pb-sealed" in stored and b"52000" not in stored  # the salary is stored encrypted
    finally:
        await hub.stop()
    res = CliRunner().invoke(main, ["contract", "learn", "lead-capture", "-p", str(root)])
    assert res.exit_code == 0, res.output
    pinned = yaml.safe_load((root / "flows" / "lead-capture.contract.yaml").read_text())
    assert pinned["fields"] == {"email": "string", "salary": "number"}
