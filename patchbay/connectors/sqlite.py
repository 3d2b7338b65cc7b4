"""sqlite: write records as rows of a table in a SQLite file, or poll a table or query for changed rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
from pydantic import Field, field_validator

from patchbay.config.models import DeliveryPolicy, Spec
from patchbay.connectors.base import Resources
from patchbay.connectors.sql_client.config import SqlSinkConfig
from patchbay.connectors.sql_client.sink import SqlSink
from patchbay.connectors.sql_client.source import SqlSource
from patchbay.connectors.sql_client.source_config import SqlSourceConfig
from patchbay.connectors.sql_client.statements import Statement
from patchbay.connectors.thread_client import OneThread
from patchbay.registry import connector


class SqliteSystem(Spec):
    path: str = Field(
        description="The database file; a relative path is relative to the project folder. "
        "It must exist: Patchbay writes rows, it does not create files or tables.",
        examples=["data/crm.db"],
    )
    foreign_keys: bool = Field(True, description="Enforce FOREIGN KEY constraints (SQLite's default is off).")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip() or v.strip() == ":memory:" or v.startswith("file:"):
            raise ValueError("give the path of a database file, e.g. data/crm.db")
        return v


def db_path(system: SqliteSystem, resources: Resources) -> Path:
    """The database file: a relative path is relative to the project folder."""
    p = Path(system.path).expanduser()
    root = resources.extra.get("root")
    return p if p.is_absolute() or root is None else Path(root) / p


def open_db(path: Path, mode: str, timeout_s: float, foreign_keys: bool) -> sqlite3.Connection:
    """An autocommit connection usable from worker threads; `mode` is rw or ro, never create."""
    # A missing file is an error (a typo must not create an empty database elsewhere).
    uri = path.resolve().as_uri() + f"?mode={mode}"
    conn = sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    try:
        if foreign_keys:
            conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


@connector("sqlite", roles=("destination",), config=SqlSinkConfig, system_config=SqliteSystem)
class SqliteSink(OneThread, SqlSink[SqliteSystem, sqlite3.Connection]):
    """One statement per record on one connection, run in a worker thread (SQLite has one writer)."""

    dialect = "sqlite"

    def __init__(
        self, system: SqliteSystem, config: SqlSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        super().__init__(system, config, policy, resources, pool_size=1)

    @property
    def path(self) -> Path:
        return db_path(self.system, self.resources)

    def _deadline(self) -> float | None:
        # A statement in a thread cannot be cancelled; the busy timeout bounds the wait for a lock instead.
        return None

    def _open(self) -> sqlite3.Connection:
        return open_db(self.path, "rw", self.policy.timeout_s, self.system.foreign_keys)

    async def _connect(self) -> sqlite3.Connection:
        return await self._in_thread(self._open)

    async def _disconnect(self, conn: sqlite3.Connection) -> None:
        await self._in_thread(conn.close)

    async def close(self) -> None:
        await super().close()
        self._let_thread_go()

    def _adapt(self, value: Any) -> Any:
        return orjson.dumps(value).decode() if isinstance(value, dict | list) else value

    async def _execute(self, conn: sqlite3.Connection, stmt: Statement) -> tuple[int, list[str]]:
        def run() -> int:
            return conn.execute(stmt.sql, stmt.params).rowcount

        return await self._in_thread(run), []


@connector("sqlite", roles=("source",), config=SqlSourceConfig, system_config=SqliteSystem)
class SqliteSource(OneThread, SqlSource[sqlite3.Connection]):
    """Poll a table or query by (cursor_column, id_column) on one read-only connection, in a worker thread.

    Timestamps in SQLite are whatever the table holds (usually text), and are compared as stored.
    """

    dialect = "sqlite"

    def __init__(self, system: SqliteSystem, config: SqlSourceConfig, resources: Resources) -> None:
        self.system = system
        super().__init__(config, resources)

    def _deadline(self) -> float | None:
        # A statement in a thread cannot be cancelled; the busy timeout bounds the wait for a lock instead.
        return None

    async def _connect(self) -> sqlite3.Connection:
        path = db_path(self.system, self.resources)
        return await self._in_thread(open_db, path, "ro", self.config.timeout_s, False)

    async def _disconnect(self, conn: sqlite3.Connection) -> None:
        await self._in_thread(conn.close)

    async def close(self) -> None:
        await super().close()
        self._let_thread_go()

    async def _fetch(
        self, conn: sqlite3.Connection, sql: str, params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            cur = conn.execute(sql, params)
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return await self._in_thread(run)
