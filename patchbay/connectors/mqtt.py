"""mqtt: publish each record to an MQTT topic (delivered at its PUBACK), or subscribe as a flow's source.

With MQTT 5 each message carries the idempotency key as the user property named by
`delivery.idempotency_header` (Idempotency-Key); MQTT 3.1.1 has no properties, so set `key_field`
to put the key into the JSON payload as well. Subscribers drop the copies at-least-once delivery
brings: a publish whose PUBACK was lost with the connection is published again. QoS 0 is at most
once: it counts as delivered when written to the socket.

What the broker's answers mean:
  PUBACK / PUBCOMP (QoS 1 / 2), written (QoS 0)     delivered
  CONNACK or PUBACK "not authorized", bad login     auth: the destination pauses until resumed
  PUBACK "topic name invalid", "payload format"     terminal
  PUBACK "quota exceeded", other errors             transient
  connection refused or lost, timeout               transient; the next send opens a new connection

As a source (mode stream), the flow subscribes to a topic filter at QoS 1 with a persistent session
(MQTT 3.1.1: clean_session false; MQTT 5: clean_start false and a session expiry) under the fixed
`client_id` of the source, so messages published while the hub is down wait in the broker and come
after a restart. paho's manual acknowledgements hold back each PUBACK until the batch holding the
message is committed; a crash before that leaves it unacknowledged and the broker sends it again on
the next connection. MQTT has no message id that survives redelivery, so a record's id is the
payload's `key_field`, else the MQTT 5 user property `id_property` (Idempotency-Key, what the mqtt
destination sends), else the SHA-256 of topic + payload: identical payloads on one topic are then one
event. QoS 2 is not offered (its PUBREC precedes the commit and paho keeps that state only in memory).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import Field, field_validator

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
    check_key_field,
    content_id,
    decode_body,
    describe,
    failure,
    render_name,
    ssl_context,
    text,
    timed_out,
)
from patchbay.errors import AuthError, ConfigError, TerminalError, TransientError
from patchbay.expressions import render_template
from patchbay.records import dig
from patchbay.registry import connector
from patchbay.security.ssrf import BlockedAddress

log = logging.getLogger("patchbay.connectors.mqtt")

# MQTT 5 reason codes (CONNACK and PUBACK) by meaning.
_AUTH_CODES = {134, 135, 138, 140}  # bad user name or password, not authorized, banned, bad auth method
_TERMINAL_CODES = {144, 149, 153}  # topic name invalid, packet too large, payload format invalid
_V3_AUTH = {4, 5}  # MQTT 3.1.1 CONNACK: bad user name or password, not authorised


class MqttSystem(Spec):
    host: str = Field(description="Broker host name or address.", examples=["mqtt.internal"])
    port: int | None = Field(None, ge=1, le=65535, description="Port; default 1883, or 8883 with tls.")
    username: str | None = Field(None, description="User name.")
    password: SecretRef | None = Field(None, description="The user's password, e.g. {secret: mqtt_password}.")
    tls: bool = Field(False, description="Connect with TLS.")
    verify_tls: bool = Field(True, description="Verify the broker's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None,
        description="Path to a PEM file of the CAs to trust for this broker instead of the system's "
        "(e.g. a private CA).",
    )
    client_id: str | None = Field(
        None,
        max_length=128,
        description="Client identifier; default patchbay-<random>. Each destination holds its own "
        "connection and a broker drops the older of two connections with one id, so give a fixed id "
        "only to a system that one destination uses.",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT version: 5 (user properties carry the idempotency key) or 3.1.1."
    )
    keepalive_s: int = Field(60, ge=5, le=65535, description="Seconds between keep-alive pings.")


def _topic_problem(value: str) -> str | None:
    if not value:
        return "is empty"
    if "+" in value or "#" in value:
        return "contains a wildcard (+ or #); publish to a concrete topic"
    if "\x00" in value:
        return "contains a NUL character"
    if len(value.encode()) > 65535:
        return "is longer than 65535 bytes"
    return None


class MqttSinkConfig(Spec):
    topic: str = Field(
        description="Topic to publish to; may hold {{ expressions }}, e.g. `factory/{{ site }}/orders`.",
        examples=["orders/created", "devices/{{ device_id }}/commands"],
    )
    qos: Literal[0, 1, 2] = Field(
        1,
        description="0: at most once (no acknowledgement); 1: at least once (wait for PUBACK); "
        "2: exactly once (wait for PUBCOMP).",
    )
    retain: bool = Field(False, description="Ask the broker to keep the last message for future subscribers.")
    key_field: str | None = Field(
        None,
        description="Also write the idempotency key into the JSON payload at this dotted path "
        "(needed with MQTT 3.1.1, which has no user properties).",
    )
    body: str | dict[str, Any] | None = Field(None, description=BODY_DESCRIPTION)

    _body = field_validator("body")(classmethod(lambda cls, v: check_body(v)))
    _key_field = field_validator("key_field")(classmethod(lambda cls, v: check_key_field(v)))

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        template = render_template(v)
        problem = _topic_problem(v) if template.is_static else None
        if problem:
            raise ValueError(f"topic {v!r} {problem}")
        return v


class _Refused(Exception):
    """The broker answered with a failure reason code (CONNACK or PUBACK)."""

    def __init__(self, what: str, code: int, reason: str) -> None:
        self.what, self.code, self.reason = what, code, reason
        super().__init__(f"{what}: {reason} (reason code {code})")


class _Conn:
    """One paho client and its network thread, bridged to the event loop.

    paho calls back from its own thread; every callback is handed to the loop with
    call_soon_threadsafe, so the futures below are only touched on the loop's thread.
    """

    def __init__(self, client: Any, loop: asyncio.AbstractEventLoop, v5: bool, error_string: Any) -> None:
        self.client = client
        self.error_string = error_string
        self.loop = loop
        self.v5 = v5
        self.connected: asyncio.Future[None] = loop.create_future()
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.lost: str | None = None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish

    @property
    def is_open(self) -> bool:
        return self.lost is None and self.connected.done() and bool(self.client.is_connected())

    # paho's thread -------------------------------------------------------
    def _post(self, fn: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        self._post(self._connack, int(reason_code.value), str(reason_code))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        self._post(self._lose, str(reason_code))

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any = None
    ) -> None:
        self._post(self._acked, mid, int(reason_code.value), str(reason_code))

    # the loop's thread ---------------------------------------------------
    def _connack(self, code: int, reason: str) -> None:
        if self.connected.done():
            return
        if code == 0:
            self.connected.set_result(None)
        else:
            self.connected.set_exception(_Refused("connection refused", code, reason))

    def _lose(self, reason: str) -> None:
        self.lost = reason or "connection lost"
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"connection closed before CONNACK: {self.lost}"))
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection lost: {self.lost}"))

    def _acked(self, mid: int, code: int, reason: str) -> None:
        fut = self.pending.pop(mid, None)
        if fut is None or fut.done():
            return
        if code >= 128:
            fut.set_exception(_Refused("the broker refused the message", code, reason))
        else:
            fut.set_result(None)

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Any
    ) -> asyncio.Future[None]:
        if self.lost is not None:
            raise ConnectionError(f"connection lost: {self.lost}")
        info = self.client.publish(topic, payload, qos, retain, properties)
        if info.rc != 0:
            raise ConnectionError(f"cannot publish: {self.error_string(info.rc)}")
        fut: asyncio.Future[None] = self.loop.create_future()
        # paho's callback for this mid is queued with call_soon_threadsafe, so it runs after this line.
        self.pending[info.mid] = fut
        return fut

    def shutdown(self) -> None:
        """Blocking: disconnect and join the network thread (run it in a worker thread)."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            sock = self.client.socket()
            if sock is not None:
                sock.close()


