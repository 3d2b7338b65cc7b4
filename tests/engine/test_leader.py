"""engine/leader.py on a real PostgreSQL store: one node at a time runs what holds a lease; a node that
stops renewing loses it and its work; a clean stop hands it over; on SQLite every lease is the hub's own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest

from patchbay.engine.leader import Leader, current_fence
from patchbay.errors import LeaseLost
from patchbay.store.base import Fence
from patchbay.store.postgres import PostgresStore
from patchbay.store.sqlite import SqliteStore
from tests.conftest import eventually, postgres_url

# A holder whose event loop stalls longer than TTL loses its lease to another node while its work still runs (the
# fence is what keeps that safe); 0.6 s was met by a stall of a slow CI machine once: 1.5 s.
TTL, STANDBY = 1.5, 0.1


async def soon(check: Callable[[], bool], what: str) -> None:
    async def asked() -> bool:
        return check()

    await eventually(asked, timeout=10, what=what)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    yield postgres_url()


class Job:
    """Work that counts where it runs: `running` holds the nodes running it now."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.most = 0
        self.started: list[tuple[str, Fence | None]] = []
        self.cancelled: list[str] = []

    def work(self, node: str):  # type: ignore[no-untyped-def]
        async def run(fence: Fence | None) -> None:
            assert current_fence() == fence
            self.started.append((node, fence))
            self.running.add(node)
            self.most = max(self.most, len(self.running))
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.append(node)
                raise
            finally:
                self.running.discard(node)

        return run


async def nodes(url: str, n: int) -> list[tuple[PostgresStore, Leader]]:
    out = []
    for i in range(n):
        store = PostgresStore(url, holder=f"node-{i}")
        out.append((store, Leader(store, f"node-{i}", ttl_s=TTL, standby_s=STANDBY)))
    return out


async def take_over(store_a: PostgresStore, store_b: PostgresStore, name: str) -> None:
    """node-0 (`store_a`) looks dead to the others, a paused process: its leases are run out, and node-1
    (`store_b`) takes lease `name` for 30 s."""
    with psycopg.connect(store_a.url.split("?")[0], options=f"-c search_path={store_a.schema}") as c:
        c.execute("UPDATE leases SET until = 0")
    assert await store_b.take_lease(name, "node-1", 30) is not None


async def test_one_node_of_three_runs_the_work_and_a_clean_stop_hands_it_over_at_once(url: str) -> None:
    cluster = await nodes(url, 3)
    job = Job()
    tasks = {leader.node_id: leader.hold("alerts", job.work(leader.node_id)) for _, leader in cluster}
    try:
        await soon(lambda: len(job.running) == 1, what="one node running the work")
        await asyncio.sleep(TTL * 2)  # renewals go on; nobody else starts it
        assert job.most == 1 and len(job.started) == 1
        [first] = job.running
        t0 = time.monotonic()
        tasks[first].cancel()  # the hub stops: the work stops and the lease is released
        await asyncio.gather(tasks[first], return_exceptions=True)
        assert job.cancelled == [first]
        await soon(lambda: len(job.running) == 1, what="another node taking over")
        assert time.monotonic() - t0 < TTL  # released, so not waiting for it to run out
        [second] = job.running
        assert second != first and job.most == 1
        fences = [f for _, f in job.started]
        assert fences[1] is not None and fences[0] is not None and fences[1].token > fences[0].token
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for store, _ in cluster:
            await store.close()


async def test_a_holder_whose_lease_was_taken_stops_its_work_and_its_fenced_writes_fail(url: str) -> None:
    [(store_a, a), (store_b, b)] = await nodes(url, 2)
    job = Job()
    task_a = a.hold("schedule:pull", job.work("node-0"))
    try:
        await soon(lambda: job.running == {"node-0"}, what="node-0 running the work")
        [(_, fence)] = job.started
        assert fence is not None
        await take_over(store_a, store_b, "schedule:pull")
        with pytest.raises(LeaseLost, match="node-0 no longer holds it"):
            await store_a.update_schedule("pull", {"next_due_at": 1.0}, fence=fence)
        # The work's cancel is seen before the leader, awaiting it, forgets the lease: wait for both.
        await soon(
            lambda: job.cancelled == ["node-0"] and "schedule:pull" not in a.held,
            what="node-0 stopping at its next renewal",
        )
        assert not job.running
    finally:
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)
        await store_a.close()
        await store_b.close()


