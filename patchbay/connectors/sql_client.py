"""Shared by the SQL connectors (postgres, mysql, sqlite): config, rendering, SQL building, errors, pool.

A SQL destination renders each record at ingest into a JSON-able request

    {"op": "upsert", "schema": "crm", "table": "contacts", "row": {"id": 7, ...}, "key": ["id"]}

and turns it into one parameterised statement at send time. Values are always bound as parameters;
names (table, schema, columns) are checked against IDENT_RE and quoted for the dialect.

A SQL source polls a table or a query by keyset pagination on (cursor_column, id_column):

    SELECT ... WHERE (cursor_column, id_column) > (:last_value, :last_id)
    ORDER BY cursor_column, id_column LIMIT batch_size

and yields one batch per page with the last row's position as its cursor (see SourceCursor).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import re
import uuid
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AfterValidator, Field, field_validator, model_validator

from patchbay.config.models import DeliveryPolicy, SecretRef, Spec
from patchbay.connectors.base import Batch, Outcome, OutcomeClass, Resources, SourceRecord, Stopwatch, excerpt
from patchbay.errors import (
    AuthError,
    PatchbayError,
    RecordInvalid,
    SecretMissing,
    TerminalError,
    TransientError,
    Violation,
)
from patchbay.expressions import Expr, compile_expr
from patchbay.security.ssrf import blocked_cause

Dialect = Literal["postgres", "mysql", "sqlite"]
WriteMode = Literal["insert", "upsert", "update", "delete"]
SslMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]

IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # always fullmatch: `$` would allow "\n"
_IDENT_RULE = "use letters, digits and '_', not starting with a digit, at most 63 characters"


def check_ident(name: str, what: str = "column") -> str:
    """`name` if it is a safe SQL identifier, else ValueError saying why."""
    if not isinstance(name, str) or not IDENT_RE.fullmatch(name):
        raise ValueError(f"bad {what} name {name!r}: {_IDENT_RULE}")
    return name


def quote_ident(name: str, dialect: Dialect) -> str:
    check_ident(name)
    return f"`{name}`" if dialect == "mysql" else f'"{name}"'


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8, ::1 and Unix socket paths."""
    if host.startswith("/") or host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- config
def _expr_or_constant(v: Any) -> Any:
    if isinstance(v, str):
        compile_expr(v)  # ExprError is a ValueError: reported at this column's line
    return v


ColumnName = Annotated[str, AfterValidator(check_ident)]
ColumnValue = Annotated[str | int | float | bool | None, AfterValidator(_expr_or_constant)]


# `schema` is the word users know; pydantic warns that it shadows the deprecated BaseModel.schema().
warnings.filterwarnings(
    "ignore", message='Field name "schema" in "SqlDestination" shadows', category=UserWarning
)
warnings.filterwarnings(
    "ignore", message='Field name "schema" in "SqlSourceConfig" shadows', category=UserWarning
)


class SqlDestination(Spec):
    """Where and how each record is written: one row per record."""

    table: str = Field(
        description="Table to write to. Names are quoted, so write them as they were created (case matters).",
        examples=["contacts"],
    )
    schema: str | None = Field(  # type: ignore[assignment]
        None,
        description="Schema (PostgreSQL), database (MySQL) or attached database (SQLite) holding the table; "
        "omitted = the connection's default.",
    )
    write_mode: WriteMode = Field(
        description="insert (add a row), upsert (insert, or update the row with the same key), update "
        "(change the row with the key), delete (remove the row with the key). upsert, update and delete "
        "are idempotent; insert is at-least-once: a retry after a lost acknowledgement can add the row "
        "twice, or be dead-lettered as a duplicate if the table has a unique key. Prefer upsert.",
    )
    key: list[ColumnName] = Field(
        default_factory=list,
        description="upsert, update, delete: the columns that identify a row (the primary key or a unique "
        "index; upsert needs one on exactly these columns in PostgreSQL and SQLite).",
        examples=[["email"]],
    )
    columns: dict[ColumnName, ColumnValue] | None = Field(
        None,
        description="Column -> JMESPath expression over the record (a number, true/false or null is written "
        "as it is). Omitted = every top-level field of the record is a column. Objects and arrays are "
        "written as JSON (jsonb in PostgreSQL).",
        examples=[{"email": "properties.email", "name": "properties.firstname"}],
    )
    if_missing: Literal["dead_letter", "ignore"] = Field(
        "dead_letter",
        description="update: what to do when no row has the key: dead_letter (default) or ignore. "
        "A delete of a row that is already gone always succeeds.",
    )

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        if "." in v:
            schema, _, table = v.rpartition(".")
            raise ValueError(f"write the schema on its own line: `schema: {schema}` and `table: {table}`")
        return check_ident(v, "table")

    @field_validator("schema")
    @classmethod
    def _schema(cls, v: str | None) -> str | None:
        return None if v is None else check_ident(v, "schema")

    @model_validator(mode="after")
    def _coherent(self) -> SqlDestination:
        op, key = self.write_mode, self.key
        if op == "insert":
            if key:
                raise ValueError("insert does not use `key`; remove it, or use write_mode: upsert")
            if self.if_missing != "dead_letter":
                raise ValueError("`if_missing` applies to write_mode: update only")
            return self
        if not key:
            raise ValueError(
                f"write_mode {op} needs `key: [column, ...]`: the columns that identify a row "
                "(its primary key or a unique index)"
            )
        if len(set(key)) != len(key):
            raise ValueError("`key` lists a column twice")
        if op != "update" and self.if_missing != "dead_letter":
            raise ValueError("`if_missing` applies to write_mode: update only")
        if self.columns is not None:
            missing = [k for k in key if k not in self.columns]
            if missing:
                k = missing[0]
                raise ValueError(f"key column {k!r} is not in `columns`; add it, e.g. `{k}: {k}`")
            others = [c for c in self.columns if c not in key]
            if op == "update" and not others:
                raise ValueError("update needs at least one column besides the key in `columns`")
            if op == "delete" and others:
                raise ValueError(
                    f"delete uses only the key columns; remove {', '.join(others)} from `columns`"
                )
        return self


