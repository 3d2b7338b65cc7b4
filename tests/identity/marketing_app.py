"""A REST "marketing" service of ours, run on 127.0.0.1 by the sync tests and the checker.

Contacts under the service's own ids (`c1001`, ...). Every change (its API's or a person's in its own
screens) gets the next number of one change sequence, so "list changed since" never skips a change:

  GET    /contacts?since=SEQ&cursor=SEQ&limit=N   changes after SEQ, oldest first: [{id, seq, type, contact}]
                                                 (a deleted contact stays as type `contact.deleted`)
  GET    /contacts/{id}                           one contact (404 once deleted)
  POST   /contacts                                create; `Idempotency-Key` honoured (a retry gets the same one)
  PATCH  /contacts/{id}                           change the given fields
  DELETE /contacts/{id}                           delete
  GET    /_writes                                 every API write (the hub's): method, id, body, seq, at

and a change webhook `{id, seq, type, contact}` to `hook` for every change, its own API's included (as most
services do). A webhook that fails is dropped (the hub is down): the list catches up.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

FIELDS = ("email", "name", "plan", "phone")


@dataclass
class Marketing:
    url: str = ""
    hook: str = ""
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> contact (deleted ones too)
    deleted: set[str] = field(default_factory=set)
    changes: dict[str, int] = field(default_factory=dict)  # id -> seq of its last change
    writes: list[dict[str, Any]] = field(default_factory=list)  # API writes: who wrote what
    keys: dict[str, str] = field(default_factory=dict)  # Idempotency-Key -> id it created
    seq: Any = field(default_factory=lambda: itertools.count(1))
    ids: Any = field(default_factory=lambda: itertools.count(1001))
    hooks_sent: int = 0
    hooks_failed: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None
    _sem: asyncio.Semaphore | None = None
    _runner: web.AppRunner | None = None

    # -------------------------------------------------------------- the people using its screens
    def user_create(self, **values: Any) -> str:
        cid = f"c{next(self.ids)}"
        self.contacts[cid] = {"id": cid, **dict.fromkeys(FIELDS), **values}
        self._changed(cid)
        return cid

    def user_edit(self, cid: str, **values: Any) -> None:
        self.contacts[cid].update(values)
        self._changed(cid)

    def user_delete(self, cid: str) -> None:
        self.deleted.add(cid)
        self._changed(cid)

    def load(self, rows: list[dict[str, Any]]) -> list[str]:
        """Contacts that exist before the test starts (no webhooks)."""
        out = []
        for values in rows:
            cid = f"c{next(self.ids)}"
            self.contacts[cid] = {"id": cid, **dict.fromkeys(FIELDS), **values}
            self.changes[cid] = next(self.seq)
            self.contacts[cid]["updated_at"] = time.time()
            out.append(cid)
        return out

    def live(self) -> dict[str, dict[str, Any]]:
        return {cid: c for cid, c in self.contacts.items() if cid not in self.deleted}

    # -------------------------------------------------------------- the API
    def _item(self, cid: str) -> dict[str, Any]:
        c = dict(self.contacts[cid])
        kind = "contact.deleted" if cid in self.deleted else "contact.changed"
        return {"id": cid, "seq": self.changes[cid], "type": kind, "contact": c}

    def _changed(self, cid: str) -> None:
        self.changes[cid] = next(self.seq)
        self.contacts[cid]["updated_at"] = time.time()
        if self.hook:
            t = asyncio.get_running_loop().create_task(self._post(self._item(cid)))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _wrote(self, request: web.Request, cid: str, body: Any) -> None:
        self.writes.append(
            {"method": request.method, "id": cid, "body": body, "seq": self.changes[cid], "at": time.time()}
        )

    async def list(self, request: web.Request) -> web.Response:
        since = max(int(request.query.get("since") or 0), int(request.query.get("cursor") or 0))
        limit = int(request.query.get("limit") or 1000)
        found = sorted((s, cid) for cid, s in self.changes.items() if s > since)[:limit]
        items = [self._item(cid) for _, cid in found]
        nxt = str(found[-1][0]) if len(found) == limit else None
        return web.json_response({"data": items, "next_cursor": nxt})

    async def get(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        if cid not in self.contacts or cid in self.deleted:
            return web.json_response({"error": "no such contact"}, status=404)
        return web.json_response(self._item(cid))

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = request.headers.get("Idempotency-Key")
        if key and key in self.keys:  # a retry of a create that happened: the same contact
            return web.json_response(self._item(self.keys[key]), status=200)
        cid = f"c{next(self.ids)}"
        self.contacts[cid] = {"id": cid, **dict.fromkeys(FIELDS), **_known(body)}
        if key:
            self.keys[key] = cid
        self._changed(cid)
        self._wrote(request, cid, body)
        return web.json_response(self._item(cid), status=201)

    async def update(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        if cid not in self.contacts or cid in self.deleted:
            return web.json_response({"error": "no such contact"}, status=404)
        body = await request.json()
        self.contacts[cid].update(_known(body))
        self._changed(cid)
        self._wrote(request, cid, body)
        return web.json_response(self._item(cid))

    async def delete(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        if cid in self.contacts and cid not in self.deleted:
            self.deleted.add(cid)
            self._changed(cid)
            self._wrote(request, cid, None)
        return web.Response(status=204)

    async def writes_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.writes)

    async def _post(self, item: dict[str, Any]) -> None:
        assert self._sem is not None and self._session is not None
        async with self._sem:
            try:
                async with self._session.post(self.hook, json=item) as r:
                    await r.read()
                    ok = r.status == 202
            except (aiohttp.ClientError, TimeoutError):
                ok = False
        self.hooks_sent += ok
        self.hooks_failed += not ok

    # -------------------------------------------------------------- serving
    async def start(self) -> Marketing:
        app = web.Application()
        app.router.add_get("/contacts", self.list)
        app.router.add_post("/contacts", self.create)
        app.router.add_get("/contacts/{cid}", self.get)
        app.router.add_patch("/contacts/{cid}", self.update)
        app.router.add_delete("/contacts/{cid}", self.delete)
        app.router.add_get("/_writes", self.writes_log)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._sem = asyncio.Semaphore(8)
        return self

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


def _known(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        return {}
    return {k: v for k, v in body.items() if k in FIELDS}
