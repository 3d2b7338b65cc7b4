"""postgres (bulk): read a table or query with COPY TO inside one snapshot; write with COPY FROM in one transaction.

Reading: one REPEATABLE READ, read-only transaction takes the cursor's high-water mark, then COPYs
the window out as text (session TimeZone UTC), so the mark and the rows agree. Writing: a full
refresh TRUNCATEs and COPYs into the table; append and merge COPY into a temporary stage and apply
it with one INSERT ... ON CONFLICT; deletes, evolved columns and the flow's sync state go in the
same transaction. Nothing is visible until COMMIT, so a crash leaves the last committed run as it was.
"""

from __future__ import annotations

import asyncio
import queue
import select
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import closing
from typing import Any, TypeVar

import orjson

from patchbay.batch.frame import Column, Frame, join_rows, split_lines
from patchbay.batch.pushdown import PushedRead
from patchbay.config.batch import BatchFrom, BatchTo
from patchbay.connectors.base import Resources
from patchbay.connectors.bulk_client import STATE_TABLE, Applied, SyncState, Window
from patchbay.connectors.postgres import PostgresSystem, conninfo, load_driver
from patchbay.registry import connector

_TYPES = {
    "text": "text", "varchar": "text", "bpchar": "text", "name": "text", "citext": "text",
    "int2": "int", "int4": "int", "int8": "int", "oid": "int",
    "float4": "float", "float8": "float", "numeric": "numeric", "bool": "bool",
    "json": "json", "jsonb": "json", "timestamptz": "timestamptz", "timestamp": "timestamp",
    "date": "date", "time": "time", "timetz": "time", "uuid": "uuid", "bytea": "bytes",
}  # fmt: skip
_DDL = {
    "text": "text", "int": "bigint", "float": "double precision", "numeric": "numeric", "bool": "boolean",
    "json": "jsonb", "timestamptz": "timestamptz", "timestamp": "timestamp", "date": "date", "time": "time",
    "uuid": "uuid", "bytes": "bytea",
}  # fmt: skip
_TEMPORAL = {"timestamptz", "timestamp", "date"}


