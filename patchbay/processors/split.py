"""split: an array in the record becomes one record per element; the steps after it run per element."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from pydantic import Field, model_validator

from patchbay.errors import RecordInvalid, Violation
from patchbay.expressions import ExprError, compile_expr
from patchbay.processors.base import CheckIssue, Dropped, StepConfig
from patchbay.records import dig
from patchbay.registry import step


class SplitConfig(StepConfig):
    """`split: items`, or `split: {path: items, with: {order_id: order_id}}`."""

    path: str = Field(
        description="Dotted path to the array; each element becomes one record.", examples=["items"]
    )
    with_: dict[str, str] | None = Field(
        None,
        alias="with",
        description="Fields of the parent copied into each element: name -> expression over the parent. "
        "Without it, each element gets the parent (without the array) as `parent`.",
        examples=[{"order_id": "id", "currency": "currency"}],
    )
    max_elements: int = Field(
        1000, ge=1, le=100_000, description="More elements than this quarantine the event (with the count)."
    )

    model_config = {"extra": "forbid", "populate_by_name": True}

    @model_validator(mode="wrap")
    @classmethod
    def _short(cls, data: Any, handler: Callable[[Any], SplitConfig]) -> SplitConfig:
        return handler({"path": data} if isinstance(data, str) else data)


@step("split", config=SplitConfig)
class SplitStep:
    """One record per element of an array; later steps and deliveries run per element (keys get its index)."""

    splits: ClassVar[bool] = True

    def __init__(self, config: SplitConfig) -> None:
        self.config = config
        self._with = {k: compile_expr(v) for k, v in (config.with_ or {}).items()}

    def apply(self, record: Any) -> Any:
        """The list of element records; Dropped for an empty array, RecordInvalid for a missing one."""
        return self.elements(record)

    def elements(self, record: Any) -> list[Any]:
        items = dig(record, self.config.path)
        if not isinstance(items, list):
            what = "missing" if items is None else f"a {type(items).__name__}, not an array"
            raise RecordInvalid([Violation(self.config.path, f"split: the array is {what}")])
        if not items:
            raise Dropped(f"split: {self.config.path} is empty")
        if len(items) > self.config.max_elements:
            raise RecordInvalid(
                [
                    Violation(
                        self.config.path,
                        f"split: {len(items)} elements, more than max_elements {self.config.max_elements}",
                    )
                ]
            )
        if self._with:
            extra = {k: e.search(record) for k, e in self._with.items()}
        else:
            extra = {"parent": _without(record, self.config.path)}
        return [{**item, **extra} if isinstance(item, dict) else {"value": item, **extra} for item in items]

    @classmethod
    def check(cls, config: SplitConfig) -> Iterator[CheckIssue]:
        for k, v in (config.with_ or {}).items():
            try:
                compile_expr(v)
            except ExprError as exc:
                yield CheckIssue(("with", k), exc.message)


def _without(record: Any, path: str) -> Any:
    """The record without the array at `path` (a shallow copy along the path)."""
    if not isinstance(record, dict):
        return record
    head, _, rest = path.partition(".")
    if head not in record:
        return record
    out = dict(record)
    if rest:
        out[head] = _without(record[head], rest)
    else:
        del out[head]
    return out
