"""Shared fixtures: real loopback HTTP servers, project folders, an in-process hub."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.security.secrets import SecretResolver
from patchbay.server.app import make_app

IN_CI = os.environ.get("CI") == "true"


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, under CI=true, fail) when a local server the test needs is not reachable."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        msg = f"{name} is not reachable on {host}:{port} ({exc.strerror or exc})"
        if IN_CI:
            pytest.fail(msg + " — CI=true requires it")
        pytest.skip(msg)


# ----------------------------------------------------------------------------- a scripted sink
@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class Sink:
    """A real HTTP server that records requests and answers from a script (status codes or callables)."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    script: list[Any] = field(default_factory=list)  # consumed per request; empty -> default
    default: Any = 201
    keys: dict[str, int] = field(default_factory=dict)

    def ok_keys(self) -> set[str]:
        return set(self.keys)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode()
        rec = Received(request.method, request.path_qs, dict(request.headers), body, time.time())
        self.received.append(rec)
        action = self.script.pop(0) if self.script else self.default
        if callable(action):
            result = action(request, rec)
            if asyncio.iscoroutine(result):
                result = await result
            action = result
        if isinstance(action, web.StreamResponse):
            return action
        status, headers, text = (action, {}, "") if isinstance(action, int) else action
        if 200 <= status < 300:
            key = request.headers.get("Idempotency-Key", "")
            self.keys[key] = self.keys.get(key, 0) + 1
        return web.Response(
            status=status, headers=headers, text=text or orjson.dumps({"status": status}).decode()
        )

    async def wait_for(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.keys) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"sink saw {len(self.keys)} successful keys, expected {n}")
            await asyncio.sleep(0.02)


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner, s.url = await _start(app)
    yield s
    await runner.cleanup()


# ----------------------------------------------------------------------------- projects
SECRET_WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_TOKEN = "tok-s3cr3t-value-123456"


def write_project(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip())
    return root


def lead_project(
    root: Path,
    sink_url: str,
    *,
    delivery: dict[str, Any] | None = None,
    extra_dests: list[dict[str, Any]] | None = None,
    steps: str | None = None,
    hub: dict[str, Any] | None = None,
    dest: dict[str, Any] | None = None,
) -> Path:
    """The seed's lead-capture flow pointed at `sink_url`."""
    import yaml

    default_steps = """
      - name: normalise
        map:
          properties.email: "lower(trim(email || customer_email || properties.email))"
          properties.firstname: first_name
          properties.lead_source: "coalesce(utm_source, 'website')"
      - validate:
          properties.email: {required: true, format: email}
    """
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "crm": {
            "kind": "http",
            "owner": "sales",
            "url": sink_url,
            "allow_private_network": True,
            "auth": {"scheme": "bearer", "token": {"secret": "crm_token"}},
        },
    }
    flow = {
        "purpose": "leads reach the CRM",
        "owner": "sales",
        "trigger": {"webhook": {"system": "website"}},
        "record_key": "properties.email",
        "steps": yaml.safe_load(textwrap.dedent(steps if steps is not None else default_steps)) or [],
        "destinations": [
            {
                "name": "crm",
                "system": "crm",
                "path": "/contacts",
                **(dest or {}),
                **({"delivery": delivery} if delivery else {}),
            },
            *(extra_dests or []),
        ],
    }
    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0, **(hub or {})}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            "flows/lead-capture.yaml": yaml.safe_dump(flow, sort_keys=False),
        },
    )


def resolver() -> SecretResolver:
    env = {
        **os.environ,
        "PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC,
        "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN,
    }
    return SecretResolver(None, env)


