"""`entity_lock` on both stores: one holder per entity across store instances (processes), taken by polling
(store/common.py `poll_until`), let go at the end of the block and by a waiter that is cancelled."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from patchbay.store.base import Store
from patchbay.store.common import poll_until
from tests.conftest import postgres_url


def _sqlite(tmp_path: Path) -> Callable[[], Store]:
    from patchbay.store.sqlite import SqliteStore

    return lambda: SqliteStore(tmp_path / "store.db")


def _postgres(tmp_path: Path) -> Callable[[], Store]:
    from patchbay.store.postgres import PostgresStore

    url = postgres_url()
    return lambda: PostgresStore(url)


@pytest.fixture(params=["postgres", "sqlite"])
async def two(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on the same data, as two processes have them."""
    opener = {"sqlite": _sqlite, "postgres": _postgres}[request.param](tmp_path)
    a = opener()
    b = opener()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_one_holder_per_entity_and_the_waiter_takes_it_once_let_go(two: tuple[Store, Store]) -> None:
    a, b = two
    order: list[str] = []
    async with a.entity_lock("customer"):
        waiter = asyncio.create_task(_hold(b, "customer", order, "b"))
        async with b.entity_lock("invoice"):  # another entity: not held up
            order.append("invoice")
        await asyncio.sleep(0.2)
        assert not waiter.done()
        order.append("a done")
    await asyncio.wait_for(waiter, 5)
    assert order == ["invoice", "a done", "b"]


async def test_a_cancelled_waiter_holds_nothing(two: tuple[Store, Store]) -> None:
    a, b = two
    async with a.entity_lock("customer"):
        waiter = asyncio.create_task(_hold(b, "customer", [], "b"))
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    order: list[str] = []
    await asyncio.wait_for(_hold(b, "customer", order, "b"), 5)
    await asyncio.wait_for(_hold(a, "customer", order, "a"), 5)  # b let go again at the end of its block
    assert order == ["b", "a"]


async def _hold(store: Store, entity: str, order: list[str], name: str) -> None:
    async with store.entity_lock(entity):
        order.append(name)


async def test_poll_until_sleeps_2_ms_doubling_to_50_ms_between_tries() -> None:
    tries: list[float] = []

    async def try_once() -> bool:
        tries.append(time.monotonic())
        return len(tries) == 9

    await poll_until(try_once)
    gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
    expected = [0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05, 0.05]
    assert len(gaps) == len(expected)
    assert all(g >= e - 0.001 for g, e in zip(gaps, expected, strict=True)), gaps


async def test_a_waiter_cancelled_while_its_try_is_on_the_way_to_postgresql_holds_nothing() -> None:
    """PostgreSQL's try runs on a thread, which a cancel does not stop: a lock it takes after the cancel is let
    go at once, not held by the session until the process ends."""
    from patchbay.store.postgres import PostgresStore

    url = postgres_url()
    a, b = PostgresStore(url), PostgresStore(url)
    tried = threading.Event()
    call = b._entity_call

    def watched(sql: str, key: int) -> bool:
        try:
            return call(sql, key)
        finally:
            tried.set()

    b._entity_call = watched  # type: ignore[method-assign]
    try:
        b._entity_guard.acquire()  # b's try waits at its session's door...
        waiter = asyncio.create_task(_hold(b, "customer", [], "b"))
        await asyncio.sleep(0.1)
        waiter.cancel()  # ...is cancelled there...
        with pytest.raises(asyncio.CancelledError):
            await waiter
        b._entity_guard.release()  # ...and then takes the lock, nobody holding it
        assert await asyncio.to_thread(tried.wait, 5)
        order: list[str] = []
        await asyncio.wait_for(_hold(a, "customer", order, "a"), 5)
        assert order == ["a"]
    finally:
        await a.close()
        await b.close()
