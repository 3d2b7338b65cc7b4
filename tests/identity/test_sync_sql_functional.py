"""Two-way sync of a PostgreSQL "crm" table and a MariaDB "marketing" table through a real hub.

Both tables stamp their own updated_at on every write (a trigger, ON UPDATE), so every write the hub
makes is read back by the other side's poll: the echo must be recognised by value, not by time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI, eventually, require_service, write_project

PG = {"host": "127.0.0.1", "port": 5432, "database": "test", "user": "postgres"}
MY = {"host": "127.0.0.1", "port": 3306, "database": "test", "user": "root"}


class Tables:
    """A crm table in PostgreSQL and a marketing table in MariaDB, unique names per test."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.crm = f"pb_crm_{tag}"
        self.mk = f"pb_mk_{tag}"

    async def open(self) -> Tables:
        import aiomysql  # type: ignore[import-untyped,unused-ignore]
        import psycopg

        self.pg = await psycopg.AsyncConnection.connect(
            host=PG["host"], port=PG["port"], dbname="test", user="postgres", autocommit=True
        )
        await self.pg.execute(
            f'CREATE TABLE "{self.crm}" (id serial PRIMARY KEY, email text, name text, plan text, phone text,'
            " deleted_at timestamptz, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        await self.pg.execute(
            f"CREATE FUNCTION {self.crm}_stamp() RETURNS trigger AS $$ BEGIN "
            "NEW.updated_at := clock_timestamp(); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        await self.pg.execute(
            f'CREATE TRIGGER {self.crm}_t BEFORE UPDATE ON "{self.crm}" FOR EACH ROW EXECUTE FUNCTION {self.crm}_stamp()'
        )
        self.my = await aiomysql.connect(
            host=MY["host"], port=MY["port"], user="root", password="", db="test", autocommit=True
        )
        await self.my_exec(
            f"CREATE TABLE `{self.mk}` (id INT AUTO_INCREMENT PRIMARY KEY, email_address VARCHAR(200),"
            " full_name VARCHAR(200), plan VARCHAR(50), phone VARCHAR(50),"
            " updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6))"
        )
        return self

    async def pg_exec(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        cur = await self.pg.execute(sql, params)
        return list(await cur.fetchall()) if cur.description else []

    async def my_exec(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        async with self.my.cursor() as cur:
            await cur.execute(sql, params)
            return list(await cur.fetchall())

    async def crm_rows(self) -> list[tuple[Any, ...]]:
        return await self.pg_exec(f'SELECT id, email, name, plan, phone FROM "{self.crm}" ORDER BY id')

    async def mk_rows(self) -> list[tuple[Any, ...]]:
        return await self.my_exec(
            f"SELECT id, email_address, full_name, plan, phone FROM `{self.mk}` ORDER BY id"
        )

    async def close(self) -> None:
        await self.pg.execute(f'DROP TABLE IF EXISTS "{self.crm}"')
        await self.pg.execute(f"DROP FUNCTION IF EXISTS {self.crm}_stamp()")
        await self.pg.close()
        await self.my_exec(f"DROP TABLE IF EXISTS `{self.mk}`")
        self.my.close()


@pytest.fixture
async def tables() -> AsyncIterator[Tables]:
    require_service("PostgreSQL", PG["host"], PG["port"])
    require_service("MariaDB", MY["host"], MY["port"])
    if not IN_CI:
        pytest.importorskip("psycopg", reason="the postgres extra is not installed")
        pytest.importorskip("aiomysql", reason="the mysql extra is not installed")
    t = await Tables().open()
    yield t
    await t.close()


ENTITY = {
    "purpose": "a customer, in the CRM and in the marketing tool",
    "fields": {
        "email": {"owner": "crm"},
        "name": {"owner": "crm"},
        "plan": {"owner": "marketing"},
        "phone": {"rule": "latest"},
    },
    "match": [{"field": "email", "normalize": "email"}],
    "systems": {
        "crm": {"id": "id", "fields": {"email": "email", "name": "name", "plan": "plan", "phone": "phone"}},
        "marketing": {
            "id": "id",
            "fields": {"email": "email_address", "name": "full_name", "plan": "plan", "phone": "phone"},
        },
    },
}


def sync_project(
    root: Path, t: Tables, entity: dict[str, Any] | None = None, extra: list[dict[str, Any]] | None = None
) -> Path:
    systems = {
        "crm": {"kind": "postgres", "owner": "sales", "allow_private_network": True, **PG},
        "marketing": {"kind": "mysql", "owner": "marketing", "allow_private_network": True, **MY},
    }
    crm_cols = {"email": "email", "name": "name", "plan": "plan", "phone": "phone"}
    mk_cols = {"email": "email_address", "name": "full_name", "plan": "plan", "phone": "phone"}

    def dests(system: str, table: str, cols: dict[str, str]) -> list[dict[str, Any]]:
        create = {c: f"record.{c}" for c in cols.values()}
        update = {"id": "id", **{c: f"record.{c}" for c in cols.values()}}
        return [
            {
                "name": f"{system}_create",
                "system": system,
                "when": "op == 'create'",
                "table": table,
                "write_mode": "insert",
                "columns": create,
            },
            {
                "name": f"{system}_update",
                "system": system,
                "when": "op == 'update'",
                "table": table,
                "write_mode": "update",
                "key": ["id"],
                "columns": update,
            },
        ]

    all_dests = dests("crm", t.crm, crm_cols) + dests("marketing", t.mk, mk_cols)
    all_dests += extra or []

    def flow(system: str, table: str) -> dict[str, Any]:
        return {
            "purpose": f"customers changed in {system} reach the other systems",
            "owner": "ops",
            "sync": "customer",
            "trigger": {
                "schedule": {"every": "1s"},
                "source": {"system": system, "table": table, "cursor_column": "updated_at"},
            },
            "destinations": all_dests,
        }

    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            "entities/customer.yaml": yaml.safe_dump(entity or ENTITY, sort_keys=False),
            "flows/crm_sync.yaml": yaml.safe_dump(flow("crm", t.crm), sort_keys=False),
            "flows/marketing_sync.yaml": yaml.safe_dump(flow("marketing", t.mk), sort_keys=False),
        },
    )


