"""OAuth2 against a real provider on 127.0.0.1 (tests/security/oauth2_provider.py): `patchbay connect`,
the hub's callback, tokens in the vault, refresh before expiry and once on a 401, rotation, a revoked
grant pausing the destination with an alert, client credentials; and no token anywhere it may be read."""

from __future__ import annotations

import io
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner

from patchbay import logs
from patchbay.cli import main
from patchbay.config.models import DeliveryPolicy, SecretRef
from patchbay.config.project import load_or_raise
from patchbay.connectors import oauth2_client as oauth2
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.http import HttpSink, HttpSinkConfig, HttpSystem
from patchbay.connectors.http_poll import HttpPollConfig, HttpPollSource
from patchbay.engine.hub import Hub
from patchbay.errors import AuthError
from patchbay.security.project import open_project_secrets
from patchbay.security.secrets import Redactor
from patchbay.security.tokens import create_token
from patchbay.security.vault import MasterKey, Vault
from patchbay.server.app import make_app
from patchbay.store.base import Actor
from patchbay.store.secrets import SqliteSecretRows
from tests.conftest import SECRET_WHSEC, RunningHub, eventually, lead_project
from tests.security.oauth2_provider import CLIENT_ID, CLIENT_SECRET, Provider

FAST = {"timeout_s": 5, "retry": {"schedule": ["100ms"], "jitter": 0}}
FLOW = "lead-capture"


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    p = Provider()
    runner = web.AppRunner(p.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    p.url = f"http://{host}:{port}"
    yield p
    await runner.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _auth(provider: Provider, scheme: str = oauth2.AUTHORIZATION_CODE, **more: Any) -> dict[str, Any]:
    auth: dict[str, Any] = {
        "scheme": scheme,
        "token_url": f"{provider.url}/token",
        "client_id": CLIENT_ID,
        "client_secret": {"secret": "crm_client_secret"},
        "scopes": ["contacts.write", "contacts.read"],
        **more,
    }
    if scheme == oauth2.AUTHORIZATION_CODE:
        auth |= {"authorize_url": f"{provider.url}/authorize", "redirect_uri": provider.redirect_uri}
    return auth


@pytest.fixture
async def oauth_hub(tmp_path: Path, provider: Provider) -> AsyncIterator[tuple[RunningHub, io.StringIO]]:
    """The lead flow's CRM behind OAuth2 authorization code; the hub serves its callback on a known port."""
    port = _free_port()
    provider.redirect_uri = f"http://127.0.0.1:{port}/oauth/callback"
    root = lead_project(tmp_path / "proj", f"{provider.url}/api", delivery=FAST)
    systems_file = root / "systems.yaml"
    systems = yaml.safe_load(systems_file.read_text())
    systems["crm"]["auth"] = _auth(provider)
    systems_file.write_text(yaml.safe_dump(systems, sort_keys=False))
    vault, _ = open_project_secrets(root, create_key=True)
    assert vault is not None
    vault.set("website_whsec", SECRET_WHSEC)
    vault.set("crm_client_secret", CLIENT_SECRET)
    _, resolver = open_project_secrets(root)
    hub = Hub(load_or_raise(root), resolver=resolver)
    await hub.start()
    runner = web.AppRunner(make_app(hub), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    buf = io.StringIO()
    logs.setup("json", resolver.redactor, logging.DEBUG)
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_patchbay", False))
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buf)
    try:
        yield RunningHub(hub, f"http://127.0.0.1:{port}", root, runner), buf
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
        await runner.cleanup()
        await hub.stop()


async def _connect(root: Path, outputs: dict[str, str]) -> str:
    """What a user does: run `patchbay connect crm`, open the URL, consent; returns the callback page."""
    res = CliRunner().invoke(main, ["connect", "crm", "-p", str(root)])
    assert res.exit_code == 0, res.output
    outputs[f"connect {len(outputs)}"] = res.output
    url = next(line for line in res.output.splitlines() if line.startswith("http"))
    q = parse_qs(urlsplit(url).query)
    assert q["code_challenge_method"] == ["S256"] and len(q["state"][0]) >= 32
    assert "code_verifier" not in url
    async with aiohttp.ClientSession() as s:
        async with s.get(url, allow_redirects=False) as r:  # the provider's consent page says yes
            assert r.status == 302
            callback = r.headers["Location"]
        async with s.get(callback) as r:  # the browser follows to the hub
            page = await r.text()
            assert r.status == 200, page
    outputs[f"callback {len(outputs)}"] = page
    return page


async def _attempts(hub: RunningHub) -> list[str]:
    return await hub.store.read(
        lambda c: [r[0] for r in c.execute("SELECT outcome FROM attempts ORDER BY id")]
    )


async def _delivered(hub: RunningHub, n: int) -> None:
    async def done() -> bool:
        rows = await hub.store.read(
            lambda c: c.execute("SELECT COUNT(*) FROM deliveries WHERE status = 'delivered'").fetchone()[0]
        )
        return bool(rows >= n)

    await eventually(done, what=f"{n} deliveries delivered")


async def test_connect_refresh_mid_run_revoke_and_no_token_shown(oauth_hub, provider, caplog):
    hub, log_buf = oauth_hub
    caplog.set_level(logging.DEBUG)
    outputs: dict[str, str] = {}

    page = await _connect(hub.root, outputs)
    assert "crm connected" in page
    vault, _ = open_project_secrets(hub.root)
    assert vault is not None
    assert not [s.name for s in vault.list() if s.name.startswith(oauth2.PENDING_PREFIX)]  # used up
    first = oauth2.Tokens.loads(vault.get("oauth2.crm") or "")
    assert first.refresh_token in provider.refresh

    # The callback's state is good once: a replayed callback stores nothing.
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{hub.url}/oauth/callback?code=x&state={'A' * 43}") as r:
            assert r.status == 400 and "no connection is waiting" in await r.text()

    for i in range(3):
        status, _ = await hub.post(f"/hooks/{FLOW}", {"email": f"a{i}@example.com"})
        assert status == 202
    await _delivered(hub, 3)

    # Mid-run the provider expires every access token: the next call gets 401, the hub refreshes
    # once for all of them (the refresh token rotates) and sends again; no attempt fails.
    provider.expire_access_tokens()
    for i in range(3):
        status, _ = await hub.post(f"/hooks/{FLOW}", {"email": f"b{i}@example.com"})
        assert status == 202
    await _delivered(hub, 6)
    assert 1 <= provider.expired_calls <= 3  # deliveries in flight together each met the 401
    assert provider.token_calls == ["authorization_code", "refresh_token"]
    assert await _attempts(hub) == ["success"] * 6
    rotated = oauth2.Tokens.loads(vault.get("oauth2.crm") or "")
    assert rotated.refresh_token != first.refresh_token and rotated.refresh_token in provider.refresh
    assert first.refresh_token not in provider.refresh

    # The user revokes the app: the refresh is refused (invalid_grant), the destination pauses with
    # an alert, and the lead waits (not dead).
    provider.revoke_grants()
    status, body = await hub.post(f"/hooks/{FLOW}", {"email": "c@example.com"})
    waiting = body["event_id"]

    async def paused() -> bool:
        states = await hub.store.destination_states()
        return bool(states.get((FLOW, "crm"), ("active",))[0] == "paused")

    await eventually(paused, what="destination paused")
    state = (await hub.store.destination_states())[(FLOW, "crm")]
    assert "invalid_grant" in state[1] and "patchbay connect crm" in state[1]
    assert (await _attempts(hub))[-1] == "auth"
    assert (await hub.run(waiting))["status"] == "pending"
    alerts = [r.getMessage() for r in caplog.records if r.name == "patchbay.alert"]
    assert any("ALERT destination crm" in m and "invalid_grant" in m for m in alerts), alerts

    # Reconnect and resume: the waiting lead goes out with the new grant.
    await _connect(hub.root, outputs)
    await hub.hub.set_state(FLOW, "crm", "active")
    await _delivered(hub, 7)
    assert (
        provider.api_calls[-1][0] == 201
        and provider.api_calls[-1][1]["properties"]["email"] == "c@example.com"
    )

    # Nothing a person or program can read shows a token: API answers, CLI output, logs, the store file.
    token, _ = await create_token(hub.store, "scan", ["admin"], None, Actor("test"))
    api: dict[str, str] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        for path in ("runs", f"runs/{waiting}", "systems", "secrets", "audit", "flows/lead-capture"):
            async with s.get(f"{hub.url}/api/v1/{path}") as r:
                api[path] = await r.text()
                assert r.status == 200, (path, api[path])
    for args in (["runs", "show", waiting], ["runs", "--json"], ["secrets", "list"]):
        outputs[" ".join(args)] = CliRunner().invoke(main, [*args, "-p", str(hub.root)]).output
    run = await hub.run(waiting)
    excerpts = [a["excerpt"] for d in run["deliveries"] for a in d["attempts_log"]]
    assert any("Bearer [secret]" in e for e in excerpts), (
        excerpts
    )  # the API echoed it: the scan is not vacuous

    needles = {f"token {i}": t for i, t in enumerate(provider.issued)} | {"client secret": CLIENT_SECRET}
    assert len(provider.issued) == 6  # 3 access and 3 refresh tokens
    texts = {
        **{f"API {k}": v for k, v in api.items()},
        **{f"`patchbay {k}`": v for k, v in outputs.items()},
        "JSON log": log_buf.getvalue(),
        "log records": "\n".join(r.getMessage() for r in caplog.records),
    }
    store = hub.root / ".patchbay" / "patchbay.db"
    files = {p.name: p.read_bytes() for p in (store, Path(f"{store}-wal")) if p.exists()}
    found = [
        f"{name} in {where}"
        for where, data in [*texts.items(), *files.items()]
        for name, value in needles.items()
        if value.encode() in (data if isinstance(data, bytes) else data.encode())
    ]
    assert found == [], "\n".join(found)


async def test_token_is_refreshed_before_it_expires(tmp_path, provider):
    """With a clock near the token's expiry, the hub refreshes first: the API never answers 401."""
    provider.redirect_uri = "http://127.0.0.1:9/oauth/callback"
    provider.lifetime_s = 100
    auth = HttpSystem.model_validate({"url": provider.url, "auth": _auth(provider)}).auth
    assert auth is not None
    vault = Vault.at(tmp_path / "vault.db", [MasterKey.generate()])
    vault.ensure_schema()
    redactor = Redactor()
    res = Resources(
        secret=lambda ref: CLIENT_SECRET,
        redact=redactor,
        system="crm",
        allow_private=True,
        extra={"vault": vault},
    )
    url = oauth2.begin(vault, "crm", auth)
    async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False) as r:
        q = parse_qs(urlsplit(r.headers["Location"]).query)
    pending = oauth2.take_pending(vault, q["state"][0])
    await oauth2.finish(res, auth, pending, q["code"][0])
    clock = [provider.access[provider.issued[0]][1] - 100]  # when the first token was issued
    source = await oauth2.source_for(res, auth)
    source._now = lambda: clock[0]
    first = await source.access_token(res)
    assert first == provider.issued[0]
    clock[0] += 50  # half its life: still used
    assert await source.access_token(res) == first
    clock[0] += 30  # 20 s left, inside the margin (a quarter of 100 s): refreshed without a 401
    second = await source.access_token(res)
    assert second != first and provider.token_calls == ["authorization_code", "refresh_token"]
    assert redactor(f"x {second} y") == "x [secret] y"
    stored = oauth2.Tokens.loads(vault.get("oauth2.crm") or "")
    assert stored.access_token == second and stored.refresh_token in provider.refresh
    with pytest.raises(oauth2.OAuth2Error, match="no connection is waiting"):
        oauth2.take_pending(vault, q["state"][0])  # the state was used up
    await res.http.close() if res.http else None


