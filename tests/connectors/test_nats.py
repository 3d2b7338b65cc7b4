"""nats destination against the local server (with JetStream): acks, dedupe, refusals, faults, the hub."""

from __future__ import annotations

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
from patchbay.connectors.nats import NatsSink, NatsSinkConfig, NatsSystem
from patchbay.errors import RecordInvalid
from tests.conftest import eventually, require_service
from tests.connectors import broker_project, closed_port
from tests.connectors.brokers import stored

nats = pytest.importorskip("nats")

HOST, PORT = "127.0.0.1", 4222
URL = f"nats://{HOST}:{PORT}"


@pytest.fixture(autouse=True)
def _server() -> None:
    require_service("NATS", HOST, PORT)


@pytest.fixture
async def nc() -> AsyncIterator[Any]:
    client = await nats.connect(URL)
    yield client
    await client.close()


@pytest.fixture
async def stream(nc) -> AsyncIterator[tuple[str, str]]:
    """A throw-away stream capturing pbtest.<id>.> : (stream name, subject prefix)."""
    uid = uuid.uuid4().hex[:10]
    name, prefix = f"PBTEST_{uid}", f"pbtest.{uid}"
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{prefix}.>"])
    yield name, prefix
    await js.delete_stream(name)


def sink(
    system: dict[str, Any] | None = None,
    secrets: dict[str, str] | None = None,
    timeout_s: float = 3.0,
    **dest: Any,
) -> NatsSink:
    secrets = secrets or {}
    return NatsSink(
        NatsSystem.model_validate({"servers": [URL], **(system or {})}),
        NatsSinkConfig.model_validate(dest),
        DeliveryPolicy.model_validate({"timeout_s": timeout_s}),
        Resources(secret=lambda ref: secrets[ref.secret], allow_private=True),  # a loopback server
    )


async def test_jetstream_publish_is_acked_and_carries_the_key(nc, stream):
    name, prefix = stream
    s = sink(subject=prefix + ".orders.{{ region }}", stream=name, headers={"X-Region": "{{ region }}"})
    try:
        record = {"id": 1, "region": "eu"}
        req = s.render(record, "evt_1.bus")
        assert req == {
            "subject": f"{prefix}.orders.eu",
            "headers": {"X-Region": "eu"},
            "body": orjson.dumps(record).decode(),
        }
        outcome = await s.send(req, "evt_1.bus")
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert f"stored in stream {name} as #1" == outcome.excerpt
        [msg] = await stored(nc, name)
        assert msg.subject == f"{prefix}.orders.eu"
        assert orjson.loads(msg.data) == record
        assert msg.headers["Nats-Msg-Id"] == "evt_1.bus"
        assert msg.headers["Idempotency-Key"] == "evt_1.bus"
        assert msg.headers["X-Region"] == "eu"
    finally:
        await s.close()


async def test_jetstream_drops_a_republished_key(nc, stream):
    name, prefix = stream
    s = sink(subject=f"{prefix}.x")
    try:
        first = await s.send(s.render({"n": 1}, "evt_1.bus"), "evt_1.bus")
        again = await s.send(s.render({"n": 1}, "evt_1.bus"), "evt_1.bus")
        assert first.cls is again.cls is OutcomeClass.SUCCESS
        assert "duplicate" in again.excerpt
        assert len(await stored(nc, name)) == 1
    finally:
        await s.close()


async def test_core_publish_reaches_subscribers(nc):
    subject = f"pbcore.{uuid.uuid4().hex[:8]}"
    sub = await nc.subscribe(subject)
    await nc.flush()
    s = sink(subject=subject, jetstream=False, body={"order": "id"})
    try:
        outcome = await s.send(s.render({"id": 5}, "evt_5.bus"), "evt_5.bus")
        assert outcome.cls is OutcomeClass.SUCCESS and outcome.excerpt == "flushed to the server"
        msg = await sub.next_msg(timeout=2)
        assert orjson.loads(msg.data) == {"order": 5}
        assert msg.headers["Nats-Msg-Id"] == msg.headers["Idempotency-Key"] == "evt_5.bus"
    finally:
        await s.close()
        await sub.unsubscribe()


async def test_no_stream_for_the_subject_is_terminal_and_the_connection_stays(stream):
    name, prefix = stream
    s = sink(subject="{{ subject }}")
    try:
        outcome = await s.send(s.render({"subject": f"nowhere.{uuid.uuid4().hex}"}, "k1"), "k1")
        assert outcome.cls is OutcomeClass.TERMINAL and "no JetStream stream captures" in outcome.error
        ok = await s.send(s.render({"subject": f"{prefix}.ok"}, "k2"), "k2")
        assert ok.cls is OutcomeClass.SUCCESS, ok
        assert s._conn.opened == 1
    finally:
        await s.close()


