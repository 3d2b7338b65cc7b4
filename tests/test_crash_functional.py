"""kill -9 the hub while it delivers: after a restart every accepted event arrives, each key's effect once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import aiohttp
import orjson
import pytest

from patchbay.security.webhook_auth import sign_standard_webhooks
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, lead_project, postgres_url

pytestmark = pytest.mark.slow
N = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_serve(root, port: int) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC,
        "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN,
    }
    log = open(root / "serve.log", "ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "patchbay",
        "serve",
        str(root),
        "--port",
        str(port),
        env=env,
        stdout=log,
        stderr=log,
    )
    log.close()
    deadline = time.monotonic() + 40
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
    if proc.returncode is None:
        proc.kill()
    raise AssertionError(f"hub did not become ready:\n{(root / 'serve.log').read_text()[-3000:]}")


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_sigkill_during_delivery_loses_nothing(tmp_path, sink, store):
    async def slowish(request, rec):
        await asyncio.sleep(0.005)  # deliveries take time, so plenty are in flight at the kill
        return 201

    sink.default = slowish
    port = free_port()
    hub: dict[str, object] = {"port": port}
    if store == "postgres":  # the same crash with the store on a PostgreSQL server (issue 13)
        hub["store"] = postgres_url()
    root = lead_project(
        tmp_path,
        sink.url,
        hub=hub,
        delivery={"max_concurrency": 4, "retry": {"schedule": ["200ms"] * 20, "jitter": 0}},
    )
    proc = await start_serve(root, port)
    url = f"http://127.0.0.1:{port}/hooks/lead-capture"
    accepted: dict[int, str] = {}
    state = {"killed": False}

    async def post(session: aiohttp.ClientSession, n: int) -> None:
        body = orjson.dumps({"email": f"lead-{n}@example.com", "first_name": "x"})
        msg_id = f"msg_{n}"
        while True:  # a sender retries what was not acknowledged, with the same id
            headers = {
                "Content-Type": "application/json",
                **sign_standard_webhooks(SECRET_WHSEC, msg_id, int(time.time()), body),
            }
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    if r.status in (200, 202):
                        accepted[n] = (await r.json())["event_id"]
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)

    async def killer() -> None:
        while len(sink.keys) < 150:
            await asyncio.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # for real: no shutdown code runs
        await proc.wait()
        state["killed"] = True
        state["delivered_at_kill"] = len(sink.keys)
        state["accepted_at_kill"] = len(accepted)
        state["proc"] = await start_serve(root, port)

    sem = asyncio.Semaphore(16)

    async def bounded(session: aiohttp.ClientSession, n: int) -> None:
        async with sem:
            await post(session, n)

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        k = asyncio.create_task(killer())
        await asyncio.wait_for(asyncio.gather(*(bounded(session, n) for n in range(N))), 120)
        await asyncio.wait_for(k, 60)
    try:
        assert state["killed"] and state["delivered_at_kill"] < N
        await sink.wait_for(N, timeout=60)
        # Every acknowledged event reached the sink...
        delivered_emails = {r.body["properties"]["email"] for r in sink.received if r.body}
        assert delivered_emails == {f"lead-{n}@example.com" for n in range(N)}
        # ...and each event's key had its effect once: redeliveries after the crash reuse the key.
        expected_keys = {f"{eid}.crm" for eid in accepted.values()}
        assert set(sink.keys) == expected_keys
        assert len(set(accepted.values())) == N
        if store == "postgres":  # the runs are in the server, not in a file beside the project
            assert not (root / ".patchbay" / "patchbay.db").exists()
    finally:
        p = state.get("proc")
        if p is not None:
            p.send_signal(signal.SIGTERM)
            await asyncio.wait_for(p.wait(), 20)
