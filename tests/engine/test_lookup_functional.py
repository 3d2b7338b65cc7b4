"""lookup through a real hub: a SQL SELECT with bound parameters (SQLite file, the local PostgreSQL) or an
HTTP GET enriches the record; no row is an answer (null, or the record dropped/quarantined), a value that
looks like SQL stays a value, and the answers are cached per key."""

from __future__ import annotations

import os
import sqlite3
import uuid
from typing import Any

import pytest
import yaml

from tests.conftest import eventually, lead_project, require_service

FAST = {"timeout_s": 2, "retry": {"schedule": ["100ms"] * 3, "jitter": 0}}


def with_system(root: Any, name: str, system: dict[str, Any]) -> Any:
    path = root / "systems.yaml"
    systems = yaml.safe_load(path.read_text())
    systems[name] = system
    path.write_text(yaml.safe_dump(systems, sort_keys=False))
    return root


async def settled(hub: Any, event_id: str, status: str) -> dict[str, Any]:
    async def check() -> bool:
        return (await hub.run(event_id))["status"] == status

    await eventually(check, what=f"run {status}")
    return await hub.run(event_id)


def lookup_steps(on_empty: str = "continue", cache: str = "") -> str:
    return f"""
- name: account
  lookup:
    system: billing
    query: "SELECT owner, tier FROM accounts WHERE email = :email"
    params: {{email: lower(email)}}
    as: account
    on_empty: {on_empty}{cache}
"""


DEST = {"body": {"email": "email", "owner": "account.body.owner", "tier": "account.body.tier"}}


async def test_sqlite_lookup_enriches_and_binds_values_only(tmp_path, sink, start_hub):
    db = tmp_path / "billing.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE accounts(email TEXT, owner TEXT, tier TEXT)")
        c.execute("INSERT INTO accounts VALUES('ada@example.com', 'grace', 'gold')")
    root = lead_project(
        tmp_path, sink.url, steps=lookup_steps(), delivery=FAST, hub={"delivery": FAST}, dest=DEST
    )
    with_system(root, "billing", {"kind": "sqlite", "owner": "finance", "path": "billing.db"})
    hub = await start_hub(root)

    _, known = await hub.post("/hooks/lead-capture", {"email": "ADA@example.com"})
    _, sly = await hub.post("/hooks/lead-capture", {"email": "x' OR '1'='1"})
    await settled(hub, known["event_id"], "delivered")
    run = await settled(hub, sly["event_id"], "delivered")
    got = {r.headers["Idempotency-Key"]: r.body for r in sink.received}
    assert got[f"{known['event_id']}.crm"] == {"email": "ADA@example.com", "owner": "grace", "tier": "gold"}
    assert got[f"{sly['event_id']}.crm"] == {"email": "x' OR '1'='1", "owner": None, "tier": None}
    [call] = [d for d in run["deliveries"] if d["destination"] == "call:account"]
    assert call["attempts_log"][0]["status_code"] == 404  # no row: an answer, not an error


async def test_no_row_quarantines_when_asked(tmp_path, sink, start_hub):
    db = tmp_path / "billing.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE accounts(email TEXT, owner TEXT, tier TEXT)")
    root = lead_project(
        tmp_path, sink.url, steps=lookup_steps("quarantine"), delivery=FAST, hub={"delivery": FAST}, dest=DEST
    )
    with_system(root, "billing", {"kind": "sqlite", "owner": "finance", "path": "billing.db"})
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/lead-capture", {"email": "nobody@example.com"})
    run = await settled(hub, body["event_id"], "quarantined")
    assert run["reason"] == "account: account: the answer was empty (HTTP 404)"
    assert sink.received == []


async def test_a_missing_table_is_a_dead_lookup_with_the_reason(tmp_path, sink, start_hub):
    (tmp_path / "billing.db").touch()
    root = lead_project(
        tmp_path, sink.url, steps=lookup_steps(), delivery=FAST, hub={"delivery": FAST}, dest=DEST
    )
    with_system(root, "billing", {"kind": "sqlite", "owner": "finance", "path": "billing.db"})
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    run = await settled(hub, body["event_id"], "dead")
    [call] = run["deliveries"]
    assert call["destination"] == "call:account" and "no such table: accounts" in (call["last_error"] or "")


