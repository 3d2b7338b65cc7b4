"""Schema migrations on both stores, and `patchbay store copy` from SQLite into an empty PostgreSQL store."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.store.base import Actor, AuditFilter, RunFilter
from patchbay.store.migrations import LATEST
from patchbay.store.postgres import PostgresSecretRows, PostgresStore
from patchbay.store.postgres.schema import ddl
from patchbay.store.postgres.store import _split_schema
from patchbay.store.secrets import SqliteSecretRows
from patchbay.store.sqlite import SqliteStore
from patchbay.store.sqlite_schema import schema_parts
from tests.conftest import postgres_url
from tests.store.test_conformance import event, result

ALICE = Actor("alice", "127.0.0.1", {})


def project(tmp_path: Path, store: str | None = None) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "patchbay.yaml").write_text(f"store: {store}\n" if store else "port: 8787\n")
    return root


def v1_sqlite(path: Path) -> None:
    """A store as version 1 of the schema left it: the tables, no migration applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for part in schema_parts():
        conn.executescript(part)
    conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', '1')")
    conn.commit()
    conn.close()


def pg(url: str) -> psycopg.Connection[Any]:
    conninfo, schema = _split_schema(url)
    return psycopg.connect(conninfo, autocommit=True, options=f"-c search_path={schema}")


def sqlite_columns(path: Path, table: str = "deliveries") -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def test_store_migrate_takes_a_version_1_sqlite_store_to_the_latest_once(tmp_path):
    root = project(tmp_path)
    db = root / ".patchbay" / "patchbay.db"
    v1_sqlite(db)
    assert "lease_until" not in sqlite_columns(db)
    res = CliRunner().invoke(main, ["store", "migrate", "-p", str(root)])
    assert res.exit_code == 0, res.output
    assert f"schema 1 -> {LATEST}" in res.output and "applied 2: deliveries: lease columns" in res.output
    assert {"leased_by", "lease_until"} <= sqlite_columns(db)
    assert "claims" in sqlite_columns(db, "nodes")  # version 6: a node's claims, written with its heartbeat
    again = CliRunner().invoke(main, ["store", "migrate", "-p", str(root)])
    assert again.exit_code == 0 and f"schema {LATEST}, up to date" in again.output


