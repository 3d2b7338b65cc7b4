"""The outbound address guard on real sockets: what is checked is the address actually connected to."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import re
import socket
import ssl
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from patchbay.config.models import DeliveryPolicy, SystemCommon
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.http import HttpSink, HttpSinkConfig, HttpSystem
from patchbay.connectors.http_wire import WirePool
from patchbay.connectors.tls_client import machine_tls
from patchbay.errors import TerminalError, TransientError
from patchbay.security.ssrf import (
    AddressPolicy,
    BlockedAddress,
    HttpPools,
    blocked_reason,
    outbound_warnings,
    parse_host,
    resolve_allowed,
    tls_client_context,
)
from patchbay.store.queries import list_dead
from tests.conftest import _start, eventually, lead_project, require_service

BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("10.0.0.5", "private"),
    ("172.16.3.4", "private"),
    ("192.168.1.1", "private"),
    ("100.64.1.1", "CGNAT"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.10", "documentation"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%lo", "link-local"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
    ("fd00:ec2::254", "cloud metadata"),
    ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "loopback address (IPv4-mapped)"),
    ("::ffff:10.0.0.5", "private address (IPv4-mapped)"),
    ("::ffff:169.254.169.254", "cloud metadata address (IPv4-mapped)"),
    ("64:ff9b::7f00:1", "loopback address (NAT64)"),
    ("2002:a00:5::1", "private address (6to4)"),
    ("::7f00:1", "IPv4-compatible"),
]


@pytest.mark.parametrize(("address", "why"), BLOCKED, ids=[b[0] for b in BLOCKED])
def test_internal_addresses_are_blocked(address, why):
    reason = blocked_reason(address)
    assert reason is not None and why in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert blocked_reason(address) is None


def test_allow_networks_open_only_those_networks():
    policy = AddressPolicy(["10.20.0.0/16", "fd12::/16"])
    assert policy.reason("10.20.1.2") is None
    assert policy.reason("::ffff:10.20.1.2") is None
    assert policy.reason("fd12::5") is None
    assert policy.reason("10.21.0.1") == "private address"
    assert policy.reason("127.0.0.1") == "loopback address"


def test_allow_networks_is_validated():
    with pytest.raises(ValueError, match="bad CIDR '10.0.0.0/33'"):
        SystemCommon(owner="ops", allow_networks=["10.0.0.0/33"])


# ----------------------------------------------------------------------------- on real sockets
class FakeDns:
    """Answers from a table in place of the event loop's getaddrinfo (what `resolve_allowed` asks); a list
    of answers is served in turn (a rebinding name). Names not in the table are resolved for real."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeDns:
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo

        async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
            if host not in self.table:
                return await real(host, port, *args, **kwargs)
            self.calls += 1
            ips = self.table[host]
            if isinstance(ips, list) and ips and isinstance(ips[0], list):  # successive answers
                ips = ips.pop(0) if len(ips) > 1 else ips[0]
            ips = ips if isinstance(ips, list) else [ips]
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
                if ":" in ip
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in ips
            ]

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        return self


class Server:
    def __init__(self) -> None:
        self.hits: list[str] = []
        self.url = ""
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path_qs)
        if request.path.startswith("/redirect"):
            raise web.HTTPFound(request.query["to"])
        answer = web.json_response({"ok": True})
        if "close" in request.query:
            answer.force_close()  # Connection: close, and the connection is closed after the answer
        return answer


@pytest.fixture
async def server():
    s = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner, s.url = await _start(app)
    s.port = int(s.url.rsplit(":", 1)[1])
    yield s
    await runner.cleanup()


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., WirePool]]:
    """The HTTP client's connection pools (connectors/http_wire.py), one per address policy, as a
    system's requests get them."""
    sessions = HttpPools()

    def make(allow_private: bool = False, allow_networks: tuple[str, ...] = ()) -> WirePool:
        return sessions.pool(allow_private, allow_networks, WirePool)

    yield make
    await sessions.close()


async def fetch(pool: WirePool, url: str) -> int:
    answer = await pool.request(
        "GET", url, {}, None, timeout_s=5, limit=65536, tls=machine_tls, follow_redirects=True
    )
    return answer.status


async def test_loopback_is_blocked_unless_the_system_allows_private_networks(server, pools):
    with pytest.raises(BlockedAddress, match=r"connecting to 127\.0\.0\.1 is blocked: loopback address"):
        await fetch(pools(), server.url + "/x")
    assert server.hits == []  # refused before the connect, not after
    assert await fetch(pools(allow_private=True), server.url + "/x") == 200
    assert server.hits == ["/x"]


async def test_ipv6_loopback_literal_is_blocked(server, pools):
    with pytest.raises(BlockedAddress, match=r"connecting to ::1 is blocked: loopback address"):
        await fetch(pools(), f"http://[::1]:{server.port}/x")


async def test_localhost_resolves_to_a_blocked_address(server, pools):
    with pytest.raises(BlockedAddress, match=r"\(localhost\) is blocked: loopback address"):
        await fetch(pools(), f"http://localhost:{server.port}/x")
    assert server.hits == []


async def test_a_name_resolving_to_loopback_is_blocked(server, pools, monkeypatch):
    dns = FakeDns({"evil.test": "127.0.0.1"}).install(monkeypatch)
    with pytest.raises(BlockedAddress, match=r"connecting to 127\.0\.0\.1 \(evil\.test\) is blocked"):
        await fetch(pools(), f"http://evil.test:{server.port}/x")
    assert dns.calls == 1 and server.hits == []


