"""Several `patchbay serve --role …` processes on one SQLite file (one machine): 2 web + 1 worker,scheduler.

- a few thousand signed webhooks while one web process and the worker are killed with SIGKILL (the worker
  restarted): every acknowledged event reaches the sink, and each event carries one idempotency key (a
  redelivery after the worker's restart reuses it);
- a second process wanting the worker role is refused (exit 3, what holds it and how to fix);
- a webhook taken by a web process is delivered well within the worker's one-second rescan (the wake).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.cluster.harness import LEAD_SECRETS, Cluster, NodeProcess, Sender, lead, until
from tests.conftest import Sink, lead_project

pytestmark = pytest.mark.slow

N = int(os.environ.get("PATCHBAY_SQLITE_SPLIT_EVENTS", "4000"))


def store_rows(root: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(root / ".patchbay" / "patchbay.db", timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def post_one(session: aiohttp.ClientSession, url: str, n: int) -> aiohttp.ClientResponse:
    return await session.post(url, data=lead(n), headers=Sender.headers(lead(n), f"msg_{n}"))


@pytest.mark.timeout(240)
async def test_two_web_one_worker_on_sqlite_under_sigkill_lose_no_acknowledged_event(
    tmp_path: Path, sink: Sink
) -> None:
    async def slowish(request: web.Request, rec: Any) -> int:
        await asyncio.sleep(0.003)  # deliveries take time: the worker holds sends in flight when killed
        return 201

    sink.default = slowish
    root = lead_project(
        tmp_path,
        sink.url,
        delivery={"max_concurrency": 24, "retry": {"schedule": ["200ms"] * 20, "jitter": 0}},
    )
    kills: list[dict[str, Any]] = []

    async with Cluster(root, LEAD_SECRETS) as cluster:
        worker = await cluster.start("worker", roles="worker,scheduler")
        # The web processes start, and a second worker is refused meanwhile: exit 3, naming what holds the
        # role and how to go on.
        second = await cluster.start("worker-2", roles="worker", wait=False)
        webs = list(await asyncio.gather(*(cluster.start(f"web{i}", roles="web") for i in (1, 2))))
        urls = [f"{w.url}/hooks/lead-capture" for w in webs]  # a restarted web process keeps its port
        sender = Sender(urls)  # acknowledged, or sent again to the other web process
        accepted = sender.accepted  # n -> event id, once a web process answered 2xx
        assert await cluster.exited(second) == 3, second.log_tail()
        said = second.log_tail()
        assert "needs the worker role of this SQLite file, and another process runs it" in said
        assert "node worker)" in said and "--role web" in said and "patchbay store copy" in said

        async def sigkill(node: NodeProcess, restart_as: str, delay: float) -> None:
            await cluster.kill(node)
            kills.append({"node": node.name, "wall": time.time(), "delivered": len(sink.keys)})
            await asyncio.sleep(delay)
            await cluster.start(restart_as, roles=node.roles, port=node.port)

        async def kill_web() -> None:
            await until(lambda: len(accepted) >= 0.3 * N, 120, "30% of the events acknowledged")
            await sigkill(webs[1], "web2-r1", 2.0)

        async def kill_worker() -> None:
            await until(lambda: len(sink.keys) >= 0.4 * N, 120, "40% of the deliveries")
            await sigkill(worker, "worker-r1", 1.0)  # the role's flock went with the process

        started = time.monotonic()
        killing = asyncio.gather(kill_web(), kill_worker())
        await sender.send({n: lead(n) for n in range(N)})
        posted_s = time.monotonic() - started
        await asyncio.wait_for(killing, 120)

        expected = {f"{eid}.crm" for eid in accepted.values()}
        await until(lambda: expected <= set(sink.keys), 60, "every acknowledged event at the sink")
        delivered_s = time.monotonic() - started

        # A webhook on a web process is delivered at once: the wake, not the worker's rescan each second.
        await asyncio.sleep(1.5)  # everything settled: the worker waits idle
        waits = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for k in range(6):
                before = len(sink.keys)
                sent = time.monotonic()
                async with await post_one(session, urls[k % 2], N + k) as r:
                    assert r.status == 202, await r.text()
                await until(lambda b=before: len(sink.keys) > b, 5, "a webhook delivered", every=0.005)
                waits.append(time.monotonic() - sent)
                await asyncio.sleep(0.37)  # another point of the rescan's second each time
        events = store_rows(root, "SELECT COUNT(*) FROM events")[0][0]
        view = await cluster.view()

    redeliveries = sum(c - 1 for c in sink.keys.values())
    print(
        f"\nsqlite split: {N} events posted in {posted_s:.1f} s, all delivered after {delivered_s:.1f} s;"
        f" {sender.unanswered} posts sent again after no answer; {redeliveries} redeliveries (same key);"
        f" kills: {kills}; wake waits {[round(w, 3) for w in waits]}"
    )
    # 0 acknowledged events lost; each posted message is one event (the sender's retries deduplicated).
    assert len(accepted) == N and len(set(accepted.values())) == N
    assert expected <= set(sink.keys)
    assert events == N + 6
    # Each event carries one idempotency key: the sink saw one key per event, whatever was sent twice.
    assert len(sink.keys) == N + 6
    assert all(k.endswith(".crm") for k in sink.keys)
    # Redeliveries only around the worker's SIGKILL (a send made, not yet recorded).
    assert redeliveries <= 24 * 4, redeliveries
    assert len(kills) == 2 and all(k["delivered"] < N for k in kills)
    # Promptly: the rescan alone would take half a second on average, up to one.
    assert statistics.median(waits) < 0.25 and max(waits) < 1.0, waits
    # The cluster view lists the SQLite nodes, the killed ones among them.
    ids = {n["id"] for n in view["nodes"]}
    assert {"web1", "web2-r1", "worker-r1"} <= ids, ids


@pytest.mark.timeout(120)
async def test_a_pause_through_a_web_processs_api_stops_the_worker_processs_sends(
    tmp_path: Path, sink: Sink
) -> None:
    root = lead_project(tmp_path, sink.url)
    made = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "patchbay", "tokens", "create", "ops", "-p", str(root)),
        *("--scope", "destinations:write", "--json"),
        env={**os.environ, **LEAD_SECRETS},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await made.communicate()
    assert made.returncode == 0, err.decode()
    auth = {"Authorization": f"Bearer {orjson.loads(out)['token']}"}
    async with Cluster(root, LEAD_SECRETS) as cluster:
        await cluster.start("worker", roles="worker,scheduler")
        web = await cluster.start("web", roles="web")
        hook = f"{web.url}/hooks/lead-capture"
        dest = f"{web.url}/api/v1/flows/lead-capture/destinations/crm"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with await post_one(s, hook, 1) as r:
                assert r.status == 202
            await sink.wait_for(1, timeout=5)
            async with s.post(f"{dest}/pause", headers=auth) as r:
                assert r.status == 200, await r.text()
            await asyncio.sleep(0.3)
            for n in (2, 3, 4):
                async with await post_one(s, hook, n) as r:
                    assert r.status == 202
            await asyncio.sleep(1.5)  # past the worker's rescan: still nothing sent
            assert len(sink.keys) == 1, sink.keys
            async with s.post(f"{dest}/resume", headers=auth) as r:
                assert r.status == 200, await r.text()
            await sink.wait_for(4, timeout=5)


@pytest.mark.timeout(60)
async def test_a_web_process_sees_the_claims_the_worker_process_holds(tmp_path: Path, sink: Sink) -> None:
    """On SQLite a worker's claims live in its memory: the worker writes their number with its heartbeat, so
    a web process's /api/v1/cluster and the CLI (which read the store) show them, within a heartbeat or two,
    and 0 once it stopped."""
    from patchbay.engine.roles import HEARTBEAT_S
    from patchbay.security.tokens import create_token
    from patchbay.store.base import Actor
    from patchbay.store.sqlite import SqliteStore

    hold = asyncio.Event()

    async def slow(request: web.Request, rec: Any) -> int:
        await hold.wait()  # the worker holds every delivery it sent: claimed, in flight
        return 201

    sink.default = slow
    root = lead_project(tmp_path, sink.url, delivery={"max_concurrency": 4})
    store = SqliteStore(root / ".patchbay" / "patchbay.db")
    token, _ = await create_token(store, "reader", ["flows:read"], None, Actor("test"))
    await store.close()
    auth = {"Authorization": f"Bearer {token}"}
    try:
        async with Cluster(root, LEAD_SECRETS) as cluster:
            worker, webp = await asyncio.gather(
                cluster.start("worker", roles="worker,scheduler"), cluster.start("web", roles="web")
            )
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                for n in range(3):
                    async with await post_one(s, f"{webp.url}/hooks/lead-capture", n) as r:
                        assert r.status == 202, await r.text()
                await until(lambda: len(sink.received) == 3, 5, "the worker sending the 3 deliveries")

                async def claims() -> dict[str, int]:
                    async with s.get(f"{webp.url}/api/v1/cluster", headers=auth) as r:
                        assert r.status == 200, await r.text()
                        view = await r.json()
                    assert view["node"] == "web"  # answered by the web process, not the worker
                    return {n["id"]: n["claims"] for n in view["nodes"]}

                async def shown() -> bool:
                    return await claims() == {"worker": 3, "web": 0}

                took = await until(
                    shown, 2 * HEARTBEAT_S + 1, "the worker's claims in the web process's cluster view"
                )
                view = await cluster.view()  # the CLI reads the store: the same figure
                assert {n["id"]: n["claims"] for n in view["nodes"]} == {"worker": 3, "web": 0}
                hold.set()
                await sink.wait_for(3, timeout=5)
            await cluster.stop(worker)
        assert took <= 2 * HEARTBEAT_S + 1
        left = store_rows(root, "SELECT claims, stopped_at IS NOT NULL FROM nodes WHERE id='worker'")
        assert left == [(0, 1)]  # a clean stop holds nothing
    finally:
        hold.set()
