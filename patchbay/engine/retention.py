"""Retention: finished runs removed and compressed by each flow's `history` policy.

A sweep goes flow by flow; each store call handles at most `chunk` runs in one short write, with a
pause between calls, so the writer never holds ingest up behind a cleanup. Pending work is never
touched; dead letters and quarantined runs stay until `keep_failures` (default: until replayed or
discarded). The hub runs a sweep after start and then every `interval_s`; `patchbay store prune`
runs one by hand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from patchbay.config.specs import FlowSpec
from patchbay.engine.leader import LOCAL, Leader
from patchbay.engine.waiting import wait_set
from patchbay.store.base import Retention as RetentionStore

log = logging.getLogger("patchbay.retention")

FINISHED = ("delivered", "filtered", "discarded", "aggregated")
FULL_PASS_S = 86_400.0  # how often compression starts again from a flow's first run (`Retention._compress`)
FAILED = ("dead", "quarantined")


class Counts(Protocol):
    def __call__(self, flow: str, removed: int, compressed: int) -> None: ...


@dataclass
class SweepReport:
    removed: dict[str, int] = field(default_factory=dict)  # flow -> runs removed
    compressed: dict[str, int] = field(default_factory=dict)  # flow -> runs compressed

    @property
    def total_removed(self) -> int:
        return sum(self.removed.values())

    @property
    def total_compressed(self) -> int:
        return sum(self.compressed.values())


class Retention:
    def __init__(
        self,
        store: RetentionStore,
        flows: Callable[[], Iterable[FlowSpec]],
        *,
        on_counts: Counts | None = None,
        interval_s: float = 600.0,
        chunk: int = 100,
        pause_s: float = 0.02,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.flows = flows
        self.on_counts = on_counts
        self.interval_s = interval_s
        self.chunk = chunk
        self.pause_s = pause_s
        self.clock = clock
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = False  # this node holds lease `retention` and sweeps
        # flow -> (arrival of the last run compressed, when the pass from the first run began): `_compress`
        self._compressed_to: dict[str, tuple[float | None, float]] = {}

    async def sweep(self) -> SweepReport:
        """One pass over every flow: remove what is past `keep` / `keep_failures`, compress what is past
        `compress_after`. Returns what it did."""
        report = SweepReport()
        now = self.clock()
        for flow in self.flows():
            h = flow.history
            removed = compressed = 0
            if h.keep is not None:
                removed += await self._drain(
                    partial(self.store.purge_runs, flow.name, FINISHED, now - h.keep)
                )
            if h.keep_failures is not None:
                removed += await self._drain(
                    partial(self.store.purge_runs, flow.name, FAILED, now - h.keep_failures)
                )
            if h.compress_after is not None:
                compressed = await self._compress(flow.name, now - h.compress_after)
            if removed:
                report.removed[flow.name] = removed
            if compressed:
                report.compressed[flow.name] = compressed
            if (removed or compressed) and self.on_counts is not None:
                self.on_counts(flow.name, removed, compressed)
        return report

    async def _compress(self, flow: str, before: float) -> int:
        """Compress what is due, from the arrival of the last run compressed before: a chunk that began at the
        first run each time read past every run compressed earlier, so its cost, and on SQLite the time it held
        the write lock, grew with the history kept. Once a day (FULL_PASS_S), and at the first sweep after a
        start, it begins at the first run again: a run that finished after newer ones were compressed (a retry
        that took days) is compressed then."""
        now = time.monotonic()
        through, since = self._compressed_to.get(flow, (None, now))
        if now - since > FULL_PASS_S:
            through, since = None, now

        async def step(limit: int) -> int:
            nonlocal through
            n, last = await self.store.compress_runs(flow, before, limit, through)
            through = last if last is not None else through
            return n

        done = await self._drain(step)
        self._compressed_to[flow] = (through, since)
        return done

    async def _drain(self, step: Callable[[int], Awaitable[int]]) -> int:
        """Call `step(chunk)` until it does less than a chunk (nothing more is due) or the hub stops."""
        done = 0
        while not self._stop.is_set():
            n = await step(self.chunk)
            done += n
            if n < self.chunk:
                break
            await asyncio.sleep(self.pause_s)  # let ingest's writes in between two chunks
        return done

    def start(self, leader: Leader = LOCAL) -> None:
        """Sweep wherever lease `retention` is held (engine/leader.py): on one node of a cluster."""
        self._task = leader.hold("retention", lambda _fence: self._loop(), until=self._stop)

    async def _loop(self) -> None:
        self._running = True
        try:
            await self._sweeps()
        finally:
            self._running = False

    async def _sweeps(self) -> None:
        while not self._stop.is_set():
            try:
                report = await self.sweep()
                if report.total_removed or report.total_compressed:
                    log.info(
                        "history: removed %d finished runs, compressed %d",
                        report.total_removed,
                        report.total_compressed,
                    )
            except Exception as exc:  # the store in trouble: its own health says so; try again next time
                log.warning("history: cleanup failed, tried again in %.0fs: %s", self.interval_s, exc)
            if await wait_set(self._stop, self.interval_s):
                return

    async def stop(self) -> None:
        self._stop.set()  # a sweep going ends after its chunk
        if self._task is not None:
            if not self._running:
                self._task.cancel()  # a standby node (another holds lease `retention`): nothing runs here
            await asyncio.gather(self._task, return_exceptions=True)
