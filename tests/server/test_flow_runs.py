"""POST /flows/{flow}/runs: a `manual: true` event flow runs the given event; a batch flow starts a sync whose
quarantined rows are refused by replay with what to do instead; wrong requests change nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import yaml

from tests.conftest import eventually, lead_project, write_project
from tests.server.conftest import FAST, lead

BATCH_FLOW = """
purpose: Orders copied into reporting.
owner: data
trigger: {manual: true}
steps:
  - map: {id: id, email: lower(trim(email)), updated_at: updated_at}
  - validate: {email: {required: true, format: email}}
batch:
  from: {system: shop, table: orders}
  to: {system: report, table: orders}
  mode: merge
  key: [id]
  cursor: {column: updated_at}
"""


def manual_lead_project(root: Path, sink_url: str) -> Path:
    lead_project(root, sink_url, delivery=FAST)
    path = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(path.read_text())
    flow["trigger"]["manual"] = True
    path.write_text(yaml.safe_dump(flow, sort_keys=False))
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["shop"] = {"kind": "sqlite", "owner": "ops", "path": "shop.db"}
    systems["report"] = {"kind": "sqlite", "owner": "data", "path": "report.db"}
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    write_project(root, {"flows/orders.yaml": BATCH_FLOW})
    with sqlite3.connect(root / "shop.db") as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, updated_at TEXT)")
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, '2024-01-01')", [(i, f"u{i}@shop.io") for i in range(1, 51)]
        )
        c.execute("UPDATE orders SET email = 'nope' WHERE id = 7")
    sqlite3.connect(root / "report.db").close()
    return root


async def test_a_manual_event_flow_runs_the_given_event_through_the_api(tmp_path, sink, api_for):
    api = await api_for(manual_lead_project(tmp_path, sink.url))
    await api.token("starter", "runs:start", "runs:read")
    status, run = await api.call("POST", "flows/lead-capture/runs", token="starter", json={"data": lead(1)})
    assert status == 202, run
    assert (run["kind"], run["trigger"], run["phase"], run["progress"]) == ("event", "api", None, None)
    await sink.wait_for(1)
    assert sink.received[0].body["properties"]["email"] == "lead-1@example.com"

    async def delivered() -> bool:
        view = await api.get(f"flows/lead-capture/runs/{run['run_id']}", token="starter")
        return bool(view["status"] == "delivered")

    await eventually(delivered, what="the manual event delivered")
    entries = (await api.get("audit", params={"action": "run"}))["entries"]
    assert entries[0]["target"] == "lead-capture" and entries[0]["detail"]["run_id"] == run["run_id"]


async def test_wrong_run_requests_are_refused_and_change_nothing(tmp_path, sink, api_for):
    root = manual_lead_project(tmp_path, sink.url)
    flow = yaml.safe_load((root / "flows" / "lead-capture.yaml").read_text())
    flow["trigger"].pop("manual")
    (root / "flows" / "lead-capture.yaml").write_text(yaml.safe_dump(flow, sort_keys=False))
    api = await api_for(root)
    status, err = await api.call("POST", "flows/lead-capture/runs", json={"data": lead(1)})
    assert (status, err["error"]) == (409, "no_manual_trigger") and "manual: true" in err["message"]
    status, err = await api.call("POST", "flows/orders/runs", json={"data": {"id": 1}})
    assert (status, err["error"]) == (422, "invalid_request") and "batch flow" in err["message"]
    status, err = await api.call("POST", "flows/orders/runs", json={"rows": 1})
    assert (status, err["error"]) == (422, "invalid_request")
    status, err = await api.call("POST", "flows/nope/runs", json={})
    assert status == 404
    status, err = await api.call("GET", "flows/orders/runs/run_nope")
    assert (status, err["error"]) == (404, "not_found")
    status, err = await api.call("POST", "flows/orders/runs", token="reader", json={})
    assert (status, err["scope"]) == (403, "runs:start")
    assert await api.hub.count() == 0 and not sink.received


async def test_a_quarantined_batch_row_is_not_replayed_and_says_what_to_do(tmp_path, sink, api_for):
    api = await api_for(manual_lead_project(tmp_path, sink.url))
    status, run = await api.call("POST", "flows/orders/runs", json={})
    assert status == 202

    async def done() -> bool:
        view = await api.get(f"flows/orders/runs/{run['run_id']}")
        return bool(view["status"] == "ok")

    await eventually(done, what="the batch run")
    dead = await api.get("dead-letters", params={"flow": "orders"})
    assert dead["total"] == 1, dead
    row_id = dead["items"][0]["event_id"]
    out = await api.post("dead-letters/replay", {"run_ids": [row_id]}, token="admin")
    assert out["requeued"] == [] and len(out["skipped"]) == 1
    why = out["skipped"][0]["reason"]
    assert "batch flow orders quarantined is not replayed" in why
    assert "a change that moves its updated_at is read by the next run" in why
    # Fixed at the source, the next run writes it.
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("UPDATE orders SET email = 'seven@shop.io', updated_at = '2024-02-01' WHERE id = 7")
    status, run = await api.call("POST", "flows/orders/runs", json={})
    await eventually(done, what="the second batch run")
    with sqlite3.connect(tmp_path / "report.db") as c:
        assert c.execute("SELECT email FROM orders WHERE id = 7").fetchone() == ("seven@shop.io",)


async def test_run_remote_sends_one_event_of_a_manual_flow_to_the_running_hub(tmp_path, sink, api_for):
    import asyncio
    import json

    from click.testing import CliRunner

    from patchbay.cli import main

    root = manual_lead_project(tmp_path, sink.url)
    api = await api_for(root)
    await api.token("runner", "runs:start", "runs:read")
    args = [
        "run",
        "lead-capture",
        "--remote",
        "--url",
        api.hub.url,
        "-p",
        str(root),
        "-d",
        json.dumps(lead(5)),
    ]
    env = {"PATCHBAY_TOKEN": api.tokens["runner"]}
    got = await asyncio.to_thread(CliRunner().invoke, main, args, env=env)
    assert got.exit_code == 0, got.output
    assert got.output.startswith("lead-capture: event evt_") and "stored (" in got.output
    await sink.wait_for(1)
    assert sink.received[-1].body["properties"]["email"] == "lead-5@example.com"
    # Without a token it says how to make one, and nothing is sent.
    got = await asyncio.to_thread(CliRunner().invoke, main, args, env={"PATCHBAY_TOKEN": ""})
    assert got.exit_code == 2 and "tokens create runner --scope runs:start" in got.output
