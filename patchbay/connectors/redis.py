"""redis: add each record to a Redis stream (XADD) or publish it on a channel; or consume a stream (source).

A stream entry holds the body as JSON in the field `data` and the idempotency key in the field
`idempotency_key`; consumers drop the copies that at-least-once delivery brings (an XADD whose
reply was lost with the connection is added again). Pub/Sub messages are one string, so put the
key into the body with `key_field` if subscribers need it. Pub/Sub is at most once: only the
subscribers connected at that moment get the message; use a stream when the message must last.

What the server's answers mean:
  entry id (XADD) / receiver count (PUBLISH)   delivered
  WRONGPASS, NOAUTH, NOPERM                    auth: the destination pauses until resumed
  WRONGTYPE (the key is not a stream)          terminal
  OOM, LOADING, BUSY, READONLY, TRYAGAIN       transient
  connection refused or lost, timeout          transient (a stale pooled connection is retried once)

As a source (mode stream), the flow reads a stream through a consumer group (created with MKSTREAM
when missing): XREADGROUP up to batch_size entries, commit them as events, then XACK them. An entry
delivered but not acknowledged (a crash, a lost connection, a failed commit) stays in the consumer's
pending list, and every start reads that list again (from id 0) before new entries, so nothing
delivered is skipped. A record's id is the entry's `id_field` (idempotency_key, what the redis
destination writes), else `<stream>:<entry id>`; re-read entries are dropped by it. The record is the
JSON in `data_field` (data), else the entry's fields. Pub/Sub is not offered as a source: it is at
most once (a message published while the hub is disconnected is gone), so use a stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

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
    check_body,
    check_cancelled,
    check_key_field,
    check_template,
    decode_body,
    describe,
    failure,
    render_name,
    text,
    timed_out,
)
from patchbay.connectors.tls_client import TlsSettings, tls_context
from patchbay.errors import AuthError, TerminalError, TransientError
from patchbay.expressions import render_template
from patchbay.registry import connector
from patchbay.security.ssrf import blocked_cause, connect_first

log = logging.getLogger("patchbay.connectors.redis")
T = TypeVar("T")

_RESERVED_FIELDS = frozenset({"data", "idempotency_key"})
_BUSY = ("OOM", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "MOVED", "ASK")


class RedisSystem(Spec):
    url: str = Field(
        description="Server URL: redis://host:6379/0 (rediss:// for TLS, unix:///path/redis.sock). "
        "A user name may be given as redis://user@host; the password goes in `password`.",
        examples=["redis://redis.internal:6379/0"],
    )
    password: SecretRef | None = Field(None, description="Password (AUTH), e.g. {secret: redis_password}.")
    verify_tls: bool = Field(True, description="rediss://: verify the server's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None,
        description="rediss://: path to a PEM file of the CAs to trust instead of the system's "
        "(e.g. a private CA).",
    )
    client_name: str = Field(
        "patchbay", pattern=r"^\S+$", description="Connection name shown by CLIENT LIST (no spaces)."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
            raise ValueError(f"bad URL {v!r}: write redis://host:6379/0 (or rediss://, unix://)")
        if parts.password:
            raise ValueError("the URL holds a password: put it in `password: {secret: NAME}` instead")
        return v


class RedisSinkConfig(Spec):
    mode: Literal["stream", "publish"] = Field(
        "stream",
        description="stream: XADD to a stream (durable); publish: PUBLISH on a channel (at most once).",
    )
    stream: str | None = Field(None, description="stream mode: the stream key; may hold {{ expressions }}.")
    channel: str | None = Field(None, description="publish mode: the channel; may hold {{ expressions }}.")
    maxlen: int | None = Field(
        None, ge=1, description="stream mode: trim the stream to about this many entries (MAXLEN ~)."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="stream mode: extra entry fields beside `data` and `idempotency_key`; values may "
        "hold {{ expr }}.",
    )
    key_field: str | None = Field(
        None,
        description="Also write the idempotency key into the JSON body at this dotted path (for Pub/Sub).",
    )
    body: str | dict[str, Any] | None = Field(None, description=BODY_DESCRIPTION)

    _body = field_validator("body")(classmethod(lambda cls, v: check_body(v)))
    _key_field = field_validator("key_field")(classmethod(lambda cls, v: check_key_field(v)))

    @field_validator("stream", "channel")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_template(v)

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, str]) -> dict[str, str]:
        taken = _RESERVED_FIELDS & set(v)
        if taken:
            raise ValueError(f"{', '.join(sorted(taken))}: set by Patchbay itself; choose another field name")
        for value in v.values():
            check_template(value)
        return v

    @model_validator(mode="after")
    def _coherent(self) -> RedisSinkConfig:
        if self.mode == "stream":
            if self.stream is None:
                raise ValueError("mode stream needs `stream: KEY`")
            if self.channel is not None:
                raise ValueError("`channel` is for mode publish; stream mode writes to `stream`")
        else:
            if self.channel is None:
                raise ValueError("mode publish needs `channel: NAME`")
            if self.stream is not None or self.maxlen is not None or self.fields:
                raise ValueError("`stream`, `maxlen` and `fields` are for mode stream")
        return self


def _name_problem(value: str) -> str | None:
    return "is empty" if not value else None


def make_client(
    redis: Any,
    s: RedisSystem,
    resources: Resources,
    *,
    timeout_s: float,
    max_connections: int,
    retries: int,
    read_timeout_s: float | None = None,
) -> Any:
    """A client on a blocking pool of at most `max_connections`; `retries` immediate retries on a new
    connection after a connection error. `read_timeout_s` (default timeout_s) bounds each reply."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    extra: dict[str, Any] = {}
    if s.url.startswith("rediss://"):
        extra = {
            "ssl_cert_reqs": "required" if s.verify_tls else "none",
            "ssl_check_hostname": s.verify_tls,
            "ssl_ca_certs": s.ca_bundle,
            "connection_class": _guarded(
                redis.SSLConnection,
                resources,
                TlsSettings(verify=s.verify_tls, check_hostname=s.verify_tls, ca_bundle=s.ca_bundle),
            ),
        }
    elif s.url.startswith("redis://"):  # unix:// is a socket file, not a network address
        extra = {"connection_class": _guarded(redis.Connection, resources)}
    pool = redis.BlockingConnectionPool.from_url(
        s.url,
        max_connections=max_connections,
        timeout=timeout_s,
        password=resources.secret(s.password) if s.password is not None else None,
        client_name=s.client_name,
        socket_timeout=read_timeout_s or timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries),
        **extra,
    )
    return redis.Redis.from_pool(pool)


