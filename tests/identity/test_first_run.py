"""The first run, page by page (engine/sync.py): its preview says exactly what the run then does, records
on both sides are linked across pages and systems, and a run killed while writing runs again at the next
start without sending a create twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from patchbay.config.project import load_or_raise
from patchbay.connectors.base import Batch, SourceRecord
from patchbay.engine.hub import build_sinks
from patchbay.engine.pipeline import Pipeline
from patchbay.engine.sync import EntitySync, first_run, first_run_needed, sync_flows
from patchbay.store.sqlite import SqliteStore
from tests.conftest import resolver, write_project
from tests.identity.helpers import ENTITY

PAGE = 7


class Pages:
    """A poll source over a list of records, `PAGE` at a time; the cursor is the last index read."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.pages = 0

    async def poll(self, cursor: Any) -> AsyncIterator[Batch]:
        start = int(cursor or 0)
        for i in range(start, len(self.records), PAGE):
            self.pages += 1
            part = self.records[i : i + PAGE]
            yield Batch([SourceRecord(r, str(r["id"])) for r in part], cursor=i + len(part))

    async def close(self) -> None:
        return None


def project(root: Path) -> Path:
    systems = {
        s: {"kind": "http", "owner": "ops", "url": f"http://127.0.0.1:9/{s}", "allow_private_network": True}
        for s in ("crm", "marketing")
    }
    dests = []
    for s in ("crm", "marketing"):
        dests += [
            {"name": f"{s}_create", "system": s, "when": "op == 'create'", "method": "POST", "path": "/c"},
            {"name": f"{s}_update", "system": s, "when": "op == 'update'", "method": "PATCH", "path": "/u"},
        ]
    flows = {
        f"{s}_sync": {
            "purpose": f"{s} changes reach the other side",
            "owner": "ops",
            "sync": "customer",
            "trigger": {"schedule": {"every": "1s"}, "source": {"system": s, "path": "/list"}},
            "destinations": dests,
        }
        for s in ("crm", "marketing")
    }
    files = {
        "patchbay.yaml": yaml.safe_dump({"port": 0}),
        "systems.yaml": yaml.safe_dump(systems),
        "entities/customer.yaml": yaml.safe_dump(ENTITY, sort_keys=False),
    } | {f"flows/{n}.yaml": yaml.safe_dump(f, sort_keys=False) for n, f in flows.items()}
    return write_project(root, files)


def records() -> dict[str, list[dict[str, Any]]]:
    """crm: customers 0-49; marketing: 30-79, 30-49 under other ids with the email in other case."""
    crm = [
        {"id": i, "email": f"u{i}@x.io", "name": f"U{i}", "plan": None, "phone": str(i)} for i in range(50)
    ]
    mk = [
        {
            "id": 1000 + i,
            "email_address": f" U{i}@X.io" if i < 50 else f"u{i}@x.io",
            "full_name": f"U{i}",
            "phone": str(i),
        }
        for i in range(30, 80)
    ]
    return {"crm": crm, "marketing": mk}


async def run(root: Path, store: Any, *, dry_run: bool, sources: dict[str, Pages] | None = None) -> Any:
    proj = load_or_raise(root)
    res = resolver()
    data = records()
    sources = sources or {s: Pages(rs) for s, rs in data.items()}

    def pipeline_of(f: Any) -> Pipeline:
        return Pipeline(f, build_sinks(f, proj, res, None))

    sync = EntitySync(proj.entities["customer"], store)
    flows = sync_flows(proj.flows, "customer")
    return await first_run(sync, flows, pipeline_of, lambda f: sources[f.source.system], dry_run=dry_run)


async def creates(store: SqliteStore) -> dict[str, int]:
    rows = await store.read(
        lambda c: c.execute(
            "SELECT destination, COUNT(*) FROM deliveries WHERE destination LIKE '%_create' GROUP BY destination"
        ).fetchall()
    )
    return {r[0]: r[1] for r in rows}


async def test_the_preview_is_what_the_run_does_page_by_page(tmp_path: Path) -> None:
    root = project(tmp_path)
    store = SqliteStore(tmp_path / "store.db")
    try:
        sources = {s: Pages(rs) for s, rs in records().items()}
        preview = await run(root, store, dry_run=True, sources=sources)
        assert sources["crm"].pages == 8 and sources["marketing"].pages == 8  # read a page at a time
        assert (await store.identity_stats("customer"))["identities"] == 0  # nothing written
        assert preview.as_dict() | {"update": None} == {
            "entity": "customer",
            "records": {"crm": 50, "marketing": 50},
            "identities": 80,
            "link": 20,
            "create": {"crm": 30, "marketing": 30},
            "update": None,
            "conflicts": preview.conflicts,
            "review": 0,
        }
        assert preview.conflicts == 20  # marketing's emails, written its own way: the CRM owns them
        done = await run(root, store, dry_run=False)
        assert done.as_dict() == preview.as_dict()
        stats = await store.identity_stats("customer")
        assert stats["identities"] == 80 and stats["linked"] == {"crm": 50, "marketing": 50}
        assert await creates(store) == {"crm_create": 30, "marketing_create": 30}
        assert await store.cursor("crm_sync") == 50 and await store.cursor("marketing_sync") == 50
        assert not await first_run_needed(store, "customer")
    finally:
        await store.close()


class Killed(Exception):
    pass


class DiesAfter:
    """The store, killed after `n` of the first run's transactions."""

    def __init__(self, store: SqliteStore, n: int) -> None:
        self.store, self.n = store, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def accept_synced(self, *args: Any, **kw: Any) -> Any:
        if self.n == 0:
            raise Killed
        self.n -= 1
        return await self.store.accept_synced(*args, **kw)


async def test_a_first_run_killed_while_writing_runs_again_and_sends_each_create_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path)
    store = SqliteStore(tmp_path / "store.db")
    try:
        from patchbay.engine import sync as sync_mod

        chunked = sync_mod.EntitySync.first_run

        async def small_chunks(self: Any, reads: Any, *, dry_run: bool, chunk: int = 1000) -> Any:
            return await chunked(self, reads, dry_run=dry_run, chunk=25)

        monkeypatch.setattr(sync_mod.EntitySync, "first_run", small_chunks)
        with pytest.raises(Killed):
            await run(root, DiesAfter(store, 2), dry_run=False)
        assert 0 < (await store.identity_stats("customer"))["identities"] < 80
        assert await first_run_needed(store, "customer")  # it got half-way: the next start runs it again
        assert await store.cursor("crm_sync") is None
        await run(root, store, dry_run=False)
        stats = await store.identity_stats("customer")
        assert stats["identities"] == 80 and stats["linked"] == {"crm": 50, "marketing": 50}
        assert await creates(store) == {"crm_create": 30, "marketing_create": 30}  # never twice
        assert not await first_run_needed(store, "customer")
        assert len(await store.conflicts("customer", limit=1000)) == 20  # recorded once
    finally:
        await store.close()
