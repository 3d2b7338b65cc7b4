"""The store seam: row types shared by every store and the Store protocol everything else uses.

The engine, the server, the CLI and `security/tokens.py` reach the store only through `Store`.
It is composed of small protocols, one per concern; `store/sqlite.py` implements all of them and
`tests/store/test_conformance.py` checks any implementation against them. A second store (PostgreSQL)
is added by implementing `Store` and adding one parameter to the `store` fixture of that suite.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T", str, "str | None")


def no_nul(text: _T) -> _T:
    """`text` as every store keeps it: a NUL shown as U+FFFD. A sender's value may hold NUL (\\u0000 in JSON)
    and the steps carry it into keys and reasons; PostgreSQL's text refuses it (SQLite's JSON functions
    cut a text there), so the value types below hold none and a key is the same key on every store.
    Payloads, meta and traces keep it (stored as JSON, `\\u0000`)."""
    return text.replace("\x00", "\ufffd") if text is not None and "\x00" in text else text


@dataclass
class NewDelivery:
    destination: str
    request: dict[str, Any]
    idempotency_key: str
    # A split element quarantined while its siblings go on is kept as a dead row (destination
    # `quarantine:<step>`, `error` the reason): listed with the dead letters, replayed with its event.
    status: str = "pending"
    error: str | None = None
    # A destination's `order_by` value for this record: deliveries of one key to one destination go one at a
    # time in arrival order (a retrying or dead one holds the later ones back); None: not ordered.
    order_key: str | None = None

    def __post_init__(self) -> None:
        self.error, self.order_key = no_nul(self.error), no_nul(self.order_key)


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
    # What stateful steps (dedupe, aggregate) ask of the same transaction; see "windows and dedupe" below.
    claims: list[DedupeClaim] = field(default_factory=list)
    windows: list[WindowAdd] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dedupe_key, self.record_key, self.reason = (
            no_nul(self.dedupe_key),
            no_nul(self.record_key),
            no_nul(self.reason),
        )


@dataclass
class Accepted:
    event_id: str
    duplicate: bool = False
    conflict: bool = False  # same sender id, different body
    # Set when the transaction decided otherwise than the steps: a dedupe key held by another run
    # (filtered) or a record too late for its window (quarantined). The event is stored so.
    status: str | None = None
    reason: str | None = None


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
    due_at: float = 0.0  # since when it is due (its next_at): how long it waited to be read


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


@dataclass(frozen=True)
class Actor:
    """Who makes a change, for the audit log: a name, where the request came from, extra detail."""

    name: str
    origin: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RunFilter:
    flow: str | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None
    key: str | None = None
    limit: int = 50

    def __post_init__(self) -> None:  # a search by key finds what NewEvent kept (a query string may hold %00)
        self.key = no_nul(self.key)


@dataclass
class AuditFilter:
    since: float | None = None
    until: float | None = None
    action: str | None = None  # exact, or a prefix ending in '.' (`secret.`)
    actor: str | None = None  # a part of the actor's name
    target: str | None = None
    limit: int = 100


@dataclass
class ReplayReport:
    requeued: list[str] = field(default_factory=list)  # event ids with deliveries due again
    still_invalid: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class DiscardReport:
    discarded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class Reprocessed(Protocol):
    """What running a flow's steps again gives (engine/pipeline.py's `Processed`)."""

    status: str  # pending | quarantined | filtered | aggregated
    trace: list[dict[str, Any]]
    reason: str | None
    deliveries: list[NewDelivery]
    record_key: str | None
    claims: list[DedupeClaim]
    windows: list[WindowAdd]


class Reprocessor(Protocol):
    """A flow's steps and routing as configured now (engine/pipeline.py's `Pipeline`)."""

    def load_payload(self, payload: bytes) -> Any:
        """A stored payload as the record it was; PatchbayError when it cannot be (the event is skipped)."""
        ...

    def process(
        self,
        record: Any,
        event_id: str,
        *,
        answers: Mapping[str, Any] | None = None,
        received_at: float | None = None,
        after: str | None = None,
        note: dict[str, Any] | None = None,
    ) -> Reprocessed:
        """The steps and routing; `answers` are the recorded answers of the event's calls, by key.
        `after`: start with the step after the one of that name (a window's record: after its
        aggregate), `note` the trace entry that says so; `received_at`: the event's arrival."""
        ...


