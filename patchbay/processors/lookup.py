"""lookup: enrich a record from another system, a SQL SELECT with bound parameters or an HTTP GET;
the answer is bound to a name, like `call` (durable, retried, cached with a TTL when asked)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from patchbay.connectors.http_client import appended_path
from patchbay.expressions import ExprError, compile_expr, render_template
from patchbay.expressions.compiler import ExprError as _ExprError
from patchbay.processors.base import CheckIssue, StepConfig
from patchbay.processors.call import NAME_RE, CallCache, CallingStep, check_delivery
from patchbay.registry import step

# What a lookup's SQL may hold: literals and comments are skipped; `:name` is a bound parameter.
_SQL_TOKENS = re.compile(
    r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"]|\"\")*\"|`(?:[^`]|``)*`|--[^\n]*|/\*.*?\*/|::|(?<![\w:]):([A-Za-z_]\w*)|;",
    re.S,
)
_LEADING = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/)*", re.S)


def sql_params(query: str) -> list[str]:
    """The `:name` parameters of a query, in order; ValueError for a second statement."""
    names: list[str] = []
    for m in _SQL_TOKENS.finditer(query):
        if m.group() == ";":
            raise ValueError("write one SELECT statement, without `;`")
        if m.group(1):
            names.append(m.group(1))
    return names


def bind_sql(query: str, dialect: str) -> str:
    """`query` with its `:name` parameters in the driver's style: `%(name)s` (every other `%` doubled, as
    psycopg and aiomysql read the whole text), or `:name` as written for SQLite."""
    if dialect == "sqlite":
        return query
    out: list[str] = []
    pos = 0
    for m in _SQL_TOKENS.finditer(query):
        out.append(query[pos : m.start()].replace("%", "%%"))
        out.append(f"%({m.group(1)})s" if m.group(1) else m.group().replace("%", "%%"))
        pos = m.end()
    out.append(query[pos:].replace("%", "%%"))
    return "".join(out)


class LookupConfig(StepConfig):
    """`lookup: {system: billing_db, query: "SELECT ... WHERE email = :email", params: {email: email}, as: account}`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    system: str = Field(
        description="The system to look in: a SQL system (postgres, mysql, sqlite) or an http system."
    )
    query: str | None = Field(
        None,
        description="SQL systems: one SELECT; values come in only as `:name` parameters bound from `params` "
        "(never pasted into the text).",
        examples=["SELECT owner, tier FROM accounts WHERE email = :email"],
    )
    params: dict[str, str] = Field(
        default_factory=dict,
        description="SQL systems: parameter name -> expression over the record, e.g. `{email: lower(email)}`.",
    )
    path: str | None = Field(
        None,
        description="HTTP systems: appended to the system's URL (starts with /; a GET); may hold {{ expressions }}.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="HTTP systems: extra headers.")
    as_: str = Field(
        alias="as",
        description="Name the answer is bound to: `{status, body}` where body is the first row (SQL; "
        "`rows` gives all) or the JSON answer (HTTP), plus `select` fields.",
        examples=["account"],
    )
    rows: Literal["first", "all"] = Field(
        "first", description="SQL: bind the first row (or null), or all rows as a list (at most max_rows)."
    )
    max_rows: int = Field(100, ge=1, le=10_000, description="SQL: at most this many rows are read.")
    select: dict[str, str] = Field(
        default_factory=dict,
        description="Fields picked from the answer: name -> expression over `{status, body}`.",
    )
    on_404: Literal["fail", "continue"] = Field(
        "continue", description="HTTP: a 404 is an empty answer (continue) or a permanent failure (fail)."
    )
    on_empty: Literal["continue", "drop", "quarantine"] = Field(
        "continue",
        description="No row (SQL), a 404 or an empty body (HTTP): continue with null bound, drop the "
        "record, or quarantine it.",
    )
    cache: CallCache | None = Field(None, description="Reuse answers per key for `ttl`, across events.")
    delivery: dict[str, Any] | None = Field(
        None, description="Delivery policy overrides for this lookup (timeout_s, retry, ...), like a call's."
    )

    _delivery = field_validator("delivery")(classmethod(lambda cls, v: check_delivery(v)))

    @field_validator("as_")
    @classmethod
    def _as(cls, v: str) -> str:
        if not re.match(NAME_RE, v):
            raise ValueError(f"bad name {v!r}: use letters, digits and '_', starting with a letter")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else appended_path(v)

    @field_validator("query")
    @classmethod
    def _query(cls, v: str | None) -> str | None:
        if v is None:
            return None
        q = v.strip()
        body = q[_LEADING.match(q).end() :]  # type: ignore[union-attr]
        if not re.match(r"(?:select|with)\b", body, re.I):
            raise ValueError("a lookup's query is one SELECT (or WITH ... SELECT)")
        if "{{" in q:
            raise ValueError("values go in as :name parameters (with `params`), never as {{ }} in the text")
        sql_params(q)
        return q

    @model_validator(mode="after")
    def _one_kind(self) -> LookupConfig:
        if (self.query is None) == (self.path is None):
            raise ValueError("give `query` (a SQL system) or `path` (an http system)")
        if self.query is not None:
            used = set(sql_params(self.query))
            missing = sorted(used - set(self.params))
            unused = sorted(set(self.params) - used)
            if missing:
                raise ValueError(f"the query uses :{', :'.join(missing)}; bind it in `params`")
            if unused:
                raise ValueError(f"`params` gives {', '.join(unused)}, which the query does not use")
        return self

    # what engine/calls.py builds an HTTP lookup from (a call's settings)
    @property
    def method(self) -> str:
        return "GET"

    @property
    def body(self) -> None:
        return None


@step("lookup", config=LookupConfig)
class LookupStep(CallingStep):
    """Enrich a record from a SQL or HTTP system; the answer is bound to a name (durable, cached)."""

    def __init__(self, config: LookupConfig) -> None:
        super().__init__(config)
        self._params = {k: compile_expr(v) for k, v in config.params.items()}

    def params(self, record: Any) -> dict[str, Any]:
        """The query's parameters, from the record (values only: the text is never changed)."""
        return {k: e.search(record) for k, e in self._params.items()}

    @classmethod
    def check(cls, config: LookupConfig) -> Iterator[CheckIssue]:
        yield from cls.check_common(config)
        for k, v in config.params.items():
            try:
                compile_expr(v)
            except ExprError as exc:
                yield CheckIssue(("params", k), exc.message)
        if config.path is not None:
            try:
                render_template(config.path)
            except _ExprError as exc:
                yield CheckIssue(("path",), exc.message)
