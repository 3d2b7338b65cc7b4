"""Batch runs inside the hub: started by the schedule, the API or the console; one at a time per flow.

start   refused while the flow has a run going (RunGoing names it); the run id is known at once
thread  the run has its own thread and event loop: its steps are pure Python over frames of
        10k rows, which on the hub's loop would hold up webhook acknowledgements for a whole frame
live    phase (preparing, copying, committing, recording) and progress (rows, rows/s, ETA)
record  the quarantined rows before the destination commits (on the hub's loop, its store), then the
        run as one event of the flow with its report; the flow's batch health is its latest run
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from patchbay.config.specs import FlowSpec, Project
from patchbay.engine.batch import Progress, RunReport, record_run, run_flow, store_quarantined
from patchbay.errors import AuthError, PatchbayError, TerminalError, TransientError
from patchbay.records import new_id
from patchbay.security.secrets import SecretResolver
from patchbay.store.base import RunFilter, Store

log = logging.getLogger("patchbay.batch")
alert_log = logging.getLogger("patchbay.alert")
KEEP_FINISHED = 50  # finished runs kept in memory for their progress page (the store keeps every report)
# While a run goes, its thread wants the GIL for pure-Python steps; the hub's loop gets it back after at
# most this long (Python's default is 5 ms). Measured with bench/batch_hub.py, 300k rows, webhooks at 50/s:
# ack p50 10.0 -> 6.3 ms, p99 65 -> 36 ms, the run's rows/s unchanged. Restored when no run goes.
SWITCH_INTERVAL_S = 0.001


class RunGoing(PatchbayError):
    """The flow already has a run going; `live` is that run."""

    def __init__(self, live: LiveRun) -> None:
        self.live = live
        super().__init__(
            f"flow {live.flow} already has a run going: {live.run_id} (started by {live.trigger} at "
            f"{time.strftime('%H:%M:%S', time.gmtime(live.started_at))} UTC, {live.phase}); "
            "wait for it to finish"
        )


@dataclass
class LiveRun:
    """A batch run the hub started: what it is doing now, and its report once it is done."""

    run_id: str
    flow: str
    trigger: str
    started_at: float = field(default_factory=time.time)
    phase: str = "preparing"  # preparing | copying | committing | recording | done
    progress: Progress | None = None
    report: RunReport | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _loop: asyncio.AbstractEventLoop | None = None  # the run's own loop and task, to cancel it
    _task: asyncio.Task[Any] | None = None

    _cancel: bool = False  # the hub is stopping: the run is cancelled as soon as its loop exists

    @property
    def status(self) -> str:
        if self.phase != "done":
            return "running"
        return self.report.status if self.report is not None else "failed"  # not recorded: see the log

    def view(self) -> dict[str, Any]:
        """The run as the API shows it: phase and progress while running, the report when done."""
        p = self.progress
        progress = None
        if self.phase != "done":
            read = p.read if p is not None else 0
            progress = {
                "read": read,
                "written": p.written if p is not None else 0,
                "total": p.total if p is not None else None,
                "rows_per_s": round(p.rate, 1) if p is not None else 0.0,
                "eta_s": round(p.eta_s, 1) if p is not None and p.eta_s is not None else None,
                "elapsed_s": round(time.time() - self.started_at, 3),
                "share": round(min(1.0, read / p.total), 4) if p is not None and p.total else None,
            }
        report = None
        if self.report is not None and self.phase == "done":
            report = {k: v for k, v in self.report.as_dict().items() if k != "samples"}
        return {
            "run_id": self.run_id,
            "flow": self.flow,
            "kind": "batch",
            "trigger": self.trigger,
            "started_at": self.started_at,
            "status": self.status,
            "phase": self.phase,
            "progress": progress,
            "report": report,
        }


@dataclass
class LastRun:
    """A flow's latest finished batch run: what its health is made of."""

    run_id: str
    status: str  # ok | failed | stopped
    error: str | None
    at: float  # when it started

    @property
    def failing(self) -> bool:
        return self.status != "ok"


