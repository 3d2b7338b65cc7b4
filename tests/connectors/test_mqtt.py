"""mqtt destination against the local Mosquitto: PUBACKs, user properties, refusals, faults, the hub."""

from __future__ import annotations

import asyncio
import getpass
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.mqtt import MqttSink, MqttSinkConfig, MqttSystem
from patchbay.errors import RecordInvalid
from tests.conftest import eventually, require_service
from tests.connectors import broker_project, closed_port
from tests.connectors.brokers import Subscriber, user_properties

mqtt = pytest.importorskip("paho.mqtt.client")

HOST, PORT = "127.0.0.1", 1883


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_service("Mosquitto", HOST, PORT)


@pytest.fixture
def topic() -> str:
    return f"pbtest/{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def sub(topic: str) -> AsyncIterator[Subscriber]:
    s = await asyncio.to_thread(Subscriber, topic + "/#")
    yield s
    await asyncio.to_thread(s.close)


def sink(
    system: dict[str, Any] | None = None,
    secrets: dict[str, str] | None = None,
    timeout_s: float = 3.0,
    **dest: Any,
) -> MqttSink:
    secrets = secrets or {}
    return MqttSink(
        MqttSystem.model_validate({"host": HOST, "port": PORT, **(system or {})}),
        MqttSinkConfig.model_validate(dest),
        DeliveryPolicy.model_validate({"timeout_s": timeout_s}),
        Resources(secret=lambda ref: secrets[ref.secret], allow_private=True),  # a loopback broker
    )


async def test_qos1_publish_is_acked_and_carries_the_key(sub, topic):
    s = sink(topic=topic + "/{{ site }}/orders")
    try:
        record = {"id": 1, "site": "lyon"}
        req = s.render(record, "evt_1.bus")
        assert req == {"topic": f"{topic}/lyon/orders", "body": orjson.dumps(record).decode()}
        outcome = await s.send(req, "evt_1.bus")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert outcome.excerpt.startswith("acknowledged (PUBACK)")
        [msg] = await sub.get()
        assert msg.topic == f"{topic}/lyon/orders"
        assert orjson.loads(msg.payload) == record
        assert msg.qos == 1
        assert user_properties(msg) == {"Idempotency-Key": "evt_1.bus"}
        assert msg.properties.ContentType == "application/json"
    finally:
        await s.close()


@pytest.mark.parametrize("qos", [0, 2])
async def test_qos_0_and_2_are_delivered(sub, topic, qos):
    s = sink(topic=f"{topic}/q", qos=qos)
    try:
        outcome = await s.send(s.render({"qos": qos}, "k"), "k")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        [msg] = await sub.get()
        assert orjson.loads(msg.payload) == {"qos": qos} and msg.qos == qos
    finally:
        await s.close()


async def test_concurrent_sends_share_one_connection(sub, topic):
    s = sink(topic=f"{topic}/many")
    try:
        keys = [f"evt_{i}.bus" for i in range(60)]
        outcomes = await asyncio.gather(*(s.send(s.render({"n": i}, k), k) for i, k in enumerate(keys)))
        assert {o.cls for o in outcomes} == {OutcomeClass.SUCCESS}
        assert s._conn.opened == 1
        got = await sub.get(60)
        assert sorted(user_properties(m)["Idempotency-Key"] for m in got) == sorted(keys)
    finally:
        await s.close()


async def test_mqtt_311_carries_the_key_in_the_payload(topic):
    sub = await asyncio.to_thread(Subscriber, topic + "/#", v5=False)
    s = sink({"protocol": "3.1.1"}, topic=f"{topic}/v3", key_field="meta.key", body={"order": "id"})
    try:
        assert (await s.send(s.render({"id": 9}, "evt_9.bus"), "evt_9.bus")).cls is OutcomeClass.SUCCESS
        [msg] = await sub.get()
        assert orjson.loads(msg.payload) == {"order": 9, "meta": {"key": "evt_9.bus"}}
    finally:
        await s.close()
        await asyncio.to_thread(sub.close)


