"""nats: publish each record to a NATS subject (JetStream-acknowledged, or core NATS), or consume as a source.

Every message carries the idempotency key in the `Nats-Msg-Id` header, on which JetStream drops
duplicates within the stream's duplicate window (2 minutes by default): a publish retried after a
lost ack is stored once. It is also in the header named by `delivery.idempotency_header`.

What the server's answers mean:
  JetStream ack (also "duplicate")          delivered
  no stream captures the subject            terminal: add the subject to a stream (or set
                                            jetstream: false), then `patchbay replay`
  stream limits reached, JetStream down     transient
  authorization or permissions violation    auth: the destination pauses until resumed
  message larger than max_payload           terminal
  connection refused or lost, timeout       transient; the next send opens a new connection
Core NATS (jetstream: false) is at most once to the subscribers connected at that moment: the
flush (two PING/PONG round trips, so a permissions -ERR arrives first) only proves the server got it.

As a source (mode stream), the flow reads a JetStream stream through a durable pull consumer (created
when missing, explicit acks): it fetches up to batch_size messages, commits them as events, then
acknowledges each one and flushes. A crash or a lost connection before the acks leaves them pending:
the server redelivers them once ack_wait_s has passed (so after a reconnect they may take that long),
and their ids drop the copies already committed. A failed commit naks them for immediate redelivery.
A record's id is the Nats-Msg-Id header (what the nats destination sets; JetStream also dedupes on
it), else `<stream>@<created>#<stream sequence>`.
With jetstream: false the source is a core NATS subscription: AT MOST ONCE, nothing is acknowledged,
and what is published while the hub is down, or not yet committed when it stops, is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator

from patchbay.config.models import DeliveryPolicy, SecretRef, Spec
from patchbay.connectors.base import (
    BaseSink,
    Batch,
    Emit,
    Outcome,
    OutcomeClass,
    Resources,
    SourceRecord,
    Stopwatch,
    import_driver,
)
from patchbay.connectors.broker_client import (
    BATCH_SIZE_DESCRIPTION,
    BODY_DESCRIPTION,
    TIMEOUT_DESCRIPTION,
    BodyRenderer,
    Inbox,
    Lazy,
    check_body,
    check_cancelled,
    check_template,
    decode_body,
    describe,
    failure,
    render_name,
    ssl_context,
    text,
    timed_out,
)
from patchbay.errors import AuthError, TerminalError, TransientError
from patchbay.expressions import render_template
from patchbay.registry import connector
from patchbay.security.ssrf import BlockedAddress, connect_first

log = logging.getLogger("patchbay.connectors.nats")

R = TypeVar("R")

_DENIED = re.compile(r"permissions violation for publish to \"?([^\"']+)", re.IGNORECASE)


class NatsSystem(Spec):
    servers: list[str] = Field(
        min_length=1,
        description="Server URLs, tried in order: nats://host:4222 (or tls://host:4222).",
        examples=[["nats://nats-1.internal:4222", "nats://nats-2.internal:4222"]],
    )
    user: str | None = Field(None, description="User name, with `password`.")
    password: SecretRef | None = Field(None, description="The user's password, e.g. {secret: nats_password}.")
    token: SecretRef | None = Field(
        None, description="Or an authentication token, e.g. {secret: nats_token}."
    )
    tls: bool = Field(False, description="Require TLS (implied by tls:// URLs).")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None,
        description="Path to a PEM file of the CAs to trust for this server instead of the system's "
        "(e.g. a private CA).",
    )

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
                raise ValueError(f"bad server URL {url!r}: write nats://host:4222 (or tls://, ws://, wss://)")
            if parts.username or parts.password:
                raise ValueError(
                    f"{url!r} holds credentials: use `user` and `password: {{secret: NAME}}` instead"
                )
        return v

    @model_validator(mode="after")
    def _auth(self) -> NatsSystem:
        if self.token is not None and (self.user is not None or self.password is not None):
            raise ValueError("give either `token` or `user` + `password`, not both")
        if (self.user is None) != (self.password is None):
            raise ValueError("`user` and `password` go together")
        return self


def _tokens_problem(value: str) -> str | None:
    """What every NATS subject, published or subscribed, must be: non-empty dot-separated tokens."""
    if not value:
        return "is empty"
    if any(c.isspace() for c in value):
        return "contains white space"
    if any(not t for t in value.split(".")):
        return "has an empty token (a leading, trailing or double dot)"
    return None


def _subject_problem(value: str) -> str | None:
    """Why a subject to publish to is malformed, or None."""
    problem = _tokens_problem(value)
    if problem is None and any(t in ("*", ">") for t in value.split(".")):
        return "contains a wildcard (* or >); publish to a concrete subject"
    return problem


class NatsSinkConfig(Spec):
    subject: str = Field(
        description="Subject to publish to; may hold {{ expressions }}, e.g. `orders.{{ region }}.created`.",
        examples=["orders.created", "leads.{{ lower(properties.country) }}"],
    )
    jetstream: bool = Field(
        True,
        description="Publish to JetStream and wait for the stream's ack (durable, deduplicated on "
        "Nats-Msg-Id). false: core NATS, acknowledged only by a flush (at most once).",
    )
    stream: str | None = Field(
        None,
        description="JetStream: the stream that must store the message; a publish captured by another fails.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Message headers; values may hold {{ expr }}."
    )
    body: str | dict[str, Any] | None = Field(None, description=BODY_DESCRIPTION)

    _body = field_validator("body")(classmethod(lambda cls, v: check_body(v)))

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        template = render_template(v)
        problem = _subject_problem(v) if template.is_static else None
        if problem:
            raise ValueError(f"subject {v!r} {problem}")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for value in v.values():
            check_template(value)
        return v

    @model_validator(mode="after")
    def _stream_needs_jetstream(self) -> NatsSinkConfig:
        if self.stream is not None and not self.jetstream:
            raise ValueError("`stream` needs jetstream: true")
        return self


class _Denied(Exception):
    """The server refused a publish with a permissions violation."""


class _Conn:
    """A NATS client, its JetStream context, and what the server told us asynchronously."""

    def __init__(self, nc: Any, lost: asyncio.Future[None]) -> None:
        self.nc = nc
        self.js: Any = None
        self.lost = lost  # done once the client is disconnected or closed
        self.denied: dict[str, float] = {}  # lower-cased subject -> when a permissions violation arrived

    def check_denied(self, subject: str, since: float) -> None:
        if self.denied.get(subject.lower(), -1.0) >= since:
            raise _Denied(f"permissions violation for publish to {subject!r}")

    async def until_lost(self, op: Coroutine[Any, Any, R]) -> R:
        """Run `op`, failing at once if the connection goes (nats-py leaves requests waiting on it)."""
        task = asyncio.ensure_future(op)
        try:
            waits: set[asyncio.Future[Any]] = {task, self.lost}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise ConnectionError("connection lost")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


_DEFAULT_PORTS = {"nats": 4222, "tls": 4222, "ws": 80, "wss": 443}


def _pinned(url: str, address: str) -> str:
    """`url` with its host replaced by `address` (a checked IP), port and the rest kept."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


