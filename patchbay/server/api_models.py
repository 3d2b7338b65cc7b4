"""The REST API's request and response models: they validate input and generate the OpenAPI document."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, RootModel, Tag

from patchbay.config.models import DeliveryPolicy

NAME = r"^[a-z][a-z0-9_\-]{0,62}$"  # flows, systems, destinations (config NAME_RE)
FlowName = Annotated[str, Field(pattern=NAME, description="A flow's name.", examples=["lead-capture"])]
DestName = Annotated[
    str,
    Field(
        pattern=r"^(call:)?[a-z][a-z0-9_\-]{0,62}$",
        description="A destination's name within its flow, or `call:<step>` for a call or lookup step.",
        examples=["crm", "call:find_contact"],
    ),
]
RunId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_\-]{1,64}$",
        examples=["evt_01jh2k3m4n5p6q7r8s9t0v1w2x"],
        description="A run (event) id, with or without evt_.",
    ),
]
SecretName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9_.\-]{1,100}$", description="A vault secret's name.", examples=["crm_token"]),
]
TokenId = Annotated[
    str,
    Field(
        pattern=r"^(pbt_)?[0-9a-f]{12}$",
        description="A token's id (12 hex digits).",
        examples=["3f9a0c1b2d4e"],
    ),
]
Scope = Literal[
    "flows:read",
    "runs:read",
    "runs:replay",
    "runs:start",
    "destinations:write",
    "secrets:read",
    "secrets:write",
    "identities:read",
    "identities:write",
    "admin",
]
RunStatus = Literal["pending", "delivered", "dead", "quarantined", "filtered", "discarded", "aggregated"]
Health = Literal["ok", "retrying", "paused", "failing", "late"]
DestState = Literal["active", "paused", "disabled"]
Timestamp = Annotated[float, Field(description="Unix seconds.")]
# Query strings stay under aiohttp's 8 KiB request line even when every character is 4-byte UTF-8, %-encoded.
Reason = Annotated[str, Field(max_length=500, description="The reason starts with this text (as grouped).")]


class In(BaseModel):
    """Requests, query strings and path parameters: unknown fields are errors, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


# What the OpenAPI document calls a date-time (RFC 3339), with the zone optional (UTC when none). Pydantic
# alone also takes Unix seconds ("0.5") and a bare date, which the document does not allow.
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})?")


def _date_time(value: Any) -> Any:
    if isinstance(value, datetime) or (isinstance(value, str) and _DATE_TIME.fullmatch(value)):
        return value
    raise ValueError(
        f"{str(value)[:40]!r} is not an ISO 8601 date-time: write 2026-11-23T10:00:00Z "
        "(UTC when no zone; in a URL, write + as %2B)"
    )


DateTime = Annotated[datetime, BeforeValidator(_date_time)]


