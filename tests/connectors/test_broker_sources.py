"""The broker sources against the local servers: acknowledged only after the commit, redelivered, deduped.

The same checks run on rabbitmq, mqtt, nats (JetStream) and redis (streams), each through a `Broker`
that knows how to publish and how to read what is still unacknowledged; the broker-specific
behaviour (ids, session, pending list, configuration) follows at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import yaml
from pydantic import ValidationError

from patchbay.connectors.base import Batch, Resources
from patchbay.engine.hub import Hub
from patchbay.engine.sources import consume
from patchbay.errors import ConfigError, TerminalError
from tests.conftest import eventually, require_service, write_project
from tests.connectors import TcpProxy

HOST = "127.0.0.1"


# ----------------------------------------------------------------------------- what stands in for the store
class Engine:
    """Keeps the first record of each id, as the store's dedupe does; counts the copies it drops."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}
        self.duplicates = 0
        self.batches = 0

    async def emit(self, batch: Batch) -> None:
        self.batches += 1
        for r in batch.records:
            assert r.id is not None
            if r.id in self.records:
                self.duplicates += 1
            else:
                self.records[r.id] = r.data

    def ns(self) -> list[int]:
        return sorted(d["n"] for d in self.records.values())


class FailOnce:
    """The first emit fails: before the commit (nothing stored) or after it (stored, not acknowledged)."""

    def __init__(self, engine: Engine, *, committed: bool) -> None:
        self.engine = engine
        self.committed = committed
        self.failed_ids: list[str] = []

    async def __call__(self, batch: Batch) -> None:
        if self.failed_ids:
            await self.engine.emit(batch)
            return
        self.failed_ids = [r.id for r in batch.records if r.id is not None]
        if self.committed:
            await self.engine.emit(batch)
        raise RuntimeError("the store is down")


async def run(
    src: Any, emit: Callable[[Batch], Awaitable[None]], until: Callable[[], bool], timeout: float = 10.0
) -> None:
    """Run the source's stream until `until()` holds, then cancel it; a stream that fails raises here.

    It runs a little longer first: `until` sees what emit committed, and the acknowledgements follow.
    """
    returned = 0  # messages whose emit returned: committed, so the source acknowledges them next

    async def counted(batch: Batch) -> None:
        nonlocal returned
        await emit(batch)
        returned += len(batch.records)

    task = asyncio.create_task(src.stream(counted))
    deadline = time.monotonic() + timeout
    try:
        for done in (until, lambda: src.settled >= returned):
            while not done():
                if task.done():
                    task.result()
                if time.monotonic() > deadline:
                    raise AssertionError("timed out waiting for the source")
                await asyncio.sleep(0.01)
        if task.done():
            task.result()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def body(n: int, run_id: str) -> bytes:
    return orjson.dumps({"n": n, "run": run_id})