def _guarded(base: type[Any], resources: Resources, tls: TlsSettings | None = None) -> type[Any]:
    """A redis-py connection class that checks the address of every connection it opens.

    Each new connection resolves the host and checks it with the address guard (BlockedAddress, which
    redis-py wraps in its ConnectionError), then connects to a checked IP address rather than the
    name, so a name cannot re-resolve to an internal address between the check and the connect.
    redis-py has no setting for a TLS name other than the host it connects to, but it builds the
    arguments of asyncio.open_connection in `_connection_arguments` (as its own SSLConnection does
    to add `ssl`): this class connects to the IP and passes the configured host as server_hostname.
    With `tls`, each connection uses the system's shared context (tls_client) rather than one redis-py
    builds on the event loop.
    """

    class GuardedConnection(base):  # type: ignore[valid-type,misc]
        _checked_address: str | None = None

        async def _connect(self) -> None:
            if tls is not None:
                self.ssl_context.context = await tls_context(tls)  # what RedisSSLContext.get() returns
            addresses = await resources.allowed_addresses(self.host, self.port)

            async def attempt(address: str) -> None:
                self._checked_address = address
                await super(GuardedConnection, self)._connect()

            await connect_first(addresses, attempt)

        def _connection_arguments(self) -> Mapping[str, Any]:
            kwargs = dict(super()._connection_arguments())
            if self._checked_address is not None:
                if kwargs.get("ssl") is not None:
                    kwargs["server_hostname"] = self.host
                kwargs["host"] = self._checked_address
            return kwargs

    return GuardedConnection