async def test_client_credentials(provider):
    system = HttpSystem.model_validate(
        {"url": f"{provider.url}/api", "auth": _auth(provider, oauth2.CLIENT_CREDENTIALS, client_auth="post")}
    )
    secret = [CLIENT_SECRET]
    res = Resources(secret=lambda ref: secret[0], system="billing", allow_private=True)
    sink = HttpSink(system, HttpSinkConfig(path="/invoices"), DeliveryPolicy(), res)
    try:
        assert (await sink.send(sink.render({"n": 1}, "k1"), "k1")).cls is OutcomeClass.SUCCESS
        assert (await sink.send(sink.render({"n": 2}, "k2"), "k2")).cls is OutcomeClass.SUCCESS
        assert provider.token_calls == ["client_credentials"]  # kept while it lives
        provider.expire_access_tokens()
        assert (await sink.send(sink.render({"n": 3}, "k3"), "k3")).cls is OutcomeClass.SUCCESS
        assert provider.token_calls == ["client_credentials"] * 2 and provider.expired_calls == 1
        # A wrong client secret: the destination is paused (AUTH), with the provider's reason.
        provider.expire_access_tokens()
        secret[0] = "wrong"
        out = await sink.send(sink.render({"n": 4}, "k4"), "k4")
        assert out.cls is OutcomeClass.AUTH and "invalid_client" in out.error and "wrong" not in out.error
    finally:
        assert res.http is not None
        await res.http.close()


