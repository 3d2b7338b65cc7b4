"""Closing aggregate windows: each window past its end and grace becomes one record of its flow.

The closer asks the store for windows due (`closable_windows`), builds each one's record with its
aggregate step, and writes it through `hub.ingest(commit=store.emit_window)`: the record (an event
that runs the steps after the aggregate, then the destinations) and the window's emitted mark in
one transaction, under a dedupe key of flow, window, key and revision, so closing twice never emits
twice. It runs at start (windows that closed while the hub was down), then every second; every
minute it lets go of emitted windows past their keep time and of expired dedupe keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from patchbay.config.project import FlowSpec
from patchbay.engine.leader import LOCAL, Leader
from patchbay.errors import StoreUnavailable
from patchbay.metrics import Metrics
from patchbay.store.base import Accepted, NewEvent, Store, WindowState

log = logging.getLogger("patchbay.windows")


class _Flow(Protocol):
    spec: FlowSpec


class WindowHub(Protocol):
    """What the closer needs of the hub (engine/hub.py); the hub imports this module, never the reverse."""

    store: Any
    metrics: Metrics

    @property
    def flows(self) -> dict[str, Any]: ...

    async def ingest(
        self,
        flow_name: str,
        payload: bytes,
        record: Any,
        *,
        dedupe_key: str | None = None,
        meta: dict[str, Any] | None = None,
        commit: Callable[[NewEvent], Awaitable[Accepted]] | None = None,
        after: str | None = None,
    ) -> tuple[Accepted, str]: ...


def has_gates(flow: FlowSpec) -> bool:
    return any(s.kind in ("aggregate", "dedupe") for s in flow.steps)


def window_dedupe_key(w: WindowState) -> str:
    """The emitted record's dedupe key: one event per flow, window, key and revision, ever."""
    key = hashlib.sha256(w.key.encode()).hexdigest()[:20]
    return f"window:{w.step}:{w.start:.3f}:{key}:r{w.revision}"


class WindowCloser:
    def __init__(
        self, hub: WindowHub, interval_s: float = 1.0, tidy_s: float = 60.0, batch: int = 500
    ) -> None:
        self.hub = hub
        self.interval_s = interval_s
        self.tidy_s = tidy_s
        self.batch = batch
        self.task: asyncio.Task[None] | None = None
        self._failed: set[tuple[str, str, float, str, int]] = (
            set()
        )  # windows whose emission raised, told once
        self.open: dict[str, int] = {}  # per flow: windows holding records not yet emitted (the last round's)
        self._wake = asyncio.Event()

    def start(self, leader: Leader = LOCAL) -> None:
        """Close windows wherever lease `windows` is held (engine/leader.py): on one node of a cluster."""
        self.task = leader.hold("windows", lambda _fence: self._run())

    def kick(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def _run(self) -> None:
        next_tidy = 0.0
        failing = False
        while True:
            now = time.time()
            try:
                await self.close_due(now)
                if now >= next_tidy:
                    windows, keys = await self.hub.store.tidy_windows(now)
                    if windows or keys:
                        log.info("let go of %d emitted windows and %d expired dedupe keys", windows, keys)
                    next_tidy = now + self.tidy_s
                await self.gauges()
                if failing:
                    log.warning("closing aggregate windows succeeds again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is unavailable, ...: the next round tries again
                if not failing:  # one line per spell of trouble, not one a second
                    log.exception("closing aggregate windows; trying again every %.0f s", self.interval_s)
                failing = True
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass

    async def gauges(self) -> None:
        self.open = await self.hub.store.open_windows()
        for name, fr in self.hub.flows.items():
            if any(s.kind == "aggregate" for s in fr.spec.steps):
                self.hub.metrics.windows_open.labels(name).set(self.open.get(name, 0))

    def open_windows(self, flow: FlowSpec) -> int | None:
        """The flow's open windows as last counted; None when it has no aggregate step."""
        if not any(s.kind == "aggregate" for s in flow.steps):
            return None
        return self.open.get(flow.name, 0)

    async def close_due(self, now: float | None = None) -> int:
        """Emit every window due by `now`; how many were emitted."""
        store: Store = self.hub.store
        steps = [
            (name, s.name)
            for name, fr in self.hub.flows.items()
            for s in fr.spec.steps
            if s.kind == "aggregate"
        ]
        emitted = 0
        while steps:
            # Only the aggregate steps the hub runs: windows of a step removed from its flow stay, unemitted.
            due = await store.closable_windows(time.time() if now is None else now, self.batch, steps)
            for w in due:
                try:
                    if await self._emit(store, w):
                        emitted += 1
                except StoreUnavailable:
                    raise  # every window would fail alike: the next round tries again
                except Exception:  # e.g. a custom step after the aggregate raises: the others go on
                    ident = (w.flow, w.step, w.start, w.key, w.revision)
                    if ident not in self._failed:
                        self._failed.add(ident)
                        log.exception(
                            "emitting window %s of %s/%s; trying again every round", w.label, w.flow, w.step
                        )
            if len(due) < self.batch:
                break
        return emitted

    async def _emit(self, store: Store, w: WindowState) -> bool:
        fr = self.hub.flows.get(w.flow)
        spec = None if fr is None else next((s for s in fr.spec.steps if s.name == w.step), None)
        if spec is None or spec.kind != "aggregate":  # the flow changed since the query
            return False
        record = spec.step.window_record(w)
        note = {
            "step": w.step,
            "kind": "aggregate",
            "emitted": {"window": w.label, "key": record["key"], "revision": w.revision, "records": w.adds},
        }

        async def commit(event: NewEvent) -> Accepted:
            return await store.emit_window(event, w)

        accepted, status = await self.hub.ingest(
            w.flow,
            orjson.dumps(record),
            record,
            dedupe_key=window_dedupe_key(w),
            meta={"window": note, "after_step": w.step},
            commit=commit,
            after=w.step,
        )
        if not accepted.duplicate:
            self.hub.metrics.windows_emitted.labels(w.flow).inc()
            log.info(  # not the key: it may be a person's email
                "window %s of %s/%s (revision %d, %d records) emitted as run %s: %s",
                w.label,
                w.flow,
                w.step,
                w.revision,
                w.adds,
                accepted.event_id,
                status,
                extra={"event_id": accepted.event_id, "flow": w.flow},
            )
        return True
