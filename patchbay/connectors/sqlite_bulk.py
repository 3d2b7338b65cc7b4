"""sqlite (bulk): batch syncs from and to a SQLite file, each run in one transaction.

Reading takes one read transaction (a consistent snapshot in WAL mode) and turns rows into the COPY
text form every bulk writer takes. Writing binds decoded values with executemany into the table (a
full refresh, after DELETE) or into a temporary stage that append and merge apply with one INSERT
... SELECT; deletes and the flow's sync state are in the same transaction (BEGIN IMMEDIATE).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import orjson

from patchbay.batch.frame import NULL, Column, Frame, escape, unescape
from patchbay.config.batch import BatchFrom, BatchTo
from patchbay.connectors.base import Resources
from patchbay.connectors.bulk_client import STATE_TABLE, Applied, SyncState, Window
from patchbay.connectors.sqlite import SqliteSystem, db_path
from patchbay.connectors.thread_client import OneThread
from patchbay.registry import connector

T = TypeVar("T")
_DDL = {
    "text": "TEXT", "int": "INTEGER", "float": "REAL", "numeric": "NUMERIC", "bool": "BOOLEAN", "json": "JSON",
    "timestamptz": "TIMESTAMP", "timestamp": "TIMESTAMP", "date": "DATE", "time": "TIME", "uuid": "TEXT",
    "bytes": "BLOB",
}  # fmt: skip


def _type_of(declared: str) -> str:
    d = declared.upper()
    if "INT" in d:
        return "int"
    if any(w in d for w in ("REAL", "FLOA", "DOUB")):
        return "float"
    if "BOOL" in d:
        return "bool"
    if "JSON" in d:
        return "json"
    if "TIMESTAMP" in d or "DATETIME" in d:
        return "timestamp"
    if "DATE" in d:
        return "date"
    if "BLOB" in d:
        return "bytes"
    if "NUM" in d or "DEC" in d:
        return "numeric"
    return "text"


def q(name: str) -> str:
    return ".".join(f'"{p}"' for p in name.split("."))


def _encoder(c: Column) -> Callable[[Any], bytes]:
    """A SQLite value as a COPY text field of column `c`."""
    if c.type == "bool":
        return lambda v: NULL if v is None else (b"t" if v else b"f")
    if c.type == "bytes":
        return lambda v: NULL if v is None else escape("\\x" + bytes(v).hex())
    if c.type == "float":
        return lambda v: NULL if v is None else repr(float(v)).encode()

    def plain(v: Any) -> bytes:
        if v is None:
            return NULL
        if isinstance(v, bytes):
            return escape("\\x" + v.hex())
        return escape(v if isinstance(v, str) else str(v))

    return plain


def _decoder(c: Column) -> Callable[[bytes], Any]:
    """A COPY text field as the value SQLite stores for column `c`."""
    if c.type == "int":
        return lambda f: None if f == NULL else int(f)
    if c.type == "float":
        return lambda f: None if f == NULL else float(f)
    if c.type == "bool":
        return lambda f: None if f == NULL else (1 if f in (b"t", b"true", b"1") else 0)
    if c.type == "bytes":

        def blob(f: bytes) -> Any:
            text = unescape(f)
            return (
                None if text is None else bytes.fromhex(text[2:]) if text.startswith("\\x") else text.encode()
            )

        return blob
    return unescape


def _open(path: str, timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    conn.create_function("md5", 1, lambda s: hashlib.md5(str(s).encode()).hexdigest(), deterministic=True)
    conn.create_function("hex_int", 1, lambda h: int(h, 16), deterministic=True)
    return conn


@connector("sqlite", roles=("bulk",), config=BatchTo, system_config=SqliteSystem)
class SqliteBulk(OneThread):
    """Batch syncs from and to a SQLite file (the file must exist; tables are created when missing)."""

    def __init__(self, system: SqliteSystem, resources: Resources, timeout_s: float = 30.0) -> None:
        self.system = system
        self.resources = resources
        self.timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.snapshot_max: str | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            path = db_path(self.system, self.resources)
            if not path.exists():
                raise FileNotFoundError(
                    f"the SQLite file {path} does not exist (system {self.resources.system})"
                )
            self._conn = await self._in_thread(_open, str(path), self.timeout_s)
        conn = self._conn

        def locked() -> T:
            with self._lock:
                return fn(conn, *args)

        return await self._in_thread(locked)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._in_thread(conn.close)
        self._let_thread_go()

    # ---------------------------------------------------------------- reading
    async def columns(self, frm: BatchFrom) -> list[Column]:
        return await self._call(_columns, frm)

    def _rel(self, frm: BatchFrom) -> str:
        return q(frm.table) if frm.table is not None else f"({frm.query}) AS q"

    def _where(self, window: Window, columns: list[Column]) -> tuple[str, tuple[Any, ...]]:
        if window.column is None or window.start is None:
            return "", ()
        col = next((c for c in columns if c.name == window.column), None)
        start: Any = window.start
        if col is not None and col.type in ("int", "float"):
            start = float(window.start) - window.lookback_s
            return f" WHERE {q(window.column)} >= ?", (start,)
        if window.lookback_s:
            return f" WHERE {q(window.column)} >= datetime(?, ?)", (start, f"-{window.lookback_s} seconds")
        return f" WHERE {q(window.column)} >= ?", (start,)

    async def cursor_max(self, frm: BatchFrom, window: Window) -> str | None:
        row = await self._call(_one, f"SELECT max({q(window.column or '')}) FROM {self._rel(frm)}", ())
        return None if row is None or row[0] is None else str(row[0])

    async def count(self, frm: BatchFrom, window: Window) -> int | None:
        cols = await self.columns(frm) if window.column else []
        where, args = self._where(window, cols)
        row = await self._call(_one, f"SELECT count(*) FROM {self._rel(frm)}{where}", args)
        return None if row is None else int(row[0])

    async def read(
        self, frm: BatchFrom, columns: list[Column], window: Window, batch_rows: int
    ) -> AsyncIterator[Frame]:
        where, args = self._where(window, columns)
        names = ", ".join(q(c.name) for c in columns)
        encoders = [_encoder(c) for c in columns]
        self.snapshot_max = None

        def begin(conn: sqlite3.Connection) -> sqlite3.Cursor:
            conn.execute("BEGIN")  # one read transaction: the mark and the rows agree
            if window.column is not None:
                row = conn.execute(f"SELECT max({q(window.column)}) FROM {self._rel(frm)}").fetchone()
                self.snapshot_max = None if row is None or row[0] is None else str(row[0])
            return conn.execute(f"SELECT {names} FROM {self._rel(frm)}{where}", args)

        def fetch(conn: sqlite3.Connection, cur: sqlite3.Cursor) -> list[list[bytes]]:
            return [
                [enc(v) for enc, v in zip(encoders, row, strict=True)] for row in cur.fetchmany(batch_rows)
            ]

        cur = await self._call(begin)
        try:
            while rows := await self._call(fetch, cur):
                yield Frame(columns, rows)
        finally:
            await self._call(lambda conn: conn.execute("ROLLBACK") if conn.in_transaction else None)

    async def key_buckets(self, relation: BatchFrom, key: list[str]) -> dict[str, tuple[int, int]]:
        h = f"md5({_key_expr(key)})"
        rows = await self._call(
            _all,
            f"SELECT substr(h, 1, 2), count(*), sum(hex_int(substr(h, 3, 8))) FROM (SELECT {h} AS h FROM"
            f" {self._rel(relation)}) GROUP BY 1",
            (),
        )
        return {b: (int(n), int(s)) for b, n, s in rows}

    async def bucket_keys(self, relation: BatchFrom, key: list[str], bucket: str) -> set[str]:
        rows = await self._call(
            _all,
            f"SELECT k FROM (SELECT {_key_expr(key)} AS k FROM {self._rel(relation)}) WHERE substr(md5(k), 1, 2) = ?",
            (bucket,),
        )
        return {r[0] for r in rows}

    # ---------------------------------------------------------------- writing
    async def table_columns(self, table: str) -> list[Column] | None:
        got = await self._call(_columns_if_exists, table)
        return got

    async def row_count(self, table: str) -> int:
        row = await self._call(_one, f"SELECT count(*) FROM {q(table)}", ())
        return int(row[0]) if row else 0

    async def state(self, flow: str) -> SyncState | None:
        await self._call(_ensure_state_table)
        row = await self._call(
            _one, f'SELECT "cursor", columns, runs FROM {STATE_TABLE} WHERE flow = ?', (flow,)
        )
        if row is None:
            return None
        return SyncState(row[0], list(orjson.loads(row[1] or "[]")), int(row[2]))

    async def begin(
        self, flow: str, table: str, columns: list[Column], mode: str, key: list[str], evolve: list[Column]
    ) -> _LiteLoad:
        await self._call(_ensure_state_table)
        load = _LiteLoad(self, flow, table, columns, mode, key)
        await self._call(load.start, evolve)
        return load


def _key_expr(key: list[str]) -> str:
    return " || '|' || ".join(f"COALESCE(CAST({q(k)} AS TEXT), '')" for k in key)


def _one(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Any:
    return conn.execute(sql, args).fetchone()


def _all(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[Any]:
    return conn.execute(sql, args).fetchall()


def _columns(conn: sqlite3.Connection, frm: BatchFrom) -> list[Column]:
    if frm.table is not None:
        got = _columns_if_exists(conn, frm.table)
        if got is None:
            raise sqlite3.OperationalError(f"no such table: {frm.table}")
        return got
    cur = conn.execute(f"SELECT * FROM ({frm.query}) LIMIT 0")
    return [Column(d[0], "text") for d in cur.description or ()]


def _columns_if_exists(conn: sqlite3.Connection, table: str) -> list[Column] | None:
    rows = conn.execute(f"PRAGMA table_info({q(table)})").fetchall()
    if not rows:
        return None
    return [Column(name, _type_of(declared or ""), declared or "") for _, name, declared, *_ in rows]


def _ensure_state_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f'CREATE TABLE IF NOT EXISTS {STATE_TABLE} (flow TEXT PRIMARY KEY, "cursor" TEXT, columns TEXT,'
        " runs INTEGER NOT NULL DEFAULT 0, updated_at TEXT NOT NULL)"
    )


class _LiteLoad:
    def __init__(
        self, owner: SqliteBulk, flow: str, table: str, columns: list[Column], mode: str, key: list[str]
    ) -> None:
        self.owner, self.flow, self.table = owner, flow, table
        self.columns, self.mode, self.key = columns, mode, key
        self.decoders = [_decoder(c) for c in columns]
        self.copied = 0
        self._deletes: list[tuple[Any, ...]] = []
        self._open = False
        self._unique = False

    def start(self, conn: sqlite3.Connection, evolve: list[Column]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        self._open = True
        t = q(self.table)
        if _columns_if_exists(conn, self.table) is None:
            cols = [f"{q(c.name)} {_DDL.get(c.type, 'TEXT')}" for c in self.columns]
            if self.key:
                cols.append(f"PRIMARY KEY ({', '.join(map(q, self.key))})")
            conn.execute(f"CREATE TABLE {t} ({', '.join(cols)})")
        for c in evolve:
            conn.execute(f"ALTER TABLE {t} ADD COLUMN {q(c.name)} {_DDL.get(c.type, 'TEXT')}")
        if self.key:
            self._unique = _unique_on(conn, self.table, self.key)
        if self.mode == "full":
            conn.execute(f"DELETE FROM {t}")
        else:
            names = ", ".join(q(c.name) for c in self.columns)
            conn.execute("DROP TABLE IF EXISTS temp._pb_stage")
            conn.execute(f"CREATE TEMP TABLE _pb_stage AS SELECT {names} FROM {t} LIMIT 0")

    async def write(self, rows: list[list[bytes]]) -> None:
        if rows:
            await self.owner._call(self._insert, rows)
            self.copied += len(rows)

    def _insert(self, conn: sqlite3.Connection, rows: list[list[bytes]]) -> None:
        target = q(self.table) if self.mode == "full" else "temp._pb_stage"
        names = ", ".join(q(c.name) for c in self.columns)
        marks = ", ".join("?" * len(self.columns))
        dec = self.decoders
        conn.executemany(
            f"INSERT INTO {target} ({names}) VALUES ({marks})",
            ([d(f) for d, f in zip(dec, r, strict=True)] for r in rows),
        )

    async def delete_keys(self, keys: list[tuple[Any, ...]]) -> None:
        self._deletes.extend(keys)

    async def commit(self, state: SyncState) -> Applied:
        out = await self.owner._call(self._apply, state)
        self._open = False
        return out

    def _apply(self, conn: sqlite3.Connection, state: SyncState) -> Applied:
        out = Applied()
        t = q(self.table)
        names = ", ".join(q(c.name) for c in self.columns)
        match = " AND ".join(f"x.{q(k)} IS s.{q(k)}" for k in self.key)
        if self._deletes:
            where = " AND ".join(f"{q(k)} IS ?" for k in self.key)
            for k in self._deletes:
                out.deleted += conn.execute(f"DELETE FROM {t} WHERE {where}", k).rowcount
        if self.mode == "full":
            out.inserted = self.copied
        elif self.mode == "append":
            out.inserted = conn.execute(
                f"INSERT INTO {t} ({names}) SELECT {names} FROM temp._pb_stage s"
                f" WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE {match})"
            ).rowcount
            out.unchanged = self.copied - out.inserted
        else:
            rest = [c.name for c in self.columns if c.name not in self.key]
            existing = conn.execute(
                f"SELECT count(*) FROM temp._pb_stage s JOIN {t} x ON {match}"
            ).fetchone()[0]
            differs = " OR ".join(f"x.{q(c)} IS NOT s.{q(c)}" for c in rest) or "0"
            changed = conn.execute(
                f"SELECT count(*) FROM temp._pb_stage s JOIN {t} x ON {match} WHERE {differs}"
            ).fetchone()[0]
            conn.execute(
                f"DELETE FROM {t} WHERE rowid IN (SELECT x.rowid FROM {t} x JOIN temp._pb_stage s ON {match})"
            )
            conn.execute(f"INSERT INTO {t} ({names}) SELECT {names} FROM temp._pb_stage")
            out.inserted, out.updated = self.copied - int(existing), int(changed)
            out.unchanged = int(existing) - int(changed)
        conn.execute(
            f'INSERT INTO {STATE_TABLE} (flow, "cursor", columns, runs, updated_at) VALUES (?, ?, ?, 1,'
            ' strftime(\'%Y-%m-%dT%H:%M:%fZ\')) ON CONFLICT (flow) DO UPDATE SET "cursor" = excluded."cursor",'
            f" columns = excluded.columns, runs = {STATE_TABLE}.runs + 1, updated_at = excluded.updated_at",
            (self.flow, state.cursor, orjson.dumps(state.columns).decode()),
        )
        conn.execute("COMMIT")
        conn.execute("DROP TABLE IF EXISTS temp._pb_stage")
        return out

    async def abort(self) -> None:
        if self._open:
            self._open = False
            await self.owner._call(lambda conn: conn.execute("ROLLBACK") if conn.in_transaction else None)


def _unique_on(conn: sqlite3.Connection, table: str, key: list[str]) -> bool:
    for _, name, unique, *_ in conn.execute(f"PRAGMA index_list({q(table)})").fetchall():
        if unique:
            cols = [r[2] for r in conn.execute(f"PRAGMA index_info({q(name)})").fetchall()]
            if sorted(cols) == sorted(key):
                return True
    return False