def _ident(name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(*name.split("."))


def _relation(frm: BatchFrom) -> Any:
    from psycopg import sql

    if frm.table is not None:
        return _ident(frm.table)
    return sql.SQL("({}) AS q").format(sql.SQL(frm.query))  # type: ignore[arg-type]


def _where(window: Window, columns: list[Column]) -> Any:
    from psycopg import sql

    if window.column is None or window.start is None:
        return sql.SQL("")
    col = next((c for c in columns if c.name == window.column), None)
    cast = col.db_type if col is not None and col.db_type else "text"
    bound = sql.SQL("{}::{}").format(sql.Literal(window.start), sql.SQL(cast))
    if window.lookback_s:
        temporal = col is not None and col.type in _TEMPORAL
        back = (
            sql.SQL("make_interval(secs => {})").format(sql.Literal(window.lookback_s))
            if temporal
            else sql.Literal(window.lookback_s)
        )
        bound = sql.SQL("({} - {})").format(bound, back)
    return sql.SQL(" WHERE {} >= {}").format(sql.Identifier(window.column), bound)


def _key_expr(key: list[str], prefix: str = "") -> Any:
    from psycopg import sql

    parts = [
        sql.SQL("COALESCE({}::text, '')").format(sql.Identifier(*([prefix] if prefix else []), k))
        for k in key
    ]
    return sql.SQL("concat_ws('|', {})").format(sql.SQL(", ").join(parts))


T = TypeVar("T")
_DONE = object()


@connector("postgres", roles=("bulk",), config=BatchTo, system_config=PostgresSystem, extra="postgres")
class PostgresBulk:
    """Batch syncs from and to PostgreSQL at COPY speed: one connection per side of a run.

    The data path runs on threads with psycopg's blocking API (libpq hands COPY data over row by
    row; an await per row would cost more than the row): a reader thread reads one Frame ahead,
    a writer thread drains another, so reading, the steps and writing overlap.
    """

    def __init__(self, system: PostgresSystem, resources: Resources, timeout_s: float = 30.0) -> None:
        self.system = system
        self.resources = resources
        self.timeout_s = timeout_s
        self._pg = load_driver()
        self._conn: Any = None
        self.snapshot_max: str | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None or self._conn.closed:
            kw = await conninfo(self.system, self.resources, self.timeout_s)
            kw["options"] = "-c TimeZone=UTC -c DateStyle=ISO"
            # No prepared statements: a table changed by ALTER never breaks a cached plan.
            self._conn = await asyncio.to_thread(self._pg.Connection.connect, prepare_threshold=None, **kw)
        return await asyncio.to_thread(fn, self._conn, *args)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)

    # ---------------------------------------------------------------- reading
    async def columns(self, frm: BatchFrom) -> list[Column]:
        return await self._call(_columns, frm)

    async def cursor_max(self, frm: BatchFrom, window: Window) -> str | None:
        from psycopg import sql

        q = sql.SQL("SELECT max({})::text FROM {}").format(
            sql.Identifier(window.column or ""), _relation(frm)
        )
        row = await self._call(_one, q, ())
        return None if row is None else row[0]

    async def count(self, frm: BatchFrom, window: Window) -> int | None:
        from psycopg import sql

        if window.start is None and frm.table is not None:
            row = await self._call(
                _one, "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", (frm.table,)
            )
            if row is not None and row[0] is not None and row[0] >= 0:
                return int(row[0])
        cols = await self.columns(frm) if window.column else []
        row = await self._call(
            _one, sql.SQL("SELECT count(*) FROM {}{}").format(_relation(frm), _where(window, cols)), ()
        )
        return None if row is None else int(row[0])

    def read(
        self, frm: BatchFrom, columns: list[Column], window: Window, batch_rows: int
    ) -> AsyncIterator[Frame]:
        """The window's rows in batches, all from one snapshot; `snapshot_max` is the cursor's mark in it."""
        # The generator itself, not a wrapper around it: closing it must stop the reader before it returns.
        return self._read(frm, columns, window, batch_rows, None)

    @property
    def pushdown_dialect(self) -> str | None:
        """SQL pushdown (batch/pushdown.py) writes PostgreSQL for a UTF8 database (its ASCII guard counts
        bytes against characters); asked after `columns`, so the connection is open."""
        if self._conn is None or self._conn.closed:
            return None
        encoding = self._conn.pgconn.parameter_status(b"server_encoding")
        return "postgres" if encoding in (b"UTF8", b"UTF-8") else None

    def read_pushed(
        self, frm: BatchFrom, columns: list[Column], window: Window, batch_rows: int, pushed: PushedRead
    ) -> AsyncIterator[Frame]:
        """Like `read`, in the same snapshot, in two passes: the rows `pushed.fast` holds for through the
        pushed SELECT (frames of part "pushed", as COPY blocks when `pushed.raw`), then the others with the
        source's columns (part "python") for the flow's steps."""
        return self._read(frm, columns, window, batch_rows, pushed)

    async def _read(
        self,
        frm: BatchFrom,
        columns: list[Column],
        window: Window,
        batch_rows: int,
        pushed: PushedRead | None,
    ) -> AsyncIterator[Frame]:
        self.snapshot_max = None
        frames: queue.Queue[Any] = queue.Queue(maxsize=1)
        stop = threading.Event()

        def produce(conn: Any) -> None:
            try:
                for item in self._read_sync(conn, frm, columns, window, batch_rows, stop, pushed):
                    frames.put(item)
            except BaseException as exc:  # handed to the consumer, raised there
                frames.put(exc)
            finally:
                frames.put(_DONE)

        task = asyncio.ensure_future(self._call(produce))
        try:
            while True:
                item = await asyncio.to_thread(frames.get)
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while not task.done():  # unblock a producer waiting on a full queue
                try:
                    frames.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.01)
            await task

    def _read_sync(
        self,
        conn: Any,
        frm: BatchFrom,
        columns: list[Column],
        window: Window,
        batch_rows: int,
        stop: threading.Event,
        pushed: PushedRead | None = None,
    ) -> Iterator[Frame]:
        from psycopg import sql

        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if window.column is not None:
                q = sql.SQL("SELECT max({})::text FROM {}").format(
                    sql.Identifier(window.column), _relation(frm)
                )
                row = conn.execute(q).fetchone()
                self.snapshot_max = None if row is None else row[0]
            where = _where(window, columns)
            if pushed is None:
                copy_sql = sql.SQL("COPY (SELECT {} FROM {}{}) TO STDOUT").format(cols, _relation(frm), where)
                yield from _copy_frames(conn, copy_sql, columns, batch_rows, stop, "")
                return
            yield from _pushed_frames(
                conn, _pushed_sql(frm, columns, where, pushed), columns, pushed, batch_rows, stop
            )

    async def key_buckets(self, relation: BatchFrom, key: list[str]) -> dict[str, tuple[int, int]]:
        """Per key range (first two hex digits of md5(key)): how many keys and a checksum of them."""
        from psycopg import sql

        h = sql.SQL("md5({})").format(_key_expr(key))
        q = sql.SQL(
            "SELECT substr(h, 1, 2), count(*), sum(('x' || substr(h, 3, 8))::bit(32)::bigint)::bigint"
            " FROM (SELECT {} AS h FROM {}) k GROUP BY 1"
        ).format(h, _relation(relation))
        rows = await self._call(_all, q, ())
        return {b: (int(n), int(s)) for b, n, s in rows}

    async def bucket_keys(self, relation: BatchFrom, key: list[str], bucket: str) -> set[str]:
        from psycopg import sql

        q = sql.SQL("SELECT k FROM (SELECT {} AS k FROM {}) t WHERE substr(md5(k), 1, 2) = {}").format(
            _key_expr(key), _relation(relation), sql.Literal(bucket)
        )
        return {r[0] for r in await self._call(_all, q, ())}

    # ---------------------------------------------------------------- writing
    async def table_columns(self, table: str) -> list[Column] | None:
        row = await self._call(_one, "SELECT to_regclass(%s)", (table,))
        if row is None or row[0] is None:
            return None
        return await self.columns(BatchFrom(system="", table=table))

    async def row_count(self, table: str) -> int:
        from psycopg import sql

        row = await self._call(_one, sql.SQL("SELECT count(*) FROM {}").format(_ident(table)), ())
        return int(row[0]) if row else 0

    async def state(self, flow: str) -> SyncState | None:
        await self._call(_ensure_state_table)
        row = await self._call(
            _one, f"SELECT cursor, columns, runs FROM {STATE_TABLE} WHERE flow = %s", (flow,)
        )
        if row is None:
            return None
        return SyncState(row[0], list(row[1] or []), int(row[2]))

    async def begin(
        self, flow: str, table: str, columns: list[Column], mode: str, key: list[str], evolve: list[Column]
    ) -> _PgLoad:
        await self._call(_ensure_state_table)
        load = _PgLoad(self, flow, table, columns, mode, key)
        await self._call(load.start, evolve)
        return load


