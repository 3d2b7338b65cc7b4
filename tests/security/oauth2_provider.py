"""A small OAuth2 provider and API on 127.0.0.1 for tests: RFC 6749 authorize and token endpoints
(authorization code with PKCE S256, refresh tokens rotated on every use, client credentials) and a
resource endpoint that takes only a live access token."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode

import orjson
from aiohttp import web

CLIENT_ID = "patchbay-test-client"
CLIENT_SECRET = "cs-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


@dataclass
class Grant:
    id: str
    scope: str
    revoked: bool = False


@dataclass
class Provider:
    url: str = ""
    redirect_uri: str = ""
    lifetime_s: int = 3600
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    refresh: dict[str, Grant] = field(default_factory=dict)  # live refresh token -> grant
    access: dict[str, tuple[Grant | None, float]] = field(
        default_factory=dict
    )  # token -> (grant, expires_at)
    issued: list[str] = field(default_factory=list)  # every token value handed out (for leak scans)
    token_calls: list[str] = field(default_factory=list)  # grant_type of each token request
    api_calls: list[tuple[int, Any]] = field(default_factory=list)  # (status, body) of each API request
    expired_calls: int = 0
    peers: set[Any] = field(
        default_factory=set
    )  # the client ends of the connections token and API requests came on

    # -- what a test does to the provider ----------------------------------------------------------
    def expire_access_tokens(self) -> None:
        """Every access token handed out so far stops working now (the client does not know)."""
        self.access = {t: (g, 0.0) for t, (g, _) in self.access.items()}

    def revoke_grants(self) -> None:
        """The user revoked the app: every grant, its refresh and access tokens are dead."""
        for g in self.refresh.values():
            g.revoked = True
        self.expire_access_tokens()

    # -- endpoints ------------------------------------------------------------------------------------
    async def authorize(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("client_id") != CLIENT_ID or q.get("redirect_uri") != self.redirect_uri:
            return web.json_response({"error": "invalid_request"}, status=400)
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256":
            return web.json_response({"error": "invalid_request"}, status=400)
        code = secrets.token_urlsafe(16)
        self.codes[code] = {
            "challenge": q["code_challenge"],
            "redirect_uri": q["redirect_uri"],
            "scope": q.get("scope", ""),
        }
        target = f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}"
        raise web.HTTPFound(target)

    def _client_ok(self, request: web.Request, form: Any) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            cid, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            return unquote(cid) == CLIENT_ID and unquote(secret) == CLIENT_SECRET
        return form.get("client_id") == CLIENT_ID and form.get("client_secret") == CLIENT_SECRET

    def _issue(self, grant: Grant | None, *, with_refresh: bool) -> web.Response:
        access = "at-" + secrets.token_urlsafe(24)
        self.access[access] = (grant, time.time() + self.lifetime_s)
        self.issued.append(access)
        doc: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": self.lifetime_s}
        if with_refresh and grant is not None:
            rt = "rt-" + secrets.token_urlsafe(24)
            self.refresh[rt] = grant
            self.issued.append(rt)
            doc["refresh_token"] = rt
            doc["scope"] = grant.scope
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    def _peer(self, request: web.Request) -> None:
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        self.token_calls.append(grant_type)
        self._peer(request)
        if not self._client_ok(request, form):
            return web.json_response({"error": "invalid_client"}, status=401)
        if grant_type == "authorization_code":
            code = self.codes.pop(str(form.get("code", "")), None)
            verifier = str(form.get("code_verifier", ""))
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
            if code is None or code["redirect_uri"] != form.get("redirect_uri"):
                return web.json_response({"error": "invalid_grant"}, status=400)
            if challenge.decode() != code["challenge"]:
                return web.json_response(
                    {"error": "invalid_grant", "error_description": "PKCE verification failed"}, status=400
                )
            return self._issue(Grant(secrets.token_hex(4), code["scope"]), with_refresh=True)
        if grant_type == "refresh_token":
            grant = self.refresh.pop(str(form.get("refresh_token", "")), None)  # rotated: good once
            if grant is None or grant.revoked:
                return web.json_response(
                    {"error": "invalid_grant", "error_description": "refresh token revoked"}, status=400
                )
            return self._issue(grant, with_refresh=True)
        if grant_type == "client_credentials":
            return self._issue(None, with_refresh=False)
        return web.json_response({"error": "unsupported_grant_type"}, status=400)

    async def api(self, request: web.Request) -> web.Response:
        self._peer(request)
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ")
        grant, expires_at = self.access.get(token, (None, 0.0))
        body = orjson.loads(await request.read() or b"null")
        if not header.startswith("Bearer ") or expires_at <= time.time():
            self.expired_calls += token in self.access
            self.api_calls.append((401, body))
            return web.json_response(
                {"error": "invalid_token", "you_sent": header},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        self.api_calls.append((201, body))
        if request.method == "GET":  # a list endpoint, for polling
            return web.json_response([{"id": len(self.api_calls), "you_sent": header}])
        # Echoes the credential, as some APIs do: what the hub keeps of this answer must hide it.
        return web.json_response({"id": len(self.api_calls), "you_sent": header}, status=201)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/authorize", self.authorize)
        app.router.add_post("/token", self.token)
        app.router.add_route("*", "/api/{tail:.*}", self.api)
        return app