class SqlServerSystem(Spec):
    """Connection settings shared by the client/server databases (PostgreSQL, MySQL/MariaDB)."""

    host: str = Field(description="Server host name or IP address.", examples=["db.internal"])
    port: int | None = Field(None, ge=1, le=65535, description="Server port; omitted = the standard one.")
    database: str = Field(description="Database to connect to.")
    user: str = Field(description="User name to log in as.")
    password: SecretRef | None = Field(
        None, description="The user's password: `{secret: NAME}` or `{env: VARIABLE}`, never inline."
    )
    ssl_mode: SslMode | None = Field(
        None,
        description="TLS: disable, prefer (TLS if the server offers it), require (TLS, certificate not "
        "checked), verify-ca (certificate signed by a trusted CA), verify-full (and issued for `host`). "
        "Omitted = require, or prefer when host is a loopback address (localhost, 127.0.0.1, ::1). "
        "Use verify-full across networks you don't trust.",
    )
    ca_bundle: str | None = Field(
        None, description="PEM file of CAs to trust for verify-ca/verify-full; omitted = the system's CAs."
    )
    pool_size: int = Field(
        4, ge=1, le=100, description="Most connections open at once per destination; more attempts wait."
    )

    def effective_ssl_mode(self) -> SslMode:
        if self.ssl_mode is not None:
            return self.ssl_mode
        return "prefer" if is_loopback(self.host) else "require"

    def refs(self) -> list[SecretRef]:
        return [self.password] if self.password is not None else []


# ---------------------------------------------------------------- render (ingest half, pure)
class RowRenderer:
    """Turns a record into the stored request; raises RecordInvalid for anything the table can't take."""

    def __init__(self, config: SqlDestination) -> None:
        self.config = config
        self._columns: dict[str, Expr | Any] | None = (
            {c: compile_expr(v) if isinstance(v, str) else v for c, v in config.columns.items()}
            if config.columns is not None
            else None
        )

    def render(self, record: Any) -> dict[str, Any]:
        cfg = self.config
        if self._columns is not None:
            row: dict[str, Any] = {}
            problems: list[Violation] = []
            for col, src in self._columns.items():
                if isinstance(src, Expr):
                    try:
                        row[col] = src.search(record)
                    except RecordInvalid as exc:
                        problems.extend(Violation(col, v.message) for v in exc.violations)
                else:
                    row[col] = src
            if problems:
                raise RecordInvalid(problems, step="destination")
        else:
            if not isinstance(record, dict):
                raise RecordInvalid(
                    [Violation("", "the record is not an object; map it to columns with `columns:`")],
                    step="destination",
                )
            bad = [k for k in record if not IDENT_RE.fullmatch(str(k))]
            if bad:
                raise RecordInvalid(
                    [
                        Violation(
                            str(k),
                            f"not a usable column name ({_IDENT_RULE}); list the columns under `columns:`",
                        )
                        for k in bad
                    ],
                    step="destination",
                )
            row = dict(record)
        if cfg.write_mode == "delete":
            row = {k: row.get(k) for k in cfg.key}
        missing = [k for k in cfg.key if row.get(k) is None]
        if missing:
            raise RecordInvalid(
                [Violation(k, "key column is missing or null") for k in missing], step="destination"
            )
        if not row:
            raise RecordInvalid([Violation("", "no columns to write")], step="destination")
        if cfg.write_mode == "update" and all(c in cfg.key for c in row):
            raise RecordInvalid([Violation("", "nothing to update besides the key")], step="destination")
        request: dict[str, Any] = {"op": cfg.write_mode, "table": cfg.table, "row": row, "key": list(cfg.key)}
        if cfg.schema:
            request["schema"] = cfg.schema
        return request


# ---------------------------------------------------------------- statements
@dataclass(frozen=True)
class Statement:
    op: str
    target: str  # schema.table, for messages
    sql: str
    params: list[Any]
    key: dict[str, Any]

    @property
    def action(self) -> str:
        prep = {"insert": " into", "upsert": " into", "update": "", "delete": " from"}[self.op]
        return f"{self.op}{prep} {self.target}"


