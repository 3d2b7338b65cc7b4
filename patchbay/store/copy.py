"""`patchbay store copy --to postgresql://…`: a SQLite store, every table, into an empty PostgreSQL store.

One read transaction on the SQLite file (a consistent snapshot) and one PostgreSQL transaction for the
whole copy (COPY per table), verified by each table's row count before the commit: the target ends up
with all of it or none. A target that already holds rows is refused; so is a file a hub is serving.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchbay.errors import StoreUnusable
from patchbay.store.retention import opened

CHUNK = 5000
Progress = Callable[[str, int, int], None]  # table, rows copied, rows in the table


def _not_served(path: Path) -> None:
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreUnusable(
            f"copying the store {path}: a `patchbay serve` is using it; stop the hub first, so nothing"
            " it writes during the copy is left behind"
        ) from None
    finally:
        os.close(fd)


def _text(value: Any) -> Any:
    """A TEXT column's value as PostgreSQL takes it (SQLite may hold bytes there: a compressed trace)."""
    if isinstance(value, bytes | memoryview):
        return bytes(opened(bytes(value))).decode("utf-8", "replace")
    return value


def copy_to_postgres(src: Path, url: str, progress: Progress | None = None) -> dict[str, int]:
    """Copy the SQLite store at `src` into the empty PostgreSQL store at `url`; rows per table."""
    import psycopg

    from patchbay.store.postgres.store import _reason, _split_schema, connect_once, open_schema, redacted
    from patchbay.store.sqlite_schema import open_store

    src = Path(src)
    if not src.exists():
        raise StoreUnusable(f"copying the store {src}: there is no store file there")
    _not_served(src)
    lite = open_store(src)  # refuses a damaged, foreign or newer file; takes it to the latest schema
    schema = _split_schema(url)[1]
    counts: dict[str, int] = {}
    try:
        pg = connect_once(url, autocommit=True)  # each `transaction()` a real one
    except psycopg.Error as exc:
        lite.close()
        raise StoreUnusable(f"copying to the store {redacted(url)}: {_reason(exc)}") from None
    try:
        open_schema(pg, schema)
        target = {
            r[0]: {
                c[0]: c[1]
                for c in pg.execute(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = %s",
                    (r[0],),
                ).fetchall()
            }
            for r in pg.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            ).fetchall()
        }
        lite.execute("BEGIN")  # one snapshot of the whole file
        tables = [
            r[0]
            for r in lite.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
                " AND name != 'nodes' ORDER BY name"  # the processes of that file: not the new store's
            )
        ]
        missing = [t for t in tables if t not in target]
        if missing:
            raise StoreUnusable(
                f"copying to the store {redacted(url)}: it has no table {', '.join(missing)}; "
                "upgrade Patchbay where the copy runs"
            )
        with pg.transaction():
            full = [
                t for t in target if t != "meta" and pg.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone()
            ]  # type: ignore[arg-type]
            if full:
                raise StoreUnusable(
                    f"copying to the store {redacted(url)}: it is not empty ({', '.join(sorted(full))} hold rows);"
                    " copy into a new database or schema"
                )
            for table in tables:
                counts[table] = _copy_table(lite, pg, table, target[table], progress)
            for table in tables:  # verified before the commit: all of it or none
                if table == "meta":
                    continue
                got = pg.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()  # type: ignore[arg-type]
                if got is None or got[0] != counts[table]:
                    raise StoreUnusable(
                        f"copying the store: {table} has {got[0] if got else 0} rows in PostgreSQL"
                        f" but {counts[table]} in SQLite; nothing was copied"
                    )
            for table, cols in target.items():  # identity columns continue after the copied ids
                for col in ("id", "seq"):
                    if col in cols and cols[col] == "bigint" and table in counts:
                        pg.execute(
                            f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'),"  # type: ignore[arg-type]
                            f' GREATEST((SELECT MAX("{col}") FROM "{table}"), 1))'
                        )
    except psycopg.Error as exc:
        raise StoreUnusable(
            f"copying to the store {redacted(url)}: {_reason(exc)}; nothing was copied"
        ) from None
    finally:
        pg.close()
        lite.close()
    return counts


def _copy_table(
    lite: sqlite3.Connection, pg: Any, table: str, types: dict[str, str], progress: Progress | None
) -> int:
    cols = [r[1] for r in lite.execute(f'PRAGMA table_info("{table}")')]
    absent = [c for c in cols if c not in types]
    if absent:
        raise StoreUnusable(f"copying the store: PostgreSQL's {table} has no column {', '.join(absent)}")
    total = lite.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
    if table == "meta":  # the target keeps its own schema version; other keys are copied
        rows = lite.execute("SELECT key, value FROM meta WHERE key != 'schema_version'").fetchall()
        for k, v in rows:
            pg.execute("INSERT INTO meta(key, value) VALUES(%s, %s) ON CONFLICT (key) DO NOTHING", (k, v))
        return len(rows)
    binary = {c for c in cols if types[c] == "bytea"}
    text = {c for c in cols if types[c] == "text"}
    done = 0
    quoted = ", ".join(f'"{c}"' for c in cols)
    with pg.cursor().copy(f'COPY "{table}" ({quoted}) FROM STDIN') as cp:
        cur = lite.execute(f'SELECT {quoted} FROM "{table}"')
        while rows := cur.fetchmany(CHUNK):
            for row in rows:
                cp.write_row(
                    [
                        (v.encode() if isinstance(v, str) else v)
                        if c in binary
                        else _text(v)
                        if c in text
                        else v
                        for c, v in zip(cols, row, strict=True)
                    ]
                )
            done += len(rows)
            if progress:
                progress(table, done, total)
    if progress and total == 0:
        progress(table, 0, 0)
    return done