@dataclass(frozen=True)
class TokenInfo:
    """Everything about an API token but its secret."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    created_by: str
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None

    def allows(self, scope: str | None) -> bool:
        return scope is None or "admin" in self.scopes or scope in self.scopes

    def status(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (time.time() if now is None else now):
            return "expired"
        return "active"

    @property
    def actor(self) -> str:
        """How the audit log names whoever used this token."""
        return f"token {self.id} ({self.name})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "last_used_at": self.last_used_at,
            "revoked_at": self.revoked_at,
            "status": self.status(),
        }


DestinationStates = dict[tuple[str, str], tuple[str, str | None, float]]
SCHEDULE_FIELDS = frozenset(
    {"last_started_at", "last_due_at", "last_finished_at", "last_status", "last_error", "next_due_at"}
)


class Ingest(Protocol):
    """The hot path's writes: an event with its deliveries, or a source's batch with its cursor."""

    async def accept(self, event: NewEvent) -> Accepted:
        """Store the event and its deliveries in one transaction, or report the duplicate (same flow
        and dedupe key; `conflict` when the body differs). Returns after the commit."""
        ...

    async def accept_batch(
        self, events: list[NewEvent], flow: str, cursor: Any, fence: Fence | None = None
    ) -> list[Accepted]:
        """Every event and the flow's source cursor (unless None) in one transaction."""
        ...