ConnT = TypeVar("ConnT", bound=_Conn)


async def open_client(
    paho: Any,
    s: MqttSystem,
    resources: Resources,
    make_conn: Callable[[Any, asyncio.AbstractEventLoop, bool, Any], ConnT],
    *,
    timeout_s: float,
    client_id: str,
    cleanups: set[asyncio.Future[None]],
    max_inflight: int = 20,
    persistent: bool = False,
    session_expiry_s: int = 0,
    receive_maximum: int | None = None,
    manual_ack: bool = False,
) -> ConnT:
    """Connect a paho client and start its network thread; wait for a successful CONNACK.

    persistent: keep the broker-side session (clean_session false / clean_start false with a session
    expiry), so subscriptions and unacknowledged messages outlive the connection.

    The host is resolved and checked by the address guard first (BlockedAddress), and paho connects to
    a checked IP address. paho has no setting for a TLS name other than the host it connects to (it
    passes that as server_hostname), so the TLS context is a ServerNameContext that checks the
    certificate against the configured host name instead of the IP.
    """
    port = s.port or (8883 if s.tls else 1883)
    addresses = await resources.allowed_addresses(s.host, port)
    v5 = s.protocol == "5"
    client = paho.Client(
        callback_api_version=paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else not persistent,
        reconnect_on_failure=False,  # a lost connection is replaced by the caller, not behind its back
        manual_ack=manual_ack,
    )
    client.enable_logger(log)
    client.connect_timeout = timeout_s
    client.max_inflight_messages_set(max_inflight)
    if s.username is not None:
        client.username_pw_set(s.username, resources.secret(s.password) if s.password is not None else None)
    ctx = await ssl_context(s.tls, s.verify_tls, s.ca_bundle, server_name=s.host)
    if ctx is not None:
        client.tls_set_context(ctx)
    conn = make_conn(client, asyncio.get_running_loop(), v5, paho.error_string)
    properties = None
    if v5 and (persistent or receive_maximum is not None):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            properties.SessionExpiryInterval = session_expiry_s
        if receive_maximum is not None:
            properties.ReceiveMaximum = receive_maximum

    def connect() -> None:  # blocking: TCP (and TLS) connect, send CONNECT, start the network thread
        for i, address in enumerate(addresses):  # the checked addresses in turn, until one answers
            try:
                if v5:
                    client.connect(
                        address, port, s.keepalive_s, clean_start=not persistent, properties=properties
                    )
                else:
                    client.connect(address, port, s.keepalive_s)
                break
            except OSError:
                if i == len(addresses) - 1:
                    raise
        client.loop_start()

    connecting = asyncio.ensure_future(asyncio.to_thread(connect))
    try:
        await asyncio.shield(connecting)
        await conn.connected
    except BaseException:
        # Shut down only after the connect thread is done with the client, even when cancelled.
        task = asyncio.ensure_future(_cleanup(connecting, conn))
        cleanups.add(task)
        task.add_done_callback(cleanups.discard)
        raise
    return conn


