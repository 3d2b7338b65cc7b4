"""duckdb (bulk): batch syncs into (and out of) a DuckDB file, the analytics destination, each run in one transaction.

Writing: every batch is written to a private temporary file and read by DuckDB's CSV reader in one
INSERT ... SELECT that casts the text to the table's types. A batch with no backslash escapes goes
in as its COPY text bytes unchanged (tab-separated, no quoting, `\\N` is NULL); a batch with escapes
goes in as quoted CSV with the values decoded (an unquoted empty field is NULL, `""` the empty
string). No pyarrow: importing it and building Arrow tables cost ≈ 100 MiB of the hub's memory, and
the file route is as fast (bench/batch.py --duckdb compares the routes). A full
refresh DELETEs and inserts in the run's transaction, append and merge go through a temporary stage
applied at commit (merge: UPDATE ... FROM for changed rows, then INSERT of new keys), with the
deletes and the flow's sync state in the same transaction. Reading: one transaction (a snapshot),
values rendered as text by DuckDB and streamed in batches.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import Field, field_validator

from patchbay.batch.frame import NULL, Column, Frame, escape, unescape
from patchbay.config.batch import BatchFrom, BatchTo
from patchbay.config.models import Spec
from patchbay.connectors.base import Resources, import_driver
from patchbay.connectors.bulk_client import STATE_TABLE, Applied, SyncState, Window
from patchbay.connectors.thread_client import OneThread
from patchbay.registry import connector, install_hint

T = TypeVar("T")
_DDL = {
    "text": "VARCHAR", "int": "BIGINT", "float": "DOUBLE", "numeric": "DECIMAL(38,10)", "bool": "BOOLEAN",
    "json": "JSON", "timestamptz": "TIMESTAMPTZ", "timestamp": "TIMESTAMP", "date": "DATE", "time": "TIME",
    "uuid": "UUID", "bytes": "BLOB",
}  # fmt: skip
_TEMPORAL = {"timestamptz", "timestamp", "date"}


class DuckdbSystem(Spec):
    path: str = Field(
        description="The DuckDB database file; a relative path is relative to the project folder. It is "
        "created when missing (its folder must exist).",
        examples=["warehouse/analytics.duckdb"],
    )

    memory_limit_mb: int = Field(
        32,
        ge=32,
        description="Memory DuckDB may use in the hub's process (MiB); a run larger than this spills to "
        "`<file>.tmp` beside the database, so memory stays bounded whatever the table's size. The default "
        "keeps a hub loading millions of rows under 200 MiB; more makes large merges faster.",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip() or v.strip() == ":memory:":
            raise ValueError("give the path of a database file, e.g. warehouse/analytics.duckdb")
        return v


def _type_of(declared: str) -> str:
    d = declared.upper()
    if d.startswith(("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ")):
        return "timestamptz"
    if d.startswith("TIMESTAMP"):
        return "timestamp"
    if d in ("BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT", "UINTEGER", "USMALLINT"):
        return "int"
    if d in ("DOUBLE", "FLOAT", "REAL"):
        return "float"
    if d.startswith("DECIMAL"):
        return "numeric"
    return {
        "BOOLEAN": "bool", "JSON": "json", "DATE": "date", "TIME": "time", "UUID": "uuid", "BLOB": "bytes",
    }.get(d, "text")  # fmt: skip


def q(name: str) -> str:
    return ".".join(f'"{p}"' for p in name.split("."))


def _load_driver() -> Any:
    return import_driver("duckdb", package="duckdb", extra="duckdb", kind="duckdb")


def _select_expr(c: Column) -> str:
    """How a column is read: as DuckDB's text (the COPY form) but for booleans and blobs."""
    if c.type in ("bool", "bytes"):
        return q(c.name)
    return f"CAST({q(c.name)} AS VARCHAR)"


def _encoder(c: Column) -> Callable[[Any], bytes]:
    if c.type == "bool":
        return lambda v: NULL if v is None else (b"t" if v else b"f")
    if c.type == "bytes":
        return lambda v: NULL if v is None else escape("\\x" + bytes(v).hex())
    return lambda v: NULL if v is None else escape(v)


def _cast(c: Column, src: str) -> str:
    """The SQL that turns an Arrow text column `src` into column `c`'s type."""
    if c.type == "bytes":
        return f"from_hex(substr({src}, 3))"
    return f"CAST({src} AS {_DDL.get(c.type, 'VARCHAR')})"


