"""The API's HTTP plumbing: its error shape, one call's context, and reading path, query and body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from patchbay.store.base import Actor, TokenInfo

PREFIX = "/api/v1"
MAX_BODY = 256 * 1024


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        super().__init__(message)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"error": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _json(status: int, data: Any) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@dataclass
class Call:
    """One authenticated request, its validated input, and who made it."""

    request: web.Request
    token: TokenInfo
    path: Any
    query: Any
    body: Any

    @property
    def origin(self) -> str:
        return self.request.remote or ""

    @property
    def actor(self) -> str:
        return self.token.actor

    @property
    def who(self) -> dict[str, str]:
        return {"token_id": self.token.id, "token_name": self.token.name}

    def by(self, **detail: Any) -> Actor:
        """This caller for the audit log: the token, where the request came from, and `detail`."""
        return Actor(self.actor, self.origin, {**self.who, **detail})


# ====================================================================== input
def _validate(model: type[BaseModel] | None, data: Any, where: str) -> Any:
    if model is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {"loc": [where, *exc_loc], "msg": e["msg"]}
            for e in exc.errors()
            for exc_loc in [[x for x in e["loc"]]]
        ]
        first = details[0]
        at = ".".join(str(x) for x in first["loc"][1:]) or where
        raise ApiError(
            422,
            "invalid_request",
            f"{where} {at}: {first['msg']}" + (f" (and {len(details) - 1} more)" if len(details) > 1 else ""),
            details=details,
        ) from None


def _query_dict(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.query.items():
        if k in out:
            raise ApiError(
                422,
                "invalid_request",
                f"query parameter {k!r} is given more than once",
                details=[{"loc": ["query", k], "msg": "given more than once"}],
            )
        out[k] = v
    return out


async def _read_json(request: web.Request) -> Any:
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"body of {length} bytes is over the API limit of {MAX_BODY}")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, "body_too_large", f"body is over the API limit of {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    ctype = request.headers.get("Content-Type", "")
    if ctype and "json" not in ctype.split(";")[0].lower():
        raise ApiError(415, "unsupported_media_type", f"expected Content-Type application/json, got {ctype}")
    if not raw.strip():
        raise ApiError(400, "empty_body", "the body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
