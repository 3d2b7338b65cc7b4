"""Alert rules: every few seconds, read the store; tell the `notify` systems when a condition starts and ends.

An alert message is an event of the internal flow `_alerts`, which has one destination per notify
target: it is written in the same transaction as the rule's new state (table `alerts`), then
delivered, retried, paused and dead-lettered like any other event. One outage is one alert and one
recovery, and a restart does not alert again, because the state lives in the store.

The same loop refreshes the store-derived metrics (queue depth, oldest pending age, schedule lag,
retries). It reads with the store's `snapshot` (off the delivery path, with a timeout) and writes with
the hub's public `ingest(commit=store.accept_alert)`; it knows the hub only by the `AlertHub` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from patchbay import registry
from patchbay.config.alerts import notify_config, split_notify
from patchbay.config.models import AlertRule, Trigger
from patchbay.config.project import DestinationSpec, FlowSpec, Project
from patchbay.engine.batch_runs import LastRun
from patchbay.engine.leader import LOCAL, Leader, current_fence
from patchbay.engine.scheduler import late_after, late_by
from patchbay.engine.sources import ALERT_AFTER, WAITING
from patchbay.engine.waiting import wait_set
from patchbay.errors import LeaseLost
from patchbay.metrics import Metrics, StoreSnapshot
from patchbay.store.base import Accepted, AlertChange, FailedAttempt, NewEvent, Snapshot, Store

log = logging.getLogger("patchbay.alerts")
alert_log = logging.getLogger("patchbay.alert")


class AlertHub(Protocol):
    """What the alert loop uses of the hub: its project, store and metrics, and its public ingest."""

    @property
    def project(self) -> Project: ...
    @property
    def store(self) -> Store | None: ...
    @property
    def metrics(self) -> Metrics: ...

    async def ingest(
        self,
        flow_name: str,
        payload: bytes,
        record: Any,
        *,
        dedupe_key: str | None = None,
        meta: dict[str, Any] | None = None,
        commit: Callable[[NewEvent], Awaitable[Accepted]] | None = None,
    ) -> tuple[Accepted, str]: ...


ALERT_FLOW = "_alerts"  # not a valid user flow name: it cannot clash with one
DEFAULT_COUNT = 5
DEFAULT_WINDOW_S = 600.0
QUIET_S = 60.0  # failures: no failed attempt for this long (or the window, if shorter) before it clears


@dataclass
class Rule:
    spec: AlertRule
    key: str  # its row in the alerts table, with the subject
    flow: str | None  # None: a hub-wide rule, every flow
    targets: list[str]  # destination names in the _alerts flow

    @property
    def window(self) -> float:
        return self.spec.window or DEFAULT_WINDOW_S


def rule_key(flow: str | None, spec: AlertRule) -> str:
    scope = f"flow:{flow}" if flow else "hub"
    if spec.name:
        return f"{scope}/{spec.name}"
    params = [(k, getattr(spec, k)) for k in ("count", "window", "above")]
    return f"{scope}/{spec.when}" + "".join(f";{k}={v:g}" for k, v in params if v is not None)


def compile_rules(project: Project) -> tuple[list[Rule], FlowSpec | None]:
    """The project's rules, and the internal flow with one destination per distinct notify target."""
    from patchbay.expressions import compile_expr

    dests: list[DestinationSpec] = []
    by_target: dict[bytes, str] = {}
    rules: list[Rule] = []
    scoped: list[tuple[str | None, AlertRule]] = [(None, r) for r in project.settings.alerts]
    scoped += [(f.name, r) for _, f in sorted(project.flows.items()) for r in f.alerts]
    for flow, spec in scoped:
        names = []
        for entry in spec.notify:
            system, settings, delivery = split_notify(entry)
            ident = orjson.dumps([system, settings, delivery], option=orjson.OPT_SORT_KEYS)
            if ident not in by_target:
                taken = {d.name for d in dests}
                name = (
                    system
                    if system not in taken
                    else next(f"{system}-{i}" for i in range(2, 1000) if f"{system}-{i}" not in taken)
                )
                sysspec = project.systems[system]
                found = registry.connector_for(sysspec.kind or "", "destination")
                assert found is not None, "load_project checks notify systems"
                policy = project.settings.delivery.merged(delivery)
                when = compile_expr(f"contains(notify, '{name}')")
                dests.append(
                    DestinationSpec(
                        name, system, sysspec.kind or "", notify_config(found[1], settings), policy, when
                    )
                )
                by_target[ident] = name
            names.append(by_target[ident])
        rules.append(Rule(spec, rule_key(flow, spec), flow, list(dict.fromkeys(names))))
    if not dests:
        return rules, None
    flow_spec = FlowSpec(
        ALERT_FLOW,
        "alert messages of this hub",
        "patchbay",
        Trigger.model_validate({"manual": True}),
        [],
        dests,
        "subject",
        [],
        True,
        "<alerts>",
        0,
    )
    return rules, flow_spec