async def test_unreachable_token_endpoint_is_retried_not_paused(provider):
    auth = _auth(provider, oauth2.CLIENT_CREDENTIALS)
    auth["token_url"] = f"http://127.0.0.1:{_free_port()}/token"
    system = HttpSystem.model_validate({"url": f"{provider.url}/api", "auth": auth})
    res = Resources(secret=lambda ref: CLIENT_SECRET, system="billing", allow_private=True)
    sink = HttpSink(system, HttpSinkConfig(), DeliveryPolicy(), res)
    try:
        out = await sink.send(sink.render({}, "k"), "k")
        assert out.cls is OutcomeClass.TRANSIENT and "cannot connect" in out.error
    finally:
        assert res.http is not None
        await res.http.close()


async def test_the_token_endpoint_is_behind_the_address_guard(provider):
    """The token request goes out on the system's guarded connections, like its API calls: a token_url on
    loopback is refused before connecting, and the destination pauses (AUTH) saying which setting opens it."""
    system = HttpSystem.model_validate(
        {"url": f"{provider.url}/api", "auth": _auth(provider, oauth2.CLIENT_CREDENTIALS)}
    )
    res = Resources(secret=lambda ref: CLIENT_SECRET, system="billing")
    sink = HttpSink(system, HttpSinkConfig(), DeliveryPolicy(), res)
    try:
        out = await sink.send(sink.render({}, "k"), "k")
    finally:
        assert res.http is not None
        await res.http.close()
    assert out.cls is OutcomeClass.AUTH
    assert "getting a token at http://127.0.0.1:" in out.error
    assert "connecting to 127.0.0.1 is blocked: loopback address" in out.error
    assert provider.token_calls == [] and CLIENT_SECRET not in out.error


