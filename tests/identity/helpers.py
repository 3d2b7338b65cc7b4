"""Helpers of the sync tests: a PostgreSQL "crm" table and a MariaDB "marketing" table, a project syncing them.

Both tables stamp their own updated_at on every write (a trigger, ON UPDATE), so every write the hub
makes is read back by the other side's poll: the echo must be recognised by value, not by time.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import eventually, write_project

PG = {"host": "127.0.0.1", "port": 5432, "database": "test", "user": "postgres"}
MY = {"host": "127.0.0.1", "port": 3306, "database": "test", "user": "root"}
CRM_SYSTEM = {"kind": "postgres", "owner": "sales", "allow_private_network": True, **PG}


async def pg_connect() -> Any:
    """An autocommit connection to the test database of PG."""
    import psycopg

    return await psycopg.AsyncConnection.connect(
        host=PG["host"], port=PG["port"], dbname="test", user="postgres", autocommit=True
    )


async def create_crm_table(pg: Any, table: str, columns: str) -> None:
    """CRM table `table` (`id serial PRIMARY KEY, <columns>, updated_at`) whose trigger stamps updated_at
    on every write, as the CRM itself does (so the hub's writes are read back by its poll)."""
    await pg.execute(
        f'CREATE TABLE "{table}" (id serial PRIMARY KEY, {columns},'
        " updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    await pg.execute(
        f"CREATE FUNCTION {table}_stamp() RETURNS trigger AS $$ BEGIN "
        "NEW.updated_at := clock_timestamp(); RETURN NEW; END $$ LANGUAGE plpgsql"
    )
    await pg.execute(
        f'CREATE TRIGGER {table}_t BEFORE UPDATE ON "{table}" FOR EACH ROW EXECUTE FUNCTION {table}_stamp()'
    )


async def drop_crm_table(pg: Any, table: str) -> None:
    await pg.execute(f'DROP TABLE IF EXISTS "{table}"')
    await pg.execute(f"DROP FUNCTION IF EXISTS {table}_stamp()")


class Tables:
    """A crm table in PostgreSQL and a marketing table in MariaDB, unique names per test."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.crm = f"pb_crm_{tag}"
        self.mk = f"pb_mk_{tag}"

    async def open(self) -> Tables:
        import aiomysql  # type: ignore[import-untyped,unused-ignore]

        self.pg = await pg_connect()
        await create_crm_table(
            self.pg, self.crm, "email text, name text, plan text, phone text, deleted_at timestamptz"
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
        await drop_crm_table(self.pg, self.crm)
        await self.pg.close()
        await self.my_exec(f"DROP TABLE IF EXISTS `{self.mk}`")
        self.my.close()


def customer(crm: dict[str, Any], marketing: dict[str, Any], **more: Any) -> dict[str, Any]:
    """The customer entity of the sync tests: the CRM owns email and name, marketing the plan, the latest
    phone wins; matched on the email. `crm` and `marketing`: how each system holds it; `more`: deletes..."""
    return {
        "purpose": "a customer, in the CRM and in the marketing tool",
        "fields": {
            "email": {"owner": "crm"},
            "name": {"owner": "crm"},
            "plan": {"owner": "marketing"},
            "phone": {"rule": "latest"},
        },
        "match": [{"field": "email", "normalize": "email"}],
        "systems": {"crm": crm, "marketing": marketing},
        **more,
    }


ENTITY = customer(
    {"id": "id", "fields": {"email": "email", "name": "name", "plan": "plan", "phone": "phone"}},
    {"id": "id", "fields": {"email": "email_address", "name": "full_name", "plan": "plan", "phone": "phone"}},
)


def crm_sync(table: str, dests: list[dict[str, Any]], **flow: Any) -> dict[str, Any]:
    """The CRM's sync flow: its table polled every second on updated_at (read again 5 s behind the newest
    row), each change to `dests`."""
    return {
        "purpose": "CRM changes reach marketing",
        "owner": "ops",
        "sync": "customer",
        "trigger": {
            "schedule": {"every": "1s"},
            "source": {"system": "crm", "table": table, "cursor_column": "updated_at", "lookback": "5s"},
        },
        "destinations": dests,
        **flow,
    }


def sync_files(
    systems: dict[str, Any], entity: dict[str, Any], flows: dict[str, Any], hub: dict[str, Any] | None = None
) -> dict[str, str]:
    """The files of a sync project: patchbay.yaml (`hub`), the systems, the customer entity, the flows."""
    return {
        "patchbay.yaml": yaml.safe_dump({"port": 0, **(hub or {})}, sort_keys=False),
        "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
        "entities/customer.yaml": yaml.safe_dump(entity, sort_keys=False),
    } | {f"flows/{n}.yaml": yaml.safe_dump(f, sort_keys=False) for n, f in flows.items()}


def sync_project(
    root: Path,
    t: Tables,
    entity: dict[str, Any] | None = None,
    extra: list[dict[str, Any]] | None = None,
    *,
    upsert_creates: bool = False,
    hub: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    lookback: str = "5s",
) -> Path:
    """Two sync flows (one per table); `upsert_creates`: creates upsert on the email (a unique index),
    so a create retried after a crash lands once."""
    systems = {
        "crm": CRM_SYSTEM,
        "marketing": {"kind": "mysql", "owner": "marketing", "allow_private_network": True, **MY},
    }
    crm_cols = {"email": "email", "name": "name", "plan": "plan", "phone": "phone"}
    mk_cols = {"email": "email_address", "name": "full_name", "plan": "plan", "phone": "phone"}

    owned = {"crm": {"email", "name"}, "marketing": {"plan"}}

    def dests(system: str, table: str, cols: dict[str, str]) -> list[dict[str, Any]]:
        create = {c: f"record.{c}" for c in cols.values()}
        # An update never writes the columns the system owns; a person's decision (`owned` not empty) may.
        update = {"id": "id", **{c: f"record.{c}" for f, c in cols.items() if f not in owned[system]}}
        correct = {"id": "id", **{c: f"record.{c}" for c in cols.values()}}
        # Compare-and-set: a column changes only if it still holds what the hub last knew was there.
        expect_update = {c: f"expected.{c}" for c in update if c != "id"}
        expect_correct = {c: f"expected.{c}" for c in correct if c != "id"}
        return [
            {
                "name": f"{system}_correct",
                "system": system,
                "when": "op == 'update' && owned",
                "table": table,
                "write_mode": "update",
                "key": ["id"],
                "columns": correct,
                "expect": expect_correct,
            },
            {
                "name": f"{system}_create",
                "system": system,
                "when": "op == 'create'",
                "table": table,
                "write_mode": "upsert" if upsert_creates else "insert",
                **({"key": [cols["email"]]} if upsert_creates else {}),
                "columns": create,
            },
            {
                "name": f"{system}_update",
                "system": system,
                "when": "op == 'update' && !owned",
                "table": table,
                "write_mode": "update",
                "key": ["id"],
                "columns": update,
                "expect": expect_update,
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
                "source": {
                    "system": system,
                    "table": table,
                    "cursor_column": "updated_at",
                    "lookback": lookback,
                    **(source or {}),
                },
            },
            "destinations": all_dests,
        }

    flows = {"crm_sync": flow("crm", t.crm), "marketing_sync": flow("marketing", t.mk)}
    return write_project(root, sync_files(systems, entity or ENTITY, flows, hub))


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


def cli(root: Path, *args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from patchbay.cli import main

    res = CliRunner().invoke(main, [*args, "-p", str(root)])
    return res.exit_code, res.output
