"""Group commit on PostgreSQL: concurrent accepts (and attempt records) share one statement and one COMMIT.

PostgreSQL waits for the WAL flush of each COMMIT (synchronous_commit as the server has it), so an accept
that commits alone costs a round trip and a flush per event. As SQLite's writer does (sqlite_writer.py),
the calls queued while a group is being written go together in the next group: a thread takes every call
waiting (up to `max_group` items) and writes them with one operation (`ops.accept_many`, `ops.record`),
one statement in its own transaction. Each caller hears back after that COMMIT, so the 202 still follows
the commit of its event. Under light load a group is one call and costs what a lone call did; a burst
makes the groups larger, and the server sees one writer per kind instead of one per caller: on a machine
whose cores the hub and the server share, fewer backends busy at once cost the server less CPU per row.

A group that fails for another reason than an unreachable server is written again one call at a time,
so one event the server refuses fails alone and never sinks the others.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from patchbay.errors import StoreUnavailable

_STOP = object()

Run = Callable[[Callable[..., Any], tuple[Any, ...]], Any]


class Groups:
    """`threads` writers over one queue of calls of `op` (see the module's docstring). A call brings a list
    of items and gets back the list of their results; `op(conn, items)` returns one result per item of the
    group (None: each item's result is None)."""

    def __init__(
        self,
        run: Run,
        op: Callable[..., list[Any] | None],
        closed: Callable[[], Exception],
        *,
        name: str,
        threads: int = 1,
        max_group: int = 256,
    ) -> None:
        self._run = run  # PostgresStore._run: a pooled connection, retries, the counters
        self._op = op
        self._closed = closed
        self.max_group = max_group
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self.groups = 0
        self.calls = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"patchbay-store-{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    async def call(self, items: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        with self._lock:
            if self._stopped:
                raise self._closed()
            self.q.put((loop, fut, items))
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
            size = len(item[2])
            stop = False
            while size < self.max_group:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                group.append(nxt)
                size += len(nxt[2])
            self._write(group)
            if stop:
                return

    def _write(self, group: list[Any]) -> None:
        results: list[tuple[bool, Any]]
        try:
            results = [
                (True, r)
                for r in self._split(group, self._run(self._op, ([i for _, _, c in group for i in c],)))
            ]
        except StoreUnavailable as exc:  # the server is unreachable for every call alike
            results = [(False, exc)] * len(group)
        except Exception as exc:
            results = [(False, exc)] if len(group) == 1 else [self._one(items) for _, _, items in group]
        with self._lock:
            self.groups += 1
            self.calls += len(group)
        by_loop: dict[Any, list[tuple[Any, bool, Any]]] = {}
        for (loop, fut, _), (ok, value) in zip(group, results, strict=True):
            by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, rs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, rs)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    @staticmethod
    def _split(group: list[Any], out: list[Any] | None) -> list[list[Any]]:
        """Each call's slice of the group's results."""
        parts, at = [], 0
        for _, _, items in group:
            parts.append([None] * len(items) if out is None else out[at : at + len(items)])
            at += len(items)
        return parts

    def _one(self, items: list[Any]) -> tuple[bool, Any]:
        try:
            return True, self._split([(None, None, items)], self._run(self._op, (items,)))[0]
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


__all__ = ["Groups"]