async def test_captured_by_another_stream_is_terminal(stream):
    _, prefix = stream
    s = sink(subject=f"{prefix}.x", stream="SOME_OTHER_STREAM")
    try:
        outcome = await s.send(s.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.TERMINAL and "expected stream does not match" in outcome.error
    finally:
        await s.close()


# ------------------------------------------------------------------ a private server with users
@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/bin")
    if binary is None:
        pytest.skip("nats-server is not installed")
    port = closed_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        "authorization {\n  users = [\n"
        '    {user: admin, password: "admin"}\n'
        '    {user: pb, password: "right", permissions: {publish: {allow: ["allowed.>", "_INBOX.>"]}, '
        'subscribe: {allow: ["_INBOX.>"]}}}\n  ]\n}\n'
    )
    proc = subprocess.Popen(
        [binary, "-a", HOST, "-p", str(port), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                require_service("nats-server (private)", HOST, port)
                break
            except BaseException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_wrong_password_is_auth(private_server):
    s = sink(
        {"servers": [f"nats://{HOST}:{private_server}"], "user": "pb", "password": {"secret": "n"}},
        secrets={"n": "wrong"},
        subject="allowed.x",
        jetstream=False,
    )
    try:
        outcome = await s.send(s.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.AUTH and "Authorization Violation" in outcome.error
    finally:
        await s.close()


async def test_publish_permission_violation_is_auth(private_server):
    system = {"servers": [f"nats://{HOST}:{private_server}"], "user": "pb", "password": {"secret": "n"}}
    s = sink(system, secrets={"n": "right"}, subject="{{ s }}", jetstream=False)
    try:
        ok = await s.send(s.render({"s": "allowed.x"}, "k1"), "k1")
        assert ok.cls is OutcomeClass.SUCCESS, ok
        denied = await s.send(s.render({"s": "denied.x"}, "k2"), "k2")
        assert denied.cls is OutcomeClass.AUTH and "permissions violation" in denied.error
    finally:
        await s.close()


async def test_jetstream_publish_permission_violation_is_auth(private_server):
    admin = await nats.connect(f"nats://admin:admin@{HOST}:{private_server}")
    try:
        await admin.jetstream().add_stream(name="ORDERS", subjects=["allowed.>", "denied.>"])
    finally:
        await admin.close()
    system = {"servers": [f"nats://{HOST}:{private_server}"], "user": "pb", "password": {"secret": "n"}}
    s = sink(system, secrets={"n": "right"}, subject="{{ s }}", timeout_s=1)
    try:
        ok = await s.send(s.render({"s": "allowed.x"}, "k1"), "k1")
        assert ok.cls is OutcomeClass.SUCCESS, ok
        denied = await s.send(s.render({"s": "denied.x"}, "k2"), "k2")  # never answered: the -ERR tells why
        assert denied.cls is OutcomeClass.AUTH and "permissions violation" in denied.error
    finally:
        await s.close()


# ------------------------------------------------------------------ config and render
def test_config_refuses_wildcards_and_inline_credentials():
    with pytest.raises(ValidationError, match="wildcard"):
        NatsSinkConfig.model_validate({"subject": "orders.>"})
    with pytest.raises(ValidationError, match="holds credentials"):
        NatsSystem.model_validate({"servers": ["nats://u:p@host:4222"]})
    with pytest.raises(ValidationError, match="needs jetstream: true"):
        NatsSinkConfig.model_validate({"subject": "a", "jetstream": False, "stream": "S"})


def test_render_refuses_a_subject_that_is_not_concrete():
    s = sink(subject="orders.{{ region }}")
    with pytest.raises(RecordInvalid, match="empty token"):
        s.render({}, "k")
    with pytest.raises(RecordInvalid, match="white space"):
        s.render({"region": "north east"}, "k")


# ------------------------------------------------------------------ through the hub
async def test_end_to_end_webhook_to_jetstream(tmp_path, start_hub, nc, stream):
    name, prefix = stream
    root = broker_project(
        tmp_path,
        {"kind": "nats", "servers": [URL]},
        {"subject": prefix + ".orders.{{ region }}", "stream": name},
    )
    hub = await start_hub(root)
    ids = []
    for i in range(3):
        status, body = await hub.post(
            "/hooks/orders", {"id": i, "customer": {"email": f"B{i}@Example.com"}, "region": "us"}
        )
        assert status in (200, 202), body
        ids.append(body["event_id"])

    async def delivered() -> bool:
        return [(await hub.run(eid))["status"] for eid in ids] == ["delivered"] * 3

    await eventually(delivered, what="runs delivered")
    msgs = sorted(await stored(nc, name), key=lambda m: orjson.loads(m.data)["order_id"])
    assert [orjson.loads(m.data) for m in msgs] == [  # deliveries run concurrently: any order
        {"order_id": i, "email": f"b{i}@example.com", "region": "us"} for i in range(3)
    ]
    assert [m.headers["Nats-Msg-Id"] for m in msgs] == [f"{eid}.queue" for eid in ids]
    assert {m.subject for m in msgs} == {f"{prefix}.orders.us"}
