"""What sync guarantees beyond one step: a create never waits silently for its id, and steps of one
entity in several hub processes on one PostgreSQL store run one at a time."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from patchbay.config.entities import EntityDoc, EntitySpec
from patchbay.engine.sync import EntitySync
from patchbay.records import new_id
from patchbay.store.base import AttemptResult, Identity, IdentityChanges, NewDelivery, NewEvent, Store
from tests.conftest import postgres_url

ENTITY: dict[str, Any] = {
    "fields": {"email": {"owner": "crm"}, "phone": {"rule": "latest"}},
    "match": [{"field": "email", "normalize": "email"}],
    "systems": {
        "crm": {"id": "id", "fields": {"email": "email", "phone": "phone"}},
        "mkt": {"id": "id", "fields": {"email": "email_address", "phone": "phone"}},
    },
    "read_back_within": "2m",
}


def entity(**over: Any) -> EntitySpec:
    return EntitySpec("customer", EntityDoc.model_validate({**ENTITY, **over}), "entities/customer.yaml", 1)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        from patchbay.store.sqlite import SqliteStore

        s: Store = SqliteStore(tmp_path / "store.db")
    else:
        from patchbay.store.postgres import PostgresStore

        s = PostgresStore(postgres_url())
    try:
        yield s
    finally:
        await s.close()


async def _created_in_mkt(store: Store, at: float) -> tuple[str, str]:
    """An identity from the CRM whose create in mkt is on its way (sent at `at`): (identity id, event id)."""
    ev = new_id()
    delivery = NewDelivery("mkt_create", {"op": "insert"}, f"{ev}.mkt_create")
    event = NewEvent(
        id=ev,
        flow="crm_sync",
        received_at=at,
        payload=b"{}",
        body_hash="h",
        dedupe_key=None,
        status="pending",
        record_key=None,
        meta={},
        trace=[],
        reason=None,
        deliveries=[delivery],
    )
    seen = {"value": "ada@example.com", "at": at, "event": ev}
    ident = Identity(
        "idn_ada",
        "customer",
        at,
        at,
        golden={"email": {"value": "ada@example.com", "system": "crm", "at": at}},
        systems={
            "crm": {"id": "7", "seen": {"email": seen}, "written": {}, "pending": None, "deleted_at": None},
            "mkt": {
                "id": None,
                "seen": {},
                "written": {"email": seen},
                "pending": {"event": ev, "destination": "mkt_create", "at": at},
                "deleted_at": None,
            },
        },
        keys=[("email", "ada@example.com")],
    )
    await store.accept_synced([event], IdentityChanges("customer", [ident]))
    return ident.id, ev


async def test_a_create_not_linked_in_time_is_flagged_then_linked_from_its_answer(store: Store):
    sync = EntitySync(entity(), store)
    t0 = time.time() - 1000
    iid, ev = await _created_in_mkt(store, t0)
    assert await sync.sweep_pending(now=t0 + 60) == {"linked": 0, "overdue": 0}  # within read_back_within
    # Never read back, and the destination's answer had no id: flagged, counted, not waiting silently.
    assert await sync.sweep_pending(now=t0 + 130) == {"linked": 0, "overdue": 1}
    ident = await store.identity(iid)
    assert ident is not None and ident.systems["mkt"]["pending"]["overdue"] == t0 + 130
    assert (await store.identity_stats("customer"))["pending"] == {"waiting": 1, "overdue": 1}
    assert await sync.sweep_pending(now=t0 + 140) == {"linked": 0, "overdue": 0}  # flagged once
    # The create's answer holds the id (it came late, or the sink's answer was recorded after a crash).
    [d] = await store.due("crm_sync", "mkt_create", time.time() + 1, 10, set())
    await store.record(
        [
            AttemptResult(
                delivery_id=d.id,
                event_id=ev,
                started_at=time.time(),
                latency_ms=1.0,
                status_code=200,
                outcome="success",
                excerpt="ok",
                error="",
                new_status="delivered",
                response={"id": "m-1"},
            )
        ]
    )
    assert await sync.sweep_pending(now=t0 + 400) == {"linked": 1, "overdue": 0}
    ident = await store.identity(iid)
    assert (
        ident is not None and ident.systems["mkt"]["id"] == "m-1" and ident.systems["mkt"]["pending"] is None
    )
    assert (await store.identity_stats("customer"))["pending"] == {"waiting": 0, "overdue": 0}
    assert (await store.identity_lookup("customer", [("mkt", "m-1")], [])).by_link == {("mkt", "m-1"): iid}
    assert orjson.dumps(ident.as_dict())  # still one JSON document


def _two_system_project(root: Path, store_url: str) -> Path:
    import yaml

    from tests.conftest import write_project
    from tests.connectors import closed_port

    down = f"http://127.0.0.1:{closed_port()}"  # the writes wait in the store: this test is about the map
    systems = {
        s: {
            "kind": "http",
            "owner": "ops",
            "url": down,
            "allow_private_network": True,
            "webhook": {"scheme": "none", "public": True},
        }
        for s in ("crm", "mkt")
    }
    dests = [
        {"name": f"{s}_write", "system": s, "method": "POST", "path": "/contacts", "body": "fields"}
        for s in ("crm", "mkt")
    ]
    flows = {
        f"{s}_sync": {
            "purpose": f"{s} changes reach the other system",
            "owner": "ops",
            "sync": "customer",
            "trigger": {"webhook": {"system": s}},
            "destinations": dests,
        }
        for s in ("crm", "mkt")
    }
    entity = {k: v for k, v in ENTITY.items() if k != "read_back_within"}
    files = {
        "patchbay.yaml": yaml.safe_dump({"port": 0, "store": store_url}),
        "systems.yaml": yaml.safe_dump(systems),
        "entities/customer.yaml": yaml.safe_dump(entity),
    } | {f"flows/{n}.yaml": yaml.safe_dump(f) for n, f in flows.items()}
    return write_project(root, files)


async def test_two_hubs_on_one_postgresql_store_link_one_customer_once(tmp_path: Path):
    """Hub A reads each customer from the CRM while hub B reads the same customer from marketing, at the
    same moment: one identity each, linked to both records, never two."""
    import asyncio

    from patchbay.engine.hub import Hub
    from patchbay.engine.roles import Node
    from tests.conftest import load_or_raise, resolver

    root = _two_system_project(tmp_path, postgres_url())
    # Two processes' hubs (issue 13: any number share a PostgreSQL store), each its own node.
    hubs = [Hub(load_or_raise(root), resolver=resolver(), node=Node(f"syncfix-{i}")) for i in range(2)]
    for h in hubs:
        await h.start()
    try:
        n = 25

        async def one(i: int) -> None:
            await asyncio.gather(
                hubs[0].ingest("crm_sync", b"{}", {"id": f"c{i}", "email": f"u{i}@example.com"}),
                hubs[1].ingest("mkt_sync", b"{}", {"id": f"m{i}", "email_address": f" U{i}@Example.com"}),
            )

        await asyncio.gather(*(one(i) for i in range(n)))
        store = hubs[0].store
        assert store is not None
        idents = await store.all_identities("customer", limit=1000)
        linked = [(i.systems.get("crm", {}).get("id"), i.systems.get("mkt", {}).get("id")) for i in idents]
        assert len(idents) == n, f"{len(idents)} identities for {n} customers: {linked[:6]}"
        assert all(c and m for c, m in linked)
        assert (await store.reviews("customer")) == []
    finally:
        for h in hubs:
            await h.stop()
