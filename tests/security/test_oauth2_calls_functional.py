"""A call step to an OAuth2 system (client credentials, a real provider on 127.0.0.1): a token that
expires between runs is renewed on the call's 401 without a failed call, and an answer that echoes the
access token is bound, stored and shown without it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web

from patchbay.connectors import oauth2_client as oauth2
from tests.conftest import RunningHub, eventually, lead_project
from tests.security.oauth2_provider import CLIENT_SECRET, Provider
from tests.security.test_oauth2_functional import FAST, _auth


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


STEPS = """
- name: find_contact
  call: {system: crm, method: GET, path: "/contacts?email={{ email }}", as: contact, select: {echo: "body[0].you_sent"}}
"""


async def test_a_call_renews_an_expired_token_and_never_keeps_it(
    tmp_path: Path, provider: Provider, start_hub, monkeypatch
) -> None:
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_CLIENT_SECRET", CLIENT_SECRET)
    root = lead_project(
        tmp_path,
        f"{provider.url}/api",
        steps=STEPS,
        delivery=FAST,
        hub={"delivery": FAST},
        dest={"body": {"email": "email", "echo": "contact.echo"}},
    )
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["crm"]["auth"] = _auth(provider, oauth2.CLIENT_CREDENTIALS)
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    hub: RunningHub = await start_hub(root)

    async def run_of(email: str) -> Any:
        _, body = await hub.post("/hooks/lead-capture", {"email": email})

        async def done() -> bool:
            return (await hub.run(body["event_id"]))["status"] == "delivered"

        await eventually(done, what=f"{email} delivered")
        return await hub.run(body["event_id"])

    first = await run_of("ada@example.com")
    provider.expire_access_tokens()  # the hub does not know: its next call gets a 401
    second = await run_of("grace@example.com")

    assert provider.token_calls == ["client_credentials"] * 2  # renewed once, on the 401
    statuses = [code for code, _ in provider.api_calls]
    assert statuses.count(401) == 1 and statuses[-1] == 201
    for run in (first, second):
        outcomes = [a["outcome"] for d in run["deliveries"] for a in d["attempts_log"]]
        assert outcomes == ["success", "success"]  # no failed attempt: the renewal is inside the call
    stored = orjson.dumps([first, second]).decode()
    for token in provider.issued:
        assert token not in stored  # not in the bound answer, the trace, the response fields, the excerpts
    delivered = [body for code, body in provider.api_calls if code == 201 and body is not None]
    assert all(token not in orjson.dumps(delivered).decode() for token in provider.issued)
