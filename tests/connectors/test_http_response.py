"""http destination answers: the body is kept (bounded, redacted) in the trace, and `response:` fields
(the created id) are stored with the delivery, readable through the store and shown in the run."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from patchbay.cli.trace import render_trace
from patchbay.config.project import load_or_raise
from patchbay.connectors.http import HttpSinkConfig
from patchbay.errors import PatchbayError
from tests.conftest import SECRET_TOKEN, eventually, lead_project

LEAD = {"email": "ada@example.com", "first_name": "Ada"}
MAPPING = {
    "id": "body.id",
    "owner": "body.owner.name",
    "location": "headers.location",
    "status": "status",
    "missing": "body.nope",
    "echo": "body.token",
}


def created(request: web.Request, rec) -> web.Response:
    body = {
        "id": "cnt_42",
        "owner": {"name": "Grace"},
        "token": SECRET_TOKEN,  # a remote that echoes our credential: never stored in clear
        "pad": "x" * 9000,  # past the 4 KiB the answer was read to before, with the id first
    }
    return web.Response(
        status=201,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Location": "/contacts/cnt_42"},
    )


async def delivered(hub, event_id: str) -> dict:
    async def done() -> bool:
        return (await hub.run(event_id))["status"] == "delivered"

    await eventually(done, what="delivery")
    return await hub.run(event_id)


async def test_response_fields_are_stored_and_shown_in_the_trace(tmp_path, sink, start_hub):
    sink.default = created
    hub = await start_hub(lead_project(tmp_path, sink.url, dest={"response": MAPPING}))
    status, got = await hub.post("/hooks/lead-capture", LEAD)
    assert status == 202, got
    run = await delivered(hub, got["event_id"])
    want = {
        "id": "cnt_42",
        "owner": "Grace",
        "location": "/contacts/cnt_42",
        "status": 201,
        "missing": None,
        "echo": "[secret]",
    }
    assert run["deliveries"][0]["response"] == want
    assert await hub.store.response_fields(got["event_id"], "crm") == want
    assert await hub.store.response_fields(got["event_id"], "other") is None
    # The answer's body is in the trace too: an excerpt, bounded, with the echoed secret redacted.
    [attempt] = run["deliveries"][0]["attempts_log"]
    assert attempt["excerpt"].startswith('{"id":"cnt_42"') and "more chars" in attempt["excerpt"]
    assert len(attempt["excerpt"]) < 600 and SECRET_TOKEN not in attempt["excerpt"]
    text = render_trace(run)
    assert 'response fields: {"id": "cnt_42"' in text
    assert 'response: {"id":"cnt_42"' in text
    assert SECRET_TOKEN not in text


async def test_a_failed_answer_maps_no_fields(tmp_path, sink, start_hub):
    sink.default = (422, {}, '{"id": "not-created", "error": "invalid"}')
    hub = await start_hub(lead_project(tmp_path, sink.url, dest={"response": {"id": "body.id"}}))
    status, got = await hub.post("/hooks/lead-capture", LEAD)
    assert status == 202

    async def dead() -> bool:
        return (await hub.run(got["event_id"]))["status"] == "dead"

    await eventually(dead, what="dead letter")
    run = await hub.run(got["event_id"])
    assert run["deliveries"][0]["response"] is None
    assert await hub.store.response_fields(got["event_id"], "crm") is None
    assert "not-created" in run["deliveries"][0]["attempts_log"][0]["excerpt"]


async def test_a_body_that_is_not_json_gives_null_fields(tmp_path, sink, start_hub):
    sink.default = (200, {"Location": "/c/7"}, "created: 7")
    hub = await start_hub(
        lead_project(tmp_path, sink.url, dest={"response": {"id": "body.id", "where": "headers.location"}})
    )
    _, got = await hub.post("/hooks/lead-capture", LEAD)
    run = await delivered(hub, got["event_id"])
    assert run["deliveries"][0]["response"] == {"id": None, "where": "/c/7"}


@pytest.mark.parametrize("path", ["id", "json.id", "status.code", "header.location", ""])
def test_a_bad_response_path_is_a_config_error(path):
    with pytest.raises(ValueError, match="start it with body"):
        HttpSinkConfig.model_validate({"response": {"id": path}})


def test_check_reports_a_bad_response_path_with_its_line(tmp_path):
    lead_project(tmp_path, "http://127.0.0.1:9", dest={"response": {"id": "bdy.id"}})
    with pytest.raises(PatchbayError) as exc:
        load_or_raise(tmp_path)
    assert "lead-capture.yaml" in str(exc.value) and "bdy.id" in str(exc.value)


async def test_a_2xx_whose_body_stalls_is_still_a_success():
    """The status decides the class: a created record whose answer never finishes is not re-sent."""
    import asyncio

    from patchbay.config.models import DeliveryPolicy
    from patchbay.connectors.base import OutcomeClass, Resources
    from patchbay.connectors.http import HttpSink, HttpSystem
    from tests.conftest import _start

    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=201, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"id": "cnt_4')
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_post("/stall", stall)
    runner, url = await _start(app)
    s = HttpSink(
        HttpSystem(url=url),
        HttpSinkConfig.model_validate({"path": "/stall", "response": {"id": "body.id", "status": "status"}}),
        DeliveryPolicy.model_validate({"timeout_s": 0.5}),
        Resources(allow_private=True),
    )
    try:
        out = await s.send(s.render({"a": 1}, "k"), "k")
        assert out.cls is OutcomeClass.SUCCESS, out
        assert out.fields == {"id": None, "status": 201}
        assert out.excerpt == '{"id": "cnt_4'
    finally:
        release.set()
        assert s.resources.http is not None
        await s.resources.http.close()
        await runner.cleanup()
