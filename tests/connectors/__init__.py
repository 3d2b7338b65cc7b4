"""Helpers for the connector tests: a TCP proxy that fakes network faults, a closed port, projects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from patchbay.config.models import SystemCommon
from patchbay.config.project import SystemSpec, system_secret_refs
from patchbay.connectors import tls_client
from patchbay.connectors.tls_client import TlsSettings
from tests.conftest import eventually, write_project


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for the DNS name `name` (its own CA) and its key, as PEM files in `folder`."""
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


async def polls_more(hub: Any, n: int, timeout: float = 10.0) -> None:
    """Wait until the hub's schedules have run `n` more times than now (a poll that finds nothing
    leaves no other trace to wait for)."""

    async def runs() -> int:
        return int(await hub.store.read(lambda c: c.execute("SELECT sum(runs) FROM schedules").fetchone()[0]))

    start = await runs()

    async def ran() -> bool:
        return await runs() >= start + n

    await eventually(ran, timeout=timeout, what=f"{n} more scheduled runs")


def tls_server_context(folder: Path, name: str = "localhost") -> tuple[ssl.SSLContext, Path]:
    """A server-side TLS context with a fresh certificate for `name`, and that certificate's file
    (a client trusts it as its ca_bundle)."""
    cert, key = self_signed(folder, name)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


def count_tls_builds(monkeypatch: pytest.MonkeyPatch) -> list[TlsSettings]:
    """Forget the kept TLS contexts and record each one built from now on (undone after the test)."""
    tls_client.forget()
    monkeypatch.setattr(tls_client, "_kept", OrderedDict())
    built: list[TlsSettings] = []
    real = tls_client.build

    def build(settings: TlsSettings) -> ssl.SSLContext:
        built.append(settings)
        return real(settings)

    monkeypatch.setattr(tls_client, "build", build)
    return built


def declared_secrets(system: BaseModel) -> list[str]:
    """The secret references the hub finds in a system's settings (and scopes its connectors to)."""
    spec = SystemSpec("s", SystemCommon(owner="test"), system, "systems.yaml", 1)
    return [ref.label for ref in system_secret_refs(spec)]


def closed_port() -> int:
    """A loopback port nothing listens on (connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a real server, so a test can cut live connections or swallow traffic.

    cut()            aborts every proxied connection, both sides: the broker "drops" the client
    blackhole        while true, bytes from the client are read and dropped: requests time out
    hold_replies()   requests still reach the server, its replies wait (until cut()): sends stay in flight
    With `tls`, the proxy terminates TLS: a plain-text server behind it serves TLS clients.
    """

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        self.upstream = (host, port)
        self.tls = tls
        self.blackhole = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._pairs.append((writer, up_writer))
        for src, dst, upstream in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pipe(src, dst, upstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while data := await src.read(65536):
                if upstream and self.blackhole:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()

    def hold_replies(self) -> int:
        """Stop passing on what the server sends (acks, replies) on every live connection, until cut():
        requests go on reaching the server, the client never hears back. Connections opened later are
        not held. Returns how many connections are held."""
        for _, upstream in self._pairs:
            upstream.transport.pause_reading()  # the server's bytes wait in the socket buffers
        return len(self._pairs)

    def cut(self) -> int:
        """Abort every live connection; returns how many there were."""
        pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            a.transport.abort()
            b.transport.abort()
        return len(pairs)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self.cut()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def broker_project(root: Path, system: dict[str, Any], dest: dict[str, Any], *, flow: str = "orders") -> Path:
    """A webhook flow (signed by `website`) -> map -> one destination on the system `broker`."""
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "broker": {"owner": "platform", "allow_private_network": True, **system},
    }
    doc = {
        "purpose": "orders reach the warehouse through the broker",
        "owner": "ops",
        "trigger": {"webhook": {"system": "website"}},
        "steps": [{"map": {"order_id": "id", "email": "lower(customer.email)", "region": "region"}}],
        "destinations": [
            {
                "name": "queue",
                "system": "broker",
                **dest,
                "delivery": {"timeout_s": 2, "retry": {"schedule": ["100ms"] * 5, "jitter": 0}},
            }
        ],
    }
    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            f"flows/{flow}.yaml": yaml.safe_dump(doc, sort_keys=False),
        },
    )


# ------------------------------------------------------------------ the SQL sinks through the hub
SQL_FAST = {
    "timeout_s": 2,
    "max_concurrency": 1,
    "retry": {"schedule": ["100ms", "200ms", "300ms"], "jitter": 0},
}
CONTACT_EVENTS = [
    {"email": "Ann@Example.com", "first_name": "Ann", "score": "1", "tags": ["new"]},
    {"email": "bob@example.com", "first_name": "Bob", "score": "2", "tags": []},
    {"email": " ann@example.com", "first_name": "Annie", "score": "3", "tags": ["vip"]},  # same key: wins
]
CONTACT_ROWS = [("ann@example.com", "Annie", 3), ("bob@example.com", "Bob", 2)]


def contacts_project(root: Path, system: dict[str, Any], table: str) -> Path:
    """webhook -> map -> a SQL destination upserting on email; one delivery at a time: the last event wins."""
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "warehouse": {"owner": "data", "allow_private_network": True, **system},  # a loopback server
    }
    flow = {
        "purpose": "contacts land in the warehouse",
        "owner": "data",
        "trigger": {"webhook": {"system": "website"}},
        "record_key": "email",
        "delivery": SQL_FAST,
        "steps": [
            {
                "map": {
                    "email": "lower(trim(email))",
                    "name": "first_name",
                    "score": "to_int(score)",
                    "tags": "tags",
                }
            }
        ],
        "destinations": [
            {"name": "db", "system": "warehouse", "table": table, "write_mode": "upsert", "key": ["email"]}
        ],
    }
    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            "flows/contacts.yaml": yaml.safe_dump(flow, sort_keys=False),
        },
    )


async def post_and_deliver(
    hub: Any, events: list[dict[str, Any]], timeout: float = 15.0
) -> list[dict[str, Any]]:
    """POST each event to the contacts flow and wait until every run is delivered; returns the runs."""
    ids = []
    for e in events:
        status, body = await hub.post("/hooks/contacts", e)
        assert status == 202, body
        ids.append(body["event_id"])
    runs: list[dict[str, Any]] = []

    async def delivered() -> bool:
        runs[:] = [await hub.run(i) for i in ids]
        return all(r["status"] == "delivered" for r in runs)

    try:
        await eventually(delivered, timeout=timeout, what="every run delivered")
    except AssertionError:
        raise AssertionError(f"not all delivered: {[(r['status'], r['deliveries']) for r in runs]}") from None
    return runs


async def stop_hub(hub: Any) -> None:
    """Stop the hub now and close its destinations (the fixture's second stop is a no-op)."""
    await hub.runner.cleanup()
    await hub.hub.stop()
    for fr in hub.hub.flows.values():
        for sink in fr.pipeline.sinks.values():
            await sink.close()