async def test_cloud_metadata_is_blocked_without_connecting(pools):
    with pytest.raises(BlockedAddress, match="169.254.169.254 is blocked: cloud metadata address"):
        await fetch(pools(), "http://169.254.169.254/latest/meta-data/")


async def test_rebinding_name_is_checked_on_every_connection(server, pools, monkeypatch):
    """First answer allowed, second internal: the second connection is refused, the first one went through."""
    FakeDns({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]}).install(monkeypatch)
    guarded = pools(allow_networks=("127.0.0.1/32",))
    # The server closes the first connection after its answer, so the second request needs a new one.
    assert await fetch(guarded, f"http://rebind.test:{server.port}/first?close") == 200
    with pytest.raises(BlockedAddress, match=r"127\.0\.0\.2 \(rebind\.test\) is blocked: loopback"):
        await fetch(guarded, f"http://rebind.test:{server.port}/second")
    assert server.hits == ["/first?close"]


async def test_only_allowed_addresses_of_a_name_are_connected_to(server, pools, monkeypatch):
    """A name with an internal and an allowed address: the internal one is never tried."""
    internal = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", internal.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.2", server.port).start()
    except OSError:
        await runner.cleanup()
        pytest.skip("cannot bind 127.0.0.2 here")
    try:
        FakeDns({"mixed.test": ["127.0.0.2", "127.0.0.1"]}).install(monkeypatch)
        guarded = pools(allow_networks=("127.0.0.1/32",))
        assert await fetch(guarded, f"http://mixed.test:{server.port}/x") == 200
        assert server.hits == ["/x"] and internal.hits == []
    finally:
        await runner.cleanup()


async def test_a_redirect_to_an_internal_address_is_blocked(server, pools):
    # The server stands in for an allowed host; it redirects to the cloud metadata address.
    guarded = pools(allow_networks=("127.0.0.1/32",))
    with pytest.raises(BlockedAddress, match="169.254.169.254 is blocked: cloud metadata"):
        await fetch(guarded, server.url + "/redirect?to=http://169.254.169.254/latest/meta-data/")
    with pytest.raises(BlockedAddress, match=r"::1 is blocked: loopback"):
        await fetch(guarded, server.url + f"/redirect?to=http://[::1]:{server.port}/inside")
    assert len(server.hits) == 2 and all(h.startswith("/redirect") for h in server.hits)  # never /inside


def _sink(url: str, resources: Resources, **policy: Any) -> HttpSink:
    return HttpSink(HttpSystem(url=url), HttpSinkConfig(path="/x"), DeliveryPolicy(**policy), resources)


async def test_http_sink_classifies_a_blocked_address_as_terminal(server):
    res = Resources(system="crm")
    try:
        out = await _sink(server.url, res).send(
            {"method": "POST", "url": server.url + "/x", "body": "{}"}, "k1"
        )
    finally:
        if res.http is not None:
            await res.http.close()
    assert out.cls is OutcomeClass.TERMINAL
    assert out.error == (
        "connecting to 127.0.0.1 is blocked: loopback address; "
        "set allow_private_network: true on system crm if it is an internal system, "
        "or allow only this address with allow_networks: [127.0.0.1/32]"
    )
    assert server.hits == []


async def test_http_sink_following_a_redirect_inside_is_terminal(server):
    res = Resources(system="partner", allow_networks=("127.0.0.1/32",))
    url = server.url + "/redirect?to=http://10.0.0.5/admin"
    try:
        out = await _sink(server.url, res, follow_redirects=True).send({"method": "GET", "url": url}, "k1")
    finally:
        if res.http is not None:
            await res.http.close()
    assert out.cls is OutcomeClass.TERMINAL
    assert "connecting to 10.0.0.5 is blocked: private address" in out.error
    assert "on system partner" in out.error


async def test_legacy_numeric_ip_is_terminal(server):
    res = Resources(system="crm")
    try:
        out = await _sink(server.url, res).send(
            {"method": "GET", "url": f"http://2130706433:{server.port}/"}, "k1"
        )
    finally:
        if res.http is not None:
            await res.http.close()
    assert out.cls is OutcomeClass.TERMINAL and server.hits == []


# ----------------------------------------------------------------------------- through the hub
FAST = {"timeout_s": 2, "retry": {"schedule": ["100ms", "100ms"], "jitter": 0}}


def _systems(root, **crm: Any) -> None:
    path = root / "systems.yaml"
    systems = yaml.safe_load(path.read_text())
    systems["crm"].pop("allow_private_network")
    systems["crm"].update(crm)
    path.write_text(yaml.safe_dump(systems, sort_keys=False))


async def test_a_destination_on_loopback_dead_letters_as_blocked(tmp_path, sink, start_hub):
    root = lead_project(tmp_path, sink.url, delivery=FAST)
    _systems(root)
    hub = await start_hub(root)
    status, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    assert status == 202

    async def dead() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "dead"

    await eventually(dead, what="dead letter")
    [d] = (await hub.run(body["event_id"]))["deliveries"]
    assert d["attempts"] == 1  # terminal: not retried
    assert d["last_error"] == (
        "connecting to 127.0.0.1 is blocked: loopback address; "
        "set allow_private_network: true on system crm if it is an internal system, "
        "or allow only this address with allow_networks: [127.0.0.1/32]"
    )
    [row] = await hub.store.read(list_dead)
    assert "is blocked: loopback address" in row["reason"]
    assert sink.received == []


