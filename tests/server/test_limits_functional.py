"""Inbound limits on a real socket: a sender over its rate gets 429 + Retry-After; oversized heads get 400."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import orjson
import yaml

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.server.app import HEADER_LIMITS, run_hub
from tests.conftest import lead_project, resolver

LEAD = {"email": "ada@example.com"}


def _limit(root, **limits) -> None:
    path = root / "systems.yaml"
    systems = yaml.safe_load(path.read_text())
    systems["website"]["webhook"].update(limits)
    path.write_text(yaml.safe_dump(systems, sort_keys=False))


async def test_a_sender_over_its_rate_gets_429_with_retry_after(tmp_path, sink, start_hub):
    root = lead_project(tmp_path, sink.url)
    _limit(root, rate_per_s=0.2, burst=2)
    # A second endpoint of the same system shares its budget.
    flow = yaml.safe_load((root / "flows" / "lead-capture.yaml").read_text())
    flow["trigger"]["webhook"]["path"] = "/hooks/leads-again"
    (root / "flows" / "again.yaml").write_text(yaml.safe_dump(flow))
    hub = await start_hub(root)

    s1, _ = await hub.post("/hooks/lead-capture", LEAD)
    s2, _ = await hub.post("/hooks/leads-again", {"email": "bob@example.com"})
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(hub.url + "/hooks/lead-capture", data=b"{}") as r:
        s3, body, retry_after = r.status, orjson.loads(await r.read()), r.headers.get("Retry-After")
    assert (s1, s2, s3) == (202, 202, 429)
    assert body["error"] == "rate_limited" and body["flow"] == "lead-capture"
    assert "from system website" in body["message"]
    assert retry_after is not None and 1 <= int(retry_after) <= 5
    assert await hub.count() == 2
    metrics = hub.hub.metrics.render().decode()
    assert 'patchbay_requests_rejected_total{code="rate_limited",flow="lead-capture"} 1.0' in metrics


async def test_without_limits_nothing_is_refused(tmp_path, sink, start_hub):
    hub = await start_hub(lead_project(tmp_path, sink.url))
    statuses = await asyncio.gather(
        *(hub.post("/hooks/lead-capture", {"email": f"l{i}@example.com"}) for i in range(30))
    )
    assert {s for s, _ in statuses} == {202}


async def _raw(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_oversized_request_heads_are_refused_by_the_served_hub(tmp_path, sink):
    hub = Hub(load_or_raise(lead_project(tmp_path, sink.url)), resolver=resolver())
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_hub(hub, host="127.0.0.1", port=0, on_ready=ready.set_result))
    port = await asyncio.wait_for(ready, 10)
    try:
        ok = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"a" * 4000 + b"\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200"), ok
        big_field = b"a" * (HEADER_LIMITS["max_field_size"] + 100)
        got = await _raw(
            port, b"POST /hooks/lead-capture HTTP/1.1\r\nHost: x\r\nX-Big: " + big_field + b"\r\n\r\n"
        )
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", got), got
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(HEADER_LIMITS["max_headers"] + 5))
        got = await _raw(port, b"POST /hooks/lead-capture HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", got), got
        long_line = b"GET /" + b"a" * (HEADER_LIMITS["max_line_size"] + 100) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        got = await _raw(port, long_line)
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", got), got
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # run_hub's own handler: a graceful stop
        await asyncio.wait_for(task, 15)
    assert hub.store is not None
