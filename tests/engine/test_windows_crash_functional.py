"""kill -9 `patchbay serve` while it aggregates: after a restart no window counts a record twice or loses
one, and each window and key is emitted once (one idempotency key, whatever was redelivered)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import defaultdict

import aiohttp
import orjson
import pytest

from patchbay.security.webhook_auth import sign_standard_webhooks
from tests.cluster.harness import free_port, start_serve
from tests.conftest import SECRET_WHSEC, Sink, lead_project

pytestmark = pytest.mark.slow
N = 1000
SHOPS = ("paris", "lyon", "nice")

STEPS = """
  - name: per_second
    aggregate:
      by: shop
      window: 1s
      late: 2s
      values:
        revenue: {sum: amount}
        orders: {count: true}
  - map:
      shop: key
      start: window.start
      revision: window.revision
      revenue: revenue
      orders: orders
"""


def windows(sink: Sink) -> dict[str, dict[str, object]]:
    """The window records the sink acknowledged, once per idempotency key."""
    out: dict[str, dict[str, object]] = {}
    for r in sink.received:
        key = r.headers.get("Idempotency-Key", "")
        if key in sink.keys and isinstance(r.body, dict):
            out[key] = r.body
    return out


async def test_sigkill_while_aggregating_counts_every_record_once(tmp_path, sink: Sink) -> None:
    port = free_port()
    root = lead_project(
        tmp_path,
        sink.url,
        steps=STEPS,
        hub={"port": port},
        delivery={"retry": {"schedule": ["200ms"] * 20, "jitter": 0}},
    )
    proc = await start_serve(root, port)
    url = f"http://127.0.0.1:{port}/hooks/lead-capture"
    accepted: dict[int, str] = {}
    state: dict[str, object] = {"killed": False}

    async def post(session: aiohttp.ClientSession, n: int) -> None:
        body = orjson.dumps({"shop": SHOPS[n % 3], "amount": n % 7 + 1, "email": f"c{n}@x.com"})
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

    async def sender(session: aiohttp.ClientSession) -> None:
        for start in range(0, N, 20):  # about 10 s of traffic: windows open and close throughout
            await asyncio.gather(*(post(session, n) for n in range(start, start + 20)))
            await asyncio.sleep(0.15)

    async def killer() -> None:
        while len(sink.keys) < 3:  # some windows were emitted, others are open
            await asyncio.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # for real: no shutdown code runs
        await proc.wait()
        state["killed"] = True
        state["accepted_at_kill"] = len(accepted)
        state["windows_at_kill"] = len(sink.keys)
        state["proc"] = await start_serve(root, port)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        k = asyncio.create_task(killer())
        await asyncio.wait_for(sender(session), 120)
        await asyncio.wait_for(k, 60)
    try:
        assert state["killed"] and 0 < state["accepted_at_kill"] < N  # type: ignore[operator]
        want_orders, want_revenue = N, sum(n % 7 + 1 for n in range(N))
        deadline = time.monotonic() + 60
        while sum(int(w["orders"]) for w in windows(sink).values()) < want_orders:  # type: ignore[call-overload]
            assert time.monotonic() < deadline, f"windows so far: {len(windows(sink))}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)  # anything emitted twice would arrive by now
        got = windows(sink)
        # No record counted twice or lost, across the kill...
        assert sum(int(w["orders"]) for w in got.values()) == want_orders  # type: ignore[call-overload]
        assert sum(int(w["revenue"]) for w in got.values()) == want_revenue  # type: ignore[call-overload]
        # ...and each window and key emitted once: one idempotency key (so one run) per window and key.
        per_window: dict[tuple[object, object], set[str]] = defaultdict(set)
        for key, w in got.items():
            per_window[(w["shop"], w["start"])].add(key)
        assert all(len(keys) == 1 for keys in per_window.values()), per_window
        assert {w["revision"] for w in got.values()} == {1}
        assert len(got) > state["windows_at_kill"]  # type: ignore[operator]  # windows went on after the kill
        assert len(set(accepted.values())) == N
    finally:
        p = state.get("proc")
        if isinstance(p, asyncio.subprocess.Process):
            p.send_signal(signal.SIGTERM)
            await asyncio.wait_for(p.wait(), 20)
