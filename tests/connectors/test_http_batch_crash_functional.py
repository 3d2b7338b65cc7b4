"""kill -9 of `patchbay serve` while it sends batches: nothing lost, one idempotency key per contact."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import orjson
import pytest

from patchbay.security.webhook_auth import sign_standard_webhooks
from tests.cluster.harness import free_port, start_serve
from tests.conftest import SECRET_WHSEC
from tests.connectors.test_http_batch import TOKEN, FakeHubSpotBatch, contacts, fake, project

pytestmark = pytest.mark.slow
N = 1000
PER_POST = 20


async def test_sigkill_during_batches_loses_nothing_and_keeps_each_contacts_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)  # the child inherits it
    api = FakeHubSpotBatch(delay_s=0.05)  # each batch takes a while, so some are in flight at the kill
    runner, url = await fake(api)
    port = free_port()
    project(
        tmp_path,
        url,
        {"max_records": 100, "max_wait": "200ms"},
        extra_dest={"delivery": {"max_concurrency": 2, "retry": {"schedule": ["200ms"] * 20, "jitter": 0}}},
        hub={"port": port},
    )
    proc = await start_serve(tmp_path, port)
    hook = f"http://127.0.0.1:{port}/hooks/f"
    accepted: dict[int, list[str]] = {}
    state: dict[str, object] = {"killed": False}
    items = contacts(N)

    async def post(session: aiohttp.ClientSession, n: int) -> None:
        body = orjson.dumps(items[n * PER_POST : (n + 1) * PER_POST])
        msg_id = f"msg_{n}"
        while True:  # a sender re-sends what was not acknowledged, with the same id
            headers = {
                "Content-Type": "application/json",
                **sign_standard_webhooks(SECRET_WHSEC, msg_id, int(time.time()), body),
            }
            try:
                async with session.post(hook, data=body, headers=headers) as r:
                    if r.status in (200, 202):
                        accepted[n] = (await r.json())["event_ids"]
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)

    async def killer() -> None:
        while sum(len(r["inputs"]) for r in api.requests) < 300:
            await asyncio.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # for real: no shutdown code runs
        await proc.wait()
        state["killed"] = True
        state["seen_at_kill"] = len(api.keys)
        state["proc"] = await start_serve(tmp_path, port)

    sem = asyncio.Semaphore(4)

    async def bounded(session: aiohttp.ClientSession, n: int) -> None:
        async with sem:
            await post(session, n)

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            k = asyncio.create_task(killer())
            await asyncio.wait_for(asyncio.gather(*(bounded(session, n) for n in range(N // PER_POST))), 120)
            await asyncio.wait_for(k, 60)
        assert state["killed"] and int(state["seen_at_kill"]) < N  # type: ignore[call-overload]

        emails = {f"person{i}@example.com" for i in range(N)}
        deadline = time.monotonic() + 60
        while set(api.contacts) != emails and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert set(api.contacts) == emails  # every acknowledged contact reached the API
        # Each contact was only ever sent under one key: its delivery's, `<event id>.crm`.
        assert all(len(keys) == 1 for keys in api.keys.values()), {
            e: k for e, k in api.keys.items() if len(k) > 1
        }
        event_ids = [eid for n in range(N // PER_POST) for eid in accepted[n]]
        assert len(set(event_ids)) == N
        assert {next(iter(k)) for k in api.keys.values()} == {f"{eid}.crm" for eid in event_ids}
        assert all(len(r["inputs"]) <= 100 for r in api.requests)
        resent = sum(len(r["inputs"]) for r in api.requests) - N
        print(f"\nbatch requests: {len(api.requests)}, contacts sent again after the kill: {resent}")
    finally:
        p = state.get("proc")
        if isinstance(p, asyncio.subprocess.Process):
            p.send_signal(signal.SIGTERM)
            await asyncio.wait_for(p.wait(), 20)
        elif proc.returncode is None:
            proc.kill()
        await runner.cleanup()
