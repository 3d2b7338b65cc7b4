"""What a connector is: a Sink (render a request at ingest, send it later) and a Source.

A sink is what the registry and the YAML call a destination's connector. It works in two halves so
that nothing is lost and retries are cheap:
  render(record) -> Request   pure, at ingest, stored with the event in one transaction
  send(request)  -> Outcome   at delivery time, maybe many times; classification is data, not raise
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel

from patchbay.config.models import DeliveryPolicy
from patchbay.errors import ConfigError
from patchbay.registry import install_hint, offline_resources
from patchbay.security.ssrf import HttpPools, resolve_allowed

if TYPE_CHECKING:
    from patchbay.connectors.http_wire import WirePool


class OutcomeClass(StrEnum):
    """What an attempt's result means for the delivery."""

    SUCCESS = "success"  # 2xx: done
    TRANSIENT = "transient"  # 408/425/429/5xx, timeouts, refused connections: retry with backoff
    TERMINAL = "terminal"  # other 4xx, redirects not allowed: dead letter at once
    AUTH = "auth"  # 401/403: pause the destination until someone resumes it
    GONE = "gone"  # 410: dead letter and disable the destination


@dataclass
class Outcome:
    cls: OutcomeClass
    status_code: int | None = None
    latency_ms: float = 0.0
    excerpt: str = ""
    error: str = ""
    retry_after_s: float | None = None
    fields: dict[str, Any] | None = None  # values mapped from the answer (a destination's `response:`)
    # A member of a batch request only (`send_batch`): `split` when the whole request was refused without
    # saying which record (the engine sends it again in smaller batches to find out), `resend` when it was
    # refused for other records and nothing of this one was applied (sent again without them).
    split: bool = False
    resend: bool = False
    # A success's JSON body, in memory only (never stored), for the flow's response contract; set by a
    # sink whose `keep_answer` the hub turned on. `drift`: how it differs from that contract.
    body: Any = None
    drift: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        what = f"HTTP {self.status_code}" if self.status_code is not None else (self.error or "no answer")
        if self.status_code is not None and self.error:
            what += f" ({self.error})"
        return what


@offline_resources  # what `check` builds connectors with
@dataclass
class Resources:
    """Shared, long-lived things a connector may use; the hub builds one per system it talks to."""

    http: HttpPools | None = None  # the hub's outbound HTTP connections (a pool per address policy)
    secret: Callable[[Any], str] = field(default=lambda ref: "")  # resolves a SecretRef, scoped per system
    redact: Callable[[str], str] = field(default=lambda s: s)
    extra: dict[str, Any] = field(default_factory=dict)
    system: str = ""  # the system's name, for messages
    allow_private: bool = False  # the system's allow_private_network: no address guard at all
    allow_networks: tuple[str, ...] = ()  # the system's allow_networks: exceptions to the guard
    _wire: WirePool | None = field(default=None, repr=False, compare=False)

    def wire(self) -> WirePool:
        """This system's kept-alive HTTP connections (every request to its API, OAuth2 token endpoint
        included): guarded unless it allows internal addresses."""
        pool = self._wire
        if pool is not None and not pool.closed:
            return pool
        if self.http is None or self.http.closed:
            self.http = HttpPools()
        from patchbay.connectors.http_wire import WirePool

        self._wire = self.http.pool(self.allow_private, self.allow_networks, WirePool)
        return self._wire

    async def allowed_addresses(self, host: str, port: int) -> list[str]:
        """For connectors that do not use HTTP: the addresses of `host` this system may connect to
        (connect to one of them, not to the name), or BlockedAddress."""
        return await resolve_allowed(
            host, port, allow_private=self.allow_private, allow_networks=self.allow_networks
        )


class Sink(Protocol):
    """What the engine calls on a destination's connector (BaseSink has the shared constructor)."""

    kind: ClassVar[str]
    policy: DeliveryPolicy

    def render(self, record: Any, key: str) -> dict[str, Any]:
        """The request to store: JSON-able, without credentials (they are added at send time)."""
        ...

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        """One attempt. Never raises for remote failures: the Outcome says what happened."""
        ...

    async def close(self) -> None: ...


class BatchSink(Protocol):
    """A sink that can also send several deliveries in one request (a destination's `batch:`)."""

    @property
    def batch_limit(self) -> int | None:
        """The most records one request may carry (the API's documented limit), or None."""
        ...

    def batch_problem(self) -> str | None:
        """Why this destination's requests cannot be combined (checked at load time), or None."""
        ...

    async def send_batch(self, requests: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[Outcome]:
        """One request for all of them; one Outcome per request, in order. Never raises for remote failures."""
        ...


def can_batch(sink: Any) -> bool:
    """Whether a sink (or its class) implements `send_batch`."""
    return callable(getattr(sink, "send_batch", None))


def batch_key(keys: Sequence[str]) -> str:
    """The idempotency key of a batch request: the same members give the same key (sent again after a
    transient failure or a restart), so an API that honours it applies the request once."""
    return "batch-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


SystemT = TypeVar("SystemT", bound=BaseModel)
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class BaseSink(Generic[SystemT, ConfigT]):
    """What every sink has: its system's settings, its own, the delivery policy and the resources.

    Subclasses call it from their own `__init__` (which sets up what they derive from the settings)
    and add `render` and `send` (see Sink); `close` releases nothing unless overridden.
    """

    kind: ClassVar[str]

    def __init__(
        self, system: SystemT, config: ConfigT, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        self.system = system
        self.config = config
        self.policy = policy
        self.resources = resources

    async def close(self) -> None:
        return None


class MissingDriver(ConfigError, ValueError):
    """A connector's optional driver is not installed (a ValueError too, so `check` reports it in place)."""

    def __str__(self) -> str:
        return "; ".join(p.message for p in self.problems)


def import_driver(module: str, *, package: str, extra: str, kind: str) -> ModuleType:
    """Import an optional driver, or raise MissingDriver saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDriver(
            f"the {kind} connector needs the {package} driver: {install_hint(extra)}"
        ) from exc


def excerpt(data: bytes | str, limit: int = 500) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more chars)"


class Stopwatch:
    __slots__ = ("t0",)

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def ms(self) -> float:
        return round((time.perf_counter() - self.t0) * 1000, 2)


# ----------------------------------------------------------------------------- sources
@dataclass
class SourceRecord:
    """One record read from a source. `id` identifies it upstream: re-reading it is not a new event."""

    data: Any
    id: str | None = None
    raw: bytes | None = None  # the bytes as received, when the source has them


@dataclass
class Batch:
    """Records read together, and the cursor to save once they are committed (None: unchanged)."""

    records: list[SourceRecord]
    cursor: Any = None


Emit = Callable[[Batch], Any]  # awaitable: returns once the batch (and its cursor) is committed


class Source(Protocol):
    """A source connector. `mode` says how the engine drives it.

    poll:   `poll(cursor)` is called on the flow's schedule; it yields batches from the cursor on.
            The engine commits each batch's events together with its cursor, so a crash re-reads
            at most one batch, and the record ids drop what was already stored.
    stream: `stream(emit)` runs until cancelled; it calls `await emit(batch)` and acknowledges
            upstream only after that returns, that is, after the events are committed.
    """

    kind: ClassVar[str]
    mode: ClassVar[str]  # "poll" | "stream"

    def poll(self, cursor: Any) -> Any: ...  # AsyncIterator[Batch]

    async def stream(self, emit: Emit) -> None: ...

    async def close(self) -> None: ...