def _copy_frames(
    conn: Any, copy_sql: Any, columns: list[Column], batch_rows: int, stop: threading.Event, part: str
) -> Iterator[Frame]:
    buf = bytearray()
    rows: list[list[bytes]] = []
    # closing(): a reader stopped early ends the COPY now, before its transaction rolls back (an
    # exception's traceback would keep the generator alive until after that).
    with closing(_copy_out(conn, copy_sql)) as chunks:
        for chunk in chunks:
            data = bytes(chunk)
            # The server sends one row per message: split it directly; anything else by lines.
            if not buf and data.endswith(b"\n") and data.count(b"\n") == 1:
                rows.append(data[:-1].split(b"\t"))
            else:
                rows.extend(split_lines(buf, data))
            if len(rows) >= batch_rows:
                yield Frame(columns, rows[:batch_rows], part=part)
                del rows[:batch_rows]
                if stop.is_set():
                    raise RuntimeError("reading stopped")
    if rows:
        yield Frame(columns, rows, part=part)


def _pushed_sql(frm: BatchFrom, columns: list[Column], where: Any, pushed: PushedRead) -> Any:
    """One COPY, three layers: the pushed expressions once per row, then whether the row is fast, then
    the fast columns, the flag and (only for rows that are not fast) the source's columns."""
    from psycopg import sql

    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
    # The planner's SQL is built from quoted identifiers and literals only (batch/pushdown.py).
    inner = sql.SQL("").join(
        sql.SQL(", {} AS {}").format(sql.SQL(text), sql.Identifier(name))  # type: ignore[arg-type]
        for name, text in pushed.inner
    )
    select = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.SQL(text), sql.Identifier(name))  # type: ignore[arg-type]
        for name, text in pushed.select
    )
    source = sql.SQL(", ").join(
        sql.SQL("CASE WHEN _pb_ok THEN NULL ELSE {} END").format(sql.Identifier(c.name)) for c in columns
    )
    return sql.SQL(
        "COPY (SELECT {select}, _pb_ok, {source} FROM (SELECT q1.*, {fast} AS _pb_ok FROM"
        " (SELECT s.*{inner} FROM (SELECT {cols} FROM {rel}{where}) s OFFSET 0) q1 OFFSET 0) q2) TO STDOUT"
    ).format(
        select=select,
        source=source,
        fast=sql.SQL(pushed.fast),  # type: ignore[arg-type]
        inner=inner,
        cols=cols,
        rel=_relation(frm),
        where=where,
    )


