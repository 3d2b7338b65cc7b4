"""Two hubs in one process on one PostgreSQL store: a holder whose renewals stall (a paused process, as its
lease sees it) loses its schedule to the other hub, and the poll it finishes afterwards commits nothing:
its cursor and events carry the lease's fence, refused once the lease changed hands."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from patchbay.config.project import load_or_raise
from patchbay.engine import leader
from patchbay.engine.hub import Hub
from patchbay.engine.roles import Node
from patchbay.store.base import Fence, RunFilter
from tests.conftest import Sink, eventually, postgres_url, resolver
from tests.test_leases_functional import Orders, bodies, orders, project

assert orders  # a fixture


@pytest.fixture(autouse=True)
def short_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader, "TTL_S", 1.0)
    monkeypatch.setattr(leader, "STANDBY_S", 0.2)


async def start(root: Path, node: str) -> Hub:
    hub = Hub(load_or_raise(root), resolver=resolver(), node=Node(node))
    await hub.start(lock=False)
    return hub


async def test_a_stale_holders_poll_commits_nothing_after_another_hub_took_the_schedule(
    tmp_path: Path, sink: Sink, orders: Orders
) -> None:
    root = project(tmp_path, sink, orders, postgres_url())
    a = await start(root, "hub-a")
    b: Hub | None = None
    stalled = asyncio.Event()
    try:

        async def pulled(n: int) -> Any:
            async def check() -> bool:
                return len({x["id"] for x in bodies(sink, "/pull")}) >= n

            return check

        orders.add(1, 2, 3)
        await eventually(await pulled(3), what="orders 1-3 delivered by hub-a")
        assert "schedule:pull" in a.leader.held

        # hub-a's renewals stall from now on: as far as the store knows, it is paused.
        async def stall(fence: Fence) -> bool:
            await stalled.wait()
            return False

        a.leader._renew = stall  # type: ignore[method-assign]
        orders.add(4, 5, 6)
        orders.hang_next = True
        await asyncio.wait_for(orders.hanging.wait(), 10)  # hub-a's poll is in the orders API

        b = await start(root, "hub-b")

        async def b_holds() -> bool:
            return "schedule:pull" in b.leader.held  # type: ignore[union-attr]

        await eventually(b_holds, what="hub-b taking the schedule over")
        await eventually(await pulled(6), what="orders 4-6 delivered by hub-b")
        orders.add(7)
        await eventually(await pulled(7), what="order 7 delivered by hub-b")
        assert await a.store.cursor("pull") == 7  # type: ignore[union-attr]

        # hub-a's poll answers now (orders 4-6, cursor 6): its commit is refused by the fence.
        orders.release.set()
        schedule = a.flows["pull"].schedule
        assert schedule is not None

        async def a_stopped() -> bool:
            return not schedule.running

        await eventually(a_stopped, what="hub-a's run ending")
        await asyncio.sleep(0.3)
        assert await a.store.cursor("pull") == 7  # type: ignore[union-attr]  # not set back to 6
        assert len(await a.store.list_runs(RunFilter(flow="pull", limit=100))) == 7  # type: ignore[union-attr]
        health = a.flows["pull"].health
        assert health is not None and health.state.failures == 0  # a lost lease is not the source failing
    finally:
        stalled.set()  # hub-a's stalled renewals end now, as refused: it lets its leases go as it stops
        for hub in (a, b):
            if hub is not None:
                await hub.stop()