def build_statement(
    request: Mapping[str, Any],
    dialect: Dialect,
    adapt: Callable[[Any], Any] = lambda v: v,
    *,
    mysql_row_alias: bool = False,
) -> Statement:
    """One parameterised statement for a rendered request; ValueError if the request is malformed.

    Args:
        mysql_row_alias: MySQL 8.0.19+: refer to the new row by an alias (VALUES() is deprecated there,
            but MariaDB knows only VALUES()).
    """
    op = request["op"]
    if op not in ("insert", "upsert", "update", "delete"):
        raise ValueError(f"unknown write mode {op!r}")
    row: Mapping[str, Any] = request["row"]
    key: list[str] = list(request.get("key") or [])
    if not isinstance(row, Mapping) or not row:
        raise ValueError("the request has no row")

    def q(name: str) -> str:  # ValueError on a bad name
        return quote_ident(name, dialect)

    table = q(check_ident(request["table"], "table"))
    schema = request.get("schema")
    target = f"{q(check_ident(schema, 'schema'))}.{table}" if schema else table
    shown = f"{schema}.{request['table']}" if schema else str(request["table"])
    ph = "?" if dialect == "sqlite" else "%s"
    if op != "insert" and (not key or any(k not in row for k in key)):
        raise ValueError(f"{op} needs key columns that are in the row")
    cols = list(row)
    others = [c for c in cols if c not in key]
    where = " AND ".join(f"{q(k)} = {ph}" for k in key)
    key_values = {k: row[k] for k in key}
    if op in ("insert", "upsert"):
        sql = f"INSERT INTO {target} ({', '.join(q(c) for c in cols)}) VALUES ({', '.join([ph] * len(cols))})"
        if op == "upsert":
            if dialect == "mysql":
                # Fires on any unique key of the table, not only `key`: MySQL has no conflict target.
                if mysql_row_alias:
                    sql += " AS patchbay_new"
                    sets = [f"{q(c)} = patchbay_new.{q(c)}" for c in others]
                else:
                    sets = [f"{q(c)} = VALUES({q(c)})" for c in others]
                sql += " ON DUPLICATE KEY UPDATE " + ", ".join(sets or [f"{q(key[0])} = {q(key[0])}"])
            else:
                conflict = f" ON CONFLICT ({', '.join(q(k) for k in key)}) DO "
                sql += conflict + (
                    "UPDATE SET " + ", ".join(f"{q(c)} = excluded.{q(c)}" for c in others)
                    if others
                    else "NOTHING"
                )
        params = [adapt(row[c]) for c in cols]
    elif op == "update":
        if not others:
            raise ValueError("update has nothing to set besides the key")
        sql = f"UPDATE {target} SET {', '.join(f'{q(c)} = {ph}' for c in others)} WHERE {where}"
        params = [adapt(row[c]) for c in others] + [adapt(row[k]) for k in key]
    else:
        sql = f"DELETE FROM {target} WHERE {where}"
        params = [adapt(row[k]) for k in key]
    return Statement(op, shown, sql, params, key_values)


# ---------------------------------------------------------------- errors
class DbRefused(Exception):
    """Raised by a connector itself (e.g. TLS required but not offered); carries its class."""

    def __init__(self, message: str, cls: OutcomeClass = OutcomeClass.AUTH) -> None:
        self.cls = cls
        super().__init__(message)


_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")  # connection, rollback, resources, operator, system
_PG_TRANSIENT = {"55P03", "55006", "25006", "HV000"}  # lock not available, in use, read-only (failover)
_PG_AUTH_CLASSES = ("28",)  # invalid authorization
_PG_AUTH = {"42501", "3D000"}  # insufficient privilege, database does not exist
_PG_CONNECT_AUTH = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    'role "',
    "permission denied",
    "does not exist",
    "does not support ssl",
    "certificate",
    "sslmode value",
)

_MY_TRANSIENT = {
    1021,
    1037,
    1038,
    1040,
    1041,
    1053,
    1135,
    1152,
    1153,
    1154,
    1155,
    1156,
    1157,
    1158,
    1159,
    1160,
    1161,
    1180,
    1181,
    1203,
    1205,
    1213,
    1226,
    1290,
    1317,
    1614,
    1615,
    1792,
    1836,
    1927,
    1969,
    3024,
    3572,
    4031,
}
_MY_AUTH = {1044, 1045, 1049, 1129, 1130, 1142, 1143, 1227, 1251, 1698, 1820, 1862, 2026, 2059, 2061}

_SQLITE_TRANSIENT = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_PROTOCOL",
    "SQLITE_NOMEM",
    "SQLITE_INTERRUPT",
)
_SQLITE_AUTH = ("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_CORRUPT", "SQLITE_NOTADB")

_NETWORK = (OSError, EOFError, ConnectionError, TimeoutError)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _classify_postgres(exc: BaseException) -> tuple[OutcomeClass, str]:
    code = getattr(exc, "sqlstate", None)
    if code:
        if code in _PG_TRANSIENT or code[:2] in _PG_TRANSIENT_CLASSES:
            return OutcomeClass.TRANSIENT, code
        if code in _PG_AUTH or code[:2] in _PG_AUTH_CLASSES:
            return OutcomeClass.AUTH, code
        return OutcomeClass.TERMINAL, code
    name = type(exc).__name__
    if name in ("OperationalError", "InterfaceError"):
        # No SQLSTATE: the connection failed or broke. libpq only gives us its message.
        msg = str(exc).lower()
        if "fatal:" in msg and any(s in msg for s in _PG_CONNECT_AUTH) and "too many" not in msg:
            return OutcomeClass.AUTH, ""
        if any(s in msg for s in ("does not support ssl", "certificate verify failed", "root certificate")):
            return OutcomeClass.AUTH, ""
        return OutcomeClass.TRANSIENT, ""
    # ProgrammingError, DataError... raised by the client itself: a retry won't help.
    return OutcomeClass.TERMINAL, ""