async def open_connection(
    nats_client: Any,
    nats_errors: Any,
    s: NatsSystem,
    resources: Resources,
    timeout_s: float,
    name: str = "patchbay",
) -> _Conn:
    """Connect without automatic reconnects: a loss completes `_Conn.lost` and the caller decides.

    Each server's host is resolved and checked by the address guard; servers the guard refuses are
    skipped, and BlockedAddress is raised when it refuses them all. nats-py is given the checked IP
    addresses, never the names: for TLS its `tls_hostname` option keeps the server's name for SNI and
    the certificate check. Over websockets (ws://, wss://), which ignore tls_hostname, the Host header
    carries the name and the TLS context (ServerNameContext) checks the certificate against it. The
    servers a cluster announces (INFO connect_urls) are used by nats-py only to reconnect, which is off.
    """
    tls_wanted = s.tls or any(u.startswith(("tls://", "wss://")) for u in s.servers)
    targets: list[tuple[str, list[str]]] = []  # (server URL, its checked addresses)
    blocked: BlockedAddress | None = None
    for url in s.servers:
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            addresses = await resources.allowed_addresses(
                host, parts.port or _DEFAULT_PORTS.get(parts.scheme, 4222)
            )
        except BlockedAddress as exc:
            blocked = blocked or exc
            continue
        targets.append((url, addresses))
    if not targets:
        assert blocked is not None
        raise blocked

    async def attempt(target: tuple[str, list[str]]) -> _Conn:
        url, addresses = target
        parts = urlsplit(url)
        host = parts.hostname or ""
        websocket = parts.scheme in ("ws", "wss")
        return await _connect_one(
            nats_client,
            nats_errors,
            s,
            resources,
            timeout_s,
            name,
            servers=[_pinned(url, a) for a in addresses],
            tls=await ssl_context(tls_wanted, s.verify_tls, s.ca_bundle, server_name=host),
            tls_hostname=None if websocket else host,
            ws_headers={"Host": [parts.netloc.rpartition("@")[2]]} if websocket else None,
        )

    def next_server(exc: BaseException) -> bool:  # unreachable: try the next configured server
        return isinstance(exc, OSError | nats_errors.NoServersError)

    return await connect_first(targets, attempt, next_on=next_server)