@dataclass
class RunningHub:
    hub: Hub
    url: str
    root: Path
    runner: web.AppRunner

    @property
    def store(self) -> Any:
        assert self.hub.store is not None
        return self.hub.store

    async def post(
        self,
        flow_path: str,
        body: bytes | dict[str, Any],
        headers: dict[str, str] | None = None,
        sign: bool = True,
        msg_id: str | None = None,
    ) -> tuple[int, Any]:
        import aiohttp

        from patchbay.records import new_id
        from patchbay.security.webhook_auth import sign_standard_webhooks

        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        h = {"Content-Type": "application/json"}
        if sign:
            h.update(sign_standard_webhooks(SECRET_WHSEC, msg_id or new_id("msg"), int(time.time()), raw))
        h.update(headers or {})
        async with aiohttp.ClientSession() as s, s.post(self.url + flow_path, data=raw, headers=h) as r:
            text = await r.read()
            try:
                return r.status, orjson.loads(text)
            except orjson.JSONDecodeError:
                return r.status, text

    async def count(self, table: str = "events") -> int:
        return await self.store.read(lambda c: c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    async def run(self, event_id: str) -> dict[str, Any]:
        """The run as the CLI and the API show it (sensitive fields redacted)."""
        from patchbay.security.runs import redact_run, sensitive_paths

        run = await self.store.get_run(event_id)
        assert run is not None
        return redact_run(run, sensitive_paths(self.root).get(run["flow"], []))


HubFactory = Callable[..., Awaitable[RunningHub]]


@pytest.fixture
async def start_hub() -> AsyncIterator[HubFactory]:
    running: list[RunningHub] = []

    async def start(root: Path) -> RunningHub:
        if os.environ.get("PATCHBAY_TEST_STORE") == "postgres":  # the functional suites on PostgreSQL
            _use_postgres(root)
        project = load_or_raise(root)
        hub = Hub(project, resolver=resolver())
        await hub.start()
        try:
            runner, url = await _start(make_app(hub))
        except BaseException:
            await hub.stop()
            raise
        rh = RunningHub(hub, url, root, runner)
        running.append(rh)
        return rh

    yield start
    for rh in running:
        await rh.runner.cleanup()
        await rh.hub.stop()


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait until `check()` (a plain or an async function) is true; fail after `timeout` naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        ok = check()
        if (await ok) if inspect.isawaitable(ok) else ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def vault_hub(root: Path, secrets: dict[str, str]) -> AsyncIterator[tuple[RunningHub, Any]]:
    """A running hub of the project at `root` whose `secrets` live in its vault, with the JSON log going to
    a buffer (yielded beside the hub) so that a test can scan everything the hub wrote."""
    import io
    import logging

    from patchbay import logs
    from patchbay.security.project import open_project_secrets

    if os.environ.get("PATCHBAY_TEST_STORE") == "postgres":
        _use_postgres(root)
    vault, _ = open_project_secrets(root, create_key=True)
    assert vault is not None
    for name, value in secrets.items():
        vault.set(name, value)
    _, resolver = open_project_secrets(root)
    hub = Hub(load_or_raise(root), resolver=resolver)
    await hub.start()
    runner, url = await _start(make_app(hub))
    buf = io.StringIO()
    logs.setup("json", resolver.redactor, logging.DEBUG)
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_patchbay", False))
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buf)
    try:
        yield RunningHub(hub, url, root, runner), buf
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
        await runner.cleanup()
        await hub.stop()


# ----------------------------------------------------------------------------- a PostgreSQL store (issue 13)
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
_schemas: list[str] = []


_session_schemas: list[str] = []


def postgres_url(*, for_session: bool = False) -> str:
    """A PostgreSQL store URL with a fresh schema of its own, dropped at the end of the test (or of the
    session, for a hub a module-scoped fixture keeps); skips (fails under CI=true) when unreachable."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    schema = f"pb_test_{uuid.uuid4().hex[:16]}"
    (_session_schemas if for_session else _schemas).append(schema)
    return f"{PG_URL}?schema={schema}"


@pytest.fixture(autouse=True, scope="session")
def _drop_session_postgres_schemas() -> Iterator[None]:
    yield
    if not _session_schemas:
        return
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        for schema in _session_schemas:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _drop_postgres_schemas() -> Iterator[None]:
    yield
    if not _schemas:
        return
    import psycopg

    while _schemas:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{_schemas.pop()}" CASCADE')  # type: ignore[arg-type]


_pg_roots: dict[Path, str] = {}


def _use_postgres(root: Path) -> None:
    """Point the project at a fresh PostgreSQL store (once: a restart keeps it), so the hub and the CLI share it."""
    import yaml

    path = root / "patchbay.yaml"
    doc = yaml.safe_load(path.read_text()) if path.exists() else {}
    doc = doc or {}
    if not str(doc.get("store", "")).startswith("postgresql://"):
        # One store per project folder, also when a test rewrites patchbay.yaml between two starts.
        if root not in _pg_roots:
            _pg_roots[root] = postgres_url(for_session=True)  # a fixture may keep the hub past one test
        doc["store"] = _pg_roots[root]
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
