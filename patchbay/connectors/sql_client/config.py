"""The SQL sink's settings and the server systems' connection settings (PostgreSQL, MySQL)."""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from patchbay.config.models import SecretRef, Spec
from patchbay.connectors.sql_client.names import check_ident, is_loopback
from patchbay.expressions import compile_expr

WriteMode = Literal["insert", "upsert", "update", "delete"]
SslMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]


def _expr_or_constant(v: Any) -> Any:
    if isinstance(v, str):
        compile_expr(v)  # ExprError is a ValueError: reported at this column's line
    return v


ColumnName = Annotated[str, AfterValidator(check_ident)]
ColumnValue = Annotated[str | int | float | bool | None, AfterValidator(_expr_or_constant)]


# `schema` is the word users know; pydantic warns that it shadows the deprecated BaseModel.schema().
warnings.filterwarnings(
    "ignore", message='Field name "schema" in "SqlSinkConfig" shadows', category=UserWarning
)


class SqlSinkConfig(Spec):
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
    expect: dict[ColumnName, str] | None = Field(
        None,
        description="update: compare-and-set. Column -> JMESPath expression giving the value the writer "
        "last saw in that column; the column is changed only if it still holds that value (null "
        "included), otherwise it keeps what someone wrote there meanwhile, and the row read back "
        "shows it (a sync flow records that as a conflict). Each column is decided on its own in one "
        "statement. Sync flows give `expected.<column>` for every column the update sets.",
        examples=[{"phone": "expected.phone", "plan": "expected.plan"}],
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
    def _coherent(self) -> SqlSinkConfig:
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
        if self.expect is not None:
            if op != "update":
                raise ValueError("`expect` applies to write_mode: update only")
            for c, e in self.expect.items():
                compile_expr(e)
                if c in key:
                    raise ValueError(
                        f"`expect` compares the columns an update sets; key column {c!r} is not one"
                    )
                if self.columns is not None and c not in self.columns:
                    raise ValueError(f"`expect` names {c!r}, which is not in `columns`")
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