async def test_allow_networks_lets_one_internal_network_through(tmp_path, sink, start_hub):
    root = lead_project(tmp_path, sink.url, delivery=FAST)
    _systems(root, allow_networks=["127.0.0.1/32"])
    hub = await start_hub(root)
    status, _ = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    assert status == 202
    await sink.wait_for(1)


# ----------------------------------------------------------------------------- patchbay check
def test_check_warns_about_plain_http_disabled_tls_and_internal_urls(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from patchbay.cli import main
    from tests.conftest import SECRET_TOKEN, SECRET_WHSEC

    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", SECRET_TOKEN)
    monkeypatch.chdir(tmp_path)
    root = lead_project(tmp_path / "p", "http://crm.example.com/api")
    _systems(root)
    (root / "systems.yaml").write_text(
        (root / "systems.yaml").read_text()
        + (
            "billing:\n  kind: http\n  owner: finance\n  url: https://billing.example.com\n"
            "  verify_tls: false\n"
            "internal:\n  kind: http\n  owner: ops\n  url: http://10.0.0.5:8080\n"
            "local:\n  kind: http\n  owner: ops\n  url: http://127.0.0.1:8787/_inbox\n"
            "  allow_private_network: true\n"
        )
    )
    lines = (root / "systems.yaml").read_text().splitlines()
    url_line = next(i for i, t in enumerate(lines, 1) if "crm.example.com" in t)
    tls_line = next(i for i, t in enumerate(lines, 1) if "verify_tls" in t)
    res = CliRunner().invoke(main, ["check", "p"])
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ": warning: " in ln]
    assert (
        f"p/systems.yaml:{url_line}: warning: system 'crm': plain http:// to crm.example.com sends data and "
        "credentials unencrypted; use https://" in warnings
    )
    assert any(
        w.startswith(f"p/systems.yaml:{tls_line}: warning: system 'billing': verify_tls: false")
        for w in warnings
    )
    assert any(
        "system 'internal': 10.0.0.5 is a private address, so deliveries will be refused" in w
        for w in warnings
    )
    assert any("system 'internal': plain http://" in w for w in warnings)
    assert not any("'local'" in w for w in warnings)  # loopback plain HTTP, allowed: nothing to say
    assert len(warnings) == 4
    assert "ok: 5 systems" in res.output

    doc = __import__("json").loads(CliRunner().invoke(main, ["check", "p", "--json"]).output)
    assert doc["ok"] is True and len(doc["warnings"]) == 4
    assert {"file", "line", "message"} <= set(doc["warnings"][0])


async def test_non_http_connectors_get_checked_addresses():
    with pytest.raises(BlockedAddress, match=r"\(localhost\) is blocked: loopback address"):
        await Resources(system="db").allowed_addresses("localhost", 5432)
    with pytest.raises(BlockedAddress, match="connecting to 10.0.0.5 is blocked: private address"):
        await Resources().allowed_addresses("10.0.0.5", 5432)
    assert await Resources(allow_networks=("127.0.0.1/32",)).allowed_addresses("127.0.0.1", 5432) == [
        "127.0.0.1"
    ]
    assert "127.0.0.1" in await Resources(allow_private=True).allowed_addresses("localhost", 5432)
    assert await Resources().allowed_addresses("93.184.216.34", 443) == ["93.184.216.34"]


# ----------------------------------------------------------------------------- connectors without HTTP
# Every networked connector resolves its host, checks the addresses and connects to a checked IP. A
# listener of the test's own stands in for the server, so "no connection was made" is counted, not assumed.
NON_HTTP = ["postgres", "mysql", "redis", "rabbitmq", "mqtt", "nats", "smtp"]
DRIVERS = {
    "postgres": "psycopg",
    "mysql": "aiomysql",
    "redis": "redis.asyncio",
    "rabbitmq": "aio_pika",
    "mqtt": "paho.mqtt.client",
    "nats": "nats",
    "smtp": "aiosmtplib",
}
RECORD = {"id": 1, "name": "Ada", "email": "ada@example.com"}
BLOCKED_LOOPBACK = {
    "127.0.0.1": r"connecting to 127\.0\.0\.1 is blocked: loopback address",
    "localhost": r"connecting to (127\.0\.0\.1|::1) \(localhost\) is blocked: loopback address",
}


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections made to it and drops each at once."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.transport.abort()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    lst = Listener()
    server = await asyncio.start_server(lst.handle, "127.0.0.1", 0)
    lst.port = server.sockets[0].getsockname()[1]
    yield lst
    server.close()
    await server.wait_closed()