# ----------------------------------------------------------------------------- one adapter per broker
class Broker:
    kind: str
    port: int
    uid: str

    async def start(self) -> None: ...

    async def publish(self, ns: range | list[int]) -> None: ...

    def system(self, port: int | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    async def left(self) -> int | None:
        """Messages still unacknowledged or undelivered upstream (no consumer running); None: unknown."""
        return None

    async def stop(self) -> None: ...

    def source(self, port: int | None = None, **over: Any) -> Any:
        from patchbay import registry

        found = registry.connector_for(self.kind, "source")
        entry = registry.CONNECTORS[self.kind]
        assert found is not None and entry.system_config is not None
        cls, model = found
        system = {k: v for k, v in self.system(port).items() if k != "kind"}
        return cls(
            entry.system_config.model_validate(system),
            model.model_validate({**self.settings(), **over}),
            Resources(extra={"flow": f"pbtest-{self.uid}"}, allow_private=True),  # loopback brokers
        )


class Rabbit(Broker):
    kind, port = "rabbitmq", 5672

    async def start(self) -> None:
        aio_pika = pytest.importorskip("aio_pika")
        self.aio_pika = aio_pika
        self.queue_name = f"pb-src-{self.uid}"
        self.conn = await aio_pika.connect(host=HOST, port=self.port)
        self.channel = await self.conn.channel()
        self.queue = await self.channel.declare_queue(self.queue_name, durable=True)

    async def publish(self, ns: range | list[int], **props: Any) -> None:
        for n in ns:
            message = self.aio_pika.Message(body(n, self.uid), **props)
            await self.channel.default_exchange.publish(message, routing_key=self.queue_name)

    def system(self, port: int | None = None) -> dict[str, Any]:
        return {"kind": "rabbitmq", "host": HOST, "port": port or self.port}

    def settings(self) -> dict[str, Any]:
        return {"queue": self.queue_name, "batch_size": 10, "prefetch": 20, "max_wait_ms": 20}

    async def left(self) -> int:
        q = await self.channel.declare_queue(self.queue_name, passive=True)
        return int(q.declaration_result.message_count)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.queue.delete(if_unused=False, if_empty=False)
        await self.conn.close()


class Mqtt(Broker):
    kind, port = "mqtt", 1883

    async def start(self) -> None:
        self.paho = pytest.importorskip("paho.mqtt.client")
        self.prefix = f"pbtest/{self.uid}"
        self.client_id = f"pbtest-src-{self.uid}"
        # The session must exist before anything is published, as it does once the flow has run.
        from patchbay.connectors.broker_client import Inbox

        src = self.source()
        await src._subscribe(Inbox())
        await src.close()

    def _publish(self, topic: str, payloads: list[bytes]) -> None:
        mqtt = self.paho
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect(HOST, self.port)
        client.loop_start()
        try:
            for info in [client.publish(topic, p, qos=1) for p in payloads]:
                info.wait_for_publish(5)
        finally:
            client.disconnect()
            client.loop_stop()

    async def publish(self, ns: range | list[int], topic: str = "orders") -> None:
        await asyncio.to_thread(self._publish, f"{self.prefix}/{topic}", [body(n, self.uid) for n in ns])

    async def publish_raw(self, topic: str, payloads: list[bytes]) -> None:
        await asyncio.to_thread(self._publish, f"{self.prefix}/{topic}", payloads)

    def system(self, port: int | None = None) -> dict[str, Any]:
        return {"kind": "mqtt", "host": HOST, "port": port or self.port}

    def settings(self) -> dict[str, Any]:
        return {"topic": f"{self.prefix}/#", "client_id": self.client_id, "batch_size": 10, "max_wait_ms": 20}

    def _forget_session(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        mqtt = self.paho
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
        )
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        connected = threading.Event()
        client.on_connect = lambda *args: connected.set()
        client.connect(HOST, self.port, clean_start=True, properties=props)
        client.loop_start()
        assert connected.wait(5), "no CONNACK"  # the broker has dropped the session
        client.disconnect()
        client.loop_stop()

    async def stop(self) -> None:
        await asyncio.to_thread(self._forget_session)  # the broker would keep the session for days


class Nats(Broker):
    kind, port = "nats", 4222

    async def start(self) -> None:
        nats = pytest.importorskip("nats")
        self.nc = await nats.connect(f"nats://{HOST}:{self.port}")
        self.js = self.nc.jetstream()
        self.stream_name, self.prefix = f"PBSRC_{self.uid}", f"pbsrc.{self.uid}"
        await self.js.add_stream(name=self.stream_name, subjects=[f"{self.prefix}.>"])

    async def publish(self, ns: range | list[int], headers: dict[str, str] | None = None) -> None:
        for n in ns:
            await self.js.publish(f"{self.prefix}.orders", body(n, self.uid), headers=headers)

    def system(self, port: int | None = None) -> dict[str, Any]:
        return {"kind": "nats", "servers": [f"nats://{HOST}:{port or self.port}"]}

    def settings(self) -> dict[str, Any]:
        # After a lost connection, what it had not acknowledged comes back once ack_wait has passed.
        return {
            "stream": self.stream_name,
            "durable": "patchbay",
            "batch_size": 10,
            "fetch_wait_s": 0.5,
            "ack_wait_s": 2,
        }

    async def left(self) -> int:
        info = await self.js.consumer_info(self.stream_name, "patchbay")
        return int(info.num_pending + info.num_ack_pending)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.js.delete_stream(self.stream_name)
        await self.nc.close()


class Redis(Broker):
    kind, port = "redis", 6379

    async def start(self) -> None:
        aioredis = pytest.importorskip("redis.asyncio")
        self.r = aioredis.Redis.from_url(f"redis://{HOST}:{self.port}/0")
        self.key = f"pbsrc:{self.uid}"

    async def publish(self, ns: range | list[int]) -> None:
        for n in ns:
            await self.r.xadd(self.key, {"data": body(n, self.uid)})

    def system(self, port: int | None = None) -> dict[str, Any]:
        return {
            "kind": "redis",
            "url": f"redis://{HOST}:{port or self.port}/0",
            "client_name": f"pbsrc-{self.uid}",
        }

    def settings(self) -> dict[str, Any]:
        return {"stream": self.key, "group": "hub", "batch_size": 10, "block_ms": 200}

    async def left(self) -> int:
        pending = (await self.r.xpending(self.key, "hub"))["pending"]
        [group] = await self.r.xinfo_groups(self.key)
        last = await self.r.xrevrange(self.key, count=1)
        undelivered = 0 if not last or group["last-delivered-id"] == last[0][0] else 1
        return int(pending) + undelivered

    async def stop(self) -> None:
        await self.r.delete(self.key)
        await self.r.aclose()


BROKERS: dict[str, type[Broker]] = {"rabbitmq": Rabbit, "mqtt": Mqtt, "nats": Nats, "redis": Redis}
NAMES = {"rabbitmq": "RabbitMQ", "mqtt": "Mosquitto", "nats": "NATS", "redis": "Redis"}


async def _broker(kind: str) -> AsyncIterator[Any]:
    cls = BROKERS[kind]
    require_service(NAMES[kind], HOST, cls.port)
    b = cls()
    b.uid = uuid.uuid4().hex[:10]
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async for b in _broker(request.param):
        yield b


@pytest.fixture
async def rabbit() -> AsyncIterator[Rabbit]:
    async for b in _broker("rabbitmq"):
        yield b


@pytest.fixture
async def mqtt_broker() -> AsyncIterator[Mqtt]:
    async for b in _broker("mqtt"):
        yield b


@pytest.fixture
async def jetstream() -> AsyncIterator[Nats]:
    async for b in _broker("nats"):
        yield b


@pytest.fixture
async def redis_stream() -> AsyncIterator[Redis]:
    async for b in _broker("redis"):
        yield b


# ----------------------------------------------------------------------------- every broker
async def test_every_message_is_committed_then_acknowledged(broker):
    await broker.publish(range(25))
    src, engine = broker.source(), Engine()
    await run(src, engine.emit, until=lambda: len(engine.records) == 25)
    await src.close()
    assert engine.ns() == list(range(25))
    assert engine.duplicates == 0
    assert engine.batches >= 3  # batch_size 10
    assert await broker.left() in (0, None)


async def test_a_failed_commit_is_not_acknowledged_and_comes_again(broker):
    await broker.publish(range(5))
    src, engine = broker.source(), Engine()
    failing = FailOnce(engine, committed=False)
    with pytest.raises(RuntimeError, match="the store is down"):
        await asyncio.wait_for(src.stream(failing), 10)
    assert failing.failed_ids and engine.records == {}
    await run(src, engine.emit, until=lambda: len(engine.records) == 5)
    await src.close()
    assert engine.ns() == list(range(5))
    assert set(failing.failed_ids) <= set(engine.records)  # redelivered under the same ids
    assert await broker.left() in (0, None)


async def test_committed_but_not_acknowledged_comes_again_and_is_dropped_by_its_id(broker):
    await broker.publish(range(5))
    src, engine = broker.source(), Engine()
    failing = FailOnce(engine, committed=True)
    with pytest.raises(RuntimeError, match="the store is down"):
        await asyncio.wait_for(src.stream(failing), 10)
    committed = list(failing.failed_ids)
    assert committed and set(engine.records) == set(committed)
    await run(
        src, engine.emit, until=lambda: len(engine.records) == 5 and engine.duplicates >= len(committed)
    )
    await src.close()
    assert engine.ns() == list(range(5))
    assert engine.duplicates == len(committed)  # each committed message came once more, recognised
    assert await broker.left() in (0, None)


async def test_a_cut_connection_is_reopened_by_consume_and_nothing_is_lost(broker):
    proxy = await TcpProxy(HOST, broker.port).start()
    src, engine = broker.source(port=proxy.port), Engine()
    hub = SimpleNamespace(ingest_batch=lambda flow, batch: engine.emit(batch))
    task = asyncio.create_task(consume(hub, SimpleNamespace(spec=SimpleNamespace(name="orders")), src))  # type: ignore[arg-type]
    try:
        await eventually(_holds(lambda: src.connections >= 1 and proxy.accepted >= 1), what="connected")
        await eventually(_holds(lambda: src.subscriptions >= 1), what="subscribed")
        await broker.publish(range(10))
        await eventually(_holds(lambda: len(engine.records) >= 10), what="first messages")

        async def trickle() -> None:
            for n in range(10, 40):
                await broker.publish([n])
                await asyncio.sleep(0.005)

        publisher = asyncio.create_task(trickle())
        await eventually(_holds(lambda: len(engine.records) >= 15), what="more messages")
        assert proxy.cut() >= 1  # mid-run: messages are flowing
        await publisher
        await eventually(
            _holds(lambda: len(engine.records) == 40), timeout=15, what="every message after the cut"
        )
        assert src.connections >= 2
        assert engine.ns() == list(range(40))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.close()
        await proxy.stop()


async def test_end_to_end_each_message_is_one_event_delivered_once(
    broker, tmp_path, sink, start_hub, monkeypatch
):
    """Through a flow: the first commit is followed by a failure, so its messages come again."""
    original = Hub.ingest_batch
    redelivered: list[int] = []

    async def commit_then_fail_once(self: Hub, flow: str, batch: Batch, meta: Any = None) -> Any:
        accepted = await original(self, flow, batch, meta)
        if not redelivered:
            redelivered.append(len(batch.records))
            raise RuntimeError("the connection broke after the commit")
        return accepted

    monkeypatch.setattr(Hub, "ingest_batch", commit_then_fail_once)
    write_project(
        tmp_path,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": yaml.safe_dump(
                {
                    "q": {"owner": "ops", "allow_private_network": True, **broker.system()},
                    "reporting": {
                        "kind": "http",
                        "owner": "finance",
                        "url": sink.url,
                        "allow_private_network": True,
                    },
                }
            ),
            "flows/orders.yaml": yaml.safe_dump(
                {
                    "purpose": "orders from the broker reach reporting",
                    "owner": "ops",
                    "trigger": {"source": {"system": "q", **broker.settings()}},
                    "steps": [{"map": {"order": "n", "run": "run"}}],
                    "destinations": [{"name": "report", "system": "reporting", "path": "/orders"}],
                }
            ),
        },
    )
    await broker.publish(range(5))  # published while the hub is down
    hub = await start_hub(tmp_path)
    await sink.wait_for(5)
    await broker.publish(range(5, 10))
    await sink.wait_for(10)
    src = hub.hub.flows["orders"].source
    # Every message acknowledged: the broker has nothing left to send again.
    await eventually(_holds(lambda: src.settled >= 10), what="every message acknowledged")
    assert sorted(r.body["order"] for r in sink.received) == list(range(10))  # each once
    assert all(r.body["run"] == broker.uid for r in sink.received)
    assert await hub.count() == 10
    assert redelivered and hub.hub.metrics.duplicates.labels("orders")._value.get() >= redelivered[0]


