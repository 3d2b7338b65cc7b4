"""rabbitmq: publish each record to a RabbitMQ exchange (confirmed), or consume a queue as a flow's source.

Each message carries the idempotency key as its AMQP `message_id` and in the header named by
`delivery.idempotency_header` (Idempotency-Key), so consumers can drop the copies at-least-once
delivery brings: a publish whose confirm was lost with the connection is published again.

What the broker's answers mean:
  ack (publisher confirm)                    delivered
  returned as unroutable (mandatory: true)   terminal: no queue is bound for the routing key; the message
                                             is dead-lettered rather than lost silently: bind a queue,
                                             then `patchbay replay`
  nack                                       transient: e.g. a full queue (x-overflow: reject-publish)
  no such exchange; message too large        terminal
  login, vhost or exchange access refused    auth: the destination pauses until resumed
  connection refused or lost, timeout        transient; the next send opens a new connection

As a source (mode stream), the flow consumes one queue with manual acknowledgements:
  - deliveries are gathered into a batch (up to batch_size, or max_wait_ms after the first), the batch
    is committed as events, and only then acknowledged: one basic.ack with multiple=True up to its
    last delivery tag. A crash before the ack leaves the messages unacknowledged: the broker hands
    them out again and their ids drop the copies that were already committed.
  - a failed commit nacks the batch with requeue and stops the source; the engine reconnects with
    backoff and the messages come again. A lost connection stops it the same way.
  - a record's id is the `id_header` header (Idempotency-Key, what the rabbitmq destination sets),
    else the AMQP message_id, else the SHA-256 of the body. Redelivery keeps all three, so a message
    maps to the same id every time; with the last one, identical bodies are one event. The header
    comes first because some client libraries (aio-pika/aiormq) give every publish a random
    message_id, so a producer's retry would otherwise look like a new message.
  - the body becomes the record when it is JSON, else the record is {"body": "<text>"}.
  - prefetch bounds what is in flight; batch_size may not exceed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from typing import Any

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
    MAX_WAIT_DESCRIPTION,
    TIMEOUT_DESCRIPTION,
    BodyRenderer,
    Inbox,
    Lazy,
    check_body,
    check_cancelled,
    check_template,
    content_id,
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

log = logging.getLogger("patchbay.connectors.rabbitmq")


class RabbitMQSystem(Spec):
    host: str = Field(description="Broker host name or address.", examples=["rabbitmq.internal"])
    port: int | None = Field(None, ge=1, le=65535, description="AMQP port; default 5672, or 5671 with tls.")
    vhost: str = Field("/", description="Virtual host.")
    username: str = Field("guest", description="User name.")
    password: SecretRef | None = Field(
        None,
        description="The user's password, e.g. {secret: rabbitmq_password}. Omitted: `guest`, RabbitMQ's "
        "default, which the broker accepts only from localhost.",
    )
    tls: bool = Field(False, description="Connect with TLS (amqps).")
    verify_tls: bool = Field(True, description="Verify the broker's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None,
        description="Path to a PEM file of the CAs to trust for this broker instead of the system's "
        "(e.g. a private CA).",
    )


class RabbitMQSinkConfig(Spec):
    exchange: str = Field(
        "",
        max_length=255,
        description="Exchange to publish to; empty = the default exchange, where the routing key names "
        "a queue.",
    )
    routing_key: str = Field(
        description="Routing key; may hold {{ expressions }}, e.g. `orders.{{ region }}`.",
        examples=["orders.created", "leads.{{ lower(properties.country) }}"],
    )
    persistent: bool = Field(
        True, description="Mark messages persistent, so durable queues keep them over a restart."
    )
    mandatory: bool = Field(
        True,
        description="Have the broker return a message no queue receives; it is then dead-lettered (terminal) "
        "instead of being dropped without a trace.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Message headers; values may hold {{ expr }}."
    )
    body: str | dict[str, Any] | None = Field(None, description=BODY_DESCRIPTION)

    _routing_key = field_validator("routing_key")(classmethod(lambda cls, v: check_template(v)))
    _body = field_validator("body")(classmethod(lambda cls, v: check_body(v)))

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for value in v.values():
            check_template(value)
        return v


def _routing_key_problem(value: str) -> str | None:
    return "is longer than 255 bytes" if len(value.encode()) > 255 else None


@functools.cache
def _connection_class(aio_pika: Any) -> type[Any]:
    """aio-pika's Connection, also handing `server_hostname` on to asyncio.open_connection.

    aio-pika passes only the keyword arguments its Connection.PARAMETERS names on to aiormq, which
    passes them to asyncio.open_connection (RobustConnection extends PARAMETERS the same way). With
    server_hostname among them, a TLS connection made to the checked IP address still sends the
    configured host name as SNI and verifies the certificate against it.
    """
    from aio_pika.abc import ConnectionParameter

    class NamedConnection(aio_pika.Connection):  # type: ignore[misc,name-defined]
        PARAMETERS = aio_pika.Connection.PARAMETERS + (
            ConnectionParameter(name="server_hostname", parser=str, is_kwarg=True),
        )

    return NamedConnection


async def connect(
    aio_pika: Any, s: RabbitMQSystem, resources: Resources, timeout_s: float, name: str = "patchbay"
) -> Any:
    """Open a (non-robust) connection: a loss surfaces as an error and the caller decides what follows.

    The host is resolved and checked by the address guard first (BlockedAddress); the connection goes
    to a checked IP address, never to the name again, with the name kept for TLS.
    """
    port = s.port or (5671 if s.tls else 5672)
    password = resources.secret(s.password) if s.password is not None else "guest"
    addresses = await resources.allowed_addresses(s.host, port)

    async def attempt(address: str) -> Any:
        return await aio_pika.connect(
            host=address,
            port=port,
            login=s.username,
            password=password,
            virtualhost=s.vhost,
            ssl=s.tls,
            ssl_context=await ssl_context(s.tls, s.verify_tls, s.ca_bundle),
            timeout=timeout_s,
            client_properties={"connection_name": name},
            connection_class=_connection_class(aio_pika),
            server_hostname=s.host.strip("[]") if s.tls else None,
        )

    return await connect_first(addresses, attempt, next_on=_address_failed)


def _address_failed(exc: BaseException) -> bool:
    """The TCP connect itself failed (aiormq re-raises the OSError as AMQPConnectionError)."""
    return isinstance(exc, OSError) or isinstance(exc.__cause__, OSError)


class _Amqp:
    """A connection and its one confirm-mode channel."""

    def __init__(self, connection: Any, channel: Any) -> None:
        self.connection = connection
        self.channel = channel
        self._exchanges: dict[str, Any] = {}

    @property
    def is_open(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed

    async def exchange(self, name: str) -> Any:
        if not name:
            return self.channel.default_exchange
        found = self._exchanges.get(name)
        if found is None:
            found = self._exchanges[name] = await self.channel.get_exchange(name, ensure=False)
        return found

    async def close(self) -> None:
        await self.connection.close()


@connector(
    "rabbitmq", roles=("destination",), config=RabbitMQSinkConfig, system_config=RabbitMQSystem, extra="amqp"
)
class RabbitMQSink(BaseSink[RabbitMQSystem, RabbitMQSinkConfig]):
    """Publish each record to a RabbitMQ exchange with publisher confirms."""

    def __init__(
        self,
        system: RabbitMQSystem,
        config: RabbitMQSinkConfig,
        policy: DeliveryPolicy,
        resources: Resources,
    ) -> None:
        self.aio_pika = import_driver("aio_pika", package="aio-pika", extra="amqp", kind="rabbitmq")
        super().__init__(system, config, policy, resources)
        self._routing_key = render_template(config.routing_key)
        self._headers = {k: render_template(v) for k, v in config.headers.items()}
        self._body = BodyRenderer(config.body)
        self._conn: Lazy[_Amqp] = Lazy(
            self._open,
            lambda c: c.is_open,
            lambda c: c.close(),
            open_timeout_s=policy.timeout_s,
            what=f"rabbitmq {system.host}",
        )

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        req: dict[str, Any] = {
            "exchange": self.config.exchange,
            "routing_key": render_name(self._routing_key, record, "routing_key", _routing_key_problem),
        }
        if self._headers:
            req["headers"] = {k: t.render(record) for k, t in self._headers.items()}
        req["body"] = self._body.json(record, key)
        return req

    # -- delivery half -----------------------------------------------------
    async def _open(self) -> _Amqp:
        connection = await connect(self.aio_pika, self.system, self.resources, self.policy.timeout_s)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        return _Amqp(connection, channel)

    def _message(self, request: Mapping[str, Any], key: str) -> Any:
        mode = self.aio_pika.DeliveryMode
        return self.aio_pika.Message(
            body=request["body"].encode(),
            content_type="application/json",
            delivery_mode=mode.PERSISTENT if self.config.persistent else mode.NOT_PERSISTENT,
            message_id=key,
            headers={**(request.get("headers") or {}), self.policy.idempotency_header: key},
            app_id="patchbay",
        )

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        sw = Stopwatch()
        amqp: _Amqp | None = None
        exchange_name = request.get("exchange", self.config.exchange)
        routing_key = request["routing_key"]
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                amqp = await self._conn.get()
                exchange = await amqp.exchange(exchange_name)
                await exchange.publish(
                    self._message(request, key), routing_key=routing_key, mandatory=self.config.mandatory
                )
        except TimeoutError:
            self._conn.discard(amqp)
            return timed_out(sw, self.policy.timeout_s)
        except BlockedAddress as exc:  # refused before connecting, the same way on every try
            return failure(
                OutcomeClass.TERMINAL, sw, exc.explain(self.resources.system or None), self.resources.redact
            )
        except Exception as exc:
            cls, error, keep = classify_amqp(
                exc,
                connected=amqp is not None,
                vhost=self.system.vhost,
                exchange=exchange_name,
                routing_key=routing_key,
            )
            if not keep:
                self._conn.discard(amqp)
            return failure(cls, sw, error, self.resources.redact)
        where = f"exchange {exchange_name!r}" if exchange_name else "the default exchange"
        return Outcome(
            OutcomeClass.SUCCESS, None, sw.ms, excerpt=f"confirmed by the broker ({where}, {routing_key!r})"
        )

    async def close(self) -> None:
        await self._conn.aclose()


def classify_amqp(
    exc: BaseException, *, connected: bool, vhost: str, exchange: str, routing_key: str
) -> tuple[OutcomeClass, str, bool]:
    """(class, message, keep the connection) for an exception of aio-pika/aiormq."""
    from aiormq import exceptions as ex

    if isinstance(exc, ex.PublishError):  # Basic.Return: mandatory and no queue matched
        reply = getattr(exc.frame, "reply_text", "NO_ROUTE")
        where = f"exchange {exchange!r}" if exchange else "the default exchange"
        return (
            OutcomeClass.TERMINAL,
            f"unroutable ({reply}): no queue is bound to {where} for routing key {routing_key!r}; "
            "bind a queue (or fix routing_key), then replay",
            True,
        )
    if isinstance(exc, ex.DeliveryError):  # Basic.Nack
        return OutcomeClass.TRANSIENT, "the broker refused the message (nack): a queue may be full", True
    if isinstance(exc, ex.ChannelAccessRefused):
        return OutcomeClass.AUTH, f"access refused: {exc.args[0] if exc.args else exc}", False
    if isinstance(exc, ex.ChannelNotFoundEntity):
        return (
            OutcomeClass.TERMINAL,
            f"{exc.args[0] if exc.args else exc}; declare the exchange or fix `exchange`",
            False,
        )
    if isinstance(exc, ex.ChannelPreconditionFailed):  # e.g. the message is larger than max_message_size
        return (
            OutcomeClass.TERMINAL,
            f"the broker refused the message: {exc.args[0] if exc.args else exc}",
            False,
        )
    if isinstance(exc, ex.ProbableAuthenticationError | ex.AuthenticationError):
        return OutcomeClass.AUTH, "login refused: check username and password", False
    if isinstance(exc, ex.ConnectionNotAllowed):
        return OutcomeClass.AUTH, f"not allowed: {exc.args[0] if exc.args else exc}", False
    if not connected and isinstance(exc, ex.InvalidFrameError) and "Connection.Close" in str(exc):
        # The broker closed the connection while opening the virtual host: missing or not permitted.
        return (
            OutcomeClass.AUTH,
            f"cannot open virtual host {vhost!r}: it does not exist or the user may not use it",
            False,
        )
    if (
        not connected
        and isinstance(exc, ex.AMQPConnectionError)
        and exc.args
        and isinstance(exc.args[0], int)
    ):
        return OutcomeClass.TRANSIENT, f"cannot connect: {exc.args[-1]}", False
    if isinstance(exc, ex.AMQPError | ConnectionError | OSError | RuntimeError):
        what = "cannot connect" if not connected else "connection lost"
        return OutcomeClass.TRANSIENT, f"{what}: {describe(exc)}", False
    return OutcomeClass.TRANSIENT, f"connector error: {describe(exc)}", False


# ===================================================================== source
class RabbitMQBinding(Spec):
    exchange: str = Field(
        min_length=1, max_length=255, description="Exchange to bind the queue to; it must exist."
    )
    routing_key: str = Field(
        "",
        max_length=255,
        description="Binding key; a topic exchange accepts * (one word) and # (any words), e.g. `orders.#`.",
    )


class RabbitMQSourceConfig(Spec):
    queue: str = Field(
        min_length=1, max_length=255, description="Queue to consume.", examples=["warehouse.orders"]
    )
    declare: bool = Field(
        False,
        description="Declare the queue as durable when it does not exist. Off: the queue must already exist.",
    )
    bind: RabbitMQBinding | None = Field(
        None, description="Bind the queue to an exchange when the source starts (binding twice is harmless)."
    )
    prefetch: int = Field(
        100,
        ge=1,
        le=65535,
        description="Most messages the broker hands over before they are acknowledged (basic.qos); "
        "what the hub holds in memory for this flow.",
    )
    batch_size: int = Field(100, ge=1, le=65535, description=BATCH_SIZE_DESCRIPTION)
    max_wait_ms: int = Field(50, ge=0, le=60_000, description=MAX_WAIT_DESCRIPTION)
    id_header: str = Field(
        "Idempotency-Key",
        min_length=1,
        description="Header whose value identifies a message (what the rabbitmq destination sets). Without "
        "it the AMQP message_id does; a message with neither is identified by the SHA-256 of its body, so "
        "identical bodies then count as one event.",
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description=TIMEOUT_DESCRIPTION)

    @model_validator(mode="after")
    def _batch_fits_prefetch(self) -> RabbitMQSourceConfig:
        if self.batch_size > self.prefetch:
            raise ValueError(
                f"batch_size ({self.batch_size}) is larger than prefetch ({self.prefetch}): the broker stops "
                "handing out messages at prefetch unacknowledged ones; raise prefetch or lower batch_size"
            )
        return self


@connector(
    "rabbitmq", roles=("source",), config=RabbitMQSourceConfig, system_config=RabbitMQSystem, extra="amqp"
)
class RabbitMQSource:
    """Consume a queue: batches committed, then acknowledged; nacked back to the queue if the commit fails."""

    mode = "stream"

    def __init__(self, system: RabbitMQSystem, config: RabbitMQSourceConfig, resources: Resources) -> None:
        self.aio_pika = import_driver("aio_pika", package="aio-pika", extra="amqp", kind="rabbitmq")
        self.system = system
        self.config = config
        self.resources = resources
        flow = resources.extra.get("flow")
        self.connection_name = f"patchbay source {flow}" if flow else "patchbay source"
        self._connection: Any = None
        self.connections = 0  # opened so far (reconnects show here)
        self.subscriptions = 0  # subscriptions made so far
        self.settled = 0  # messages done with upstream so far: committed, then acknowledged

    async def stream(self, emit: Emit) -> None:
        """Consume until cancelled; raises when the connection is lost (the engine reconnects)."""
        cfg = self.config
        inbox: Inbox[Any] = Inbox()
        await self._subscribe(inbox)
        acked_through = 0  # delivery tags on a channel count up from 1: all up to here are settled
        try:
            while True:
                messages = await inbox.take(cfg.batch_size, cfg.max_wait_ms / 1000)
                check_cancelled()
                records = [self._record(m) for m in messages]
                try:
                    await emit(Batch(records))
                    check_cancelled()  # committed: the broker redelivers, the ids drop the copies
                except Exception:
                    # Not committed: back to the queue now, so no redelivery waits for a reconnect.
                    with contextlib.suppress(Exception):
                        await _settle(messages, acked_through, ack=False)
                    raise
                try:
                    acked_through = await _settle(messages, acked_through, ack=True)
                    self.settled += len(messages)
                except Exception as exc:
                    # Committed but not acknowledged: the broker redelivers, and the ids drop the copies.
                    raise self._error(exc, "acknowledging") from exc
                check_cancelled()
        finally:
            await self._disconnect()  # what was not acknowledged goes back to the queue

    async def _subscribe(self, inbox: Inbox[Any]) -> None:
        cfg, what = self.config, "connecting"
        try:
            async with asyncio.timeout(cfg.timeout_s):
                await self._disconnect()
                conn = self._connection = await connect(
                    self.aio_pika, self.system, self.resources, cfg.timeout_s, self.connection_name
                )
                self.connections += 1
                conn.close_callbacks.add(lambda _, exc=None: inbox.fail(self._lost(exc)))
                channel = await conn.channel()
                channel.close_callbacks.add(lambda _, exc=None: inbox.fail(self._lost(exc)))
                await channel.set_qos(prefetch_count=cfg.prefetch)
                what = "declaring" if cfg.declare else "opening"
                if cfg.declare:
                    queue = await channel.declare_queue(cfg.queue, durable=True)
                else:
                    queue = await channel.get_queue(cfg.queue, ensure=True)
                if cfg.bind is not None:
                    what = f"binding to exchange {cfg.bind.exchange!r}"
                    await queue.bind(cfg.bind.exchange, cfg.bind.routing_key)
                what = "subscribing to"

                async def deliver(message: Any) -> None:
                    inbox.put(message)

                await queue.consume(deliver, no_ack=False)
                self.subscriptions += 1
        except BaseException as exc:
            await self._disconnect()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, TimeoutError):
                raise TransientError(
                    f"consuming queue {cfg.queue!r}: {what}: timed out after {cfg.timeout_s:g}s"
                ) from exc
            raise self._error(exc, what) from exc

    def _lost(self, exc: BaseException | None) -> TransientError:
        detail = f": {describe(exc)}" if exc is not None else ""
        return TransientError(
            self.resources.redact(f"consuming queue {self.config.queue!r}: connection lost{detail}")
        )

    def _error(self, exc: BaseException, what: str) -> Exception:
        """The exception to raise for a failed step, worded for the log that consume() writes."""
        from aiormq import exceptions as ex

        cfg = self.config
        if isinstance(exc, BlockedAddress):
            message = exc.explain(self.resources.system or None)
            cls = OutcomeClass.TERMINAL
        elif isinstance(exc, ex.ChannelNotFoundEntity) and what == "opening":
            message = f"queue {cfg.queue!r} does not exist: create it, or set declare: true"
            cls = OutcomeClass.TERMINAL
        elif isinstance(exc, ex.ChannelPreconditionFailed) and what == "declaring":
            message = (
                f"queue {cfg.queue!r} exists with other settings than a durable queue: "
                f"{exc.args[0] if exc.args else exc}; turn off declare"
            )
            cls = OutcomeClass.TERMINAL
        else:
            cls, message, _ = classify_amqp(
                exc,
                connected=self._connection is not None and what != "connecting",
                vhost=self.system.vhost,
                exchange=cfg.bind.exchange if cfg.bind else "",
                routing_key=cfg.bind.routing_key if cfg.bind else "",
            )
            if isinstance(exc, ex.ChannelNotFoundEntity):
                message = f"{exc.args[0] if exc.args else exc}"
        text = self.resources.redact(f"consuming queue {cfg.queue!r}: {what}: {message}")
        if cls is OutcomeClass.AUTH:
            return AuthError(text)
        if cls in (OutcomeClass.TERMINAL, OutcomeClass.GONE):
            return TerminalError(text)
        return TransientError(text)

    def _record(self, message: Any) -> SourceRecord:
        data, raw = decode_body(message.body)
        rid = (
            text((message.headers or {}).get(self.config.id_header))
            or text(message.message_id)
            or content_id(message.body)
        )
        return SourceRecord(data, id=rid, raw=raw)

    async def _disconnect(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 5.0)
            except Exception as exc:  # a dead connection often fails to close politely; it is gone either way
                log.debug("closing rabbitmq source connection: %s", describe(exc))

    async def close(self) -> None:
        await self._disconnect()


async def _settle(messages: list[Any], acked_through: int, *, ack: bool) -> int:
    """Ack (or nack with requeue) a batch; returns the new high-water mark of settled delivery tags.

    One frame with multiple=True covers the batch when its tags follow the last settled one without a
    gap (the usual case); otherwise each message is settled on its own, so a multiple ack never covers
    a delivery that is not in the batch.
    """
    tags = sorted(m.delivery_tag for m in messages)
    last = max(messages, key=lambda m: m.delivery_tag)
    if tags == list(range(acked_through + 1, acked_through + 1 + len(tags))):
        await (last.ack(multiple=True) if ack else last.nack(multiple=True, requeue=True))
        return int(last.delivery_tag)
    for m in messages:
        await (m.ack() if ack else m.nack(requeue=True))
    return acked_through
