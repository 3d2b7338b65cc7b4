"""mysql: write records as rows of a MySQL or MariaDB table, or poll a table or query for changed rows."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import Field

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Resources, import_driver
from patchbay.connectors.sql_client.config import SqlServerSystem, SqlSinkConfig
from patchbay.connectors.sql_client.errors import DbRefused
from patchbay.connectors.sql_client.sink import SqlSink
from patchbay.connectors.sql_client.source import SqlSource
from patchbay.connectors.sql_client.source_config import SqlSourceConfig
from patchbay.connectors.sql_client.statements import Statement, build_statement
from patchbay.connectors.tls_client import TlsSettings, tls_context
from patchbay.registry import connector
from patchbay.security.ssrf import connect_first


@functools.cache
def load_driver() -> tuple[Any, type[Any]]:
    """The aiomysql module and a cursor class that keeps server warnings, or MissingDriver with a hint."""
    aiomysql = import_driver("aiomysql", package="aiomysql", extra="mysql", kind="mysql")

    class NotesCursor(aiomysql.Cursor):  # type: ignore[misc,name-defined]
        """aiomysql turns server warnings into Python warnings; we report them in the outcome instead."""

        notes: list[str] = []

        async def _show_warnings(self, conn: Any) -> None:
            rows = await conn.show_warnings()
            self.notes = [f"{level} {code}: {msg}" for level, code, msg in rows or ()]

    return aiomysql, NotesCursor


def supports_row_alias(server_info: str) -> bool:
    """MySQL 8.0.19+ takes `INSERT ... AS new ON DUPLICATE KEY UPDATE c = new.c`; MariaDB does not."""
    if "mariadb" in server_info.lower():
        return False
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", server_info)
    return m is not None and tuple(int(x) for x in m.groups()) >= (8, 0, 19)


class MysqlSystem(SqlServerSystem):
    port: int | None = Field(None, ge=1, le=65535, description="Server port; omitted = 3306.")


def tls_settings(system: SqlServerSystem) -> TlsSettings | None:
    """The TLS settings for the system's ssl_mode (None: plain text).

    aiomysql connects to the checked IP address and then passes that IP as the TLS server_hostname; it
    has no setting for another name. The context (ServerNameContext) puts the configured host name
    back, so verify-full checks the certificate against `host`, as it would after connecting by name.
    """
    mode = system.effective_ssl_mode()
    if mode == "disable":
        return None
    return TlsSettings(
        verify=mode in ("verify-ca", "verify-full"),
        check_hostname=mode == "verify-full",
        ca_bundle=system.ca_bundle,
        server_name=system.host,
    )


def _address_failed(exc: BaseException) -> bool:
    """aiomysql could not reach the address (error 2003): the next address of the host may answer."""
    args = getattr(exc, "args", ())
    return isinstance(exc, OSError) or bool(args and args[0] == 2003)


async def connect(
    system: SqlServerSystem, resources: Resources, timeout_s: float, cursorclass: type[Any], **extra: Any
) -> Any:
    """An autocommit aiomysql connection; DbRefused when TLS is required but the server offers none.

    The host is resolved and checked by the address guard (BlockedAddress), and aiomysql connects to a
    checked IP address, never to the name, so a name cannot re-resolve to an internal address.
    """
    from pymysql.constants import CLIENT  # type: ignore[import-untyped,unused-ignore]

    my, _ = load_driver()
    s = system
    port = s.port or 3306
    settings = tls_settings(s)
    tls = await tls_context(settings) if settings is not None else None  # built once per system
    password = resources.secret(s.password) if s.password is not None else ""
    addresses = await resources.allowed_addresses(s.host, port)

    async def attempt(address: str) -> Any:
        return await my.connect(
            host=address,
            port=port,
            user=s.user,
            db=s.database,
            password=password,
            autocommit=True,
            charset="utf8mb4",
            ssl=tls,
            connect_timeout=timeout_s,
            client_flag=CLIENT.FOUND_ROWS,  # an update's row count is the rows matched, not changed
            cursorclass=cursorclass,
            # The server gives up waiting for a row lock (error 1205: transient) no later than we do.
            init_command=f"SET SESSION innodb_lock_wait_timeout = {max(1, int(timeout_s))}",
            **extra,
        )

    conn = await connect_first(addresses, attempt, next_on=_address_failed)
    mode = s.effective_ssl_mode()
    # With a TLS context aiomysql still goes on in plain text when the server offers no TLS.
    if mode != "prefer" and tls is not None and not conn.server_capabilities & CLIENT.SSL:
        conn.close()
        raise DbRefused(f"connecting to {s.host}: the server does not offer TLS, but ssl_mode is {mode}")
    return conn


class _MysqlConnections:
    """How the sink and the source close and judge an aiomysql connection."""

    async def _disconnect(self, conn: Any) -> None:
        if conn.closed:
            return
        try:
            await conn.ensure_closed()
        except Exception:
            conn.close()

    def _healthy(self, conn: Any) -> bool:
        return not conn.closed


@connector("mysql", roles=("destination",), config=SqlSinkConfig, system_config=MysqlSystem, extra="mysql")
class MysqlSink(_MysqlConnections, SqlSink[MysqlSystem, Any]):
    """One statement per record over a small connection pool (aiomysql, autocommit); also MariaDB.

    upsert is INSERT ... ON DUPLICATE KEY UPDATE, which fires on any unique key of the table.
    """

    dialect = "mysql"

    def __init__(
        self, system: MysqlSystem, config: SqlSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        self._my, self._cursor = load_driver()
        self._row_alias = False  # learnt from the server on connect: MySQL 8.0.19+ (not MariaDB)
        super().__init__(system, config, policy, resources, system.pool_size)

    async def _connect(self) -> Any:
        conn = await connect(self.system, self.resources, self.policy.timeout_s, self._cursor)
        self._row_alias = supports_row_alias(conn.get_server_info())
        return conn

    def _build(self, request: Mapping[str, Any]) -> Statement:
        return build_statement(request, "mysql", self._adapt, mysql_row_alias=self._row_alias)

    def _adapt(self, value: Any) -> Any:
        return orjson.dumps(value).decode() if isinstance(value, dict | list) else value

    async def _execute(self, conn: Any, stmt: Statement) -> tuple[int, list[str]]:
        async with conn.cursor() as cur:
            count = await cur.execute(stmt.sql, stmt.params)
            return count, list(cur.notes)


@connector("mysql", roles=("source",), config=SqlSourceConfig, system_config=MysqlSystem, extra="mysql")
class MysqlSource(_MysqlConnections, SqlSource[Any]):
    """Poll a table or query by (cursor_column, id_column): one connection, autocommit, read-only, UTC.

    The session's time_zone is +00:00, so TIMESTAMP values (and the dedupe ids made from them) read the
    same whatever the server's setting; DATETIME values are read as stored. The session is read-only.
    """

    dialect = "mysql"

    def __init__(self, system: MysqlSystem, config: SqlSourceConfig, resources: Resources) -> None:
        self.system = system
        self._my, self._cursor = load_driver()
        super().__init__(config, resources)

    async def _connect(self) -> Any:
        conn = await connect(self.system, self.resources, self.config.timeout_s, self._cursor)
        try:
            async with conn.cursor() as cur:
                await cur.execute("SET SESSION time_zone = '+00:00'")
                await cur.execute("SET SESSION TRANSACTION READ ONLY")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _fetch(self, conn: Any, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with conn.cursor() as cur:
            await cur.execute(sql, params)
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
