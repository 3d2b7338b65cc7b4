"""The project's config models: hub settings, systems, flows, destinations, delivery policy.

These models are the spec: their field descriptions are what `check`, `connectors show` and the
docs tell users. Step and connector settings live with their step or connector.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from patchbay.config.durations import Duration

NAME_RE = r"^[a-z][a-z0-9_\-]{0,62}$"


class Spec(BaseModel):
    """Base of every config model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=False)


class SecretRef(Spec):
    """A reference to a credential: never the value itself."""

    secret: str | None = Field(
        None, description="Name of a secret in the vault (`patchbay secrets set NAME`)."
    )
    env: str | None = Field(None, description="Name of an environment variable holding the value.")

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError(
                "secrets are referenced, never written inline: store the value with "
                "`patchbay secrets set NAME` and write {secret: NAME} (or {env: VARIABLE})"
            )
        return v

    @model_validator(mode="after")
    def _one(self) -> SecretRef:
        if (self.secret is None) == (self.env is None):
            raise ValueError("give exactly one of `secret: NAME` or `env: VARIABLE`")
        if self.secret is not None and not re.match(r"^[A-Za-z0-9_.\-]{1,100}$", self.secret):
            raise ValueError(f"bad secret name {self.secret!r}: use letters, digits, '_', '-', '.'")
        return self

    @property
    def label(self) -> str:
        return f"secret:{self.secret}" if self.secret else f"env:{self.env}"


class InboundAuth(Spec):
    """How a system proves it is the one calling our webhook endpoint."""

    scheme: Literal["standard_webhooks", "hmac", "stripe", "bearer", "basic", "none"] = Field(
        description="standard_webhooks (webhook-id/-timestamp/-signature), hmac (signature header over the "
        "raw body), stripe (Stripe-Signature: t=…,v1=…), bearer (Authorization: Bearer), basic, "
        "or none (only with public: true)."
    )
    secrets: list[SecretRef] = Field(
        default_factory=list,
        description="Signing secrets or tokens. Several may be listed during a rotation; any one matches.",
    )
    username: str | None = Field(None, description="basic: the expected user name.")
    header: str = Field("X-Signature", description="hmac: header carrying the signature.")
    algorithm: Literal["sha256", "sha1", "sha512"] = Field("sha256", description="hmac: digest algorithm.")
    encoding: Literal["hex", "base64"] = Field("hex", description="hmac: how the signature is encoded.")
    prefix: str = Field("", description="hmac: text before the signature in the header, e.g. `sha256=`.")
    timestamp_header: str | None = Field(
        None,
        description="hmac: header with the signing time; when set, the signed text is `{timestamp}.{body}` "
        "unless `signed` says otherwise.",
    )
    timestamp_format: Literal["unix_s", "unix_ms", "iso8601"] = Field(
        "unix_s",
        description="hmac: how timestamp_header writes the time: unix_s (Slack), unix_ms (HubSpot v3) or "
        "iso8601 (Zendesk, e.g. 2021-03-25T05:09:27Z).",
    )
    signed: str | None = Field(
        None,
        description="hmac: the text that is signed, from {body}, {timestamp}, {method} and {url}, e.g. "
        "`v0:{timestamp}:{body}` (Slack), `{timestamp}{body}` (Zendesk), `{method}{url}{body}{timestamp}` "
        "(HubSpot v3). Default: `{timestamp}.{body}` with a timestamp_header, else `{body}`.",
    )
    public_url: str | None = Field(
        None,
        description="hmac with {url}: the endpoint's URL exactly as the sender was given it (behind a proxy "
        "the hub sees another scheme or host). Default: the URL the request reached.",
    )
    tolerance_s: Duration = Field(
        300.0, description="Largest accepted age (or clock skew) of a signed timestamp."
    )
    allow_ips: list[str] = Field(default_factory=list, description="Optional allow-list of source CIDRs.")
    public: bool = Field(False, description="Must be true for scheme none: an endpoint anyone may call.")
    rate_per_s: float | None = Field(
        None,
        gt=0,
        description="Most requests per second accepted from this system, over all its endpoints; more get "
        "429 with Retry-After (a sender retries later). Default: no limit.",
    )
    burst: int | None = Field(
        None,
        ge=1,
        description="Requests accepted at once above rate_per_s before 429s start "
        "(default: one second's worth).",
    )

    @field_validator("allow_ips")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError as exc:
                raise ValueError(f"bad CIDR {c!r}: write e.g. 203.0.113.0/24 or 2001:db8::/32") from exc
        return v

    @model_validator(mode="after")
    def _coherent(self) -> InboundAuth:
        if self.scheme == "none" and not self.public:
            raise ValueError(
                "an endpoint with no authentication must be marked `public: true`; "
                "prefer scheme standard_webhooks or hmac"
            )
        if self.scheme in ("standard_webhooks", "hmac", "stripe", "bearer", "basic") and not self.secrets:
            raise ValueError(f"scheme {self.scheme} needs at least one entry in `secrets`")
        if self.scheme == "basic" and not self.username:
            raise ValueError("scheme basic needs `username`")
        if self.burst is not None and self.rate_per_s is None:
            raise ValueError("`burst` needs `rate_per_s`")
        if self.signed is not None:
            names = re.findall(r"\{([^{}]*)\}", self.signed)
            unknown = sorted(set(names) - {"body", "timestamp", "method", "url"})
            if unknown:
                raise ValueError(
                    f"`signed` names {{{unknown[0]}}}; use only {{body}}, {{timestamp}}, {{method}} and {{url}}"
                )
            if "body" not in names:
                raise ValueError(
                    "`signed` must include {body}: a signature that skips the body proves nothing"
                )
            if "timestamp" in names and not self.timestamp_header:
                raise ValueError("`signed` uses {timestamp}: add `timestamp_header`")
        return self


