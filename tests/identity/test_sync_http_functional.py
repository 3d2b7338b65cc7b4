"""A PostgreSQL "crm" table synced with a REST "marketing" service of ours on 127.0.0.1.

The service creates, gets and updates contacts under its own ids, stamps its own updated_at, and
posts a change webhook to the hub for every change, its own API's included (as most do): so every
write of the hub comes back as a webhook, which must be recognised as its echo.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import eventually, write_project
from tests.identity.helpers import CRM_SYSTEM, Tables, crm_sync, customer, sync_files


@dataclass
class Marketing:
    """The marketing tool: contacts by id, a log of the writes it got, change webhooks to `hook`."""

    url: str = ""
    hook: str = ""
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: list[tuple[str, str, Any]] = field(default_factory=list)  # (method, path, body) of API writes
    notify_api_writes: bool = True
    ids: Any = field(default_factory=lambda: itertools.count(1001))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        cid = f"c{next(self.ids)}"
        self.contacts[cid] = {"id": cid, **body, "updated_at": time.time()}
        self.writes.append(("POST", request.path, body))
        self._notify(cid, self.notify_api_writes)
        return web.json_response(self.contacts[cid], status=201)

    async def update(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        if cid not in self.contacts:
            return web.json_response({"error": "no such contact"}, status=404)
        body = await request.json()
        self.contacts[cid].update(body, updated_at=time.time())
        self.writes.append(("PATCH", request.path, body))
        self._notify(cid, self.notify_api_writes)
        return web.json_response(self.contacts[cid])

    async def get(self, request: web.Request) -> web.Response:
        c = self.contacts.get(request.match_info["cid"])
        return web.json_response(c) if c else web.json_response({}, status=404)

    def user_edit(self, cid: str, **changes: Any) -> None:
        """Someone edits a contact in the marketing tool's own screens."""
        self.contacts[cid].update(changes, updated_at=time.time())
        self._notify(cid, True)

    def _notify(self, cid: str, send: bool) -> None:
        if send and self.hook:
            t = asyncio.get_running_loop().create_task(self._post(dict(self.contacts[cid])))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _post(self, contact: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)  # after the API answer, as real services do
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.hook, json={"type": "contact.changed", "contact": contact}) as r,
        ):
            assert r.status == 202, await r.text()