async def _cleanup(connecting: asyncio.Future[None], conn: _Conn) -> None:
    await asyncio.gather(connecting, return_exceptions=True)
    await asyncio.to_thread(conn.shutdown)


@connector("mqtt", roles=("destination",), config=MqttSinkConfig, system_config=MqttSystem, extra="mqtt")
class MqttSink(BaseSink[MqttSystem, MqttSinkConfig]):
    """Publish each record to an MQTT topic."""

    def __init__(
        self, system: MqttSystem, config: MqttSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        self.paho = import_driver("paho.mqtt.client", package="paho-mqtt", extra="mqtt", kind="mqtt")
        super().__init__(system, config, policy, resources)
        self._topic = render_template(config.topic)
        self._body = BodyRenderer(config.body, config.key_field)
        self._cleanups: set[asyncio.Future[None]] = set()
        self._conn: Lazy[_Conn] = Lazy(
            self._open,
            lambda c: c.is_open,
            lambda c: asyncio.to_thread(c.shutdown),
            open_timeout_s=policy.timeout_s,
            what=f"mqtt {system.host}",
        )

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        return {
            "topic": render_name(self._topic, record, "topic", _topic_problem),
            "body": self._body.json(record, key),
        }

    # -- delivery half -----------------------------------------------------
    async def _open(self) -> _Conn:
        return await open_client(
            self.paho,
            self.system,
            self.resources,
            _Conn,
            timeout_s=self.policy.timeout_s,
            client_id=self.system.client_id or f"patchbay-{secrets.token_hex(6)}",
            cleanups=self._cleanups,
            max_inflight=max(20, self.policy.max_concurrency),
        )

    def _properties(self, key: str) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = "application/json"
        props.PayloadFormatIndicator = 1  # UTF-8 text
        props.UserProperty = (self.policy.idempotency_header, key)
        return props

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        sw = Stopwatch()
        conn: _Conn | None = None
        topic = request["topic"]
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                conn = await self._conn.get()
                props = self._properties(key) if conn.v5 else None
                await conn.publish(
                    topic, request["body"].encode(), self.config.qos, self.config.retain, props
                )
        except TimeoutError:
            self._conn.discard(conn)
            return timed_out(sw, self.policy.timeout_s)
        except BlockedAddress as exc:  # refused before connecting, the same way on every try
            return failure(
                OutcomeClass.TERMINAL, sw, exc.explain(self.resources.system or None), self.resources.redact
            )
        except Exception as exc:
            cls, error, keep = classify_mqtt(exc, connected=conn is not None, v5=self.system.protocol == "5")
            if not keep:
                self._conn.discard(conn)
            return failure(cls, sw, error, self.resources.redact)
        acked = {0: "written (QoS 0)", 1: "acknowledged (PUBACK)", 2: "acknowledged (PUBCOMP)"}[
            self.config.qos
        ]
        return Outcome(OutcomeClass.SUCCESS, None, sw.ms, excerpt=f"{acked} on {topic!r}")

    async def close(self) -> None:
        await self._conn.aclose()
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)