async def _connect_one(
    nats_client: Any,
    nats_errors: Any,
    s: NatsSystem,
    resources: Resources,
    timeout_s: float,
    name: str,
    *,
    servers: list[str],
    tls: Any,
    tls_hostname: str | None,
    ws_headers: dict[str, list[str]] | None,
) -> _Conn:
    nc = nats_client.Client()
    conn = _Conn(nc, asyncio.get_running_loop().create_future())
    errors: list[BaseException] = []

    async def on_error(exc: BaseException) -> None:
        errors.append(exc)
        m = _DENIED.search(str(exc))
        if m:
            conn.denied[m.group(1).strip().lower()] = time.monotonic()
        log.debug("nats: %s", describe(exc))

    async def on_lost() -> None:
        if not conn.lost.done():
            conn.lost.set_result(None)

    secret = resources.secret
    extra: dict[str, Any] = {}
    if tls_hostname:
        extra["tls_hostname"] = tls_hostname
    if ws_headers:
        extra["ws_connection_headers"] = ws_headers
    try:
        await nc.connect(
            servers=servers,
            name=name,
            allow_reconnect=False,  # a lost connection is replaced by the caller, not behind its back
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            dont_randomize=True,
            connect_timeout=timeout_s,
            error_cb=on_error,
            disconnected_cb=on_lost,
            closed_cb=on_lost,
            user=s.user,
            password=secret(s.password) if s.password is not None else None,
            token=secret(s.token) if s.token is not None else None,
            tls=tls,
            **extra,
        )
    except BaseException as exc:
        await nc.close()
        if isinstance(exc, nats_errors.NoServersError) and errors:
            raise ConnectionError(f"cannot connect: {describe(errors[-1])}") from exc
        raise
    conn.js = nc.jetstream(timeout=timeout_s)
    return conn


