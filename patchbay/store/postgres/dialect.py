"""A DB-API face over a psycopg connection, so the store's query functions run on PostgreSQL unchanged.

The query modules (queries.py, api_queries.py, tokens.py, retention.py, sqlite_ops.py, …) take a
connection and speak a small SQL that both engines share; what differs is rewritten here, once per
statement text (cached): `?` placeholders, `INSERT OR IGNORE/REPLACE`, `SUM(<condition>)` (a boolean
in PostgreSQL), `CAST(x AS INTEGER)` (which rounds in PostgreSQL; SQLite truncates), `instr`.
Transaction statements are dropped: every operation runs in the one transaction its caller opened.
Rows answer by position and by column name, as `sqlite3.Row` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any

import psycopg

from patchbay.store.base import no_nul


class Row(tuple[Any, ...]):
    """A row that answers `r[0]`, `r["name"]`, `dict(r)` and `r.keys()` like `sqlite3.Row`."""

    _names: tuple[str, ...]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> tuple[str, ...]:
        return self._names


def _value(v: Any) -> Any:
    if isinstance(v, Decimal):  # SUM over integers, AVG
        return int(v) if v == v.to_integral_value() else float(v)
    return v


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    names = tuple(c.name for c in cursor.description or ())

    def make(values: Sequence[Any]) -> Row:
        r = Row(_value(v) for v in values)
        r._names = names
        return r

    return make


def _param(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, str) and "\x00" in v:  # PostgreSQL's text refuses NUL (a %00 in a URL's id, say)
        return no_nul(v)
    return v


_SKIP = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|END|PRAGMA)\b", re.I)
_CAST_INT = re.compile(r"CAST\(([\w.]+) AS INTEGER\)", re.I)
_COMPARISON = re.compile(r"(!=|<>|<=|>=|=|<|>|\bIN\b|\bIS\b|\bLIKE\b)", re.I)


def _close_paren(sql: str, start: int) -> int:
    depth = 0
    for i in range(start, len(sql)):
        if sql[i] == "(":
            depth += 1
        elif sql[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _sum_of_conditions(sql: str) -> str:
    """`SUM(a='x' AND b>0)` counts rows in SQLite; in PostgreSQL the condition is a boolean."""
    out, i = [], 0
    for m in re.finditer(r"\b(SUM|TOTAL)\(", sql, re.I):
        if m.start() < i:
            continue
        end = _close_paren(sql, m.end() - 1)
        if end < 0:
            break
        arg = sql[m.end() : end]
        if _COMPARISON.search(arg) and not arg.lstrip().upper().startswith("CASE"):
            out.append(sql[i : m.start()] + f"SUM(CASE WHEN {_sum_of_conditions(arg)} THEN 1 ELSE 0 END)")
            i = end + 1
    out.append(sql[i:])
    return "".join(out)


def _scalar_min_max(sql: str) -> str:
    """SQLite's two-argument MIN(a, b) and MAX(a, b) are LEAST and GREATEST in PostgreSQL."""
    out, i = [], 0
    for m in re.finditer(r"\b(MIN|MAX)\(", sql, re.I):
        if m.start() < i:
            continue
        end = _close_paren(sql, m.end() - 1)
        if end < 0:
            break
        arg, depth, top_comma = sql[m.end() : end], 0, False
        for ch in arg:
            depth += ch == "("
            depth -= ch == ")"
            top_comma = top_comma or (ch == "," and depth == 0)
        if top_comma:
            name = "LEAST" if m.group(1).upper() == "MIN" else "GREATEST"
            out.append(sql[i : m.start()] + f"{name}({_scalar_min_max(arg)})")
            i = end + 1
    out.append(sql[i:])
    return "".join(out)


# Statements whose parameters PostgreSQL needs typed: a window's min and max (JSONB, see schema.py).
def _window_values(args: Sequence[Any]) -> list[Any]:
    from psycopg.types.json import Jsonb

    a = list(args)
    a[-2:] = [None if v is None else Jsonb(v) for v in a[-2:]]
    return a