def _holds(pred: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return pred()

    return check


# ----------------------------------------------------------------------------- rabbitmq
async def test_rabbitmq_ids_come_from_the_header_then_message_id_then_body(rabbit):
    await rabbit.publish([1], message_id="m-1", headers={"Idempotency-Key": "k-1"})
    await rabbit.publish([2], message_id="m-2")
    src, engine = rabbit.source(), Engine()
    await run(src, engine.emit, until=lambda: len(engine.records) == 2)
    await src.close()
    assert engine.records == {"k-1": {"n": 1, "run": rabbit.uid}, "m-2": {"n": 2, "run": rabbit.uid}}
    # aio-pika gives every publish a message_id; other clients send none: then the body decides.
    from patchbay.connectors.broker_client import content_id

    bare = SimpleNamespace(body=b"not json \xff", message_id=None, headers=None)
    rec = src._record(bare)
    assert (rec.id, rec.data, rec.raw) == (content_id(b"not json \xff"), {"body": "not json \ufffd"}, None)
    rec = src._record(SimpleNamespace(body=b'{"n": 3}', message_id="", headers={"Idempotency-Key": b"k-3"}))
    assert (rec.id, rec.data, rec.raw) == ("k-3", {"n": 3}, b'{"n": 3}')


async def test_rabbitmq_declares_and_binds_a_queue(rabbit):
    exchange = await rabbit.channel.declare_exchange(f"pb-src-{rabbit.uid}", "topic", auto_delete=True)
    name = f"pb-src-declared-{rabbit.uid}"
    src = rabbit.source(queue=name, declare=True, bind={"exchange": exchange.name, "routing_key": "orders.#"})
    engine = Engine()
    try:
        task = asyncio.create_task(src.stream(engine.emit))
        await eventually(_holds(lambda: src.subscriptions == 1), what="subscribed")
        for n, key in enumerate(["orders.eu", "invoices.eu", "orders.us.west"]):
            await exchange.publish(rabbit.aio_pika.Message(body(n, rabbit.uid)), routing_key=key)
        await eventually(_holds(lambda: len(engine.records) == 2), what="routed messages")
        assert engine.ns() == [0, 2]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rabbit.channel.declare_queue(name, passive=True)  # durable: still there after the source stops
    finally:
        await src.close()
        await rabbit.channel.queue_delete(name)


async def test_rabbitmq_missing_queue_says_how_to_fix_it(rabbit):
    src = rabbit.source(queue=f"missing-{rabbit.uid}")
    with pytest.raises(TerminalError, match="does not exist: create it, or set declare: true"):
        await src.stream(Engine().emit)
    await src.close()


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed")
async def test_rabbitmq_connection_closed_by_the_broker_is_reopened(rabbit):
    src, engine = rabbit.source(), Engine()
    hub = SimpleNamespace(ingest_batch=lambda flow, batch: engine.emit(batch))
    task = asyncio.create_task(consume(hub, SimpleNamespace(spec=SimpleNamespace(name="orders")), src))  # type: ignore[arg-type]
    try:
        await rabbit.publish(range(3))
        await eventually(_holds(lambda: len(engine.records) == 3), what="first messages")
        listed = await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if listed.returncode != 0:
            pytest.skip(f"rabbitmqctl cannot reach the broker: {listed.stderr.strip()[:200]}")
        [pid] = [line.split("\t")[0] for line in listed.stdout.splitlines() if src.connection_name in line]
        closed = await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "close_connection", pid, "test: broker restart"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert closed.returncode == 0, closed.stderr
        await rabbit.publish(range(3, 6))
        await eventually(_holds(lambda: len(engine.records) == 6), what="messages after the close")
        assert src.connections >= 2 and engine.ns() == list(range(6))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.close()


def test_rabbitmq_batch_may_not_exceed_prefetch():
    from patchbay.connectors.rabbitmq import RabbitMQSourceConfig

    with pytest.raises(ValidationError, match="larger than prefetch"):
        RabbitMQSourceConfig.model_validate({"queue": "q", "prefetch": 10, "batch_size": 50})


# ----------------------------------------------------------------------------- mqtt
async def test_mqtt_session_keeps_what_is_published_while_the_hub_is_down(mqtt_broker):
    src, engine = mqtt_broker.source(), Engine()
    await mqtt_broker.publish(range(3))
    await run(src, engine.emit, until=lambda: len(engine.records) == 3)
    await mqtt_broker.publish(range(3, 6))  # the source is stopped: the broker queues them
    await run(src, engine.emit, until=lambda: len(engine.records) == 6)
    await src.close()
    assert engine.ns() == list(range(6)) and engine.duplicates == 0


async def test_mqtt_ids_key_field_or_topic_and_payload(mqtt_broker):
    src, engine = mqtt_broker.source(key_field="event.id"), Engine()
    a = orjson.dumps({"event": {"id": "e-1"}, "n": 1})
    same = orjson.dumps({"n": 2})
    await mqtt_broker.publish_raw("orders", [a, same, same])  # the same payload twice: one event
    await mqtt_broker.publish_raw("refunds", [same])  # on another topic: another event
    await run(src, engine.emit, until=lambda: len(engine.records) == 3 and engine.duplicates == 1)
    await src.close()
    from patchbay.connectors.broker_client import content_id

    assert engine.records["e-1"]["n"] == 1
    assert content_id(f"{mqtt_broker.prefix}/orders", same) in engine.records
    assert content_id(f"{mqtt_broker.prefix}/refunds", same) in engine.records


async def test_mqtt_drops_messages_of_an_earlier_topic_setting(mqtt_broker):
    old = mqtt_broker.source()  # the session subscribed to prefix/# (in start)
    await old.close()
    src, engine = mqtt_broker.source(topic=f"{mqtt_broker.prefix}/orders"), Engine()
    await mqtt_broker.publish([1], topic="stray")
    await mqtt_broker.publish([2], topic="orders")
    # Both handled: the stray one dropped (and acknowledged), the other one committed.
    await run(src, engine.emit, until=lambda: len(engine.records) == 1 and src.settled >= 2)
    await src.close()
    assert engine.ns() == [2]


def test_mqtt_source_config_is_checked():
    from patchbay.connectors.mqtt import MqttSource, MqttSourceConfig, MqttSystem

    ok = MqttSourceConfig.model_validate({"topic": "$share/hubs/factory/+/orders/#", "client_id": "pb-1"})
    assert ok.qos == 1
    with pytest.raises(ValidationError, match="client_id"):
        MqttSourceConfig.model_validate({"topic": "a/b"})
    for bad, why in [("a/#/b", "whole last level"), ("a/b+", "whole level"), ("", "is empty")]:
        with pytest.raises(ValidationError, match=why):
            MqttSourceConfig.model_validate({"topic": bad, "client_id": "x"})
    with pytest.raises(ValidationError, match="qos"):
        MqttSourceConfig.model_validate({"topic": "a", "client_id": "x", "qos": 2})
    with pytest.raises(ConfigError, match="also the system's client_id"):
        MqttSource(
            MqttSystem.model_validate({"host": "h", "client_id": "same"}),
            MqttSourceConfig.model_validate({"topic": "a", "client_id": "same"}),
            Resources(),
        )


# ----------------------------------------------------------------------------- nats
async def test_nats_id_is_nats_msg_id_else_stream_and_sequence(jetstream):
    await jetstream.publish([1], headers={"Nats-Msg-Id": "evt_1.bus"})
    await jetstream.publish([2])
    src, engine = jetstream.source(), Engine()
    await run(src, engine.emit, until=lambda: len(engine.records) == 2)
    await src.close()
    by_n = {rec["n"]: rid for rid, rec in engine.records.items()}
    assert by_n[1] == "evt_1.bus"
    assert by_n[2].startswith(f"{jetstream.stream_name}@") and by_n[2].endswith("#2")


async def test_nats_an_existing_durable_with_another_filter_is_refused(jetstream):
    src = jetstream.source(subject=f"{jetstream.prefix}.orders")
    # Subscribed, not only connected: the durable exists once the first source has bound to it (else the
    # second one would create it with its own filter and consume forever).
    await run(src, Engine().emit, until=lambda: src.subscriptions == 1)
    other = jetstream.source(subject=f"{jetstream.prefix}.refunds")
    with pytest.raises(TerminalError, match="exists with subject filter"):
        async with asyncio.timeout(30):
            await other.stream(Engine().emit)
    await other.close()
    await src.close()


async def test_nats_core_subscription_is_at_most_once(jetstream):
    subject = f"pbcore.{jetstream.uid}.>"
    src = jetstream.source(jetstream=False, subject=subject, stream=None, durable=None)
    engine = Engine()
    for_late = f"pbcore.{jetstream.uid}.early"
    await jetstream.nc.publish(for_late, b'{"n": -1}')  # nobody subscribed yet: gone for good
    task = asyncio.create_task(src.stream(engine.emit))
    try:
        await eventually(_holds(lambda: src.subscriptions == 1), what="subscribed")
        for n in range(3):
            await jetstream.nc.publish(
                f"pbcore.{jetstream.uid}.orders", body(n, jetstream.uid), headers={"Nats-Msg-Id": f"m{n}"}
            )
        await eventually(_holds(lambda: len(engine.records) == 3), what="core messages")
        assert engine.ns() == [0, 1, 2]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.close()


def test_nats_source_config_is_checked():
    from patchbay.connectors.nats import NatsSourceConfig

    with pytest.raises(ValidationError, match="needs `stream` and `durable`"):
        NatsSourceConfig.model_validate({"stream": "S"})
    with pytest.raises(ValidationError, match="needs `subject`"):
        NatsSourceConfig.model_validate({"jetstream": False})
    with pytest.raises(ValidationError, match="whole last token"):
        NatsSourceConfig.model_validate({"stream": "S", "durable": "d", "subject": "a.>.b"})
    with pytest.raises(ValidationError, match="dots"):
        NatsSourceConfig.model_validate({"stream": "S", "durable": "a.b"})
    assert "AT MOST ONCE" in (NatsSourceConfig.model_fields["jetstream"].description or "")


# ----------------------------------------------------------------------------- redis
async def test_redis_reads_its_pending_entries_first_after_a_crash(redis_stream):
    r = redis_stream
    await r.publish(range(4))
    await r.r.xgroup_create(r.key, "hub", id="0")
    # A previous run read two entries and crashed before XACK: they sit in the pending list.
    await r.r.xreadgroup("hub", "patchbay", {r.key: ">"}, count=2)
    src, engine = r.source(), Engine()
    order: list[int] = []

    async def emit(batch: Batch) -> None:
        order.extend(rec.data["n"] for rec in batch.records)
        await engine.emit(batch)

    await run(src, emit, until=lambda: len(engine.records) == 4)
    await src.close()
    assert order == [0, 1, 2, 3]
    assert await r.left() == 0


async def test_redis_acknowledges_a_pending_entry_that_was_deleted(redis_stream, caplog):
    r = redis_stream
    await r.publish(range(2))
    await r.r.xgroup_create(r.key, "hub", id="0")
    [[_, entries]] = await r.r.xreadgroup("hub", "patchbay", {r.key: ">"}, count=1)
    await r.r.xdel(r.key, entries[0][0])
    src, engine = r.source(), Engine()
    await run(src, engine.emit, until=lambda: len(engine.records) == 1)
    await src.close()
    assert engine.ns() == [1]
    assert "deleted before it was processed" in caplog.text
    assert (await r.r.xpending(r.key, "hub"))["pending"] == 0


async def test_redis_record_and_id_from_fields(redis_stream):
    r = redis_stream
    await r.r.xadd(r.key, {"data": '{"n": 1}', "idempotency_key": "evt_1.queue"})
    plain = await r.r.xadd(r.key, {"n": "2", "kind": "order"})
    src, engine = r.source(), Engine()
    await run(src, engine.emit, until=lambda: len(engine.records) == 2)
    await src.close()
    assert engine.records["evt_1.queue"] == {"n": 1}
    assert engine.records[f"{r.key}:{plain.decode()}"] == {"n": "2", "kind": "order"}


async def test_redis_client_kill_is_followed_by_a_reconnect(redis_stream):
    r = redis_stream
    src, engine = r.source(), Engine()
    hub = SimpleNamespace(ingest_batch=lambda flow, batch: engine.emit(batch))
    task = asyncio.create_task(consume(hub, SimpleNamespace(spec=SimpleNamespace(name="orders")), src))  # type: ignore[arg-type]
    try:
        await r.publish(range(3))
        await eventually(_holds(lambda: len(engine.records) == 3), what="first entries")
        ours = [c for c in await r.r.client_list() if c["name"] == f"pbsrc-{r.uid}"]
        assert ours
        for c in ours:  # CLIENT KILL ID: only ours, not the other tests' connections on this server
            await r.r.execute_command("CLIENT", "KILL", "ID", c["id"])
        await r.publish(range(3, 6))
        await eventually(_holds(lambda: len(engine.records) == 6), what="entries after the kill")
        assert src.connections >= 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.close()
