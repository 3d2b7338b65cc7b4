"""Batches at a SQL destination: the statements of many records in one transaction, on SQLite, PostgreSQL
and MariaDB; a row the database refuses fails alone, the others are written once."""

from __future__ import annotations

import os
import sqlite3
import uuid
from typing import Any

import pytest
import yaml

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.sql_client.config import SqlSinkConfig
from patchbay.connectors.sqlite import SqliteSink, SqliteSystem
from tests.conftest import eventually, require_service, write_project

RECORDS = [{"id": i, "email": f"p{i}@example.com", "score": i} for i in range(6)]


def sqlite_table(tmp_path) -> str:
    path = tmp_path / "w.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE contacts (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, score INTEGER)"
        )
    return str(path)


def sqlite_rows(path: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, email, score FROM contacts ORDER BY id").fetchall()


async def test_sqlite_batch_one_transaction_and_a_refused_row_alone(tmp_path):
    path = sqlite_table(tmp_path)
    sink = SqliteSink(
        SqliteSystem(path=path),
        SqlSinkConfig.model_validate({"table": "contacts", "write_mode": "upsert", "key": ["id"]}),
        DeliveryPolicy(),
        Resources(),
    )
    try:
        good = [sink.render(r, f"k{r['id']}") for r in RECORDS[:3]]
        outs = await sink.send_batch(good, ["k0", "k1", "k2"])
        assert [o.cls for o in outs] == [OutcomeClass.SUCCESS] * 3
        assert outs[0].excerpt == "upsert into contacts: written"
        bad = {"id": 4, "email": None, "score": 4}  # NOT NULL: refused by the database
        reqs = [sink.render(r, "k") for r in [RECORDS[3], bad, RECORDS[5]]]
        outs = await sink.send_batch(reqs, ["k3", "k4", "k5"])
        assert [o.cls for o in outs] == [OutcomeClass.TERMINAL] * 3
        assert [o.resend for o in outs] == [True, False, True]
        assert "NOT NULL" in outs[1].error and "rolled back for record 2 of 3" in outs[0].error
        assert sqlite_rows(path) == [
            (0, "p0@example.com", 0),
            (1, "p1@example.com", 1),
            (2, "p2@example.com", 2),
        ]
    finally:
        await sink.close()


async def test_a_sqlite_destination_batches_through_the_hub(tmp_path, start_hub, monkeypatch):
    path = sqlite_table(tmp_path)
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "warehouse": {"kind": "sqlite", "owner": "data", "path": path},
    }
    flow = {
        "purpose": "contacts land in the warehouse, many per transaction",
        "owner": "data",
        "trigger": {"webhook": {"system": "website", "batch": True}},
        "destinations": [
            {
                "name": "db",
                "system": "warehouse",
                "table": "contacts",
                "write_mode": "upsert",
                "key": ["id"],
                "batch": {"max_records": 50, "max_wait": "300ms"},
            }
        ],
    }
    write_project(
        tmp_path,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": yaml.safe_dump(systems),
            "flows/f.yaml": yaml.safe_dump(flow),
        },
    )
    hub = await start_hub(tmp_path)
    items = [{"id": i, "email": f"p{i}@example.com" if i != 7 else None, "score": i} for i in range(20)]
    status, body = await hub.post("/hooks/f", items)
    assert status == 202
    ids = body["event_ids"]

    async def settled() -> bool:
        rows = await hub.store.read(
            lambda c: c.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall()
        )
        return {r[0]: r[1] for r in rows} == {"delivered": 19, "dead": 1}

    await eventually(settled, what="19 rows written, 1 dead")
    assert [r[0] for r in sqlite_rows(path)] == [i for i in range(20) if i != 7]
    dead = (await hub.run(ids[7]))["deliveries"][0]
    assert dead["status"] == "dead" and "NOT NULL" in dead["last_error"]
    assert [a["n"] for a in dead["attempts_log"]] == [1]
    ok = (await hub.run(ids[10]))["deliveries"][0]  # rolled back with the bad row, then written
    notes = [a["error"] for a in ok["attempts_log"]]
    assert len(notes) == 2 and "sent again" in notes[0] and "(10 of 19)" in notes[1], notes