async def test_postgres_lookup_with_cache(tmp_path, sink, start_hub):
    pytest.importorskip(
        "psycopg", reason="the postgres extra is not installed: pip install 'patchbay[postgres]'"
    )
    import psycopg

    host = os.environ.get("PATCHBAY_TEST_PG_HOST", "127.0.0.1")
    require_service("PostgreSQL", host, 5432)
    table = f"pb_accounts_{uuid.uuid4().hex[:10]}"
    admin = await psycopg.AsyncConnection.connect(
        host=host, port=5432, dbname="test", user="postgres", autocommit=True
    )
    try:
        await admin.execute(f'CREATE TABLE "{table}" (email text, owner text, tier text, since date)')
        await admin.execute(
            f"INSERT INTO \"{table}\" VALUES ('ada@example.com', 'grace', 'gold', '2024-05-01')"
        )
        steps = lookup_steps(cache="\n    cache: {key: lower(email), ttl: 10m}").replace(
            "accounts", f'\\"{table}\\"'
        )
        steps = steps.replace("SELECT owner, tier", "SELECT owner, tier, since")
        root = lead_project(
            tmp_path,
            sink.url,
            steps=steps,
            delivery=FAST,
            hub={"delivery": FAST},
            dest={"body": {"owner": "account.body.owner", "since": "account.body.since"}},
        )
        system = {
            "kind": "postgres",
            "owner": "finance",
            "host": host,
            "port": 5432,
            "database": "test",
            "user": "postgres",
            "allow_private_network": True,
        }
        with_system(root, "billing", system)
        hub = await start_hub(root)
        ids = []
        for _ in range(3):
            _, body = await hub.post("/hooks/lead-capture", {"email": "Ada@Example.com"})
            ids.append(body["event_id"])
            await settled(hub, body["event_id"], "delivered")
        assert [r.body for r in sink.received] == [{"owner": "grace", "since": "2024-05-01"}] * 3
        runs = [await hub.run(i) for i in ids]
        excerpts = [
            d["attempts_log"][0]["excerpt"]
            for r in runs
            for d in r["deliveries"]
            if d["destination"] == "call:account"
        ]
        assert excerpts[0] != "(cached answer)" and excerpts[1:] == ["(cached answer)"] * 2
    finally:
        await admin.execute(f'DROP TABLE IF EXISTS "{table}"')
        await admin.close()


async def test_mariadb_lookup_binds_percent_style_parameters(tmp_path, sink, start_hub):
    pytest.importorskip("aiomysql", reason="the mysql extra is not installed: pip install 'patchbay[mysql]'")
    import aiomysql

    host = os.environ.get("PATCHBAY_TEST_MYSQL_HOST", "127.0.0.1")
    require_service("MariaDB/MySQL", host, 3306)
    table = f"pb_accounts_{uuid.uuid4().hex[:10]}"
    admin = await aiomysql.connect(host=host, port=3306, user="root", password="", db="test", autocommit=True)
    try:
        async with admin.cursor() as cur:
            await cur.execute(
                f"CREATE TABLE `{table}` (email varchar(200), owner varchar(50), tier varchar(10))"
            )
            await cur.execute(f"INSERT INTO `{table}` VALUES ('ada@example.com', 'grace', 'gold')")
        # A literal % in the text stays a literal; the value comes in only as :email.
        query = f"SELECT owner, tier FROM `{table}` WHERE email = :email AND tier LIKE 'g%'"
        steps = f"""
- name: account
  lookup: {{system: billing, query: "{query}", params: {{email: lower(email)}}, as: account}}
"""
        root = lead_project(tmp_path, sink.url, steps=steps, delivery=FAST, hub={"delivery": FAST}, dest=DEST)
        system = {
            "kind": "mysql",
            "owner": "finance",
            "host": host,
            "port": 3306,
            "database": "test",
            "user": "root",
            "allow_private_network": True,
        }
        with_system(root, "billing", system)
        hub = await start_hub(root)
        _, body = await hub.post("/hooks/lead-capture", {"email": "ADA@example.com"})
        await settled(hub, body["event_id"], "delivered")
        assert [r.body for r in sink.received] == [
            {"email": "ADA@example.com", "owner": "grace", "tier": "gold"}
        ]
    finally:
        async with admin.cursor() as cur:
            await cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        admin.close()


async def test_http_lookup_reads_an_answer_and_a_404_is_null(tmp_path, sink, start_hub):
    def answer(request: Any, rec: Any) -> Any:
        if request.method == "GET":
            if request.query.get("email") == "ada@example.com":
                return (200, {"Content-Type": "application/json"}, '{"owner": "grace", "tier": "gold"}')
            return (404, {}, "{}")
        return 201

    sink.default = answer
    steps = """
- name: account
  lookup: {system: crm, path: "/accounts?email={{ lower(email) }}", as: account}
"""
    root = lead_project(tmp_path, sink.url, steps=steps, delivery=FAST, hub={"delivery": FAST}, dest=DEST)
    hub = await start_hub(root)
    _, known = await hub.post("/hooks/lead-capture", {"email": "Ada@example.com"})
    _, unknown = await hub.post("/hooks/lead-capture", {"email": "nobody@example.com"})
    await settled(hub, known["event_id"], "delivered")
    await settled(hub, unknown["event_id"], "delivered")
    got = {r.headers["Idempotency-Key"]: r.body for r in sink.received if r.method == "POST"}
    assert got == {
        f"{known['event_id']}.crm": {"email": "Ada@example.com", "owner": "grace", "tier": "gold"},
        f"{unknown['event_id']}.crm": {"email": "nobody@example.com", "owner": None, "tier": None},
    }
