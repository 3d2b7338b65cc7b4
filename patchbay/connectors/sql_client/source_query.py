"""A SQL source's page statements, its saved cursor, and database values as JSON."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from patchbay.connectors.base import Batch, SourceRecord
from patchbay.connectors.sql_client.names import Dialect, quote_ident
from patchbay.connectors.sql_client.source_config import SqlSourceConfig, bind_cursor
from patchbay.errors import (
    TerminalError,
)


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
        last = SourcePosition(rows[-1][ckey], rows[-1][ikey], after=True)
        return Batch(records, self.cursor_of(last)), last

    def cursor_of(self, pos: SourcePosition) -> dict[str, Any]:
        """The saved cursor of a position (the JSON object described above)."""
        value, value_type = _typed(pos.value)
        ident, id_type = _typed(pos.id)
        cursor: dict[str, Any] = {"column": self.config.cursor_column, "value": value}
        if value_type:
            cursor["value_type"] = value_type
        cursor["id"] = ident
        if id_type:
            cursor["id_type"] = id_type
        return cursor

    def back(self, value: Any) -> Any:
        """`value` moved back by the lookback: a time by seconds, a number by units, an ISO 8601 text
        (SQLite keeps times as text) as the same kind of text. TerminalError for anything else."""
        s = self.config.lookback
        if isinstance(value, dt.datetime):
            return value - dt.timedelta(seconds=s)
        if isinstance(value, dt.date):
            return value - dt.timedelta(days=-(-s // 86400))
        if isinstance(value, Decimal):
            return value - Decimal(str(s))
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value - (int(s) if isinstance(value, int) and s == int(s) else s)
        if isinstance(value, str):
            try:
                when = dt.datetime.fromisoformat(value)
            except ValueError:
                pass
            else:
                moved = when - dt.timedelta(seconds=s)
                return moved.isoformat(sep=" " if " " in value else "T")
        raise TerminalError(
            f"polling {self.target}: `lookback` needs a time or number cursor_column; "
            f"{self.config.cursor_column!r} holds {value!r}. Remove `lookback` or use another column"
        )

    def _key(self, row: Mapping[str, Any], column: str) -> str:
        if column in row:
            return column
        for k in row:  # MySQL and SQLite match column names regardless of case
            if str(k).lower() == column.lower():
                return str(k)
        raise TerminalError(
            f"polling {self.target}: the rows have no column {column!r}; the query must return it"
        )
