"""The outbound address guard on real sockets: what is checked is the address actually connected to."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from patchbay.config.models import DeliveryPolicy, SystemCommon
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.http import HttpDestination, HttpSink, HttpSystem
from patchbay.security.ssrf import AddressPolicy, BlockedAddress, HttpSessions, blocked_reason
from patchbay.store.queries import list_dead
from tests.conftest import _start, eventually, lead_project

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
class FakeDns(AbstractResolver):
    """Answers from a table; a list of answers is served in turn (a rebinding name)."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.calls = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls += 1
        ips = self.table[host]
        if isinstance(ips, list) and ips and isinstance(ips[0], list):  # successive answers
            ips = ips.pop(0) if len(ips) > 1 else ips[0]
        ips = ips if isinstance(ips, list) else [ips]
        return [
            {
                "hostname": host,
                "host": ip,
                "port": port,
                "family": socket.AF_INET6 if ":" in ip else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for ip in ips
        ]

    async def close(self) -> None:
        return None


class Server:
    def __init__(self) -> None:
        self.hits: list[str] = []
        self.url = ""
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path_qs)
        if request.path.startswith("/redirect"):
            raise web.HTTPFound(request.query["to"])
        return web.json_response({"ok": True})


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
async def sessions():
    made: list[HttpSessions] = []

    def make(**kw: Any) -> HttpSessions:
        made.append(HttpSessions(**kw))
        return made[-1]

    yield make
    for s in made:
        await s.close()


async def fetch(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status


async def test_loopback_is_blocked_unless_the_system_allows_private_networks(server, sessions):
    pool = sessions()
    with pytest.raises(BlockedAddress, match=r"connecting to 127\.0\.0\.1 is blocked: loopback address"):
        await fetch(pool.get(), server.url + "/x")
    assert server.hits == []  # refused before the connect, not after
    assert await fetch(pool.get(allow_private=True), server.url + "/x") == 200
    assert server.hits == ["/x"]


async def test_ipv6_loopback_literal_is_blocked(server, sessions):
    with pytest.raises(BlockedAddress, match=r"connecting to ::1 is blocked: loopback address"):
        await fetch(sessions().get(), f"http://[::1]:{server.port}/x")


async def test_localhost_resolves_to_a_blocked_address(server, sessions):
    with pytest.raises(BlockedAddress, match=r"\(localhost\) is blocked: loopback address"):
        await fetch(sessions().get(), f"http://localhost:{server.port}/x")
    assert server.hits == []


async def test_a_name_resolving_to_loopback_is_blocked(server, sessions):
    dns = FakeDns({"evil.test": "127.0.0.1"})
    with pytest.raises(BlockedAddress, match=r"connecting to 127\.0\.0\.1 \(evil\.test\) is blocked"):
        await fetch(sessions(resolver=dns).get(), f"http://evil.test:{server.port}/x")
    assert dns.calls == 1 and server.hits == []


async def test_cloud_metadata_is_blocked_without_connecting(sessions):
    with pytest.raises(BlockedAddress, match="169.254.169.254 is blocked: cloud metadata address"):
        await fetch(sessions().get(), "http://169.254.169.254/latest/meta-data/")


async def test_rebinding_name_is_checked_on_every_connection(server, sessions):
    """First answer allowed, second internal: the second connection is refused, the first one went through."""
    dns = FakeDns({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
    pool = sessions(resolver=dns, use_dns_cache=False, force_close=True)
    guarded = pool.get(allow_networks=["127.0.0.1/32"])
    assert await fetch(guarded, f"http://rebind.test:{server.port}/first") == 200
    with pytest.raises(BlockedAddress, match=r"127\.0\.0\.2 \(rebind\.test\) is blocked: loopback"):
        await fetch(guarded, f"http://rebind.test:{server.port}/second")
    assert server.hits == ["/first"]


async def test_only_allowed_addresses_of_a_name_are_connected_to(server, sessions):
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
        dns = FakeDns({"mixed.test": ["127.0.0.2", "127.0.0.1"]})
        guarded = sessions(resolver=dns).get(allow_networks=["127.0.0.1/32"])
        assert await fetch(guarded, f"http://mixed.test:{server.port}/x") == 200
        assert server.hits == ["/x"] and internal.hits == []
    finally:
        await runner.cleanup()


async def test_a_redirect_to_an_internal_address_is_blocked(server, sessions):
    # The server stands in for an allowed host; it redirects to the cloud metadata address.
    guarded = sessions().get(allow_networks=["127.0.0.1/32"])
    with pytest.raises(BlockedAddress, match="169.254.169.254 is blocked: cloud metadata"):
        await fetch(guarded, server.url + "/redirect?to=http://169.254.169.254/latest/meta-data/")
    with pytest.raises(BlockedAddress, match=r"::1 is blocked: loopback"):
        await fetch(guarded, server.url + f"/redirect?to=http://[::1]:{server.port}/inside")
    assert len(server.hits) == 2 and all(h.startswith("/redirect") for h in server.hits)  # never /inside


def _sink(url: str, resources: Resources, **policy: Any) -> HttpSink:
    return HttpSink(HttpSystem(url=url), HttpDestination(path="/x"), DeliveryPolicy(**policy), resources)


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
        "set allow_private_network: true on system crm if it is an internal system"
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
        "set allow_private_network: true on system crm if it is an internal system"
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