async def test_a_hold_whose_lease_was_lost_as_its_stop_came_ends_without_taking_it_again(url: str) -> None:
    """Retention's shape: the work runs until `stop` is set, and the hub's stop waits for the hold. When the
    lease is lost just before the stop, the hold is in standby: it ends there, it does not wait for the
    lease (held elsewhere for 30 s) only to see the stop."""
    [(store_a, a), (store_b, _)] = await nodes(url, 2)
    stop = asyncio.Event()
    job = Job()
    task_a = a.hold("retention", job.work("node-0"), until=stop)
    try:
        await soon(lambda: job.running == {"node-0"}, what="node-0 running the work")
        await take_over(store_a, store_b, "retention")
        await soon(lambda: job.cancelled == ["node-0"], what="node-0 losing the lease")
        stop.set()
        await asyncio.wait_for(asyncio.shield(task_a), 2)
    finally:
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)
        await store_a.close()
        await store_b.close()


async def test_a_dead_holders_work_moves_within_ttl_and_standby(url: str) -> None:
    [(store_a, a), (store_b, b)] = await nodes(url, 2)
    job = Job()
    task_a = a.hold("windows", job.work("node-0"))
    await soon(lambda: job.running == {"node-0"}, what="node-0 running the work")
    task_b = b.hold("windows", job.work("node-1"))
    try:
        await asyncio.sleep(TTL)
        assert job.running == {"node-0"}
        # node-0 dies: nothing of it runs any more (no release, no renewal).
        await store_a.close()
        t0 = time.monotonic()
        await soon(lambda: "node-1" in job.running, what="node-1 taking over")
        assert time.monotonic() - t0 < TTL + STANDBY * 1.2 + 0.5
    finally:
        for t in (task_a, task_b):
            t.cancel()
        await asyncio.gather(task_a, task_b, return_exceptions=True)
        await store_b.close()


async def test_once_runs_a_job_on_one_node_and_the_others_after_it(url: str) -> None:
    cluster = await nodes(url, 3)
    done: list[str] = []
    order: list[str] = []

    def job(node: str):  # type: ignore[no-untyped-def]
        async def run(fence: Fence | None) -> None:
            assert fence is not None
            order.append(f"start {node}")
            if not done:  # the first one does the work; the others find it done
                await asyncio.sleep(TTL)  # longer than a renewal period: renewed meanwhile
                done.append(node)
            order.append(f"end {node}")

        return run

    try:
        await asyncio.gather(
            *(leader.once("first-run:customer", job(leader.node_id)) for _, leader in cluster)
        )
        assert len(done) == 1
        starts = [i for i, o in enumerate(order) if o.startswith("start")]
        ends = [i for i, o in enumerate(order) if o.startswith("end")]
        assert all(e < s for e, s in zip(ends, starts[1:], strict=False))  # never two at once
        assert all(lease.holder is None for lease in await cluster[0][0].leases())
    finally:
        for store, _ in cluster:
            await store.close()


async def test_on_sqlite_every_lease_is_the_hubs_own_and_the_store_is_not_asked(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    store.lock(("scheduler",), "node-0")  # a serving scheduler: the file is shared, its leases are not
    leader = Leader(store, "node-0")
    job = Job()
    try:
        assert store.shared and not store.leases_in_store and not leader.leases_in_store
        task = leader.hold("alerts", job.work("node-0"))
        await soon(lambda: job.running == {"node-0"}, what="the work running")
        assert job.started == [("node-0", None)]
        ran: list[Fence | None] = []

        async def once(fence: Fence | None) -> None:
            ran.append(fence)

        await leader.once("first-run:customer", once)
        assert ran == [None] and await store.leases() == []
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await store.close()


def test_the_cluster_view_lists_the_leases_each_node_holds() -> None:
    from patchbay.engine.roles import cluster_view
    from patchbay.store.base import Lease, NodeRow

    now = time.time()
    rows = [NodeRow(n, "h", 1, ("scheduler",), "1", None, now, now) for n in ("node-a", "node-b")]
    leases = [
        Lease("schedule:pull", "node-a", now + 5, 3, now - 60),
        Lease("alerts", "node-a", now + 5, 1, now - 60),
        Lease("windows", "node-b", now - 1, 2, now - 60),  # run out: nobody's any more
        Lease("retention", None, 0, 4, now - 60),  # released
    ]
    view = cluster_view(rows, now, leases)
    assert {n["id"]: n["leases"] for n in view["nodes"]} == {
        "node-a": ["alerts", "schedule:pull"],
        "node-b": [],
    }
