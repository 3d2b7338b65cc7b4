"""The sink's two halves of SQL: a record rendered into a stored request, a request built into one statement."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from patchbay.connectors.sql_client.config import SqlSinkConfig
from patchbay.connectors.sql_client.names import IDENT_RE, IDENT_RULE, Dialect, check_ident, quote_ident
from patchbay.errors import (
    RecordInvalid,
    Violation,
)
from patchbay.expressions import Expr, compile_expr


class RowRenderer:
    """Turns a record into the stored request; raises RecordInvalid for anything the table can't take."""

    def __init__(self, config: SqlSinkConfig) -> None:
        self.config = config
        self._columns: dict[str, Expr | Any] | None = (
            {c: compile_expr(v) if isinstance(v, str) else v for c, v in config.columns.items()}
            if config.columns is not None
            else None
        )
        self._expect = {c: compile_expr(e) for c, e in (config.expect or {}).items()}

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
                            f"not a usable column name ({IDENT_RULE}); list the columns under `columns:`",
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
        if self._expect:
            request["expect"] = {c: e.search(record) for c, e in self._expect.items() if c in row}
        if cfg.schema:
            request["schema"] = cfg.schema
        return request


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
        expect: Mapping[str, Any] = request.get("expect") or {}
        if not isinstance(expect, Mapping) or any(c not in others for c in expect):
            raise ValueError("`expect` names a column the update does not set")
        same = {"postgres": "IS NOT DISTINCT FROM", "mysql": "<=>", "sqlite": "IS"}[dialect]
        sets, params = [], []
        for c in others:
            if c in expect:  # compare-and-set, column by column: a value changed meanwhile is kept
                sets.append(f"{q(c)} = CASE WHEN {q(c)} {same} {ph} THEN {ph} ELSE {q(c)} END")
                params += [adapt(expect[c]), adapt(row[c])]
            else:
                sets.append(f"{q(c)} = {ph}")
                params.append(adapt(row[c]))
        sql = f"UPDATE {target} SET {', '.join(sets)} WHERE {where}"
        params += [adapt(row[k]) for k in key]
    else:
        sql = f"DELETE FROM {target} WHERE {where}"
        params = [adapt(row[k]) for k in key]
    return Statement(op, shown, sql, params, key_values)