@connector("nats", roles=("destination",), config=NatsSinkConfig, system_config=NatsSystem, extra="nats")
class NatsSink(BaseSink[NatsSystem, NatsSinkConfig]):
    """Publish each record to a NATS subject, through JetStream by default."""

    def __init__(
        self, system: NatsSystem, config: NatsSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        self.nats_client = import_driver("nats.aio.client", package="nats-py", extra="nats", kind="nats")
        self.nats_errors = import_driver("nats.errors", package="nats-py", extra="nats", kind="nats")
        super().__init__(system, config, policy, resources)
        self._subject = render_template(config.subject)
        self._headers = {k: render_template(v) for k, v in config.headers.items()}
        self._body = BodyRenderer(config.body)
        self._conn: Lazy[_Conn] = Lazy(
            self._open,
            lambda c: bool(c.nc.is_connected) and not c.lost.done(),
            lambda c: c.nc.close(),
            open_timeout_s=policy.timeout_s,
            what=f"nats {system.servers[0]}",
        )

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        req: dict[str, Any] = {"subject": render_name(self._subject, record, "subject", _subject_problem)}
        if self._headers:
            req["headers"] = {k: t.render(record) for k, t in self._headers.items()}
        req["body"] = self._body.json(record, key)
        return req

    # -- delivery half -----------------------------------------------------
    async def _open(self) -> _Conn:
        return await open_connection(
            self.nats_client, self.nats_errors, self.system, self.resources, self.policy.timeout_s
        )

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        sw = Stopwatch()
        conn: _Conn | None = None
        subject = request["subject"]
        body = request["body"].encode()
        headers = {**(request.get("headers") or {}), self.policy.idempotency_header: key, "Nats-Msg-Id": key}
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                conn = await self._conn.get()
                excerpt = await conn.until_lost(self._publish(conn, subject, body, headers))
        except TimeoutError:
            if conn is not None:
                try:
                    conn.check_denied(subject, started)  # a refused JetStream publish is never answered
                except _Denied as exc:
                    return failure(OutcomeClass.AUTH, sw, str(exc), self.resources.redact)
            self._conn.discard(conn)
            return timed_out(sw, self.policy.timeout_s)
        except BlockedAddress as exc:  # refused before connecting, the same way on every try
            return failure(
                OutcomeClass.TERMINAL, sw, exc.explain(self.resources.system or None), self.resources.redact
            )
        except Exception as exc:
            cls, error, keep = classify_nats(exc, connected=conn is not None, subject=subject)
            if not keep:
                self._conn.discard(conn)
            return failure(cls, sw, error, self.resources.redact)
        return Outcome(OutcomeClass.SUCCESS, None, sw.ms, excerpt=excerpt)

    async def _publish(self, conn: _Conn, subject: str, body: bytes, headers: dict[str, str]) -> str:
        started = time.monotonic()
        if self.config.jetstream:
            ack = await conn.js.publish(
                subject, body, timeout=self.policy.timeout_s, headers=headers, stream=self.config.stream
            )
            excerpt = f"stored in stream {ack.stream} as #{ack.seq}"
            return excerpt + (
                " (a duplicate: JetStream already had this Nats-Msg-Id)" if ack.duplicate else ""
            )
        await conn.nc.publish(subject, body, headers=headers)
        # The server reports a refused publish with an asynchronous -ERR that may trail the first PONG;
        # a second round trip lets it arrive before we call the message delivered.
        await conn.nc.flush(timeout=self.policy.timeout_s)
        await conn.nc.flush(timeout=self.policy.timeout_s)
        conn.check_denied(subject, started)
        return "flushed to the server"

    async def close(self) -> None:
        await self._conn.aclose()


def classify_nats(exc: BaseException, *, connected: bool, subject: str) -> tuple[OutcomeClass, str, bool]:
    """(class, message, keep the connection) for an exception of nats-py."""
    from nats import errors as ne
    from nats.js import errors as je

    text = str(exc)
    if isinstance(exc, _Denied):
        return OutcomeClass.AUTH, text, True
    if isinstance(exc, je.NoStreamResponseError):
        return (
            OutcomeClass.TERMINAL,
            f"no JetStream stream captures subject {subject!r}; add it to a stream's subjects "
            "(or set jetstream: false), then replay",
            True,
        )
    if isinstance(exc, je.APIError):
        desc = exc.description or text
        if exc.code in (401, 403):
            return OutcomeClass.AUTH, f"JetStream refused: {desc}", True
        if (exc.code or 0) >= 500 or "exceeded" in desc or "limit" in desc:
            return OutcomeClass.TRANSIENT, f"JetStream: {desc}", True
        return OutcomeClass.TERMINAL, f"JetStream refused the message: {desc} (err_code {exc.err_code})", True
    if (
        isinstance(exc, ne.AuthorizationError)
        or "authorization violation" in text.lower()
        or "authentication" in text.lower()
        or "permissions violation" in text.lower()
    ):
        return OutcomeClass.AUTH, f"access refused: {text}", False
    if isinstance(exc, ne.MaxPayloadError):
        return OutcomeClass.TERMINAL, "the message is larger than the server's max_payload", True
    if isinstance(exc, ne.BadSubjectError):
        return OutcomeClass.TERMINAL, f"bad subject {subject!r}", True
    if isinstance(exc, ne.TimeoutError):
        return OutcomeClass.TRANSIENT, f"timed out: {describe(exc)}", False
    if isinstance(exc, ne.Error | ConnectionError | OSError):
        what = "cannot connect" if not connected else "connection lost"
        shown = text if text.startswith("cannot connect") else f"{what}: {describe(exc)}"
        return OutcomeClass.TRANSIENT, shown, False
    return OutcomeClass.TRANSIENT, f"connector error: {describe(exc)}", False


# ===================================================================== source
def _filter_problem(value: str) -> str | None:
    """Why a subscription subject (wildcards allowed) is malformed, or None."""
    problem = _tokens_problem(value)
    if problem is not None:
        return problem
    tokens = value.split(".")
    for i, t in enumerate(tokens):
        if ">" in t and (t != ">" or i != len(tokens) - 1):
            return "uses > other than as the whole last token (e.g. orders.>)"
        if "*" in t and t != "*":
            return "uses * other than as a whole token (e.g. orders.*.created)"
    return None


def _name_problem(value: str) -> str | None:
    if not value or any(c.isspace() or c in ".*>" for c in value):
        return "may not be empty or hold white space, dots, * or >"
    return None


class NatsSourceConfig(Spec):
    jetstream: bool = Field(
        True,
        description="true: consume a JetStream stream through a durable pull consumer: at least once, each "
        "message acknowledged only after its commit. false: a core NATS subscription, which is AT MOST "
        "ONCE: messages published while the hub is down, or received but not yet committed when it "
        "stops, are lost for good. Use false only for data you can afford to lose.",
    )
    stream: str | None = Field(None, description="JetStream: the stream to consume (it must exist).")
    durable: str | None = Field(
        None,
        description="JetStream: the durable consumer's name; created when missing. The stream remembers its "
        "position and unacknowledged messages, so keep the name stable and use one per flow.",
    )
    subject: str | None = Field(
        None,
        description="JetStream: only the stream's messages on this subject (wildcards allowed; omitted: all "
        "of them). Core NATS: the subject to subscribe to, e.g. `orders.*.created` or `orders.>`.",
    )
    queue: str | None = Field(
        None,
        description="Core NATS: a queue group; hubs in one group share the messages instead of each "
        "getting all of them.",
    )
    start: Literal["all", "new"] = Field(
        "all",
        description="JetStream: where a new durable consumer starts: all = the stream's first message, new = "
        "only messages stored after it is created. An existing consumer keeps its position.",
    )
    batch_size: int = Field(100, ge=1, le=10_000, description=BATCH_SIZE_DESCRIPTION)
    ack_wait_s: float = Field(
        30.0,
        ge=1,
        le=86_400,
        description="JetStream, for a new durable consumer: how long the server waits for the "
        "acknowledgement before it redelivers a message; after a lost connection, its unacknowledged "
        "messages come back this much later. Keep it well above the time a batch takes to commit.",
    )
    fetch_wait_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="JetStream: how long one fetch waits when no message is ready (long poll).",
    )
    max_wait_ms: int = Field(
        50,
        ge=0,
        le=60_000,
        description="Core NATS: once a message has arrived, how long to wait for more to fill the batch, in "
        "milliseconds. (JetStream fetches take what is ready at once.)",
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description=TIMEOUT_DESCRIPTION)

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        problem = _filter_problem(v) if v is not None else None
        if problem:
            raise ValueError(f"subject {v!r} {problem}")
        return v

    @field_validator("stream", "durable", "queue")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        problem = _name_problem(v) if v is not None else None
        if problem:
            raise ValueError(f"{v!r}: a name {problem}")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> NatsSourceConfig:
        if self.jetstream:
            if self.stream is None or self.durable is None:
                raise ValueError("a JetStream source needs `stream` and `durable` (or jetstream: false)")
            if self.queue is not None:
                raise ValueError(
                    "`queue` is for core NATS (jetstream: false); JetStream consumers share by durable"
                )
        else:
            if self.subject is None:
                raise ValueError("a core NATS source (jetstream: false) needs `subject`")
            if self.stream is not None or self.durable is not None:
                raise ValueError("`stream` and `durable` need jetstream: true")
        return self