# ----------------------------------------------------------------------------- servers
async def test_postgres_batch(tmp_path):
    pytest.importorskip(
        "psycopg", reason="the postgres extra is not installed: pip install 'patchbay[postgres]'"
    )
    import psycopg

    from patchbay.connectors.postgres import PostgresSink, PostgresSystem

    host = os.environ.get("PATCHBAY_TEST_PG_HOST", "127.0.0.1")
    require_service("PostgreSQL", host, 5432)
    table = f"pb_batch_{uuid.uuid4().hex[:10]}"
    admin = await psycopg.AsyncConnection.connect(
        host=host, port=5432, dbname="test", user="postgres", autocommit=True
    )
    await admin.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, email text NOT NULL UNIQUE, score int)')
    sink = PostgresSink(
        PostgresSystem.model_validate({"host": host, "port": 5432, "database": "test", "user": "postgres"}),
        SqlSinkConfig.model_validate({"table": table, "write_mode": "upsert", "key": ["id"]}),
        DeliveryPolicy(timeout_s=5),
        Resources(allow_private=True),
    )
    try:
        records = [
            *RECORDS[:2],
            {"id": 2, "email": "p0@example.com", "score": 2},
            RECORDS[3],
        ]  # duplicate email
        outs = await sink.send_batch([sink.render(r, "k") for r in records], ["a", "b", "c", "d"])
        assert [(o.cls, o.resend) for o in outs] == [
            (OutcomeClass.TERMINAL, True),
            (OutcomeClass.TERMINAL, True),
            (OutcomeClass.TERMINAL, False),
            (OutcomeClass.TERMINAL, True),
        ]
        assert "unique" in outs[2].error.lower() or "duplicate" in outs[2].error.lower()
        cur = await admin.execute(f'SELECT count(*) FROM "{table}"')
        assert (await cur.fetchone()) == (0,)  # all rolled back
        again = [r for i, r in enumerate(records) if i != 2]
        outs = await sink.send_batch(
            [sink.render(r, "k") for r in again], ["a", "b", "d"]
        )  # the connection is reused
        assert [o.cls for o in outs] == [OutcomeClass.SUCCESS] * 3
        cur = await admin.execute(f'SELECT id FROM "{table}" ORDER BY id')
        assert [r[0] for r in await cur.fetchall()] == [0, 1, 3]
    finally:
        await sink.close()
        await admin.execute(f'DROP TABLE IF EXISTS "{table}"')
        await admin.close()


async def test_mariadb_batch(tmp_path):
    pytest.importorskip("aiomysql", reason="the mysql extra is not installed: pip install 'patchbay[mysql]'")
    import aiomysql

    from patchbay.connectors.mysql import MysqlSink, MysqlSystem

    host = os.environ.get("PATCHBAY_TEST_MYSQL_HOST", "127.0.0.1")
    require_service("MariaDB", host, 3306)
    table = f"pb_batch_{uuid.uuid4().hex[:10]}"
    admin = await aiomysql.connect(host=host, port=3306, user="root", db="test", autocommit=True)
    async with admin.cursor() as cur:
        await cur.execute(
            f"CREATE TABLE `{table}` (id int PRIMARY KEY, email varchar(100) NOT NULL, score int) ENGINE=InnoDB"
        )
    sink = MysqlSink(
        MysqlSystem.model_validate({"host": host, "port": 3306, "database": "test", "user": "root"}),
        SqlSinkConfig.model_validate({"table": table, "write_mode": "insert"}),
        DeliveryPolicy(timeout_s=5),
        Resources(allow_private=True),
    )
    try:
        records = [
            RECORDS[0],
            {"id": 0, "email": "again@example.com", "score": 9},
            RECORDS[1],
        ]  # duplicate key
        outs = await sink.send_batch([sink.render(r, "k") for r in records], ["a", "b", "c"])
        assert [(o.cls, o.resend) for o in outs] == [
            (OutcomeClass.TERMINAL, True),
            (OutcomeClass.TERMINAL, False),
            (OutcomeClass.TERMINAL, True),
        ]
        async with admin.cursor() as cur:
            await cur.execute(f"SELECT count(*) FROM `{table}`")
            assert await cur.fetchone() == (0,)  # InnoDB rolled the first insert back
        outs = await sink.send_batch([sink.render(r, "k") for r in (RECORDS[0], RECORDS[1])], ["a", "c"])
        assert [o.cls for o in outs] == [OutcomeClass.SUCCESS] * 2
        async with admin.cursor() as cur:
            await cur.execute(f"SELECT id FROM `{table}` ORDER BY id")
            assert [r[0] for r in await cur.fetchall()] == [0, 1]
    finally:
        await sink.close()
        async with admin.cursor() as cur:
            await cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        admin.close()
