"""Group commit of the PostgreSQL store's accepts: concurrent accepts share one statement and one COMMIT.

PostgreSQL waits for the WAL flush of each COMMIT (synchronous_commit as the server has it), so an accept
that commits alone costs a round trip and a flush per event. As SQLite's writer does (sqlite_writer.py),
the accepts queued while a group is being written go together in the next group: a few threads each take
every accept waiting (up to `max_group`) and write them with `ops.accept_many`, one statement in its own
transaction. Each caller hears back after that COMMIT, so the 202 still follows the commit of its event.
Under light load a group is one event and costs what a lone accept did; a burst makes the groups larger.

A group that fails for another reason than an unreachable server is written again one event at a time,
so one event the server refuses fails alone and never sinks the others.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from patchbay.errors import StoreUnavailable
from patchbay.store.base import Accepted, NewEvent
from patchbay.store.postgres import ops as pg_ops

_STOP = object()

Run = Callable[[Callable[..., Any], tuple[Any, ...]], Any]


class AcceptGroups:
    """`threads` writers over one queue of accepts (see the module's docstring)."""

    def __init__(
        self, run: Run, closed: Callable[[], Exception], *, threads: int = 2, max_group: int = 256
    ) -> None:
        self._run = run  # PostgresStore._run: a pooled connection, retries, the counters
        self._closed = closed
        self.max_group = max_group
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self.groups = 0
        self.events = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"patchbay-store-accept-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    async def accept(self, event: NewEvent) -> Accepted:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Accepted] = loop.create_future()
        with self._lock:
            if self._stopped:
                raise self._closed()
            self.q.put((loop, fut, event))
        return await fut

    def stop(self) -> None:
        """Write what is queued, then end the threads (blocking: call it off the event loop)."""
        with self._lock:
            self._stopped = True
            for _ in self._threads:
                self.q.put(_STOP)
        for t in self._threads:
            t.join()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            group = [item]
            stop = False
            while len(group) < self.max_group:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                group.append(nxt)
            self._write(group)
            if stop:
                return

    def _write(self, group: list[Any]) -> None:
        events = [e for _, _, e in group]
        results: list[tuple[bool, Any]]
        try:
            results = [(True, a) for a in self._run(pg_ops.accept_many, (events,))]
        except StoreUnavailable as exc:  # the server is unreachable for every event alike
            results = [(False, exc)] * len(group)
        except Exception as exc:
            results = [(False, exc)] if len(group) == 1 else [self._one(e) for e in events]
        with self._lock:
            self.groups += 1
            self.events += len(group)
        by_loop: dict[Any, list[tuple[Any, bool, Any]]] = {}
        for (loop, fut, _), (ok, value) in zip(group, results, strict=True):
            by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, rs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, rs)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def _one(self, event: NewEvent) -> tuple[bool, Any]:
        try:
            return True, self._run(pg_ops.accept_many, ([event],))[0]
        except Exception as exc:
            return False, exc


def _resolve(results: Iterable[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():  # its caller was cancelled; the event is committed all the same (a retry dedupes)
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


__all__ = ["AcceptGroups"]