@connector("duckdb", roles=("bulk",), config=BatchTo, system_config=DuckdbSystem, extra="duckdb")
class DuckdbBulk(OneThread):
    """Batch syncs into and out of a DuckDB file (the analytics destination; tables are created when missing)."""

    # rows per batch at most when DuckDB is the destination (the engine reads it): DuckDB's own memory
    # sits beside the batches in flight, and 2,000 rows keep a load under 200 MiB (bench/batch.py --duckdb)
    max_batch_rows = 2_000

    def __init__(self, system: DuckdbSystem, resources: Resources, timeout_s: float = 30.0) -> None:
        self.system = system
        self.resources = resources
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._lock = threading.Lock()
        # every DuckDB call and batch file runs on this one thread: calls spread over the default pool's
        # threads gave each its own allocator arenas and caches (tens of MiB more at peak)
        self._thread_name = "duckdb"
        self.snapshot_max: str | None = None

    @classmethod
    def check_batch(cls, system: Any, side: str, batch: Any) -> list[str]:
        """`check`'s problems for a batch flow using this system (the driver is installed)."""
        out = []
        missing = [m for m in ("duckdb",) if importlib.util.find_spec(m) is None]
        if missing:
            out.append(
                f"the duckdb connector needs the {' and '.join(missing)} driver: {install_hint('duckdb')}"
            )
        if side == "to" and batch.to.format is not None:
            out.append("`format` is for a files destination; duckdb writes a table")
        if side == "from" and (batch.from_.files is not None or batch.from_.api is not None):
            out.append("a DuckDB system is read with `table` or `query`")
        return out

    def path(self) -> Path:
        p = Path(self.system.path).expanduser()
        root = self.resources.extra.get("root")
        return p if p.is_absolute() or root is None else Path(root) / p

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            duckdb = _load_driver()
            path = self.path()
            if not path.parent.is_dir():
                raise FileNotFoundError(f"the folder of the DuckDB file {path} does not exist")

            def open_() -> Any:
                # one DuckDB thread: the hub's own thread feeds it, the machine's other cores serve the
                # source and the steps, and each DuckDB thread adds its own buffers to the hub's memory
                conn = duckdb.connect(
                    str(path), config={"threads": 1, "memory_limit": f"{int(self.system.memory_limit_mb)}MB"}
                )
                conn.execute("SET TimeZone = 'UTC'")
                return conn

            self._conn = await self._in_thread(open_)
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
    def _rel(self, frm: BatchFrom) -> str:
        return q(frm.table) if frm.table is not None else f"({frm.query}) AS q"

    async def columns(self, frm: BatchFrom) -> list[Column]:
        if frm.table is not None:
            got = await self.table_columns(frm.table)
            if got is None:
                raise FileNotFoundError(f"table {frm.table} does not exist in {self.path()}")
            return got

        def describe(conn: Any) -> list[Column]:
            rows = conn.execute(f"DESCRIBE SELECT * FROM ({frm.query}) AS q").fetchall()
            return [Column(r[0], _type_of(r[1]), r[1]) for r in rows]

        return await self._call(describe)

    def _where(self, window: Window, columns: list[Column]) -> tuple[str, list[Any]]:
        if window.column is None or window.start is None:
            return "", []
        col = next((c for c in columns if c.name == window.column), None)
        kind = col.type if col is not None else "text"
        cast = _DDL.get(kind, "VARCHAR")
        if kind in _TEMPORAL and window.lookback_s:
            return (
                f" WHERE {q(window.column)} >= CAST(? AS {cast}) - to_microseconds(CAST(? AS BIGINT))",
                [window.start, int(window.lookback_s * 1_000_000)],
            )
        if kind in ("int", "float", "numeric"):
            return f" WHERE {q(window.column)} >= CAST(? AS DOUBLE) - ?", [window.start, window.lookback_s]
        return f" WHERE {q(window.column)} >= CAST(? AS {cast})", [window.start]

    async def cursor_max(self, frm: BatchFrom, window: Window) -> str | None:
        sql = f"SELECT CAST(max({q(window.column or '')}) AS VARCHAR) FROM {self._rel(frm)}"
        row = await self._call(lambda c: c.execute(sql).fetchone())
        return None if row is None else row[0]

    async def count(self, frm: BatchFrom, window: Window) -> int | None:
        cols = await self.columns(frm) if window.column else []
        where, args = self._where(window, cols)
        sql = f"SELECT count(*) FROM {self._rel(frm)}{where}"
        row = await self._call(lambda c: c.execute(sql, args).fetchone())
        return None if row is None else int(row[0])

    async def read(
        self, frm: BatchFrom, columns: list[Column], window: Window, batch_rows: int
    ) -> AsyncIterator[Frame]:
        where, args = self._where(window, columns)
        exprs = ", ".join(_select_expr(c) for c in columns)
        encoders = [_encoder(c) for c in columns]
        self.snapshot_max = None

        def begin(conn: Any) -> None:
            conn.execute("BEGIN TRANSACTION")  # one snapshot: the mark and the rows agree
            if window.column is not None:
                row = conn.execute(
                    f"SELECT CAST(max({q(window.column)}) AS VARCHAR) FROM {self._rel(frm)}"
                ).fetchone()
                self.snapshot_max = None if row is None else row[0]
            conn.execute(f"SELECT {exprs} FROM {self._rel(frm)}{where}", args)

        def fetch(conn: Any) -> list[list[bytes]]:
            return [
                [enc(v) for enc, v in zip(encoders, row, strict=True)] for row in conn.fetchmany(batch_rows)
            ]

        await self._call(begin)
        try:
            while rows := await self._call(fetch):
                yield Frame(columns, rows)
        finally:
            await self._call(lambda c: c.execute("ROLLBACK"))

    def _key_expr(self, key: list[str]) -> str:
        return "concat_ws('|', " + ", ".join(f"COALESCE(CAST({q(k)} AS VARCHAR), '')" for k in key) + ")"

    async def key_buckets(self, relation: BatchFrom, key: list[str]) -> dict[str, tuple[int, int]]:
        """Per key range (first two hex digits of md5(key)): how many keys and a checksum, as the other dialects."""
        sql = (
            "SELECT substr(h, 1, 2), count(*), CAST(sum(CAST('0x' || substr(h, 3, 8) AS BIGINT)) AS BIGINT)"
            f" FROM (SELECT md5({self._key_expr(key)}) AS h FROM {self._rel(relation)}) k GROUP BY 1"
        )
        rows = await self._call(lambda c: c.execute(sql).fetchall())
        return {b: (int(n), int(s)) for b, n, s in rows}

    async def bucket_keys(self, relation: BatchFrom, key: list[str], bucket: str) -> set[str]:
        sql = (
            f"SELECT k FROM (SELECT {self._key_expr(key)} AS k FROM {self._rel(relation)}) t"
            " WHERE substr(md5(k), 1, 2) = ?"
        )
        return {r[0] for r in await self._call(lambda c: c.execute(sql, [bucket]).fetchall())}

    # ---------------------------------------------------------------- writing
    async def table_columns(self, table: str) -> list[Column] | None:
        return await self._call(_columns_if_exists, table)

    async def row_count(self, table: str) -> int:
        row = await self._call(lambda c: c.execute(f"SELECT count(*) FROM {q(table)}").fetchone())
        return int(row[0]) if row else 0

    async def state(self, flow: str) -> SyncState | None:
        await self._call(_ensure_state_table)
        sql = f'SELECT "cursor", columns, runs FROM {STATE_TABLE} WHERE flow = ?'
        row = await self._call(lambda c: c.execute(sql, [flow]).fetchone())
        if row is None:
            return None
        return SyncState(row[0], list(orjson.loads(row[1] or "[]")), int(row[2]))

    async def begin(
        self, flow: str, table: str, columns: list[Column], mode: str, key: list[str], evolve: list[Column]
    ) -> _DuckLoad:
        await self._call(_ensure_state_table)
        load = _DuckLoad(self, flow, table, columns, mode, key)
        await self._call(load.start, evolve)
        return load


