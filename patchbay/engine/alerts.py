"""Alert rules: every few seconds, read the store; tell the `notify` systems when a condition starts and ends.

An alert message is an event of the internal flow `_alerts`, which has one destination per notify
target: it is written in the same transaction as the rule's new state (table `alerts`), then
delivered, retried, paused and dead-lettered like any other event. One outage is one alert and one
recovery, and a restart does not alert again, because the state lives in the store.

The same loop refreshes the store-derived metrics (queue depth, oldest pending age, schedule lag,
retries). Its queries run on a connection and thread of their own, with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from patchbay import registry
from patchbay.config.alerts import notify_config, split_notify
from patchbay.config.models import AlertRule, Trigger
from patchbay.config.project import DestinationSpec, FlowSpec, Project, system_secret_refs
from patchbay.engine.waiting import wait_set
from patchbay.metrics import StoreSnapshot
from patchbay.store.base import Accepted, NewEvent
from patchbay.store.sqlite import connect, tx_accept

if TYPE_CHECKING:
    from patchbay.engine.hub import Hub

log = logging.getLogger("patchbay.alerts")
alert_log = logging.getLogger("patchbay.alert")
T = TypeVar("T")

ALERT_FLOW = "_alerts"  # not a valid user flow name: it cannot clash with one
DEFAULT_COUNT = 5
DEFAULT_WINDOW_S = 600.0
QUIET_S = 60.0  # failures: no failed attempt for this long (or the window, if shorter) before it clears
SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts(
  rule TEXT NOT NULL,
  subject TEXT NOT NULL,
  state TEXT NOT NULL,
  since REAL NOT NULL,
  fired_at REAL,
  cleared_at REAL,
  detail TEXT NOT NULL DEFAULT '',
  event_id TEXT,
  updated_at REAL NOT NULL,
  PRIMARY KEY(rule, subject)
)"""


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


# ---------------------------------------------------------------- reading the store
@dataclass
class Snapshot:
    now: float
    destinations: dict[tuple[str, str], tuple[str, str | None, float]]
    queue: dict[tuple[str, str], tuple[int, float | None]]
    # Failed attempts new since the last read: id, started_at, outcome, n, status_code, error, flow, destination.
    attempts: list[sqlite3.Row]
    last: dict[tuple[str, str], tuple[float, bool]]  # the latest new attempt per destination: (at, ok)
    retries: dict[tuple[str, str], int]  # new attempts that were retries (n > 1), past `count_after`
    schedules: dict[str, dict[str, Any]]
    dead: dict[float | None, dict[str, tuple[int, int]]]  # window -> flow -> (dead deliveries, quarantined)
    states: dict[tuple[str, str], dict[str, Any]]  # (rule, subject) -> alerts row
    # Read once, at start: events that drifted from their flow's contract since `drift_since`.
    drift: list[tuple[str, int, int, str, list[str]]] = field(default_factory=list)


def _first_attempt_at(conn: sqlite3.Connection, t: float) -> int:
    """The id just before the first attempt started at or after `t` (ids follow time closely: bisect them)."""
    lo, hi = conn.execute("SELECT MIN(id), MAX(id) FROM attempts").fetchone()
    if lo is None:
        return 0
    hi += 1
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute(
            "SELECT started_at FROM attempts WHERE id>=? ORDER BY id LIMIT 1", (mid,)
        ).fetchone()
        if row is None or row[0] >= t:
            hi = mid
        else:
            lo = mid + 1
    return int(lo) - 1


