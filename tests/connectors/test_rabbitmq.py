"""rabbitmq destination against the local broker: confirms, returns, nacks, lost connections, the hub."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.rabbitmq import RabbitMQSink, RabbitMQSinkConfig, RabbitMQSystem
from patchbay.errors import RecordInvalid
from tests.conftest import eventually, require_service
from tests.connectors import broker_project, declared_secrets
from tests.connectors.brokers import drain, new_queue

aio_pika = pytest.importorskip("aio_pika")

HOST, PORT = "127.0.0.1", 5672


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_service("RabbitMQ", HOST, PORT)


@pytest.fixture
async def amqp() -> AsyncIterator[Any]:
    """The test's own channel, to declare queues and read messages back."""
    conn = await aio_pika.connect(host=HOST, port=PORT)
    channel = await conn.channel()
    yield channel
    await conn.close()


def sink(
    system: dict[str, Any] | None = None,
    secrets: dict[str, str] | None = None,
    timeout_s: float = 3.0,
    **dest: Any,
) -> RabbitMQSink:
    secrets = secrets or {}
    return RabbitMQSink(
        RabbitMQSystem.model_validate({"host": HOST, "port": PORT, **(system or {})}),
        RabbitMQSinkConfig.model_validate(dest),
        DeliveryPolicy.model_validate({"timeout_s": timeout_s}),
        Resources(secret=lambda ref: secrets[ref.secret], allow_private=True),  # a loopback broker
    )


async def test_publishes_confirmed_messages_with_the_idempotency_key(amqp):
    queue = await new_queue(amqp)
    s = sink(routing_key=queue.name, headers={"X-Region": "{{ region }}"})
    try:
        record = {"id": 7, "region": "eu", "email": "a@example.com"}
        req = s.render(record, "evt_1.mq")
        assert req == {
            "exchange": "",
            "routing_key": queue.name,
            "headers": {"X-Region": "eu"},
            "body": orjson.dumps(record).decode(),
        }
        outcome = await s.send(req, "evt_1.mq")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert "confirmed" in outcome.excerpt
        [msg] = await drain(queue, 1)
        assert orjson.loads(msg.body) == record
        assert msg.message_id == "evt_1.mq"
        assert msg.headers["Idempotency-Key"] == "evt_1.mq"
        assert msg.headers["X-Region"] == "eu"
        assert msg.content_type == "application/json"
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.app_id == "patchbay"
    finally:
        await s.close()


async def test_routing_key_template_routes_through_a_topic_exchange(amqp):
    exchange = await amqp.declare_exchange(f"pb-test-{uuid.uuid4().hex[:8]}", "topic", auto_delete=True)
    eu, us = await new_queue(amqp), await new_queue(amqp)
    await eu.bind(exchange, "orders.eu")
    await us.bind(exchange, "orders.us")
    s = sink(
        exchange=exchange.name,
        routing_key="orders.{{ lower(region) }}",
        body={"order_id": "id"},
        persistent=False,
    )
    try:
        for i, region in enumerate(["EU", "US", "EU"]):
            key = f"evt_{i}.mq"
            outcome = await s.send(s.render({"id": i, "region": region}, key), key)
            assert outcome.cls is OutcomeClass.SUCCESS, outcome
        got_eu, got_us = await drain(eu, 2), await drain(us, 1)
        assert [orjson.loads(m.body) for m in got_eu] == [{"order_id": 0}, {"order_id": 2}]
        assert [m.message_id for m in got_us] == ["evt_1.mq"]
        assert got_us[0].delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
        assert s._conn.opened == 1  # one connection for every send
    finally:
        await s.close()


async def test_concurrent_sends_share_one_connection(amqp):
    queue = await new_queue(amqp)
    s = sink(routing_key=queue.name)
    try:
        keys = [f"evt_{i}.mq" for i in range(50)]
        outcomes = await asyncio.gather(*(s.send(s.render({"n": i}, k), k) for i, k in enumerate(keys)))
        assert {o.cls for o in outcomes} == {OutcomeClass.SUCCESS}
        assert s._conn.opened == 1
        got = await drain(queue, 50)
        assert sorted(m.message_id for m in got) == sorted(keys)
    finally:
        await s.close()


async def test_unroutable_message_is_terminal_and_the_connection_stays(amqp):
    queue = await new_queue(amqp)
    s = sink(exchange="amq.direct", routing_key="{{ target }}")
    try:
        outcome = await s.send(s.render({"target": f"nobody-{uuid.uuid4().hex}"}, "k1"), "k1")
        assert outcome.cls is OutcomeClass.TERMINAL
        assert "unroutable" in outcome.error and "NO_ROUTE" in outcome.error
        await queue.bind("amq.direct", queue.name)
        outcome = await s.send(s.render({"target": queue.name}, "k2"), "k2")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert s._conn.opened == 1
        assert [m.message_id for m in await drain(queue, 1)] == ["k2"]
    finally:
        await s.close()


async def test_unroutable_without_mandatory_is_dropped_by_the_broker():
    s = sink(exchange="amq.direct", routing_key=f"nobody-{uuid.uuid4().hex}", mandatory=False)
    try:
        assert (await s.send(s.render({}, "k"), "k")).cls is OutcomeClass.SUCCESS
    finally:
        await s.close()


