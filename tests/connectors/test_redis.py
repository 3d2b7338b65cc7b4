"""redis destination against the local server: streams, Pub/Sub, refusals, killed connections, the hub."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.redis import RedisSink, RedisSinkConfig, RedisSystem
from patchbay.errors import RecordInvalid
from tests.conftest import eventually, require_service
from tests.connectors import TcpProxy, broker_project, count_tls_builds, tls_server_context
from tests.connectors.brokers import entries

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


async def test_rediss_trusts_the_ca_bundle_and_builds_its_context_once(r, stream_key, tmp_path, monkeypatch):
    server_tls, cert = tls_server_context(tmp_path, "localhost")
    proxy = await TcpProxy(HOST, PORT, tls=server_tls).start()  # TLS in front of the local server
    built = count_tls_builds(monkeypatch)
    url = f"rediss://localhost:{proxy.port}/0"
    sinks = [sink({"url": url, "ca_bundle": str(cert)}, stream=stream_key) for _ in range(2)]
    untrusted = sink({"url": url}, stream=stream_key)  # the system's CAs do not know the test's CA
    try:
        for i, s in enumerate(sinks):  # two sinks of one system: two clients, two connections
            outcome = await s.send(s.render({}, f"k{i}"), f"k{i}")
            assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert [e["idempotency_key"] for e in await entries(r, stream_key)] == ["k0", "k1"]
        assert proxy.accepted == 2
        assert len(built) == 1  # one context for the system, not one per connection
        outcome = await untrusted.send(untrusted.render({}, "k2"), "k2")
        assert outcome.cls is OutcomeClass.TRANSIENT and "certificate" in outcome.error.lower(), outcome
    finally:
        for s in [*sinks, untrusted]:
            await s.close()
        await proxy.stop()


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
