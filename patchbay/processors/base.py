"""The Step protocol: a pure function of a record, checked before it runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from patchbay.errors import PatchbayError
from patchbay.registry import CheckIssue, Loc

__all__ = ["CheckIssue", "Dropped", "GateContext", "Loc", "Step", "StepConfig"]


class Dropped(PatchbayError):
    """A step decided the record goes no further (a filter); not a failure."""


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


@dataclass
class GateContext:
    """What a gate step (dedupe, aggregate) knows of the event besides the record."""

    flow: str
    step: str  # the step's name in the flow (its state is kept under it)
    event_id: str
    received_at: float
    trace_at: int  # the index of the step's own trace entry