def q_snapshot(
    conn: sqlite3.Connection,
    now: float,
    after_id: int | None,
    seed_from: float,
    pairs: list[tuple[str, str]],
    dead_windows: set[float | None],
    count_after: int | None = None,
    drift_since: float | None = None,
) -> tuple[Snapshot, int, int]:
    """One consistent read of all the rules and metrics need; returns (snapshot, after_id, max_id).

    New attempts are aggregated in SQL (only failures come back as rows): at thousands of deliveries
    a second, building a row per attempt here would hold the GIL long enough to delay webhook acks.
    """
    conn.execute("BEGIN")
    try:
        max_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM attempts").fetchone()[0]
        if after_id is None:
            after_id = _first_attempt_at(conn, seed_from)
        attempts = conn.execute(
            "SELECT a.id, a.started_at, a.outcome, a.n, a.status_code, a.error, d.flow, d.destination"
            " FROM attempts a JOIN deliveries d ON d.id=a.delivery_id WHERE a.id>? AND a.id<=?"
            " AND a.outcome!='success' ORDER BY a.id",
            (after_id, max_id),
        ).fetchall()
        # SQLite takes the bare columns from the row holding MAX(a.id): the latest attempt per destination.
        last = {
            (flow, dest): (at, outcome == "success")
            for flow, dest, _, at, outcome in conn.execute(
                "SELECT d.flow, d.destination, MAX(a.id), a.started_at, a.outcome"
                " FROM attempts a JOIN deliveries d ON d.id=a.delivery_id WHERE a.id>? AND a.id<=?"
                " GROUP BY d.flow, d.destination",
                (after_id, max_id),
            )
        }
        retries: dict[tuple[str, str], int] = {}
        if count_after is not None:
            for flow, dest, n in conn.execute(
                "SELECT d.flow, d.destination, COUNT(*) FROM attempts a JOIN deliveries d ON d.id=a.delivery_id"
                " WHERE a.id>? AND a.id<=? AND a.n>1 GROUP BY d.flow, d.destination",
                (max(after_id, count_after), max_id),
            ):
                retries[(flow, dest)] = n
        queue: dict[tuple[str, str], tuple[int, float | None]] = {}
        for flow, dest in pairs:  # the due index covers count and min id: no row is read but the oldest
            n, first = conn.execute(
                "SELECT COUNT(*), MIN(id) FROM deliveries"
                " WHERE flow=? AND destination=? AND status='pending'",
                (flow, dest),
            ).fetchone()
            oldest = (
                conn.execute("SELECT created_at FROM deliveries WHERE id=?", (first,)).fetchone()
                if n
                else None
            )
            queue[(flow, dest)] = (n, oldest[0] if oldest else None)
        dead: dict[float | None, dict[str, tuple[int, int]]] = {}
        for window in dead_windows:
            since = now - window if window is not None else 0.0
            per: dict[str, list[int]] = {}
            for flow, n in conn.execute(
                "SELECT flow, COUNT(*) FROM deliveries WHERE status='dead' AND updated_at>=? GROUP BY flow",
                (since,),
            ):
                per.setdefault(flow, [0, 0])[0] = n
            for flow, n in conn.execute(
                "SELECT flow, COUNT(*) FROM events"
                " WHERE status='quarantined' AND updated_at>=? GROUP BY flow",
                (since,),
            ):
                per.setdefault(flow, [0, 0])[1] = n
            dead[window] = {f: (v[0], v[1]) for f, v in per.items()}
        snap = Snapshot(
            now,
            {
                (r["flow"], r["destination"]): (r["state"], r["reason"], r["since"])
                for r in conn.execute("SELECT * FROM destinations")
            },
            queue,
            attempts,
            last,
            retries,
            {r["flow"]: dict(r) for r in conn.execute("SELECT * FROM schedules")},
            dead,
            {(r["rule"], r["subject"]): dict(r) for r in conn.execute("SELECT * FROM alerts")},
            _drifted(conn, drift_since) if drift_since is not None else [],
        )
    finally:
        if conn.in_transaction:  # an interrupted query may have ended it already
            conn.execute("COMMIT")
    return snap, max(after_id, max_id), max_id


def _drifted(conn: sqlite3.Connection, since: float) -> list[tuple[str, int, int, str, list[str]]]:
    """Events since `since` whose trace has a contract drift entry, per flow and second: (flow, second,
    count, the latest event's id, its drift). Read once at start; later ones are fed as they happen."""
    out: list[tuple[str, int, int, str, list[str]]] = []
    for flow, second, n, last in conn.execute(
        "SELECT flow, CAST(received_at AS INTEGER), COUNT(*), MAX(id) FROM events"
        " WHERE received_at>=? AND trace LIKE ? GROUP BY flow, 2",
        (since, '%"kind":"contract"%'),
    ):
        trace = orjson.loads(conn.execute("SELECT trace FROM events WHERE id=?", (last,)).fetchone()[0])
        drift: list[str] = next((s["drift"] for s in trace if s.get("kind") == "contract"), [])
        out.append((flow, second, n, last, drift))
    return out


