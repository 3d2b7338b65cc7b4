"""Schedules: cron (with time zone) or intervals, persisted so missed and late runs are known."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from zoneinfo import ZoneInfo

from patchbay.config.models import ScheduleTrigger
from patchbay.store.base import Store

log = logging.getLogger("patchbay.scheduler")


def next_after(spec: ScheduleTrigger, t: float) -> float:
    """The first scheduled time strictly after `t` (Unix seconds)."""
    if spec.every is not None:
        return t + spec.every
    from croniter import croniter

    assert spec.cron is not None
    base = datetime.fromtimestamp(t, ZoneInfo(spec.timezone))
    return float(croniter(spec.cron, base).get_next(float))


def late_after(spec: ScheduleTrigger) -> float:
    if spec.late_after is not None:
        return spec.late_after
    if spec.every is not None:
        return min(spec.every, 3600.0)
    return 3600.0 if spec.cron is None else min(next_after(spec, time.time()) - time.time() + 60, 3600.0)


class ScheduleRunner:
    """Runs `job` at each scheduled time; never two at once; a missed run at start is caught up once."""

    def __init__(
        self, flow: str, spec: ScheduleTrigger, store: Store, job: Callable[[float], Awaitable[None]]
    ) -> None:
        self.flow = flow
        self.spec = spec
        self.store = store
        self.job = job
        self.task: asyncio.Task[None] | None = None
        self.running = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name=f"schedule {self.flow}")

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

    async def _loop(self) -> None:
        due = await self._first_due()
        await self.store.update_schedule(self.flow, {"next_due_at": due})
        while True:
            await asyncio.sleep(max(0.0, due - time.time()))
            started = time.time()
            nxt = next_after(self.spec, started)
            await self.store.update_schedule(self.flow, {"last_started_at": started, "next_due_at": nxt})
            self.running = True
            status, error = "ok", None
            try:
                await self.job(due)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status, error = "error", f"{type(exc).__name__}: {exc}"
                log.error("scheduled run of %s failed: %s", self.flow, error, extra={"flow": self.flow})
            finally:
                self.running = False
            finished = time.time()
            # No overlap: if the run took longer than the interval, the next one starts after it.
            due = nxt if nxt > finished else next_after(self.spec, finished)
            await self.store.update_schedule(
                self.flow,
                {
                    "last_finished_at": finished,
                    "last_status": status,
                    "last_error": error,
                    "next_due_at": due,
                },
                count_run=True,
            )
