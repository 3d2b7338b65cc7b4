"""Response contracts: the shape of a destination's answers, learned from stored answers, pinned in the
flow's contract file under `responses:`, and checked on every 2xx answer by a real hub."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.config.project import load_or_raise
from patchbay.contracts import learn, load_contract, response_drift
from patchbay.engine.hub import Hub
from patchbay.errors import ConfigError
from tests.conftest import Sink, _start, eventually, lead_project, resolver, write_project


def test_response_drift_names_the_answer_and_each_kind_of_drift():
    c = learn("f", [])
    c.responses = {"crm": learn("f", [{"id": "c1", "properties": {"email": "a@b.co"}}])}
    assert response_drift(c, "crm", {"id": "c2", "properties": {"email": "x@y.z"}}) == []
    assert response_drift(c, "crm", {"contactId": 5, "properties": {"email": None}}) == [
        "response of crm: id: missing (the contract says string)",
        "response of crm: properties.email: null where the contract says string",
        "response of crm: contactId: new field (number), not in the contract",
    ]
    assert response_drift(c, "chat", {"anything": 1}) == []  # nothing pinned for chat
    assert response_drift(None, "crm", {}) == []


def test_a_contract_of_responses_only_checks_no_input_and_names_unknown_answers(tmp_path):
    path = write_project(
        tmp_path,
        {
            "c.contract.yaml": """
            responses:
              crm:
                fields: {id: string}
              nowhere:
                fields: {id: text}
            """
        },
    )
    with pytest.raises(ConfigError) as err:
        load_contract(path / "c.contract.yaml", "flows/c.contract.yaml", ["crm", "normalise"])
    text = "\n".join(str(p) for p in err.value.problems)
    assert "flows/c.contract.yaml:4: responses: flow 'c' has no destination or call step 'nowhere'" in text
    (path / "c.contract.yaml").write_text("responses:\n  crm:\n    fields: {id: string}\n")
    c = load_contract(path / "c.contract.yaml", None, ["crm"])
    assert c.check({"whatever": 1}) == []  # the input is not pinned by this file
    assert str(c.responses["crm"].fields["id"]) == "string"
    assert "responses:" in c.dump() and "fields: {}" not in c.dump()


class ShapeShifter:
    """A CRM fake whose answers change shape mid-test, as an upstream API that ships a new version."""

    def __init__(self) -> None:
        self.version = 1
        self.received: list[Any] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        email = body["properties"]["email"]
        if self.version == 1:
            answer: dict[str, Any] = {"id": f"c{len(self.received)}", "properties": {"email": email}}
        else:  # v2: the id is now a number under another name, and the answer is long
            answer = {"contactId": len(self.received), "properties": {"email": email}, "notes": "x" * 900}
        return web.json_response(answer, status=201)


async def _ingest(hub: Hub, lead: dict[str, Any]) -> str:
    accepted, _ = await hub.ingest("lead-capture", orjson.dumps(lead), lead)
    return accepted.event_id


async def test_an_api_that_changes_its_answers_shape_raises_drift_through_a_real_hub(
    tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    crm = ShapeShifter()
    app = web.Application()
    app.router.add_post("/contacts", crm.handle)
    runner, crm_url = await _start(app)
    root = lead_project(tmp_path, crm_url)
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["ops-hook"] = {"kind": "http", "owner": "ops", "url": sink.url, "allow_private_network": True}
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["alerts"] = [{"when": "contract_drift", "notify": ["ops-hook"]}]
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    try:
        # 1. Traffic as usual; then the answers' shape is learned from what the store kept.
        hub = Hub(load_or_raise(root), resolver=resolver())
        await hub.start()
        try:
            ids = [await _ingest(hub, {"email": f"u{i}@example.com", "first_name": "U"}) for i in range(2)]
            store = hub.store
            assert store is not None

            for i in ids:
                await eventually(partial(_status, store, i, "delivered"), what="two deliveries")
        finally:
            await hub.stop()
        res = CliRunner().invoke(main, ["contract", "learn", "lead-capture", "-p", str(root)])
        assert res.exit_code == 0, res.output
        assert "crm's answers: 3 fields from 2 answers" in res.output
        pinned = yaml.safe_load((root / "flows" / "lead-capture.contract.yaml").read_text())
        assert pinned["responses"] == {
            "crm": {
                "new_fields": "report",
                "fields": {"id": "string", "properties": "object", "properties.email": "string"},
            }
        }
        res = CliRunner().invoke(main, ["contract", "check", "lead-capture", "-p", str(root)])
        assert res.exit_code == 0 and "and 2 answers" in res.output, res.output

        # 2. The API ships a new answer shape mid-traffic: the very next 2xx answer shows the drift.
        hub = Hub(load_or_raise(root), resolver=resolver())
        await hub.start()
        try:
            store = hub.store
            assert store is not None
            first = await _ingest(hub, {"email": "same@example.com", "first_name": "S"})
            await eventually(lambda: _status(store, first, "delivered"), what="a conforming delivery")
            assert hub.metrics.answer_drift.labels("lead-capture", "crm")._value.get() == 0
            crm.version = 2
            with caplog.at_level(logging.WARNING):
                drifted = await _ingest(hub, {"email": "new@example.com", "first_name": "N"})
                await eventually(lambda: _status(store, drifted, "delivered"), what="the drifted delivery")
            # The answer is still a success (the lead is in the CRM); its attempt says how it drifted.
            run = await store.get_run(drifted)
            assert run is not None
            [attempt] = run["deliveries"][0]["attempts_log"]
            assert attempt["outcome"] == "success"
            assert attempt["error"] == (
                "DRIFT response of crm: id: missing (the contract says string); "
                "response of crm: contactId: new field (number), not in the contract; "
                "response of crm: notes: new field (string), not in the contract"
            )
            assert hub.metrics.answer_drift.labels("lead-capture", "crm")._value.get() == 1
            assert f"contract drift in the answers of lead-capture/crm, event {drifted}" in caplog.text
            await sink.wait_for(1)
            [alert] = hub.alert_manager.active  # type: ignore[union-attr]
            assert alert.title == "ALERT lead-capture: answers of crm differ from its contract"
            text = sink.received[0].body["text"]
            assert "(in the answers of crm): 1" in text
            assert f"the latest, {drifted}: response of crm: id: missing" in text
            assert "x" * 50 not in text  # values of the answer never reach the alert
        finally:
            await hub.stop()
    finally:
        await runner.cleanup()

    # The CLI shows it too: the run's trace and `contract check` (which reads the stored excerpts; the
    # long v2 answer was cut at 500 characters, so only whole answers are checked there).
    res = CliRunner().invoke(main, ["runs", "show", drifted, "-p", str(root)])
    assert "DRIFT response of crm: id: missing" in res.output, res.output
    res = CliRunner().invoke(main, ["contract", "check", "lead-capture", "-p", str(root)])
    assert res.exit_code == 0, res.output  # the only drifted answer is over 500 chars: not in the store whole

    # After a restart the answers' drift within the window is read back: the alert stays, it does not resolve.
    hub = Hub(load_or_raise(root), resolver=resolver())
    await hub.start()
    try:
        assert hub.alert_manager is not None
        await hub.alert_manager.evaluate()
        assert [f.title for f in hub.alert_manager.active] == [
            "ALERT lead-capture: answers of crm differ from its contract"
        ]
    finally:
        await hub.stop()


async def test_contract_check_reports_stored_answers_that_drift(tmp_path: Path) -> None:
    crm = ShapeShifter()
    app = web.Application()

    async def short(request: web.Request) -> web.Response:
        body = await request.json()
        crm.received.append(body)
        shape: dict[str, Any] = {"id": "c1"} if len(crm.received) == 1 else {"id": 7}
        return web.json_response(shape, status=200)

    app.router.add_post("/contacts", short)
    runner, crm_url = await _start(app)
    root = lead_project(tmp_path, crm_url)
    (root / "flows" / "lead-capture.contract.yaml").write_text(
        "responses:\n  crm:\n    fields: {id: string}\n"
    )
    try:
        hub = Hub(load_or_raise(root), resolver=resolver())
        await hub.start()
        try:
            store = hub.store
            assert store is not None
            a = await _ingest(hub, {"email": "a@example.com"})
            await eventually(lambda: _status(store, a, "delivered"), what="first")
            b = await _ingest(hub, {"email": "b@example.com"})
            await eventually(lambda: _status(store, b, "delivered"), what="second")
        finally:
            await hub.stop()
    finally:
        await runner.cleanup()
    res = CliRunner().invoke(main, ["contract", "check", "lead-capture", "-p", str(root)])
    assert res.exit_code == 1, res.output
    assert f"response of crm: id: number where the contract says string  in 1 event, e.g. {b}" in res.output


async def _status(store: Any, event_id: str, want: str) -> bool:
    run = await store.get_run(event_id)
    return run is not None and run["status"] == want


def test_a_flow_test_whose_simulated_answer_differs_from_the_response_contract_fails(tmp_path):
    root = lead_project(tmp_path, "http://127.0.0.1:9")
    (root / "flows" / "lead-capture.contract.yaml").write_text(
        "responses:\n  crm:\n    fields: {id: string}\n"
    )
    test_file = root / "flows" / "lead-capture.test.yaml"
    test_file.write_text(
        "tests:\n"
        "  - name: the CRM answers with its id\n"
        "    event: {email: a@example.com}\n"
        "    responses: {crm: [503, {status: 201, body: {id: c1}}]}\n"
        "    expect: {deliveries: {crm: {attempts: 2}}}\n"
        "  - name: an answer recorded before the API changed\n"
        "    event: {email: a@example.com}\n"
        "    responses: {crm: [{status: 201, body: {contactId: 5}}]}\n"
        "    expect: {deliveries: {crm: {}}}\n"
    )
    res = CliRunner().invoke(main, ["test", str(root)])
    assert res.exit_code == 1, res.output
    assert "PASS  the CRM answers with its id" in res.output
    assert "crm: the simulated answer differs from the flow's response contract:" in res.output
    assert "response of crm: id: missing (the contract says string)" in res.output
    assert "response of crm: contactId: new field (number), not in the contract" in res.output


async def test_a_call_steps_answer_is_checked_with_one_line(tmp_path: Path) -> None:
    """The hook for `call`/`lookup` steps: `hub.check_answer(flow, step, event, body)` checks, counts and
    alerts like a destination's answer, keyed by the step's name."""
    root = lead_project(tmp_path, "http://127.0.0.1:9")
    (root / "flows" / "lead-capture.contract.yaml").write_text(
        "responses:\n  normalise:\n    fields: {results: array, 'results[]': object, 'results[].id': string}\n"
    )
    hub = Hub(load_or_raise(root), resolver=resolver())
    await hub.start()
    try:
        spec = hub.project.flows["lead-capture"]
        assert hub.check_answer(spec, "normalise", "evt_1", {"results": [{"id": "a"}]}) == []
        assert hub.check_answer(spec, "normalise", "evt_2", {"results": [{"id": 1}]}) == [
            "response of normalise: results[].id: number where the contract says string"
        ]
        assert hub.check_answer(spec, "crm", "evt_3", {"anything": True}) == []  # nothing pinned for crm
        assert hub.metrics.answer_drift.labels("lead-capture", "normalise")._value.get() == 1
    finally:
        await hub.stop()
