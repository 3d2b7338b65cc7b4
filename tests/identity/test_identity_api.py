"""The identity map through the REST API and the CLI: find an entity, list and resolve conflicts, reviews."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from patchbay.security.tokens import create_token
from patchbay.store.base import Actor, AuditFilter
from tests.conftest import eventually
from tests.identity.helpers import Tables, cli, deliveries, polls, sync_project


async def api(url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, f"{url}/api/v1{path}", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        return r.status, await r.json()


async def test_find_an_entity_then_resolve_its_conflict_and_review_by_api_and_cli(
    tmp_path,
    tables: Tables,
    start_hub,
):
    root = sync_project(tmp_path, tables)
    running = await start_hub(root)
    reader, _ = await create_token(running.store, "reader", ["identities:read"], None, Actor("test"))
    writer, _ = await create_token(
        running.store, "writer", ["identities:write", "identities:read"], None, Actor("t")
    )
    await tables.pg_exec(
        f'INSERT INTO "{tables.crm}" (email, name) VALUES (%s, %s)', ["ada@example.com", "Ada"]
    )

    async def linked() -> bool:
        return (await running.store.identity_stats("customer"))["linked"] == {"crm": 1, "marketing": 1}

    await eventually(linked, timeout=20, what="ada linked on both sides")
    status, found = await api(
        running.url, reader, "GET", "/entities/customer/identities?q=%20ADA@example.com"
    )
    assert status == 200, found
    [ident] = found["identities"]
    assert set(ident["systems"]) == {"crm", "marketing"} and ident["golden"]["name"]["value"] == "Ada"
    status, one = await api(running.url, reader, "GET", f"/identities/{ident['id']}")
    assert status == 200 and one["id"] == ident["id"]
    status, ents = await api(running.url, reader, "GET", "/entities")
    assert ents["entities"][0]["fields"]["name"] == "owner crm"

    # Marketing renames her: the CRM owns the name, so it is a settled conflict; a person then decides
    # that marketing was right: the name is written to the CRM (its owner) and stays in marketing.
    [mk] = await tables.mk_rows()
    await tables.my_exec(f"UPDATE `{tables.mk}` SET full_name = 'Ada Lovelace' WHERE id = %s", [mk[0]])

    async def conflict() -> bool:
        return len(await running.store.conflicts("customer")) == 1

    await eventually(conflict, timeout=20, what="the conflict")
    await polls(running.hub, 2)
    status, listed = await api(running.url, reader, "GET", "/conflicts?entity=customer")
    [c] = listed["conflicts"]
    assert (c["field"], c["winner"], c["status"]) == ("name", "crm", "settled")
    status, refused = await api(
        running.url, reader, "POST", f"/conflicts/{c['id']}/resolve", {"take": "marketing"}
    )
    assert status == 403, refused  # reading is not deciding
    status, done = await api(
        running.url, writer, "POST", f"/conflicts/{c['id']}/resolve", {"take": "marketing"}
    )
    assert status == 200, done
    assert done["result"]["value"] == "Ada Lovelace"

    async def both_renamed() -> bool:
        [crm] = await tables.crm_rows()
        [mk] = await tables.mk_rows()
        return crm[2] == "Ada Lovelace" and mk[2] == "Ada Lovelace"

    await eventually(both_renamed, timeout=20, what="the decided name in both systems")
    await polls(running.hub, 2)
    assert (await running.store.conflict(c["id"]))["status"] == "resolved"
    status, again = await api(running.url, writer, "POST", f"/conflicts/{c['id']}/resolve", {"take": "crm"})
    assert status == 409 and "already resolved" in again["message"]
    n = await deliveries(running)
    assert n.get("crm_correct") == 1  # the decision, written once to the owner; its echo went nowhere

    # A second marketing contact with her email: a duplicate inside marketing, for a person to review.
    await tables.my_exec(
        f"INSERT INTO `{tables.mk}` (email_address, full_name) VALUES (%s, %s)",
        ["Ada@Example.com", "Ada dup"],
    )

    async def reviewed() -> bool:
        return len(await running.store.reviews("customer")) == 1

    await eventually(reviewed, timeout=20, what="the duplicate in the review queue")
    code, out = await asyncio.to_thread(cli, root, "identities", "review")
    assert code == 0 and "duplicate inside marketing" in out and "proposal: merge record" in out, out
    [r] = await running.store.reviews("customer")
    code, out = await asyncio.to_thread(cli, root, "identities", "review", str(r["id"]), "--dismiss")
    assert code == 3 and "the hub is running: decide through it" in out, out  # never beside the hub's lock
    status, done = await api(running.url, writer, "POST", f"/reviews/{r['id']}/resolve", {"dismiss": True})
    assert status == 200 and done["result"]["decision"] == "dismissed", done
    assert await running.store.reviews("customer") == []
    code, out = await asyncio.to_thread(cli, root, "conflicts", "show", str(c["id"]))
    assert code == 0 and '"status": "resolved"' in out and '"by": "token' in out, out
    code, out = await asyncio.to_thread(cli, root, "conflicts", "list")
    assert code == 0 and "name [resolved]" in out, out
    assert len(await tables.crm_rows()) == 1  # the duplicate was never copied to the CRM


async def test_the_cli_decides_a_conflict_with_the_hub_stopped(tmp_path, tables: Tables):
    from patchbay.store.base import Identity, IdentityChanges, NewConflict
    from patchbay.store.sqlite import SqliteStore

    root = sync_project(tmp_path, tables)
    store = SqliteStore(root / ".patchbay" / "patchbay.db")
    seen = {"value": "Ada", "at": 1.0, "event": None}
    ident = Identity(
        "idn_x",
        "customer",
        1.0,
        1.0,
        golden={"name": {"value": "Ada", "system": "crm", "at": 1.0}},
        systems={
            "crm": {"id": "1", "seen": {"name": seen}, "written": {}},
            "marketing": {"id": "7", "seen": {"name": {**seen, "value": "Ada L."}}, "written": {}},
        },
    )
    conflict = NewConflict(
        "customer",
        "idn_x",
        "name",
        "owned",
        [{"system": "crm", "value": "Ada", "at": 1.0}, {"system": "marketing", "value": "Ada L.", "at": 2.0}],
        "crm",
        "Ada",
        "owner",
        "marketing changed name",
        "settled",
        2.0,
    )
    await store.accept_synced([], IdentityChanges("customer", [ident], [conflict]))
    [c] = await store.conflicts()
    await store.close()

    code, out = await asyncio.to_thread(cli, root, "conflicts", "resolve", str(c["id"]), "--take", "nowhere")
    assert code == 1 and "has no value from 'nowhere' (it has: crm, marketing)" in out, out
    code, out = await asyncio.to_thread(
        cli, root, "conflicts", "resolve", str(c["id"]), "--take", "marketing"
    )
    assert code == 0 and 'resolved: "Ada L."; 1 run(s) write it' in out, out
    store = SqliteStore(root / ".patchbay" / "patchbay.db")
    try:
        rows = await store.read(
            lambda db: db.execute("SELECT destination, request FROM deliveries").fetchall()
        )
        assert [r[0] for r in rows] == ["crm_correct"]  # to the owner, through the destination for decisions
        assert '"name":"Ada L."' in rows[0][1]
        assert (await store.conflict(c["id"]))["status"] == "resolved"  # type: ignore[index]
        [entry] = await store.audit_log(AuditFilter(action="conflict.resolve"))
        assert entry["target"] == str(c["id"])
    finally:
        await store.close()