@connector("nats", roles=("source",), config=NatsSourceConfig, system_config=NatsSystem, extra="nats")
class NatsSource:
    """Consume a JetStream stream (durable, acknowledged after commit), or a core subject (at most once)."""

    mode = "stream"

    def __init__(self, system: NatsSystem, config: NatsSourceConfig, resources: Resources) -> None:
        self.nats_client = import_driver("nats.aio.client", package="nats-py", extra="nats", kind="nats")
        self.nats_errors = import_driver("nats.errors", package="nats-py", extra="nats", kind="nats")
        self.system = system
        self.config = config
        self.resources = resources
        flow = resources.extra.get("flow")
        self.connection_name = f"patchbay source {flow}" if flow else "patchbay source"
        self.what = (
            f"consuming stream {config.stream!r} (durable {config.durable!r})"
            if config.jetstream
            else f"subscribing to {config.subject!r}"
        )
        self._conn: _Conn | None = None
        self.connections = 0  # opened so far (reconnects show here)
        self.subscriptions = 0  # subscriptions made so far
        self.settled = (
            0  # messages done with upstream so far: committed, then acknowledged (core NATS: committed)
        )

    async def stream(self, emit: Emit) -> None:
        """Consume until cancelled; raises when the connection is lost (the engine reconnects)."""
        try:
            conn = await self._connect()
            if self.config.jetstream:
                await self._consume(conn, emit)
            else:
                await self._subscribe(conn, emit)
        finally:
            await self._disconnect()

    async def _connect(self) -> _Conn:
        await self._disconnect()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                self._conn = await open_connection(
                    self.nats_client,
                    self.nats_errors,
                    self.system,
                    self.resources,
                    self.config.timeout_s,
                    self.connection_name,
                )
        except TimeoutError as exc:
            raise self._error(f"connecting: timed out after {self.config.timeout_s:g}s") from exc
        except BlockedAddress as exc:
            raise self._error(exc.explain(self.resources.system or None), OutcomeClass.TERMINAL) from exc
        except Exception as exc:
            cls, message, _ = classify_nats(exc, connected=False, subject=self.config.subject or "")
            raise self._error(f"connecting: {message}", cls) from exc
        self.connections += 1
        return self._conn

    # -- JetStream ---------------------------------------------------------
    async def _consume(self, conn: _Conn, emit: Emit) -> None:
        from nats.js import api
        from nats.js import errors as je

        cfg = self.config
        assert cfg.stream is not None and cfg.durable is not None
        js = conn.js
        what = "reading the stream"
        try:
            async with asyncio.timeout(cfg.timeout_s):
                info = await conn.until_lost(js.stream_info(cfg.stream))
                what = "reading the consumer"
                try:
                    found = await conn.until_lost(js.consumer_info(cfg.stream, cfg.durable))
                except je.NotFoundError:
                    what = "creating the consumer"
                    await conn.until_lost(
                        js.add_consumer(
                            cfg.stream,
                            api.ConsumerConfig(
                                durable_name=cfg.durable,
                                deliver_policy=api.DeliverPolicy.ALL
                                if cfg.start == "all"
                                else api.DeliverPolicy.NEW,
                                ack_policy=api.AckPolicy.EXPLICIT,
                                ack_wait=cfg.ack_wait_s,
                                filter_subject=cfg.subject,
                                max_ack_pending=max(1000, 2 * cfg.batch_size),
                            ),
                        )
                    )
                else:
                    if (found.config.filter_subject or None) != cfg.subject:
                        raise TerminalError(
                            f"{self.what}: the durable consumer exists with subject filter "
                            f"{found.config.filter_subject or '(none)'!r}, not {cfg.subject or '(none)'!r}: "
                            "delete the consumer or choose another durable name"
                        )
                what = "subscribing"
                psub = await conn.until_lost(js.pull_subscribe_bind(durable=cfg.durable, stream=cfg.stream))
        except TerminalError:
            raise
        except TimeoutError as exc:
            raise self._error(f"{what}: timed out after {cfg.timeout_s:g}s") from exc
        except je.NotFoundError as exc:
            raise self._error(f"stream {cfg.stream!r} does not exist", OutcomeClass.TERMINAL) from exc
        except Exception as exc:
            cls, message, _ = classify_nats(exc, connected=True, subject=cfg.subject or "")
            raise self._error(f"{what}: {message}", cls) from exc
        self.subscriptions += 1
        # A stream deleted and created again numbers its messages from 1 anew: its creation time
        # keeps those ids apart from the old ones.
        created = f"@{int(info.created.timestamp() * 1000)}" if info.created is not None else ""
        prefix = f"{cfg.stream}{created}#"

        while True:
            try:
                msgs = await conn.until_lost(psub.fetch(cfg.batch_size, timeout=cfg.fetch_wait_s))
            except TimeoutError:
                continue  # nothing arrived during the long poll
            except Exception as exc:
                raise self._error(f"fetching: {describe(exc)}") from exc
            check_cancelled()
            records = [self._record(m, prefix) for m in msgs]
            try:
                await emit(Batch(records))
            except Exception:
                for m in msgs:  # not committed: ask for redelivery now rather than after ack_wait
                    with contextlib.suppress(Exception):
                        await m.nak()
                raise
            check_cancelled()
            try:
                for m in msgs:
                    await m.ack()
                await conn.until_lost(conn.nc.flush(cfg.timeout_s))  # the acks reached the server
                self.settled += len(msgs)
            except Exception as exc:
                # Committed but maybe not acknowledged: redelivered after ack_wait, dropped by id.
                raise self._error(f"acknowledging: {describe(exc)}") from exc
            check_cancelled()

    # -- core NATS: at most once -------------------------------------------
    async def _subscribe(self, conn: _Conn, emit: Emit) -> None:
        cfg = self.config
        assert cfg.subject is not None
        inbox: Inbox[Any] = Inbox()
        conn.lost.add_done_callback(lambda _: inbox.fail(self._error("connection lost")))

        async def received(msg: Any) -> None:
            inbox.put(msg)

        try:
            await conn.nc.subscribe(cfg.subject, queue=cfg.queue or "", cb=received)
            await conn.until_lost(conn.nc.flush(cfg.timeout_s))
        except Exception as exc:
            cls, message, _ = classify_nats(exc, connected=True, subject=cfg.subject)
            raise self._error(f"subscribing: {message}", cls) from exc
        self.subscriptions += 1
        while True:
            msgs = await inbox.take(cfg.batch_size, cfg.max_wait_ms / 1000)
            check_cancelled()
            await emit(Batch([self._record(m, None) for m in msgs]))
            self.settled += len(msgs)
            check_cancelled()

    # -- helpers -----------------------------------------------------------
    def _record(self, msg: Any, prefix: str | None) -> SourceRecord:
        data, raw = decode_body(msg.data)
        rid = text((msg.headers or {}).get("Nats-Msg-Id"))
        if rid is None and prefix is not None:
            rid = f"{prefix}{msg.metadata.sequence.stream}"
        return SourceRecord(data, id=rid, raw=raw)  # core NATS without Nats-Msg-Id: no id, no dedupe

    def _error(self, message: str, cls: OutcomeClass = OutcomeClass.TRANSIENT) -> Exception:
        text_ = self.resources.redact(f"{self.what}: {message}")
        if cls is OutcomeClass.AUTH:
            return AuthError(text_)
        if cls in (OutcomeClass.TERMINAL, OutcomeClass.GONE):
            return TerminalError(text_)
        return TransientError(text_)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.nc.close(), 5.0)
            except Exception as exc:
                log.debug("closing nats source connection: %s", describe(exc))

    async def close(self) -> None:
        await self._disconnect()
