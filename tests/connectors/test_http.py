"""http as a destination: rendering at ingest, credentials at send time, response classes on a real socket."""

from __future__ import annotations

import asyncio
import base64
import ssl

import pytest
from aiohttp import web

from patchbay.config.models import DeliveryPolicy, SecretRef
from patchbay.connectors import tls_client
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.http import HttpSink, HttpSinkConfig, HttpSystem
from patchbay.errors import SecretMissing
from tests.conftest import _start
from tests.connectors import self_signed

TOKEN = "tok-abc-123456"


def sink(url: str, auth=None, resources: Resources | None = None, **dest) -> HttpSink:
    system = HttpSystem.model_validate({"url": url, **({"auth": auth} if auth else {})})
    res = resources or Resources(secret=lambda ref: TOKEN, allow_private=True)
    return HttpSink(
        system, HttpSinkConfig.model_validate(dest), DeliveryPolicy.model_validate({"timeout_s": 0.5}), res
    )


def test_render_templates_the_url_quotes_values_and_keeps_no_credentials():
    s = sink(
        "https://crm.example.com/api",
        auth={"scheme": "bearer", "token": {"secret": "t"}},
        path="/contacts/{{ email }}",
        headers={"X-Source": "{{ source }}"},
        body={"contact.email": "email", "contact.tags": "split(tags, ',')"},
    )
    req = s.render({"email": "a b/c@x.com", "source": "web", "tags": "x,y"}, "evt_1.crm")
    assert req["url"] == "https://crm.example.com/api/contacts/a%20b%2Fc%40x.com"
    assert req["headers"] == {"X-Source": "web"}
    assert req["body"] == '{"contact":{"email":"a b/c@x.com","tags":["x","y"]}}'
    assert TOKEN not in str(req)


def test_body_as_one_expression_and_default_record():
    assert (
        sink("https://x.test", body="properties").render({"properties": {"a": 1}}, "k")["body"] == '{"a":1}'
    )
    assert sink("https://x.test").render({"a": 1}, "k")["body"] == '{"a":1}'
    assert "body" not in sink("https://x.test", method="GET").render({"a": 1}, "k")


def test_auth_headers_per_scheme():
    assert sink(
        "https://x.test", auth={"scheme": "bearer", "token": {"secret": "t"}}
    ).client.auth_headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert sink(
        "https://x.test", auth={"scheme": "api_key", "header": "X-Key", "token": {"secret": "t"}}
    ).client.auth_headers() == {"X-Key": TOKEN}
    basic = sink(
        "https://x.test", auth={"scheme": "basic", "username": "u", "password": {"secret": "p"}}
    ).client.auth_headers()
    assert base64.b64decode(basic["Authorization"].split()[1]) == f"u:{TOKEN}".encode()


def test_a_credential_not_declared_is_refused():
    from patchbay.security.secrets import SecretResolver

    resolver = SecretResolver(None, {"PATCHBAY_SECRET_T": TOKEN, "PATCHBAY_SECRET_OTHER": "nope-nope"})
    scoped = resolver.scoped([SecretRef(secret="t")])
    assert scoped(SecretRef(secret="t")) == TOKEN
    with pytest.raises(SecretMissing):
        scoped(SecretRef(secret="other"))


@pytest.fixture
async def server():
    seen: list[web.Request] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"id": 1}, status=201)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    async def echo_secret(request: web.Request) -> web.Response:
        return web.Response(status=400, text=f"bad token {request.headers['Authorization']}")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/moved", moved)
    app.router.add_post("/slow", slow)
    app.router.add_post("/echo", echo_secret)
    runner, url = await _start(app)
    yield url, seen
    await runner.cleanup()


async def send(s: HttpSink, key: str = "evt_1.d"):
    try:
        return await s.send(s.render({"a": 1}, key), key)
    finally:
        if s.resources.http is not None:
            await s.resources.http.close()


async def test_a_private_ca_is_trusted_and_its_context_built_once(tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path, "localhost")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({}, status=201)

    app = web.Application()
    app.router.add_post("/ok", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=served)
    await site.start()
    port = runner.addresses[0][1]
    tls_client.forget()
    built: list[object] = []
    real_build = tls_client.build
    monkeypatch.setattr(tls_client, "build", lambda s: built.append(s) or real_build(s))
    try:
        system = HttpSystem(url=f"https://localhost:{port}", ca_bundle=str(cert))
        s = HttpSink(system, HttpSinkConfig(path="/ok"), DeliveryPolicy(), Resources(allow_private=True))
        outcomes = [await s.send(s.render({"a": 1}, "k"), "k") for _ in range(3)]
        assert [o.cls for o in outcomes] == [OutcomeClass.SUCCESS] * 3, outcomes
        assert len(built) == 1
        untrusted = HttpSink(
            HttpSystem(url=f"https://localhost:{port}"),
            HttpSinkConfig(path="/ok"),
            DeliveryPolicy(),
            s.resources,
        )
        out = await untrusted.send(untrusted.render({"a": 1}, "k"), "k")
        assert out.cls is OutcomeClass.TRANSIENT and "certificate" in out.error.lower(), out
    finally:
        tls_client.forget()
        if s.resources.http is not None:
            await s.resources.http.close()
        await runner.cleanup()


async def test_send_carries_the_key_and_credential(server):
    url, seen = server
    out = await send(sink(url, auth={"scheme": "bearer", "token": {"secret": "t"}}, path="/ok"), "evt_9.crm")
    assert (out.cls, out.status_code) == (OutcomeClass.SUCCESS, 201)
    assert seen[0].headers["Idempotency-Key"] == "evt_9.crm"
    assert seen[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_redirects_are_followed_only_when_allowed(server):
    url, _ = server
    assert (await send(sink(url, path="/moved"))).cls is OutcomeClass.TERMINAL
    s = sink(url, path="/moved")
    s.policy = DeliveryPolicy.model_validate({"follow_redirects": True})
    # aiohttp turns a followed POST 302 into a GET: /ok only takes POST, so the answer is 405 (terminal)
    assert (await send(s)).status_code in (201, 405)


async def test_timeout_and_refused_connection_are_transient(server):
    url, _ = server
    out = await send(sink(url, path="/slow"))
    assert out.cls is OutcomeClass.TRANSIENT and "timed out" in out.error
    out = await send(sink("http://127.0.0.1:9", path="/x"))
    assert out.cls is OutcomeClass.TRANSIENT


async def test_a_secret_echoed_by_the_remote_is_redacted(server):
    from patchbay.security.secrets import SecretResolver

    url, _ = server
    resolver = SecretResolver(None, {"PATCHBAY_SECRET_T": TOKEN})
    res = Resources(
        secret=resolver.scoped([SecretRef(secret="t")]), redact=resolver.redactor, allow_private=True
    )
    out = await send(
        sink(url, auth={"scheme": "bearer", "token": {"secret": "t"}}, resources=res, path="/echo")
    )
    assert out.cls is OutcomeClass.TERMINAL
    assert TOKEN not in out.excerpt and "[secret]" in out.excerpt