def _system(kind: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    if kind == "postgres":
        return {"host": host, "port": port, "database": "test", "user": "postgres", **extra}
    if kind == "mysql":
        return {"host": host, "port": port, "database": "test", "user": "root", **extra}
    if kind == "redis":
        scheme = "rediss" if extra.pop("tls", False) else "redis"
        return {"url": f"{scheme}://{host}:{port}/0", **extra}
    if kind == "nats":
        return {"servers": [f"nats://{host}:{port}"], **extra}
    if kind == "smtp":
        return {"host": host, "port": port, "starttls": False, "from_address": "hub@example.com", **extra}
    return {"host": host, "port": port, **extra}  # rabbitmq, mqtt


def destination(
    kind: str, host: str, port: int, resources: Resources, timeout_s: float = 3.0, **system: Any
) -> Any:
    """A destination of `kind` whose system points at host:port."""
    pytest.importorskip(DRIVERS[kind])
    from patchbay.connectors.mqtt import MqttSink
    from patchbay.connectors.nats import NatsSink
    from patchbay.connectors.rabbitmq import RabbitMQSink
    from patchbay.connectors.redis import RedisSink
    from patchbay.connectors.smtp import SmtpSink

    sinks: dict[str, Any] = {"redis": RedisSink, "rabbitmq": RabbitMQSink, "mqtt": MqttSink, "nats": NatsSink}
    sinks["smtp"] = SmtpSink
    if kind == "postgres":
        from patchbay.connectors.postgres import PostgresSink

        sinks[kind] = PostgresSink
    if kind == "mysql":
        from patchbay.connectors.mysql import MysqlSink

        sinks[kind] = MysqlSink
    dest: dict[str, Any] = {
        "postgres": {"table": "pb_guard", "write_mode": "upsert", "key": ["id"]},
        "mysql": {"table": "pb_guard", "write_mode": "upsert", "key": ["id"]},
        "redis": {"stream": f"pbtest:guard:{uuid.uuid4().hex[:8]}"},
        "rabbitmq": {"routing_key": "pb-guard-nowhere", "mandatory": False},
        "mqtt": {"topic": "pb/guard"},
        "nats": {"subject": "pb.guard", "jetstream": False},
        "smtp": {"to": ["ops@example.com"], "subject": "guard", "text": "hello"},
    }[kind]
    sys_model, dest_model = _models(kind)
    return sinks[kind](
        sys_model.model_validate(_system(kind, host, port, **system)),
        dest_model.model_validate(dest),
        DeliveryPolicy(timeout_s=timeout_s),
        resources,
    )


def _models(kind: str) -> tuple[Any, Any]:
    if kind in ("postgres", "mysql"):
        from patchbay.connectors.sql_client.config import SqlSinkConfig

        if kind == "postgres":
            from patchbay.connectors.postgres import PostgresSystem

            return PostgresSystem, SqlSinkConfig
        from patchbay.connectors.mysql import MysqlSystem

        return MysqlSystem, SqlSinkConfig
    if kind == "redis":
        from patchbay.connectors.redis import RedisSinkConfig, RedisSystem

        return RedisSystem, RedisSinkConfig
    if kind == "rabbitmq":
        from patchbay.connectors.rabbitmq import RabbitMQSinkConfig, RabbitMQSystem

        return RabbitMQSystem, RabbitMQSinkConfig
    if kind == "mqtt":
        from patchbay.connectors.mqtt import MqttSinkConfig, MqttSystem

        return MqttSystem, MqttSinkConfig
    if kind == "nats":
        from patchbay.connectors.nats import NatsSinkConfig, NatsSystem

        return NatsSystem, NatsSinkConfig
    from patchbay.connectors.smtp import SmtpSinkConfig, SmtpSystem

    return SmtpSystem, SmtpSinkConfig


async def send_once(sink: Any, key: str = "evt_1.guard") -> Any:
    try:
        return await sink.send(sink.render(RECORD, key), key)
    finally:
        await sink.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("kind", NON_HTTP)
async def test_a_destination_on_loopback_is_refused_before_connecting(kind, host, listener):
    out = await send_once(destination(kind, host, listener.port, Resources(system="warehouse")))
    assert out.cls is OutcomeClass.TERMINAL, out  # dead-lettered at once: every try would be refused
    assert re.search(BLOCKED_LOOPBACK[host], out.error), out.error
    assert "set allow_private_network: true on system warehouse if it is an internal system" in out.error
    assert "or allow only this address with allow_networks: [" in out.error
    assert listener.accepted == 0  # refused before the connect, not after


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("kind", NON_HTTP)
async def test_allow_networks_lets_a_destination_connect(kind, host, listener):
    res = Resources(system="warehouse", allow_networks=("127.0.0.0/8",))
    out = await send_once(destination(kind, host, listener.port, res, timeout_s=2.0))
    assert out.cls is OutcomeClass.TRANSIENT, out  # the listener drops the connection: retried later
    assert "blocked" not in out.error
    assert listener.accepted >= 1


@dataclass
class CheckedAddresses(Resources):
    """Answers the guard's question itself: whatever the name, the checked address is the listener's."""

    answer: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    asked: list[str] = field(default_factory=list)

    async def allowed_addresses(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return list(self.answer)


@pytest.mark.parametrize("kind", NON_HTTP)
async def test_the_connection_goes_to_the_checked_address_not_to_the_name_again(kind, listener):
    """`db.invalid` never resolves (RFC 6761): reaching the listener proves the driver connected to the
    address the guard returned instead of resolving the name a second time (where rebinding would bite)."""
    res = CheckedAddresses(system="warehouse")
    out = await send_once(destination(kind, "db.invalid", listener.port, res, timeout_s=2.0))
    assert listener.accepted >= 1, out
    assert set(res.asked) == {"db.invalid"}


@pytest.mark.parametrize("kind", NON_HTTP)
async def test_each_checked_address_is_tried_in_turn(kind, listener):
    """A name with several addresses (IPv6 and IPv4, say): one that refuses does not stop the next."""
    res = CheckedAddresses(system="warehouse", answer=["127.0.0.2", "127.0.0.1"])  # nothing on .2
    out = await send_once(destination(kind, "db.invalid", listener.port, res, timeout_s=3.0))
    assert listener.accepted >= 1, out


def source(kind: str, host: str, port: int, resources: Resources) -> Any:
    pytest.importorskip(DRIVERS[kind])
    sys_model, _ = _models(kind)
    system = sys_model.model_validate(_system(kind, host, port))
    if kind in ("postgres", "mysql"):
        from patchbay.connectors.sql_client.source_config import SqlSourceConfig

        config = SqlSourceConfig.model_validate({"table": "pb_guard", "cursor_column": "id", "timeout_s": 2})
        if kind == "postgres":
            from patchbay.connectors.postgres import PostgresSource

            return PostgresSource(system, config, resources)
        from patchbay.connectors.mysql import MysqlSource

        return MysqlSource(system, config, resources)
    if kind == "redis":
        from patchbay.connectors.redis import RedisSource, RedisSourceConfig

        return RedisSource(system, RedisSourceConfig(stream="pb-guard", group="g", timeout_s=2), resources)
    if kind == "rabbitmq":
        from patchbay.connectors.rabbitmq import RabbitMQSource, RabbitMQSourceConfig

        return RabbitMQSource(system, RabbitMQSourceConfig(queue="pb-guard", timeout_s=2), resources)
    if kind == "mqtt":
        from patchbay.connectors.mqtt import MqttSource, MqttSourceConfig

        return MqttSource(
            system, MqttSourceConfig(topic="pb/guard", client_id="pb-guard", timeout_s=2), resources
        )
    from patchbay.connectors.nats import NatsSource, NatsSourceConfig

    return NatsSource(system, NatsSourceConfig(stream="PBGUARD", durable="guard", timeout_s=2), resources)


async def run_source(src: Any) -> None:
    async def emit(batch: Any) -> None:
        raise AssertionError("nothing should be read")

    try:
        if getattr(src, "mode", "") == "poll":
            async for _ in src.poll(None):
                pass
        else:
            await src.stream(emit)
    finally:
        await src.close()


SOURCES = ["postgres", "mysql", "redis", "rabbitmq", "mqtt", "nats"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("kind", SOURCES)
async def test_a_source_on_loopback_fails_to_start_with_the_reason(kind, host, listener):
    src = source(kind, host, listener.port, Resources(system="orders-db"))
    with pytest.raises(TerminalError) as info:
        await run_source(src)
    assert re.search(BLOCKED_LOOPBACK[host], str(info.value)), info.value
    assert "set allow_private_network: true on system orders-db" in str(info.value)
    assert listener.accepted == 0


@pytest.mark.parametrize("kind", SOURCES)
async def test_allow_networks_lets_a_source_connect(kind, listener):
    src = source(
        kind, "localhost", listener.port, Resources(system="orders-db", allow_networks=("127.0.0.0/8",))
    )
    with pytest.raises(TransientError) as info:  # the listener drops it: the engine reconnects later
        await run_source(src)
    assert "blocked" not in str(info.value)
    assert listener.accepted >= 1


# -- the real servers, reached by name through allow_networks
SERVICES = {
    "postgres": ("PostgreSQL", 5432),
    "redis": ("Redis", 6379),
    "rabbitmq": ("RabbitMQ", 5672),
}


@pytest.fixture
async def mail_server() -> AsyncIterator[tuple[int, list[Any]]]:
    """An SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it accepts."""
    pytest.importorskip("aiosmtpd")
    from aiosmtpd.smtp import SMTP

    received: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(envelope)
            return "250 2.0.0 queued"

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(), hostname="localhost", loop=loop), "127.0.0.1", 0
    )
    yield server.sockets[0].getsockname()[1], received
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("kind", ["postgres", "redis", "rabbitmq", "smtp"])
async def test_allow_networks_reaches_the_real_server_by_name(kind, mail_server, tmp_path):
    res = Resources(system="warehouse", allow_networks=("127.0.0.0/8",))
    if kind == "smtp":
        port, received = mail_server
    else:
        service, port = SERVICES[kind]
        require_service(service, "127.0.0.1", port)
    sink = destination(kind, "localhost", port, res)
    if kind == "postgres":
        import psycopg

        table = f"pb_{uuid.uuid4().hex[:12]}"
        sink.config.table = table
        sink._renderer.config.table = table
        admin = await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=port, dbname="test", user="postgres", autocommit=True
        )
        await admin.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, name text, email text)')
        try:
            out = await send_once(sink)
            cur = await admin.execute(f'SELECT id, name FROM "{table}"')
            assert await cur.fetchall() == [(1, "Ada")]
        finally:
            await admin.execute(f'DROP TABLE "{table}"')
            await admin.close()
    else:
        out = await send_once(sink)
        if kind == "redis":
            import redis.asyncio as aioredis

            r = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
            stream = sink.config.stream
            assert await r.xlen(stream) == 1
            await r.delete(stream)
            await r.aclose()
        if kind == "smtp":
            assert len(received) == 1 and received[0].rcpt_tos == ["ops@example.com"]
    assert out.cls is OutcomeClass.SUCCESS, out