def classify_mqtt(exc: BaseException, *, connected: bool, v5: bool) -> tuple[OutcomeClass, str, bool]:
    """(class, message, keep the connection) for a failed connect or publish."""
    if isinstance(exc, _Refused):
        at_connect = exc.what == "connection refused"
        auth = exc.code in _AUTH_CODES or (at_connect and not v5 and exc.code in _V3_AUTH)
        if auth:
            return OutcomeClass.AUTH, f"{exc.what}: {exc.reason}", not at_connect
        if exc.code in _TERMINAL_CODES:
            return OutcomeClass.TERMINAL, str(exc), not at_connect
        return OutcomeClass.TRANSIENT, str(exc), not at_connect
    if isinstance(exc, ConnectionError | OSError):
        text = str(exc) or type(exc).__name__
        if not connected and not text.startswith(("connection", "cannot")):
            text = f"cannot connect: {describe(exc)}"
        return OutcomeClass.TRANSIENT, text, False
    return OutcomeClass.TRANSIENT, f"connector error: {describe(exc)}", False


# ===================================================================== source
def _filter_problem(value: str) -> str | None:
    """Why a subscription topic filter is malformed, or None."""
    if not value:
        return "is empty"
    if "\x00" in value:
        return "contains a NUL character"
    levels = value.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or any(c in levels[1] for c in "+#"):
            return "is not a shared subscription of the form $share/GROUP/FILTER"
        levels = levels[2:]
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "uses # other than as the whole last level (e.g. factory/#)"
        if "+" in level and level != "+":
            return "uses + other than as a whole level (e.g. factory/+/orders)"
    return None


def _plain_filter(topic: str) -> str:
    """The filter a message topic is matched against: $share/GROUP/ removed."""
    return topic.split("/", 2)[2] if topic.startswith("$share/") else topic


class MqttSourceConfig(Spec):
    topic: str = Field(
        description="Topic filter to subscribe to; + matches one level and # the rest, e.g. "
        "`factory/+/orders` or `sensors/#`. `$share/GROUP/FILTER` shares the messages among the hubs "
        "using one GROUP.",
        examples=["factory/+/orders"],
    )
    qos: Literal[0, 1] = Field(
        1,
        description="1: at least once, acknowledged (PUBACK) only after the commit; messages published while "
        "the hub is down wait in the broker's session. 0: at most once: what arrives while the hub is "
        "down, or before a commit when it stops, is lost. (QoS 2 is not offered: its PUBREC would be "
        "sent before the commit.)",
    )
    client_id: str = Field(
        min_length=1,
        max_length=128,
        description="Fixed client identifier: the broker keeps this flow's session (its subscription and the "
        "messages that arrive while the hub is down) under it, so it must stay the same across restarts. "
        "Give every flow its own, different from the system's client_id and from any other client: a "
        "broker disconnects the older of two connections with one id.",
        examples=["patchbay-orders"],
    )
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=1,
        le=4294967295,
        description="MQTT 5: how long the broker keeps the session while the hub is disconnected, in seconds "
        "(4294967295: forever). MQTT 3.1.1 sessions do not expire; either way the broker's own limits "
        "apply (Mosquitto queues at most max_queued_messages, 1000 by default, per session).",
    )
    key_field: str | None = Field(
        None,
        description="Dotted path of a field in the JSON payload that identifies the message, e.g. "
        "`event_id`. Without it (or when the payload lacks it), the MQTT 5 user property `id_property` "
        "is used, else the SHA-256 of topic + payload: MQTT has no message id that survives redelivery, "
        "so two identical payloads on one topic are then ONE event. Set key_field when that is wrong.",
    )
    id_property: str | None = Field(
        "Idempotency-Key",
        description="MQTT 5 user property that identifies the message (what the mqtt destination sends).",
    )
    batch_size: int = Field(100, ge=1, le=32767, description=BATCH_SIZE_DESCRIPTION)
    max_wait_ms: int = Field(50, ge=0, le=60_000, description=MAX_WAIT_DESCRIPTION)
    timeout_s: float = Field(10.0, gt=0, le=300, description=TIMEOUT_DESCRIPTION)

    _key_field = field_validator("key_field")(classmethod(lambda cls, v: check_key_field(v)))

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        problem = _filter_problem(v)
        if problem:
            raise ValueError(f"topic filter {v!r} {problem}")
        return v