async def test_retained_message_reaches_a_later_subscriber(topic):
    s = sink(topic=f"{topic}/state", retain=True)
    try:
        assert (await s.send(s.render({"on": True}, "k"), "k")).cls is OutcomeClass.SUCCESS
        late = await asyncio.to_thread(Subscriber, f"{topic}/state")
        [msg] = await late.get()
        assert msg.retain and orjson.loads(msg.payload) == {"on": True}
        await asyncio.to_thread(late.close)
    finally:
        await s.close()
        await asyncio.to_thread(mqtt_clear_retained, f"{topic}/state")


def mqtt_clear_retained(topic: str) -> None:
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    c.connect(HOST, PORT)
    c.loop_start()
    c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


# ------------------------------------------------------------------ a private broker with a password file
@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    passwd = shutil.which("mosquitto_passwd")
    if binary is None or passwd is None:
        pytest.skip("mosquitto / mosquitto_passwd are not installed")
    port = closed_port()
    pw = tmp_path / "passwd"
    subprocess.run([passwd, "-c", "-b", str(pw), "pb", "right"], check=True, capture_output=True)
    conf = tmp_path / "mosquitto.conf"
    # `user`: a broker started as root would switch to `mosquitto`, which cannot read tmp_path.
    conf.write_text(
        f"listener {port} {HOST}\nallow_anonymous false\npassword_file {pw}\npersistence false\n"
        f"user {getpass.getuser()}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                require_service("mosquitto (private)", HOST, port)
                break
            except BaseException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_wrong_password_is_auth(private_broker, protocol):
    system = {"port": private_broker, "username": "pb", "password": {"secret": "m"}, "protocol": protocol}
    bad = sink(system, secrets={"m": "wrong"}, topic="t")
    good = sink(system, secrets={"m": "right"}, topic="t")
    try:
        outcome = await bad.send(bad.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.AUTH, outcome
        assert "wrong" not in outcome.error
        assert (await good.send(good.render({}, "k"), "k")).cls is OutcomeClass.SUCCESS
    finally:
        await bad.close()
        await good.close()


# ------------------------------------------------------------------ config and render
def test_config_refuses_wildcard_topics():
    with pytest.raises(ValidationError, match="wildcard"):
        MqttSinkConfig.model_validate({"topic": "orders/#"})
    with pytest.raises(ValidationError, match="Input should be 0, 1 or 2"):
        MqttSinkConfig.model_validate({"topic": "orders", "qos": 3})


def test_render_refuses_a_topic_that_is_not_concrete():
    s = sink(topic="devices/{{ id }}")
    with pytest.raises(RecordInvalid, match="wildcard"):
        s.render({"id": "+"}, "k")


# ------------------------------------------------------------------ through the hub
async def test_end_to_end_webhook_to_topic(tmp_path, start_hub, sub, topic):
    root = broker_project(
        tmp_path, {"kind": "mqtt", "host": HOST, "port": PORT}, {"topic": topic + "/orders/{{ region }}"}
    )
    hub = await start_hub(root)
    ids = []
    for i in range(3):
        status, body = await hub.post(
            "/hooks/orders", {"id": i, "customer": {"email": f"D{i}@Example.com"}, "region": "eu"}
        )
        assert status in (200, 202), body
        ids.append(body["event_id"])

    async def delivered() -> bool:
        return [(await hub.run(eid))["status"] for eid in ids] == ["delivered"] * 3

    await eventually(delivered, what="runs delivered")
    got = await sub.get(3)
    assert sorted((orjson.loads(m.payload)["order_id"], m.topic) for m in got) == [
        (i, f"{topic}/orders/eu") for i in range(3)
    ]
    assert sorted(user_properties(m)["Idempotency-Key"] for m in got) == sorted(f"{eid}.queue" for eid in ids)
