"""call: ask a system mid-flow (an HTTP request) and bind its answer to a name later steps can read.

A call does not run inside the pure pipeline: the pipeline stops at it and its rendered request
becomes a durable "call delivery" (engine/calls.py sends it through the same workers, retries and
policy as a destination). When the answer is recorded, the rest of the flow runs from the next step
with the answer bound (`as: contact` -> `contact.status`, `contact.body`, selected fields), in the
same transaction. This module holds the step's settings and the pure halves: the answer's binding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from patchbay.config.durations import Duration
from patchbay.connectors.http_client import appended_path
from patchbay.errors import RecordInvalid, Violation
from patchbay.expressions import Expr, ExprError, compile_expr, render_template
from patchbay.expressions.compiler import ExprError as _ExprError
from patchbay.processors.base import CheckIssue, Dropped, StepConfig
from patchbay.registry import step

NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
MAX_CACHE_TTL_S = 30 * 86400.0


class CallCache(StepConfig):
    """Keep answers per key, shared across events, for a while."""

    key: str = Field(
        description="Expression over the record giving the cache key (e.g. `lower(email)`); "
        "a null key is never cached.",
        examples=["lower(email)"],
    )
    ttl: Duration = Field(description="How long an answer is reused, e.g. 10m.", examples=["10m"])

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: float) -> float:
        if not 1.0 <= v <= MAX_CACHE_TTL_S:
            raise ValueError("a cache ttl is between 1s and 30d")
        return v


class CallConfig(StepConfig):
    """`call: {system: crm, method: GET, path: /contacts/{{ email }}, as: contact}`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    system: str = Field(description="The system to call (an http system of the project).")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field("GET", description="HTTP method.")
    path: str = Field(
        "",
        description="Appended to the system's URL (starts with /); may hold {{ expressions }} (URL-quoted).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers; values may hold {{ expr }}."
    )
    body: str | dict[str, Any] | None = Field(
        None,
        description="JSON body for POST/PUT/PATCH: a string = one expression; a mapping = target path -> "
        "expression, like map; omitted = the record.",
    )
    as_: str = Field(
        alias="as",
        description="Name the answer is bound to in the record: `{status, body, ...select}`, read later as "
        "`contact.body.id`.",
        examples=["contact"],
    )
    select: dict[str, str] = Field(
        default_factory=dict,
        description="Fields picked from the answer: name -> expression over `{status, body}` (e.g. "
        "`{id: body.results[0].id}`). With select, an answer is empty when every selected field is null.",
        examples=[{"id": "body.results[0].id"}],
    )
    headers_kept: list[str] = Field(
        default_factory=list,
        description="Answer headers kept with the answer, bound as `<as>.headers.<name>` (lower case), e.g. "
        "`[location, etag]`; secrets in them are redacted.",
        examples=[["location"]],
    )
    on_404: Literal["fail", "continue"] = Field(
        "fail",
        description="fail: a 404 is a permanent failure (dead letter); continue: bind `{status: 404, body: "
        "null}` and go on (find-or-create reads not found as an answer).",
    )
    on_empty: Literal["continue", "drop", "quarantine"] = Field(
        "continue",
        description="An empty answer (a 404 when continued, a null/empty body, or null selected fields): "
        "continue with it bound, drop the record (filtered), or quarantine it with the reason.",
    )
    cache: CallCache | None = Field(
        None, description="Reuse answers per key for `ttl`, across events (kept in the store)."
    )
    delivery: dict[str, Any] | None = Field(
        None,
        description="Delivery policy overrides for this call (timeout_s, max_concurrency, rate_limit_per_s, "
        "retry, idempotency_header); the hub's `delivery` otherwise.",
        examples=[{"timeout_s": 5, "rate_limit_per_s": 10}],
    )

    _delivery = field_validator("delivery")(classmethod(lambda cls, v: check_delivery(v)))

    @field_validator("as_")
    @classmethod
    def _as(cls, v: str) -> str:
        import re

        if not re.match(NAME_RE, v):
            raise ValueError(f"bad name {v!r}: use letters, digits and '_', starting with a letter")
        return v

    _path = field_validator("path")(classmethod(lambda cls, v: appended_path(v)))

    @field_validator("headers_kept")
    @classmethod
    def _headers_kept(cls, v: list[str]) -> list[str]:
        return [h.strip().lower() for h in v]