async def deliveries(hub: Any) -> dict[str, int]:
    """Deliveries per destination (`hub`: a RunningHub)."""
    rows = await hub.store.read(
        lambda c: c.execute("SELECT destination, COUNT(*) FROM deliveries GROUP BY destination").fetchall()
    )
    return {r[0]: r[1] for r in rows}


async def polls(hub: Any, n: int) -> None:
    """Wait until both flows have polled `n` more times (each poll reads back what the hub wrote)."""

    async def runs() -> dict[str, int]:
        rows = await hub.store.read(lambda c: c.execute("SELECT flow, runs FROM schedules").fetchall())
        return {r[0]: r[1] for r in rows}

    start = await runs()

    async def more() -> bool:
        now = await runs()
        return all(now.get(f, 0) >= start.get(f, 0) + n for f in ("crm_sync", "marketing_sync"))

    await eventually(more, timeout=20, what=f"{n} more polls of both flows")


async def test_two_way_sync_writes_once_each_way_and_never_echoes(tmp_path, tables: Tables, start_hub):
    hub = await start_hub(sync_project(tmp_path, tables))
    await tables.pg_exec(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)',
        [" Ada@Example.com", "Ada", "111"],
    )

    async def in_marketing() -> bool:
        return len(await tables.mk_rows()) == 1

    await eventually(in_marketing, timeout=20, what="the CRM's customer created in marketing")
    await polls(hub, 3)  # marketing reads its new row (the echo); the CRM reads nothing new
    [mk] = await tables.mk_rows()
    assert mk[1:] == (" Ada@Example.com", "Ada", None, "111")
    assert await deliveries(hub) == {"marketing_create": 1}
    assert len(await tables.crm_rows()) == 1

    # A shared field changed in marketing reaches the CRM once, and its echo stops there.
    await tables.my_exec(f"UPDATE `{tables.mk}` SET phone = '222', plan = 'pro' WHERE id = %s", [mk[0]])

    async def crm_has_it() -> bool:
        [row] = await tables.crm_rows()
        return row[3:] == ("pro", "222")

    await eventually(crm_has_it, timeout=20, what="marketing's phone and plan in the CRM")
    await polls(hub, 3)
    assert await deliveries(hub) == {"marketing_create": 1, "crm_update": 1}

    # Marketing edits the name, which the CRM owns: recorded as a conflict, the CRM's value written back
    # to marketing, nothing written to the CRM.
    await tables.my_exec(f"UPDATE `{tables.mk}` SET full_name = 'Ada L.' WHERE id = %s", [mk[0]])

    async def restored() -> bool:
        [row] = await tables.mk_rows()
        return row[2] == "Ada" and len(await hub.store.conflicts("customer")) == 1

    await eventually(restored, timeout=20, what="the owner's name written back to marketing")
    await polls(hub, 3)
    assert await deliveries(hub) == {"marketing_create": 1, "crm_update": 1, "marketing_update": 1}
    [conflict] = await hub.store.conflicts("customer")
    assert conflict["field"] == "name" and conflict["kind"] == "owned" and conflict["winner"] == "crm"
    assert [v["value"] for v in conflict["values"]] == ["Ada", "Ada L."]
    [crm] = await tables.crm_rows()
    assert crm[1:] == (" Ada@Example.com", "Ada", "pro", "222")

    stats = await hub.store.identity_stats("customer")
    assert stats["identities"] == 1 and stats["linked"] == {"crm": 1, "marketing": 1}
    await asyncio.sleep(0)