async def latest_run(store: Store, flow: str, keep_s: float | None = None) -> LastRun | None:
    """The flow's latest recorded batch run (the hub's, the CLI's or the API's), from the store.

    History retention removes good runs after `keep_s` (the flow's `history.keep`) but never a failed one,
    so a failure older than that may have been followed by good runs that are gone: it is not taken as
    the latest (a restart must not call a flow failing for a failure that was long since cleared)."""
    rows = []
    for status in ("delivered", "failed"):
        rows += await store.list_runs(RunFilter(flow=flow, status=status, limit=1))
    if keep_s is not None:
        rows = [r for r in rows if r["status"] == "delivered" or r["received_at"] >= time.time() - keep_s]
    if not rows:
        return None
    row = max(rows, key=lambda r: r["received_at"])
    if row["status"] == "delivered":
        return LastRun(row["id"], "ok", None, row["received_at"])
    reason = row.get("reason") or "failed"
    status, _, error = reason.partition(": ")
    return LastRun(
        row["id"],
        status if status in ("failed", "stopped") else "failed",
        error or reason,
        row["received_at"],
    )


def as_error(report: RunReport) -> PatchbayError:
    """A failed or stopped run in the sources' error vocabulary, for the schedule's health: a stop (drift,
    the delete guard) waits for a resume or a good run; a failure retries or pauses as its cause says."""
    text = f"batch run {report.run_id} {report.status}: {report.error}"
    if report.status == "stopped" or report.error_class == "terminal":
        return TerminalError(text)
    if report.error_class == "auth":
        return AuthError(text)
    return TransientError(text)


