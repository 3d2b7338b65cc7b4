"""Schedules: cron (with time zone) or intervals, persisted so missed and late runs are known."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from patchbay.config.models import ScheduleTrigger
from patchbay.engine.leader import LOCAL, Leader
from patchbay.engine.sources import SourceHealth
from patchbay.errors import LeaseLost
from patchbay.store.base import Fence, Store

log = logging.getLogger("patchbay.scheduler")


def next_after(spec: ScheduleTrigger, t: float) -> float:
    """The first scheduled time strictly after `t` (Unix seconds)."""
    if spec.every is not None:
        return t + spec.every
    from croniter import croniter

    assert spec.cron is not None
    base = datetime.fromtimestamp(t, ZoneInfo(spec.timezone))
    return float(croniter(spec.cron, base).get_next(float))


LATE_FLOOR_S = 60.0  # a default tolerance is never shorter: a busy minute is not an outage
LATE_CAP_S = 3600.0


def late_after(spec: ScheduleTrigger) -> float:
    """How overdue a run may be before the schedule is late: `late_after` when set, else one interval
    (at least LATE_FLOOR_S, at most LATE_CAP_S)."""
    if spec.late_after is not None:
        return spec.late_after
    if spec.every is not None:
        interval = spec.every
    elif spec.cron is not None:
        now = time.time()
        interval = next_after(spec, now) - now + 60
    else:
        interval = LATE_CAP_S
    return min(max(interval, LATE_FLOOR_S), LATE_CAP_S)


def late_by(spec: ScheduleTrigger, next_due_at: float | None, now: float) -> float:
    """Seconds the run due at `next_due_at` is overdue, when that is beyond `late_after(spec)`; else 0.

    The one rule for "late": alerts, the API, the console and the CLI all ask it."""
    if not next_due_at:
        return 0.0
    over = now - next_due_at
    return over if over > late_after(spec) else 0.0


class ScheduleRunner:
    """Runs `job` at each scheduled time; never two at once; a missed run at start is caught up once.

    It runs where lease `schedule:<flow>` is held (engine/leader.py), so on one node of a cluster; its
    state (the tick of the run started, the next one due) is written under that lease's fence. A run
    that started and did not finish (its node died, or stopped, during it) is fired again as the same
    tick by the next holder: `job(due)` gets the tick, and its effects' guard (a plain tick's dedupe key,
    a poll's cursor, a batch run's destination transaction) makes the second firing of a tick whose
    effects committed a no-op.

    A failed run is read by `health` (the same vocabulary as deliveries): a transient failure is tried
    again with backoff, before the next scheduled time if that comes sooner; an auth or terminal one
    stops the schedule until it is resumed (no next due time meanwhile, so it is not "late" as well).
    """

    def __init__(
        self,
        flow: str,
        spec: ScheduleTrigger,
        store: Store,
        job: Callable[[float], Awaitable[None]],
        health: SourceHealth,
    ) -> None:
        self.flow = flow
        self.spec = spec
        self.store = store
        self.job = job
        self.health = health
        self.task: asyncio.Task[None] | None = None
        self.running = False
        self.fence: Fence | None = None

    def start(self, leader: Leader = LOCAL) -> None:
        self.task = leader.hold(f"schedule:{self.flow}", self._loop)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _first_due(self) -> float:
        row = await self.store.schedule(self.flow)
        now = time.time()
        due = row and row.get("next_due_at")
        if not due:
            # First start ever: an interval runs now, a cron expression waits for its time.
            return now if self.spec.every is not None else next_after(self.spec, now)
        assert row is not None
        started, finished = row.get("last_started_at") or 0.0, row.get("last_finished_at") or 0.0
        if started > finished:
            # The last run never finished (its hub was killed or stopped during it, or lost the lease): its
            # tick is fired again, once, now (whatever `catch_up` says: that run was not missed, it was cut
            # short). What committed of it is not done twice: the tick's guard (see the class) sees it.
            tick = float(row.get("last_due_at") or started)
            log.info(
                "schedule %s: the run of %s (started at %s) did not finish (its hub stopped during it):"
                " running that tick again now",
                self.flow,
                datetime.fromtimestamp(tick).isoformat(timespec="seconds"),
                datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            )
            return tick
        if due <= now:
            if self.spec.catch_up == "once":
                log.info(
                    "schedule %s missed its run at %s while the hub was down: running it once now",
                    self.flow,
                    datetime.fromtimestamp(due).isoformat(timespec="seconds"),
                )
                return now
            return next_after(self.spec, now)
        return float(due)

    async def _save(self, fields: dict[str, Any], count_run: bool = False) -> None:
        await self.store.update_schedule(self.flow, fields, count_run, fence=self.fence)

    async def _loop(self, fence: Fence | None = None) -> None:
        self.fence = fence  # the lease this node holds the schedule by (None: a store one hub owns)
        due = await self._first_due()
        await self._save({"next_due_at": due})
        while True:
            if self.health.waiting:  # paused or stopped: no run until it is resumed, then one at once
                await self.health.resumed.wait()
                due = time.time()
            await asyncio.sleep(max(0.0, due - time.time()))
            started = time.time()
            nxt = next_after(self.spec, started)
            await self._save({"last_started_at": started, "last_due_at": due, "next_due_at": nxt})
            self.running = True
            status, error, retry_in = "ok", None, None
            try:
                await self.job(due)
            except (asyncio.CancelledError, LeaseLost):
                raise  # not the job's failure: this node stops running the schedule
            except Exception as exc:
                decision = await self.health.failed(exc)
                status, error, retry_in = "error", decision.reason, decision.retry_in
            else:
                await self.health.succeeded()
            finally:
                self.running = False
            finished = time.time()
            # No overlap: if the run took longer than the interval, the next one starts after it.
            due = nxt if nxt > finished else next_after(self.spec, finished)
            if retry_in is not None:
                due = min(due, finished + retry_in)
            await self._save(
                {
                    "last_finished_at": finished,
                    "last_status": status,
                    "last_error": error,
                    "next_due_at": None if self.health.waiting else due,
                },
                count_run=True,
            )