class _Subscriber(_Conn):
    """A _Conn that also subscribes and passes every received message to an inbox."""

    def __init__(
        self, client: Any, loop: asyncio.AbstractEventLoop, v5: bool, error_string: Any, inbox: Inbox[Any]
    ) -> None:
        super().__init__(client, loop, v5, error_string)
        self.inbox = inbox
        self.subacks: dict[int, asyncio.Future[list[int]]] = {}
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe

    # paho's thread -------------------------------------------------------
    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._post(self.inbox.put, message)

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any = None
    ) -> None:
        self._post(self._subacked, mid, [int(rc.value) for rc in reason_codes])

    # the loop's thread ---------------------------------------------------
    def _subacked(self, mid: int, codes: list[int]) -> None:
        fut = self.subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(codes)

    def _lose(self, reason: str) -> None:
        super()._lose(reason)
        error = ConnectionError(f"connection lost: {self.lost}")
        self.inbox.fail(error)
        subacks, self.subacks = self.subacks, {}
        for fut in subacks.values():
            if not fut.done():
                fut.set_exception(error)

    def subscribe(self, topic: str, qos: int) -> asyncio.Future[list[int]]:
        if self.lost is not None:
            raise ConnectionError(f"connection lost: {self.lost}")
        rc, mid = self.client.subscribe(topic, qos)
        if rc != 0:
            raise ConnectionError(f"cannot subscribe: {self.error_string(rc)}")
        fut: asyncio.Future[list[int]] = self.loop.create_future()
        self.subacks[mid] = fut  # the SUBACK is queued with call_soon_threadsafe: it runs after this line
        return fut

    def ack(self, message: Any) -> None:
        rc = self.client.ack(message.mid, message.qos)
        if rc != 0:
            raise ConnectionError(f"cannot acknowledge: {self.error_string(rc)}")