def _classify_mysql(exc: BaseException) -> tuple[OutcomeClass, str]:
    args = getattr(exc, "args", ())
    code = args[0] if args and isinstance(args[0], int) else None
    if code is None or code == 0:
        return OutcomeClass.TRANSIENT, ""  # InterfaceError(0, 'Not connected') and the like
    if code in _MY_AUTH:
        return OutcomeClass.AUTH, str(code)
    if code in _MY_TRANSIENT or 2000 <= code < 3000:  # client-side errors, e.g. 2003 refused, 2013 lost
        return OutcomeClass.TRANSIENT, str(code)
    return OutcomeClass.TERMINAL, str(code)


def _classify_sqlite(exc: BaseException) -> tuple[OutcomeClass, str]:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if not name:
        msg = str(exc).lower()
        if "locked" in msg or "unable to open" in msg or "disk i/o" in msg:
            return OutcomeClass.TRANSIENT, ""
        if "readonly" in msg:
            return OutcomeClass.AUTH, ""
        return OutcomeClass.TERMINAL, ""
    if name.startswith(_SQLITE_TRANSIENT):
        return OutcomeClass.TRANSIENT, name
    if name.startswith(_SQLITE_AUTH):
        return OutcomeClass.AUTH, name
    return OutcomeClass.TERMINAL, name


def _message(exc: BaseException, dialect: Dialect) -> tuple[str, str]:
    """The database's message: one line for the error, the full text for the excerpt."""
    full = str(exc) or type(exc).__name__
    if dialect == "mysql" and len(getattr(exc, "args", ())) >= 2:
        return str(exc.args[1]), str(exc.args[1])
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if primary:  # PostgreSQL: skip the LINE/caret lines, keep DETAIL (e.g. which key already exists)
        detail = getattr(diag, "message_detail", None)
        return primary + (f" ({detail.rstrip('.')})" if detail else ""), full
    return full, full


_DRIVER_MODULES = {"postgres": ("psycopg",), "mysql": ("pymysql", "aiomysql"), "sqlite": ("sqlite3",)}


def classify_db(
    exc: BaseException,
    dialect: Dialect,
    *,
    action: str = "",
    latency_ms: float = 0.0,
    redact: Callable[[str], str] = lambda s: s,
    role: Literal["destination", "source"] = "destination",
    system: str | None = None,
) -> Outcome:
    """What a database error means for the delivery.

    TRANSIENT: connection refused or lost, server shutting down, deadlock, serialization failure, lock
    timeout, too many connections: retried. TERMINAL: constraint violations, unknown column or table,
    bad values, syntax: dead-lettered with the database's message; also a host the address guard
    refuses (the same on every try). AUTH: credentials, permissions or a missing database: retries
    won't help and it is not the record's fault, so the destination pauses.
    """
    blocked = blocked_cause(exc)
    if blocked is not None:
        why = blocked.explain(system)
        return Outcome(
            OutcomeClass.TERMINAL, None, latency_ms, error=redact(f"{action}: {why}" if action else why)
        )
    module = type(exc).__module__.split(".")[0]
    if isinstance(exc, DbRefused):
        cls, code = exc.cls, ""
    elif isinstance(exc, SecretMissing):  # the password is gone from the vault: not the record's fault
        cls, code = OutcomeClass.AUTH, ""
    elif module in _DRIVER_MODULES[dialect]:
        classify = {"postgres": _classify_postgres, "mysql": _classify_mysql, "sqlite": _classify_sqlite}[
            dialect
        ]
        cls, code = classify(exc)
    elif isinstance(exc, _NETWORK):
        cls, code = OutcomeClass.TRANSIENT, ""
    else:  # not the database's answer (a driver or connector bug): retry rather than lose the event
        cls, code = OutcomeClass.TRANSIENT, ""
    line, full = (redact(t) for t in _message(exc, dialect))
    if module not in _DRIVER_MODULES[dialect] and not isinstance(exc, DbRefused | SecretMissing):
        line = f"{type(exc).__name__}: {line}" if line != type(exc).__name__ else line
    label = f"[{code}] " if code else ""
    error = f"{action}: {label}{_one_line(line)}" if action else f"{label}{_one_line(line)}"
    if cls is OutcomeClass.AUTH and role == "destination":
        error += "; destination paused until `patchbay resume`"
    return Outcome(cls, None, latency_ms, excerpt(full), error=error)


# ---------------------------------------------------------------- pool
C = TypeVar("C")