class SystemCommon(Spec):
    """Settings every system has, whatever its kind."""

    kind: str | None = Field(None, description="Connector that talks to it (`patchbay connectors`).")
    owner: str = Field(description="Team or person answerable for this system's connection.")
    purpose: str = Field("", description="What the business uses this system for.")
    owns: list[str] = Field(
        default_factory=list, description="Data domains or fields this system is the source of truth for."
    )
    webhook: InboundAuth | None = Field(
        None, description="How this system authenticates when it calls Patchbay."
    )
    allow_private_network: bool = Field(
        False,
        description="Allow connections to loopback/private addresses (internal systems, local demos): HTTP "
        "calls and database, broker and SMTP connections alike.",
    )
    allow_networks: list[str] = Field(
        default_factory=list,
        description="Non-public networks (CIDRs) this system may be reached on while every other internal "
        "address stays blocked, e.g. [10.20.0.0/16]; narrower than allow_private_network.",
    )

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError as exc:
                raise ValueError(f"bad CIDR {c!r}: write e.g. 10.20.0.0/16 or fd12:3456::/48") from exc
        return v


class RetryPolicy(Spec):
    schedule: list[Duration] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description="Waits between tries after a transient failure (default 5s 5m 30m 2h 5h 10h 10h: "
        "about 28 h); past the last one the delivery is dead-lettered.",
    )
    jitter: float = Field(0.2, ge=0, le=1, description="Each wait is varied by up to this fraction.")
    max_retry_after: Duration = Field(3600.0, description="Largest Retry-After a destination may ask for.")

    @field_validator("schedule")
    @classmethod
    def _non_empty(cls, v: list[float]) -> list[float]:
        if len(v) > 50:
            raise ValueError("at most 50 retries; widen the waits instead")
        return v