def tx_alert(
    conn: sqlite3.Connection,
    event: NewEvent,
    rule: str,
    subject: str,
    state: str,
    since: float,
    detail: str,
    now: float,
) -> Accepted:
    """The message and the rule's new state, in one transaction: told once, whatever crashes when."""
    accepted = tx_accept(conn, event)
    conn.execute(
        "INSERT INTO alerts(rule, subject, state, since, fired_at, cleared_at, detail, event_id, updated_at)"
        " VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(rule, subject) DO UPDATE SET state=excluded.state,"
        " since=excluded.since, fired_at=COALESCE(excluded.fired_at, alerts.fired_at),"
        " cleared_at=COALESCE(excluded.cleared_at, alerts.cleared_at), detail=excluded.detail,"
        " event_id=excluded.event_id, updated_at=excluded.updated_at",
        (
            rule,
            subject,
            state,
            since,
            now if state == "firing" else None,
            now if state == "ok" else None,
            detail,
            accepted.event_id,
            now,
        ),
    )
    return accepted


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

    def feed(self, rows: list[sqlite3.Row]) -> None:
        for r in rows:
            key = (r["flow"], r["destination"])
            ok = r["outcome"] == "success"
            self.last[key] = (r["started_at"], ok)
            if not ok:
                b = self.buckets.setdefault(key, {})
                b[int(r["started_at"])] = b.get(int(r["started_at"]), 0) + 1
                code = r["status_code"]  # with a status, `error` is often only the retry decision
                summary = f"HTTP {code}" if code is not None else (r["error"] or r["outcome"])
                self.last_failure[key] = (r["started_at"], summary)

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

    def __init__(self, hub: Hub) -> None:
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
        self._conn: sqlite3.Connection | None = None
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchbay-monitor")
        self._first = True

    # -------------------------------------------------------------- lifecycle
    def install(self, states: dict[tuple[str, str], tuple[str, str | None, float]]) -> None:
        """Add the internal flow that carries alert messages to the hub, before its workers start."""
        from patchbay.engine.delivery import DestinationWorker
        from patchbay.engine.hub import FlowRuntime, build_sinks
        from patchbay.engine.pipeline import Pipeline

        hub = self.hub
        if self.flow is None:
            return
        assert hub.store is not None and hub.resolver is not None
        sinks = build_sinks(self.flow, hub.project, hub.resolver, hub.resources)
        workers = {}
        for dest in self.flow.destinations:
            for ref in system_secret_refs(hub.project.systems[dest.system]):
                hub.resolver.resolve(ref)
            state = states.get((ALERT_FLOW, dest.name), ("active", None, 0.0))[0]
            workers[dest.name] = DestinationWorker(
                ALERT_FLOW,
                dest,
                sinks[dest.name],
                hub.store,
                state=state,
                on_state=hub._destination_state_changed,
                on_attempt=hub._count_attempt,
            )
            hub.metrics.destination_paused.labels(ALERT_FLOW, dest.name).set(0 if state == "active" else 1)
        hub.flows[ALERT_FLOW] = FlowRuntime(self.flow, Pipeline(self.flow, sinks), workers)

    async def start(self) -> None:
        assert self.hub.store is not None
        await self.hub.store.write(lambda c: c.execute(SCHEMA))
        self._task = asyncio.create_task(self._loop(), name="alerts")

    async def stop(self) -> None:
        """Stop evaluating (idempotent); the alert flow's workers belong to the hub and stop with it."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await asyncio.get_running_loop().run_in_executor(self._exec, conn.close)
        self._exec.shutdown(wait=False)

    def note_drift(self, flow: str, event_id: str, drift: list[str], at: float) -> None:
        """An event of `flow` differs from its contract: counted now, alerted at the next evaluation."""
        self._drift.feed(flow, int(at), 1, event_id, drift)
        if any(r.spec.when == "contract_drift" for r in self.rules):
            self.kick()

    def kick(self) -> None:
        """Evaluate soon (a destination changed state)."""
        self._kick.set()

    async def _loop(self) -> None:
        while not self._stopping:
            self._kick.clear()
            try:
                await self.evaluate()
            except asyncio.CancelledError:
                raise
            except Exception:  # a store hiccup must not end alerting; try again at the next tick
                log.exception("evaluating alert rules")
            await wait_set(self._kick, self.interval_s)

    # -------------------------------------------------------------- evaluation
    async def _read(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        path = self.hub.project.store_path

        def run() -> T:
            if self._conn is None:
                self._conn = connect(path)
            return fn(self._conn, *args)

        fut = asyncio.get_running_loop().run_in_executor(self._exec, run)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            if self._conn is not None:
                self._conn.interrupt()  # the query stops; the next evaluation tries again
            raise

    async def evaluate(self, now: float | None = None) -> list[Finding]:
        """Read the store once, refresh the metrics, and send what started or ended; returns what changed."""
        async with self._lock:
            now = time.time() if now is None else now
            pairs = [(f.name, d.name) for f in self.hub.project.flows.values() for d in f.destinations]
            if self.flow is not None:
                pairs += [(ALERT_FLOW, d.name) for d in self.flow.destinations]
            windows = {r.spec.window for r in self.rules if r.spec.when == "dead_letters"}
            longest = max((r.window for r in self.rules if r.spec.when == "failures"), default=0.0)
            drift_window = max((r.window for r in self.rules if r.spec.when == "contract_drift"), default=0.0)
            try:
                snap, self._after_id, max_id = await self._read(
                    q_snapshot,
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
            if self._first:
                self._count_from, self._first = max_id, False
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
                if f.active and not firing:
                    await self._tell(f, "firing", now)
                    changed.append(f)
                elif firing and not f.active:
                    await self._tell(f, "resolved", now)
                    changed.append(f)
            return changed

    async def _tell(self, f: Finding, status: str, now: float) -> None:
        hub = self.hub
        assert hub.store is not None
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
        fr = hub.flows[ALERT_FLOW]
        event = hub._event(
            fr,
            orjson.dumps(record),
            record,
            f"{f.rule.key}|{f.subject}|{status}|{now:.3f}",
            {"alert": status},
        )
        state = "firing" if firing else "ok"
        accepted = await hub.store.write(
            tx_alert, event, f.rule.key, f.subject, state, f.since if firing else now, f.detail, now
        )
        hub._after_commit(fr, event, accepted)

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
            "dead_letters": self._dead,
            "contract_drift": self._drifting,
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
        from patchbay.engine.scheduler import late_after

        spec = flow.trigger.schedule
        if spec is None or not flow.enabled:
            return []
        row = snap.schedules.get(flow.name) or {}
        due, tolerance = row.get("next_due_at"), late_after(spec)
        active = due is not None and snap.now - due > tolerance
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
        f.title = f"ALERT {flow.name}: input differs from its contract"
        f.text = (
            f"Events of flow {flow.name} in the last {_dur(rule.window)} that differ from {pinned}: {n}; "
            f"the latest, {last}: {'; '.join(drift[:5])}. See `patchbay runs show {last}` and `patchbay contract "
            f"check {flow.name}`; if the change is expected, `patchbay contract learn {flow.name} --force`."
        )
        f.ok_title = f"RESOLVED {flow.name}: input matches its contract again"
        f.ok_text = (
            f"No event of flow {flow.name} in the last {_dur(rule.window)} differs from {pinned}; "
            f"drift was seen since {_ts(st['since'])}."
        )
        return [f]

    def _schedule_lag(self, snap: Snapshot) -> dict[str, float]:
        out = {}
        for flow in self.hub.project.flows.values():
            if flow.trigger.schedule is not None:
                due = (snap.schedules.get(flow.name) or {}).get("next_due_at")
                out[flow.name] = max(0.0, snap.now - due) if due else 0.0
        return out