async def test_token_requests_share_the_systems_kept_alive_connections(provider):
    """Token and API requests of one system ride the same kept-alive connection to a server they share."""
    system = HttpSystem.model_validate(
        {"url": f"{provider.url}/api", "auth": _auth(provider, oauth2.CLIENT_CREDENTIALS)}
    )
    res = Resources(secret=lambda ref: CLIENT_SECRET, system="billing", allow_private=True)
    sink = HttpSink(system, HttpSinkConfig(path="/invoices"), DeliveryPolicy(), res)
    try:
        for n in range(3):
            provider.expire_access_tokens()  # each send first asks for a new token (after a 401)
            out = await sink.send(sink.render({"n": n}, f"k{n}"), f"k{n}")
            assert out.cls is OutcomeClass.SUCCESS, out.error
    finally:
        assert res.http is not None
        await res.http.close()
    assert provider.token_calls == ["client_credentials"] * 3
    assert len(provider.peers) == 1, provider.peers


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"scheme": "oauth2_client_credentials", "client_id": "a"}, "needs `token_url`, `client_secret`"),
        (
            {"scheme": "oauth2_authorization_code", "token_url": "https://x.example/t", "client_id": "a"},
            "needs `authorize_url`, `redirect_uri`",
        ),
        (
            {
                "scheme": "oauth2_client_credentials",
                "token_url": "ftp://x",
                "client_id": "a",
                "client_secret": {"secret": "s"},
            },
            "bad URL 'ftp://x'",
        ),
    ],
)
def test_incomplete_oauth2_auth_is_refused_with_what_to_add(auth, message):
    with pytest.raises(ValueError, match=message):
        HttpSystem.model_validate({"url": "https://api.example.com", "auth": auth})


