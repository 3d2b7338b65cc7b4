"""Handlers for who is calling, the cluster, the audit log and API tokens."""

from __future__ import annotations

import time
from typing import Any

from patchbay.engine.roles import cluster_view
from patchbay.security.tokens import create_token, revoke_token
from patchbay.server import api_models as m
from patchbay.server.api.common import Resource
from patchbay.server.api.http import ApiError, Call
from patchbay.store.base import AuditFilter


class Admin(Resource):
    """The calling token, the hub's processes, the audit log, API tokens."""

    async def whoami(self, c: Call) -> Any:
        return {"token": c.token.as_dict()}

    async def cluster(self, c: Call) -> Any:
        """The hub's processes on this store (engine/roles.py `cluster_view`), as the CLI's `cluster` shows them."""
        now = time.time()
        rows = await self.store.nodes(now)  # each node's claims: store/cluster.py q_nodes, one rule
        return {**cluster_view(rows, now, await self.store.leases()), "node": self.hub.node.id}

    async def list_audit(self, c: Call) -> Any:
        q: m.AuditQuery = c.query
        f = AuditFilter(m.as_unix(q.since), m.as_unix(q.until), q.action, q.actor, q.target, q.limit)
        rows = await self.store.audit_log(f)
        return {"entries": rows}

    async def list_tokens(self, c: Call) -> Any:
        return {"tokens": [t.as_dict() for t in await self.store.tokens()]}

    async def create_token(self, c: Call) -> Any:
        b: m.TokenCreate = c.body
        expires = time.time() + b.expires_in_s if b.expires_in_s is not None else None
        try:
            text, info = await create_token(self.store, b.name, b.scopes, expires, c.by())
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        return {**info.as_dict(), "token": text}

    async def revoke_token(self, c: Call) -> Any:
        tid = c.path.token_id
        info = await revoke_token(self.store, tid, c.by())
        if info is None:
            raise ApiError(404, "not_found", f"no token {tid!r}")
        return info.as_dict()