class BatchRuns:
    """The hub's batch runs: at most one per flow, each on its own thread; live views; latest results."""

    def __init__(
        self,
        project: Project,
        resolver: SecretResolver,
        store: Store,
        on_finished: Callable[[FlowSpec, LiveRun], Awaitable[None]],
    ) -> None:
        self.project = project
        self.resolver = resolver
        self.store = store
        self.on_finished = on_finished
        self.running: dict[str, LiveRun] = {}
        self.finished: dict[str, LiveRun] = {}  # by run id, the latest KEEP_FINISHED
        self.last: dict[str, LastRun] = {}  # by flow
        self._tasks: set[asyncio.Task[Any]] = set()
        self._switch = sys.getswitchinterval()  # the process's own, restored when no run goes

    async def load(self) -> None:
        """The latest run of each batch flow, as recorded (its health survives a restart)."""
        for name, spec in self.project.flows.items():
            if spec.batch is not None:
                last = await latest_run(self.store, name, spec.history.keep)
                if last is not None:
                    self.last[name] = last

    def get(self, run_id: str) -> LiveRun | None:
        for live in self.running.values():
            if live.run_id == run_id:
                return live
        return self.finished.get(run_id)

    def start(self, spec: FlowSpec, trigger: str, *, accept_schema: bool = False) -> LiveRun:
        """Start a run of `spec` now and return at once; RunGoing when the flow has one going."""
        going = self.running.get(spec.name)
        if going is not None:
            raise RunGoing(going)
        live = LiveRun(new_id("run"), spec.name, trigger)
        if not self.running:
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL_S))
        self.running[spec.name] = live
        task = asyncio.create_task(self._run(spec, live, accept_schema), name=f"batch {spec.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info(
            "batch run %s of flow %s started (%s)", live.run_id, spec.name, trigger, extra={"flow": spec.name}
        )
        return live

    async def run(self, spec: FlowSpec, trigger: str) -> LiveRun:
        """Start a run and wait for it (the schedule's job)."""
        live = self.start(spec, trigger)
        await live.done.wait()
        return live

    async def stop(self) -> None:
        """Cancel the runs going: each aborts its destination transaction (nothing half written)."""
        for live in list(self.running.values()):
            self._cancel(live)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self, flow: str) -> None:
        """Cancel the run of `flow` going, if any, and wait for its end (its schedule moved to another node)."""
        live = self.running.get(flow)
        if live is not None:
            self._cancel(live)
            await live.done.wait()

    @staticmethod
    def _cancel(live: LiveRun) -> None:
        live._cancel = True
        if live._loop is not None and live._task is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: the run has ended
                live._loop.call_soon_threadsafe(live._task.cancel)

    async def _run(self, spec: FlowSpec, live: LiveRun, accept_schema: bool) -> None:
        main = asyncio.get_running_loop()
        try:
            report = await self._in_thread(spec, live, accept_schema, main)
            live.phase = "recording"
            if report.status != "ok":
                await store_quarantined(self.store, spec, report)
            await record_run(self.store, spec, report, trigger=live.trigger)
            live.report = report
            before = self.last.get(spec.name)
            self.last[spec.name] = LastRun(report.run_id, report.status, report.error, report.started_at)
            self._log(spec, report, again=before is not None and before.status == report.status)
        except asyncio.CancelledError:
            log.warning(
                "batch run %s of flow %s was cancelled (the hub is stopping): the destination has all of it or"
                " none of it; a scheduled run is done again at start",
                live.run_id,
                spec.name,
            )
            raise
        except Exception:
            log.exception("batch run %s of flow %s could not be recorded", live.run_id, spec.name)
        finally:
            live.phase = "done"
            self.running.pop(spec.name, None)
            if not self.running:
                sys.setswitchinterval(self._switch)
            if live.report is not None:
                self.finished[live.run_id] = live
                while len(self.finished) > KEEP_FINISHED:
                    self.finished.pop(next(iter(self.finished)))
            try:
                await self.on_finished(spec, live)
            except Exception:
                log.exception("after batch run %s of flow %s", live.run_id, spec.name)
            finally:
                live.done.set()

    async def _in_thread(
        self, spec: FlowSpec, live: LiveRun, accept_schema: bool, main: asyncio.AbstractEventLoop
    ) -> RunReport:
        """run_flow on a thread of its own with its own loop; the store is written on the hub's loop."""
        store = self.store

        def progress(p: Progress) -> None:
            live.progress, live.phase = p, "copying"

        async def before_commit(report: RunReport) -> None:
            live.phase = "committing"
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(store_quarantined(store, spec, report), main)
            )

        async def body() -> RunReport:
            live._loop, live._task = asyncio.get_running_loop(), asyncio.current_task()
            if live._cancel:  # stop() came before this loop existed
                raise asyncio.CancelledError
            return await run_flow(
                self.project,
                self.resolver,
                spec,
                progress=progress,
                before_commit=before_commit,
                accept_schema=accept_schema,
                run_id=live.run_id,
            )

        done: asyncio.Future[RunReport] = main.create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody waits

        def settle(result: RunReport | None, exc: BaseException | None) -> None:
            if done.done():
                return
            if isinstance(exc, asyncio.CancelledError):
                done.cancel()
            elif exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def thread() -> None:
            try:
                result = asyncio.run(body())
            except BaseException as exc:
                main.call_soon_threadsafe(settle, None, exc)
            else:
                main.call_soon_threadsafe(settle, result, None)

        # A daemon thread: a run that will not abort cannot keep the process from exiting.
        threading.Thread(target=thread, name=f"batch {spec.name}", daemon=True).start()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.done() and live._loop is not None and live._task is not None:  # we were cancelled
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: the run ended anyway
                    live._loop.call_soon_threadsafe(live._task.cancel)
            raise

    def _log(self, spec: FlowSpec, report: RunReport, again: bool) -> None:
        extra = {"flow": spec.name, "run_id": report.run_id}
        if report.status == "ok":
            log.info("batch run %s of flow %s: %s", report.run_id, spec.name, report.summary, extra=extra)
            return
        # The first failed run alerts; the ones after it (retries, the schedule) are warnings.
        (log.warning if again else alert_log.error)(
            ("" if again else "ALERT ")
            + "batch run %s of flow %s %s: %s. Nothing was written; `patchbay runs show %s` has the report",
            report.run_id,
            spec.name,
            report.status,
            report.error,
            report.run_id,
            extra={**extra, "alert": "batch_failed"},
        )
