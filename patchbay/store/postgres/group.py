"""Group commit on PostgreSQL: concurrent accepts (and attempt records) share one statement and one COMMIT.

PostgreSQL waits for the WAL flush of each COMMIT (synchronous_commit as the server has it), so an accept
that commits alone costs a round trip and a flush per event. As SQLite's writer does (sqlite_writer.py),
the calls queued while a group is being written go together in the next group: a writer takes every call
waiting (up to `max_group` items) and writes them with one operation (`ops.accept_many_async`,
`ops.record_async`), one statement in its own transaction. Each caller hears back after that COMMIT, so
the 202 still follows the commit of its event. Under light load a group is one call and costs what a lone
call did; a burst makes the groups larger, and the server sees a few writers per kind instead of one per
caller: on a machine whose cores the hub and the server share, fewer backends busy at once cost the
server less CPU per row.

The writers are tasks on the hub's event loop, each with an asyncio connection of its own: the round trip
is the loop's own wait on a socket, with no thread hand-off (event loop -> store thread -> server -> store
thread -> event loop) and no thread waiting for the GIL. Measured beside the thread-based version in one
run (bench/cluster.py, PostgreSQL one node): the same delivered/s and hub CPU per event within the noise
(1,351 and 1,375/s, 0.56 ms each). An accept takes 1.3 ms alone and 6-8 ms in a loaded hub either way:
that time is the event loop's queue (requests, deliveries), not the store.

A group that fails for another reason than an unreachable server is written again one call at a time,
so one event the server refuses fails alone and never sinks the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from patchbay.errors import StoreUnavailable
from patchbay.store.postgres.errors import GONE, RETRY, reason


def _split(calls: list[list[Any]], out: list[Any] | None) -> list[list[Any]]:
    """Each call's slice of the group's results (None: each item's result is None)."""
    parts, at = [], 0
    for items in calls:
        parts.append([None] * len(items) if out is None else out[at : at + len(items)])
        at += len(items)
    return parts


def _resolve(results: Iterable[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():  # its caller was cancelled; the event is committed all the same (a retry dedupes)
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class AsyncRaw:
    """An asyncio psycopg connection for the hot path's own statements (`ops.*_async`), counted."""

    def __init__(self, conn: Any, counter: dict[str, int]) -> None:
        self.conn = conn
        self.counter = counter

    async def execute(self, sql: str, params: Any = None) -> Any:
        self.counter["statements"] += 1
        self.counter["round_trips"] += 1
        return await self.conn.execute(sql, params)


class AsyncGroups:
    """`writers` tasks on the caller's event loop, each with an asyncio connection of its own, take every
    call waiting (up to `max_group` items) and write them with one `op(AsyncRaw, items)`, which returns one
    result per item (or None). See the module's docstring.

    A call from another event loop than the one the writers run on (a CLI command's, a test's second loop
    while the first lives) goes to `fallback(items)`, the same operation on a thread."""

    def __init__(
        self,
        connect: Callable[[], Any],
        op: Callable[..., Any],
        fallback: Callable[[list[Any]], Any],
        closed: Callable[[], Exception],
        account: Callable[[dict[str, int], str | None], None],
        *,
        name: str,
        where: str,
        writers: int = 2,
        max_group: int = 256,
    ) -> None:
        self.where = where  # the store, as messages name it
        self._connect = connect  # -> an open psycopg.AsyncConnection (autocommit)
        self._op = op
        self._fallback = fallback
        self._closed = closed
        self._account = account  # (counters of one operation, the server's problem or None)
        self.name = name
        self.writers = writers
        self.max_group = max_group
        self._q: deque[tuple[asyncio.Future[Any], list[Any]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: list[Any] = []
        self._stopped = False
        self.groups = 0
        self.calls = 0

    async def call(self, items: list[Any]) -> list[Any]:
        if self._stopped:
            raise self._closed()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed() and self._tasks:
                return await self._fallback(items)  # type: ignore[no-any-return]
            self._start(loop)
        fut: asyncio.Future[list[Any]] = loop.create_future()
        self._q.append((fut, items))
        assert self._wake is not None
        self._wake.set()
        return await fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        for conn in self._conns:  # of a loop that has ended (asyncio.run before this one)
            if conn is not None and not conn.closed:
                conn.pgconn.finish()
        self._loop = loop
        self._wake = asyncio.Event()
        self._conns = [None] * self.writers
        self._tasks = [
            loop.create_task(self._writer(i), name=f"patchbay-store-{self.name}-{i}")
            for i in range(self.writers)
        ]

    async def _writer(self, i: int) -> None:
        assert self._wake is not None
        while True:
            if not self._q:
                if self._stopped:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            group, size = [], 0
            while self._q and size < self.max_group:
                fut, items = self._q.popleft()
                group.append((fut, items))
                size += len(items)
            if self._q:
                self._wake.set()  # more waits: another writer may take it meanwhile
            await self._write(i, group)

    async def _write(self, i: int, group: list[tuple[asyncio.Future[Any], list[Any]]]) -> None:
        results: list[tuple[bool, Any]]
        try:
            out = await self._run(i, [x for _, items in group for x in items])
            results = [(True, r) for r in _split([c for _, c in group], out)]
        except StoreUnavailable as exc:  # the server is unreachable for every call alike
            results = [(False, exc)] * len(group)
        except Exception as exc:
            if len(group) == 1:
                results = [(False, exc)]
            else:  # written again one call at a time: one event the server refuses fails alone
                results = []
                for _, items in group:
                    try:
                        one = await self._run(i, items)
                        results.append((True, _split([items], one)[0]))
                    except Exception as exc1:
                        results.append((False, exc1))
        self.groups += 1
        self.calls += len(group)
        _resolve((fut, ok, value) for (fut, _), (ok, value) in zip(group, results, strict=True))

    async def _run(self, i: int, items: list[Any]) -> Any:
        for attempt in range(3):
            local = {"statements": 0, "round_trips": 0}
            try:
                if self._conns[i] is None or self._conns[i].closed:
                    self._conns[i] = await self._connect()
                res = await self._op(AsyncRaw(self._conns[i], local), items)
            except RETRY:
                if attempt == 2:
                    raise
                continue  # a concurrent writer won (same dedupe key): the next try sees its row
            except GONE as exc:
                conn, self._conns[i] = self._conns[i], None
                if conn is not None:
                    await conn.close()
                problem = reason(exc)
                self._account({}, problem)
                raise StoreUnavailable(
                    f"the store {self.where} cannot be reached: {problem}", "the store is unreachable"
                ) from None
            self._account(local, None)
            return res
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        """Write what is queued, then end the writers and close their connections."""
        self._stopped = True
        if self._wake is not None and self._loop is asyncio.get_running_loop():
            self._wake.set()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for conn in self._conns:
                if conn is not None:
                    await conn.close()
        self._tasks = []


__all__ = ["AsyncGroups", "AsyncRaw"]