# -- TLS: the socket goes to the checked IP, the certificate is checked for the configured name
def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for DNS name `name` only (no IP address in it) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


class TlsProxy:
    """TLS on 127.0.0.1 in front of a plain-text server: the certificate names a host, never the IP."""

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self.upstream_port = upstream_port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TlsProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            dst.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_a_server_name_context_checks_the_name_while_connecting_to_the_ip(tmp_path, listener):
    """aiomysql and nats over wss pass the IP they connect to as server_hostname (asyncio wrap_bio)."""
    cert, key = _self_signed(tmp_path, "localhost")
    proxy = await TlsProxy(listener.port, cert, key).start()
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, ssl=tls_client_context(str(cert), "localhost")
        )
        writer.close()
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            await asyncio.open_connection(
                "127.0.0.1", proxy.port, ssl=ssl.create_default_context(cafile=str(cert))
            )
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            await asyncio.open_connection(
                "127.0.0.1", proxy.port, ssl=tls_client_context(str(cert), "other.test")
            )
    finally:
        await proxy.stop()


TLS_KINDS = {"redis": ("Redis", 6379), "rabbitmq": ("RabbitMQ", 5672), "mqtt": ("Mosquitto", 1883)}


@pytest.mark.parametrize("kind", ["redis", "rabbitmq", "mqtt", "smtp"])
async def test_tls_is_checked_for_the_configured_name_while_connecting_to_the_checked_ip(
    kind, tmp_path, mail_server
):
    """The host `localhost` resolves to 127.0.0.1; the certificate names `localhost` only, so the TLS
    check passes only if the driver verified the configured name, not the IP it connected to."""
    if kind == "smtp":
        upstream, _ = mail_server
    else:
        service, upstream = TLS_KINDS[kind]
        require_service(service, "127.0.0.1", upstream)
    cert, key = _self_signed(tmp_path, "localhost")
    proxy = await TlsProxy(upstream, cert, key).start()
    try:
        res = Resources(system="secure", allow_networks=("127.0.0.0/8",))
        out = await send_once(destination(kind, "localhost", proxy.port, res, tls=True, ca_bundle=str(cert)))
        assert out.cls is OutcomeClass.SUCCESS, out
        assert proxy.accepted >= 1
        # The same certificate for another name is refused: the name really is checked.
        other, other_key = _self_signed(tmp_path, "other.test")
        wrong = await TlsProxy(upstream, other, other_key).start()
        try:
            with warnings.catch_warnings():
                # paho does not close a socket whose TLS handshake failed; it is collected here.
                warnings.simplefilter("ignore", ResourceWarning)
                out = await send_once(
                    destination(kind, "localhost", wrong.port, res, tls=True, ca_bundle=str(other))
                )
                gc.collect()
            assert out.cls is not OutcomeClass.SUCCESS, out
            assert "certificate" in out.error.lower() or "ssl" in out.error.lower(), out
        finally:
            await wrong.stop()
    finally:
        await proxy.stop()