class Deliveries(Protocol):
    """The delivery feed: what is due, and what each attempt did."""

    async def due(
        self, flow: str, destination: str, now: float, limit: int, skip: set[int], after_id: int = 0
    ) -> list[DueDelivery]:
        """Pending deliveries due by `now`, in arrival order, past `after_id`, none of `skip`."""
        ...

    async def next_due(self, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """For each (flow, destination) of `pairs`: when the earliest delivery `due` could return comes due
        (absent: nothing pending). One read for any number of destinations: the hub asks it for every idle
        feed at once (Hub._watch_states)."""
        ...

    async def record(self, results: list[AttemptResult]) -> None:
        """Each attempt's row and its delivery's new status (its claim let go); events follow their deliveries."""
        ...

    # Claims across workers. `due` claims what it returns for this store's holder (the node id) for the
    # lease; on SQLite (one process) claims live in the worker's memory and these answer at once.
    async def renew(self, flow: str, destination: str, ids: set[int]) -> set[int]:
        """Extend this holder's claims on `ids` (queued or in flight) by the lease; the ids still held.
        One missing was taken over by another worker after its lease ran out: never send it."""
        ...

    async def release(self, flow: str, destination: str, ids: set[int]) -> None:
        """Let go of claims that were not sent (a paused or stopping worker's queue), for any worker."""
        ...

    async def take_slots(self, flow: str, destination: str, limit: int, want: int, busy: int = 0) -> int:
        """The destination's sending slots this holder holds afterwards: `limit` (its max_concurrency) in all,
        across every holder. Renews the ones held, takes free ones up to `want` (at most a fair share while
        other holders want some too), lets go of the rest but never below `busy` (sends in flight)."""
        ...

    async def take_tokens(
        self, flow: str, destination: str, rate: float, burst: float, want: int, now: float
    ) -> tuple[int, float]:
        """Up to `want` whole tokens from the destination's one token bucket (`rate` per second, at most
        `burst`, full at first), shared by every holder: (granted, seconds until the next token when none)."""
        ...

    async def held_keys(self, flow: str, destination: str, limit: int = 100) -> list[dict[str, Any]]:
        """Ordered keys held back by their oldest delivery, retrying or dead, oldest first: {"key",
        "delivery_id", "event_id", "status" (retrying|dead), "next_at", "attempts", "waiting", "reason"}."""
        ...


class Destinations(Protocol):
    """Destination states (active, paused, disabled) that outlive a restart."""

    async def destination_states(self) -> DestinationStates:
        """(flow, destination) -> (state, reason, since)."""
        ...

    async def set_destination_state(
        self, flow: str, destination: str, state: str, reason: str | None, by: Actor | None = None
    ) -> None:
        """`since` changes only when the state does. With `by`, audited in the same transaction
        (action `resume` for active, else the state; target `flow/destination`)."""
        ...


class Cursors(Protocol):
    """Source cursors, written with the batch they cover (`Ingest.accept_batch`)."""

    async def cursor(self, flow: str) -> Any: ...

    async def cursor_info(self, flow: str) -> dict[str, Any] | None:
        """{"value", "updated_at"} or None."""
        ...

    async def reset_cursor(self, flow: str, by: Actor | None = None) -> bool:
        """Forget the cursor; True if there was one. With `by`, audited as `cursor.reset`."""
        ...


class Schedules(Protocol):
    """What each schedule did last and when it runs next."""

    async def schedule(self, flow: str) -> dict[str, Any] | None: ...

    async def schedules(self) -> dict[str, dict[str, Any]]: ...

    async def update_schedule(
        self, flow: str, fields: Mapping[str, Any], count_run: bool = False, fence: Fence | None = None
    ) -> None:
        """Set `fields` (names from SCHEDULE_FIELDS); `count_run` adds one to `runs`. With `fence`, only
        while that lease is still its holder's (else LeaseLost, nothing written)."""
        ...


class Runs(Protocol):
    """Read side: runs, traces, counts, statistics."""

    async def list_runs(self, f: RunFilter) -> list[dict[str, Any]]: ...

    async def get_run(self, event_id: str) -> dict[str, Any] | None:
        """One run as stored (nothing redacted): the event, its deliveries and their attempts."""
        ...

    async def recent_payloads(self, flow: str, limit: int) -> list[tuple[str, float, bytes]]:
        """The flow's newest events, newest first: (id, received_at, payload as stored)."""
        ...

    async def recent_answers(self, flow: str, limit: int) -> list[tuple[str, str, float, str]]:
        """The flow's newest successful attempts, newest first: (destination, event id, started_at, the
        answer's excerpt as stored), for learning and checking its response contract."""
        ...

    async def counts(self) -> dict[str, Any]: ...

    async def counts_by_flow(self) -> dict[str, dict[str, dict[str, int]]]: ...

    async def flow_stats(self, flows: list[str], now: float) -> dict[str, dict[str, Any]]: ...

    async def destination_backlog(self, now: float) -> dict[tuple[str, str], dict[str, Any]]: ...


class DeadLetters(Protocol):
    """Dead deliveries and quarantined events: list, replay, discard."""

    async def list_dead(self, flow: str | None = None, limit: int = 100) -> list[dict[str, Any]]: ...

    async def dead_letters(
        self, flow: str | None, destination: str | None, reason: str | None, limit: int
    ) -> dict[str, Any]:
        """{"total", "groups" (by flow, destination and reason), "items" (newest first)}."""
        ...

    async def dead_event_ids(
        self, flow: str | None, destination: str | None, reason: str | None
    ) -> list[str]: ...

    async def replayable(self, flow: str | None, destination: str | None) -> list[str]:
        """Events with a dead delivery (to `destination`) or quarantined, in arrival order."""
        ...

    async def replay(
        self,
        pipelines: Mapping[str, Reprocessor],
        event_ids: Sequence[str],
        destination: str | None,
        by: Actor,
    ) -> ReplayReport:
        """Run each event's steps again and requeue its dead deliveries; audited per event, one transaction."""
        ...

    async def discard(
        self, event_ids: Sequence[str], destination: str | None, by: Actor
    ) -> DiscardReport: ...


@dataclass(frozen=True)
class CachedAnswer:
    """An answer to keep for a call step's `cache:` (scope: flow/step)."""

    scope: str
    key: str
    answer: dict[str, Any]
    expires_at: float


class Calls(Protocol):
    """Calls inside flows: a call is a delivery to `call:<step>`; its answer continues the run."""

    async def record_calls(
        self,
        results: list[AttemptResult],
        pipeline: Reprocessor,
        cache: Sequence[CachedAnswer] = (),
    ) -> list[tuple[str, list[str]]]:
        """Record the attempts of calls (as `record`), and in the same transaction, for each answered one,
        run its event's flow again with every recorded answer and insert the deliveries (or next calls)
        it did not have yet; `cache` answers are kept too (as `cache_answer`). Returns (event id,
        destinations added) per event whose calls were answered."""
        ...

    async def call_answers(self, event_id: str) -> dict[str, Any]:
        """The recorded answers of an event's calls, by idempotency key."""
        ...

    async def cached_answer(self, scope: str, key: str, now: float) -> dict[str, Any] | None:
        """A cached answer not expired by `now`."""
        ...

    async def cache_answer(self, scope: str, key: str, answer: dict[str, Any], expires_at: float) -> None:
        """Keep an answer until `expires_at` (expired entries are removed on the way)."""
        ...


class Tokens(Protocol):
    """API tokens as stored: the SHA-256 of their secret, never the secret."""

    async def create_token(
        self,
        name: str,
        scopes: Sequence[str],
        expires_at: float | None,
        secret_sha256: str,
        by: Actor,
    ) -> TokenInfo:
        """A new token with a fresh id, audited as `token.create` in the same transaction."""
        ...

    async def tokens(self, include_inactive: bool = True) -> list[TokenInfo]: ...

    async def token_secret(self, token_id: str) -> tuple[TokenInfo, str] | None:
        """The token and the SHA-256 of its secret, for verification."""
        ...

    async def revoke_token(self, token_id: str, by: Actor | None = None) -> TokenInfo | None:
        """Revoke (the first revocation's time is kept); audited as `token.revoke` when the token exists."""
        ...

    async def touch_token(self, token_id: str, at: float) -> None: ...


class Audit(Protocol):
    """The append-only audit log."""

    async def audit(self, action: str, target: str, by: Actor) -> None: ...

    async def audit_log(self, f: AuditFilter) -> list[dict[str, Any]]:
        """Entries, newest first."""
        ...


class Retention(Protocol):
    """Finished runs removed or compressed in bounded chunks; each call is one short write."""

    async def purge_runs(self, flow: str, statuses: Sequence[str], before: float, limit: int = 500) -> int:
        """Remove up to `limit` runs of `flow` in `statuses` last changed before `before` (epoch seconds), whole:
        event, deliveries, attempts, response fields. Runs with a pending delivery are never removed. Returns
        how many were removed (fewer than `limit`: nothing more is due)."""
        ...

    async def compress_runs(
        self, flow: str, before: float, limit: int = 500, after: float | None = None
    ) -> tuple[int, float | None]:
        """Compress the payload and trace of up to `limit` finished runs last changed before `before`, the
        oldest first, from the run received at `after` on (None: from the first); every read returns them as
        before. Returns how many were compressed, and the arrival time of the last (None if none): the next
        call goes on from there instead of reading again past every run compressed before."""
        ...


@dataclass(frozen=True)
class NodeRow:
    """A hub process in the `nodes` table (engine/roles.py `Node`): where it runs, its roles, its heartbeat,
    and (read by `nodes`) how many deliveries it holds claimed."""

    id: str
    host: str
    pid: int
    roles: tuple[str, ...]
    version: str
    port: int | None
    started_at: float
    heartbeat_at: float
    stopped_at: float | None = None
    claims: int = 0

    def status(self, now: float, lost_after: float) -> str:
        """`up`, `stopped` (a clean stop) or `lost` (no heartbeat for `lost_after` s: killed, hung, cut off)."""
        if self.stopped_at is not None:
            return "stopped"
        return "lost" if now - self.heartbeat_at > lost_after else "up"


class Cluster(Protocol):
    """The processes sharing the store: each one's row and heartbeat, and a wake across processes.

    On PostgreSQL `announce` and `listen` are NOTIFY and LISTEN on a channel of the store's schema; on SQLite,
    datagrams to the serving processes' sockets beside the file (store/sqlite_wake.py), and nothing for a
    store no serving hub locked (`shared` False)."""

    async def join_cluster(self, node: NodeRow, alive_within: float, force: bool = False) -> NodeRow | None:
        """Write `node`'s row (its `heartbeat_at` is now). When a process of the same id is alive (a heartbeat
        within `alive_within` s, not stopped) and not `force`: that one's row, and nothing written."""
        ...

    async def heartbeat(
        self, node_id: str, started_at: float, now: float, port: int | None = None, claims: int = 0
    ) -> bool:
        """Refresh this process's row, with `claims`: the deliveries its workers hold claimed now (what `nodes`
        reports where leases are not in the store). False when the row is no longer its own (another process
        took the id)."""
        ...

    async def leave_cluster(self, node_id: str, started_at: float, now: float) -> None:
        """A clean stop: the row is marked stopped (and later removed), holding no claims."""
        ...

    async def nodes(self, now: float) -> list[NodeRow]:
        """Every node's row, with `claims`: the deliveries it holds leased at `now`, counted from the deliveries
        where leases are in the store (`leases_in_store`), else the figure of its last `heartbeat` (as fresh as
        that, engine/roles.py HEARTBEAT_S)."""
        ...

    async def release_claims(self, node_ids: Collection[str]) -> int:
        """Let go of the deliveries those nodes hold claimed (their processes are known to be gone); how many."""
        ...

    @property
    def shared(self) -> bool:
        """Other processes may use this store at once, so accepts are announced and workers listen (PostgreSQL;
        a serving hub's SQLite file, which web processes share with one worker and one scheduler). Where
        leases and claims live is another fact: `Leases.leases_in_store`."""
        ...

    async def announce(self, flows: Collection[str], rescan: bool = False) -> None:
        """Tell the other processes that `flows` have new deliveries (`rescan`: older ones became due again:
        a replay, a resume). Sent after the commit that made them, never part of it."""
        ...

    async def announce_intake(self, node: str, behind: Collection[str], caught_up: Collection[str]) -> None:
        """Tell the other processes that destinations ("flow/name") of node `node` are behind, or caught up:
        their web processes take webhooks a few at a time while any is (engine/intake.py)."""
        ...

    def listen(
        self,
        on_wake: Callable[[str, bool], None],
        on_intake: Callable[[str, bool], None] | None = None,
        deliveries: bool = True,
    ) -> None:
        """Call `on_wake(flow, rescan)` on the running loop for every other process's `announce`, and
        `on_intake("flow/name on node", behind)` for its `announce_intake`, until closed. Without
        `deliveries` (a process that does not deliver) only the rescans: new deliveries are not announced to it
        (store/common.py `for_deliverers`)."""
        ...


@dataclass(frozen=True)
class SecretRow:
    """One vault secret as stored: encrypted by security/vault.py, never decrypted by a store."""

    name: str
    key_id: str
    nonce: bytes
    ciphertext: bytes
    created_at: float
    rotated_at: float | None
    version: int


Sealed = tuple[str, bytes, bytes]  # key_id, nonce, ciphertext


class SecretRows(Protocol):
    """The vault's rows, kept beside the hub's data. Synchronous: secrets are resolved while a
    project's flows are built, before the event loop runs."""

    def ensure_schema(self) -> None: ...

    def get(self, name: str) -> SecretRow | None: ...

    def list(self) -> list[SecretRow]:
        """Every row, by name."""
        ...

    def put(self, name: str, sealed: Sealed, now: float) -> None:
        """Create (version 1) or replace: version + 1 and rotated_at = now, created_at kept."""
        ...

    def put_if_absent(self, name: str, sealed: Sealed, now: float) -> SecretRow:
        """Create the row unless one exists; the row as stored afterwards (one transaction)."""
        ...

    def delete(self, name: str) -> bool: ...

    def reseal(self, fn: Callable[[SecretRow], Sealed]) -> int:
        """Replace every row's sealed value by `fn(row)` in one transaction (all or none); how many."""
        ...


# ================================================================== identity map (entities, issue 9)
# An identity is one entity (a customer) and its record in every system, with the last value seen from
# each system per field and the agreed (golden) value. Stored as one document per identity, with its
# links (system, record id) and match keys (rule, normalised value) kept in their own indexes.


@dataclass
class Identity:
    """One entity across systems.

    `golden`: field -> {"value", "system", "at"}: the agreed value and where and when it came from.
    `systems`: system -> {"id": its record id (None while a create is in flight), "seen": field ->
    {"value", "at", "event"} (the last value read from it), "written": field -> {"value", "at", "event"}
    (values the hub wrote and has not yet read back), "pending": {"event", "destination"} of a create
    in flight or None, "deleted_at"}.
    """

    id: str
    entity: str
    created_at: float
    updated_at: float
    golden: dict[str, dict[str, Any]] = field(default_factory=dict)
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: list[tuple[str, str]] = field(default_factory=list)  # (match rule, normalised value)
    status: str = "active"  # active | archived | deleted

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "entity": self.entity,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "golden": self.golden,
            "systems": self.systems,
            "keys": [list(k) for k in self.keys],
        }