@connector("redis", roles=("destination",), config=RedisSinkConfig, system_config=RedisSystem, extra="redis")
class RedisSink(BaseSink[RedisSystem, RedisSinkConfig]):
    """Append each record to a Redis stream, or publish it on a channel."""

    def __init__(
        self, system: RedisSystem, config: RedisSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        self.redis = import_driver("redis.asyncio", package="redis", extra="redis", kind="redis")
        super().__init__(system, config, policy, resources)
        target = config.stream if config.mode == "stream" else config.channel
        self._target = render_template(target or "")
        self._fields = {k: render_template(v) for k, v in config.fields.items()}
        self._body = BodyRenderer(config.body, config.key_field)
        self._client: Any = None  # created on the first send: its pool opens connections as needed
        self._closed = False

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        field = "stream" if self.config.mode == "stream" else "channel"
        req: dict[str, Any] = {field: render_name(self._target, record, field, _name_problem)}
        if self._fields:
            req["fields"] = {k: t.render(record) for k, t in self._fields.items()}
        req["body"] = self._body.json(record, key)
        return req

    # -- delivery half -----------------------------------------------------
    def _get_client(self) -> Any:
        if self._closed:
            raise ConnectionError("the destination is closed")
        if self._client is None:
            # One immediate retry on a fresh connection: a pooled one the server closed (restart,
            # CLIENT KILL, idle timeout) fails on first use. Anything longer is the delivery's retry.
            self._client = make_client(
                self.redis,
                self.system,
                self.resources,
                timeout_s=self.policy.timeout_s,
                max_connections=self.policy.max_concurrency,  # one per concurrent send; more wait their turn
                retries=1,
            )
        return self._client

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        sw = Stopwatch()
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                client = self._get_client()
                if "stream" in request:
                    fields = {
                        "data": request["body"],
                        "idempotency_key": key,
                        **(request.get("fields") or {}),
                    }
                    entry = await client.xadd(
                        request["stream"], fields, maxlen=self.config.maxlen, approximate=True
                    )
                    entry_id = entry.decode() if isinstance(entry, bytes) else str(entry)
                    excerpt = f"added to stream {request['stream']!r} as {entry_id}"
                else:
                    receivers = await client.publish(request["channel"], request["body"])
                    excerpt = f"published on {request['channel']!r} to {receivers} subscriber(s)"
        except TimeoutError:
            return timed_out(sw, self.policy.timeout_s)
        except Exception as exc:
            cls, error = classify_redis(
                exc,
                target=request.get("stream") or request.get("channel") or "",
                system=self.resources.system or None,
            )
            return failure(cls, sw, error, self.resources.redact)
        return Outcome(OutcomeClass.SUCCESS, None, sw.ms, excerpt=excerpt)

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def classify_redis(exc: BaseException, *, target: str, system: str | None = None) -> tuple[OutcomeClass, str]:
    """(class, message) for an exception of redis-py."""
    from redis import exceptions as rx

    blocked = blocked_cause(exc)
    if blocked is not None:  # refused before connecting, the same way on every try
        return OutcomeClass.TERMINAL, blocked.explain(system)
    text = str(exc).strip() or type(exc).__name__
    code = text.split(" ", 1)[0]
    if isinstance(
        exc, rx.AuthenticationError | rx.AuthenticationWrongNumberOfArgsError | rx.NoPermissionError
    ) or code in ("WRONGPASS", "NOAUTH", "NOPERM"):
        return OutcomeClass.AUTH, f"access refused: {text}"
    if isinstance(exc, rx.ResponseError):
        if code == "WRONGTYPE":
            return OutcomeClass.TERMINAL, f"key {target!r} holds another type of value, not a stream"
        if code in _BUSY:
            return OutcomeClass.TRANSIENT, f"server busy: {text}"
        return OutcomeClass.TERMINAL, f"the server refused the command: {text}"
    if isinstance(exc, rx.TimeoutError):
        return OutcomeClass.TRANSIENT, f"timed out: {text}"
    if isinstance(exc, rx.ConnectionError | ConnectionError | OSError):
        return OutcomeClass.TRANSIENT, f"connection failed: {text}"
    if isinstance(exc, rx.RedisError):
        return OutcomeClass.TRANSIENT, f"redis error: {describe(exc)}"
    return OutcomeClass.TRANSIENT, f"connector error: {describe(exc)}"


# ===================================================================== source
class RedisSourceConfig(Spec):
    stream: str = Field(min_length=1, description="The stream key to consume.", examples=["orders"])
    group: str = Field(
        min_length=1,
        description="Consumer group; created (with the stream, MKSTREAM) when missing. The group remembers "
        "what was delivered and what is still unacknowledged, so keep the name stable.",
    )
    consumer: str = Field(
        "patchbay",
        min_length=1,
        description="This hub's consumer name in the group. Its unacknowledged entries are read again on "
        "start, so keep it stable; hubs sharing a group need different names.",
    )
    start: Literal["all", "new"] = Field(
        "all",
        description="Where a new group starts: all = the stream's first entry, new = only entries added "
        "after it is created. An existing group keeps its position.",
    )
    data_field: str | None = Field(
        "data",
        description="Entry field holding the JSON body (what the redis destination writes). An entry without "
        "it becomes a record of all its fields, as strings.",
    )
    id_field: str | None = Field(
        "idempotency_key",
        description="Entry field that identifies the message (what the redis destination writes); entries "
        "without it are identified by stream key + entry id.",
    )
    batch_size: int = Field(100, ge=1, le=10_000, description=BATCH_SIZE_DESCRIPTION)
    block_ms: int = Field(
        2000,
        ge=1,
        le=300_000,
        description="How long one read waits for new entries (XREADGROUP BLOCK), in ms.",
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description=TIMEOUT_DESCRIPTION)


@connector("redis", roles=("source",), config=RedisSourceConfig, system_config=RedisSystem, extra="redis")
class RedisSource:
    """Consume a stream through a consumer group: XREADGROUP, commit, XACK; pending entries first on start."""

    mode = "stream"

    def __init__(self, system: RedisSystem, config: RedisSourceConfig, resources: Resources) -> None:
        self.redis = import_driver("redis.asyncio", package="redis", extra="redis", kind="redis")
        self.system = system
        self.config = config
        self.resources = resources
        self.what = f"consuming stream {config.stream!r} (group {config.group!r})"
        self._client: Any = None
        self.connections = 0  # clients created so far (each start makes one)
        self.subscriptions = 0  # consumer groups joined so far (each start joins one)
        self.settled = 0  # entries done with upstream so far: committed, then acknowledged

    async def stream(self, emit: Emit) -> None:
        """Consume until cancelled; raises on a failure (the engine restarts it: pending entries first)."""
        cfg = self.config
        await self._close_client()
        self._client = client = make_client(
            self.redis,
            self.system,
            self.resources,
            timeout_s=cfg.timeout_s,
            max_connections=1,
            # No retry: a XREADGROUP whose reply is lost has still delivered its entries to this consumer.
            # Failing lets the next start read them back from the pending list.
            retries=0,
            read_timeout_s=cfg.timeout_s + cfg.block_ms / 1000,
        )
        self.connections += 1
        try:
            await self._call("creating the group", self._create_group(client))
            self.subscriptions += 1
            # Entries delivered to this consumer but never acknowledged (a crash, a lost connection,
            # a failed commit): read from id 0 on, page by page, until the pending list is empty.
            after = "0"
            while True:
                entries = await self._read(client, after, block=None)
                if not entries:
                    break
                await self._process(client, entries, emit)
                after = entries[-1][0]
            while True:
                entries = await self._read(client, ">", block=cfg.block_ms)
                if entries:
                    await self._process(client, entries, emit)
        finally:
            await self._close_client()

    async def _create_group(self, client: Any) -> None:
        cfg = self.config
        try:
            await client.xgroup_create(
                cfg.stream, cfg.group, id="0" if cfg.start == "all" else "$", mkstream=True
            )
        except self.redis.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):  # BUSYGROUP: it exists already, which is fine
                raise

    async def _read(self, client: Any, after: str, *, block: int | None) -> list[tuple[str, Any]]:
        cfg = self.config
        reply = await self._call(
            "reading",
            client.xreadgroup(
                cfg.group, cfg.consumer, {cfg.stream: after}, count=cfg.batch_size, block=block
            ),
        )
        if not reply:
            return []
        [(_, entries)] = reply if isinstance(reply, list) else list(reply.items())
        return [(_str(entry_id), fields) for entry_id, fields in entries]

    async def _process(self, client: Any, entries: list[tuple[str, Any]], emit: Emit) -> None:
        cfg = self.config
        records = []
        for entry_id, fields in entries:
            if not fields:  # trimmed or deleted (XDEL) after it was delivered: nothing left to read
                log.warning(
                    "%s: entry %s was deleted before it was processed; acknowledging it",
                    self.what,
                    entry_id,
                    extra={"flow": self.resources.extra.get("flow", "")},
                )
                continue
            records.append(self._record(entry_id, fields))
        if records:
            await emit(Batch(records))  # raises: not acknowledged; the next start reads them again
            check_cancelled()
        # Committed: a failure from here on leaves them pending, and their ids drop the copies.
        await self._call("acknowledging", client.xack(cfg.stream, cfg.group, *(e for e, _ in entries)))
        self.settled += len(entries)

    def _record(self, entry_id: str, fields: dict[bytes, bytes]) -> SourceRecord:
        cfg = self.config
        values = {_str(k): v for k, v in fields.items()}
        body = values.get(cfg.data_field) if cfg.data_field is not None else None
        if body is not None:
            data, raw = decode_body(body if isinstance(body, bytes) else str(body).encode())
        else:
            data, raw = {k: _str(v) for k, v in values.items()}, None
        key = text(values.get(cfg.id_field)) if cfg.id_field is not None else None
        return SourceRecord(data, id=key or f"{cfg.stream}:{entry_id}", raw=raw)

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        try:
            result = await op
        except Exception as exc:
            cls, message = classify_redis(
                exc, target=self.config.stream, system=self.resources.system or None
            )
            error = self.resources.redact(f"{self.what}: {what}: {message}")
            if cls is OutcomeClass.AUTH:
                raise AuthError(error) from exc
            if cls is OutcomeClass.TERMINAL:
                raise TerminalError(error) from exc
            raise TransientError(error) from exc
        check_cancelled()  # redis-py writes through asyncio.wait_for, which may swallow a cancellation
        return result

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.aclose(), 5.0)
            except Exception as exc:
                log.debug("closing redis source client: %s", describe(exc))

    async def close(self) -> None:
        await self._close_client()


def _str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