def check_delivery(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """A call's `delivery:` overrides, validated as a delivery policy (the errors name the setting)."""
    if v is not None:
        from patchbay.config.models import DeliveryPolicy

        DeliveryPolicy().merged(v)
    return v


def is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


class CallingStep:
    """What the pipeline needs of a step that asks a system: its answer's binding (pure)."""

    calls: ClassVar[bool] = True
    config: Any

    def __init__(self, config: Any) -> None:
        self.config = config
        self._select = {k: compile_expr(v) for k, v in config.select.items()}
        self._cache_key: Expr | None = compile_expr(config.cache.key) if config.cache else None

    @property
    def bound_as(self) -> str:
        return str(self.config.as_)

    def apply(self, record: Any) -> Any:  # never called: the pipeline suspends at a call
        raise RuntimeError(f"a {self.config.system} call runs through the hub, not inside a step")

    def cache_key(self, record: Any) -> str | None:
        if self._cache_key is None:
            return None
        v = self._cache_key.search(record)
        return None if v is None or isinstance(v, dict | list) else str(v)

    def value_of(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The bound value: `{status, body}`, the kept headers and the selected fields."""
        out = {"status": answer.get("status"), "body": answer.get("body")}
        if "headers" in answer:
            out["headers"] = answer["headers"]
        for name, expr in self._select.items():
            out[name] = expr.search(answer)
        return out

    def empty(self, value: dict[str, Any]) -> bool:
        if value.get("status") == 404:
            return True
        if self._select:
            return all(is_empty(value[n]) for n in self._select)
        return is_empty(value.get("body"))

    def bind(self, record: Any, answer: dict[str, Any]) -> Any:
        """The record with the answer bound; Dropped/RecordInvalid for an empty answer when so configured."""
        if not isinstance(record, dict):
            raise RecordInvalid([Violation(self.bound_as, "a call's answer is bound into an object record")])
        value = self.value_of(answer)
        if self.empty(value):
            if self.config.on_empty == "drop":
                raise Dropped(f"{self.bound_as}: the answer was empty")
            if self.config.on_empty == "quarantine":
                raise RecordInvalid(
                    [Violation(self.bound_as, f"the answer was empty (HTTP {value.get('status')})")]
                )
        return {**record, self.bound_as: value}

    @classmethod
    def check_common(cls, config: Any) -> Iterator[CheckIssue]:
        for name, text in config.select.items():
            try:
                compile_expr(text)
            except ExprError as exc:
                yield CheckIssue(("select", name), exc.message)
        if config.cache is not None:
            try:
                compile_expr(config.cache.key)
            except ExprError as exc:
                yield CheckIssue(("cache", "key"), exc.message)


@step("call", config=CallConfig)
class CallStep(CallingStep):
    """Call a system and bind its answer to a name (durable: a run waiting on a call survives a restart)."""

    @classmethod
    def check(cls, config: CallConfig) -> Iterator[CheckIssue]:
        yield from cls.check_common(config)
        try:
            render_template(config.path)
        except _ExprError as exc:
            yield CheckIssue(("path",), exc.message)
        for k, v in config.headers.items():
            try:
                render_template(v)
            except _ExprError as exc:
                yield CheckIssue(("headers", k), exc.message)
        if isinstance(config.body, str):
            try:
                compile_expr(config.body)
            except ExprError as exc:
                yield CheckIssue(("body",), exc.message)
        if config.body is not None and config.method == "GET":
            yield CheckIssue(("body",), "a GET call sends no body; remove it or use POST")