@dataclass
class NewConflict:
    """Two systems disagree on a field: both values, sources and times, the winner and why."""

    entity: str
    identity_id: str
    field: str
    kind: str  # owned (a non-owner changed an owned field) | concurrent (a shared field changed on two sides)
    values: list[dict[str, Any]]  # [{"system", "value", "at"}], the agreed value's first
    winner: str | None  # the system whose value stands; None while a person decides (rule manual)
    winner_value: Any
    rule: str  # owner | latest | first | manual
    reason: str
    status: str  # settled (by a rule; still recorded) | open (waits for a person)
    at: float


@dataclass
class NewReview:
    """A record the hub would not link by itself: several candidates, or only a weak rule matched."""

    entity: str
    system: str
    record_id: str
    values: dict[str, Any]
    candidates: list[str]  # identity ids
    reason: str
    at: float
    event_id: str | None = None


@dataclass
class IdentityChanges:
    """What one sync step changes in the identity map, written with its events in one transaction."""

    entity: str
    identities: list[Identity] = field(default_factory=list)  # whole documents; links and keys follow them
    conflicts: list[NewConflict] = field(default_factory=list)
    reviews: list[NewReview] = field(default_factory=list)
    resolve_conflicts: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # id, status, how
    resolve_reviews: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    by: Actor | None = None  # a person's change is audited in the same transaction

    def __bool__(self) -> bool:
        return bool(
            self.identities
            or self.conflicts
            or self.reviews
            or self.resolve_conflicts
            or self.resolve_reviews
        )