@pytest.fixture
async def marketing() -> AsyncIterator[Marketing]:
    m = Marketing()
    app = web.Application()
    app.router.add_post("/contacts", m.create)
    app.router.add_patch("/contacts/{cid}", m.update)
    app.router.add_get("/contacts/{cid}", m.get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    m.url = f"http://{host}:{port}"
    yield m
    await asyncio.gather(*m.tasks, return_exceptions=True)
    await runner.cleanup()


def project(root: Path, t: Tables, m: Marketing) -> Path:
    entity = customer(
        {"id": "id", "fields": {"email": "email", "name": "name", "plan": "plan", "phone": "phone"}},
        {"id": "contact.id", "fields": {f: f"contact.{f}" for f in ("email", "name", "plan", "phone")}},
    )
    systems = {
        "crm": CRM_SYSTEM,
        "marketing": {
            "kind": "http",
            "owner": "growth",
            "url": m.url,
            "allow_private_network": True,
            "webhook": {"scheme": "none", "public": True},
        },
    }
    dests = [
        {
            "name": "crm_create",
            "system": "crm",
            "when": "op == 'create'",
            "table": t.crm,
            "write_mode": "insert",
            "columns": {c: f"record.{c}" for c in ("email", "name", "plan", "phone")},
        },
        {
            "name": "crm_update",
            "system": "crm",
            "when": "op == 'update'",
            "table": t.crm,
            "write_mode": "update",
            "key": ["id"],
            "columns": {"id": "id", "plan": "record.plan", "phone": "record.phone"},
            "expect": {"plan": "expected.plan", "phone": "expected.phone"},
        },
        {
            "name": "mk_create",
            "system": "marketing",
            "when": "op == 'create'",
            "method": "POST",
            "path": "/contacts",
            "body": "fields.contact",
            "response": {"id": "body.id"},
        },
        {
            "name": "mk_update",
            "system": "marketing",
            "when": "op == 'update'",
            "method": "PATCH",
            "path": "/contacts/{{ id }}",
            "body": "fields.contact",
        },
    ]
    flows = {
        "crm_sync": crm_sync(t.crm, dests),
        "marketing_sync": {
            "purpose": "marketing changes reach the CRM",
            "owner": "ops",
            "sync": "customer",
            "trigger": {"webhook": {"system": "marketing"}},
            "destinations": dests,
        },
    }
    return write_project(root, sync_files(systems, entity, flows))


async def test_crm_and_rest_marketing_converge_with_one_write_per_change(
    tmp_path,
    tables: Tables,
    marketing: Marketing,
    start_hub,
):
    running = await start_hub(project(tmp_path, tables, marketing))
    marketing.hook = f"{running.url}/hooks/marketing_sync"
    await tables.pg_exec(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)',
        ["ada@example.com", "Ada", "111"],
    )

    async def created() -> bool:
        return len(marketing.contacts) == 1

    await eventually(created, timeout=15, what="the contact created in marketing")
    [cid] = marketing.contacts
    # A marketing user sets the plan (marketing owns it) and the phone (shared): both reach the CRM once.
    await asyncio.sleep(0.5)
    marketing.user_edit(cid, plan="pro", phone="222")

    async def in_crm() -> bool:
        [row] = await tables.crm_rows()
        return row[3:] == ("pro", "222")

    await eventually(in_crm, timeout=15, what="the plan and phone in the CRM")
    # The CRM changes the phone: a PATCH to the contact's id (kept from the create's answer), never a POST.
    await tables.pg_exec(f'UPDATE "{tables.crm}" SET phone = %s', ["333"])

    async def patched() -> bool:
        return marketing.contacts[cid]["phone"] == "333"

    await eventually(patched, timeout=15, what="the phone patched in marketing")
    await asyncio.sleep(3)  # polls and webhooks read back every write: none may cause another
    assert [(m, p) for m, p, _ in marketing.writes] == [("POST", "/contacts"), ("PATCH", f"/contacts/{cid}")]
    assert marketing.writes[1][2] == {"phone": "333"}  # only what changed, never the plan marketing owns
    rows = await running.store.read(
        lambda c: c.execute("SELECT destination, COUNT(*) FROM deliveries GROUP BY destination").fetchall()
    )
    assert {r[0]: r[1] for r in rows} == {"mk_create": 1, "crm_update": 1, "mk_update": 1}
    [ident] = await running.store.all_identities("customer")
    assert ident.systems["marketing"]["id"] == cid and ident.systems["crm"]["id"] is not None
    assert len(marketing.contacts) == 1 and len(await tables.crm_rows()) == 1


async def test_the_id_a_create_returns_is_kept_when_no_webhook_tells_it(
    tmp_path,
    tables: Tables,
    marketing: Marketing,
    start_hub,
):
    marketing.notify_api_writes = False  # only the create's answer says which id the contact got
    running = await start_hub(project(tmp_path, tables, marketing))
    marketing.hook = f"{running.url}/hooks/marketing_sync"
    await tables.pg_exec(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)',
        ["bob@example.com", "Bob", "1"],
    )

    async def delivered() -> bool:
        rows = await running.store.read(
            lambda c: c.execute("SELECT status FROM deliveries WHERE destination='mk_create'").fetchall()
        )
        return [r[0] for r in rows] == ["delivered"]

    await eventually(delivered, timeout=15, what="the create delivered")
    await tables.pg_exec(f'UPDATE "{tables.crm}" SET phone = %s', ["2"])
    [cid] = marketing.contacts

    async def patched() -> bool:
        return marketing.contacts[cid]["phone"] == "2"

    await eventually(patched, timeout=15, what="the phone patched in marketing")
    assert [(m, p) for m, p, _ in marketing.writes] == [("POST", "/contacts"), ("PATCH", f"/contacts/{cid}")]