def cli(root: Path, *args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from patchbay.cli import main

    res = CliRunner().invoke(main, [*args, "-p", str(root)])
    return res.exit_code, res.output


async def test_first_run_links_records_present_on_both_sides_and_creates_the_rest(
    tmp_path, tables: Tables, start_hub
):
    crm = [(f"user{i}@example.com", f"User {i}", f"10{i}") for i in range(5)]
    await tables.pg.cursor().executemany(
        f'INSERT INTO "{tables.crm}" (email, name, phone) VALUES (%s, %s, %s)', crm
    )
    # Two of them already in marketing, under other ids, with case and whitespace differences; one only there.
    mk = [
        ("  USER1@Example.com ", "User 1", "101", "pro"),
        ("user3@EXAMPLE.COM", "User 3", "103", None),
        ("only@marketing.io", "Only M", None, "free"),
    ]
    for row in mk:
        await tables.my_exec(
            f"INSERT INTO `{tables.mk}` (email_address, full_name, phone, plan) VALUES (%s, %s, %s, %s)",
            list(row),
        )
    root = sync_project(tmp_path, tables)
    code, out = await asyncio.to_thread(cli, root, "sync", "preview", "customer")
    assert code == 0, out
    # Linked: user1 and user3. Created: 3 in marketing, 1 in the CRM. The CRM owns the email, so the two
    # emails written differently in marketing are conflicts settled by the owner and written back (2
    # updates), and the plan marketing owns goes to the CRM for user1 (1 update).
    assert "would link 2, create 4, update 3, conflicts 2, review 0 (6 identities from 8 records)" in out
    assert await tables.my_exec(f"SELECT COUNT(*) FROM `{tables.mk}`") == [(3,)]  # the preview wrote nothing

    hub = await start_hub(root)

    async def converged() -> bool:
        return len(await tables.crm_rows()) == 6 and len(await tables.mk_rows()) == 6

    await eventually(converged, timeout=20, what="both sides holding the 6 customers")
    await polls(hub, 3)
    crm_emails = sorted(r[1].strip().lower() for r in await tables.crm_rows())
    mk_emails = sorted(r[1].strip().lower() for r in await tables.mk_rows())
    assert crm_emails == mk_emails and len(set(crm_emails)) == 6  # no duplicates on either side
    stats = await hub.store.identity_stats("customer")
    assert stats["identities"] == 6 and stats["linked"] == {"crm": 6, "marketing": 6}
    assert await deliveries(hub) == {
        "marketing_create": 3,
        "crm_create": 1,
        "marketing_update": 2,
        "crm_update": 1,
    }
    assert {c["kind"] for c in await hub.store.conflicts("customer")} == {"owned"}
    # The plan marketing owns reached the CRM for the customer present on both sides.
    [user1] = [r for r in await tables.crm_rows() if r[1] == "user1@example.com"]
    assert user1[3] == "pro"

    code, out = await asyncio.to_thread(cli, root, "identities", "show", "customer", " User1@EXAMPLE.com")
    assert code == 0, out
    assert "crm: id " in out and "marketing: id " in out and "owner marketing" in out


async def test_a_delete_is_propagated_and_a_mass_delete_stops_the_source(tmp_path, tables: Tables, start_hub):
    entity = {
        **ENTITY,
        "systems": {
            **ENTITY["systems"],
            "crm": {**ENTITY["systems"]["crm"], "deleted": "deleted_at != null"},
        },
        "deletes": {"policy": "propagate", "max_share": 0.5, "min_identities": 5},
    }
    delete = {
        "name": "marketing_delete",
        "system": "marketing",
        "when": "op == 'delete'",
        "table": tables.mk,
        "write_mode": "delete",
        "key": ["id"],
        "columns": {"id": "id"},
    }
    rows = [(f"u{i}@example.com", f"U{i}") for i in range(10)]
    await tables.pg.cursor().executemany(f'INSERT INTO "{tables.crm}" (email, name) VALUES (%s, %s)', rows)
    hub = await start_hub(sync_project(tmp_path, tables, entity, [delete]))

    async def count_mk(n: int) -> bool:
        return len(await tables.mk_rows()) == n

    await eventually(lambda: count_mk(10), timeout=20, what="10 customers in marketing")
    await tables.pg_exec(f"UPDATE \"{tables.crm}\" SET deleted_at = now() WHERE email = 'u0@example.com'")
    await eventually(lambda: count_mk(9), timeout=20, what="the deleted customer gone from marketing")
    assert (await hub.store.identity_stats("customer"))["status"] == {"active": 9, "deleted": 1}

    # 6 of the 9 left deleted at once (67 %, over max_share 50 %): refused whole, the source stops.
    await tables.pg_exec(
        f'UPDATE "{tables.crm}" SET deleted_at = now() WHERE email IN '
        "('u1@example.com','u2@example.com','u3@example.com','u4@example.com','u5@example.com','u6@example.com')"
    )

    async def stopped() -> bool:
        state = (await hub.store.source_states()).get("crm_sync")
        return state is not None and state.state == "stopped"

    await eventually(stopped, timeout=20, what="the crm source stopped by the delete guard")
    state = (await hub.store.source_states())["crm_sync"]
    assert "would delete 6 of 9 identities (67%, more than deletes.max_share 50%)" in (state.error or "")
    await asyncio.sleep(1.5)
    assert len(await tables.mk_rows()) == 9  # nothing of that batch was applied
    assert (await hub.store.identity_stats("customer"))["status"] == {"active": 9, "deleted": 1}
    assert "crm_sync" in hub.hub.unhealthy_sources()  # what /readyz, the API and the alert rules read