async def test_nack_from_a_full_queue_is_transient(amqp):
    queue = await new_queue(amqp, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    s = sink(routing_key=queue.name)
    try:
        first = await s.send(s.render({"n": 1}, "k1"), "k1")
        second = await s.send(s.render({"n": 2}, "k2"), "k2")
        assert first.cls is OutcomeClass.SUCCESS, first
        assert second.cls is OutcomeClass.TRANSIENT and "nack" in second.error
        await drain(queue, 1)  # the consumer catches up: the retry goes through
        assert (await s.send(s.render({"n": 2}, "k2"), "k2")).cls is OutcomeClass.SUCCESS
    finally:
        await s.close()


async def test_missing_exchange_is_terminal_and_the_next_send_reconnects(amqp):
    queue = await new_queue(amqp)
    bad = sink(exchange=f"missing-{uuid.uuid4().hex[:8]}", routing_key="x")
    try:
        outcome = await bad.send(bad.render({}, "k1"), "k1")
        assert outcome.cls is OutcomeClass.TERMINAL
        assert "no exchange" in outcome.error
        bad.config.exchange = ""  # stored requests name their exchange; this one names the default
        ok = await bad.send({"exchange": "", "routing_key": queue.name, "body": "{}"}, "k2")
        assert ok.cls is OutcomeClass.SUCCESS, ok
    finally:
        await bad.close()


async def test_wrong_password_is_auth():
    s = sink(
        {"username": "guest", "password": {"secret": "mq"}},
        secrets={"mq": "not-the-password"},
        routing_key="q",
    )
    try:
        outcome = await s.send(s.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.AUTH
        assert "login refused" in outcome.error
        assert declared_secrets(s.system) == ["secret:mq"]
    finally:
        await s.close()


async def test_unknown_vhost_is_auth():
    s = sink({"vhost": f"nope-{uuid.uuid4().hex[:6]}"}, routing_key="q")
    try:
        outcome = await s.send(s.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.AUTH
        assert "virtual host" in outcome.error
    finally:
        await s.close()


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed")
async def test_connection_closed_by_the_broker_is_followed_by_a_reconnect(amqp):
    queue = await new_queue(amqp)
    name = f"patchbay-test-{uuid.uuid4().hex[:8]}"
    s = sink(routing_key=queue.name)
    s_open = s._open

    async def named_open() -> Any:  # give our connection a name rabbitmqctl can find
        conn = await s.aio_pika.connect(host=HOST, port=PORT, client_properties={"connection_name": name})
        from patchbay.connectors.rabbitmq import _Amqp

        return _Amqp(conn, await conn.channel(publisher_confirms=True, on_return_raises=True))

    s._conn._open = named_open
    try:
        assert (await s.send(s.render({}, "k1"), "k1")).cls is OutcomeClass.SUCCESS
        listed = await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if listed.returncode != 0:
            pytest.skip(f"rabbitmqctl cannot reach the broker: {listed.stderr.strip()[:200]}")
        pids = [line.split("\t")[0] for line in listed.stdout.splitlines() if name in line]
        assert len(pids) == 1
        closed = await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "close_connection", pids[0], "test: broker restart"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert closed.returncode == 0, closed.stderr
        await eventually(lambda: _closed(s), timeout=5, what="connection closed")
        outcome = await s.send(s.render({}, "k2"), "k2")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert s._conn.opened == 2
        assert [m.message_id for m in await drain(queue, 2)] == ["k1", "k2"]
    finally:
        s._conn._open = s_open
        await s.close()


async def _closed(s: RabbitMQSink) -> bool:
    cur = s._conn.current
    return cur is None or not cur.is_open


def test_render_refuses_a_routing_key_over_255_bytes():
    s = sink(routing_key="{{ k }}")
    with pytest.raises(RecordInvalid, match="longer than 255 bytes"):
        s.render({"k": "x" * 256}, "k")


# ------------------------------------------------------------------ through the hub
async def test_end_to_end_webhook_to_queue(tmp_path, start_hub, amqp):
    queue = await new_queue(amqp)
    root = broker_project(
        tmp_path,
        {"kind": "rabbitmq", "host": HOST, "port": PORT},
        {"routing_key": queue.name, "headers": {"X-Region": "{{ region }}"}},
    )
    hub = await start_hub(root)
    ids = []
    for i in range(3):
        status, body = await hub.post(
            "/hooks/orders", {"id": i, "customer": {"email": f"A{i}@Example.com"}, "region": "eu"}
        )
        assert status in (200, 202), body
        ids.append(body["event_id"])

    got = sorted(await drain(queue, 3, timeout=10), key=lambda m: orjson.loads(m.body)["order_id"])
    assert [orjson.loads(m.body) for m in got] == [  # deliveries run concurrently: any order
        {"order_id": i, "email": f"a{i}@example.com", "region": "eu"} for i in range(3)
    ]
    assert [m.message_id for m in got] == [f"{eid}.queue" for eid in ids]
    assert all(m.headers["Idempotency-Key"] == m.message_id and m.headers["X-Region"] == "eu" for m in got)

    async def delivered() -> bool:
        return [(await hub.run(eid))["status"] for eid in ids] == ["delivered"] * len(ids)

    await eventually(delivered, what="runs delivered")


async def test_end_to_end_unroutable_is_dead_lettered(tmp_path, start_hub):
    root = broker_project(
        tmp_path,
        {"kind": "rabbitmq", "host": HOST, "port": PORT},
        {"exchange": "amq.direct", "routing_key": f"nobody-{uuid.uuid4().hex}"},
    )
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/orders", {"id": 1, "customer": {"email": "a@example.com"}})

    async def dead() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "dead"

    await eventually(dead, what="dead letter")
    [d] = (await hub.run(body["event_id"]))["deliveries"]
    assert d["attempts"] == 1 and "unroutable" in d["last_error"]
