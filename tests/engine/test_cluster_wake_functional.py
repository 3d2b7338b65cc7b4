"""Hubs with roles on one PostgreSQL store: a web node's accepted deliveries wake a worker node at once
(NOTIFY), a delivery committed out of id order is not left behind, a pause made on the web node reaches the
worker; a node id in use is refused."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import psycopg
import pytest

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.engine.roles import SCHEDULER, WEB, WORKER, Node
from patchbay.store.postgres.dialect import RawConnection
from patchbay.store.postgres.ops import accept
from patchbay.store.postgres.store import _split_schema
from patchbay.store.sqlite import StoreLocked
from tests.conftest import Sink, lead_project, postgres_url, resolver


async def hub_of(root: Path, node: Node) -> Hub:
    hub = Hub(load_or_raise(root), resolver=resolver(), node=node)
    await hub.start()
    return hub


@pytest.fixture
async def pair(tmp_path: Path, sink: Sink) -> AsyncIterator[tuple[Hub, Hub]]:
    root = lead_project(tmp_path, sink.url, hub={"store": postgres_url()})
    web = await hub_of(root, Node("web-a", frozenset({WEB})))
    worker = await hub_of(root, Node("worker-a", frozenset({WORKER})))
    try:
        yield web, worker
    finally:
        await web.stop()
        await worker.stop()


def lead(n: int) -> tuple[bytes, dict[str, str]]:
    record = {"email": f"lead-{n}@example.com", "first_name": "x"}
    return orjson.dumps(record), record


def quiet(hub: Hub) -> None:
    """No state watcher: an idle worker then finds new rows only by a wake-up (its look for what came due is
    the watcher's)."""
    assert hub._watch is not None
    hub._watch.cancel()


async def test_a_web_nodes_deliveries_wake_a_worker_node_at_once(pair: tuple[Hub, Hub], sink: Sink) -> None:
    web, worker = pair
    quiet(worker)
    assert not web.flows["lead-capture"].workers["crm"].running  # a web node sends nothing itself
    await asyncio.sleep(1.2)  # the worker has settled into its idle wait
    waits = []
    for n in range(8):
        sent = time.monotonic()
        await web.ingest("lead-capture", *lead(n))
        await sink.wait_for(n + 1, timeout=5)
        waits.append(time.monotonic() - sent)
        await asyncio.sleep(0.37)  # a different point of the worker's one-second rescan each time
    # Without the wake-up a delivery waits for the rescan: half a second on average.
    assert statistics.median(waits) < 0.25, waits


async def test_a_delivery_committed_out_of_id_order_is_not_left_behind(
    pair: tuple[Hub, Hub], sink: Sink
) -> None:
    web, worker = pair  # (the state watcher runs: it looks for what came due for idle feeds)
    fr = web.flows["lead-capture"]
    slow = web._event(fr, *lead(1), None, None)  # a second web node whose commit takes a while
    assert web.store is not None
    conninfo, schema = _split_schema(web.store.url)  # type: ignore[attr-defined]
    with psycopg.connect(conninfo, options=f"-c search_path={schema}") as conn:
        with conn.transaction():
            accept(
                RawConnection(conn, {"statements": 0, "round_trips": 0}), slow
            )  # its delivery's id is taken, not yet committed
            await web.ingest("lead-capture", *lead(2))  # a later id, committed first
            await sink.wait_for(1, timeout=5)
            w = worker.flows["lead-capture"].workers["crm"]
            assert w._after_id > 0  # the worker reads past the later id now
        committed = time.monotonic()
    await sink.wait_for(2, timeout=5)
    # No wake came for it: the feed, idle after the later one, was woken by the worker's look for what came
    # due (each half second; a feed that is reading rescans each second).
    assert time.monotonic() - committed < 2.5
    assert f"{slow.id}.crm" in sink.keys


async def test_a_pause_on_the_web_node_reaches_the_worker_node(pair: tuple[Hub, Hub], sink: Sink) -> None:
    web, worker = pair
    worker.watch_s = 60.0  # the watcher looks only when another process says a state changed
    await asyncio.sleep(0.6)  # (past its first half-second wait)
    await web.set_state("lead-capture", "crm", "paused")
    w = worker.flows["lead-capture"].workers["crm"]
    deadline = time.monotonic() + 3
    while w.state != "paused":
        assert time.monotonic() < deadline, "the worker node never saw the pause"
        await asyncio.sleep(0.02)
    await web.ingest("lead-capture", *lead(3))
    await asyncio.sleep(0.5)
    assert not sink.keys  # paused on the worker node too
    await web.set_state("lead-capture", "crm", "active")
    await sink.wait_for(1, timeout=5)


async def test_a_second_process_with_a_node_id_in_use_is_refused(tmp_path: Path, sink: Sink) -> None:
    root = lead_project(tmp_path, sink.url, hub={"store": postgres_url()})
    first = await hub_of(root, Node("same", frozenset({WEB, SCHEDULER})))
    try:
        with pytest.raises(StoreLocked, match="node same is already running"):
            await hub_of(root, Node("same", frozenset({WORKER})))
        other = await hub_of(root, Node("other", frozenset({WORKER})))  # another id: welcome
        await other.stop()
    finally:
        await first.stop()
    again = await hub_of(root, Node("same", frozenset({WORKER})))  # stopped cleanly: the id is free
    await again.stop()
