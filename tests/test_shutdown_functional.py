"""SIGTERM a real `patchbay serve` under keep-alive load: it stops within the grace, answers every request,
and accepts nothing once it has started refusing."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from patchbay.config.project import load_or_raise
from patchbay.records import new_id
from patchbay.security.webhook_auth import sign_standard_webhooks
from patchbay.store.sqlite import SyncStore
from tests.cluster.harness import free_port, start_serve
from tests.conftest import SECRET_WHSEC, lead_project

pytestmark = pytest.mark.slow
GRACE_S = 3.0
CLIENTS = 8


@dataclass
class Answer:
    client: int
    sent_at: float
    done_at: float
    status: int | None  # None: no answer (the exception says why)
    body: dict | None = None
    error: str = ""


async def _client(n: int, url: str, answers: list[Answer], started: asyncio.Event) -> None:
    """Post signed leads over one kept-alive connection until the hub refuses or goes away."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout) as s:
        i = 0
        while True:
            i += 1
            raw = orjson.dumps({"email": f"c{n}-{i}@example.com"})
            h = {"Content-Type": "application/json"}
            h.update(sign_standard_webhooks(SECRET_WHSEC, new_id("msg"), int(time.time()), raw))
            sent = time.monotonic()
            try:
                async with s.post(url, data=raw, headers=h) as r:
                    body = orjson.loads(await r.read())
                    answers.append(Answer(n, sent, time.monotonic(), r.status, body))
            except (aiohttp.ClientError, TimeoutError) as exc:
                answers.append(Answer(n, sent, time.monotonic(), None, error=repr(exc)))
                return
            if r.status != 202:
                return
            if i == 20:
                started.set()


async def test_sigterm_under_keep_alive_load_stops_in_time_and_answers_everything(tmp_path, sink):
    async def slow(request, received):  # deliveries still in flight when the grace ends
        await asyncio.sleep(GRACE_S + 1)
        return 201

    sink.default = slow
    root = lead_project(tmp_path, sink.url, hub={"shutdown_grace_s": GRACE_S})
    port = free_port()
    proc = await start_serve(root, port)
    answers: list[Answer] = []
    started = [asyncio.Event() for _ in range(CLIENTS)]
    url = f"http://127.0.0.1:{port}/hooks/lead-capture"
    clients = [asyncio.create_task(_client(n, url, answers, started[n])) for n in range(CLIENTS)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), GRACE_S + 2 + 10)  # measured below; not a hang
        stopped_in = time.monotonic() - signalled
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for c in clients:
            c.cancel()
    log = (root / "serve.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert stopped_in <= GRACE_S + 2, f"stopped {stopped_in:.1f}s after SIGTERM\n{log[-3000:]}"
    assert "stopped; pending work stays in the store" in log

    print(f"stopped {stopped_in:.2f}s after SIGTERM; {len(answers)} requests")
    unanswered = [a for a in answers if a.status is None]
    assert not unanswered, unanswered[:5]
    accepted = [a for a in answers if a.status == 202]
    refused = [a for a in answers if a.status != 202]
    assert len(accepted) >= 20 * CLIENTS
    # Every client ends on an immediate, explicit refusal.
    assert len(refused) == CLIENTS
    for a in refused:
        assert (a.status, a.body and a.body["error"]) == (503, "shutting_down"), a
        assert a.done_at - a.sent_at < 1.0, a
    # Once the hub has refused one request, it accepts none sent after that.
    first_refusal = min(a.done_at for a in refused)
    late = [a for a in accepted if a.sent_at > first_refusal]
    assert not late, late[:5]
    # Every 202 is in the store.
    store = SyncStore(load_or_raise(root).store_path)
    stored = store.read(lambda c: {r[0] for r in c.execute("SELECT id FROM events")})
    missing = [a.body["event_id"] for a in accepted if a.body["event_id"] not in stored]
    assert not missing, missing[:5]


async def test_a_request_stuck_mid_body_cannot_hold_up_the_stop(tmp_path, sink):
    root = lead_project(tmp_path, sink.url, hub={"shutdown_grace_s": GRACE_S})
    port = free_port()
    proc = await start_serve(root, port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # A head that promises 1,000 bytes, and 10 of them: the handler waits for the rest.
        writer.write(
            b"POST /hooks/lead-capture HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"email": '
        )
        await writer.drain()
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200  # the hub is serving; the stuck request is admitted
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), GRACE_S + 2 + 10)
        stopped_in = time.monotonic() - signalled
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing stored to answer for
    finally:
        writer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = (root / "serve.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert stopped_in <= GRACE_S + 2, f"stopped {stopped_in:.1f}s after SIGTERM\n{log[-3000:]}"
    assert "cancelled 1 request still unfinished after 3s" in log
    store = SyncStore(load_or_raise(root).store_path)
    assert store.read(lambda c: c.execute("SELECT COUNT(*) FROM events").fetchone()[0]) == 0
