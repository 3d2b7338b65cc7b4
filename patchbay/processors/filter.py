"""filter: let a record continue only when an expression is true; otherwise drop it (not an error)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from patchbay.errors import RecordInvalid
from patchbay.expressions import ExprError, compile_expr, is_constant_false, is_truthy
from patchbay.processors.base import CheckIssue, Dropped, Loc, StepConfig
from patchbay.registry import step


class FilterConfig(StepConfig):
    """`filter: {when: <expr>}`, or just `filter: <expr>`."""

    when: str = Field(
        description=(
            "JMESPath expression; the record continues when it is true. false, null, '' and empty"
            " arrays/objects count as false (0 counts as true); a false record is dropped, not failed."
        ),
        examples=["status == 'paid'", "contains(['FR', 'DE'], country)"],
    )

    _short_form: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _expr_shorthand(cls, data: Any, handler: Callable[[Any], FilterConfig]) -> FilterConfig:
        if isinstance(data, str):
            config = handler({"when": data})
            config._short_form = True
            return config
        return handler(data)

    @property
    def when_loc(self) -> Loc:
        """Where `when` sits in the YAML as written."""
        return () if self._short_form else ("when",)


@step("filter", config=FilterConfig)
class FilterStep:
    """Keep records matching a condition; drop the rest."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self._when = compile_expr(config.when)
        self._reason = f"filter: {self._when.text} was false"

    def apply(self, record: Any) -> Any:
        """The record unchanged when `when` is true; Dropped otherwise."""
        try:
            passed = self._when.search(record)
        except RecordInvalid as exc:
            raise RecordInvalid(exc.violations, step="filter") from exc
        if is_truthy(passed):
            return record
        raise Dropped(self._reason)

    @classmethod
    def check(cls, config: FilterConfig) -> Iterator[CheckIssue]:
        """A bad expression, or one that is false for every record."""
        try:
            when = compile_expr(config.when)
        except ExprError as exc:
            yield CheckIssue(config.when_loc, exc.message)
            return
        if is_constant_false(when):
            yield CheckIssue(
                config.when_loc,
                "this filter never passes; the steps after it are unreachable",
                never_passes=True,
            )
