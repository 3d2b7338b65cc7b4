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
