"""Intake yields to delivery across processes: a `--role web` process takes webhooks a few at a time while a
worker process's destination is behind, as a process that does both does (engine/intake.py), and takes them as
they come again once it catches up, is stopped, or dies (kill -9) behind: real processes on SQLite and on
PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from patchbay.engine.intake import REMOTE_TTL_S
from patchbay.engine.roles import HEARTBEAT_S
from tests.cluster.harness import LEAD_SECRETS, Cluster, NodeProcess, Sender, lead
from tests.conftest import Sink, lead_project, postgres_url

pytestmark = pytest.mark.slow


async def limited(session: aiohttp.ClientSession, node: NodeProcess) -> float:
    """The web process's `patchbay_intake_limited` gauge, read from its /metrics."""
    async with session.get(f"{node.url}/metrics") as r:
        text = await r.text()
    m = re.search(r"^patchbay_intake_limited (\S+)$", text, re.M)
    assert m is not None, text[:500]
    return float(m.group(1))


async def post_many(session: aiohttp.ClientSession, url: str, first: int, n: int) -> list[int]:
    async def one(i: int) -> int:
        body = lead(first + i)
        async with session.post(url, data=body, headers=Sender.headers(body, f"msg_{first + i}")) as r:
            return r.status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
@pytest.mark.timeout(180)
async def test_a_web_process_yields_to_a_worker_process_that_is_behind_until_it_catches_up_stops_or_dies(
    tmp_path: Path, sink: Sink, store: str
) -> None:
    async def slow(request: web.Request, rec: Any) -> int:
        await asyncio.sleep(0.08)
        return 201

    sink.default = slow
    hub: dict[str, Any] = {"intake_when_behind": 2}
    if store == "postgresql":
        hub["store"] = postgres_url()
    root = lead_project(tmp_path, sink.url, delivery={"max_concurrency": 1}, hub=hub)

    async with Cluster(root, LEAD_SECRETS) as cluster, aiohttp.ClientSession() as session:
        worker = await cluster.start("worker", roles="worker,scheduler")
        front = await cluster.start("web", roles="web")
        url = f"{front.url}/hooks/lead-capture"

        async def gauge_is(value: float, within: float, what: str) -> float:
            async def check() -> bool:
                return await limited(session, front) == value

            t0 = time.monotonic()
            while not await check():
                assert time.monotonic() - t0 < within, f"{what}: not within {within} s\n{front.log_tail()}"
                await asyncio.sleep(0.1)
            return time.monotonic() - t0

        assert await limited(session, front) == 0.0  # nothing due: taken as it comes
        # 200 due, one at a time at 80 ms each: the worker holds four and finds more due. It is behind, and
        # the web process, which delivers nothing itself, hears it.
        assert await post_many(session, url, 0, 200) == [202] * 200
        await gauge_is(1.0, 5, "the web process heard the worker is behind")
        # It says so again with every heartbeat: still limited after longer than one report lasts.
        await asyncio.sleep(REMOTE_TTL_S + 1)
        assert len(sink.keys) < 190, "the worker caught up too soon for this check"
        assert await limited(session, front) == 1.0
        # Caught up: the web process takes webhooks as they come again.
        await sink.wait_for(200, timeout=60)
        await gauge_is(0.0, 5, "the web process heard the worker caught up")

        # Behind again, then the worker is killed: nothing tells the web process it caught up, and its
        # intake is not held down past what the last report said.
        assert await post_many(session, url, 1000, 200) == [202] * 200
        await gauge_is(1.0, 5, "behind again")
        await cluster.kill(worker)
        took = await gauge_is(0.0, REMOTE_TTL_S + HEARTBEAT_S + 3, "the dead worker's report expired")
        assert took > 1.0  # it lasted until it ran out: nothing else lifted it

        # A worker that stops cleanly while behind lifts it at once.
        worker = await cluster.start("worker-2", roles="worker,scheduler")
        await gauge_is(1.0, 15, "the new worker is behind on what the dead one left")
        await cluster.stop(worker)
        await gauge_is(0.0, 2, "the stopped worker said it caught up as it went")