@connector("mqtt", roles=("source",), config=MqttSourceConfig, system_config=MqttSystem, extra="mqtt")
class MqttSource:
    """Subscribe to a topic filter with a persistent session; PUBACK each message only after its commit."""

    mode = "stream"

    def __init__(self, system: MqttSystem, config: MqttSourceConfig, resources: Resources) -> None:
        self.paho = import_driver("paho.mqtt.client", package="paho-mqtt", extra="mqtt", kind="mqtt")
        if system.client_id is not None and system.client_id == config.client_id:
            raise ConfigError(
                f"mqtt source: client_id {config.client_id!r} is also the system's client_id; the broker "
                "would disconnect one of the two connections: give the source its own"
            )
        self.system = system
        self.config = config
        self.resources = resources
        self._filter = _plain_filter(config.topic)
        self._conn: _Subscriber | None = None
        self._cleanups: set[asyncio.Future[None]] = set()
        self._stray: set[str] = set()
        self.connections = 0  # opened so far (reconnects show here)
        self.subscriptions = 0  # subscriptions made so far
        self.settled = 0  # messages done with upstream so far: committed, then acknowledged

    async def stream(self, emit: Emit) -> None:
        """Consume until cancelled; raises when the connection is lost (the engine reconnects)."""
        cfg = self.config
        inbox: Inbox[Any] = Inbox()
        conn = await self._subscribe(inbox)
        try:
            while True:
                messages = await inbox.take(cfg.batch_size, cfg.max_wait_ms / 1000)
                check_cancelled()
                records = [self._record(m) for m in messages if self._ours(m)]
                if records:
                    # Not committed (emit raised): nothing is acknowledged, the connection is dropped
                    # below, and the broker sends the messages again to the next connection.
                    await emit(Batch(records))
                    check_cancelled()
                try:
                    for m in messages:  # in the order received, as MQTT asks of PUBACKs
                        conn.ack(m)
                    self.settled += len(messages)
                except ConnectionError as exc:
                    raise self._error(f"acknowledging: {exc}") from exc
        finally:
            await self._disconnect()

    async def _subscribe(self, inbox: Inbox[Any]) -> _Subscriber:
        cfg, s = self.config, self.system
        await self._disconnect()
        what = "connecting"
        try:
            async with asyncio.timeout(cfg.timeout_s):
                conn = self._conn = await open_client(
                    self.paho,
                    s,
                    self.resources,
                    lambda client, loop, v5, error_string: _Subscriber(client, loop, v5, error_string, inbox),
                    timeout_s=cfg.timeout_s,
                    client_id=cfg.client_id,
                    cleanups=self._cleanups,
                    persistent=cfg.qos > 0,
                    session_expiry_s=cfg.session_expiry_s,
                    receive_maximum=min(65535, 2 * cfg.batch_size),
                    manual_ack=True,
                )
                self.connections += 1
                what = "subscribing"
                codes = await conn.subscribe(cfg.topic, cfg.qos)
        except BaseException as exc:
            await self._disconnect()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, TimeoutError):
                raise self._error(f"{what}: timed out after {cfg.timeout_s:g}s") from exc
            if isinstance(exc, BlockedAddress):
                raise self._error(exc.explain(self.resources.system or None), OutcomeClass.TERMINAL) from exc
            cls, message, _ = classify_mqtt(exc, connected=what != "connecting", v5=s.protocol == "5")
            raise self._error(f"{what}: {message}", cls) from exc
        code = codes[0] if codes else 128
        if code >= 128:
            await self._disconnect()
            raise self._error(f"the broker refused the subscription (reason code {code})", OutcomeClass.AUTH)
        if code < cfg.qos:
            await self._disconnect()
            raise self._error(
                f"the broker granted QoS {code} only, not {cfg.qos}: messages could be lost; "
                "allow QoS 1 on the broker or set qos: 0",
                OutcomeClass.TERMINAL,
            )
        self.subscriptions += 1
        return conn

    def _error(self, message: str, cls: OutcomeClass = OutcomeClass.TRANSIENT) -> Exception:
        text_ = self.resources.redact(f"consuming topic {self.config.topic!r}: {message}")
        if cls is OutcomeClass.AUTH:
            return AuthError(text_)
        if cls in (OutcomeClass.TERMINAL, OutcomeClass.GONE):
            return TerminalError(text_)
        return TransientError(text_)

    def _ours(self, message: Any) -> bool:
        """False for a message of a subscription this session kept from an earlier topic setting."""
        if self.paho.topic_matches_sub(self._filter, message.topic):
            return True
        if message.topic not in self._stray:
            self._stray.add(message.topic)
            log.warning(
                "mqtt source %s: dropped a message on %r: it does not match %r (a subscription the "
                "session %r kept from an earlier topic setting; unsubscribe it on the broker)",
                self.resources.extra.get("flow", ""),
                message.topic,
                self.config.topic,
                self.config.client_id,
            )
        return False

    def _record(self, message: Any) -> SourceRecord:
        cfg = self.config
        data, raw = decode_body(message.payload)
        rid = None
        if cfg.key_field is not None and isinstance(data, dict):
            rid = text(dig(data, cfg.key_field))
        if rid is None and cfg.id_property is not None:
            props = getattr(message, "properties", None)
            for name, value in getattr(props, "UserProperty", None) or ():
                if name == cfg.id_property:
                    rid = text(value)
                    break
        return SourceRecord(data, id=rid or content_id(message.topic, message.payload), raw=raw)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(conn.shutdown), 5.0)
            except Exception as exc:
                log.debug("closing mqtt source connection: %s", describe(exc))

    async def close(self) -> None:
        await self._disconnect()
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
