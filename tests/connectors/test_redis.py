"""redis destination against the local server: streams, Pub/Sub, refusals, killed connections, the hub."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Outcome, OutcomeClass, Resources
from patchbay.connectors.redis import RedisSink, RedisSinkConfig, RedisSystem
from patchbay.errors import ConfigError, RecordInvalid
from tests.conftest import eventually, require_service
from tests.connectors import TcpProxy, broker_project, closed_port

aioredis = pytest.importorskip("redis.asyncio")

HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"


@pytest.fixture(autouse=True)
def _server() -> None:
    require_service("Redis", HOST, PORT)


@pytest.fixture
async def r() -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def stream_key(r) -> AsyncIterator[str]:
    key = f"pbtest:{uuid.uuid4().hex[:10]}"
    yield key
    await r.delete(key)


def sink(
    system: dict[str, Any] | None = None,
    secrets: dict[str, str] | None = None,
    timeout_s: float = 3.0,
    **dest: Any,
) -> RedisSink:
    secrets = secrets or {}
    return RedisSink(
        RedisSystem.model_validate({"url": URL, **(system or {})}),
        RedisSinkConfig.model_validate(dest),
        DeliveryPolicy.model_validate({"timeout_s": timeout_s}),
        Resources(secret=lambda ref: secrets[ref.secret], allow_private=True),  # a loopback server
    )


async def entries(r: Any, key: str) -> list[dict[str, str]]:
    return [fields for _, fields in await r.xrange(key)]


async def test_xadd_stores_data_and_the_idempotency_key(r, stream_key):
    s = sink(stream=stream_key + ":{{ region }}", fields={"type": "order.{{ status }}"})
    try:
        record = {"id": 1, "region": "eu", "status": "paid"}
        req = s.render(record, "evt_1.queue")
        assert req == {
            "stream": f"{stream_key}:eu",
            "fields": {"type": "order.paid"},
            "body": orjson.dumps(record).decode(),
        }
        outcome = await s.send(req, "evt_1.queue")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert outcome.excerpt.startswith(f"added to stream '{stream_key}:eu' as ")
        [entry] = await entries(r, f"{stream_key}:eu")
        assert orjson.loads(entry["data"]) == record
        assert entry["idempotency_key"] == "evt_1.queue"
        assert entry["type"] == "order.paid"
    finally:
        await s.close()
        await r.delete(f"{stream_key}:eu")


async def test_maxlen_trims_the_stream_approximately(r, stream_key):
    s = sink(stream=stream_key, maxlen=10)
    try:
        outcomes = await asyncio.gather(*(s.send(s.render({"n": i}, f"k{i}"), f"k{i}") for i in range(300)))
        assert {o.cls for o in outcomes} == {OutcomeClass.SUCCESS}
        assert 10 <= await r.xlen(stream_key) < 300
    finally:
        await s.close()


async def test_publish_mode_carries_the_key_in_the_body(r):
    channel = f"pbtest:{uuid.uuid4().hex[:8]}"
    pubsub = r.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    s = sink(mode="publish", channel=channel, key_field="meta.idempotency_key", body={"order": "id"})
    try:
        outcome = await s.send(s.render({"id": 3}, "evt_3.queue"), "evt_3.queue")
        assert outcome.cls is OutcomeClass.SUCCESS and "to 1 subscriber(s)" in outcome.excerpt
        msg = await pubsub.get_message(timeout=2)
        assert orjson.loads(msg["data"]) == {"order": 3, "meta": {"idempotency_key": "evt_3.queue"}}
    finally:
        await s.close()
        await pubsub.unsubscribe(channel)
        await pubsub.aclose()


def test_key_field_needs_an_object_body_and_leaves_the_record_alone():
    s = sink(mode="publish", channel="c", key_field="key", body="id")
    with pytest.raises(RecordInvalid, match="not an object"):
        s.render({"id": 3}, "k")
    record = {"id": 3}
    assert orjson.loads(sink(mode="publish", channel="c", key_field="key").render(record, "k")["body"]) == {
        "id": 3,
        "key": "k",
    }
    assert record == {"id": 3}  # other destinations of the flow render the same record


async def test_a_key_of_another_type_is_terminal(r, stream_key):
    await r.set(stream_key, "not a stream")
    s = sink(stream=stream_key)
    try:
        outcome = await s.send(s.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.TERMINAL and "not a stream" in outcome.error
    finally:
        await s.close()


async def test_wrong_credentials_are_auth(stream_key):
    s = sink(
        {"url": f"redis://nobody-{uuid.uuid4().hex[:6]}@{HOST}:{PORT}/0", "password": {"secret": "rp"}},
        secrets={"rp": "wrong"},
        stream=stream_key,
    )
    try:
        outcome = await s.send(s.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.AUTH, outcome
        assert "wrong" not in outcome.error.replace("WRONGPASS", "")
    finally:
        await s.close()


async def test_connection_refused_is_transient(stream_key):
    s = sink({"url": f"redis://127.0.0.1:{closed_port()}/0"}, stream=stream_key)
    try:
        outcome = await s.send(s.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.TRANSIENT and "connection failed" in outcome.error
    finally:
        await s.close()


async def test_a_server_that_stops_answering_times_out_as_transient(r, stream_key):
    proxy = await TcpProxy(HOST, PORT).start()
    s = sink({"url": f"redis://127.0.0.1:{proxy.port}/0"}, stream=stream_key, timeout_s=0.5)
    try:
        assert (await s.send(s.render({}, "k0"), "k0")).cls is OutcomeClass.SUCCESS
        proxy.blackhole = True
        outcome = await s.send(s.render({}, "k1"), "k1")
        assert outcome.cls is OutcomeClass.TRANSIENT and "timed out" in outcome.error
        proxy.blackhole = False
        outcome = await s.send(s.render({}, "k1"), "k1")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert [e["idempotency_key"] for e in await entries(r, stream_key)] == ["k0", "k1"]
    finally:
        await s.close()
        await proxy.stop()


async def test_client_kill_is_followed_by_a_reconnect(r, stream_key):
    name = f"pbtest-{uuid.uuid4().hex[:8]}"
    s = sink({"client_name": name}, stream=stream_key)
    try:
        assert (await s.send(s.render({"n": 1}, "k1"), "k1")).cls is OutcomeClass.SUCCESS
        ours = [c for c in await r.client_list() if c["name"] == name]
        assert ours
        for c in ours:  # CLIENT KILL ID: only our connections, not the other tests' on this server
            await r.execute_command("CLIENT", "KILL", "ID", c["id"])
        outcome = await s.send(s.render({"n": 2}, "k2"), "k2")
        assert outcome.cls in (OutcomeClass.SUCCESS, OutcomeClass.TRANSIENT), outcome
        if outcome.cls is OutcomeClass.TRANSIENT:
            assert (await s.send(s.render({"n": 2}, "k2"), "k2")).cls is OutcomeClass.SUCCESS
        assert (await s.send(s.render({"n": 3}, "k3"), "k3")).cls is OutcomeClass.SUCCESS
        assert [e["idempotency_key"] for e in await entries(r, stream_key)] == ["k1", "k2", "k3"]
    finally:
        await s.close()


async def test_connection_cut_mid_run_loses_nothing_and_keeps_the_key_on_every_copy(r, stream_key):
    """The server drops the client with XADDs in flight: added, but their replies lost. Each send is
    delivered or transient: redis-py resends a command whose connection broke once, on a new connection
    (the sink's one immediate retry), and the engine retries what still fails with the same request and
    key. Redis cannot drop a repeated XADD, so this is at least once, as the connector promises: the
    stream holds a second entry for each in-flight key, with the same idempotency_key, for consumers
    to drop."""
    proxy = await TcpProxy(HOST, PORT).start()
    s = sink({"url": f"redis://127.0.0.1:{proxy.port}/0"}, stream=stream_key, timeout_s=10)
    pool_size = s.policy.max_concurrency  # one connection per concurrent send
    attempts: Counter[str] = Counter()

    async def send(key: str) -> Outcome:
        attempts[key] += 1
        return await s.send(s.render({"key": key}, key), key)

    try:
        # As many sends at once as the pool holds connections: each opens one, and all stay in the pool.
        acked = [f"evt_{i}.queue" for i in range(pool_size)]
        assert {o.cls for o in await asyncio.gather(*map(send, acked))} == {OutcomeClass.SUCCESS}

        in_flight = [f"evt_{i}.queue" for i in range(pool_size, 2 * pool_size)]
        # The commands reach the server, the replies do not come back: one send on each pooled connection.
        assert proxy.hold_replies() == pool_size
        sending = [asyncio.create_task(send(k)) for k in in_flight]

        async def all_added() -> bool:
            return await r.xlen(stream_key) == len(acked) + len(in_flight)

        await eventually(all_added, timeout=5, what="the in-flight entries added")
        assert not any(t.done() for t in sending)  # mid-run: every one still waits for its reply
        assert proxy.cut() == pool_size
        nxt = await send("evt_next.queue")
        outcomes = dict(zip(in_flight, await asyncio.gather(*sending), strict=True))
        outcomes["evt_next.queue"] = nxt
        assert {o.cls for o in outcomes.values()} <= {OutcomeClass.SUCCESS, OutcomeClass.TRANSIENT}, outcomes

        # The delivery worker retries each transient outcome with the same request and key.
        retry = [k for k, o in outcomes.items() if o.cls is OutcomeClass.TRANSIENT]
        again = dict(zip(retry, await asyncio.gather(*map(send, retry)), strict=True))
        assert {o.cls for o in again.values()} <= {OutcomeClass.SUCCESS}, again

        stored = await entries(r, stream_key)
        for e in stored:  # every copy is the same request under the same key
            assert orjson.loads(e["data"]) == {"key": e["idempotency_key"]}
        copies = Counter(e["idempotency_key"] for e in stored)
        assert set(copies) == set(attempts)  # every key
        assert all(copies[k] == 1 for k in acked)
        # Added before the cut, and again by the attempt that succeeded; an attempt writes at most twice
        # (its immediate resend on a new connection).
        assert all(2 <= copies[k] <= 2 * attempts[k] for k in in_flight), (copies, attempts)
        assert 1 <= copies["evt_next.queue"] <= 2 * attempts["evt_next.queue"], (copies, attempts)
    finally:
        await s.close()
        await proxy.stop()


# ------------------------------------------------------------------ config
def test_config_is_checked():
    with pytest.raises(ValidationError, match="needs `stream: KEY`"):
        RedisSinkConfig.model_validate({})
    with pytest.raises(ValidationError, match="needs `channel: NAME`"):
        RedisSinkConfig.model_validate({"mode": "publish"})
    with pytest.raises(ValidationError, match="for mode stream"):
        RedisSinkConfig.model_validate({"mode": "publish", "channel": "c", "maxlen": 5})
    with pytest.raises(ValidationError, match="set by Patchbay itself"):
        RedisSinkConfig.model_validate({"stream": "s", "fields": {"data": "x"}})
    with pytest.raises(ValidationError, match="holds a password"):
        RedisSystem.model_validate({"url": "redis://:hunter2@host:6379/0"})
    with pytest.raises(ValidationError, match="unclosed placeholder"):
        RedisSinkConfig.model_validate({"stream": "orders:{{ region"})


def test_missing_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigError, match=r"pip install 'patchbay\[redis\]'"):
        sink(stream="s")


# ------------------------------------------------------------------ through the hub
async def test_end_to_end_webhook_to_stream(tmp_path, start_hub, r, stream_key):
    root = broker_project(tmp_path, {"kind": "redis", "url": URL}, {"stream": stream_key, "maxlen": 1000})
    hub = await start_hub(root)
    ids = []
    for i in range(3):
        status, body = await hub.post(
            "/hooks/orders", {"id": i, "customer": {"email": f"C{i}@Example.com"}, "region": "eu"}
        )
        assert status in (200, 202), body
        ids.append(body["event_id"])

    async def delivered() -> bool:
        return [(await hub.run(eid))["status"] for eid in ids] == ["delivered"] * 3

    await eventually(delivered, what="runs delivered")
    got = sorted(await entries(r, stream_key), key=lambda e: orjson.loads(e["data"])["order_id"])
    assert [orjson.loads(e["data"]) for e in got] == [  # deliveries run concurrently: any order
        {"order_id": i, "email": f"c{i}@example.com", "region": "eu"} for i in range(3)
    ]
    assert [e["idempotency_key"] for e in got] == [f"{eid}.queue" for eid in ids]
