"""What an attempt leaves behind: its wait (time taken, and the retry that follows) and, for a dead
letter, what the destination answered, in the store, `runs show` and `patchbay dead`."""

from __future__ import annotations

import asyncio
from typing import Any

import yaml
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.cli.trace import render_trace
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, eventually, lead_project

FAST = {"timeout_s": 0.5, "retry": {"schedule": ["100ms"] * 4, "jitter": 0}}


async def _settled(hub: Any, event_id: str, status: str) -> dict[str, Any]:
    async def check() -> bool:
        return (await hub.run(event_id))["status"] == status

    await eventually(check, what=f"run {status}")
    return await hub.run(event_id)


async def test_timeout_and_reset_attempts_record_their_wait(tmp_path, sink, start_hub):
    async def slow(request, rec):
        await asyncio.sleep(1.0)
        return 201

    async def reset(request, rec):
        await asyncio.sleep(0.2)
        request.transport.abort()  # the connection is cut before any answer
        await asyncio.sleep(1.0)
        return 201

    sink.script = [slow, reset, 201]
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    run = await _settled(hub, body["event_id"], "delivered")
    timeout, cut, ok = run["deliveries"][0]["attempts_log"]

    assert timeout["status_code"] is None and timeout["latency_ms"] >= 450
    assert timeout["error"] == "timed out after 0.5s; retry in 0.1s"
    assert cut["status_code"] is None and cut["latency_ms"] >= 150
    assert cut["error"] == "the server closed the connection without answering; retry in 0.1s"
    assert ok["error"] == ""
    text = render_trace(run)
    assert "---  50" in text and "timed out after 0.5s; retry in 0.1s" in text, text
    assert "the server closed the connection without answering; retry in 0.1s" in text


class CutConnector:
    """A connector that lets a connection reset escape as an exception (the engine's safety net)."""

    async def send(self, request: Any, key: str) -> Any:
        await asyncio.sleep(0.2)
        raise ConnectionResetError(104, "Connection reset by peer")

    async def close(self) -> None:
        return None


async def test_an_attempt_whose_connector_raised_records_its_wait(tmp_path, sink, start_hub):
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    hub.hub.flows["lead-capture"].workers["crm"].sink = CutConnector()  # type: ignore[assignment]
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})

    async def tried() -> bool:
        return bool((await hub.run(body["event_id"]))["deliveries"][0]["attempts_log"])

    await eventually(tried, what="an attempt")
    first = (await hub.run(body["event_id"]))["deliveries"][0]["attempts_log"][0]
    assert first["latency_ms"] >= 150, first
    assert "ConnectionResetError" in first["error"] and "retry in 0.1s" in first["error"]


async def test_dead_shows_what_the_destination_answered_bounded_and_redacted(tmp_path, sink, start_hub):
    answer = '{"error": "unknown field properties.lead_source",\n "email": "ada@example.com", "pad": "%s"}'
    sink.default = (400, {}, answer % ("p" * 1000))
    root = lead_project(tmp_path, sink.url, delivery=FAST)
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["sensitive"] = ["email"]
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    await _settled(hub, body["event_id"], "dead")

    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC, "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN}
    res = CliRunner(env=env).invoke(main, ["dead", "-p", str(root)])
    assert res.exit_code == 0, res.output
    [line] = [ln for ln in res.output.splitlines() if body["event_id"] in ln]
    assert 'HTTP 400  response: {"error": "unknown field properties.lead_source", "email":' in line
    assert "ada@example.com" not in line  # a sensitive field the destination echoed
    response = line.split("response: ", 1)[1]
    assert len(response) == 200

    res = CliRunner(env=env).invoke(main, ["dead", "-p", str(root), "--json"])
    assert '"response": "{\\"error\\": \\"unknown field' in res.output
    assert "ada@example.com" not in res.output
