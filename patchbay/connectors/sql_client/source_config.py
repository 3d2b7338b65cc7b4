"""What a SQL source reads: its settings, and the checks and `:cursor` binding of user SQL."""

from __future__ import annotations

import re
import warnings

from pydantic import Field, field_validator, model_validator

from patchbay.config.durations import Duration
from patchbay.config.models import Spec
from patchbay.connectors.sql_client.config import ColumnName
from patchbay.connectors.sql_client.names import Dialect, check_ident

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


# `schema` is the word users know; pydantic warns that it shadows the deprecated BaseModel.schema().
warnings.filterwarnings(
    "ignore", message='Field name "schema" in "SqlSourceConfig" shadows', category=UserWarning
)


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
        "written by a transaction that commits after later values were read is missed unless `lookback` "
        "reaches back to it.",
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
    lookback: Duration = Field(
        0.0,
        description="Read again this far behind the newest row read, e.g. 30s for an updated_at cursor (a "
        "number cursor goes back by that many units), so a row whose transaction committed after later "
        "rows were read is still read. Rows read again unchanged (same id and cursor value) are dropped "
        "by the source, and after a restart by the store's record ids; the saved position never moves "
        "back. Set it above the longest write transaction of the table's writers. Sync flows need it "
        "on tables the hub creates rows in.",
        examples=["30s"],
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
