"""The hub: one project's flows wired to a store, destination workers and an ingest function."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from patchbay import registry
from patchbay.config.entities import EntitySpec
from patchbay.config.project import FlowSpec, Project, SystemSpec, load_or_raise, system_secret_refs
from patchbay.connectors.base import Batch, Outcome, Resources, Sink, SourceRecord
from patchbay.contracts import parse_answer, response_drift
from patchbay.engine.alerts import AlertManager
from patchbay.engine.batch_runs import BatchRuns, LastRun, LiveRun, RunGoing, as_error
from patchbay.engine.calls import CallSink, CallWorker, build_call_sinks, call_destinations
from patchbay.engine.delivery import DestinationWorker
from patchbay.engine.intake import REMOTE_TTL_S, TELL_INTAKE_S, Intake
from patchbay.engine.leader import Leader, current_fence
from patchbay.engine.pipeline import CALL_PREFIX, Pipeline
from patchbay.engine.resources import system_resources
from patchbay.engine.retention import Retention
from patchbay.engine.roles import HEARTBEAT_S, LOST_AFTER_S, SCHEDULER, WEB, WORKER, Node
from patchbay.engine.scheduler import ScheduleRunner
from patchbay.engine.sources import ALERT_AFTER, WAITING, SourceHealth, consume, health_of, poll_once
from patchbay.engine.sync import EntitySync, Item, first_run, first_run_needed, sync_flows
from patchbay.engine.waiting import wait_set
from patchbay.engine.windows import WindowCloser, has_gates
from patchbay.errors import TransientError
from patchbay.metrics import Metrics
from patchbay.records import new_id
from patchbay.security.fields import FieldCipher, open_field_cipher
from patchbay.security.secrets import SecretResolver
from patchbay.security.ssrf import HttpPools
from patchbay.store.base import Accepted, Actor, Fence, NewEvent, NodeRow, SourceState
from patchbay.store.opening import open_hub_store
from patchbay.store.sqlite import SqliteStore, StoreLocked

log = logging.getLogger("patchbay.hub")
alerts = logging.getLogger("patchbay.alert")


def build_sinks(
    flow: FlowSpec, project: Project, resolver: SecretResolver, resources: Resources | None
) -> dict[str, Sink]:
    """One destination object per flow destination, each seeing only its own system's credentials."""
    out: dict[str, Sink] = {}
    for dest in flow.destinations:
        system: SystemSpec = project.systems[dest.system]
        found = registry.connector_for(dest.kind, "destination")
        assert found is not None
        cls, _ = found
        res = system_resources(project, resolver, system, flow.name, resources)
        out[dest.name] = cls(system.config, dest.config, dest.policy, res)
    out.update(build_call_sinks(flow, project, resolver, resources, system_resources))  # `call:<step>`
    return out


def open_resolver(project: Project) -> tuple[SecretResolver, Any]:
    """The secret resolver for a project: its vault (if a master key exists) then the environment."""
    return open_resolver_for(project.root), None


def field_cipher(project: Project) -> FieldCipher | None:
    """The cipher of the project's encrypted sensitive fields (None when it has never had one)."""
    from patchbay.security.project import open_project_secrets

    vault, _ = open_project_secrets(project.root)
    encrypting = [f.name for f in project.flows.values() if f.encrypt_sensitive and f.sensitive]
    return open_field_cipher(vault, needed_by=encrypting)


def open_resolver_for(root: Path) -> SecretResolver:
    from patchbay.security.project import open_project_secrets

    return open_project_secrets(root)[1]


@dataclass
class FlowRuntime:
    spec: FlowSpec
    pipeline: Pipeline
    workers: dict[str, DestinationWorker]
    source: Any = None
    schedule: ScheduleRunner | None = None
    stream_task: asyncio.Task[None] | None = None
    health: SourceHealth | None = None  # of its source or schedule, when it has one


