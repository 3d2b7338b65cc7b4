"""The hub's HTTP surface outside the API's handlers: unknown paths, unparsable requests, the error shape."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.server.app import make_app, make_runner
from tests.conftest import SECRET_TOKEN, lead_project, resolver


async def test_unknown_paths_and_methods_answer_the_json_error_shape(start_hub, sink, tmp_path):
    hub = await start_hub(lead_project(tmp_path, sink.url))
    cases = [
        ("GET", "/nothing-here", 404, "not_found"),
        ("GET", "/hooks/no-such-flow", 404, "not_found"),
        ("POST", "/hooks/no-such-flow", 404, "not_found"),
        ("GET", "/api/v1/nothing-here", 404, "not_found"),
        ("GET", "/console/nothing-here.js", 404, "not_found"),
        ("GET", "/hooks/lead-capture", 405, "method_not_allowed"),
        ("DELETE", "/healthz", 405, "method_not_allowed"),
        ("PUT", "/api/v1/runs", 405, "method_not_allowed"),
    ]
    async with aiohttp.ClientSession() as s:
        for method, path, status, code in cases:
            async with s.request(method, hub.url + path) as r:
                assert r.status == status, (method, path)
                assert r.content_type == "application/json", (method, path)
                body = orjson.loads(await r.read())
                assert body["error"] == code and path in body["message"], (method, path, body)
                if status == 405:
                    assert "Allow" in r.headers
                if path.startswith("/console/"):
                    assert r.headers["X-Frame-Options"] == "DENY"  # the console's own headers are kept


async def _raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_a_nul_byte_in_a_header_is_a_json_400_logged_in_one_line(sink, tmp_path, caplog):
    hub = Hub(load_or_raise(lead_project(tmp_path, sink.url)), resolver=resolver())
    await hub.start()
    runner = make_runner(make_app(hub))  # what `patchbay serve` runs
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        caplog.set_level(logging.DEBUG)
        for head in (
            b"X-Note: a\x00b",
            b"Authorization: Bearer " + SECRET_TOKEN.encode() + b"\x00",
            b"Content-Type: application/json\x00",
        ):
            caplog.clear()
            raw = await _raw(
                f"http://{host}:{port}",
                b"POST /hooks/lead-capture HTTP/1.1\r\nHost: x\r\n"
                + head
                + b"\r\nContent-Length: 2\r\n\r\n{}",
            )
            status_line, _, rest = raw.partition(b"\r\n")
            headers, _, body = rest.partition(b"\r\n\r\n")
            assert status_line.split(b" ")[1] == b"400", raw
            assert b"content-type: application/json" in headers.lower(), raw
            err = orjson.loads(body)
            assert err["error"] == "bad_request" and "nothing was stored" in err["message"]
            assert SECRET_TOKEN not in body.decode()
            records = [r for r in caplog.records if r.name.startswith(("aiohttp", "patchbay"))]
            assert len(records) == 1, [r.getMessage() for r in records]
            [rec] = records
            assert rec.exc_info is None and "\n" not in rec.getMessage()
            assert SECRET_TOKEN not in rec.getMessage()
        assert await hub.store.read(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone()[0]) == 0
    finally:
        await runner.cleanup()
        await hub.stop()


async def test_a_rejected_webhook_is_logged_in_one_line_and_stores_nothing(start_hub, sink, tmp_path, caplog):
    hub = await start_hub(lead_project(tmp_path, sink.url))
    caplog.set_level(logging.INFO, logger="patchbay")
    status, err = await hub.post("/hooks/lead-capture", {"email": "a@example.com"}, sign=False)
    assert (status, err["error"]) == (401, "missing_signature")
    [rec] = [r for r in caplog.records if r.name == "patchbay.webhooks"]
    assert rec.getMessage() == "rejected POST /hooks/lead-capture: 401 missing_signature"
    assert (rec.flow, rec.code, rec.remote) == ("lead-capture", "missing_signature", "127.0.0.1")
    assert await hub.count("events") == 0