class Pool(Generic[C]):
    """At most `size` connections, opened on demand and kept while healthy; no background tasks."""

    def __init__(
        self, open_conn: Callable[[], Awaitable[C]], close_conn: Callable[[C], Awaitable[None]], size: int
    ) -> None:
        self._open = open_conn
        self._close_conn = close_conn
        self._sem = asyncio.Semaphore(size)
        self._idle: list[C] = []
        self._closed = False

    @property
    def idle(self) -> list[C]:
        return list(self._idle)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._sem:
            yield

    async def take(self) -> C:
        """An idle connection (most recently used first) or a new one; call within slot()."""
        return self._idle.pop() if self._idle else await self._open()

    async def give_back(self, conn: C, reuse: bool) -> None:
        if reuse and not self._closed:
            self._idle.append(conn)
        else:
            await self._quietly_close(conn)

    async def clear(self) -> None:
        """Close the idle connections (after a lost connection they are likely dead too)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._quietly_close(conn)

    async def close(self) -> None:
        # Connections in use are closed when given back; a later take() opens a fresh one.
        self._closed = True
        await self.clear()

    async def _quietly_close(self, conn: C) -> None:
        try:
            await self._close_conn(conn)
        except Exception:  # closing a broken connection may fail; it is gone either way
            pass


# ---------------------------------------------------------------- the shared destination
class SqlSink(Generic[C]):
    """The send half every SQL destination shares; subclasses connect and execute."""

    kind: ClassVar[str]
    dialect: ClassVar[Dialect]

    def __init__(
        self, config: SqlDestination, policy: DeliveryPolicy, resources: Resources, pool_size: int
    ) -> None:
        self.config = config
        self.policy = policy
        self.resources = resources
        self._renderer = RowRenderer(config)
        self._pool: Pool[C] = Pool(self._connect, self._disconnect, pool_size)

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        return self._renderer.render(record)

    # -- delivery half -----------------------------------------------------
    async def _connect(self) -> C:
        raise NotImplementedError

    async def _disconnect(self, conn: C) -> None:
        raise NotImplementedError

    async def _execute(self, conn: C, stmt: Statement) -> tuple[int, list[str]]:
        """Run one statement in autocommit; the affected (for update: matched) row count and notes."""
        raise NotImplementedError

    def _healthy(self, conn: C) -> bool:
        return True

    def _adapt(self, value: Any) -> Any:
        """A JSON value as the driver should bind it."""
        return value

    def _deadline(self) -> float | None:
        return self.policy.timeout_s

    def _build(self, request: Mapping[str, Any]) -> Statement:
        return build_statement(request, self.dialect, self._adapt)

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        sw = Stopwatch()
        try:
            stmt = self._build(request)
        except (KeyError, TypeError, ValueError) as exc:
            return Outcome(
                OutcomeClass.TERMINAL,
                None,
                sw.ms,
                error=f"cannot build a statement from the stored request: {exc}",
            )
        async with self._pool.slot():
            sw = Stopwatch()  # waiting for a free connection is not the database's latency
            conn: C | None = None
            reuse = False
            deadline = asyncio.timeout(self._deadline())
            try:
                async with deadline:
                    conn = await self._pool.take()
                    count, notes = await self._execute(conn, stmt)
                reuse = True
            except Exception as exc:
                if isinstance(exc, TimeoutError) and deadline.expired():
                    # Mid-statement: the connection's state is unknown, so it is not reused.
                    outcome = Outcome(
                        OutcomeClass.TRANSIENT,
                        None,
                        sw.ms,
                        error=f"{stmt.action}: timed out after {self.policy.timeout_s:g}s",
                    )
                else:
                    outcome = self._failed(exc, stmt, sw.ms)
                    reuse = conn is not None and outcome.cls is OutcomeClass.TERMINAL and self._healthy(conn)
                if conn is not None and not self._healthy(conn):
                    await self._pool.clear()  # the server went away: the idle ones are dead too
                return outcome
            finally:
                if conn is not None:
                    await self._pool.give_back(conn, reuse)
        if stmt.op == "update" and count == 0 and self.config.if_missing == "dead_letter":
            where = ", ".join(f"{k}={v!r}" for k, v in stmt.key.items())
            return Outcome(
                OutcomeClass.TERMINAL,
                None,
                sw.ms,
                error=self.resources.redact(
                    f"{stmt.action}: no row has the key ({where}); "
                    "set if_missing: ignore to skip such records"
                ),
            )
        done = "written" if stmt.op == "upsert" else f"{count} row{'s' if count != 1 else ''}"
        text = f"{stmt.action}: {done}" + ("; " + "; ".join(notes) if notes else "")
        return Outcome(OutcomeClass.SUCCESS, None, sw.ms, excerpt(self.resources.redact(text)))

    def _failed(self, exc: BaseException, stmt: Statement, ms: float) -> Outcome:
        return classify_db(
            exc,
            self.dialect,
            action=stmt.action,
            latency_ms=ms,
            redact=self.resources.redact,
            system=self.resources.system or None,
        )

    async def close(self) -> None:
        await self._pool.close()


# ---------------------------------------------------------------- sources: config
_LEADING_COMMENTS = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/)*", re.S)


def _scanner(dialect: Dialect | None) -> re.Pattern[str]:
    """Tokens that matter when we edit user SQL: literals and comments (kept whole), `:cursor`, `%`, `;`."""
    string = r"'(?:[^'\\]|\\.|'')*'" if dialect == "mysql" else r"'(?:[^']|'')*'"
    return re.compile(
        string + r'|"(?:[^"]|"")*"|`(?:[^`]|``)*`|--[^\n]*|/\*.*?\*/|::|(?<!\w):cursor(?!\w)|[%;]', re.S
    )


def bind_cursor(sql: str, dialect: Dialect | None) -> tuple[str, bool]:
    """`sql` ready for the driver, and whether it uses `:cursor`; ValueError if it holds several statements.

    `:cursor` outside literals and comments becomes the dialect's named parameter (`%(cursor)s`, or
    `:cursor` itself in SQLite); for the %-style drivers (psycopg, aiomysql) every `%` is doubled.
    """
    percent = dialect in ("postgres", "mysql")
    out: list[str] = []
    used = False
    pos = 0
    for m in _scanner(dialect).finditer(sql):
        out.append(sql[pos : m.start()])
        tok = m.group()
        if tok == ":cursor":
            used = True
            tok = "%(cursor)s" if percent else ":cursor"
        elif tok == ";":
            raise ValueError("write one SELECT statement, without `;`")
        elif percent:
            tok = tok.replace("%", "%%")
        out.append(tok)
        pos = m.end()
    out.append(sql[pos:])
    return "".join(out), used


def _check_select(query: str) -> str:
    query = query.strip().rstrip(";").rstrip()
    body = query[_LEADING_COMMENTS.match(query).end() :]  # type: ignore[union-attr]
    if not re.match(r"(?:select|with)\b", body, re.I):
        raise ValueError("`query` must be a SELECT (or WITH ... SELECT) statement")
    bind_cursor(query, None)
    return query


class SqlSourceConfig(Spec):
    """What a SQL source reads, and the column by which it remembers where the last poll stopped."""

    table: str | None = Field(
        None,
        description="Table to read (or give `query`). Names are quoted, so write them as they were created "
        "(case matters).",
        examples=["orders"],
    )
    schema: str | None = Field(  # type: ignore[assignment]
        None,
        description="Schema (PostgreSQL), database (MySQL) or attached database (SQLite) holding `table`; "
        "omitted = the connection's default.",
    )
    query: str | None = Field(
        None,
        description="A SELECT to read instead of `table`, e.g. joining other tables. It must return "
        "cursor_column and id_column; Patchbay reads it as a subquery and adds the cursor condition, the "
        "order and the limit. `:cursor` in it (optional) is bound as a typed parameter, never pasted, to "
        "the last cursor value read (initial_cursor on the first poll, so it needs one), which lets the "
        "database use an index: compare with `>=`, not `>`, because rows sharing the last value may "
        "still be unread (the rows already read are dropped for you). Trusted project configuration, "
        "like `where`.",
        examples=[
            "SELECT o.id, o.updated_at, o.total, c.email FROM orders o "
            "JOIN customers c ON c.id = o.customer_id WHERE o.updated_at >= :cursor"
        ],
    )
    cursor_column: ColumnName = Field(
        description="Column whose value grows whenever a row is added or changed: updated_at (new and "
        "changed rows) or an auto-increment id (new rows only). Each poll reads the rows after the last "
        "one read, in (cursor_column, id_column) order, so rows sharing a value are never skipped. Rows "
        "where it is null are not read. Index (cursor_column, id_column) on large tables. A value "
        "written by a transaction that commits after later values were read is missed: set it at "
        "commit time, or read through a `where` that leaves out the last seconds.",
        examples=["updated_at"],
    )
    id_column: ColumnName = Field(
        "id",
        description="Column that identifies a row (its primary key; rows where it is null are not read). "
        "It orders rows sharing a cursor value, and makes the event's dedupe id `<id>@<cursor value>`: "
        "a changed row is a new event, a row read again after a crash is not.",
    )
    columns: list[ColumnName] | None = Field(
        None,
        description="With `table`: the columns to read, including cursor_column and id_column; omitted = "
        "every column. Each row becomes a record with one field per column: timestamps and dates as "
        "ISO 8601 strings, decimals as strings (exact), binary as base64, JSON columns as objects "
        "(PostgreSQL) or strings (MySQL, SQLite).",
    )
    where: str | None = Field(
        None,
        description="An extra SQL condition on the rows, e.g. `status <> 'draft'`. It is pasted into the "
        "statement as written: trusted project configuration, never values from users or records. "
        "`:cursor` may appear in it as in `query`.",
        examples=["status <> 'draft'"],
    )
    batch_size: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Rows read per page; each page is committed as one batch together with its cursor. "
        "A poll reads pages until one is short.",
    )
    initial_cursor: str | int | float | None = Field(
        None,
        description="Where the first poll starts: rows whose cursor_column is at or after this value, "
        "e.g. '2026-01-01T00:00:00' or 0; omitted = every row. Once a cursor is saved it is not used "
        "again (`patchbay state FLOW --reset` forgets the saved cursor).",
    )
    timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Most seconds to connect, and (PostgreSQL, MySQL) to read one page; a slower poll "
        "fails, and the next scheduled poll tries again.",
    )

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        if v is not None and "." in v:
            schema, _, table = v.rpartition(".")
            raise ValueError(f"write the schema on its own line: `schema: {schema}` and `table: {table}`")
        return None if v is None else check_ident(v, "table")

    @field_validator("schema")
    @classmethod
    def _schema(cls, v: str | None) -> str | None:
        return None if v is None else check_ident(v, "schema")

    @field_validator("query")
    @classmethod
    def _query(cls, v: str | None) -> str | None:
        return None if v is None else _check_select(v)

    @field_validator("where")
    @classmethod
    def _where(cls, v: str | None) -> str | None:
        if v is not None:
            if not v.strip():
                raise ValueError("`where` is empty; remove it or give a condition")
            bind_cursor(v, None)
        return v

    @model_validator(mode="after")
    def _coherent(self) -> SqlSourceConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError("give either `table` (with optional `schema` and `columns`) or `query`")
        if self.query is not None:
            if self.schema is not None:
                raise ValueError("`schema` goes with `table`; write the schema inside `query`")
            if self.columns is not None:
                raise ValueError("`columns` goes with `table`; list the columns in the query's SELECT")
        if self.columns is not None:
            for what, col in (("cursor_column", self.cursor_column), ("id_column", self.id_column)):
                if col not in self.columns:
                    raise ValueError(f"`columns` must include the {what} {col!r}")
        if self.uses_cursor and self.initial_cursor is None:
            raise ValueError(
                "`:cursor` needs `initial_cursor`: the value bound to it on the first poll, "
                "e.g. initial_cursor: '1970-01-01T00:00:00' (or 0 for an id)"
            )
        return self

    @property
    def uses_cursor(self) -> bool:
        return any(bind_cursor(text, None)[1] for text in (self.query, self.where) if text is not None)


# ---------------------------------------------------------------- sources: values and the cursor
def jsonable(value: Any) -> Any:
    """A database value as JSON: ISO 8601 for times, str for Decimal (exact), base64 for bytes."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)  # UUID, IP addresses, ranges...


