"""Fixtures for the REST API: a running hub with a vault, tokens of each kind, and a JSON client."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from patchbay.security.tokens import create_token, revoke_token
from patchbay.store.base import Actor
from tests.conftest import RunningHub, lead_project

FAST = {"timeout_s": 0.5, "retry": {"schedule": ["100ms", "100ms"], "jitter": 0}}


@dataclass
class Api:
    """A JSON client of one running hub's API, with a token per role."""

    hub: RunningHub
    session: aiohttp.ClientSession
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.hub.root

    async def token(self, name: str, *scopes: str, expires_at: float | None = None) -> str:
        text, _ = await create_token(self.hub.store, name, scopes, expires_at, Actor("test"))
        self.tokens[name] = text
        return text

    async def revoke(self, text: str) -> None:
        await revoke_token(self.hub.store, text)

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "admin",
        json: Any = None,
        params: dict[str, Any] | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        h = dict(headers or {})
        if token is not None:
            h.setdefault("Authorization", f"Bearer {self.tokens.get(token, token)}")
        if json is not None:
            data = orjson.dumps(json)
            h.setdefault("Content-Type", "application/json")
        url = self.hub.url + (path if path.startswith("/") else f"/api/v1/{path}")
        async with self.session.request(method, url, data=data, params=params, headers=h) as r:
            raw = await r.read()
            try:
                return r.status, orjson.loads(raw)
            except orjson.JSONDecodeError:
                return r.status, raw.decode()

    async def get(self, path: str, **kw: Any) -> Any:
        status, body = await self.call("GET", path, **kw)
        assert status == 200, (status, body)
        return body

    async def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        status, body = await self.call("POST", path, json=json, **kw)
        assert status in (200, 201), (status, body)
        return body


def make_vault(root: Path) -> None:
    """A master key and the two secrets the lead project references, as `patchbay secrets set` would."""
    from patchbay.security.project import open_project_secrets
    from tests.conftest import SECRET_TOKEN, SECRET_WHSEC

    if os.environ.get("PATCHBAY_TEST_STORE") == "postgres":  # the vault beside the hub's store
        from tests.conftest import _use_postgres

        _use_postgres(root)
    vault, _ = open_project_secrets(root, create_key=True)
    assert vault is not None
    vault.set("website_whsec", SECRET_WHSEC)
    vault.set("crm_token", SECRET_TOKEN)


@pytest.fixture
async def api_for(start_hub) -> AsyncIterator[Any]:
    """Start a hub on a project folder and return an `Api` with admin and read-only tokens."""
    sessions: list[aiohttp.ClientSession] = []

    async def start(root: Path) -> Api:
        make_vault(root)
        hub = await start_hub(root)
        session = aiohttp.ClientSession()
        sessions.append(session)
        api = Api(hub, session)
        await api.token("admin", "admin")
        await api.token("reader", "flows:read", "runs:read")
        return api

    yield start
    for s in sessions:
        await s.close()


@pytest.fixture
async def api(tmp_path, sink, api_for) -> Api:
    return await api_for(lead_project(tmp_path, sink.url, delivery=FAST))


def lead(n: int) -> dict[str, str]:
    return {"email": f"lead-{n}@example.com", "first_name": f"L{n}"}


def past(seconds: float) -> float:
    return time.time() - seconds