def as_unix(dt: datetime | None) -> float | None:
    """A datetime from the query string as Unix seconds; one without a zone is read as UTC."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ----------------------------------------------------------------------------- errors
class ErrorDetail(Out):
    loc: list[str | int] = Field(description="Where: ['query', 'limit'], ['body', 'run_ids', 0].")
    msg: str


class ErrorOut(Out):
    """Every error the API answers: a stable code and a message saying what to do."""

    error: str = Field(description="A stable code: missing_token, insufficient_scope, not_found...")
    message: str
    scope: Scope | None = Field(None, description="insufficient_scope: the scope this endpoint needs.")
    details: list[ErrorDetail] | None = Field(None, description="invalid_request: each problem and where.")


# ----------------------------------------------------------------------------- path parameters
class FlowPath(In):
    flow: FlowName


class DestinationPath(In):
    flow: FlowName
    destination: DestName


class RunPath(In):
    run_id: RunId


class FlowRunPath(In):
    flow: FlowName
    run_id: RunId


class SecretPath(In):
    name: SecretName


class TokenPath(In):
    token_id: TokenId


# ----------------------------------------------------------------------------- systems, flows, map
class SystemOut(Out):
    name: str
    kind: str | None = Field(description="Connector kind; null for a system that only calls our webhooks.")
    owner: str
    purpose: str
    owns: list[str] = Field(description="Data domains or fields this system is the source of truth for.")
    webhook: dict[str, Any] | None = Field(description="How it authenticates to our webhooks (secret names).")
    config: dict[str, Any] | None = Field(description="Connection settings with credentials redacted.")
    secrets: list[str] = Field(description="Credential references, e.g. secret:crm_token (never values).")
    used_by: list[str] = Field(description="Flows that use this system.")


class SystemsOut(Out):
    systems: list[SystemOut]


class LastRun(Out):
    id: str
    status: str
    received_at: Timestamp
    record_key: str | None


class WindowStats(Out):
    runs: int
    by_status: dict[str, int]
    success_rate: float | None = Field(description="delivered / (delivered + dead + quarantined), or null.")
    p95_latency_ms: float | None = Field(description="p95 latency of these runs' attempts (newest 10k).")
    p95_end_to_end_ms: float | None = Field(description="p95 time from receipt to delivered.")


class FlowStats(Out):
    last_run: LastRun | None
    hour: WindowStats
    day: WindowStats


class DestinationBrief(Out):
    name: str
    system: str
    kind: str
    state: DestState
    health: Health
    when: str | None = Field(description="Routing condition; null when every record goes here.")
    policy: DeliveryPolicy
    call: str | None = Field(
        None,
        description="Set for a call or lookup step (`call:<step>`): the step's name; runs wait on its answers.",
    )


class SourceHealthOut(Out):
    state: Literal["active", "failing", "paused", "stopped"] = Field(
        description="failing: transient errors, retried with backoff; paused: an auth error; stopped: a "
        "terminal error. Paused and stopped wait for `patchbay resume <flow>` (or a restart of the hub)."
    )
    failures: int = Field(description="Failed runs (polls, connections) in a row; 0 after a success.")
    error: str | None = Field(description="The last failure, as the source reported it.")
    since: Timestamp = Field(description="When the state last changed.")
    health: Health


class RunProgressOut(Out):
    read: int = Field(description="Source rows read so far.")
    written: int = Field(description="Rows handed to the destination so far (committed only at the end).")
    total: int | None = Field(description="Rows the run will read, when the source can count them.")
    rows_per_s: float
    eta_s: float | None = Field(description="Seconds left at the current rate, when the total is known.")
    elapsed_s: float
    share: float | None = Field(description="read / total, 0..1, when the total is known.")


class FlowRunOut(Out):
    """A run started with POST /flows/{flow}/runs: live while it runs, its report when done."""

    run_id: str = Field(description="The run's id; `GET /runs/{run_id}` has its trace once recorded.")
    flow: str
    kind: Literal["batch", "event"]
    trigger: str = Field(description="What started it: api, console, schedule, manual (the CLI).")
    started_at: Timestamp
    status: str = Field(
        description="A batch run: running, ok, failed or stopped. An event: its run status (pending, "
        "delivered, quarantined, ...)."
    )
    phase: str | None = Field(
        description="A batch run: preparing, copying, committing, recording, done. Null for an event."
    )
    progress: RunProgressOut | None = Field(description="A batch run while it runs: rows, rows/s, ETA.")
    report: dict[str, Any] | None = Field(
        description="A finished batch run's report: read, inserted, updated, unchanged, deleted, quarantined, "
        "filtered, schema_changes, cursor_from, cursor_to, duration_s, error."
    )


class StartRun(In):
    data: Any = Field(
        None,
        description="An event flow with `manual: true`: the event to run (any JSON value). Leave out for a "
        "batch flow.",
    )
    accept_schema: bool = Field(
        False,
        description="A batch flow: accept the source's changed columns for this run (new ones are added at "
        "the destination), as `patchbay run FLOW --accept-schema` does.",
    )


class BatchStateOut(Out):
    reads: str = Field(description="What it reads: `system table name`, or `system (a query)`.")
    writes: str = Field(description="What it writes: `system table name`.")
    running: FlowRunOut | None = Field(description="The run going now, if any.")
    last_run: dict[str, Any] | None = Field(
        description="The latest finished run: run_id, status (ok, failed, stopped), error, at."
    )


class FlowSummary(Out):
    name: str
    purpose: str
    owner: str
    enabled: bool
    trigger: Literal["webhook", "schedule", "source", "manual"]
    webhook_path: str | None
    source_system: str | None = Field(description="Where records come from (webhook caller, polled source).")
    destinations: list[DestinationBrief]
    source_health: SourceHealthOut | None = Field(
        None, description="The health of the flow's source or schedule; null when it has neither."
    )
    health: Health
    stats: FlowStats
    batch: BatchStateOut | None = Field(
        None,
        description="A batch flow: the run going now and the latest run (a failed one makes it failing).",
    )
    open_windows: int | None = Field(
        None,
        description="Aggregate windows holding records not yet emitted (as counted within the last second);"
        " null when the flow has no aggregate step.",
    )


class FlowsOut(Out):
    flows: list[FlowSummary]


class RunSummary(Out):
    id: str
    flow: str
    status: str
    received_at: Timestamp
    updated_at: Timestamp
    record_key: str | None
    reason: str | None
    deliveries: int
    attempts: int


class ScheduleOut(Out):
    flow: str
    cron: str | None
    every_s: float | None
    timezone: str
    catch_up: str
    last_started_at: Timestamp | None
    last_finished_at: Timestamp | None
    last_status: str | None
    last_error: str | None
    next_due_at: Timestamp | None
    runs: int
    late_s: float = Field(description="Seconds overdue beyond the tolerance; 0 when on time.")
    running: bool


class FlowDetail(FlowSummary):
    file: str
    line: int
    record_key: str | None
    sensitive: list[str]
    definition: dict[str, Any] = Field(
        description="The flow as loaded (steps, trigger, destinations), read-only, credentials redacted."
    )
    schedule: ScheduleOut | None
    recent_runs: list[RunSummary]


class MapNode(Out):
    id: str
    kind: str | None = Field(description="Connector kind, `hub` for the hub itself (schedules, manual runs).")
    owner: str | None
    purpose: str | None
    health: Health


class MapEdge(Out):
    id: str = Field(description="<flow>/<destination>")
    flow: str
    destination: str
    source: str = Field(description="Node id records come from.")
    target: str = Field(description="Node id they are delivered to.")
    trigger: str
    state: DestState
    health: Health
    source_state: str | None = Field(None, description="The state of the flow's source or schedule, if any.")
    source_error: str | None = Field(None, description="Why the source is not active, if it is not.")
    call: str | None = Field(
        None, description="A call or lookup step's arrow: the step's name (`destination` is `call:<step>`)."
    )


class MapOut(Out):
    nodes: list[MapNode]
    edges: list[MapEdge]


# ----------------------------------------------------------------------------- runs
class RunsQuery(In):
    flow: FlowName | None = None
    status: RunStatus | None = None
    since: DateTime | None = Field(None, description="Received at or after (ISO 8601; UTC when no zone).")
    until: DateTime | None = Field(None, description="Received before.")
    key: str | None = Field(None, max_length=320, description="Record key, e.g. an email address.")
    limit: int = Field(50, ge=1, le=1000)


class RunsOut(Out):
    runs: list[RunSummary]


class AttemptOut(Out):
    id: int
    delivery_id: int
    n: int
    started_at: Timestamp
    latency_ms: float
    status_code: int | None
    outcome: str
    excerpt: str
    error: str


class DeliveryOut(Out):
    id: int
    destination: str
    status: str
    request: dict[str, Any] = Field(description="The stored request; credentials are added at send time.")
    idempotency_key: str
    attempts: int
    retries: int
    next_at: Timestamp
    last_error: str | None
    created_at: Timestamp
    updated_at: Timestamp
    attempts_log: list[AttemptOut]
    response: dict[str, Any] | None = Field(
        None, description="Fields the destination's `response:` setting kept from its successful answer."
    )


class RunDetail(Out):
    id: str
    flow: str
    status: str
    received_at: Timestamp
    updated_at: Timestamp
    dedupe_key: str | None
    record_key: str | None
    reason: str | None
    payload: Any = Field(description="The event as received; the flow's sensitive fields redacted.")
    meta: dict[str, Any]
    trace: list[dict[str, Any]] = Field(description="Each step's output or error, then routing.")
    deliveries: list[DeliveryOut]


# ----------------------------------------------------------------------------- dead letters
class DeadQuery(In):
    flow: FlowName | None = None
    destination: DestName | None = None
    reason: Reason | None = None
    limit: int = Field(100, ge=1, le=1000)


class DeadGroup(Out):
    kind: Literal["delivery", "quarantine"]
    flow: str
    destination: str | None
    reason: str
    count: int
    first_at: Timestamp
    last_at: Timestamp


class DeadItem(Out):
    kind: Literal["delivery", "quarantine"]
    event_id: str
    flow: str
    destination: str | None
    reason: str
    at: Timestamp
    attempts: int
    record_key: str | None


class DeadLettersOut(Out):
    total: int
    groups: list[DeadGroup]
    items: list[DeadItem]


# The two shapes are two models, so the OpenAPI document says exactly what is accepted. The handler reads
# both through the same names: a shape answers None (or False) for what it does not have.
class ReplayRuns(In):
    """These runs (optionally only their deliveries to one destination)."""

    run_ids: list[RunId] = Field(min_length=1, max_length=1000)
    destination: DestName | None = Field(None, description="Only deliveries to this destination.")

    @property
    def all(self) -> bool:
        return False

    @property
    def flow(self) -> str | None:
        return None

    @property
    def reason(self) -> str | None:
        return None


class ReplayAll(In):
    """Every dead letter and quarantined event, narrowed by flow, destination and reason."""

    all: Literal[True] = Field(description="Every dead letter and quarantined event matching the filters.")
    flow: FlowName | None = None
    destination: DestName | None = Field(None, description="Only deliveries to this destination.")
    reason: Reason | None = None

    @property
    def run_ids(self) -> list[str] | None:
        return None


def _replay_shape(value: Any) -> str | None:
    if isinstance(value, dict):
        if ("run_ids" in value) == ("all" in value):
            return None  # neither or both: refused with the discriminator's message
        return "run_ids" if "run_ids" in value else "all"
    return "run_ids" if isinstance(value, ReplayRuns) else "all"


class ReplayRequest(
    RootModel[
        Annotated[
            Annotated[ReplayRuns, Tag("run_ids")] | Annotated[ReplayAll, Tag("all")],
            Discriminator(
                _replay_shape,
                custom_error_type="replay_shape",
                custom_error_message="give either run_ids, or all: true (narrowed by flow, destination, reason)",
            ),
        ]
    ]
):
    """Either `run_ids` (and optionally `destination`), or `all: true` narrowed by flow, destination and
    reason."""


class Skipped(Out):
    id: str
    reason: str


class ReplayOut(Out):
    matched: int
    requeued: list[str]
    still_invalid: list[Skipped]
    skipped: list[Skipped]


class DiscardRequest(In):
    run_ids: list[RunId] = Field(min_length=1, max_length=1000)
    destination: DestName | None = Field(None, description="Only the dead delivery to this destination.")


class DiscardOut(Out):
    discarded: list[str]
    skipped: list[Skipped]


# ----------------------------------------------------------------------------- destinations, state
class HeldKey(Out):
    key: str
    delivery_id: int
    event_id: str
    status: Literal["retrying", "dead"]
    next_at: Timestamp | None = Field(description="When a retrying one is tried again.")
    attempts: int
    waiting: int = Field(description="Later deliveries of the key waiting behind it.")
    reason: str = Field(description="Why the key is held and what releases it.")


class DestinationOut(Out):
    flow: str
    name: str
    system: str
    kind: str
    state: DestState
    reason: str | None
    since: Timestamp | None
    health: Health
    pending: int
    retrying: int = Field(description="Pending deliveries waiting for a retry.")
    dead: int
    dead_last_hour: int
    next_due_at: Timestamp | None
    in_flight: int
    policy: DeliveryPolicy
    call: str | None = Field(
        None,
        description="Set for a call or lookup step's worker (`call:<step>`): the step's name. Its runs wait"
        " on its answers; it is paused and resumed like a destination.",
    )
    order_by: str | None = Field(
        None, description="The destination's `order_by`: deliveries of one key go one at a time, in order."
    )
    held_keys: list[HeldKey] = Field(
        default_factory=list,
        description="Keys (of an ordered destination) held back by their oldest delivery, retrying or dead; "
        "at most 20, oldest first.",
    )


class DestinationsOut(Out):
    destinations: list[DestinationOut]


class DestinationStateOut(Out):
    flow: str
    destination: str
    state: DestState
    changed: bool


class CursorOut(Out):
    flow: str
    has_source: bool
    cursor: Any = Field(description="The saved source cursor; null means the next poll reads from the start.")
    updated_at: Timestamp | None


class SourceResumeOut(Out):
    flow: str
    resumed: bool = Field(description="False when the source was not paused or stopped.")
    state: str = Field(description="The source's state until its next run says otherwise.")


class CursorResetOut(Out):
    flow: str
    reset: bool = Field(description="False when there was no cursor.")


class SchedulesOut(Out):
    schedules: list[ScheduleOut]


class FlowCounts(Out):
    events: dict[str, int]
    deliveries: dict[str, int]


class CountsOut(Out):
    events: dict[str, int]
    deliveries: dict[str, int]
    flows: dict[str, FlowCounts]
    dead_letters: int
    paused_destinations: int


# ----------------------------------------------------------------------------- secrets
class SecretOut(Out):
    name: str
    stored: bool = Field(description="False when a flow uses it but the vault has no value.")
    created_at: Timestamp | None
    rotated_at: Timestamp | None
    version: int | None
    key_id: str | None = Field(description="Id of the master key that encrypts it.")
    used_by: list[str]


class SecretsOut(Out):
    vault: bool = Field(description="False when the project has no master key yet.")
    secrets: list[SecretOut]


class SecretWrite(In):
    value: str = Field(min_length=1, max_length=65536, description="The value. Never logged, never echoed.")


class SecretWriteOut(Out):
    name: str
    action: Literal["created", "rotated"]
    version: int


class SecretDeleteQuery(In):
    force: bool = Field(False, description="Delete even though flows use it.")


class SecretDeleteOut(Out):
    name: str
    deleted: bool


# ----------------------------------------------------------------------------- audit, tokens
class AuditQuery(In):
    since: DateTime | None = None
    until: DateTime | None = None
    action: str | None = Field(None, max_length=64, description="Exact action, or a prefix ending in '.'.")
    actor: str | None = Field(None, max_length=100, description="Part of the actor, e.g. a token id.")
    target: str | None = Field(None, max_length=200, description="Exactly this target.")
    limit: int = Field(100, ge=1, le=1000)


class AuditEntry(Out):
    id: int
    at: Timestamp
    actor: str = Field(description="`token <id> (<name>)` for API calls, the OS user for the CLI.")
    action: str
    target: str
    detail: dict[str, Any]
    origin: str = Field(description="Remote address of an API call, `cli` for commands.")


class AuditOut(Out):
    entries: list[AuditEntry]


class TokenOut(Out):
    id: str
    name: str
    scopes: list[Scope]
    created_at: Timestamp
    created_by: str
    expires_at: Timestamp | None
    last_used_at: Timestamp | None
    revoked_at: Timestamp | None
    status: Literal["active", "expired", "revoked"]


class TokensOut(Out):
    tokens: list[TokenOut]


class TokenCreate(In):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", examples=["console"])
    scopes: list[Scope] = Field(min_length=1, max_length=7)
    expires_in_s: int | None = Field(
        None, ge=60, le=10 * 366 * 86400, description="Lifetime in seconds; null: never expires."
    )


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself: shown only in this answer, never again.")


class NodeOut(Out):
    id: str = Field(description="The node id: `--node`, PATCHBAY_NODE_ID, or `host:pid`.")
    host: str
    pid: int
    roles: list[Literal["web", "worker", "scheduler"]]
    version: str = Field(description="The Patchbay version it runs.")
    port: int | None = Field(
        description="Where it answers /healthz, /readyz and /metrics (and, as web, the rest)."
    )
    status: Literal["up", "lost", "stopped"] = Field(
        description="`lost`: no heartbeat for `lost_after_s` (killed, hung, or cut off from the store)."
    )
    started_at: Timestamp
    heartbeat_at: Timestamp
    heartbeat_age_s: float
    stopped_at: Timestamp | None
    claims: int = Field(
        description="Deliveries it holds claimed (leased): on PostgreSQL counted from the deliveries now; on"
        " SQLite (claims in the worker's memory) the figure of its last heartbeat, at most `heartbeat_s` old."
    )
    leases: list[str] = Field(description="Named leases it holds (a schedule, the window closer, ...).")


class ClusterOut(Out):
    nodes: list[NodeOut] = Field(description="Every hub process on this store: up, lost, or stopped lately.")
    node: str = Field(description="The node that answered.")
    heartbeat_s: float
    lost_after_s: float


class WhoAmI(Out):
    token: TokenOut


class StatusOut(Out):
    status: str
    flows: int | None = None
    reason: str | None = None