_TYPED: list[tuple[type[Any], str]] = [
    (dt.datetime, "datetime"),  # before date: a datetime is a date
    (dt.date, "date"),
    (dt.time, "time"),
    (Decimal, "decimal"),
    (uuid.UUID, "uuid"),
    (bytes, "bytes"),
    (bytearray, "bytes"),
    (memoryview, "bytes"),
]
_PARSE: dict[str, Callable[[Any], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": Decimal,
    "uuid": uuid.UUID,
    "bytes": base64.b64decode,
}


def _typed(value: Any) -> tuple[Any, str | None]:
    for cls, tag in _TYPED:
        if isinstance(value, cls):
            return jsonable(value), tag
    return jsonable(value), None


@dataclass(frozen=True)
class SourcePosition:
    """Where a page starts: after (value, id) of the last row read, or at `value` (inclusive), or anywhere."""

    value: Any = None
    id: Any = None
    after: bool = False


class SourceQuery:
    """A SQL source's page statements, and the records and cursor of a page they returned.

    The saved cursor is a JSON object, the position of the last row committed:

        {"column": "updated_at", "value": "2026-11-01T10:00:00+00:00", "value_type": "datetime", "id": 17}

    `value_type`/`id_type` (datetime, date, time, decimal, uuid, bytes) say how to bind the value
    back; plain JSON numbers and strings need none.
    """

    def __init__(self, config: SqlSourceConfig, dialect: Dialect) -> None:
        self.config = config
        self.dialect = dialect

        def q(name: str) -> str:
            return quote_ident(name, dialect)

        def param(name: str) -> str:
            return f":{name}" if dialect == "sqlite" else f"%({name})s"

        if config.table is not None:
            target = f"{q(config.schema)}.{q(config.table)}" if config.schema else q(config.table)
            cols = ", ".join(q(c) for c in config.columns) if config.columns else "*"
            source = f"SELECT {cols} FROM {target}"
            self.target = f"{config.schema}.{config.table}" if config.schema else config.table
        else:
            assert config.query is not None
            source = f"SELECT * FROM (\n{bind_cursor(config.query, dialect)[0]}\n) AS patchbay_src"
            self.target = "the query"
        self.same = config.cursor_column == config.id_column
        c, i, v, k = q(config.cursor_column), q(config.id_column), param("pb_value"), param("pb_id")
        conds = [f"{c} IS NOT NULL"] + ([] if self.same else [f"{i} IS NOT NULL"])
        if config.where is not None:
            conds.append(f"({bind_cursor(config.where, dialect)[0]}\n)")
        if self.same:
            after = f"{c} > {v}"
        elif dialect == "postgres":
            after = f"({c}, {i}) > ({v}, {k})"  # a row comparison: one index range scan on (c, i)
        else:
            after = f"{c} >= {v} AND ({c} > {v} OR {i} > {k})"
        order = c if self.same else f"{c}, {i}"

        def statement(extra: list[str]) -> str:
            where = " AND ".join(conds + extra)
            return f"{source} WHERE {where} ORDER BY {order} LIMIT {config.batch_size}"

        self._first = statement([])
        self._from = statement([f"{c} >= {v}"])
        self._after = statement([after])

    def resume(self, cursor: Any) -> SourcePosition:
        """The position a poll starts from, given the saved cursor (None: initial_cursor or the start)."""
        if cursor is None:
            start = self.config.initial_cursor
            return SourcePosition(start) if start is not None else SourcePosition()
        if not isinstance(cursor, dict):  # a bare value: read from it on, like initial_cursor
            return SourcePosition(cursor)
        column = cursor.get("column", self.config.cursor_column)
        if column != self.config.cursor_column or "value" not in cursor:
            raise TerminalError(
                f"polling {self.target}: the saved cursor {cursor!r} is not a position in cursor_column "
                f"{self.config.cursor_column!r}; run `patchbay state FLOW --reset` to read from the start"
            )
        try:
            value = self._parse(cursor["value"], cursor.get("value_type"))
            ident = self._parse(cursor.get("id"), cursor.get("id_type"))
        except (ValueError, TypeError) as exc:
            raise TerminalError(
                f"polling {self.target}: cannot read the saved cursor {cursor!r}: {exc}"
            ) from exc
        return SourcePosition(value, ident, after=True)

    @staticmethod
    def _parse(value: Any, tag: str | None) -> Any:
        if tag is None or value is None:
            return value
        if tag not in _PARSE:
            raise ValueError(f"unknown type {tag!r}")
        return _PARSE[tag](value)

    def page(self, pos: SourcePosition) -> tuple[str, dict[str, Any]]:
        """The statement and parameters for the page at `pos`."""
        params: dict[str, Any] = {}
        if pos.after:
            sql = self._after
            params["pb_value"] = pos.value
            if not self.same:
                params["pb_id"] = pos.id
        elif pos.value is not None:
            sql, params["pb_value"] = self._from, pos.value
        else:
            sql = self._first
        if self.config.uses_cursor:
            params["cursor"] = pos.value
        return sql, params

    def batch(self, rows: list[dict[str, Any]]) -> tuple[Batch, SourcePosition]:
        """The records of a page (non-empty) and the position after its last row."""
        cfg = self.config
        first = rows[0]
        ckey, ikey = self._key(first, cfg.cursor_column), self._key(first, cfg.id_column)
        records = []
        for row in rows:
            data = {str(k): jsonable(v) for k, v in row.items()}
            ident = data[ikey]
            rid = str(ident) if self.same else f"{ident}@{data[ckey]}"
            records.append(SourceRecord(data, rid))
        last = rows[-1]
        value, value_type = _typed(last[ckey])
        ident, id_type = _typed(last[ikey])
        cursor: dict[str, Any] = {"column": cfg.cursor_column, "value": value}
        if value_type:
            cursor["value_type"] = value_type
        cursor["id"] = ident
        if id_type:
            cursor["id_type"] = id_type
        return Batch(records, cursor), SourcePosition(last[ckey], last[ikey], after=True)

    def _key(self, row: Mapping[str, Any], column: str) -> str:
        if column in row:
            return column
        for k in row:  # MySQL and SQLite match column names regardless of case
            if str(k).lower() == column.lower():
                return str(k)
        raise TerminalError(
            f"polling {self.target}: the rows have no column {column!r}; the query must return it"
        )


# ---------------------------------------------------------------- sources: the shared poller
def source_error(
    exc: BaseException, dialect: Dialect, action: str, redact: Callable[[str], str], system: str | None = None
) -> PatchbayError:
    """A database error raised from poll: TransientError, AuthError or TerminalError."""
    outcome = classify_db(exc, dialect, action=action, redact=redact, role="source", system=system)
    if outcome.cls is OutcomeClass.TRANSIENT:
        return TransientError(outcome.error)
    if outcome.cls is OutcomeClass.AUTH:
        return AuthError(outcome.error)
    return TerminalError(outcome.error)


class SqlSource(Generic[C]):
    """The poll loop every SQL source shares; subclasses connect and fetch.

    One connection, kept between polls. A read on a kept connection that the server closed in the
    meantime (restart, idle timeout, killed) is retried once on a new one: a SELECT is safe to repeat.
    """

    kind: ClassVar[str]
    dialect: ClassVar[Dialect]
    mode: ClassVar[str] = "poll"

    def __init__(self, config: SqlSourceConfig, resources: Resources) -> None:
        self.config = config
        self.resources = resources
        self.query = SourceQuery(config, self.dialect)
        self._pool: Pool[C] = Pool(self._connect, self._disconnect, 1)

    async def _connect(self) -> C:
        raise NotImplementedError

    async def _disconnect(self, conn: C) -> None:
        raise NotImplementedError

    async def _fetch(self, conn: C, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one SELECT; its rows as dicts keyed by column name."""
        raise NotImplementedError

    def _healthy(self, conn: C) -> bool:
        return True

    def _deadline(self) -> float | None:
        return self.config.timeout_s

    @property
    def action(self) -> str:
        where = f" on {self.resources.system}" if self.resources.system else ""
        return f"polling {self.query.target}{where}"

    async def poll(self, cursor: Any) -> AsyncGenerator[Batch, None]:
        """Pages from the saved cursor on, each with the position of its last row, until a short page."""
        pos = self.query.resume(cursor)
        while True:
            sql, params = self.query.page(pos)
            rows = await self._read(sql, params)
            if not rows:
                return
            batch, pos = self.query.batch(rows)
            yield batch  # the connection is back in the pool: dropping the generator here leaks nothing
            if len(rows) < self.config.batch_size:
                return

    async def _read(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self._pool.slot():
            for attempt in (1, 2):
                kept = bool(self._pool.idle)
                conn: C | None = None
                reuse = False
                deadline = asyncio.timeout(self._deadline())
                try:
                    async with deadline:
                        conn = await self._pool.take()
                        rows = await self._fetch(conn, sql, params)
                    reuse = True
                    return rows
                except Exception as exc:
                    if isinstance(exc, TimeoutError) and deadline.expired():
                        # Mid-statement: the connection's state is unknown, so it is not reused.
                        raise TransientError(
                            f"{self.action}: timed out after {self.config.timeout_s:g}s"
                        ) from exc
                    broken = conn is not None and not self._healthy(conn)
                    if broken:
                        await self._pool.clear()
                    reuse = conn is not None and not broken
                    if attempt == 1 and kept and broken:
                        continue  # the kept connection died between polls: once more on a new one
                    raise source_error(
                        exc, self.dialect, self.action, self.resources.redact, self.resources.system or None
                    ) from exc
                finally:
                    if conn is not None:
                        await self._pool.give_back(conn, reuse)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._pool.close()