# ---------------------------------------------------------------- findings
@dataclass
class Finding:
    """What one rule sees for one subject now, with the words for both messages."""

    rule: Rule
    subject: str
    flow: str
    destination: str | None
    active: bool
    since: float = 0.0
    title: str = ""
    text: str = ""
    ok_title: str = ""
    ok_text: str = ""
    detail: str = ""


@dataclass
class _Failures:
    """Failed attempts per destination in one-second buckets, fed incrementally from the attempts table."""

    buckets: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    last: dict[tuple[str, str], tuple[float, bool]] = field(default_factory=dict)  # latest attempt: (at, ok)
    last_failure: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)  # (at, summary)

    def feed(self, rows: list[FailedAttempt]) -> None:
        for r in rows:
            key = (r.flow, r.destination)
            ok = r.outcome == "success"
            self.last[key] = (r.started_at, ok)
            if not ok:
                b = self.buckets.setdefault(key, {})
                b[int(r.started_at)] = b.get(int(r.started_at), 0) + 1
                code = r.status_code  # with a status, `error` is often only the retry decision
                summary = f"HTTP {code}" if code is not None else (r.error or r.outcome)
                self.last_failure[key] = (r.started_at, summary)

    def since(self, key: tuple[str, str], t: float) -> tuple[int, float | None]:
        """Failures at or after `t`, and when the first of them happened."""
        hits = [(s, n) for s, n in self.buckets.get(key, {}).items() if s >= int(t)]
        return sum(n for _, n in hits), min((s for s, _ in hits), default=None)

    def trim(self, before: float) -> None:
        for b in self.buckets.values():
            for s in [s for s in b if s < before]:
                del b[s]


@dataclass
class _Drift:
    """Events that drifted from their flow's contract, per flow in one-second buckets, and the latest."""

    buckets: dict[str, dict[int, int]] = field(default_factory=dict)
    last: dict[str, tuple[int, str, list[str]]] = field(default_factory=dict)  # (second, event id, drift)

    def feed(self, flow: str, second: int, n: int, event_id: str, drift: list[str]) -> None:
        b = self.buckets.setdefault(flow, {})
        b[second] = b.get(second, 0) + n
        if second >= self.last.get(flow, (0, "", []))[0]:
            self.last[flow] = (second, event_id, drift)

    def since(self, flow: str, t: float) -> int:
        return sum(n for s, n in self.buckets.get(flow, {}).items() if s >= int(t))

    def trim(self, before: float) -> None:
        for b in self.buckets.values():
            for s in [s for s in b if s < before]:
                del b[s]


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-"


def _waiting(n: int) -> str:
    return "1 delivery waits" if n == 1 else f"{n} deliveries wait"


