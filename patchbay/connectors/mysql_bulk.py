"""mysql (bulk): read MySQL/MariaDB in one consistent snapshot; write with LOAD DATA LOCAL, in one transaction.

Reading: START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY takes the cursor's high-water mark,
then streams the window with a server-side cursor (memory stays bounded: one batch at a time). Values
arrive as the server's text (no driver conversion), which is already the COPY text form for numbers,
dates and times; booleans (TINYINT(1)) become t/f and binary columns \\x hex. Session time zone UTC.

Each batch is written to a private temporary file in the COPY text form the readers produce
(MariaDB's LOAD DATA reads it: tab-separated, `\\N` for NULL, backslash escapes) and loaded into
the table (full refresh: after DELETE, in the transaction) or into a temporary stage that append and
merge apply with one INSERT ... SELECT. A LOAD DATA LOCAL turns bad values into warnings instead of
errors, so any warning fails the run: nothing is ever truncated or zeroed silently.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from patchbay.batch.frame import NULL, Column, Frame, escape
from patchbay.config.batch import BatchFrom, BatchTo
from patchbay.connectors.base import Resources
from patchbay.connectors.bulk_client import STATE_TABLE, Applied, SyncState, Window
from patchbay.connectors.mysql import MysqlSystem, connect, load_driver
from patchbay.errors import ConfigError
from patchbay.registry import connector

_TYPES = {
    "varchar": "text", "char": "text", "text": "text", "tinytext": "text", "mediumtext": "text",
    "longtext": "text", "enum": "text", "set": "text",
    "tinyint": "int", "smallint": "int", "mediumint": "int", "int": "int", "bigint": "int",
    "float": "float", "double": "float", "decimal": "numeric", "json": "json",
    "datetime": "timestamp", "timestamp": "timestamp", "date": "date", "time": "time", "year": "int",
    "binary": "bytes", "varbinary": "bytes", "blob": "bytes", "tinyblob": "bytes", "mediumblob": "bytes",
    "longblob": "bytes",
}  # fmt: skip
_TEMPORAL = {"timestamp", "timestamptz", "date"}
_DDL = {
    "text": "LONGTEXT", "int": "BIGINT", "float": "DOUBLE", "numeric": "DECIMAL(38,10)", "bool": "BOOLEAN",
    "json": "JSON", "timestamptz": "DATETIME(6)", "timestamp": "DATETIME(6)", "date": "DATE", "time": "TIME(6)",
    "uuid": "CHAR(36)",
}  # fmt: skip


def q(name: str) -> str:
    return ".".join(f"`{p}`" for p in name.split("."))


def _ddl(c: Column, key: list[str]) -> str:
    if c.type == "bytes":
        raise ConfigError(
            f"column {c.name}: binary columns are not written to MySQL/MariaDB by batch syncs yet"
        )
    if c.name in key and c.type == "text":
        return "VARCHAR(255)"  # a key must be indexable
    return _DDL.get(c.type, "LONGTEXT")


def _field_type(field: Any) -> str:
    """A result column's canonical type from the protocol's field type (a query's columns)."""
    from pymysql.constants import FIELD_TYPE  # type: ignore[import-untyped,unused-ignore]

    t = field.type_code
    if t == FIELD_TYPE.TINY and field.length == 1:
        return "bool"
    if t in (FIELD_TYPE.TINY, FIELD_TYPE.SHORT, FIELD_TYPE.LONG, FIELD_TYPE.LONGLONG, FIELD_TYPE.INT24):
        return "int"
    if t in (FIELD_TYPE.FLOAT, FIELD_TYPE.DOUBLE):
        return "float"
    if t in (FIELD_TYPE.DECIMAL, FIELD_TYPE.NEWDECIMAL):
        return "numeric"
    if t in (FIELD_TYPE.DATETIME, FIELD_TYPE.TIMESTAMP):
        return "timestamp"
    if t in (FIELD_TYPE.DATE, FIELD_TYPE.NEWDATE):
        return "date"
    if t == FIELD_TYPE.TIME:
        return "time"
    if t == FIELD_TYPE.JSON:
        return "json"
    if t in (FIELD_TYPE.BLOB, FIELD_TYPE.TINY_BLOB, FIELD_TYPE.MEDIUM_BLOB, FIELD_TYPE.LONG_BLOB):
        return "bytes" if field.charsetnr == 63 else "text"
    if t in (FIELD_TYPE.STRING, FIELD_TYPE.VAR_STRING) and field.charsetnr == 63:
        return "bytes"
    return "text"


def _reader_encoder(c: Column) -> Callable[[Any], bytes]:
    """A value as the server sent it (text, or bytes for binary columns) as a COPY text field."""
    if c.type == "bool":
        return lambda v: NULL if v is None else (b"f" if v in ("0", b"0") else b"t")

    def plain(v: Any) -> bytes:
        if v is None:
            return NULL
        if isinstance(v, bytes | bytearray):
            if c.type == "bytes":
                return escape("\\x" + bytes(v).hex())
            v = bytes(v).decode()
        return escape(v)

    return plain


def _converter(c: Column) -> Any:
    """How one COPY field becomes what LOAD DATA reads for this column (None: as it is)."""
    if c.type == "bool":
        return lambda f: b"1" if f == b"t" else b"0" if f == b"f" else f
    if c.type == "timestamptz":

        def utc(f: bytes) -> bytes:  # the readers give UTC ('+00'); DATETIME takes no offset
            if f == NULL:
                return f
            if f.endswith(b"+00"):
                return f[:-3]
            raise ValueError(f"column {c.name}: {f.decode()} is not in UTC")

        return utc
    if c.type == "bytes":
        raise ConfigError(
            f"column {c.name}: binary columns are not written to MySQL/MariaDB by batch syncs yet"
        )
    return None


@connector("mysql", roles=("bulk",), config=BatchTo, system_config=MysqlSystem, extra="mysql")
class MysqlBulk:
    """Batch syncs from and into MySQL/MariaDB: a consistent snapshot streamed out, LOAD DATA LOCAL in."""

    def __init__(self, system: MysqlSystem, resources: Resources, timeout_s: float = 30.0) -> None:
        self.system = system
        self.resources = resources
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._rconn: Any = None
        self.snapshot_max: str | None = None

    async def _c(self) -> Any:
        if self._conn is None or self._conn.closed:
            _, cursor_class = load_driver()
            self._conn = await connect(
                self.system, self.resources, self.timeout_s, cursor_class, local_infile=True
            )
            async with self._conn.cursor() as cur:
                await cur.execute("SET SESSION time_zone = '+00:00'")
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    async def _all(self, sql: str, args: Any = None) -> list[Any]:
        conn = await self._c()
        async with conn.cursor() as cur:
            await cur.execute(sql, args)
            return list(await cur.fetchall())

    # ---------------------------------------------------------------- reading
    async def _reader(self) -> Any:
        """The reading connection: values as the server's text (conv={}), session time zone UTC."""
        if self._rconn is None or self._rconn.closed:
            _, cursor_class = load_driver()
            self._rconn = await connect(self.system, self.resources, self.timeout_s, cursor_class, conv={})
            async with self._rconn.cursor() as cur:
                await cur.execute("SET SESSION time_zone = '+00:00'")
        return self._rconn

    async def _rall(self, sql: str, args: Any = None) -> list[Any]:
        conn = await self._reader()
        async with conn.cursor() as cur:
            await cur.execute(sql, args)
            return list(await cur.fetchall())

    def _rel(self, frm: BatchFrom) -> str:
        return q(frm.table) if frm.table is not None else f"({frm.query}) AS q"

    async def columns(self, frm: BatchFrom) -> list[Column]:
        if frm.table is not None:
            got = await self.table_columns(frm.table)
            if got is None:
                raise ConfigError(f"table {frm.table} does not exist")
            return got
        conn = await self._reader()
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT * FROM ({frm.query}) AS q LIMIT 0")
            fields = list(cur._result.fields if cur._result is not None else [])
        return [Column(f.name, _field_type(f), "") for f in fields]

    def _where(self, window: Window, columns: list[Column]) -> tuple[str, tuple[Any, ...]]:
        if window.column is None or window.start is None:
            return "", ()
        col = next((c for c in columns if c.name == window.column), None)
        kind = col.type if col is not None else "text"
        if kind in _TEMPORAL:
            micros = int(round(window.lookback_s * 1_000_000))
            return (
                f" WHERE {q(window.column)} >= CAST(%s AS DATETIME(6)) - INTERVAL %s MICROSECOND",
                (window.start, micros),
            )
        if kind in ("int", "float", "numeric"):
            return f" WHERE {q(window.column)} >= %s - %s", (window.start, window.lookback_s)
        return f" WHERE {q(window.column)} >= %s", (window.start,)

    async def cursor_max(self, frm: BatchFrom, window: Window) -> str | None:
        rows = await self._rall(f"SELECT MAX({q(window.column or '')}) FROM {self._rel(frm)}")
        return None if not rows or rows[0][0] is None else str(rows[0][0])

    async def count(self, frm: BatchFrom, window: Window) -> int | None:
        cols = await self.columns(frm) if window.column else []
        where, args = self._where(window, cols)
        rows = await self._rall(f"SELECT COUNT(*) FROM {self._rel(frm)}{where}", args)
        return int(rows[0][0]) if rows else None

    async def read(
        self, frm: BatchFrom, columns: list[Column], window: Window, batch_rows: int
    ) -> AsyncIterator[Frame]:
        """The window's rows in batches from one consistent snapshot; `snapshot_max` is the cursor's mark in it."""
        my, _ = load_driver()
        conn = await self._reader()
        where, args = self._where(window, columns)
        names = ", ".join(q(c.name) for c in columns)
        encoders = [_reader_encoder(c) for c in columns]
        self.snapshot_max = None
        done = False
        async with conn.cursor() as cur:
            await cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        try:
            if window.column is not None:
                rows = await self._rall(f"SELECT MAX({q(window.column)}) FROM {self._rel(frm)}")
                self.snapshot_max = None if not rows or rows[0][0] is None else str(rows[0][0])
            cur = await conn.cursor(my.SSCursor)
            await cur.execute(f"SELECT {names} FROM {self._rel(frm)}{where}", args)
            while batch := await cur.fetchmany(batch_rows):
                yield Frame(
                    columns, [[enc(v) for enc, v in zip(encoders, row, strict=True)] for row in batch]
                )
            await cur.close()
            done = True
        finally:
            if done:
                async with conn.cursor() as c2:
                    await c2.execute("ROLLBACK")
            else:  # a stream left unread cannot be stopped politely: drop the connection (and its snapshot)
                conn.close()
                self._rconn = None

    def _key_expr(self, key: list[str]) -> str:
        return "CONCAT_WS('|', " + ", ".join(f"COALESCE(CAST({q(k)} AS CHAR), '')" for k in key) + ")"

    async def key_buckets(self, relation: BatchFrom, key: list[str]) -> dict[str, tuple[int, int]]:
        """Per key range (first two hex digits of md5(key)): how many keys and a checksum, as the other dialects."""
        rows = await self._rall(
            "SELECT SUBSTR(h, 1, 2), COUNT(*), CAST(SUM(CONV(SUBSTR(h, 3, 8), 16, 10)) AS SIGNED)"
            f" FROM (SELECT MD5({self._key_expr(key)}) AS h FROM {self._rel(relation)}) k GROUP BY 1"
        )
        return {str(b): (int(n), int(s)) for b, n, s in rows}

    async def bucket_keys(self, relation: BatchFrom, key: list[str], bucket: str) -> set[str]:
        rows = await self._rall(
            f"SELECT k FROM (SELECT {self._key_expr(key)} AS k FROM {self._rel(relation)}) t"
            " WHERE SUBSTR(MD5(k), 1, 2) = %s",
            (bucket,),
        )
        return {r[0] if isinstance(r[0], str) else r[0].decode() for r in rows}

    # ---------------------------------------------------------------- writing
    async def table_columns(self, table: str) -> list[Column] | None:
        rows = await self._all(
            "SELECT column_name, data_type, column_type FROM information_schema.columns"
            " WHERE table_schema = DATABASE() AND table_name = %s ORDER BY ordinal_position",
            (table.split(".")[-1],),
        )
        if not rows:
            return None
        json_cols = await self._json_checked(table.split(".")[-1])
        out = []
        for name, data_type, column_type in rows:
            kind = (
                "bool"
                if str(column_type).lower() == "tinyint(1)"
                else "json"
                if name in json_cols
                else _TYPES.get(str(data_type).lower(), "text")
            )
            out.append(Column(name, kind, str(column_type)))
        return out

    async def _json_checked(self, table: str) -> set[str]:
        """MariaDB's JSON columns: LONGTEXT with a json_valid() check (MySQL has a JSON type instead)."""
        try:
            rows = await self._all(
                "SELECT check_clause FROM information_schema.check_constraints"
                " WHERE constraint_schema = DATABASE() AND table_name = %s",
                (table,),
            )
        except Exception:  # MySQL before 8.0.16 has no such view: JSON columns are typed there
            return set()
        out = set()
        for (clause,) in rows:
            m = re.fullmatch(r"json_valid\(`([^`]+)`\)", str(clause).strip(), re.IGNORECASE)
            if m:
                out.add(m.group(1))
        return out

    async def row_count(self, table: str) -> int:
        return int((await self._all(f"SELECT COUNT(*) FROM {q(table)}"))[0][0])

    async def _ensure_state_table(self) -> None:
        await self._all(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (flow VARCHAR(255) PRIMARY KEY, `cursor` TEXT,"
            " columns JSON, runs BIGINT NOT NULL DEFAULT 0, updated_at DATETIME(6) NOT NULL)"
        )

    async def state(self, flow: str) -> SyncState | None:
        await self._ensure_state_table()
        rows = await self._all(f"SELECT `cursor`, columns, runs FROM {STATE_TABLE} WHERE flow = %s", (flow,))
        if not rows:
            return None
        cursor, columns, runs = rows[0]
        return SyncState(cursor, list(orjson.loads(columns or "[]")), int(runs))

    async def begin(
        self, flow: str, table: str, columns: list[Column], mode: str, key: list[str], evolve: list[Column]
    ) -> _MyLoad:
        await self._ensure_state_table()
        conn = await self._c()
        # DDL commits implicitly in MySQL: create and evolve the table before the run's transaction.
        if await self.table_columns(table) is None:
            cols = [f"{q(c.name)} {_ddl(c, key)}" for c in columns]
            if key:
                cols.append(f"PRIMARY KEY ({', '.join(map(q, key))})")
            await self._all(f"CREATE TABLE {q(table)} ({', '.join(cols)})")
        for c in evolve:
            await self._all(f"ALTER TABLE {q(table)} ADD COLUMN {q(c.name)} {_ddl(c, key)}")
        load = _MyLoad(self, conn, flow, table, columns, mode, key)
        await load.start()
        return load


class _MyLoad:
    def __init__(
        self,
        owner: MysqlBulk,
        conn: Any,
        flow: str,
        table: str,
        columns: list[Column],
        mode: str,
        key: list[str],
    ) -> None:
        self.owner, self.conn, self.flow, self.table = owner, conn, flow, table
        self.columns, self.mode, self.key = columns, mode, key
        self.convert = [(i, f) for i, c in enumerate(columns) if (f := _converter(c)) is not None]
        self.copied = 0
        self._dir = tempfile.mkdtemp(prefix="patchbay-load-")
        self._deletes: list[tuple[Any, ...]] = []
        self._open = False
        self._stages: list[str] = []

    async def _exec(self, sql: str, args: Any = None) -> int:
        async with self.conn.cursor() as cur:
            n = await cur.execute(sql, args)
            notes = getattr(cur, "notes", [])
            if notes:
                raise ValueError(
                    f"{self.table}: the server changed or refused values: {'; '.join(notes[:3])}"
                )
            return int(n or 0)

    async def start(self) -> None:
        await self.conn.begin()
        self._open = True
        if self.mode == "full":
            await self._exec(f"DELETE FROM {q(self.table)}")
        else:
            names = ", ".join(q(c.name) for c in self.columns)
            await self._exec(
                f"CREATE TEMPORARY TABLE _pb_stage AS SELECT {names} FROM {q(self.table)} LIMIT 0"
            )
            self._stages.append("_pb_stage")

    async def write(self, rows: list[list[bytes]]) -> None:
        if not rows:
            return
        for i, f in self.convert:
            for r in rows:
                r[i] = f(r[i])
        path = os.path.join(self._dir, "batch.tsv")
        with open(path, "wb") as fh:
            fh.write(b"".join(b"\t".join(r) + b"\n" for r in rows))
        target = q(self.table) if self.mode == "full" else "_pb_stage"
        names = ", ".join(q(c.name) for c in self.columns)
        n = await self._exec(
            f"LOAD DATA LOCAL INFILE %s INTO TABLE {target} CHARACTER SET utf8mb4"
            " FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' LINES TERMINATED BY '\\n'"
            f" ({names})",
            (path,),
        )
        if n != len(rows):
            raise ValueError(f"{self.table}: the server loaded {n} of {len(rows)} rows")
        self.copied += len(rows)
        os.unlink(path)

    async def delete_keys(self, keys: list[tuple[Any, ...]]) -> None:
        self._deletes.extend(keys)

    async def commit(self, state: SyncState) -> Applied:
        out = Applied()
        t = q(self.table)
        names = ", ".join(q(c.name) for c in self.columns)
        keys = ", ".join(map(q, self.key))
        match = " AND ".join(f"x.{q(k)} <=> s.{q(k)}" for k in self.key)
        if self._deletes:
            await self._exec(f"CREATE TEMPORARY TABLE _pb_deletes AS SELECT {keys} FROM {t} LIMIT 0")
            self._stages.append("_pb_deletes")
            marks = "(" + ", ".join(["%s"] * len(self.key)) + ")"
            async with self.conn.cursor() as cur:
                await cur.executemany(f"INSERT INTO _pb_deletes ({keys}) VALUES {marks}", self._deletes)
            out.deleted = await self._exec(f"DELETE x FROM {t} x JOIN _pb_deletes s ON {match}")
        if self.mode == "full":
            out.inserted = self.copied
        elif self.mode == "append":
            out.inserted = await self._exec(
                f"INSERT INTO {t} ({names}) SELECT {names} FROM _pb_stage s"
                f" WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE {match})"
            )
            out.unchanged = self.copied - out.inserted
        else:
            existing = (await self.owner._all(f"SELECT COUNT(*) FROM _pb_stage s JOIN {t} x ON {match}"))[0][
                0
            ]
            changed = await self._changed(match)
            replaced = await self._exec(f"DELETE x FROM {t} x JOIN _pb_stage s ON {match}")
            await self._exec(f"INSERT INTO {t} ({names}) SELECT {names} FROM _pb_stage")
            out.inserted = self.copied - int(existing)
            out.updated = changed
            out.unchanged = max(0, replaced - changed)
        await self._exec(
            f"INSERT INTO {STATE_TABLE} (flow, `cursor`, columns, runs, updated_at) VALUES (%s, %s, %s, 1, UTC_TIMESTAMP(6))"
            " ON DUPLICATE KEY UPDATE `cursor` = VALUES(`cursor`), columns = VALUES(columns), runs = runs + 1,"
            " updated_at = VALUES(updated_at)",
            (self.flow, state.cursor, orjson.dumps(state.columns).decode()),
        )
        await self.conn.commit()
        self._open = False
        await self._drop_stages()
        self._cleanup()
        return out

    async def _changed(self, match: str) -> int:
        rest = [c.name for c in self.columns if c.name not in self.key]
        if not rest:
            return 0
        differs = " OR ".join(f"NOT (x.{q(c)} <=> s.{q(c)})" for c in rest)
        rows = await self.owner._all(
            f"SELECT COUNT(*) FROM _pb_stage s JOIN {q(self.table)} x ON {match} WHERE {differs}"
        )
        return int(rows[0][0])

    async def _drop_stages(self) -> None:
        async with self.conn.cursor() as cur:  # temporary tables outlive a transaction in MySQL
            while self._stages:
                await cur.execute(f"DROP TEMPORARY TABLE {self._stages.pop()}")

    async def abort(self) -> None:
        try:
            if self._open:
                await self.conn.rollback()
                await self._drop_stages()
        finally:
            self._open = False
            self._cleanup()

    def _cleanup(self) -> None:
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)