TYPED: dict[str, Any] = {"INSERT INTO window_values(": _window_values}


def _typed(sql: str, args: Sequence[Any]) -> Sequence[Any]:
    for prefix, fn in TYPED.items():
        if sql.lstrip().startswith(prefix):
            return fn(args)  # type: ignore[no-any-return]
    return args


@lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """The PostgreSQL text of one SQLite-dialect statement (see the module's docstring)."""
    s = sql.replace("%", "%%").replace("?", "%s")
    conflict = ""
    m = re.match(r"\s*INSERT OR IGNORE INTO", s, re.I)
    if m:
        s = "INSERT INTO" + s[m.end() :]
        conflict = " ON CONFLICT DO NOTHING"
    m = re.match(r"\s*INSERT OR REPLACE INTO (\w+)\s*\(([^)]*)\)", s, re.I)
    if m:
        table, cols = m.group(1), [c.strip() for c in m.group(2).split(",")]
        key = PRIMARY_KEYS.get(table, cols[:1])
        sets = ", ".join(f"{c}=excluded.{c}" for c in cols if c not in key)
        s = "INSERT INTO" + s[len("INSERT OR REPLACE INTO") + (len(s) - len(s.lstrip())) :]
        conflict = f" ON CONFLICT ({', '.join(key)}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING")
    if conflict:
        r = re.search(r"\sRETURNING\s", s, re.I)
        s = s[: r.start()] + conflict + s[r.start() :] if r else s.rstrip().rstrip(";") + conflict
    s = _CAST_INT.sub(r"CAST(FLOOR(\1) AS BIGINT)", s)
    s = re.sub(r"\binstr\(", "strpos(", s, flags=re.I)
    s = re.sub(r"\s+INDEXED BY \w+", "", s, flags=re.I)  # SQLite's index hint; PostgreSQL plans itself
    return _scalar_min_max(_sum_of_conditions(s))


# Conflict targets for INSERT OR REPLACE (the tables' primary keys, where not the first column).
PRIMARY_KEYS: dict[str, list[str]] = {
    "destinations": ["flow", "destination"],
    "alerts": ["rule", "subject"],
    "identity_links": ["entity", "system", "record_id"],
}


class _Empty:
    rowcount = 0

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())


class Cursor:
    """What `conn.execute` returns: fetchone, fetchall, iteration, rowcount."""

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def fetchone(self) -> Any:
        return self._cur.fetchone() if self._cur.description else None

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall() if self._cur.description else []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PgConnection:
    """One psycopg connection inside its caller's transaction; counts statements and round trips."""

    def __init__(self, conn: psycopg.Connection[Any], counter: dict[str, int] | None = None) -> None:
        self.conn = conn
        self.counter = counter if counter is not None else {"statements": 0, "round_trips": 0}

    in_transaction = True

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        if _SKIP.match(sql):
            return _Empty()
        cur = self.conn.cursor(row_factory=_row_factory)
        cur.execute(translate(sql), [_param(a) for a in _typed(sql, args)])  # type: ignore[arg-type]
        self.counter["statements"] += 1
        self.counter["round_trips"] += 1
        return Cursor(cur)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        rows = list(rows)
        cur = self.conn.cursor(row_factory=_row_factory)
        cur.executemany(translate(sql), [[_param(a) for a in _typed(sql, r)] for r in rows])  # type: ignore[arg-type]
        self.counter["statements"] += len(rows)
        self.counter["round_trips"] += 1 if rows else 0  # pipelined: one round trip for all
        return Cursor(cur)

    def executescript(self, sql: str) -> None:
        self.conn.execute(sql.replace("%", "%%"))  # type: ignore[arg-type]


class RawConnection:
    """The psycopg connection for the store's own PostgreSQL statements (no translation), counted."""

    def __init__(self, conn: psycopg.Connection[Any], counter: dict[str, int]) -> None:
        self.conn = conn
        self.counter = counter

    def execute(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        self.counter["statements"] += 1
        self.counter["round_trips"] += 1
        return self.conn.execute(sql, params)  # type: ignore[arg-type]
