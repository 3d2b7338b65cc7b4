"""Three hub processes on one PostgreSQL store: each schedule fires once per tick across them, and the
singletons (alerts, retention, the window closer) run on one node; SIGKILL of the holder in the middle of
a slow poll: another node takes the schedule over within the lease's ttl and fires that tick once."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from patchbay.engine.leader import STANDBY_S, TTL_S
from patchbay.store.base import RunFilter
from patchbay.store.postgres import PostgresStore
from tests.cluster.harness import LEAD_SECRETS, Cluster, NodeProcess, until
from tests.conftest import Sink, _start, lead_project, postgres_url
from tests.test_cluster_functional import cluster_json

pytestmark = pytest.mark.slow
NODES = ("node-a", "node-b", "node-c")


@dataclass
class Orders:
    """An orders API read with an incremental cursor (`?since=<seq>`); a poll can be made to hang."""

    orders: list[dict[str, Any]] = field(default_factory=list)
    polls: list[tuple[float, str]] = field(default_factory=list)  # (time, since) of each request
    hang_next: bool = False
    hanging: asyncio.Event = field(default_factory=asyncio.Event)  # a poll is held in the handler
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        self.polls.append((time.monotonic(), str(since)))
        data = [o for o in self.orders if o["seq"] > since]  # what there is when it asks
        if self.hang_next:  # the holder's poll is slow: it is killed (or paused) in the middle of it
            self.hang_next = False
            self.hanging.set()
            await self.release.wait()
        return web.json_response({"data": data})

    def add(self, *seqs: int) -> None:
        self.orders += [{"id": f"o{n}", "seq": n, "email": f"o{n}@example.com"} for n in seqs]


@pytest.fixture
async def orders() -> AsyncIterator[Orders]:
    api = Orders()
    app = web.Application()
    app.router.add_get("/orders", api.handle)
    runner, api.url = await _start(app)
    yield api
    api.release.set()
    await runner.cleanup()


def project(root: Path, sink: Sink, orders: Orders, url: str) -> Path:
    """Lead capture with a dedupe step (so the window closer runs), a plain every-1s schedule `ticks`
    and `pull`, an every-1s poll of the orders API; everything goes to the sink."""
    # The shortest claim lease: a killed or paused node's sending slots are free again after 5 s, not 30 (the
    # default), so the orders the new holder polls are sent soon; what moves the schedule is its own lease.
    hub = {"store": url, "claim_lease": "5s"}
    lead_project(root, sink.url, hub=hub, steps="- dedupe: {key: email, within: 1h}\n")
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["upstream"] = {"kind": "http", "owner": "shop", "url": orders.url, "allow_private_network": True}
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    fast = {"retry": {"schedule": ["200ms"] * 20, "jitter": 0}}
    flows = {
        "ticks": {"schedule": {"every": "1s"}},
        "pull": {
            "schedule": {"every": "1s"},
            "source": {
                "system": "upstream",
                "path": "/orders",
                "items_path": "data",
                "cursor": {"field": "seq", "param": "since"},
            },
        },
    }
    for name, trigger in flows.items():
        flow = {
            "purpose": f"{name} reach the sink",
            "owner": "ops",
            "trigger": trigger,
            "destinations": [{"name": "crm", "system": "crm", "path": f"/{name}", "delivery": fast}],
        }
        (root / "flows" / f"{name}.yaml").write_text(yaml.safe_dump(flow, sort_keys=False))
    return root


async def start_nodes(cluster: Cluster, nodes: tuple[str, ...]) -> dict[str, NodeProcess]:
    """`patchbay serve --role worker,scheduler --node NODE` for each node, at once; each ready at /readyz."""
    started = await asyncio.gather(*(cluster.start(n, roles="worker,scheduler") for n in nodes))
    return dict(zip(nodes, started, strict=True))


def bodies(sink: Sink, path: str) -> list[Any]:
    return [r.body for r in sink.received if r.path == path and r.body]


async def test_three_nodes_fire_each_tick_once_and_a_killed_holders_tick_fires_once_elsewhere(
    tmp_path: Path, sink: Sink, orders: Orders
) -> None:
    url = postgres_url()
    root = project(tmp_path, sink, orders, url)
    store = PostgresStore(url, holder="test")  # the schema once, before the nodes open it at the same time
    try:
        async with Cluster(root, LEAD_SECRETS) as cluster:
            procs = await start_nodes(cluster, NODES)

            async def holders() -> dict[str, str | None]:
                return {lease.name: lease.holder for lease in await store.leases()}

            singletons = {"schedule:ticks", "schedule:pull", "alerts", "retention", "windows"}

            async def all_held() -> bool:
                held = await holders()
                return singletons <= set(held) and all(held[n] in NODES for n in singletons)

            await until(all_held, 30, "every singleton held by a node")
            orders.add(1, 2, 3)

            # ---- N ticks across three nodes: each fired once
            def ticks_delivered(n: int) -> Any:
                return lambda: len({b["scheduled_at"] for b in bodies(sink, "/ticks")}) >= n

            def orders_delivered(n: int) -> Any:
                return lambda: len({b["id"] for b in bodies(sink, "/pull")}) >= n

            await until(ticks_delivered(6), 30, "six ticks delivered")
            await until(orders_delivered(3), 30, "orders 1-3 delivered")
            logs = {n: procs[n].log.read_text() for n in NODES}
            for name in ("alerts", "retention", "windows", "schedule:ticks", "schedule:pull"):
                taken = [n for n in NODES if f"lease {name} taken by node {n}" in logs[n]]
                assert len(taken) == 1, f"{name} ran on {taken}"  # one node only, all along

            # ---- SIGKILL the holder of schedule:pull in the middle of a slow poll
            orders.add(4, 5, 6)
            orders.hang_next = True
            await asyncio.wait_for(orders.hanging.wait(), 10)
            victim = (await holders())["schedule:pull"]
            assert victim in NODES
            killed_at = await cluster.kill(procs[victim])  # for real: no release, no shutdown code
            polls_at_kill = len(orders.polls)
            orders.release.set()  # the killed node's request ends; nobody reads its answer

            await until(orders_delivered(6), TTL_S + STANDBY_S + 20, "orders 4-6 delivered by another node")
            first_after = orders.polls[polls_at_kill]
            moved_in = first_after[0] - killed_at
            assert first_after[1] == "3"  # the same tick again: from the cursor the killed run started at
            print(
                f"schedule:pull moved from the killed node in {moved_in:.1f} s (load {os.getloadavg()[0]:.1f})"
            )
            assert moved_in < TTL_S + STANDBY_S * 1.2 + 3, f"the schedule moved in {moved_in:.1f}s"
            new_holder = (await holders())["schedule:pull"]
            assert new_holder in NODES and new_holder != victim
            assert "running that tick again now" in procs[new_holder].log.read_text()

            async def moved() -> bool:
                held = await holders()
                return all(held[n] in NODES and held[n] != victim for n in singletons)

            await until(moved, TTL_S + STANDBY_S + 10, "every singleton moved off the killed node")
            _, view = cluster_json(root)  # `patchbay cluster --json`: the leases each node holds
            shown = {name: n["id"] for n in view["nodes"] for name in n["leases"]}
            assert singletons <= set(shown) and victim not in shown.values()
            assert {n["id"]: n["status"] for n in view["nodes"]}[victim] in ("up", "lost")  # lost after 10 s

            # Each order once (its id is its dedupe key), polled by the one holder of the moment.
            await asyncio.sleep(2)  # a few more ticks on the new holders
            assert sorted(b["id"] for b in bodies(sink, "/pull")) == [f"o{n}" for n in range(1, 7)]
            assert len(await store.list_runs(RunFilter(flow="pull", limit=100))) == 6
            # Each tick fired once across the nodes: one run of the schedule per tick event (three nodes each
            # running the schedule would count three runs a second, whatever the events' dedupe keys merged).
            # Off by a little: a run going now, and the killed node's tick fired again.
            events = len(await store.list_runs(RunFilter(flow="ticks", limit=1000)))
            row = await store.schedule("ticks")
            assert row is not None and events - 1 <= row["runs"] <= events + 2, (row["runs"], events)
            assert events >= 6
    finally:
        await store.close()


async def test_a_paused_holder_that_wakes_after_a_takeover_commits_nothing(
    tmp_path: Path, sink: Sink, orders: Orders
) -> None:
    url = postgres_url()
    root = project(tmp_path, sink, orders, url)
    nodes = NODES[:2]
    store = PostgresStore(url, holder="test")  # the schema once, before the nodes open it at the same time
    try:
        async with Cluster(root, LEAD_SECRETS) as cluster:  # a paused node is woken before it is stopped
            procs = await start_nodes(cluster, nodes)

            async def pull_holder() -> str | None:
                return next((x.holder for x in await store.leases() if x.name == "schedule:pull"), None)

            async def held() -> bool:
                return await pull_holder() in nodes

            await until(held, 60, "schedule:pull held")
            orders.add(1, 2, 3)

            def delivered(n: int) -> Any:
                return lambda: len({b["id"] for b in bodies(sink, "/pull")}) >= n

            await until(delivered(3), 30, "orders 1-3 delivered")
            orders.add(4, 5, 6)
            orders.hang_next = True
            await asyncio.wait_for(orders.hanging.wait(), 10)
            paused = await pull_holder()
            assert paused in nodes
            cluster.pause(procs[paused])  # a paused process: it holds its lease until it runs out

            async def taken_over() -> bool:
                return await pull_holder() not in (None, paused)

            await until(taken_over, TTL_S + STANDBY_S + 10, "the other node taking schedule:pull")
            await until(delivered(6), 30, "orders 4-6 delivered by the other node")
            orders.add(7)
            await until(delivered(7), 30, "order 7 delivered by the other node")
            assert await store.cursor("pull") == 7

            # The paused node wakes with its poll's answer (orders 4-6, cursor 6): either its renewal fails first
            # and its work is cancelled, or its commit is refused by the fence (tests/engine/
            # test_leases_hub_functional.py makes that order certain); either way nothing of it lands.
            orders.release.set()
            cluster.resume(procs[paused])

            def gave_up() -> bool:
                log = procs[paused].log.read_text()
                return "no longer holds it" in log or f"lease schedule:pull lost by node {paused}" in log

            await until(gave_up, 15, "the woken node giving the schedule up")
            await asyncio.sleep(1.5)  # its every-1s schedule would have run again by now
            assert await store.cursor("pull") == 7  # not set back to 6 by the stale commit
            assert sorted(b["id"] for b in bodies(sink, "/pull")) == [f"o{n}" for n in range(1, 8)]
            assert len(await store.list_runs(RunFilter(flow="pull", limit=100))) == 7
            assert await pull_holder() not in (None, paused)
    finally:
        await store.close()