def _pushed_frames(
    conn: Any,
    copy_sql: Any,
    columns: list[Column],
    pushed: PushedRead,
    batch_rows: int,
    stop: threading.Event,
) -> Iterator[Frame]:
    """A fast row ends in the flag `t` and a NULL per source column: that constant tail is cut off the whole
    block at once (a field never holds a raw tab or newline, so it can only match at a row's end)."""
    tail = b"\tt" + b"\t\\N" * len(columns) + b"\n"
    width = len(pushed.select)
    for block in _copy_blocks(conn, copy_sql, batch_rows, stop):
        n = block.count(b"\n")
        if block.count(tail) == n:
            fast, slow = block.replace(tail, b"\n"), list[list[bytes]]()
        else:
            kept: list[bytes] = []
            slow = []
            for line in block[:-1].split(b"\n"):
                if (line + b"\n").endswith(tail):
                    kept.append(line[: len(line) - len(tail) + 1])
                else:
                    slow.append(line.split(b"\t")[width + 1 :])
            fast = b"".join(k + b"\n" for k in kept)
        if fast:
            if pushed.raw:
                yield Frame(pushed.columns, [], raw=fast, raw_rows=n - len(slow), part="pushed")
            else:
                rows = [line.split(b"\t") for line in fast[:-1].split(b"\n")]
                yield Frame(pushed.columns, rows, part="pushed")
        if slow:
            yield Frame(columns, slow, part="python")


def _copy_out(conn: Any, copy_sql: Any) -> Generator[Any, None, None]:
    """COPY TO's messages (one row each) straight from libpq.

    psycopg's per-row read (a generator and a wait per message) costs more than the row itself; libpq's
    non-blocking PQgetCopyData hands over what it has buffered, and the thread waits for more in select(),
    which lets the other threads run (a blocking libpq call would hold the GIL)."""
    from psycopg import OperationalError, pq
    from psycopg.errors import error_from_result

    pgconn = conn.pgconn
    sock = pgconn.socket

    def wait_idle() -> None:
        while pgconn.is_busy():
            select.select([sock], [], [])
            pgconn.consume_input()

    pgconn.send_query(copy_sql.as_bytes(conn))
    wait_idle()
    res = pgconn.get_result()
    if res is None or res.status != pq.ExecStatus.COPY_OUT:
        while pgconn.get_result() is not None:
            pass
        if res is None:
            raise OperationalError("COPY gave no result")
        raise error_from_result(res, encoding="utf-8")
    get = pgconn.get_copy_data
    ended = False
    try:
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                yield data
            elif nbytes == 0:
                select.select([sock], [], [])
                pgconn.consume_input()
            elif nbytes == -1:
                ended = True
                break
            else:
                ended = True
                raise OperationalError(f"reading COPY data: {pgconn.error_message.decode(errors='replace')}")
    finally:
        if not ended:  # the reader stopped early: cancel the COPY, so the transaction can roll back
            _abandon_copy(conn, pgconn, sock)
    failed = None
    while True:
        wait_idle()
        res = pgconn.get_result()
        if res is None:
            break
        if res.status != pq.ExecStatus.COMMAND_OK and failed is None:
            failed = error_from_result(res, encoding="utf-8")
    if failed is not None:
        raise failed