def _columns_if_exists(conn: Any, table: str) -> list[Column] | None:
    parts = table.split(".")
    schema, name = (parts[0], parts[1]) if len(parts) == 2 else ("main", parts[0])
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND"
        " table_name = ? ORDER BY ordinal_position",
        [schema, name],
    ).fetchall()
    if not rows:
        return None
    return [Column(n, _type_of(t), t) for n, t in rows]


def _ensure_state_table(conn: Any) -> None:
    conn.execute(
        f'CREATE TABLE IF NOT EXISTS {STATE_TABLE} (flow VARCHAR PRIMARY KEY, "cursor" VARCHAR, columns VARCHAR,'
        " runs BIGINT NOT NULL DEFAULT 0, updated_at TIMESTAMPTZ NOT NULL)"
    )


class _DuckLoad:
    """One run's writes in one DuckDB transaction, until commit() or abort()."""

    def __init__(
        self, owner: DuckdbBulk, flow: str, table: str, columns: list[Column], mode: str, key: list[str]
    ) -> None:
        self.owner, self.flow, self.table = owner, flow, table
        self.columns, self.mode, self.key = columns, mode, key
        self.copied = 0
        self._deletes: list[tuple[Any, ...]] = []
        self._open = False
        self._names = [f"c{i}" for i in range(len(columns))]
        # one column: a NULL or empty value would be an empty line, which CSV readers skip; a constant
        # second field keeps every line non-empty
        self._pad = len(columns) == 1
        self._file: str | None = None  # the batch file DuckDB reads (created at the first write)

    def start(self, conn: Any, evolve: list[Column]) -> None:
        conn.execute("BEGIN TRANSACTION")
        self._open = True
        t = q(self.table)
        if _columns_if_exists(conn, self.table) is None:
            cols = [f"{q(c.name)} {_DDL.get(c.type, 'VARCHAR')}" for c in self.columns]
            if self.key:
                cols.append(f"PRIMARY KEY ({', '.join(map(q, self.key))})")
            conn.execute(f"CREATE TABLE {t} ({', '.join(cols)})")
        for c in evolve:
            conn.execute(f"ALTER TABLE {t} ADD COLUMN {q(c.name)} {_DDL.get(c.type, 'VARCHAR')}")
        if self.mode == "full":
            conn.execute(f"DELETE FROM {t}")
        else:
            names = ", ".join(q(c.name) for c in self.columns)
            conn.execute("DROP TABLE IF EXISTS temp._pb_stage")
            conn.execute(f"CREATE TEMP TABLE _pb_stage AS SELECT {names} FROM {t} LIMIT 0")

    async def write(self, rows: list[list[bytes]]) -> None:
        if rows:
            if self._file is None:
                self._file = _batch_file()
            if self._pad:
                rows = [[*r, b"-"] for r in rows]
            quoted = await self.owner._in_thread(self._to_file, rows, self._file)
            await self.owner._call(self._insert, quoted)
            self.copied += len(rows)

    async def write_raw(self, block: bytes, rows: int) -> None:
        """A block of COPY-text lines (steps pushed down into the source's SELECT): written to the batch
        file as it is when it has no escapes, else split into rows and quoted."""
        if not rows:
            return
        if self._pad or b"\\" in block.replace(NULL, b""):
            await self.write([line.split(b"\t") for line in block[:-1].split(b"\n")])
            return
        if self._file is None:
            self._file = _batch_file()
        await self.owner._in_thread(Path(self._file).write_bytes, block)
        await self.owner._call(self._insert, False)
        self.copied += rows

    @staticmethod
    def _to_file(rows: list[list[bytes]], path: str) -> bool:
        """Write the batch where DuckDB reads it, off the event loop; True when written as quoted CSV.

        COPY text whose only backslashes are NULL markers (`\\N` fields: COPY writes a literal
        backslash as `\\\\`, and every other escape starts with one) is what DuckDB's reader takes
        with `quote=''` and `nullstr='\\N'`, byte for byte; anything else is decoded and quoted."""
        blob = b"\n".join([b"\t".join(r) for r in rows])
        if b"\\" not in blob.replace(NULL, b""):
            quoted = False
        else:
            quoted = True
            lines = []
            for r in rows:
                line = b"\t".join(r)
                if b"\\" not in line:  # no NULL, no escape: quote every field at once
                    lines.append(b'"' + line.replace(b'"', b'""').replace(b"\t", b'"\t"') + b'"')
                else:
                    lines.append(
                        b"\t".join(
                            b""
                            if f == NULL
                            else b'"' + (unescape(f) or "").encode().replace(b'"', b'""') + b'"'
                            if b"\\" in f
                            else b'"' + f.replace(b'"', b'""') + b'"'
                            for f in r
                        )
                    )
            blob = b"\n".join(lines)
        with open(path, "wb") as fh:
            fh.write(blob)
            fh.write(b"\n")
        return quoted

    def _insert(self, conn: Any, quoted: bool) -> None:
        target = q(self.table) if self.mode == "full" else "temp._pb_stage"
        names = ", ".join(q(c.name) for c in self.columns)
        casts = ", ".join(_cast(c, n) for c, n in zip(self.columns, self._names, strict=True))
        cols = "{" + ", ".join(f"'{n}': 'VARCHAR'" for n in self._names + ["pad"] * self._pad) + "}"
        fmt = (
            "quote = '\"', escape = '\"', nullstr = '', allow_quoted_nulls = false"
            if quoted
            else "quote = '', escape = '', nullstr = '\\N'"
        )
        # a line is never longer than its file: values past the reader's 2 MB default line still load
        longest = max(2_097_152, os.path.getsize(self._file or "") + 1)
        conn.execute(
            f"INSERT INTO {target} ({names}) SELECT {casts} FROM read_csv(?, delim = '\\t', {fmt},"
            f" header = false, auto_detect = false, new_line = '\\n', max_line_size = {longest},"
            f" columns = {cols})",
            [self._file],
        )

    def _drop_file(self) -> None:
        if self._file is not None:
            path, self._file = self._file, None
            Path(path).unlink(missing_ok=True)

    async def delete_keys(self, keys: list[tuple[Any, ...]]) -> None:
        self._deletes.extend(keys)

    async def commit(self, state: SyncState) -> Applied:
        self._drop_file()
        out = await self.owner._call(self._apply, state)
        self._open = False
        return out

    def _apply(self, conn: Any, state: SyncState) -> Applied:
        out = Applied()
        t = q(self.table)
        names = ", ".join(q(c.name) for c in self.columns)
        match = " AND ".join(f"x.{q(k)} IS NOT DISTINCT FROM s.{q(k)}" for k in self.key)
        if self._deletes:
            key_cols = ", ".join(map(q, self.key))
            conn.execute("DROP TABLE IF EXISTS temp._pb_deletes")
            conn.execute(f"CREATE TEMP TABLE _pb_deletes AS SELECT {key_cols} FROM {t} LIMIT 0")
            marks = ", ".join("?" * len(self.key))
            conn.executemany(
                f"INSERT INTO temp._pb_deletes VALUES ({marks})", [list(k) for k in self._deletes]
            )
            out.deleted = _count(
                conn.execute(
                    f"DELETE FROM {t} x WHERE EXISTS (SELECT 1 FROM temp._pb_deletes s WHERE {match})"
                )
            )
        if self.mode == "full":
            out.inserted = self.copied
        elif self.mode == "append":
            out.inserted = _count(
                conn.execute(
                    f"INSERT INTO {t} ({names}) SELECT {names} FROM temp._pb_stage s"
                    f" WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE {match})"
                )
            )
            out.unchanged = self.copied - out.inserted
        else:
            rest = [c.name for c in self.columns if c.name not in self.key]
            existing = conn.execute(
                f"SELECT count(*) FROM temp._pb_stage s JOIN {t} x ON {match}"
            ).fetchone()[0]
            if rest:
                sets = ", ".join(f"{q(c)} = s.{q(c)}" for c in rest)
                differs = " OR ".join(f"x.{q(c)} IS DISTINCT FROM s.{q(c)}" for c in rest)
                out.updated = _count(
                    conn.execute(
                        f"UPDATE {t} AS x SET {sets} FROM temp._pb_stage s WHERE {match} AND ({differs})"
                    )
                )
            out.inserted = _count(
                conn.execute(
                    f"INSERT INTO {t} ({names}) SELECT {names} FROM temp._pb_stage s"
                    f" WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE {match})"
                )
            )
            out.unchanged = int(existing) - out.updated
        conn.execute(
            f'INSERT INTO {STATE_TABLE} (flow, "cursor", columns, runs, updated_at) VALUES (?, ?, ?, 1, now())'
            ' ON CONFLICT (flow) DO UPDATE SET "cursor" = excluded."cursor", columns = excluded.columns,'
            f" runs = {STATE_TABLE}.runs + 1, updated_at = now()",
            [self.flow, state.cursor, orjson.dumps(state.columns).decode()],
        )
        conn.execute("COMMIT")
        conn.execute("DROP TABLE IF EXISTS temp._pb_stage")
        conn.execute("DROP TABLE IF EXISTS temp._pb_deletes")
        return out

    async def abort(self) -> None:
        self._drop_file()
        if self._open:
            self._open = False
            await self.owner._call(_rollback)


def _batch_file() -> str:
    """A new private batch file (mode 0600) in the temp folder, named with this process's id; batch files
    of processes that are gone (killed mid-run) are removed first."""
    tmp = Path(tempfile.gettempdir())
    for stale in tmp.glob("patchbay-duckdb-*-*.tsv"):
        pid = stale.name.split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except OSError:  # alive under another user, or not ours to remove
            pass
    fd, path = tempfile.mkstemp(prefix=f"patchbay-duckdb-{os.getpid()}-", suffix=".tsv")
    os.close(fd)
    return path


def _rollback(conn: Any) -> None:
    try:
        conn.execute("ROLLBACK")
    except Exception:  # no transaction left (the error ended it): nothing to undo
        pass


def _count(cur: Any) -> int:
    row = cur.fetchone()
    return int(row[0]) if row else 0
