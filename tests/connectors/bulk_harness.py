"""Real PostgreSQL tables for batch syncs, and flow steps built the way a project file builds them."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.conftest import IN_CI, require_service

if not IN_CI:
    pytest.importorskip(
        "psycopg", reason="the postgres extra is not installed: pip install 'patchbay[postgres]'"
    )
import psycopg

from patchbay.config.batch import BatchSpec
from patchbay.config.project import StepSpec
from patchbay.connectors.base import Resources
from patchbay.connectors.postgres import PostgresSystem
from patchbay.connectors.postgres_bulk import PostgresBulk
from patchbay.engine.batch import BatchRun, RunReport
from patchbay.registry import STEPS, discover

HOST, PORT = os.environ.get("PATCHBAY_TEST_PG_HOST", "127.0.0.1"), 5432
SERVER = {"host": HOST, "port": PORT, "database": "test", "user": "postgres"}


def steps(*specs: dict[str, Any]) -> list[StepSpec]:
    """StepSpecs from `{kind: config}` mappings, e.g. steps({"map": {...}}, {"validate": {...}})."""
    discover()
    out = []
    for i, spec in enumerate(specs):
        ((kind, raw),) = spec.items()
        entry = STEPS[kind]
        config = entry.config.model_validate(raw)
        out.append(StepSpec(kind=kind, name=f"{kind}#{i + 1}", config=config, step=entry.cls(config)))
    return out


@asynccontextmanager
async def database() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to the test database; the tables named with `name()` are dropped after."""
    require_service("PostgreSQL", HOST, PORT)
    conn = await psycopg.AsyncConnection.connect(
        host=HOST, port=PORT, dbname="test", user="postgres", autocommit=True
    )
    await conn.execute("SET TimeZone = 'UTC'")
    made: list[str] = []
    conn.made = made  # type: ignore[attr-defined]
    yield conn
    for name in made:
        await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
    if await _has_state(conn):  # flows are named test-<random>: only stale rows, never a running test's own
        await conn.execute(
            "DELETE FROM _patchbay_sync_state WHERE flow LIKE 'test-%' AND updated_at < now() - interval '15 minutes'"
        )
    await conn.close()


async def _has_state(conn: Any) -> bool:
    row = await (await conn.execute("SELECT to_regclass('_patchbay_sync_state')")).fetchone()
    return row is not None and row[0] is not None


def name(pg: Any, prefix: str) -> str:
    n = f"{prefix}_{uuid.uuid4().hex[:10]}"
    pg.made.append(n)
    return n


def bulk() -> PostgresBulk:
    return PostgresBulk(PostgresSystem.model_validate(SERVER), Resources(allow_private=True, system="db"))


async def sync(
    flow: str, spec: dict[str, Any], step_list: list[StepSpec] | None = None, **kw: Any
) -> RunReport:
    src, dst = bulk(), bulk()
    try:
        run = BatchRun(flow, step_list or [], BatchSpec.model_validate(spec), src, dst, **kw)
        return await run.run()
    finally:
        await src.close()
        await dst.close()


async def fetch(pg: Any, sql: str) -> list[tuple[Any, ...]]:
    return await (await pg.execute(sql)).fetchall()
