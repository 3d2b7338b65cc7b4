"""The four message brokers as parameters of the sink conformance suite, and their read-back helpers.

A Broker says how to reach the local server, which driver the connector needs and what the suite may
expect where brokers differ (JetStream drops a republished key; MQTT and AMQP keep both copies; redis-py
resends once by itself). Broker.open() makes a throw-away destination (topic, stream, queue) and
yields a Target that builds sinks aimed at it and reads back every copy that arrived.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Outcome, Resources

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Copy:
    """One message as the broker holds or delivered it: every place it carries the key, and its body."""

    keys: tuple[str, ...]
    body: Any

    @property
    def key(self) -> str:
        assert len(set(self.keys)) == 1, f"the copy carries different keys: {self.keys}"
        return self.keys[0]


class Target:
    """A throw-away destination on the broker; `sink(port)` publishes to it through 127.0.0.1:port."""

    def __init__(self, broker: Broker, dest: dict[str, Any]) -> None:
        self.broker = broker
        self.dest = dest

    def sink(self, port: int, *, timeout_s: float = 3.0) -> Any:
        return self.broker.sink(port, self.dest, timeout_s=timeout_s)

    async def count(self) -> int:
        """How many copies reached the broker so far (without consuming them)."""
        raise NotImplementedError

    async def copies(self) -> list[Copy]:
        """Every copy that reached the broker so far, in arrival order."""
        raise NotImplementedError


async def send(sink: Any, key: str, record: Any = None) -> Outcome:
    """One attempt, as the delivery worker makes it: render at ingest, then send with the same key."""
    outcome: Outcome = await sink.send(sink.render({"key": key} if record is None else record, key), key)
    return outcome


@dataclass(frozen=True)
class Broker:
    kind: str
    service: str  # for require_service
    port: int
    driver: str  # the module an install without the extra lacks
    refused: str  # words of the error when nothing listens
    make: Callable[[int, dict[str, Any], DeliveryPolicy, Resources], Any]  # (port, dest, policy, resources)
    target: Callable[[Broker], AbstractAsyncContextManager[Target]]
    bare: dict[str, Any]  # a destination config that needs no setup
    # The connection cut: how many sends are acknowledged first, then held in flight, on how many
    # connections (a sink -> (acked, in_flight, connections)).
    sizes: Callable[[Any], tuple[int, int, int]] = lambda s: (10, 30, 1)
    lost_is_transient: bool = True  # every send in flight at the cut is transient ("connection lost")
    # Copies of an in-flight key, and of the key sent just after the cut, given its attempts.
    in_flight_copies: Callable[[int], range] = lambda attempts: range(2, 3)
    next_copies: Callable[[int], range] = lambda attempts: range(1, 2)
    retry_note: str | None = None  # in the excerpt of a retry of an in-flight key
    reopens: bool = True  # the sink keeps one connection (`_conn.opened` counts them)
    cut_after_blackhole: bool = False

    def sink(self, port: int, dest: dict[str, Any], *, timeout_s: float = 3.0) -> Any:
        policy = DeliveryPolicy.model_validate({"timeout_s": timeout_s})
        return self.make(port, dest, policy, Resources(allow_private=True))  # a loopback broker

    def open(self) -> AbstractAsyncContextManager[Target]:
        """A throw-away destination on the local broker, removed afterwards."""
        return self.target(self)

    def __str__(self) -> str:
        return self.kind


# ------------------------------------------------------------------ mqtt
MQTT_PORT = 1883


def user_properties(msg: Any) -> dict[str, str]:
    return dict(getattr(msg.properties, "UserProperty", []) or [])


class Subscriber:
    """A plain paho subscriber on its own thread; messages land in a thread-safe queue."""

    def __init__(self, topic: str, *, v5: bool = True, port: int = MQTT_PORT) -> None:
        import paho.mqtt.client as mqtt

        self.messages: queue.Queue[Any] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"pbtest-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(HOST, port)
        self.client.subscribe(topic, qos=2)
        self.client.loop_start()
        assert self._subscribed.wait(5), "no SUBACK"

    async def get(self, n: int = 1, timeout: float = 5.0) -> list[Any]:
        return [await asyncio.to_thread(self.messages.get, True, timeout) for _ in range(n)]

    def drain(self) -> list[Any]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MqttTarget(Target):
    def __init__(self, broker: Broker, topic: str, sub: Subscriber) -> None:
        super().__init__(broker, {"topic": f"{topic}/t"})
        self.sub = sub
        self.got: list[Copy] = []

    def _receive(self) -> None:
        for m in self.sub.drain():
            self.got.append(Copy((user_properties(m)["Idempotency-Key"],), orjson.loads(m.payload)))

    async def count(self) -> int:
        self._receive()
        return len(self.got)

    async def copies(self) -> list[Copy]:
        self._receive()
        return list(self.got)


@asynccontextmanager
async def mqtt_target(broker: Broker) -> AsyncIterator[Target]:
    topic = f"pbtest/{uuid.uuid4().hex[:10]}"
    sub = await asyncio.to_thread(Subscriber, topic + "/#")
    try:
        yield MqttTarget(broker, topic, sub)
    finally:
        await asyncio.to_thread(sub.close)


def mqtt_sink(port: int, dest: dict[str, Any], policy: DeliveryPolicy, resources: Resources) -> Any:
    from patchbay.connectors.mqtt import MqttSink, MqttSinkConfig, MqttSystem

    system = MqttSystem.model_validate({"host": HOST, "port": port})
    return MqttSink(system, MqttSinkConfig.model_validate(dest), policy, resources)


# ------------------------------------------------------------------ nats (JetStream)
NATS_PORT = 4222
NATS_URL = f"nats://{HOST}:{NATS_PORT}"


async def stored(nc: Any, stream_name: str) -> list[Any]:
    """Every message a JetStream stream holds, in order."""
    js = nc.jetstream()
    info = await js.stream_info(stream_name)
    return [
        await js.get_msg(stream_name, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


class NatsTarget(Target):
    def __init__(self, broker: Broker, nc: Any, name: str, prefix: str) -> None:
        super().__init__(broker, {"subject": f"{prefix}.x"})
        self.nc, self.name = nc, name

    async def count(self) -> int:
        return int((await self.nc.jetstream().stream_info(self.name)).state.messages)

    async def copies(self) -> list[Copy]:
        return [
            Copy((m.headers["Nats-Msg-Id"],), orjson.loads(m.data)) for m in await stored(self.nc, self.name)
        ]


@asynccontextmanager
async def nats_target(broker: Broker) -> AsyncIterator[Target]:
    import nats

    nc = await nats.connect(NATS_URL)
    uid = uuid.uuid4().hex[:10]
    name, prefix = f"PBTEST_{uid}", f"pbtest.{uid}"
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{prefix}.>"])
    try:
        yield NatsTarget(broker, nc, name, prefix)
    finally:
        await js.delete_stream(name)
        await nc.close()


def nats_sink(port: int, dest: dict[str, Any], policy: DeliveryPolicy, resources: Resources) -> Any:
    from patchbay.connectors.nats import NatsSink, NatsSinkConfig, NatsSystem

    system = NatsSystem.model_validate({"servers": [f"nats://{HOST}:{port}"]})
    return NatsSink(system, NatsSinkConfig.model_validate(dest), policy, resources)


# ------------------------------------------------------------------ rabbitmq
AMQP_PORT = 5672


async def new_queue(channel: Any, **arguments: Any) -> Any:
    return await channel.declare_queue(
        f"pb-test-{uuid.uuid4().hex[:10]}", exclusive=True, arguments=arguments or None
    )


async def message_count(channel: Any, name: str) -> int:
    """How many messages the queue holds now (a passive declare)."""
    return int((await channel.declare_queue(name, passive=True)).declaration_result.message_count)


async def drain(queue: Any, n: int, timeout: float = 5.0, ids: set[str] | None = None) -> list[Any]:
    """Read `n` messages (or, with `ids`, until every one of those message ids was seen)."""
    got: list[Any] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while (len(got) < n) if ids is None else not ids <= {m.message_id for m in got}:
        msg = await queue.get(no_ack=True, fail=False)
        if msg is None:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)  # polling: basic.get has no wait
            continue
        got.append(msg)
    return got


class RabbitTarget(Target):
    def __init__(self, broker: Broker, channel: Any, q: Any) -> None:
        super().__init__(broker, {"routing_key": q.name})
        self.channel, self.queue = channel, q
        self.got: list[Copy] = []

    async def _consume(self) -> None:
        while (m := await self.queue.get(no_ack=True, fail=False)) is not None:
            self.got.append(Copy((m.message_id, m.headers["Idempotency-Key"]), orjson.loads(m.body)))

    async def count(self) -> int:
        return len(self.got) + await message_count(self.channel, self.queue.name)

    async def copies(self) -> list[Copy]:
        await self._consume()
        return list(self.got)


@asynccontextmanager
async def rabbit_target(broker: Broker) -> AsyncIterator[Target]:
    import aio_pika

    conn = await aio_pika.connect(host=HOST, port=AMQP_PORT)
    try:
        channel = await conn.channel()
        yield RabbitTarget(broker, channel, await new_queue(channel))
    finally:
        await conn.close()


def rabbit_sink(port: int, dest: dict[str, Any], policy: DeliveryPolicy, resources: Resources) -> Any:
    from patchbay.connectors.rabbitmq import RabbitMQSink, RabbitMQSinkConfig, RabbitMQSystem

    system = RabbitMQSystem.model_validate({"host": HOST, "port": port})
    return RabbitMQSink(system, RabbitMQSinkConfig.model_validate(dest), policy, resources)


# ------------------------------------------------------------------ redis (streams)
REDIS_PORT = 6379
REDIS_URL = f"redis://{HOST}:{REDIS_PORT}/0"


async def entries(r: Any, key: str) -> list[dict[str, str]]:
    return [fields for _, fields in await r.xrange(key)]


class RedisTarget(Target):
    def __init__(self, broker: Broker, r: Any, key: str) -> None:
        super().__init__(broker, {"stream": key})
        self.r, self.key = r, key

    async def count(self) -> int:
        return int(await self.r.xlen(self.key))

    async def copies(self) -> list[Copy]:
        return [
            Copy((e["idempotency_key"],), orjson.loads(e["data"])) for e in await entries(self.r, self.key)
        ]


@asynccontextmanager
async def redis_target(broker: Broker) -> AsyncIterator[Target]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    key = f"pbtest:{uuid.uuid4().hex[:10]}"
    try:
        yield RedisTarget(broker, r, key)
    finally:
        await r.delete(key)
        await r.aclose()


def redis_sink(port: int, dest: dict[str, Any], policy: DeliveryPolicy, resources: Resources) -> Any:
    from patchbay.connectors.redis import RedisSink, RedisSinkConfig, RedisSystem

    system = RedisSystem.model_validate({"url": f"redis://{HOST}:{port}/0"})
    return RedisSink(system, RedisSinkConfig.model_validate(dest), policy, resources)


def _redis_sizes(sink: Any) -> tuple[int, int, int]:
    pool = sink.policy.max_concurrency  # one connection per concurrent send
    return pool, pool, pool


BROKERS: list[Broker] = [
    Broker(
        "mqtt",
        "Mosquitto",
        MQTT_PORT,
        "paho.mqtt.client",
        "cannot connect",
        mqtt_sink,
        mqtt_target,
        {"topic": "t"},
        # 15: within paho's window of unacknowledged QoS 1 publishes (max_inflight, 20), so every one
        # is on the wire; beyond it paho would queue them until PUBACKs come.
        sizes=lambda s: (10, 15, 1),
    ),
    Broker(
        "nats",
        "NATS",
        NATS_PORT,
        "nats.aio.client",
        "cannot connect",
        nats_sink,
        nats_target,
        {"subject": "x"},
        in_flight_copies=lambda attempts: range(1, 2),  # JetStream drops the republished Nats-Msg-Id
        retry_note="a duplicate",
    ),
    Broker(
        "rabbitmq",
        "RabbitMQ",
        AMQP_PORT,
        "aio_pika",
        "cannot connect",
        rabbit_sink,
        rabbit_target,
        {"routing_key": "q"},
        cut_after_blackhole=True,
    ),
    Broker(
        "redis",
        "Redis",
        REDIS_PORT,
        "redis.asyncio",
        "connection failed",
        redis_sink,
        redis_target,
        {"stream": "s"},
        sizes=_redis_sizes,
        # redis-py resends a command whose connection broke once, on a new connection (the sink's
        # one immediate retry): an attempt may succeed, and writes at most twice.
        lost_is_transient=False,
        in_flight_copies=lambda attempts: range(2, 2 * attempts + 1),
        next_copies=lambda attempts: range(1, 2 * attempts + 1),
        reopens=False,
    ),
]