def _dur(s: float) -> str:
    s = int(max(0, round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


# ---------------------------------------------------------------- the manager
class AlertManager:
    """Evaluates the project's alert rules from the store and refreshes the store-derived metrics."""

    interval_s = 5.0
    timeout_s = 5.0

    def __init__(self, hub: AlertHub) -> None:
        self.hub = hub
        self.rules, self.flow = compile_rules(hub.project)
        self.active: list[Finding] = []  # what fires now, for the console and the API
        self._failures = _Failures()
        self._drift = _Drift()
        self._after_id: int | None = None
        self._count_from = 0  # retries are counted from the attempts made since this process started
        self._lock = asyncio.Lock()
        self._stopping = False
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._first = True
        self._batch_last: dict[str, LastRun | None] = {}  # batch_failed: each batch flow's latest run

    # -------------------------------------------------------------- lifecycle
    async def start(self, leader: Leader = LOCAL) -> None:
        """Start evaluating, wherever lease `alerts` is held (engine/leader.py): on one node of a cluster.
        The hub adds `self.flow` (the alert messages' flow) like any other flow."""
        self._task = leader.hold("alerts", lambda _fence: self._loop())

    async def stop(self) -> None:
        """Stop evaluating (idempotent); the alert flow's workers belong to the hub and stop with it."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def note_drift(self, flow: str, event_id: str, drift: list[str], at: float) -> None:
        """An event of `flow` differs from its contract: counted now, alerted at the next evaluation."""
        self._drift.feed(flow, int(at), 1, event_id, drift)
        if any(r.spec.when == "contract_drift" for r in self.rules):
            self.kick()

    def note_batch(self, flow: str, last: LastRun | None) -> None:
        """The latest run of batch flow `flow` (the hub's, at start from the store): alerted at the next evaluation."""
        self._batch_last[flow] = last
        if any(r.spec.when == "batch_failed" for r in self.rules):
            self.kick()

    def kick(self) -> None:
        """Evaluate soon (a destination or a source changed state)."""
        self._kick.set()

    async def _loop(self) -> None:
        while not self._stopping:
            self._kick.clear()
            try:
                await self.evaluate()
            except (asyncio.CancelledError, LeaseLost):
                raise  # LeaseLost: another node evaluates the rules now
            except Exception:  # a store hiccup must not end alerting; try again at the next tick
                log.exception("evaluating alert rules")
            await wait_set(self._kick, self.interval_s)

    # -------------------------------------------------------------- evaluation
    async def evaluate(self, now: float | None = None) -> list[Finding]:
        """Read the store once, refresh the metrics, and send what started or ended; returns what changed."""
        async with self._lock:
            now = time.time() if now is None else now
            pairs = [(f.name, d.name) for f in self.hub.project.flows.values() for d in f.destinations]
            if self.flow is not None:
                pairs += [(ALERT_FLOW, d.name) for d in self.flow.destinations]
            windows = {r.spec.window for r in self.rules if r.spec.when == "dead_letters"}
            longest = max((r.window for r in self.rules if r.spec.when == "failures"), default=0.0)
            store = self.hub.store
            assert store is not None
            drift_window = max((r.window for r in self.rules if r.spec.when == "contract_drift"), default=0.0)
            try:
                snap = await store.snapshot(
                    now,
                    self._after_id,
                    now - longest - QUIET_S,
                    pairs,
                    windows,
                    None if self._first else self._count_from,
                    now - drift_window if self._first and drift_window else None,
                    timeout=self.timeout_s * (6 if self._first else 1),
                )
            except TimeoutError:
                log.warning(
                    "reading the store for alerts and metrics took over %gs; skipped this time",
                    self.timeout_s,
                )
                return []
            self._after_id = snap.after_id
            if self._first:
                self._count_from, self._first = snap.max_id, False
            self._failures.feed(snap.attempts)
            self._failures.last.update(snap.last)
            self._failures.trim(now - longest - QUIET_S)
            for flow, second, n, event_id, drift in snap.drift:  # the seed, at start
                self._drift.feed(flow, second, n, event_id, drift)
            self._drift.trim(now - drift_window)
            metrics = self.hub.metrics
            for (flow, dest), n in snap.retries.items():
                metrics.retries.labels(flow, dest).inc(n)
            metrics.snapshot = StoreSnapshot(now, snap.queue, self._schedule_lag(snap))
            findings = [f for rule in self.rules for f in self._check(rule, snap)]
            self.active = [f for f in findings if f.active]
            counts: dict[tuple[str, str], int] = {}
            for f in findings:
                counts[(f.rule.spec.when, f.flow)] = counts.get((f.rule.spec.when, f.flow), 0) + f.active
            metrics.set_alerts_firing(counts)
            changed = []
            for f in findings:
                row = snap.states.get((f.rule.key, f.subject))
                firing = row is not None and row["state"] == "firing"
                if f.active and (not firing or (f.detail and row is not None and f.detail != row["detail"])):
                    # Newly firing, or firing for another kind of trouble (a failing source now paused): tell.
                    await self._tell(f, "firing", now)
                    changed.append(f)
                elif firing and not f.active:
                    await self._tell(f, "resolved", now)
                    changed.append(f)
            return changed

    async def _tell(self, f: Finding, status: str, now: float) -> None:
        store = self.hub.store
        assert store is not None
        firing = status == "firing"
        title, text = (f.title, f.text) if firing else (f.ok_title, f.ok_text)
        record = {
            "alert": f.rule.spec.when,
            "status": status,
            "rule": f.rule.key,
            "subject": f.subject,
            "flow": f.flow,
            "destination": f.destination,
            "title": title,
            "text": text,
            "since": _ts(f.since),
            "at": _ts(now),
            "notify": f.rule.targets,
        }
        (alert_log.error if firing else alert_log.warning)(
            "%s: %s",
            title,
            text,
            extra={"flow": f.flow, "destination": f.destination, "alert": f.rule.spec.when},
        )
        change = AlertChange(
            f.rule.key, f.subject, "firing" if firing else "ok", f.since if firing else now, f.detail, now
        )
        await self.hub.ingest(
            ALERT_FLOW,
            orjson.dumps(record),
            record,
            dedupe_key=f"{f.rule.key}|{f.subject}|{status}|{now:.3f}",
            meta={"alert": status},
            commit=lambda event: store.accept_alert(event, change, fence=current_fence()),
        )

    def _flows(self, rule: Rule) -> list[FlowSpec]:
        flows = self.hub.project.flows
        if rule.flow is not None:
            return [flows[rule.flow]] if rule.flow in flows else []
        return [flows[n] for n in sorted(flows)]

    def _check(self, rule: Rule, snap: Snapshot) -> list[Finding]:
        check = {
            "failures": self._failing,
            "destination_paused": self._paused,
            "schedule_late": self._late,
            "source_failing": self._source,
            "dead_letters": self._dead,
            "contract_drift": self._drifting,
            "batch_failed": self._batch_failed,
        }[rule.spec.when]
        out = []
        for flow in self._flows(rule):
            out.extend(check(rule, flow, snap))
        return out

    def _state(self, rule: Rule, subject: str, snap: Snapshot) -> dict[str, Any]:
        return snap.states.get((rule.key, subject)) or {
            "state": "ok",
            "since": 0.0,
            "cleared_at": None,
            "detail": "",
        }

    def _failing(self, rule: Rule, flow: FlowSpec, snap: Snapshot) -> list[Finding]:
        out = []
        count, window, now = rule.spec.count or DEFAULT_COUNT, rule.window, snap.now
        for dest in flow.destinations:
            key, subject = (flow.name, dest.name), f"{flow.name}/{dest.name}"
            st = self._state(rule, subject, snap)
            # After a recovery only new failures count: a flapping destination cannot alert at every tick.
            n, first = self._failures.since(key, max(now - window, st["cleared_at"] or 0.0))
            last_at, last_ok = self._failures.last.get(key, (0.0, False))
            failed_at, summary = self._failures.last_failure.get(key, (0.0, ""))
            if st["state"] == "firing":
                active = not (last_ok and failed_at <= now - min(QUIET_S, window))
                since = st["since"]
            else:
                active = n >= count and last_at > 0 and not last_ok
                since = first or now
            pending = snap.queue.get(key, (0, None))[0]
            f = Finding(rule, subject, flow.name, dest.name, active, since)
            f.title = f"ALERT {subject}: deliveries failing"
            f.text = (
                f"Deliveries of flow {flow.name} to {dest.name} (system {dest.system}) are failing since "
                f"{_ts(since)}: {n} failed attempts in the last {_dur(window)}, the last one "
                f"{summary or 'unknown'}. {_waiting(pending)} (retried on schedule; those that run out "
                f"of retries become dead letters). Check {dest.system}; `patchbay runs --flow {flow.name} "
                f"--status pending` lists what waits, `patchbay dead --flow {flow.name}` what gave up (then "
                f"`patchbay replay --all --flow {flow.name} --destination {dest.name}`)."
            )
            f.ok_title = f"RESOLVED {subject}: deliveries succeed again"
            f.ok_text = (
                f"Deliveries of flow {flow.name} to {dest.name} succeed again "
                f"(last failure {_ts(failed_at)}). "
                f"They had been failing since {_ts(since)} ({_dur(now - since)})."
            )
            out.append(f)
        return out

    def _paused(self, rule: Rule, flow: FlowSpec, snap: Snapshot) -> list[Finding]:
        out = []
        for dest in flow.destinations:
            subject = f"{flow.name}/{dest.name}"
            state, reason, since = snap.destinations.get((flow.name, dest.name), ("active", None, 0.0))
            st = self._state(rule, subject, snap)
            was = st["detail"] or "paused"
            waiting = snap.queue.get((flow.name, dest.name), (0, None))[0]
            f = Finding(rule, subject, flow.name, dest.name, state != "active", since, detail=state)
            f.title = f"ALERT {subject}: destination {state}"
            resume = f"`patchbay resume {flow.name} {dest.name}`"
            if state == "disabled":
                f.text = (
                    f"Destination {dest.name} of flow {flow.name} is disabled since {_ts(since)}: "
                    f"{reason or 'by hand'}. "
                    f"Nothing is sent to it; {_waiting(waiting)}, and the event that got this answer is a "
                    f"dead letter. Fix the address of system {dest.system}, then run {resume} and "
                    f"`patchbay replay --all --flow {flow.name} --destination {dest.name}`."
                )
            else:
                f.text = (
                    f"Destination {dest.name} of flow {flow.name} is paused since {_ts(since)}: "
                    f"{reason or 'by hand'}. "
                    f"{_waiting(waiting)}; none is lost. Fix the cause (e.g. the credential of system "
                    f"{dest.system}), then run {resume}."
                )
            f.ok_title = f"RESOLVED {subject}: destination active again"
            f.ok_text = (
                f"Destination {dest.name} of flow {flow.name} is active again; it was {was} since "
                f"{_ts(st['since'])} ({_dur(snap.now - st['since'])}). Waiting deliveries ({waiting}) go out "
                "in order of arrival."
            )
            out.append(f)
        return out

    def _late(self, rule: Rule, flow: FlowSpec, snap: Snapshot) -> list[Finding]:
        spec = flow.trigger.schedule
        if spec is None or not flow.enabled:
            return []
        row = snap.schedules.get(flow.name) or {}
        due, tolerance = row.get("next_due_at"), late_after(spec)
        active = late_by(spec, due, snap.now) > 0
        f = Finding(rule, flow.name, flow.name, None, active, due or snap.now)
        running = (row.get("last_started_at") or 0) > (row.get("last_finished_at") or 0)
        f.title = f"ALERT {flow.name}: schedule late"
        f.text = (
            f"The scheduled run of flow {flow.name} due at {_ts(due)} is "
            f"{_dur(snap.now - (due or snap.now))} late (tolerance {_dur(tolerance)}). "
            + (
                f"The previous run, started {_ts(row.get('last_started_at'))}, is still running. "
                if running
                else "Is the hub down, overloaded or stopped? "
            )
            + f"`patchbay state {flow.name}` shows the schedule and the last run; the hub's log says why "
            "runs fail."
        )
        st = self._state(rule, flow.name, snap)
        f.ok_title = f"RESOLVED {flow.name}: schedule on time again"
        f.ok_text = (
            f"Flow {flow.name} runs on schedule again (last run {_ts(row.get('last_started_at'))}, next "
            f"{_ts(due)}). It was late since {_ts(st['since'])}."
        )
        return [f]

    def _source(self, rule: Rule, flow: FlowSpec, snap: Snapshot) -> list[Finding]:
        if (flow.source is None and flow.trigger.schedule is None) or not flow.enabled:
            return []
        row = snap.sources.get(flow.name)
        count = rule.spec.count or ALERT_AFTER
        state, failures = (row.state, row.failures) if row is not None else ("active", 0)
        active = state in WAITING or failures >= count
        st = self._state(rule, flow.name, snap)
        since = st["since"] if st["state"] == "firing" else (row.since if row is not None else snap.now)
        what = "source" if flow.source is not None else "schedule"
        f = Finding(rule, flow.name, flow.name, None, active, since, detail=state)
        error = row.error if row is not None else None
        if state in WAITING:
            f.title = f"ALERT {flow.name}: {what} {state}"
            cause = "an authentication error" if state == "paused" else "an error that retrying will not fix"
            f.text = (
                f"The {what} of flow {flow.name} is {state} since {_ts(since)} after {cause}: {error}. "
                f"Nothing is read until it is resumed. Fix the cause, then run `patchbay resume {flow.name}` "
                "(or restart the hub)."
            )
        else:
            f.title = f"ALERT {flow.name}: {what} failing"
            f.text = (
                f"The {what} of flow {flow.name} failed {failures} times in a row (since {_ts(since)}), "
                f"the last time: {error}. It is retried with backoff; `patchbay state {flow.name}` shows "
                "the last run."
            )
        f.ok_title = f"RESOLVED {flow.name}: {what} works again"
        f.ok_text = (
            f"The {what} of flow {flow.name} works again; it was {st['detail'] or 'failing'} since "
            f"{_ts(st['since'])} ({_dur(snap.now - st['since'])})."
        )
        return [f]

    def _dead(self, rule: Rule, flow: FlowSpec, snap: Snapshot) -> list[Finding]:
        above = rule.spec.above or 0
        dead, quarantined = snap.dead.get(rule.spec.window, {}).get(flow.name, (0, 0))
        total = dead + quarantined
        st = self._state(rule, flow.name, snap)
        since = st["since"] if st["state"] == "firing" else snap.now
        period = f" in the last {_dur(rule.spec.window)}" if rule.spec.window else ""
        f = Finding(rule, flow.name, flow.name, None, total > above, since)
        f.title = f"ALERT {flow.name}: {total} dead letters"
        f.text = (
            f"Flow {flow.name} has {total} dead letters and quarantined events{period} ({dead} dead "
            f"deliveries, {quarantined} quarantined), above the threshold of {above}. List them with "
            f"`patchbay dead --flow {flow.name}`; fix the cause, then "
            f"`patchbay replay --all --flow {flow.name}`."
        )
        f.ok_title = f"RESOLVED {flow.name}: dead letters back to {total}"
        f.ok_text = (
            f"Flow {flow.name} is back to {total} dead letters and quarantined events{period} "
            f"(threshold {above}); "
            f"it was above since {_ts(st['since'])}."
        )
        return [f]

    def _drifting(self, rule: Rule, flow: FlowSpec, snap: Snapshot) -> list[Finding]:
        n = self._drift.since(flow.name, snap.now - rule.window)
        _, last, drift = self._drift.last.get(flow.name, (0, "", []))
        st = self._state(rule, flow.name, snap)
        since = st["since"] if st["state"] == "firing" else snap.now
        f = Finding(rule, flow.name, flow.name, None, n > 0, since)
        pinned = flow.contract.file if flow.contract is not None else "its contract"
        answers = sorted(
            {d.split(":", 1)[0].removeprefix("response of ") for d in drift if d.startswith("response of ")}
        )
        what = f"answers of {', '.join(answers)} differ" if answers else "input differs"
        f.title = f"ALERT {flow.name}: {what} from its contract"
        f.text = (
            f"Events of flow {flow.name} in the last {_dur(rule.window)} that differ from {pinned}"
            f"{' (in the answers of ' + ', '.join(answers) + ')' if answers else ''}: {n}; "
            f"the latest, {last}: {'; '.join(drift[:5])}. See `patchbay runs show {last}` and `patchbay contract "
            f"check {flow.name}`; if the change is expected, `patchbay contract learn {flow.name} --force`."
        )
        f.ok_title = (
            f"RESOLVED {flow.name}: {'answers match' if answers else 'input matches'} its contract again"
        )
        f.ok_text = (
            f"No event of flow {flow.name} in the last {_dur(rule.window)} differs from {pinned}; "
            f"drift was seen since {_ts(st['since'])}."
        )
        if flow.batch is not None:  # a batch flow's contract is the columns its last run saw
            f.title = f"ALERT {flow.name}: the source's columns changed"
            f.text = (
                f"Runs of batch flow {flow.name} in the last {_dur(rule.window)} that met changed source columns: "
                f"{n}; the latest, {last}: {'; '.join(drift[:5])}. See `patchbay runs show {last}`; if the change "
                f"is expected, `patchbay run {flow.name} --accept-schema` (or set batch.on_drift)."
            )
            f.ok_title = f"RESOLVED {flow.name}: no run met changed source columns"
            f.ok_text = (
                f"No run of flow {flow.name} in the last {_dur(rule.window)} met changed source columns; "
                f"drift was seen since {_ts(st['since'])}."
            )
        return [f]

    def _batch_failed(self, rule: Rule, flow: FlowSpec, snap: Snapshot) -> list[Finding]:
        if flow.batch is None:
            return []
        last = self._batch_last.get(flow.name)
        st = self._state(rule, flow.name, snap)
        active = last is not None and last.failing
        since = st["since"] if st["state"] == "firing" else (last.at if last is not None else snap.now)
        # Repeated failures are one alert; a failure that becomes a stop (or back) is told again.
        f = Finding(
            rule, flow.name, flow.name, None, active, since, detail=last.status if active and last else ""
        )
        if last is not None and active:
            f.title = f"ALERT {flow.name}: batch run {last.status}"
            f.text = (
                f"The batch run {last.run_id} of flow {flow.name} (started {_ts(last.at)}) {last.status}: "
                f"{last.error}. Nothing of it was written: the destination and the cursor are as the last good "
                f"run left them. `patchbay runs show {last.run_id}` has the report; fix the cause, then run it "
                f"again (`patchbay run {flow.name}`, the console's Run button, or the schedule)."
            )
        f.ok_title = f"RESOLVED {flow.name}: batch run ok again"
        f.ok_text = (
            f"The batch run {last.run_id if last else '-'} of flow {flow.name} succeeded; runs had failed "
            f"since {_ts(st['since'])}."
        )
        return [f]

    def _schedule_lag(self, snap: Snapshot) -> dict[str, float]:
        out = {}
        for flow in self.hub.project.flows.values():
            if flow.trigger.schedule is not None:
                due = (snap.schedules.get(flow.name) or {}).get("next_due_at")
                out[flow.name] = max(0.0, snap.now - due) if due else 0.0
        return out
