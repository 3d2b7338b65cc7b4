"""The REST API's router: authenticate, check the scope, validate, call the handler, validate the answer.

Each endpoint is one row of `Api.endpoints()`: route, scope, models. One wrapper does the rest in a
fixed order: authenticate (401), check the scope (403), validate path, query and body (400/422),
run the handler, validate the answer against its model. Errors are JSON `{"error", "message"}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from patchbay.engine.hub import Hub
from patchbay.security.tokens import TokenError, TokenInfo, parse_bearer, verify
from patchbay.server.api.endpoints import Handlers, endpoints
from patchbay.server.api.http import (
    PREFIX,
    ApiError,
    Call,
    _json,
    _query_dict,
    _read_json,
    _validate,
    error_response,
)
from patchbay.server.openapi import Endpoint, build_openapi
from patchbay.store.base import Store

log = logging.getLogger("patchbay.api")

TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per token
_OPENAPI: dict[str, Any] = {}


class Api:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.handlers = Handlers.of(hub)
        self._touched: dict[str, float] = {}
        if not _OPENAPI:  # the same for every hub; building it takes a few hundred ms
            from importlib.metadata import PackageNotFoundError, version

            try:
                v = version("patchbay")
            except PackageNotFoundError:
                v = "0"
            doc = build_openapi(self.endpoints(), version=v)
            _OPENAPI.update(doc=doc, body=orjson.dumps(doc))
        self.openapi: dict[str, Any] = _OPENAPI["doc"]
        self._openapi_body: bytes = _OPENAPI["body"]

    # ================================================================== plumbing
    @property
    def store(self) -> Store:
        if self.hub.store is None:
            raise ApiError(503, "not_ready", "the hub is starting; try again in a moment")
        return self.hub.store

    async def authenticate(self, request: web.Request) -> TokenInfo:
        presented = parse_bearer(request.headers.get("Authorization"))
        store = self.store
        info = await verify(store, presented)
        now = time.time()
        if now - self._touched.get(info.id, 0.0) >= TOUCH_EVERY_S:
            self._touched[info.id] = now
            await store.touch_token(info.id, now)
            info = dataclasses.replace(info, last_used_at=now)
        return info

    def wrap(self, ep: Endpoint) -> Any:
        async def handle(request: web.Request) -> web.Response:
            try:
                try:
                    token = await self.authenticate(request)
                except TokenError as exc:
                    challenge = 'Bearer realm="patchbay", error="invalid_token"'
                    return error_response(401, exc.code, str(exc), {"WWW-Authenticate": challenge})
                if not token.allows(ep.scope):
                    return error_response(
                        403,
                        "insufficient_scope",
                        f"this endpoint needs a token with scope {ep.scope}"
                        f"{'' if ep.scope == 'admin' else ' (or admin)'}; token {token.id} "
                        f"({token.name}) has {', '.join(token.scopes)}",
                        {
                            "WWW-Authenticate": f'Bearer realm="patchbay", error="insufficient_scope", '
                            f'scope="{ep.scope}"'
                        },
                        scope=ep.scope,
                    )
                path = _validate(ep.path_params, dict(request.match_info), "path")
                query = _validate(ep.query, _query_dict(request), "query") if ep.query is not None else None
                body = _validate(ep.body, await _read_json(request), "body") if ep.body is not None else None
                result = await ep.handler(Call(request, token, path, query, body))
                if ep.response is not None:
                    data = ep.response.model_validate(result).model_dump(mode="json")
                else:
                    data = result
                return _json(ep.status, data)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message, **exc.extra)
            except (asyncio.CancelledError, web.HTTPException):
                raise
            except Exception:
                log.exception("API %s %s failed", request.method, request.path)
                return error_response(
                    500, "internal_error", "the hub failed to answer this request; see its log"
                )

        handle.__name__ = ep.operation_id
        return handle

    def mount(self, app: web.Application) -> None:
        for ep in self.endpoints():
            app.router.add_route(ep.method, ep.path, self.wrap(ep))

        async def openapi(_: web.Request) -> web.Response:
            return web.Response(body=self._openapi_body, content_type="application/json")

        app.router.add_get(PREFIX + "/openapi.json", openapi)

    def endpoints(self) -> list[Endpoint]:
        return endpoints(self.handlers)


def add_api(app: web.Application, hub: Hub) -> Api:
    """Mount the REST API (and its OpenAPI document) on the hub's aiohttp app."""
    api = Api(hub)
    api.mount(app)
    return api