@dataclass
class IdentityLookup:
    """What the identity map knows about some records: links, key matches and the identities they name."""

    by_link: dict[tuple[str, str], str] = field(default_factory=dict)  # (system, record id) -> identity id
    by_key: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (rule, key) -> identity ids
    identities: dict[str, Identity] = field(default_factory=dict)
    open_reviews: dict[tuple[str, str], int] = field(default_factory=dict)  # (system, record id) -> review id


class Identities(Protocol):
    """The identity map, its conflict log and its review queue (engine/identity.py, engine/sync.py)."""

    async def identity_lookup(
        self, entity: str, links: Sequence[tuple[str, str]], keys: Sequence[tuple[str, str]]
    ) -> IdentityLookup: ...

    async def identity(self, identity_id: str) -> Identity | None: ...

    async def search_identities(self, entity: str | None, text: str, limit: int = 20) -> list[Identity]:
        """Identities whose match key, record id or identity id equals `text` (normalised by the caller)."""
        ...

    async def all_identities(self, entity: str, after: str = "", limit: int = 1000) -> list[Identity]:
        """A page of an entity's identities in id order, past `after`."""
        ...

    async def accept_synced(
        self,
        events: list[NewEvent],
        changes: IdentityChanges,
        cursors: Mapping[str, Any] | None = None,
        fence: Fence | None = None,
    ) -> list[Accepted]:
        """Events, identity changes and source cursors (flow -> cursor) in one transaction (with `fence`,
        only while that lease is still its holder's)."""
        ...

    async def conflicts(
        self, entity: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Conflicts, newest first."""
        ...

    async def conflict(self, conflict_id: int) -> dict[str, Any] | None: ...

    async def reviews(
        self, entity: str | None = None, status: str | None = "open", limit: int = 100
    ) -> list[dict[str, Any]]: ...

    async def review(self, review_id: int) -> dict[str, Any] | None: ...

    async def identity_stats(self, entity: str, closed_since: float | None = None) -> dict[str, Any]:
        """{"identities", "status": {...}, "linked": {system: n}, "conflicts": {status: n}, "reviews": {status: n},
        "pending": {"waiting": creates whose id the map waits for, "overdue": those flagged by the sweep}}."""
        ...

    def entity_lock(self, entity: str) -> AbstractAsyncContextManager[None]:
        """Held around a sync step of `entity` (read the map, decide, `accept_synced`): one step at a time
        across every process sharing the store. SQLite's store has one serving process (its file lock),
        whose steps EntitySync already serializes, so there it holds nothing."""
        ...

    async def pending_creates(self, entity: str, older_than: float, limit: int = 500) -> list[dict[str, Any]]:
        """Creates sent before `older_than` whose record id the map still waits for, oldest first:
        {"identity_id", "system", "event_id", "destination", "since"}."""
        ...


class Windows(Protocol):
    """Aggregate windows and dedupe keys (their writes ride on `Ingest`: NewEvent.claims and .windows)."""

    async def closable_windows(
        self, now: float, limit: int, steps: Sequence[tuple[str, str]]
    ) -> list[WindowState]:
        """Windows of the (flow, step) pairs in `steps` past their close time with records not yet emitted,
        oldest first, with their totals."""
        ...

    async def emit_window(self, event: NewEvent, window: WindowState) -> Accepted:
        """The window's record (an event) and the window marked emitted up to `window.adds`, in one
        transaction; a second emission of the same revision is a duplicate (the event's dedupe key)."""
        ...

    async def tidy_windows(self, now: float) -> tuple[int, int]:
        """Let go of emitted windows past their keep time and of expired dedupe keys: (windows, keys)."""
        ...

    async def open_windows(self) -> dict[str, int]:
        """Per flow, the windows holding records not yet emitted."""
        ...


@dataclass(frozen=True)
class Lease:
    """A named lease: what must run once in the whole cluster runs on its holder (engine/leader.py)."""

    name: str  # schedule:<flow>, source:<flow>, windows, alerts, retention, first-run:<entity>
    holder: str | None  # a node id; None once released
    until: float  # the holder must renew before this (the store's clock), or anyone may take it
    fence: int  # raised by one each time the lease changes hands: the fencing token
    taken_at: float


@dataclass(frozen=True)
class Fence:
    """A lease as its holder took it. A write made with it commits only while the lease is still this
    holder's with this token (a paused holder whose lease was taken meanwhile gets LeaseLost)."""

    name: str
    holder: str
    token: int


class Leases(Protocol):
    """Named leases, so that several hubs sharing a store run each singleton on one node at a time. On a
    store whose leases are not in the store (`leases_in_store` False: SQLite) every lease is the hub's own and
    the engine never asks the store."""

    @property
    def leases_in_store(self) -> bool:
        """Where leases and claims live; the one rule the engine asks (engine/leader.py, the cluster API).

        True (PostgreSQL): any number of processes may run the worker and scheduler roles, so named leases
        (`take_lease`) and delivery claims (`due`'s lease columns) are rows of the store, taken, renewed and
        fenced through it. False (SQLite): they live in this process's memory, because an OS lock makes this
        process their only holder (the flocks of `lock`: `<store>.scheduler.lock` for the named leases,
        `<store>.worker.lock` for the claims); the leader runs each lease's work as a plain task and the
        cluster view reads a node's claims from the figure it writes with its heartbeat (`nodes`). Each concrete
        store declares it itself (tests/store/test_store_classes.py): PostgresStore subclasses SqliteStore and
        must not inherit it."""
        ...

    async def take_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Take lease `name` for `holder` until now + `ttl_s` (the store's clock), or renew it when
        `holder` has it: its fencing token, the same on a renewal and higher whenever the lease changed
        hands. None when another holder has it and it has not expired. Atomic: of concurrent takers of a
        free lease, one gets it."""
        ...

    async def release_lease(self, name: str, holder: str) -> None:
        """Let go of `name` now, when `holder` has it (another node may take it at once)."""
        ...

    async def leases(self) -> list[Lease]:
        """Every lease, by name (the cluster view)."""
        ...


class Store(
    Ingest,
    Deliveries,
    Destinations,
    Cursors,
    Schedules,
    Runs,
    DeadLetters,
    Calls,
    Tokens,
    Audit,
    Retention,
    Identities,
    Windows,
    Cluster,
    Leases,
    Protocol,
):
    """The hub's durable state. Every operation is async; writes return after they are committed."""

    @property
    def writing(self) -> bool:
        """Writes are being accepted (the hub is not ready without)."""
        ...

    def lock(self, roles: Collection[str] = ..., node_id: str | None = None) -> None:
        """Claim what a serving hub with `roles` takes of the store (SQLite: one process per singleton role,
        engine/roles.py); StoreLocked if another has it. `node_id`: a serving hub (it joins the wake)."""
        ...

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

    async def accept_alert(
        self, event: NewEvent, change: AlertChange, fence: Fence | None = None
    ) -> Accepted:
        """The alert message and the rule's new state in one transaction: told once, whatever crashes when
        (with `fence`, only while the alert loop's lease is still its holder's)."""
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
    # Events (and successful answers, by their attempt's `DRIFT …` note) that drifted from their flow's
    # contract since `drift_since`, per flow and second:
    # (flow, second, count, the latest event's id, its drift). Read once, at start.
    drift: list[tuple[str, int, int, str, list[str]]] = field(default_factory=list)
    after_id: int = 0  # the next read starts after this attempt id
    max_id: int = 0  # the largest attempt id when read


# ================================================================== windows and dedupe (stateful steps)
# A dedupe or aggregate step cannot decide alone: whether a key was seen, or whether a window is still
# open, is the store's to say, in the transaction that accepts the event (so two events racing for one
# key, or a crash mid-way, never count twice). The steps describe what they ask; the store applies it.


@dataclass
class DedupeClaim:
    """A dedupe step's claim on a key: the first run to claim it passes, others within `within_s` are
    filtered ("duplicate of run X"). Applied only when the record gets through (pending or aggregated)."""

    step: str
    key: str  # a digest of the key's value, never the value
    within_s: float
    trace_at: int  # when refused: the trace kept up to here, then the refusal
    # After a split: the element that claims ("1", "0.2"). The key is then owned by that element, so a
    # second element with the same key (of this run or another) is dropped alone, its siblings go on.
    element: str | None = None


@dataclass
class Contribution:
    """What one record adds to one named value of a window: deltas the store adds up."""

    n: int  # 1 when the value is present (count of values), else 0
    num: float = 0.0  # for sum and avg
    scale: int = 0  # decimal places of `num` (a sum is rounded to the most seen)
    is_float: bool = False
    extreme: Any = None  # for min and max: a number or a text
    item: str | None = None  # for distinct: the value as canonical JSON


@dataclass
class WindowAdd:
    """One record counted into the window (`step`, `start`, `key`) of its flow."""

    step: str
    key: str  # the `by` value as canonical JSON
    start: float
    end: float
    grace_s: float  # records are taken until end + grace; then the window's record is emitted
    keep_s: float | None  # late records: None quarantines them; else they revise the window this long
    label: str  # the window as people read it, for reasons and traces
    values: dict[str, Contribution]
    trace_at: int  # when refused: the trace kept up to here, then the refusal
    element: str | None = None  # after a split: the element counted (not counted if a dedupe drops it)


@dataclass
class ValueState:
    """A window's value as the store holds it; the aggregate step turns it into sum, count, ..."""

    n: int
    total: float
    scale: int
    is_float: bool
    lo: Any
    hi: Any
    distinct: int


@dataclass
class WindowState:
    """A window due to be emitted: its totals and the revision its record is."""

    flow: str
    step: str
    key: str
    start: float
    end: float
    label: str
    revision: int  # 1 for the first record of the window, 2+ for corrections from late records
    adds: int  # records counted so far
    values: dict[str, ValueState]
