"""kill -9 a `patchbay serve` while its flows wait on calls: after the restart every accepted event's
elements are delivered, each call was only ever asked under its one key, and the runs finish."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import defaultdict
from typing import Any

import aiohttp
import orjson
import pytest

from patchbay.security.webhook_auth import sign_standard_webhooks
from tests.cluster.harness import free_port, start_serve
from tests.conftest import SECRET_WHSEC, Received, lead_project

pytestmark = pytest.mark.slow
N = 150  # events, two elements each: 300 calls and 300 deliveries

STEPS = """
- split: {path: items, with: {email: email}}
- name: find_product
  call: {system: crm, method: GET, path: "/products?sku={{ sku }}", as: product, on_404: continue}
"""


async def test_sigkill_while_runs_wait_on_calls(tmp_path, sink):
    call_keys: dict[str, set[str]] = defaultdict(set)  # the sku asked -> every key it was asked under
    asked: dict[str, int] = defaultdict(int)

    async def answer(request: Any, rec: Received) -> Any:
        await asyncio.sleep(0.003)  # calls take time, so plenty are in flight at the kill
        if request.method == "GET":
            sku = request.query["sku"]
            key = request.headers["Idempotency-Key"]
            call_keys[sku].add(key)
            asked[key] += 1
            if sku.endswith("-1"):
                return (404, {}, "{}")
            return (200, {"Content-Type": "application/json"}, orjson.dumps({"id": f"p-{sku}"}).decode())
        return 201

    sink.default = answer
    port = free_port()
    root = lead_project(
        tmp_path,
        sink.url,
        steps=STEPS,
        hub={
            "port": port,
            "delivery": {"max_concurrency": 4, "retry": {"schedule": ["200ms"] * 20, "jitter": 0}},
        },
        delivery={"max_concurrency": 4, "retry": {"schedule": ["200ms"] * 20, "jitter": 0}},
        dest={"body": {"sku": "sku", "product": "product.body.id"}},
    )
    proc = await start_serve(root, port)
    url = f"http://127.0.0.1:{port}/hooks/lead-capture"
    accepted: dict[int, str] = {}
    state: dict[str, Any] = {"killed": False}

    async def post(session: aiohttp.ClientSession, n: int) -> None:
        body = orjson.dumps({"email": f"o{n}@example.com", "items": [{"sku": f"s{n}-0"}, {"sku": f"s{n}-1"}]})
        while True:  # a sender retries what was not acknowledged, with the same id
            headers = {
                "Content-Type": "application/json",
                **sign_standard_webhooks(SECRET_WHSEC, f"msg_{n}", int(time.time()), body),
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
        while len(asked) < 60:
            await asyncio.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # for real: no shutdown code runs
        await proc.wait()
        state["killed"] = True
        state["asked_at_kill"] = len(asked)
        state["proc"] = await start_serve(root, port)

    sem = asyncio.Semaphore(8)

    async def bounded(session: aiohttp.ClientSession, n: int) -> None:
        async with sem:
            await post(session, n)

    def delivered() -> dict[str, Any]:
        return {r.headers["Idempotency-Key"]: r.body for r in sink.received if r.method == "POST"}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        k = asyncio.create_task(killer())
        await asyncio.wait_for(asyncio.gather(*(bounded(session, n) for n in range(N))), 120)
        await asyncio.wait_for(k, 60)
    try:
        assert state["killed"] and state["asked_at_kill"] < 2 * N
        deadline = time.monotonic() + 60
        while len(delivered()) < 2 * N and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        got = delivered()
        want = {
            f"{accepted[n]}.{i}.crm": {"sku": f"s{n}-{i}", "product": None if i else f"p-s{n}-0"}
            for n in range(N)
            for i in (0, 1)
        }
        assert got == want  # every element of every acknowledged event, with its own call's answer
        # Each call was asked under one key only, its own (a retry after the crash reuses it).
        assert {sku: keys for sku, keys in call_keys.items()} == {
            f"s{n}-{i}": {f"{accepted[n]}.{i}.find_product"} for n in range(N) for i in (0, 1)
        }
        state["repeated"] = sum(1 for c in asked.values() if c > 1)
        print(f"calls asked again after the kill, same key: {state['repeated']}")
    finally:
        p = state.get("proc")
        if p is not None:
            p.send_signal(signal.SIGTERM)
            await asyncio.wait_for(p.wait(), 20)