# -- through the hub: a system's allow_private_network / allow_networks settings reach the connector
async def test_a_postgres_system_on_localhost_dead_letters_until_its_network_is_allowed(tmp_path, start_hub):
    require_service("PostgreSQL", "127.0.0.1", 5432)
    pytest.importorskip("psycopg")
    import psycopg

    from tests.connectors import CONTACT_EVENTS, contacts_project, post_and_deliver, stop_hub

    table = f"pb_{uuid.uuid4().hex[:12]}"
    admin = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=5432, dbname="test", user="postgres", autocommit=True
    )
    await admin.execute(f'CREATE TABLE "{table}" (email text PRIMARY KEY, name text, score int, tags jsonb)')
    server = {"kind": "postgres", "host": "localhost", "port": 5432, "database": "test", "user": "postgres"}
    try:
        refused = contacts_project(tmp_path / "refused", {**server, "allow_private_network": False}, table)
        hub = await start_hub(refused)
        status, body = await hub.post("/hooks/contacts", CONTACT_EVENTS[0])
        assert status == 202, body

        async def dead() -> bool:
            return (await hub.run(body["event_id"]))["status"] == "dead"

        await eventually(dead, what="dead letter")
        [d] = (await hub.run(body["event_id"]))["deliveries"]
        assert d["attempts"] == 1  # terminal: not retried
        assert re.fullmatch(
            rf"upsert into {table}: connecting to (127\.0\.0\.1|::1) \(localhost\) is blocked: loopback "
            r"address; set allow_private_network: true on system warehouse if it is an internal system, "
            r"or allow only this address with allow_networks: \[(127\.0\.0\.1/32|::1/128)\]",
            d["last_error"],
        ), d["last_error"]
        await stop_hub(hub)
        cur = await admin.execute(f'SELECT count(*) FROM "{table}"')
        assert await cur.fetchone() == (0,)

        allowed = contacts_project(
            tmp_path / "allowed",
            {**server, "allow_private_network": False, "allow_networks": ["127.0.0.0/8"]},
            table,
        )
        hub = await start_hub(allowed)
        await post_and_deliver(hub, CONTACT_EVENTS)
        await stop_hub(hub)
        cur = await admin.execute(f'SELECT email FROM "{table}" ORDER BY email')
        assert await cur.fetchall() == [("ann@example.com",), ("bob@example.com",)]
    finally:
        await admin.execute(f'DROP TABLE IF EXISTS "{table}"')
        await admin.close()