def test_connect_refuses_a_system_without_authorization_code(tmp_path):
    root = lead_project(tmp_path / "proj", "http://127.0.0.1:9")
    res = CliRunner().invoke(main, ["connect", "crm", "-p", str(root)])
    assert res.exit_code == 1 and "does not use `auth: {scheme: oauth2_authorization_code}`" in res.output
    res = CliRunner().invoke(main, ["connect", "nope", "-p", str(root)])
    assert res.exit_code == 1 and "no system 'nope'" in res.output


def test_secret_ref_in_auth_is_declared_by_the_system():
    system = HttpSystem.model_validate(
        {
            "url": "https://api.example.com",
            "auth": {
                "scheme": "oauth2_client_credentials",
                "token_url": "https://api.example.com/token",
                "client_id": "a",
                "client_secret": {"secret": "s"},
            },
        }
    )
    assert system.auth is not None and system.auth.client_secret == SecretRef(secret="s")


async def test_polling_source_uses_the_token_and_pauses_on_a_refused_client(provider):
    system = HttpSystem.model_validate(
        {"url": f"{provider.url}/api", "auth": _auth(provider, oauth2.CLIENT_CREDENTIALS)}
    )
    secret = [CLIENT_SECRET]
    res = Resources(secret=lambda ref: secret[0], system="crm", allow_private=True)
    src = HttpPollSource(system, HttpPollConfig(path="/contacts"), res)
    try:
        [batch] = [b async for b in src.poll(None)]
        assert len(batch.records) == 1 and provider.token_calls == ["client_credentials"]
        provider.expire_access_tokens()
        secret[0] = "wrong"
        with pytest.raises(AuthError, match="invalid_client"):
            [b async for b in src.poll(None)]
    finally:
        assert res.http is not None
        await res.http.close()


def test_pending_grants_hide_their_state_and_expire(tmp_path, provider):
    provider.redirect_uri = "http://127.0.0.1:9/oauth/callback"
    auth = HttpSystem.model_validate({"url": provider.url, "auth": _auth(provider)}).auth
    assert auth is not None
    clock = [1000.0]
    vault = Vault(SqliteSecretRows(tmp_path / "vault.db"), [MasterKey.generate()], now=lambda: clock[0])
    vault.ensure_schema()
    old_url = oauth2.begin(vault, "crm", auth, now=clock[0])
    old_state = parse_qs(urlsplit(old_url).query)["state"][0]
    names = [s.name for s in vault.list()]
    assert len(names) == 1 and old_state not in names[0]  # listing the vault does not give the state away
    clock[0] = time.time()
    url = oauth2.begin(vault, "crm", auth)  # the first one's 10 minutes are long over: cleared
    state = parse_qs(urlsplit(url).query)["state"][0]
    assert [s.name for s in vault.list()] == [oauth2.pending_name(state)]
    with pytest.raises(oauth2.OAuth2Error, match="no connection is waiting"):
        oauth2.take_pending(vault, old_state)
    with pytest.raises(oauth2.OAuth2Error, match="more than 10 minutes ago"):
        oauth2.take_pending(vault, state, now=time.time() + oauth2.PENDING_TTL_S + 1)
    with pytest.raises(oauth2.OAuth2Error, match="missing or malformed"):
        oauth2.take_pending(vault, "x' OR 1=1")


async def test_a_system_never_connected_pauses_with_what_to_run(tmp_path, provider):
    provider.redirect_uri = "http://127.0.0.1:9/oauth/callback"
    system = HttpSystem.model_validate({"url": f"{provider.url}/api", "auth": _auth(provider)})
    vault = Vault.at(tmp_path / "vault.db", [MasterKey.generate()])
    vault.ensure_schema()
    res = Resources(
        secret=lambda ref: CLIENT_SECRET, system="crm", allow_private=True, extra={"vault": vault}
    )
    sink = HttpSink(system, HttpSinkConfig(), DeliveryPolicy(), res)
    try:
        out = await sink.send(sink.render({}, "k"), "k")
        assert out.cls is OutcomeClass.AUTH
        assert "system crm is not connected: run `patchbay connect crm`" in out.error
        assert provider.token_calls == [] and provider.api_calls == []  # nothing was sent without a token
    finally:
        assert res.http is not None
        await res.http.close()
