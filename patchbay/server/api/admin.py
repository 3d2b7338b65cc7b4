"""Handlers for who is calling, the audit log and API tokens."""

from __future__ import annotations

import time
from typing import Any

from patchbay.security.tokens import (
    TokenInfo,
    q_tokens,
    tx_create_token,
    tx_revoke_token,
)
from patchbay.server import api_models as m
from patchbay.server.api.common import Resource
from patchbay.server.api.http import ApiError, Call
from patchbay.store import api_queries as aq
from patchbay.store.sqlite import tx_audit


class Admin(Resource):
    """The calling token, the audit log, API tokens."""

    async def whoami(self, c: Call) -> Any:
        return {"token": c.token.as_dict()}

    async def list_audit(self, c: Call) -> Any:
        q: m.AuditQuery = c.query
        rows = await self.store.read(
            aq.q_audit, m.as_unix(q.since), m.as_unix(q.until), q.action, q.actor, q.target, q.limit
        )
        return {"entries": rows}

    async def list_tokens(self, c: Call) -> Any:
        return {"tokens": [t.as_dict() for t in await self.store.read(q_tokens)]}

    async def create_token(self, c: Call) -> Any:
        b: m.TokenCreate = c.body
        expires = time.time() + b.expires_in_s if b.expires_in_s is not None else None

        def tx(conn: Any) -> tuple[str, TokenInfo]:
            text, info = tx_create_token(conn, b.name, b.scopes, expires, c.actor)
            detail = {**c.who, "name": info.name, "scopes": list(info.scopes), "expires_at": expires}
            tx_audit(conn, c.actor, "token.create", info.id, detail, c.origin)
            return text, info

        try:
            text, info = await self.store.write(tx)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        return {**info.as_dict(), "token": text}

    async def revoke_token(self, c: Call) -> Any:
        tid = c.path.token_id

        def tx(conn: Any) -> TokenInfo | None:
            info = tx_revoke_token(conn, tid)
            if info is not None:
                tx_audit(conn, c.actor, "token.revoke", info.id, {**c.who, "name": info.name}, c.origin)
            return info

        info = await self.store.write(tx)
        if info is None:
            raise ApiError(404, "not_found", f"no token {tid!r}")
        return info.as_dict()