def _abandon_copy(conn: Any, pgconn: Any, sock: int) -> None:
    try:
        conn.cancel()
        while True:
            nbytes, _ = pgconn.get_copy_data(1)
            if nbytes < 0:
                break
            if nbytes == 0:
                if not select.select([sock], [], [], 10)[0]:
                    return
                pgconn.consume_input()
        while True:
            while pgconn.is_busy():
                if not select.select([sock], [], [], 10)[0]:
                    return
                pgconn.consume_input()
            if pgconn.get_result() is None:
                break
    except Exception:  # the connection is closed after a failed run anyway
        pass


def _copy_blocks(conn: Any, copy_sql: Any, batch_rows: int, stop: threading.Event) -> Iterator[bytes]:
    """COPY out as blocks of whole lines (about batch_rows each), never split into fields."""
    parts: list[Any] = []
    carry = b""
    # closing(): a reader stopped early ends the COPY now, before its transaction rolls back (an
    # exception's traceback would keep the generator alive until after that).
    with closing(_copy_out(conn, copy_sql)) as chunks:
        for chunk in chunks:
            parts.append(chunk)
            if len(parts) >= batch_rows:
                block = carry + b"".join(parts)
                parts.clear()
                end = block.rfind(b"\n") + 1
                block, carry = block[:end], block[end:]
                yield block
                if stop.is_set():
                    raise RuntimeError("reading stopped")
    block = carry + b"".join(parts)
    if block:
        yield block


def _one(conn: Any, q: Any, params: Any) -> Any:
    with conn.transaction():
        return conn.execute(q, params).fetchone()


def _all(conn: Any, q: Any, params: Any) -> list[Any]:
    with conn.transaction():
        return conn.execute(q, params).fetchall()


def _columns(conn: Any, frm: BatchFrom) -> list[Column]:
    from psycopg import sql

    with conn.transaction():
        cur = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(_relation(frm)))
        desc = list(cur.description or ())
        oids = [d.type_code for d in desc]
        rows = conn.execute(
            "SELECT oid, typname, format_type(oid, NULL) FROM pg_type WHERE oid = ANY(%s)", (oids,)
        )
        names = {oid: (typname, shown) for oid, typname, shown in rows.fetchall()}
    out = []
    for d in desc:
        typname, shown = names.get(d.type_code, ("text", "text"))
        out.append(Column(d.name, _TYPES.get(typname, "text"), shown))
    return out


def _ensure_state_table(conn: Any) -> None:
    with conn.transaction():
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (flow text PRIMARY KEY, cursor text, columns jsonb,"
            " runs bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now())"
        )


def _ddl_type(c: Column) -> str:
    return _DDL.get(c.type, "text")


