"""The Step protocol: a pure function of a record, checked before it runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from patchbay.errors import PatchbayError

Loc = tuple[str | int, ...]


class Dropped(PatchbayError):
    """A step decided the record goes no further (a filter); not a failure."""


@dataclass
class CheckIssue:
    """A problem found by a step's static check, at `loc` inside the step's own config."""

    loc: Loc
    message: str


class Step(Protocol):
    kind: ClassVar[str]

    def __init__(self, config: Any) -> None: ...

    def apply(self, record: Any) -> Any:
        """Return the new record; raise RecordInvalid (quarantine) or Dropped (filtered)."""
        ...

    @classmethod
    def check(cls, config: Any) -> Iterator[CheckIssue]:
        """Problems found without running: unknown functions, bad expressions, ..."""
        ...


class StepConfig(BaseModel):
    """Base for step configs (extra keys are errors)."""

    model_config = {"extra": "forbid"}