def test_the_hub_applies_missing_migrations_when_it_opens_the_store(tmp_path):
    db = tmp_path / "s.db"
    v1_sqlite(db)

    async def go() -> None:
        s = SqliteStore(db)
        await s.accept(event())
        await s.close()

    asyncio.run(go())
    assert {"leased_by", "lease_until"} <= sqlite_columns(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(LATEST)


def test_a_store_newer_than_the_code_is_refused_by_migrate_on_both_stores(tmp_path):
    root = project(tmp_path)
    db = root / ".patchbay" / "patchbay.db"
    v1_sqlite(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    res = CliRunner().invoke(main, ["store", "migrate", "-p", str(root)])
    assert res.exit_code == 1 and "newer Patchbay (schema 99" in res.output

    url = postgres_url()
    PostgresStore.migrate_only(url)
    with pg(url) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    root2 = project(tmp_path / "two", url) if (tmp_path / "two").mkdir() is None else None
    assert root2 is not None
    res = CliRunner().invoke(main, ["store", "migrate", "-p", str(root2)])
    assert res.exit_code == 1 and "schema is version 99, newer than this Patchbay's" in res.output
    with pytest.raises(Exception, match="newer than this Patchbay"):
        PostgresStore(url)


def test_store_migrate_takes_a_version_1_postgres_store_to_the_latest(tmp_path):
    url = postgres_url()
    _, schema = _split_schema(url)
    with pg(url) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')  # type: ignore[arg-type]
        conn.execute(ddl().replace("%", "%%"))  # type: ignore[arg-type]
        conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', '1')")
    root = project(tmp_path, url)
    res = CliRunner().invoke(main, ["store", "migrate", "-p", str(root)])
    assert res.exit_code == 0, res.output
    assert f"schema 1 -> {LATEST}" in res.output
    with pg(url) as conn:

        def cols(table: str) -> set[str]:
            return {
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema=current_schema() AND table_name=%s",
                    (table,),
                )
            }

        assert {"leased_by", "lease_until"} <= cols("deliveries")
        assert "claims" in cols("nodes")
    again = CliRunner().invoke(main, ["store", "migrate", "-p", str(root)])
    assert f"schema {LATEST}, up to date" in again.output


async def _fill(db: Path) -> dict[str, Any]:
    """A SQLite store with something in every table the protocol writes."""
    s = SqliteStore(db)
    events = [event("orders", destinations=("crm", "erp")) for _ in range(30)]
    events += [event("orders", status="quarantined", reason="bad email")]
    for e in events:
        await s.accept(e)
    due = await s.due("orders", "crm", time.time() + 1, 100, set())
    await s.record([result(d, "success", "delivered", response={"id": i}) for i, d in enumerate(due[:20])])
    await s.record([result(d, "terminal", "dead") for d in due[20:25]])
    await s.accept_batch([event("pull")], "pull", {"page": 7})
    await s.update_schedule("pull", {"last_status": "ok", "next_due_at": 123.0}, count_run=True)
    await s.set_destination_state("orders", "erp", "paused", "HTTP 401", by=ALICE)
    await s.create_token("ci", ["read"], None, "ab" * 32, ALICE)
    await s.compress_runs("orders", time.time() + 10, 5)  # compressed payloads and traces copy too
    await s.cache_answer("geo", "k1", {"city": "Oslo"}, time.time() + 3600)
    await s.close()
    rows = SqliteSecretRows(db)
    rows.ensure_schema()
    rows.put("CRM_TOKEN", ("k1", b"\x00\x01nonce", b"\xffcipher"), 1.0)
    return {"events": [e.id for e in events]}


async def _view(s: Any, ids: list[str]) -> dict[str, Any]:
    runs = {i: await s.get_run(i) for i in ids}
    return {
        "runs": orjson.loads(orjson.dumps(runs, option=orjson.OPT_NON_STR_KEYS, default=str)),
        "list": await s.list_runs(RunFilter(limit=1000)),
        "counts": await s.counts(),
        "dead": await s.dead_letters(None, None, None, 100),
        "cursor": await s.cursor("pull"),
        "schedule": await s.schedule("pull"),
        "states": await s.destination_states(),
        "tokens": await s.tokens(),
        "audit": await s.audit_log(AuditFilter(limit=1000)),
        "cache": await s.cached_answer("geo", "k1", time.time()),
    }


def test_store_copy_moves_every_table_into_an_empty_postgres_store_verified(tmp_path):
    root = project(tmp_path)
    db = root / ".patchbay" / "patchbay.db"
    db.parent.mkdir(parents=True)
    filled = asyncio.run(_fill(db))
    url = postgres_url()
    res = CliRunner().invoke(main, ["store", "copy", "-p", str(root), "--to", url])
    assert res.exit_code == 0, res.output
    assert "verified by counts" in res.output and "copying events: 32/32 rows" in res.output

    async def views() -> tuple[dict[str, Any], dict[str, Any]]:
        lite, pgs = SqliteStore(db), PostgresStore(url)
        try:
            return await _view(lite, filled["events"]), await _view(pgs, filled["events"])
        finally:
            await lite.close()
            await pgs.close()

    before, after = asyncio.run(views())
    assert after == before
    assert [(r.name, r.nonce, r.ciphertext) for r in PostgresSecretRows(url).list()] == [
        ("CRM_TOKEN", b"\x00\x01nonce", b"\xffcipher")
    ]

    async def more() -> int:  # new ids continue after the copied ones
        s = PostgresStore(url)
        try:
            await s.accept(event("orders"))
            return len(await s.due("orders", "crm", time.time() + 1, 1000, set()))
        finally:
            await s.close()

    assert asyncio.run(more()) == 5 + 1  # the 5 never attempted, and the new one

    again = CliRunner().invoke(main, ["store", "copy", "-p", str(root), "--to", url])
    assert again.exit_code == 1 and "it is not empty" in again.output


def test_store_copy_refuses_a_store_a_hub_is_serving_and_a_password_in_the_url(tmp_path):
    root = project(tmp_path)
    db = root / ".patchbay" / "patchbay.db"
    db.parent.mkdir(parents=True)
    asyncio.run(_fill(db))
    fd = os.open(str(db) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as `patchbay serve` holds it
    try:
        res = CliRunner().invoke(main, ["store", "copy", "-p", str(root), "--to", postgres_url()])
    finally:
        os.close(fd)
    assert res.exit_code == 1 and "stop the hub first" in res.output
    res = CliRunner().invoke(
        main, ["store", "copy", "-p", str(root), "--to", "postgresql://u:pw-x@127.0.0.1/db"]
    )
    assert res.exit_code == 1 and "pw-x" not in res.output and "never written" in res.output