class DeliveryPolicy(Spec):
    """How a destination is delivered to. Every field has a default; override what you need."""

    timeout_s: float = Field(10.0, gt=0, le=600, description="Per-attempt timeout in seconds.")
    max_concurrency: int = Field(
        8, ge=1, le=256, description="Attempts in flight at once to this destination."
    )
    rate_limit_per_s: float | None = Field(
        None, gt=0, description="At most this many attempts per second to this destination (a token bucket)."
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    follow_redirects: bool = Field(False, description="Follow 3xx answers (off: a redirect is a failure).")
    idempotency_header: str = Field("Idempotency-Key", description="Header that carries the idempotency key.")

    def merged(self, override: dict[str, Any] | None) -> DeliveryPolicy:
        if not override:
            return self
        base = self.model_dump()
        for k, v in override.items():
            if k == "retry" and isinstance(v, dict):
                base["retry"] = {**base["retry"], **v}
            else:
                base[k] = v
        return DeliveryPolicy.model_validate(base)


class DestinationBatch(Spec):
    """Several deliveries to one destination sent in one request (a destination's `batch:`)."""

    max_records: int = Field(
        100,
        ge=1,
        le=10000,
        description="At most this many records in one request; a preset operation may allow fewer (its "
        "API's documented limit, which `check` enforces).",
    )
    max_wait: Duration = Field(
        2.0,
        ge=0,
        le=3600,
        description="How long the first record waits for others before a smaller batch goes out, e.g. 2s. "
        "A backlog fills whole batches at once.",
    )


class Handshake(Spec):
    """A request a sender makes to check the endpoint (not an event): answered, not stored."""

    when: str = Field(
        description="Expression over the request's JSON body, true for the handshake, e.g. "
        "`type == 'url_verification'`. It is asked after the request is authenticated."
    )
    status: int = Field(200, ge=200, le=299, description="The answer's status code.")
    body: str | None = Field(
        None,
        description="Expression over the body giving the JSON answer, e.g. `{challenge: challenge}`; "
        "omitted: an empty answer.",
    )

    @field_validator("when", "body")
    @classmethod
    def _expr(cls, v: str | None) -> str | None:
        if v is not None:
            from patchbay.expressions import compile_expr

            compile_expr(v)  # an ExprError is a ValueError: reported at its line
        return v


class History(Spec):
    """How long the hub keeps finished runs (events, their deliveries, attempts and traces), and when it
    compresses them. Pending work is never removed; a run is removed whole."""

    keep: Duration | None = Field(
        30 * 86400.0,
        description="Remove delivered, filtered and discarded runs this long after their last change "
        "(e.g. 30d); null keeps them forever. A removed run's dedupe id is forgotten with it.",
    )
    keep_failures: Duration | None = Field(
        None,
        description="Remove dead-lettered and quarantined runs this long after their last change; "
        "default null: they stay until replayed or discarded.",
    )
    compress_after: Duration | None = Field(
        86400.0,
        description="Compress a finished run's payload and trace (zlib) this long after its last change; "
        "null never compresses. Reads, replays and exports open them as before.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> History:
        for name in ("keep", "keep_failures", "compress_after"):
            value = getattr(self, name)
            if value is not None and value < 60:
                raise ValueError(f"`{name}` must be at least 1m (or null)")
        return self


class WebhookTrigger(Spec):
    system: str = Field(
        description="The system that calls this endpoint; its `webhook` settings authenticate it."
    )
    path: str | None = Field(None, description="Endpoint path; default /hooks/<flow name>.")
    id_header: str | None = Field(
        None,
        description="Header carrying the sender's event id, used to drop re-sent events "
        "(standard_webhooks uses webhook-id).",
    )
    id_path: str | None = Field(None, description="Or a dotted path to the event id inside the JSON body.")
    files: Literal["refuse", "keep"] = Field(
        "refuse",
        description="A file in a multipart/form-data post: refuse (415, nothing stored) or keep (the field "
        "becomes {filename, content_type, size, content_base64}, within max_body_bytes).",
    )
    batch: bool = Field(
        False,
        description="A JSON array body is a batch: each element one event (deduped by id_path each), "
        "all stored in one transaction; the 202 lists the event ids.",
    )
    handshakes: list[Handshake] = Field(
        default_factory=list,
        description="Requests that check the endpoint rather than carry an event (Slack's url_verification, "
        "Xero's intent to receive): each authenticated like any request, then answered as given and not "
        "stored. A preset's trigger_defaults fill them in.",
    )
    accept_status: Literal[200, 202] = Field(
        202, description="The status of a stored event's answer; some senders count only 200 as received."
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^/[A-Za-z0-9_\-./]*$", v):
            raise ValueError(f"bad path {v!r}: start with / and use letters, digits, '-', '_', '.', '/'")
        return v


class ScheduleTrigger(Spec):
    """When a scheduled or polling flow runs."""

    cron: str | None = Field(
        None, description="Cron expression (5 fields), e.g. `0 2 * * *` for 02:00 daily."
    )
    every: Duration | None = Field(None, description="Or a fixed interval, e.g. 30s, 5m, 1h.")
    timezone: str = Field("UTC", description="Time zone the cron expression is read in, e.g. Europe/Paris.")
    catch_up: Literal["once", "skip"] = Field(
        "once",
        description="A run missed while the hub was down: run once at start (once) or wait for the next (skip).",
    )
    late_after: Duration | None = Field(
        None,
        description="Report the schedule as late when a run is this overdue (default: one interval, max 1h).",
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            from croniter import croniter

            if not croniter.is_valid(v):
                raise ValueError(
                    f"bad cron expression {v!r}: write 5 fields, minute hour day month weekday, e.g. '*/5 * * * *'"
                )
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {v!r}: use an IANA name such as Europe/Paris or UTC"
            ) from exc
        return v

    @model_validator(mode="after")
    def _one(self) -> ScheduleTrigger:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of `cron` or `every`")
        if self.every is not None and self.every < 1:
            raise ValueError("`every` must be at least 1s")
        return self


class Trigger(Spec):
    webhook: WebhookTrigger | None = None
    schedule: ScheduleTrigger | None = Field(
        None, description="Run on a schedule (alone, or to poll a source)."
    )
    source: dict[str, Any] | None = Field(
        None,
        description="A source system to read from: `system:` plus that connector's source settings "
        "(a table or API to poll on the schedule, or a queue/topic/folder to consume continuously).",
    )
    manual: bool = Field(
        False,
        description="Allow runs with a given event on demand: `patchbay run FLOW -d JSON` (`--remote` for a "
        "running hub), `POST /api/v1/flows/FLOW/runs` with `data`, the console's Run button. A batch flow "
        "can be run on demand either way.",
    )

    @model_validator(mode="after")
    def _one(self) -> Trigger:
        if self.webhook is None and self.schedule is None and self.source is None and not self.manual:
            raise ValueError("give a trigger: webhook, schedule, source (or manual: true)")
        if self.webhook is not None and (self.schedule is not None or self.source is not None):
            raise ValueError("a webhook flow cannot also have a schedule or a source; make two flows")
        if self.source is not None and not isinstance(self.source.get("system"), str):
            raise ValueError("`source` needs `system: NAME`")
        return self


AlertKind = Literal[
    "failures",
    "destination_paused",
    "schedule_late",
    "source_failing",
    "dead_letters",
    "contract_drift",
    "batch_failed",
]


class AlertRule(Spec):
    """One alert: a condition the hub watches, and who is told once when it starts and once when it ends."""

    when: AlertKind = Field(
        description="What to watch. failures: `count` failed delivery attempts to one destination "
        "within `window` (it clears once an attempt succeeds and none has failed for a minute); "
        "destination_paused: a destination paused (401/403) or disabled (410) until someone resumes it; "
        "schedule_late: a scheduled run overdue by more than the schedule's `late_after`; source_failing: a "
        "flow's source or schedule paused (auth error) or stopped (terminal error) until resumed, or "
        "failing `count` runs in a row (default 3); dead_letters: "
        "a flow's dead letters plus quarantined events above `above`; contract_drift: events within "
        "`window` (default 10m) that differ from the flow's input contract (flows/<flow>.contract.yaml); "
        "batch_failed: a batch flow's latest run failed or stopped (schema drift, the delete guard, an "
        "error); a later good run clears it."
    )
    notify: list[str | dict[str, Any]] = Field(
        min_length=1,
        description="Systems to tell, by name: the message goes out through that system as a "
        "destination (chat, smtp, http...), stored and retried like any delivery. A message's title and "
        "text fill the destination's `title`/`subject` and `text`/`message` settings; an http system "
        "receives the alert as JSON. Give other settings as a mapping, e.g. "
        "`{system: oncall-mail, to: [ops@example.com]}`, plus an optional `delivery`.",
        examples=[["ops-chat", {"system": "oncall-mail", "to": ["ops@example.com"]}]],
    )
    count: int | None = Field(
        None,
        ge=1,
        description="failures: failed attempts within `window` that raise it (default 5). source_failing: "
        "failed runs in a row (default 3).",
    )
    window: Duration | None = Field(
        None,
        description="failures: the sliding window attempts are counted in (default 10m). dead_letters: count "
        "only those of this period (default: all that are still dead or quarantined).",
    )
    above: int | None = Field(
        None, ge=0, description="dead_letters: alert when a flow has more than this many (default 0)."
    )
    name: str | None = Field(
        None,
        pattern=NAME_RE,
        description="A name for the rule. Its state (firing or not) is kept under this name, so changing the "
        "rule's settings does not alert again.",
    )

    @field_validator("notify")
    @classmethod
    def _targets(cls, v: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        for entry in v:
            if isinstance(entry, dict) and not isinstance(entry.get("system"), str):
                raise ValueError("a notify entry is a system name, or a mapping with `system: NAME`")
        return v

    @model_validator(mode="after")
    def _fits(self) -> AlertRule:
        if self.count is not None and self.when != "failures":
            raise ValueError("`count` applies to `when: failures` only")
        if self.above is not None and self.when != "dead_letters":
            raise ValueError("`above` applies to `when: dead_letters` only")
        if self.window is not None and self.when not in ("failures", "dead_letters", "contract_drift"):
            raise ValueError("`window` applies to `when: failures`, `dead_letters` and `contract_drift` only")
        if self.window is not None and self.window < 1:
            raise ValueError("`window` must be at least 1s")
        return self


class HubSettings(Spec):
    """patchbay.yaml: how the hub itself runs."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8787, ge=0, le=65535, description="Port to listen on.")
    store: str = Field(
        ".patchbay/patchbay.db",
        description="The store: a SQLite file (relative to the project), or the same as a URL: sqlite:///RELATIVE/PATH, "
        "sqlite:////ABSOLUTE/PATH; or a PostgreSQL database: postgresql://USER@HOST:PORT/DATABASE (optionally "
        "?schema=NAME). Its password is never written here: libpq reads it from PGPASSWORD or ~/.pgpass.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted webhook body.")
    max_json_depth: int = Field(32, ge=2, le=1000, description="Deepest accepted JSON nesting.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    demo_inbox: bool = Field(
        False,
        description="Serve /_inbox/<name>, a local receiver that appends what it gets to inbox/<name>.jsonl.",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight deliveries may finish."
    )
    claim_lease: Duration = Field(
        30.0,
        description="With a PostgreSQL store: how long a worker's claim on a delivery (queued or sending) and "
        "on a destination's sending slot lasts unless renewed; the worker renews it every third of this while "
        "it holds it. A worker that dies without letting go has its claims taken over this long after its "
        "last renewal (plus about a second). At least 5s.",
    )
    intake_when_behind: int = Field(
        16,
        ge=1,
        description="While a destination falls behind (its worker finds more due than it holds, and what it "
        "reads has waited over a second since it came due), at most this many webhooks are taken at once; the "
        "others wait their turn and none is refused, so the hub keeps time to deliver what it took "
        "(engine/intake.py). A `--role web` process does so while a worker process of the same store says so.",
    )
    encrypt_sensitive: bool = Field(
        False,
        description="Store every flow's `sensitive` values encrypted with a key kept in the vault; "
        "a flow may override it.",
    )
    delivery: DeliveryPolicy = Field(
        default_factory=DeliveryPolicy, description="Defaults for every destination."
    )
    history: History = Field(
        default_factory=History,
        description="Retention of finished runs for every flow; a flow may override it.",
    )
    alerts: list[AlertRule] = Field(
        default_factory=list,
        description="Alert rules watching every flow, e.g. "
        "`- {when: failures, count: 5, window: 10m, notify: [ops-chat]}`; a flow file may add its own.",
    )

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        return store_location(v)

    @field_validator("claim_lease")
    @classmethod
    def _lease(cls, v: float) -> float:
        if not 5.0 <= v <= 3600.0:
            raise ValueError("must be at least 5s (renewed every third of it) and at most 1h, e.g. 30s")
        return v


def store_location(value: str) -> str:
    """The store setting as a file path (a path, or sqlite:///PATH) or a PostgreSQL URL, returned as written
    (without a password: that comes from the environment). Any other URL is refused here, so it never
    becomes a file named like the URL; the message names the scheme only (a URL may carry a password). The one
    reader of the setting: the hub's settings and `security.project.store_path_of` both call it."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    if scheme.lower() == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                "write sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH (as SQLAlchemy), or a plain file path"
            )
        return rest[1:]
    if scheme.lower() in ("postgresql", "postgres"):
        netloc = rest.split("/", 1)[0]
        if "@" in netloc and ":" in netloc.rsplit("@", 1)[0]:
            raise ValueError(
                f"a {scheme}:// store's password is never written in patchbay.yaml: remove it from the URL and "
                "set PGPASSWORD in the hub's environment (or use ~/.pgpass)"
            )
        return value
    raise ValueError(
        f"this hub keeps its store in SQLite or PostgreSQL and cannot use a {scheme}:// store: "
        "write a file path such as .patchbay/patchbay.db, or postgresql://USER@HOST/DATABASE"
    )