class _PgLoad:
    """One run's writes, in one transaction, until commit() or abort(); COPY runs on a writer thread."""

    def __init__(
        self, owner: PostgresBulk, flow: str, table: str, columns: list[Column], mode: str, key: list[str]
    ) -> None:
        self.owner, self.flow, self.table = owner, flow, table
        self.columns, self.mode, self.key = columns, mode, key
        self.conn: Any = None
        self._tx: Any = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._copy_in, name="pg-bulk-writer", daemon=True)
        self._error: BaseException | None = None
        self.copied = 0
        self._has_unique = False
        self._deletes: list[tuple[Any, ...]] = []

    def start(self, conn: Any, evolve: list[Column]) -> None:
        from psycopg import sql

        self.conn = conn
        self._tx = conn.transaction()
        self._tx.__enter__()
        t = _ident(self.table)
        if conn.execute("SELECT to_regclass(%s)", (self.table,)).fetchone()[0] is None:
            cols = [
                sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(_ddl_type(c))) for c in self.columns
            ]
            if self.key:
                cols.append(
                    sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, self.key)))
                )
            conn.execute(sql.SQL("CREATE TABLE {} ({})").format(t, sql.SQL(", ").join(cols)))
        for c in evolve:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    t, sql.Identifier(c.name), sql.SQL(_ddl_type(c))
                )
            )
        if self.key:
            self._has_unique = self._unique_on_key()
        if self.mode == "full":
            conn.execute(sql.SQL("TRUNCATE {}").format(t))
        else:
            names = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
            conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE _pb_stage ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA"
                ).format(names, t)
            )
        self._thread.start()

    def _copy_in(self) -> None:
        from psycopg import sql

        target = _ident(self.table) if self.mode == "full" else sql.Identifier("_pb_stage")
        names = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
        try:
            with self.conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(target, names)) as copy:
                while True:
                    data = self._queue.get()
                    if data is _DONE:
                        break
                    copy.write(data)
        except BaseException as exc:
            self._error = exc
            while self._queue.get() is not _DONE:  # let the producer finish; the error surfaces at commit
                pass

    def _unique_on_key(self) -> bool:
        q = (
            "SELECT 1 FROM pg_index i WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND"
            " (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a"
            "  WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = %s"
        )
        return self.conn.execute(q, (self.table, sorted(self.key))).fetchone() is not None

    async def write(self, rows: list[list[bytes]]) -> None:
        if self._error is not None:
            raise self._error
        if rows:
            await asyncio.to_thread(self._queue.put, join_rows(rows))
            self.copied += len(rows)

    async def write_raw(self, block: bytes, rows: int) -> None:
        """Whole COPY-text lines as they are (a pushed-down read's fast rows)."""
        if self._error is not None:
            raise self._error
        if block:
            await asyncio.to_thread(self._queue.put, block)
            self.copied += rows

    async def delete_keys(self, keys: list[tuple[Any, ...]]) -> None:
        self._deletes.extend(keys)

    async def _end_copy(self) -> None:
        if self._thread.is_alive():
            await asyncio.to_thread(self._queue.put, _DONE)
            await asyncio.to_thread(self._thread.join)
        if self._error is not None:
            raise self._error

    async def commit(self, state: SyncState) -> Applied:
        await self._end_copy()
        out = await asyncio.to_thread(self._apply, state)
        await asyncio.to_thread(self._tx.__exit__, None, None, None)
        self._tx = None
        return out

    def _apply(self, state: SyncState) -> Applied:
        from psycopg import sql

        conn, t = self.conn, _ident(self.table)
        out = Applied()
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
        keys = sql.SQL(", ").join(map(sql.Identifier, self.key))
        if self._deletes:
            conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE _pb_deletes ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA"
                ).format(keys, t)
            )
            with conn.cursor().copy(sql.SQL("COPY _pb_deletes ({}) FROM STDIN").format(keys)) as copy:
                for k in self._deletes:
                    copy.write_row(k)
            match = sql.SQL(" AND ").join(
                sql.SQL("t.{k} IS NOT DISTINCT FROM d.{k}").format(k=sql.Identifier(k)) for k in self.key
            )
            out.deleted = conn.execute(
                sql.SQL("DELETE FROM {} t USING _pb_deletes d WHERE {}").format(t, match)
            ).rowcount
        if self.mode == "full":
            out.inserted = self.copied
        elif self.mode == "append":
            staged = sql.SQL("SELECT DISTINCT ON ({k}) {c} FROM _pb_stage ORDER BY {k}").format(
                k=keys, c=cols
            )
            if self._has_unique:
                q = sql.SQL("INSERT INTO {} ({}) {} ON CONFLICT ({}) DO NOTHING").format(
                    t, cols, staged, keys
                )
            else:
                match = sql.SQL(" AND ").join(
                    sql.SQL("x.{k} IS NOT DISTINCT FROM s.{k}").format(k=sql.Identifier(k)) for k in self.key
                )
                q = sql.SQL(
                    "INSERT INTO {} ({}) SELECT {} FROM ({}) s WHERE NOT EXISTS (SELECT 1 FROM {} x WHERE {})"
                ).format(t, cols, cols, staged, t, match)
            out.inserted = conn.execute(q).rowcount
            out.unchanged = self.copied - out.inserted
        else:
            self._merge(out, cols, keys)
        conn.execute(
            f"INSERT INTO {STATE_TABLE} (flow, cursor, columns, runs, updated_at) VALUES (%s, %s, %s, 1, now())"
            " ON CONFLICT (flow) DO UPDATE SET cursor = EXCLUDED.cursor, columns = EXCLUDED.columns,"
            f" runs = {STATE_TABLE}.runs + 1, updated_at = now()",
            (self.flow, state.cursor, orjson.dumps(state.columns).decode()),
        )
        return out

    def _merge(self, out: Applied, cols: Any, keys: Any) -> None:
        from psycopg import sql

        conn, t = self.conn, _ident(self.table)
        rest = [c.name for c in self.columns if c.name not in self.key]
        staged = sql.SQL("SELECT DISTINCT ON ({k}) {c} FROM _pb_stage ORDER BY {k}").format(k=keys, c=cols)
        if self._has_unique:
            action: Any = sql.SQL("DO NOTHING")
            if rest:
                sets = sql.SQL(", ").join(
                    sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in rest
                )
                changed = sql.SQL("({}) IS DISTINCT FROM ({})").format(
                    sql.SQL(", ").join(sql.SQL("{}.{}").format(t, sql.Identifier(c)) for c in rest),
                    sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in rest),
                )
                action = sql.SQL("DO UPDATE SET {} WHERE {}").format(sets, changed)
            upsert = sql.SQL(
                "WITH u AS (INSERT INTO {t} ({c}) {s} ON CONFLICT ({k}) {a} RETURNING (xmax = 0) AS ins)"
                " SELECT count(*) FILTER (WHERE ins), count(*) FILTER (WHERE NOT ins) FROM u"
            )
            # Most stages hold each key once (a table's rows by its key): no sort for DISTINCT ON then. A key
            # staged twice makes the upsert fail ("cannot affect row a second time"): again, deduplicated.
            plain = sql.SQL("SELECT {c} FROM _pb_stage").format(c=cols)
            try:
                with conn.transaction():
                    row = conn.execute(upsert.format(t=t, c=cols, s=plain, k=keys, a=action)).fetchone()
            except self.owner._pg.errors.CardinalityViolation:  # psycopg.errors
                row = conn.execute(upsert.format(t=t, c=cols, s=staged, k=keys, a=action)).fetchone()
            out.inserted, out.updated = int(row[0]), int(row[1])
        else:
            # No unique index on the key: replace the staged keys' rows (DELETE + INSERT), as COPY-staged loads do.
            match = sql.SQL(" AND ").join(
                sql.SQL("x.{k} IS NOT DISTINCT FROM s.{k}").format(k=sql.Identifier(k)) for k in self.key
            )
            replaced = conn.execute(
                sql.SQL("DELETE FROM {} x USING _pb_stage s WHERE {}").format(t, match)
            ).rowcount
            inserted = conn.execute(sql.SQL("INSERT INTO {} ({}) {}").format(t, cols, staged)).rowcount
            out.updated, out.inserted = replaced, inserted - replaced
        out.unchanged = max(0, self.copied - out.inserted - out.updated)

    async def abort(self) -> None:
        try:
            if self._thread.is_alive():
                self._error = self._error or RuntimeError("aborted")
                await asyncio.to_thread(self._queue.put, _DONE)
                await asyncio.to_thread(self._thread.join)
        finally:
            if self._tx is not None:
                tx, self._tx = self._tx, None
                try:
                    await asyncio.to_thread(tx.__exit__, RuntimeError, RuntimeError("aborted"), None)
                except Exception:  # the rollback is what matters; the connection is closed after
                    pass
