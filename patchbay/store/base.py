"""Row types shared by every store and the Store protocol the engine relies on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class NewDelivery:
    destination: str
    request: dict[str, Any]
    idempotency_key: str


@dataclass
class NewEvent:
    """An accepted event with the outcome of its steps, written in one transaction."""

    id: str
    flow: str
    received_at: float
    payload: bytes
    body_hash: str
    dedupe_key: str | None
    status: str  # pending | delivered | quarantined | filtered
    record_key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    deliveries: list[NewDelivery] = field(default_factory=list)


@dataclass
class Accepted:
    event_id: str
    duplicate: bool = False
    conflict: bool = False  # same sender id, different body


@dataclass
class DueDelivery:
    id: int
    event_id: str
    flow: str
    destination: str
    request: dict[str, Any]
    idempotency_key: str
    attempts: int
    retries: int


@dataclass
class AttemptResult:
    """What one attempt did and what becomes of its delivery."""

    delivery_id: int
    event_id: str
    started_at: float
    latency_ms: float
    status_code: int | None
    outcome: str  # success | transient | terminal | auth | gone
    excerpt: str
    error: str
    new_status: str  # delivered | pending | dead
    next_at: float | None = None
    consumed_retry: bool = False
    response: dict[str, Any] | None = None  # fields mapped from a successful answer (Outcome.fields)


class Store(Protocol):
    async def accept(self, event: NewEvent) -> Accepted: ...
    async def due(
        self, flow: str, destination: str, now: float, limit: int, skip: set[int], after_id: int = 0
    ) -> list[DueDelivery]: ...
    async def next_due_at(self, flow: str, destination: str) -> float | None: ...
    async def record(self, results: list[AttemptResult]) -> None: ...
    async def destination_states(self) -> dict[tuple[str, str], tuple[str, str | None, float]]: ...
    async def set_destination_state(
        self, flow: str, destination: str, state: str, reason: str | None
    ) -> None: ...
    async def close(self) -> None: ...

    # -- responses: fields a destination mapped from its answer (issue 11.3; the identity map reads them)
    async def response_fields(self, event_id: str, destination: str) -> dict[str, Any] | None: ...

    # -------------------------------------------------------------- monitoring: alerts, source health
    async def snapshot(
        self,
        now: float,
        after_id: int | None,
        seed_from: float,
        pairs: list[tuple[str, str]],
        dead_windows: set[float | None],
        count_after: int | None,
        drift_since: float | None = None,
        *,
        timeout: float,
    ) -> Snapshot:
        """Read everything at once, off the delivery path; TimeoutError (and the read stops) past `timeout`.

        `after_id` None: start from the first attempt at or after `seed_from`. `drift_since`: also read
        the events that drifted from their flow's contract since then (once, at start)."""
        ...

    async def accept_alert(self, event: NewEvent, change: AlertChange) -> Accepted:
        """The alert message and the rule's new state in one transaction: told once, whatever crashes when."""
        ...

    async def source_states(self) -> dict[str, SourceState]: ...
    async def set_source_state(self, state: SourceState) -> None: ...


# ================================================================== monitoring: alert state, source health
# What the alert loop reads and writes (engine/alerts.py), and the health of each flow's source or
# schedule (engine/sources.py). Kept apart from the delivery path above.


@dataclass
class SourceState:
    """The health of a flow's source or schedule, as its last runs left it."""

    flow: str
    state: str  # active | failing (transient errors, retried) | paused (auth) | stopped (terminal)
    failures: int = 0  # failed runs in a row
    error: str | None = None  # the last failure, in the words of the source
    since: float = 0.0  # when `state` last changed
    updated_at: float = 0.0


@dataclass
class AlertChange:
    """A rule's new state for one subject, written with the message that tells it."""

    rule: str
    subject: str
    state: str  # firing | ok
    since: float
    detail: str
    at: float


@dataclass
class FailedAttempt:
    id: int
    started_at: float
    outcome: str
    n: int
    status_code: int | None
    error: str
    flow: str
    destination: str


@dataclass
class Snapshot:
    """One consistent read of what the alert rules and the store-derived metrics need."""

    now: float
    destinations: dict[tuple[str, str], tuple[str, str | None, float]]
    queue: dict[tuple[str, str], tuple[int, float | None]]  # pending deliveries, created_at of the oldest
    attempts: list[FailedAttempt]  # failed attempts new since the last read
    last: dict[tuple[str, str], tuple[float, bool]]  # the latest new attempt per destination: (at, ok)
    retries: dict[tuple[str, str], int]  # new attempts that were retries (n > 1), past `count_after`
    schedules: dict[str, dict[str, Any]]
    dead: dict[float | None, dict[str, tuple[int, int]]]  # window -> flow -> (dead deliveries, quarantined)
    states: dict[tuple[str, str], dict[str, Any]]  # (rule, subject) -> alert state row
    sources: dict[str, SourceState]
    # Events that drifted from their flow's contract since `drift_since`, per flow and second:
    # (flow, second, count, the latest event's id, its drift). Read once, at start.
    drift: list[tuple[str, int, int, str, list[str]]] = field(default_factory=list)
    after_id: int = 0  # the next read starts after this attempt id
    max_id: int = 0  # the largest attempt id when read