class Hub:
    def __init__(
        self, project: Project, *, resolver: SecretResolver | None = None, node: Node | None = None
    ) -> None:
        self.project = project
        self.node = node or Node()  # this process's id and roles (engine/roles.py); default: every role
        self.metrics = Metrics()
        # Webhooks yield to deliveries while a destination of this process falls behind (engine/intake.py).
        self.intake = Intake(project.settings.intake_when_behind, self.metrics.intake_limited.set)
        self.resolver = resolver
        self.store: SqliteStore | None = None
        self.resources = Resources()
        self.flows: dict[str, FlowRuntime] = {}  # the project's flows and the internal `_alerts` flow
        self._watch: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self.alert_manager: AlertManager | None = None
        self.batch: BatchRuns | None = None  # batch flows' runs (schedule, API, console), from start()
        self.retention: Retention | None = None  # removes and compresses finished runs (`history:`)
        self._cipher: FieldCipher | None = None  # of encrypted sensitive fields, from start()
        self.windows: WindowCloser | None = None  # closes aggregate windows, when a flow has gate steps
        self.started_at = time.time()
        self.syncs: dict[str, EntitySync] = {}  # entity -> its sync (flows with `sync:`), from add_flow
        self.leader = Leader(None, self.node.id)  # this node's leases (engine/leader.py), from start()
        self.port: int | None = None  # where it listens, once it does (the cluster view shows it)
        self.row: NodeRow | None = None  # this process's row in the store's `nodes`, from start()
        self._heartbeat: asyncio.Task[None] | None = None
        # Set when another process took this node id (this one was not heard from for LOST_AFTER_S: paused,
        # cut off): the serve loop stops this one, which must not renew that one's claims and leases as its own.
        self.displaced = asyncio.Event()
        self._stored_sources: dict[str, SourceState] = {}  # a node without the scheduler role: the store's
        self._announce: dict[str, bool] = {}  # flows whose new deliveries other processes hear of next
        self._intake_news: dict[str, bool] = {}  # destinations here behind (True) or caught up, to tell next
        self._intake_at = 0.0  # when that was last told (time.monotonic): at most every TELL_INTAKE_S
        self._intake_timer: asyncio.TimerHandle | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._look = asyncio.Event()  # the state watcher looks now (another process changed a state)
        self.watch_s = 0.5  # ...and at least this often (the CLI's changes, a missed wake-up)

    @classmethod
    def from_dir(cls, root: Path) -> Hub:
        project = load_or_raise(root)  # secrets are checked in start(), with the vault open
        return cls(project)

    # -------------------------------------------------------------- lifecycle
    async def start(self, *, lock: bool = True) -> None:
        if self.resolver is None:
            self.resolver, _ = open_resolver(self.project)
        self._cipher = field_cipher(
            self.project
        )  # before anything opens: a missing master key stops the start
        location = self.project.store_location
        self.store = open_hub_store(location, holder=self.node.id, lease_s=self.project.settings.claim_lease)
        self.metrics.store_work = lambda: getattr(self.store, "counter", None)
        if lock:  # SQLite: the roles this process takes of the file (one worker, one scheduler, any web); a
            # process running another's singleton role is refused. PostgreSQL: nothing (same node id refused)
            try:
                self.store.lock(self.node.roles, self.node.id)
            except BaseException:
                await self.store.close()
                raise
        try:
            await self._join(refuse=lock)
        except BaseException:
            await self.store.close()
            raise
        # Other processes' accepts wake the workers here, and their workers' growing backlogs slow intake here.
        if self.store.shared:
            self.store.listen(
                self._woken, self._heard_behind if self.node.runs(WEB) else None, self.node.runs(WORKER)
            )
        # What runs once in the cluster runs under a lease (schedules, consumers, windows, alerts, retention,
        # first runs); on a store one hub owns, every lease is this hub's.
        self.leader = Leader(self.store, self.node.id)
        self.resources.http = HttpPools()  # every system's connections, shared by its flows
        self.resources.redact = self.resolver.redactor
        self.batch = BatchRuns(self.project, self.resolver, self.store, self._batch_finished)
        await self.batch.load()
        self.alert_manager = AlertManager(self)  # alert messages are events of the internal flow `_alerts`
        for name, last in self.batch.last.items():
            self.alert_manager.note_batch(name, last)
        flows = list(self.project.flows.values())
        if self.alert_manager.flow is not None:
            flows.append(self.alert_manager.flow)
        for flow in flows:  # resolve now: a missing secret stops the start, before anything runs
            self._resolve_secrets(flow)
        scheduler = self.node.runs(SCHEDULER)
        if scheduler:
            await self._first_runs()
        for flow in flows:
            await self.add_flow(flow)
        self._watch = asyncio.create_task(self._watch_states())
        if not scheduler:  # what runs once in the cluster runs on the nodes with the scheduler role
            return
        if self.syncs:  # creates not linked in time: on the one node holding lease `pending-creates`
            self._sweep = self.leader.hold("pending-creates", lambda _fence: self._sweep_pending())
        await self.alert_manager.start(self.leader)
        self.retention = Retention(
            self.store, lambda: [fr.spec for fr in self.flows.values()], on_counts=self._count_history
        )
        self.retention.start(self.leader)
        if any(has_gates(f) for f in flows):  # first round at once: windows that closed while down
            self.windows = WindowCloser(self)
            self.windows.start(self.leader)

    # -------------------------------------------------------------- the node among the others
    async def _join(self, refuse: bool) -> None:
        """This process's row in the store's `nodes`, and its heartbeat. With `refuse`, a live process of
        the same node id stops the start (StoreLocked); one that died on this host is taken over."""
        assert self.store is not None
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("patchbay")
        except PackageNotFoundError:
            ours = "0"
        now = time.time()
        row = NodeRow(
            self.node.id, socket.gethostname(), os.getpid(), self.node.role_names, ours, self.port, now, now
        )
        held = await self.store.join_cluster(row, LOST_AFTER_S, force=not refuse)
        if held is not None and held.host == row.host and held.pid != row.pid and not _alive(held.pid):
            held = await self.store.join_cluster(
                row, LOST_AFTER_S, force=True
            )  # it died here: its id is free
        if held is not None:
            raise StoreLocked(
                f"opening the store {self.store.path}: node {row.id} is already running (pid {held.pid} on"
                f" {held.host}, heartbeat {max(0.0, now - held.heartbeat_at):.0f} s ago); give this process"
                f" another --node (or PATCHBAY_NODE_ID), or stop that one first"
            )
        self.row = row
        self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")
        # A node that died on this host (its process is gone: a kill -9, a crash) holds nothing any more: its
        # claimed deliveries are due again now, not when their leases run out.
        gone = [
            n.id
            for n in await self.store.nodes(now)
            if n.host == row.host and n.stopped_at is None and n.pid != row.pid and not _alive(n.pid)
        ]
        released = await self.store.release_claims(gone) if gone else 0
        if released:
            log.info(
                "%d deliveries claimed by %s (gone from this host) are due again", released, ", ".join(gone)
            )

    def serving_on(self, port: int) -> None:
        """The port it listens on (the cluster view shows it), written with the next heartbeat, at once."""
        self.port = port
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = asyncio.create_task(self._beat(first=0.0), name="heartbeat")

    def claims_held(self) -> int:
        """The deliveries this process's workers hold claimed now (queued or in flight), written with each
        heartbeat: where claims live in memory (SQLite) it is the cluster view's only source of them."""
        return sum(len(w.leased) for fr in self.flows.values() for w in fr.workers.values())

    async def _beat(self, first: float = HEARTBEAT_S) -> None:
        assert self.store is not None and self.row is not None
        wait = first
        while True:
            await asyncio.sleep(wait)
            wait = HEARTBEAT_S
            self.intake.expire()  # what other processes did not say again, even while no webhook comes
            self._tell_intake(dict.fromkeys(self.intake.own, True))  # said again while it holds
            try:
                mine = await self.store.heartbeat(
                    self.row.id, self.row.started_at, time.time(), self.port, self.claims_held()
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store's own problem is in /readyz; try again at the next beat
                log.warning("writing the heartbeat of node %s: %s", self.row.id, exc)
                continue
            if not mine:
                log.error(
                    "node %s: another process has taken this node id (this one's heartbeat stopped for more"
                    " than %.0f s); this process stops, as the claims and leases of node %s are that one's now;"
                    " give every process its own --node",
                    self.row.id,
                    LOST_AFTER_S,
                    self.row.id,
                )
                self.displaced.set()
                return

    def wake(self, flows: list[str] | None = None, *, rescan: bool = True) -> None:
        """Deliveries of `flows` (every flow: None) became due, or a destination's state changed (a replay, a
        resume, a decision): the workers here look now, and the workers of the other processes too."""
        for name in self.flows if flows is None else flows:
            fr = self.flows.get(name)
            self._notify(fr.workers.values() if fr is not None else (), rescan)
            self._tell_others(name, rescan)

    def _notify(self, workers: Iterable[DestinationWorker], rescan: bool) -> None:
        """New deliveries wake the workers. A rescan (a replay, a state changed elsewhere, a listener that
        connected again) wakes those that are reading; for the idle ones the state watcher looks now: one read
        finds which of them have anything due, where waking each made it take its sending slots and read."""
        look = False
        for w in workers:
            if rescan and w.idle:
                look = True
            else:
                w.notify(rescan=rescan)
        if look:
            self._look.set()

    def _tell_others(self, flow: str, rescan: bool = False) -> None:
        """Coalesced: the flows gathered while one announcement is sent go out together in the next."""
        if self.store is None or not self.store.shared:
            return
        self._announce[flow] = self._announce.get(flow, False) or rescan
        self._start_announcer()

    def _behind_changed(self, who: str, behind: bool) -> None:
        """A destination of this process ("flow/name") fell behind, or caught up: webhooks here yield to its
        deliveries, and the other processes' too (`_heard_behind`; engine/intake.py)."""
        self.intake.report(who, behind)
        self._tell_intake({who: behind})

    def _heard_behind(self, who: str, behind: bool) -> None:
        """Another process's destination ("flow/name on node") is behind, or caught up: intake here yields
        to it too, for REMOTE_TTL_S unless heard again (a worker that dies behind is not waited for)."""
        self.intake.report(who, behind, REMOTE_TTL_S)

    def _tell_intake(self, news: dict[str, bool]) -> None:
        """Told with the next announcement, at most every TELL_INTAKE_S: a destination that goes behind and
        back many times a second (each read of due deliveries decides it) is told as where it ends up."""
        if self.store is None or not self.store.shared or not news:
            return
        self._intake_news.update(news)
        if self._intake_timer is None:
            wait = max(0.0, self._intake_at + TELL_INTAKE_S - time.monotonic())
            self._intake_timer = asyncio.get_running_loop().call_later(wait, self._intake_due)

    def _intake_due(self) -> None:
        self._intake_timer = None
        self._intake_at = time.monotonic()
        self._start_announcer()

    def _start_announcer(self) -> None:
        if self._announcer is None or self._announcer.done():
            self._announcer = asyncio.create_task(self._send_announcements(), name="announce")

    async def _send_announcements(self) -> None:
        assert self.store is not None
        while self._announce or (self._intake_news and self._intake_timer is None):
            batch, self._announce = self._announce, {}
            news = {}
            if self._intake_timer is None:  # (else it is told when the timer fires)
                news, self._intake_news = self._intake_news, {}
            try:
                for rescan in (False, True):
                    flows = [f for f, r in batch.items() if r is rescan]
                    if flows:
                        await self.store.announce(flows, rescan=rescan)
                if news:
                    behind = [w for w, b in news.items() if b]
                    await self.store.announce_intake(
                        self.node.id, behind, [w for w, b in news.items() if not b]
                    )
            except Exception as exc:  # the others rescan or look each half second: late, not lost
                log.debug("telling the other processes of new deliveries or backlogs: %s", exc)

    def _woken(self, flow: str, rescan: bool) -> None:
        """Another process announced deliveries of `flow` (every flow: empty); `rescan`: states changed too."""
        for fr in self.flows.values() if not flow else filter(None, [self.flows.get(flow)]):
            self._notify(fr.workers.values(), rescan)
        if rescan:
            self._look.set()

    def _count_history(self, flow: str, removed: int, compressed: int) -> None:
        self.metrics.history_removed.labels(flow).inc(removed)
        self.metrics.history_compressed.labels(flow).inc(compressed)

    async def _first_runs(self) -> None:
        """An entity whose identity map is empty starts with a first run: every polled system is read and
        linked before anything is written, so records that exist on both sides are not duplicated."""
        assert self.store is not None
        for name, ent in self.project.entities.items():
            flows = sync_flows(self.project.flows, name)
            if not flows or not await first_run_needed(self.store, name):
                continue
            # One node runs it (lease `first-run:<entity>`); the others wait for it, then find it done.
            await self.leader.once(f"first-run:{name}", partial(self._first_run, name, ent, flows))

    async def _first_run(
        self, name: str, ent: EntitySpec, flows: list[FlowSpec], fence: Fence | None
    ) -> None:
        assert self.store is not None and self.resolver is not None
        resolver = self.resolver
        if not await first_run_needed(self.store, name):
            return  # another node did it while this one waited for the lease
        sync = self.syncs[name] = EntitySync(ent, self.store)

        def pipeline_of(f: FlowSpec) -> Pipeline:
            return Pipeline(f, build_sinks(f, self.project, resolver, self.resources), self._cipher)

        def source_of(f: FlowSpec) -> Any:
            assert f.source is not None
            found = registry.connector_for(f.source.kind, "source")
            assert found is not None
            system = self.project.systems[f.source.system]
            res = system_resources(self.project, resolver, system, f.name, self.resources)
            return found[0](system.config, f.source.config, res)

        preview = await first_run(sync, flows, pipeline_of, source_of, dry_run=False)
        if sum(preview.records.values()):
            log.info("first run of %s: %s", name, preview.summary())

    def _resolve_secrets(self, flow: FlowSpec) -> None:
        assert self.resolver is not None
        called = [str(getattr(s.config, "system", "")) for s in flow.steps if getattr(s.step, "calls", False)]
        for system in dict.fromkeys([*(d.system for d in flow.destinations), *called]):
            for ref in system_secret_refs(self.project.systems[system]):
                self.resolver.resolve(ref)

    async def add_flow(self, spec: FlowSpec) -> FlowRuntime:
        """Wire a flow to the store and start it: destination workers, then its source or schedule.

        The one way a flow joins the hub, for the project's flows and the internal `_alerts` flow alike.
        """
        assert self.store is not None and self.resolver is not None
        if spec.name in self.flows:
            raise ValueError(f"adding flow {spec.name}: the hub already runs a flow of that name")
        self._resolve_secrets(spec)
        states = await self.store.destination_states()
        sinks = build_sinks(spec, self.project, self.resolver, self.resources)
        pipeline = Pipeline(spec, sinks, self._cipher)
        workers = {}
        for dest in spec.destinations:
            state, reason, _ = states.get((spec.name, dest.name), ("active", None, 0.0))
            workers[dest.name] = DestinationWorker(
                spec.name,
                dest,
                sinks[dest.name],
                self.store,
                state=state,
                on_state=self._destination_state_changed,
                on_attempt=self._count_attempt,
                open_request=pipeline.open_request,
                on_answer=self._answer_check(spec, dest.name, sinks[dest.name]),
                renew_s=self.project.settings.claim_lease / 3,
                on_behind=self._behind_changed,
            )
            if state != "active":
                alerts.warning(
                    "destination %s of flow %s is %s: %s; run `patchbay resume %s %s`",
                    dest.name,
                    spec.name,
                    state,
                    reason,
                    spec.name,
                    dest.name,
                )
        workers.update(self._call_workers(spec, sinks, pipeline, states))
        fr = self.flows[spec.name] = FlowRuntime(spec, pipeline, workers)
        if spec.sync is not None and spec.sync not in self.syncs:
            self.syncs[spec.sync] = EntitySync(self.project.entities[spec.sync], self.store)
        for name, w in workers.items():
            self._apply_destination_state(fr, name, w.state)
            if self.node.runs(WORKER):  # elsewhere the worker object only holds the state (API, metrics)
                w.start()
        if self.node.runs(SCHEDULER):
            await self._start_trigger(fr)
        return fr

    def _call_workers(
        self, spec: FlowSpec, sinks: dict[str, Sink], pipeline: Pipeline, states: Any
    ) -> dict[str, DestinationWorker]:
        """A worker per call step (engine/calls.py): its answers continue their runs."""
        assert self.store is not None
        out: dict[str, DestinationWorker] = {}
        for dest in call_destinations(spec, self.project):
            sink = sinks[dest.name]
            if isinstance(sink, CallSink):
                sink.store = self.store  # the answers' cache

            def continued(added: list[str], flow: str = spec.name) -> None:
                fr = self.flows.get(flow)
                for name in added if fr is not None else ():
                    if name in fr.workers:  # type: ignore[union-attr]
                        fr.workers[name].notify()  # type: ignore[union-attr]

            state, _, _ = states.get((spec.name, dest.name), ("active", None, 0.0))
            out[dest.name] = CallWorker(
                spec.name,
                dest,
                sink,
                self.store,
                state=state,
                on_state=self._destination_state_changed,
                on_attempt=self._count_attempt,
                open_request=pipeline.open_request,
                on_answer=self._answer_check(spec, dest.name.removeprefix(CALL_PREFIX), sink),
                pipeline=pipeline,
                on_continued=continued,
                renew_s=self.project.settings.claim_lease / 3,
                on_behind=self._behind_changed,
            )
        return out

    async def _start_trigger(self, fr: FlowRuntime) -> None:
        spec = fr.spec
        if not spec.enabled or (spec.source is None and spec.trigger.schedule is None):
            return
        assert self.store is not None and self.resolver is not None
        saved = (await self.store.source_states()).get(spec.name)
        fr.health = SourceHealth(spec.name, self._source_state_changed, saved)
        self._source_gauges(fr.health.state)
        if saved is not None and saved.state in ("paused", "stopped"):
            log.warning(
                "the source of flow %s was %s (%s); trying it again once at start",
                spec.name,
                saved.state,
                saved.error,
            )
        if spec.source is not None:
            system = self.project.systems[spec.source.system]
            found = registry.connector_for(spec.source.kind, "source")
            assert found is not None
            res = system_resources(self.project, self.resolver, system, spec.name, self.resources)
            fr.source = found[0](system.config, spec.source.config, res)
        if spec.trigger.schedule is not None:
            if spec.batch is not None:
                job = self._batch_job(spec)
            elif fr.source is not None:
                src = fr.source

                async def job(due: float) -> None:
                    await poll_once(self, fr, src)
            else:

                async def job(due: float) -> None:
                    tick = {
                        "flow": spec.name,
                        "scheduled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due)),
                    }
                    await self.ingest_batch(spec.name, Batch([SourceRecord(tick, id=f"tick:{due:.0f}")]))

            fr.schedule = ScheduleRunner(spec.name, spec.trigger.schedule, self.store, job, fr.health)
            fr.schedule.start(self.leader)
        elif fr.source is not None and spec.source is not None and spec.source.mode == "stream":
            src, health = fr.source, fr.health
            fr.stream_task = self.leader.hold(
                f"source:{spec.name}", lambda _fence: consume(self, fr, src, health)
            )

    # -------------------------------------------------------------- batch runs
    def _batch_job(self, spec: FlowSpec) -> Callable[[float], Awaitable[None]]:
        """A batch flow's scheduled run; a failed or stopped one raises, so the schedule's health reads it."""

        async def job(due: float) -> None:
            assert self.batch is not None
            try:
                live = await self.batch.run(spec, "schedule")
            except asyncio.CancelledError:  # the schedule stops here (its lease lost, the hub stopping)
                await self.batch.cancel(spec.name)
                raise
            except RunGoing as exc:  # never two at once: the run going stands for this one, its result too
                log.info(
                    "flow %s: a run is going (%s, started by %s); the scheduled run waits for it instead",
                    spec.name,
                    exc.live.run_id,
                    exc.live.trigger,
                )
                live = exc.live
                await live.done.wait()
            if live.report is None:
                raise TransientError(f"batch run {live.run_id} could not be recorded; see the log")
            if live.report.status != "ok":
                raise as_error(live.report)

        return job

    def start_batch(self, flow: str, trigger: str, *, accept_schema: bool = False) -> LiveRun:
        """Start a run of batch flow `flow` now (RunGoing when one is going); the API's and console's way."""
        assert self.batch is not None
        return self.batch.start(self.flows[flow].spec, trigger, accept_schema=accept_schema)

    async def _batch_finished(self, spec: FlowSpec, live: LiveRun) -> None:
        """A good run started by hand also clears its stopped or failing schedule; alerts look again."""
        fr = self.flows.get(spec.name)
        report = live.report
        if live.trigger != "schedule" and fr is not None and fr.health is not None and report is not None:
            if report.status == "ok":
                await fr.health.succeeded()
                await fr.health.resume()
        if self.alert_manager is not None and self.batch is not None:
            self.alert_manager.note_batch(spec.name, self.batch.last.get(spec.name))
            if report is not None and report.schema_changes:  # the source's columns changed: drift too
                self.alert_manager.note_drift(spec.name, report.run_id, report.schema_changes, time.time())
            self.alert_manager.kick()

    def failing_batches(self) -> dict[str, LastRun]:
        """Batch flows whose latest run failed or stopped (a later good run clears it)."""
        return {n: last for n, last in (self.batch.last if self.batch else {}).items() if last.failing}

    def not_running(self) -> list[str]:
        """What should be running and is not: the store's writer, delivery workers, sources, schedules."""
        out = []
        if self.store is None or not self.store.writing:
            out.append("store writer")
        workers = self.node.runs(WORKER)
        for name, fr in self.flows.items():
            out += [f"delivery {name}/{w.name}" for w in fr.workers.values() if workers and not w.running]
            if fr.stream_task is not None and fr.stream_task.done():
                out.append(f"source of {name}")
            if fr.schedule is not None and fr.schedule.task is not None and fr.schedule.task.done():
                out.append(f"schedule of {name}")
        return out

    def source_states(self) -> dict[str, SourceState]:
        """The health of every flow's source or schedule (flows without one are absent); on a node without the
        scheduler role, as the nodes running them last wrote it in the store."""
        if not self.node.runs(SCHEDULER):
            return {n: s for n, s in self._stored_sources.items() if n in self.flows}
        return {name: fr.health.state for name, fr in self.flows.items() if fr.health is not None}

    def unhealthy_sources(self) -> dict[str, SourceState]:
        """Sources or schedules paused, stopped, or failed ALERT_AFTER times in a row (see `health_of`)."""
        return {n: s for n, s in self.source_states().items() if health_of(s) in ("paused", "failing")}

    async def stop(self) -> None:
        """Stop taking work, let in-flight deliveries finish within the grace period, close everything.

        Every step is bounded: a connector that will not close cannot keep the store from being closed.
        """
        if self.retention is not None:
            await _bounded(self.retention.stop(), "stopping the history cleanup")
        if self.alert_manager is not None:
            await _bounded(self.alert_manager.stop(), "stopping alert evaluation")
        if self._watch:
            self._watch.cancel()
        if self._sweep:
            self._sweep.cancel()
        if self.windows is not None:
            await _bounded(self.windows.stop(), "stopping the window closer")
        for fr in self.flows.values():  # stop taking new work first
            if fr.schedule is not None:
                await _bounded(fr.schedule.stop(), f"stopping the schedule of {fr.spec.name}")
            if fr.stream_task is not None:
                fr.stream_task.cancel()
                await _bounded(
                    asyncio.gather(fr.stream_task, return_exceptions=True),
                    f"stopping the source of {fr.spec.name}",
                )
            if fr.source is not None:
                await _bounded(fr.source.close(), f"closing the source of {fr.spec.name}")
        if self.batch is not None:  # a run going aborts its destination transaction: nothing half written
            await _bounded(self.batch.stop(), "stopping batch runs", 30)
        grace = self.project.settings.shutdown_grace_s
        await _bounded(
            asyncio.gather(*(w.stop(grace) for fr in self.flows.values() for w in fr.workers.values())),
            "stopping delivery workers",
            grace + 10,
        )
        for fr in self.flows.values():
            for sink in fr.pipeline.sinks.values():
                await _bounded(sink.close(), f"closing a destination of {fr.spec.name}")
        if self.resources.http is not None:
            await _bounded(self.resources.http.close(), "closing HTTP connections")
        for task in (self._heartbeat, self._announcer):
            if task is not None:
                task.cancel()
        if self._intake_timer is not None:
            self._intake_timer.cancel()
        gone = self.intake.own | set(self._intake_news)  # told behind, or still to be told anything
        if self.store is not None and self.store.shared and gone:
            # Nothing of this process holds the other processes' intake down once it is gone.
            self._intake_news = {}
            await _bounded(
                self.store.announce_intake(self.node.id, [], sorted(gone)), "telling the others it is gone"
            )
        if self.store is not None:
            if self.row is not None:  # a clean stop: the cluster view shows it stopped, not lost
                await _bounded(
                    self.store.leave_cluster(self.row.id, self.row.started_at, time.time()),
                    "leaving the cluster",
                )
            await self.store.close()

    # -------------------------------------------------------------- ingest
    def _event(
        self,
        fr: FlowRuntime,
        payload: bytes,
        record: Any,
        dedupe_key: str | None,
        meta: dict[str, Any] | None,
        after: str | None = None,
    ) -> NewEvent:
        event_id = new_id()
        received_at = time.time()
        stored = fr.pipeline.seal_payload(payload, record)  # before a step can change the record
        note = (meta or {}).get("window") if after else None
        processed = fr.pipeline.process(record, event_id, received_at=received_at, after=after, note=note)
        return NewEvent(
            id=event_id,
            flow=fr.spec.name,
            received_at=received_at,
            payload=stored,
            body_hash=hashlib.sha256(payload).hexdigest(),
            dedupe_key=dedupe_key,
            status=processed.status,
            record_key=processed.record_key,
            meta=meta or {},
            trace=processed.trace,
            reason=processed.reason,
            deliveries=processed.deliveries,
            claims=processed.claims,
            windows=processed.windows,
        )

    def _after_commit(self, fr: FlowRuntime, event: NewEvent, accepted: Accepted) -> str:
        name = fr.spec.name
        if accepted.duplicate:
            self.metrics.duplicates.labels(name).inc()
            return "duplicate"
        if accepted.status is not None:  # the store refused it: a duplicate key, or late for its window
            self.metrics.accepted.labels(name, accepted.status).inc()
            if accepted.status == "quarantined":
                log.warning(
                    "quarantined: %s in %s: %s",
                    event.id,
                    name,
                    accepted.reason,
                    extra={"event_id": event.id, "flow": name},
                )
            return accepted.status
        self.metrics.child(self.metrics.accepted, name, event.status).inc()
        self.metrics.observe_steps(name, event.trace)
        drift = next((s["drift"] for s in event.trace if s.get("kind") == "contract"), None)
        if drift:
            self.metrics.drift.labels(name).inc()
            if self.alert_manager is not None:
                self.alert_manager.note_drift(name, event.id, drift, event.received_at)
            log.warning(
                "contract drift in %s, event %s: %s; see `patchbay contract check %s`",
                name,
                event.id,
                "; ".join(drift[:5]) + (f" (and {len(drift) - 5} more)" if len(drift) > 5 else ""),
                name,
                extra={"event_id": event.id, "flow": name},
            )
        if event.status == "quarantined":
            log.warning(
                "quarantined: %s in %s: %s",
                event.id,
                name,
                event.reason,
                extra={"event_id": event.id, "flow": name},
            )
        told = False
        for d in event.deliveries:
            if d.status == "pending":  # a split element's quarantine row is dead from the start
                fr.workers[d.destination].notify()
                if not told:
                    self._tell_others(name)
                    told = True
        return event.status

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
    ) -> tuple[Accepted, str]:
        """Run the steps and persist the event with its deliveries in one transaction.

        `commit` writes the event instead of the store's plain `accept`, for a caller that writes more
        in the same transaction (the alert loop: the message and the rule's new state, `accept_alert`).
        `after`: run the steps after the one so named (a window's record: after its aggregate step).
        """
        assert self.store is not None
        fr = self.flows[flow_name]
        if fr.spec.sync is not None and commit is None:  # a sync flow: the identity map decides the writes
            [event], [accepted] = await self.syncs[fr.spec.sync].step(
                fr.spec, fr.pipeline, [Item(payload, record, dedupe_key)], meta
            )
            return accepted, self._after_commit(fr, event, accepted)
        event = self._event(fr, payload, record, dedupe_key, meta, after)
        accepted = await (commit or self.store.accept)(event)
        return accepted, self._after_commit(fr, event, accepted)

    async def ingest_batch(
        self, flow_name: str, batch: Batch, meta: dict[str, Any] | None = None
    ) -> list[Accepted]:
        """A source's batch: every event and the source cursor in one transaction; returns after commit."""
        assert self.store is not None
        fr = self.flows[flow_name]
        if fr.spec.sync is not None:
            items = [
                Item(r.raw if r.raw is not None else orjson.dumps(r.data), r.data, r.id)
                for r in batch.records
            ]
            synced, accepted = await self.syncs[fr.spec.sync].step(
                fr.spec, fr.pipeline, items, meta, batch.cursor
            )
            for e, a in zip(synced, accepted, strict=True):
                self._after_commit(fr, e, a)
            return accepted
        events = []
        for r in batch.records:
            payload = r.raw if r.raw is not None else orjson.dumps(r.data)
            events.append(self._event(fr, payload, r.data, r.id, meta))
        # A source's commit under its lease (schedule:<flow>, source:<flow>): refused once another node has it.
        accepted = await self.store.accept_batch(events, flow_name, batch.cursor, fence=current_fence())
        for e, a in zip(events, accepted, strict=True):
            self._after_commit(fr, e, a)
        return accepted

    # -------------------------------------------------------------- destination state
    def _apply_destination_state(self, fr: FlowRuntime, dest: str, state: str) -> None:
        """The one place a destination's state reaches its worker and the paused gauge."""
        fr.workers[dest].set_state(state)
        self.metrics.destination_paused.labels(fr.spec.name, dest).set(0 if state == "active" else 1)

    async def _destination_state_changed(self, flow: str, dest: str, state: str, reason: str) -> None:
        assert self.store is not None
        await self.store.set_destination_state(flow, dest, state, reason)
        self._apply_destination_state(self.flows[flow], dest, state)
        if self.alert_manager is not None:
            self.alert_manager.kick()
        alerts.error(
            "ALERT destination %s of flow %s %s: %s; its deliveries wait. Fix it, then run `patchbay resume %s %s`",
            dest,
            flow,
            state,
            reason,
            flow,
            dest,
            extra={"flow": flow, "destination": dest, "alert": state},
        )

    def _answer_check(
        self, spec: FlowSpec, dest: str, sink: Any
    ) -> Callable[[str, Outcome], list[str]] | None:
        """The check of `dest`'s successful answers against the flow's pinned `responses:`, if it has one."""
        if spec.contract is None or dest not in spec.contract.responses:
            return None
        if hasattr(sink, "keep_answer"):
            sink.keep_answer = True  # the sink parses a success's JSON body for the check

        def check(event_id: str, outcome: Outcome) -> list[str]:
            body = outcome.body
            if body is None and outcome.fields is not None and "body" in outcome.fields:
                body = outcome.fields["body"]  # a call's answer, as bound for the later steps
            if body is None:
                body = parse_answer(outcome.excerpt)
            return self.check_answer(spec, dest, event_id, body)

        return check

    def check_answer(self, spec: FlowSpec, name: str, event_id: str, body: Any) -> list[str]:
        """The one line a step that calls an API (`call`, `lookup`) needs: its successful answer's JSON
        body against the flow's `responses:` for `name`; drift is counted, alerted and logged here, and
        returned for the step's trace. Empty when it conforms, or nothing is pinned for `name`."""
        drift = response_drift(spec.contract, name, body) if body is not None else []
        if drift:
            self.note_answer_drift(spec.name, name, event_id, drift)
        return drift

    def note_answer_drift(self, flow: str, name: str, event_id: str, drift: list[str]) -> None:
        """An answer (of a destination, or of a call step) differs from the flow's response contract:
        counted, alerted (`contract_drift`) and logged like input drift, the answer's source named."""
        self.metrics.answer_drift.labels(flow, name).inc()
        if self.alert_manager is not None:
            self.alert_manager.note_drift(flow, event_id, drift, time.time())
        log.warning(
            "contract drift in the answers of %s/%s, event %s: %s; see `patchbay contract check %s`",
            flow,
            name,
            event_id,
            "; ".join(drift[:5]) + (f" (and {len(drift) - 5} more)" if len(drift) > 5 else ""),
            flow,
            extra={"event_id": event_id, "flow": flow, "destination": name},
        )

    def _count_attempt(self, flow: str, dest: str, outcome: Outcome) -> None:
        m = self.metrics
        m.child(m.attempts, flow, dest, outcome.cls.value).inc()
        m.child(m.latency, flow, dest).observe(outcome.latency_ms / 1000)

    async def set_state(self, flow: str, dest: str, state: str, by: Actor | None = None) -> None:
        """Pause or resume a destination by hand; audited (`resume` or the state) in the same transaction."""
        assert self.store is not None
        await self.store.set_destination_state(flow, dest, state, None, by or Actor("api"))
        self._apply_destination_state(self.flows[flow], dest, state)
        self._tell_others(flow, rescan=True)  # their workers read the new state from the store now
        if self.alert_manager is not None:
            self.alert_manager.kick()

    # -------------------------------------------------------------- source state
    async def _source_state_changed(self, old: SourceState, new: SourceState) -> None:
        """SourceHealth's one outlet: the store (for alerts, the API and the CLI), the gauges, the alert loop."""
        assert self.store is not None
        self._source_gauges(new)
        try:
            await self.store.set_source_state(new)
        except Exception:  # the source's own retries go on; the next change writes again
            log.exception("recording the state of the source of flow %s", new.flow)
        crossed = (old.failures >= ALERT_AFTER) != (new.failures >= ALERT_AFTER)
        if (old.state != new.state or crossed) and self.alert_manager is not None:
            self.alert_manager.kick()

    def _source_gauges(self, state: SourceState) -> None:
        self.metrics.source_paused.labels(state.flow).set(1 if state.state in WAITING else 0)
        self.metrics.source_failures.labels(state.flow).set(state.failures)

    async def resume_source(self, flow: str, by: Actor | None = None) -> bool:
        """Try a paused or stopped source (or schedule) again now; False when it was not waiting. On a node
        without the scheduler role, the store's state says so and the node running it tries it again."""
        fr = self.flows[flow]
        assert self.store is not None
        if not self.node.runs(SCHEDULER):
            was = self.source_states().get(flow)
            if was is None or was.state not in WAITING:
                return False
            now = time.time()
            await self.store.set_source_state(SourceState(flow, "active", 0, None, now, now))
            await self.store.audit("resume", f"{flow}/source", by or Actor("api", detail={"was": was.state}))
            self._stored_sources[flow] = SourceState(flow, "active", 0, None, now, now)
            self._tell_others(flow, rescan=True)
            return True
        if fr.health is None or not fr.health.waiting:
            return False
        await self.store.audit(
            "resume", f"{flow}/source", by or Actor("api", detail={"was": fr.health.state.state})
        )
        await fr.health.resume()
        return True

    async def _watch_states(self) -> None:
        """What changed in the store that nobody said here, every half second (at once when another process
        says it changed a state): states changed by the CLI or other processes (pause, resume), and deliveries
        due for a feed that waits idle (a retry or a claim given up elsewhere, a replay by the CLI, a wake that
        was lost). Idle feeds are asked about in one read, however many destinations there are: each asking
        for itself each second, and this look waking every worker, cost an idle cluster of 3 processes and
        50 destinations 1,961 statements a second on PostgreSQL (bench/idle.py)."""
        assert self.store is not None
        while True:
            await wait_set(self._look, self.watch_s)
            self._look.clear()
            try:
                states = await self.store.destination_states()
                sources = await self.store.source_states()
                idle = [w for fr in self.flows.values() for w in fr.workers.values() if w.idle]
                due = await self.store.next_due([(w.flow, w.name) for w in idle])
            except Exception:
                log.exception("reading destination and source states, and what came due for idle feeds")
                continue
            self._stored_sources = sources
            now = time.time()
            for w in idle:
                if due.get((w.flow, w.name), math.inf) <= now:
                    w.notify(rescan=True)
            for fr in self.flows.values():
                for w in fr.workers.values():
                    new, _, since = states.get((fr.spec.name, w.name), ("active", None, 0.0))
                    if new != w.state and since > w.state_since:
                        log.info("destination %s/%s is now %s", fr.spec.name, w.name, new)
                        self._apply_destination_state(fr, w.name, new)
                h, row = fr.health, sources.get(fr.spec.name)
                if h is not None and h.waiting and row is not None and row.state == "active":
                    log.info("the source of flow %s was resumed; trying it again", fr.spec.name)
                    await h.resume()

    async def _sweep_pending(self) -> None:
        """Creates not linked in time: each entity's `read_back_within`, looked at a few times per period."""
        while True:
            syncs = list(self.syncs.values())
            await asyncio.sleep(min([s.ent.doc.read_back_within / 4 for s in syncs] + [30.0]))
            for sync in syncs:
                try:
                    await sync.sweep_pending()
                except Exception:
                    log.exception("checking the creates of %s not linked yet", sync.ent.name)


def _alive(pid: int) -> bool:
    """A process of that id runs on this host (it may be another program: then it is taken for alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _bounded(aw: Awaitable[Any], what: str, seconds: float = 10.0) -> None:
    """Await a shutdown step for at most `seconds`; log (never raise) when it fails or overruns."""
    try:
        async with asyncio.timeout(seconds):
            await aw
    except TimeoutError:
        log.error("%s took more than %.0f s; going on without it", what, seconds)
    except Exception:
        log.exception("%s failed", what)
