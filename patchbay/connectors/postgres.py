"""postgres: write records as rows of a PostgreSQL table, or poll a table or query for changed rows."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Resources, import_driver
from patchbay.connectors.sql_client.config import SqlServerSystem, SqlSinkConfig
from patchbay.connectors.sql_client.sink import SqlSink
from patchbay.connectors.sql_client.source import SqlSource
from patchbay.connectors.sql_client.source_config import SqlSourceConfig
from patchbay.connectors.sql_client.statements import Statement
from patchbay.registry import connector


def load_driver() -> Any:
    """The psycopg module (3.x), or MissingDriver saying how to install it."""
    return import_driver("psycopg", package="psycopg", extra="postgres", kind="postgres")


class PostgresSystem(SqlServerSystem):
    port: int | None = Field(None, ge=1, le=65535, description="Server port; omitted = 5432.")
    host: str = Field(
        description="Server host name or IP address, or a Unix socket directory (e.g. /var/run/postgresql).",
        examples=["db.internal"],
    )


async def conninfo(system: PostgresSystem, resources: Resources, timeout_s: float) -> dict[str, Any]:
    """psycopg connection arguments for a system (the password resolved through `resources`).

    A network host is resolved and checked by the address guard here (BlockedAddress), and libpq is
    given the checked addresses as `hostaddr`, one attempt per address in order, so it connects to
    exactly what was checked and never resolves the name again; `host` keeps the name, which libpq
    uses for verify-full and SNI. A Unix socket directory is not a network address: no check.
    """
    s = system
    mode = s.effective_ssl_mode()
    port = s.port or 5432
    kw: dict[str, Any] = {
        "host": s.host,
        "port": port,
        "dbname": s.database,
        "user": s.user,
        "sslmode": mode,
        "application_name": "patchbay",
        "connect_timeout": max(2, int(timeout_s + 0.999)),
    }
    if not s.host.startswith("/"):
        addresses = await resources.allowed_addresses(s.host, port)
        kw["host"] = ",".join([s.host.strip("[]")] * len(addresses))
        kw["hostaddr"] = ",".join(addresses)
    if mode.startswith("verify"):
        kw["sslrootcert"] = s.ca_bundle or "system"
    if s.password is not None:
        kw["password"] = resources.secret(s.password)
    return kw


class _PostgresConnections:
    """How the sink and the source close and judge a psycopg connection."""

    async def _disconnect(self, conn: Any) -> None:
        await conn.close()

    def _healthy(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)


@connector(
    "postgres", roles=("destination",), config=SqlSinkConfig, system_config=PostgresSystem, extra="postgres"
)
class PostgresSink(_PostgresConnections, SqlSink[PostgresSystem, Any]):
    """One statement per record over a small connection pool (psycopg 3, autocommit)."""

    dialect = "postgres"

    def __init__(
        self, system: PostgresSystem, config: SqlSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        self._pg = load_driver()
        from psycopg.types.json import Jsonb

        self._jsonb = Jsonb
        super().__init__(system, config, policy, resources, system.pool_size)

    async def _connect(self) -> Any:
        kw = await conninfo(self.system, self.resources, self.policy.timeout_s)
        return await self._pg.AsyncConnection.connect(autocommit=True, **kw)

    def _adapt(self, value: Any) -> Any:
        return self._jsonb(value) if isinstance(value, dict | list) else value

    async def _execute(self, conn: Any, stmt: Statement) -> tuple[int, list[str]]:
        cur = await conn.execute(stmt.sql, stmt.params)
        return cur.rowcount, []


@connector(
    "postgres", roles=("source",), config=SqlSourceConfig, system_config=PostgresSystem, extra="postgres"
)
class PostgresSource(_PostgresConnections, SqlSource[Any]):
    """Poll a table or query by (cursor_column, id_column): one connection, autocommit, read-only, UTC.

    The session's TimeZone is UTC, so timestamptz values (and the dedupe ids made from them) read the
    same whatever the server's setting; it is read-only, so a `query` cannot change data.
    """

    dialect = "postgres"

    def __init__(self, system: PostgresSystem, config: SqlSourceConfig, resources: Resources) -> None:
        self.system = system
        self._pg = load_driver()
        super().__init__(config, resources)

    async def _connect(self) -> Any:
        kw = await conninfo(self.system, self.resources, self.config.timeout_s)
        kw["options"] = "-c TimeZone=UTC -c default_transaction_read_only=on"
        return await self._pg.AsyncConnection.connect(autocommit=True, **kw)

    async def _fetch(self, conn: Any, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        cur = await conn.execute(sql, params)
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
