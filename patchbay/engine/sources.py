"""Driving source connectors: polled on a schedule, or consumed continuously, acknowledged after commit.

A source speaks the deliveries' error vocabulary (`engine/policy.py`): what it raises is read by
`outcome_of`, and `SourceHealth` is the one place a flow's source (or schedule) changes state:
transient errors retry with backoff and jitter, auth errors pause it, terminal errors stop it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from patchbay.connectors.base import Batch
from patchbay.engine.policy import SourceDecision, decide_source, outcome_of
from patchbay.store.base import SourceState

if TYPE_CHECKING:
    from patchbay.engine.hub import FlowRuntime, Hub

log = logging.getLogger("patchbay.sources")
alert_log = logging.getLogger("patchbay.alert")
# Failures in a row after which a failing source counts as failing for alerts, /readyz and the console.
ALERT_AFTER = 3
# A stream that stays connected this long (or commits a batch) counts as healthy again.
STREAM_SETTLE_S = 5.0
WAITING = ("paused", "stopped")  # states that wait for a resume (or a restart) before the next try


def health_of(state: SourceState) -> str:
    """The API's and console's word for a source's state: ok, retrying, failing or paused."""
    if state.state == "paused":
        return "paused"
    if state.state == "stopped" or state.failures >= ALERT_AFTER:
        return "failing"
    return "retrying" if state.failures else "ok"


class SourceHealth:
    """The health of one flow's source or schedule; every change goes through `on_change`.

    active:  the last run (or connection) worked
    failing: `failures` runs in a row failed with transient errors; retried with backoff
    paused:  an auth error; waits until resumed (credentials fixed)
    stopped: a terminal error; waits until resumed (configuration or the remote fixed)
    A restart tries once more whatever the state: that is how a fix is usually applied.
    """

    def __init__(
        self,
        flow: str,
        on_change: Callable[[SourceState, SourceState], Awaitable[None]],
        saved: SourceState | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.flow = flow
        self.on_change = on_change
        self.state = saved or SourceState(flow, "active")
        self.rng = rng or random.Random()
        self.resumed = asyncio.Event()
        self.resumed.set()  # the first run after a start happens whatever the saved state

    @property
    def waiting(self) -> bool:
        """Paused or stopped, and not resumed since."""
        return not self.resumed.is_set()

    async def succeeded(self) -> None:
        if self.state.state == "active" and not self.state.failures:
            return  # the common case writes nothing
        await self._change("active", 0, None)

    async def failed(self, exc: BaseException, action: str = "") -> SourceDecision:
        outcome = outcome_of(exc, action)
        failures = self.state.failures + 1
        decision = decide_source(outcome, failures, self.rng)
        flow, extra = self.flow, {"flow": self.flow, "alert": "source_" + decision.state}
        if decision.state in WAITING:
            self.resumed.clear()
            alert_log.error(
                "ALERT the source of flow %s is %s: %s. Fix it, then run `patchbay resume %s` "
                "(or restart the hub)",
                flow,
                decision.state,
                decision.reason,
                flow,
                extra=extra,
            )
        elif failures == ALERT_AFTER:
            alert_log.error(
                "ALERT the source of flow %s keeps failing (%d times in a row): %s; retrying in %.1fs",
                flow,
                failures,
                decision.reason,
                decision.retry_in,
                extra=extra,
            )
        else:
            log.warning(
                "the source of flow %s failed (%d in a row): %s; retrying in %.1fs",
                flow,
                failures,
                decision.reason,
                decision.retry_in,
                extra={"flow": flow},
            )
        await self._change(decision.state, failures, decision.reason)
        return decision

    async def resume(self) -> None:
        """Try again now (someone fixed the cause); the next result sets the state."""
        self.resumed.set()

    async def _change(self, state: str, failures: int, error: str | None) -> None:
        old = self.state
        now = time.time()
        self.state = SourceState(
            self.flow, state, failures, error, old.since if state == old.state else now, now
        )
        await self.on_change(old, self.state)


async def _unrecorded(old: SourceState, new: SourceState) -> None:
    return None


async def poll_once(hub: Hub, fr: FlowRuntime, source: Any) -> int:
    """One scheduled poll: read from the saved cursor, commit each batch with its cursor.

    Errors propagate: the schedule reads them with `SourceHealth.failed`."""
    assert hub.store is not None
    cursor = await hub.store.cursor(fr.spec.name)
    n = 0
    async for batch in source.poll(cursor):
        await hub.ingest_batch(fr.spec.name, batch)
        n += len(batch.records)
    if n:
        log.info("polled %s: %d records", fr.spec.name, n, extra={"flow": fr.spec.name})
    return n


async def consume(hub: Hub, fr: FlowRuntime, source: Any, health: SourceHealth | None = None) -> None:
    """Run a streaming source until cancelled: retry transient failures with backoff; wait for a resume
    after an auth or terminal one. Without `health` (a test's bare runtime), its state is only logged."""
    name = fr.spec.name
    if health is None:
        health = SourceHealth(name, _unrecorded)

    async def emit(batch: Batch) -> None:
        await hub.ingest_batch(name, batch)
        await health.succeeded()

    while True:
        await health.resumed.wait()
        task = asyncio.create_task(source.stream(emit), name=f"stream {name}")
        try:
            done, _ = await asyncio.wait({task}, timeout=STREAM_SETTLE_S)
            if not done:
                await health.succeeded()  # connected and consuming
            await task
            raise ConnectionError("the stream ended")  # stream() runs until cancelled: an end is a failure
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        except Exception as exc:
            decision = await health.failed(exc)
        if decision.retry_in is not None:
            await asyncio.sleep(decision.retry_in)