def test_check_warns_about_database_broker_and_smtp_hosts_the_guard_will_refuse(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from patchbay.cli import main
    from tests.conftest import SECRET_TOKEN, SECRET_WHSEC

    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", SECRET_TOKEN)
    monkeypatch.chdir(tmp_path)
    root = lead_project(tmp_path / "p", "https://crm.example.com/api")
    _systems(root)
    extra = {
        "db": {"kind": "postgres", "owner": "data", "host": "10.1.2.3", "database": "x", "user": "u"},
        "cache": {"kind": "redis", "owner": "ops", "url": "redis://localhost:6379/0"},
        "events": {
            "kind": "nats",
            "owner": "ops",
            "servers": ["nats://nats.example.com:4222", "nats://[::1]:4222"],
        },
        "mail": {"kind": "smtp", "owner": "ops", "host": "169.254.169.254", "from_address": "a@example.com"},
        "queue": {
            "kind": "rabbitmq",
            "owner": "ops",
            "host": "10.20.0.7",
            "allow_networks": ["10.20.0.0/16"],
        },
        "local_db": {
            "kind": "mysql",
            "owner": "ops",
            "host": "127.0.0.1",
            "database": "x",
            "user": "u",
            "allow_private_network": True,
        },
        "socket_db": {
            "kind": "postgres",
            "owner": "ops",
            "host": "/var/run/postgresql",
            "database": "x",
            "user": "u",
        },
        "public_mq": {"kind": "mqtt", "owner": "ops", "host": "mqtt.example.com"},
    }
    (root / "systems.yaml").write_text(
        (root / "systems.yaml").read_text() + yaml.safe_dump(extra, sort_keys=False)
    )
    lines = (root / "systems.yaml").read_text().splitlines()
    db_line = next(i for i, t in enumerate(lines, 1) if "10.1.2.3" in t)
    res = CliRunner().invoke(main, ["check", "p"])
    assert res.exit_code == 0, res.output
    warnings_ = [ln for ln in res.output.splitlines() if ": warning: " in ln]
    assert (
        f"p/systems.yaml:{db_line}: warning: system 'db': 10.1.2.3 is a private address, so connections to "
        "it will be refused; set allow_private_network: true (or allow_networks) if it is an internal system"
        in warnings_
    ), warnings_
    assert any("system 'cache': localhost is a loopback address" in w for w in warnings_)
    assert any("system 'events': ::1 is a loopback address" in w for w in warnings_)
    assert any("system 'mail': 169.254.169.254 is a cloud metadata address" in w for w in warnings_)
    for quiet in ("queue", "local_db", "socket_db", "public_mq"):  # allowed, a Unix socket, or public
        assert not any(f"system '{quiet}'" in w for w in warnings_), warnings_
    assert len(warnings_) == 4, warnings_


# ----------------------------------------------------------------------------- one reader of host forms
LOOPBACK_FORMS = ["127.1", "0x7f.1", "0177.0.0.1", "2130706433", "0x7f000001", "127.0.1", "0X7F.0.0.01"]


@pytest.mark.parametrize(
    ("host", "address"),
    [
        *((form, "127.0.0.1") for form in LOOPBACK_FORMS),
        ("10.1", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("00000000000000127.1", "87.0.0.1"),  # octal, as the resolver reads it
        ("127.000.000.001", "127.0.0.1"),
        ("[::1]", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
        *((name, None) for name in ["example.com", "127.0.0.1.", "08.0.0.1", "0x.1", "1.2.3.4.5", "256.1"]),
        *((name, None) for name in ["1.256.1.1", "4294967296", "0x100000000", "1e2", "+1.2.3.4", "::g", ""]),
    ],
)
def test_parse_host_reads_every_numeric_form_the_resolver_reads(host: str, address: str | None):
    parsed = parse_host(host)
    assert (str(parsed) if parsed is not None else None) == address


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="compares with glibc's reader")
@pytest.mark.parametrize(
    "host",
    [
        *LOOPBACK_FORMS,
        "10.1",
        "0",
        "00000000000000127.1",
        "127.0.0.1.",
        "08.0.0.1",
        "0x.1",
        "256.1",
        "1.2.65536",
    ]
    + ["4294967296", "0x100000000", "1e2", "0x7f.0x0.0x0.0x1", "::ffff:127.0.0.1", "fe80::1", "017700000001"],
)
def test_parse_host_agrees_with_the_system_resolver(host: str):
    """What the resolver would connect to without DNS (AI_NUMERICHOST): no lookup, no traffic."""
    try:
        [info, *_] = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        expected: Any = ipaddress.ip_address(str(info[4][0]))
    except socket.gaierror:
        expected = None
    assert parse_host(host) == expected


@pytest.mark.parametrize("form", LOOPBACK_FORMS)
def test_every_loopback_form_is_judged_loopback(form: str):
    assert blocked_reason(form) == "loopback address"


NAT64 = [
    ("64:ff9b:1::1", "local-use NAT64 address"),  # RFC 8215: the translator is inside this network
    ("64:ff9b:1:2:3:4:5:6", "local-use NAT64 address"),
    ("64:ff9b:1::808:808", "local-use NAT64 address"),
    ("64:ff9b::a00:5", "private address (NAT64)"),  # the well-known prefix: judged by the IPv4 inside
    ("64:ff9b::c0a8:101", "private address (NAT64)"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata address (NAT64)"),
    ("64:ff9b::7f00:1", "loopback address (NAT64)"),
    ("64:ff9b::808:808", None),
    ("64:ff9b:2::1", None),  # outside both prefixes
]


@pytest.mark.parametrize(("address", "why"), NAT64, ids=[n[0] for n in NAT64])
def test_nat64_prefixes(address: str, why: str | None):
    assert blocked_reason(address) == why


def test_allow_networks_opens_the_local_use_nat64_prefix():
    assert AddressPolicy(["64:ff9b:1::/48"]).reason("64:ff9b:1::a00:5") is None


@pytest.mark.parametrize("form", ["127.1", "0x7f.1", "2130706433"])
async def test_the_guard_refuses_a_loopback_form_without_connecting(server, pools, form):
    with pytest.raises(BlockedAddress, match=rf"connecting to 127\.0\.0\.1 \({form}\) is blocked: loopback"):
        await fetch(pools(), f"http://{form}:{server.port}/x")
    assert server.hits == []
    with pytest.raises(BlockedAddress, match="loopback address"):
        await resolve_allowed(form, server.port)
    assert await resolve_allowed(form, server.port, allow_networks=["127.0.0.0/8"]) == ["127.0.0.1"]


async def test_a_name_resolving_to_local_use_nat64_is_blocked(pools, monkeypatch):
    FakeDns({"nat64.test": "64:ff9b:1::a00:5"}).install(monkeypatch)
    with pytest.raises(BlockedAddress, match=r"64:ff9b:1::a00:5 \(nat64\.test\) is blocked: local-use NAT64"):
        await fetch(pools(), "http://nat64.test/x")
    with pytest.raises(BlockedAddress, match="local-use NAT64 address"):
        await resolve_allowed("64:ff9b:1::a00:5", 5432)


def _check_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]) -> Path:
    from tests.conftest import SECRET_TOKEN, SECRET_WHSEC

    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", SECRET_TOKEN)
    monkeypatch.chdir(tmp_path)
    root = lead_project(tmp_path / "p", "https://crm.example.com/api")
    _systems(root)
    (root / "systems.yaml").write_text(
        (root / "systems.yaml").read_text() + yaml.safe_dump(extra, sort_keys=False)
    )
    return root


def test_check_warns_about_every_form_the_guard_refuses(tmp_path, monkeypatch):
    """`check` and the guard read hosts with the same reader, so they cannot disagree."""
    from click.testing import CliRunner

    from patchbay.cli import main

    hosts = [*LOOPBACK_FORMS, "64:ff9b:1::5", "64:ff9b::a00:5"]
    extra: dict[str, Any] = {}
    for i, host in enumerate(hosts):
        shown = f"[{host}]" if ":" in host else host
        extra[f"web{i}"] = {"kind": "http", "owner": "ops", "url": f"https://{shown}:8443/api"}
        extra[f"db{i}"] = {"kind": "postgres", "owner": "ops", "host": host, "database": "x", "user": "u"}
    root = _check_project(tmp_path, monkeypatch, extra)
    lines = (root / "systems.yaml").read_text().splitlines()
    res = CliRunner().invoke(main, ["check", "p"])
    assert res.exit_code == 0, res.output
    warnings_ = [ln for ln in res.output.splitlines() if ": warning: " in ln]
    for i, host in enumerate(hosts):
        why = blocked_reason(host)
        assert why is not None
        url_line = next(n for n, t in enumerate(lines, 1) if t.strip().startswith("url:") and host in t)
        assert (
            f"p/systems.yaml:{url_line}: warning: system 'web{i}': {host.lower()} is a {why}, so deliveries "
            "will be refused; set allow_private_network: true if it is an internal system"
        ) in warnings_, warnings_
        assert any(f"system 'db{i}': {host} is a {why}, so connections" in w for w in warnings_), warnings_
    assert len(warnings_) == 2 * len(hosts)


def test_check_takes_lines_from_the_loaded_files_and_never_rereads_them(tmp_path, monkeypatch):
    """One source of locations: the loader's line map. A file changed after loading changes nothing."""
    from patchbay.config.project import load_or_raise

    db = {"kind": "postgres", "owner": "o", "host": "10.1.2.3", "database": "x", "user": "u"}
    root = _check_project(tmp_path, monkeypatch, {"db": db})
    lines = (root / "systems.yaml").read_text().splitlines()
    host_line = next(n for n, t in enumerate(lines, 1) if "10.1.2.3" in t)
    project = load_or_raise(root)
    (root / "systems.yaml").write_text("\n" * 50 + (root / "systems.yaml").read_text())
    [warning] = [w for w in outbound_warnings(project) if "'db'" in w.message]
    assert (warning.file, warning.line) == ("p/systems.yaml", host_line)
    (root / "systems.yaml").unlink()
    assert [w.line for w in outbound_warnings(project) if "'db'" in w.message] == [host_line]


def test_the_guard_does_not_read_yaml():
    import ast

    import patchbay.security.ssrf as ssrf

    tree = ast.parse(Path(ssrf.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m == "yaml" or m.startswith(("yaml.", "patchbay.config.source"))}
