"""The API's run answer carries the fields an http destination kept from its answer, redacted."""

from __future__ import annotations

import orjson

from tests.conftest import SECRET_TOKEN, lead_project
from tests.connectors.test_http_response import LEAD, created, delivered


async def test_the_api_run_shows_the_response_fields(tmp_path, sink, api_for):
    sink.default = created
    api = await api_for(
        lead_project(tmp_path, sink.url, dest={"response": {"id": "body.id", "echo": "body.token"}})
    )
    _, got = await api.hub.post("/hooks/lead-capture", LEAD)
    await delivered(api.hub, got["event_id"])
    run = await api.get(f"runs/{got['event_id']}")
    assert run["deliveries"][0]["response"] == {"id": "cnt_42", "echo": "[secret]"}
    assert SECRET_TOKEN not in orjson.dumps(run).decode()
