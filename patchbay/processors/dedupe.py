"""dedupe: let a record through only when its key was not seen (let through) within a time window.

Whether a key was seen is decided by the store in the transaction that accepts the event: of two
events racing with one key, exactly one passes; the other is filtered, "duplicate of run X".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, Literal

import orjson
from pydantic import Field

from patchbay.config.durations import Duration
from patchbay.errors import RecordInvalid, Violation
from patchbay.expressions import ExprError, compile_expr
from patchbay.processors.base import CheckIssue, GateContext, StepConfig
from patchbay.registry import step
from patchbay.store.base import DedupeClaim

MIN_WITHIN_S = 1.0
MAX_WITHIN_S = 366 * 86400.0


class DedupeConfig(StepConfig):
    """`dedupe: {key: email, within: 24h}`."""

    key: str = Field(
        description=(
            "JMESPath expression: records with the same value are duplicates. Normalise it here when"
            " needed, e.g. `lower(trim(email))`; a list combines values, e.g. `[email, list_id]`."
        ),
        examples=["lower(email)", "order_id"],
    )
    within: Duration = Field(
        description=(
            "How long a key is remembered after the record that let it through (1s to 366d); a duplicate"
            " does not extend it."
        ),
        examples=["10m", "24h", "30d"],
    )
    on_missing: Literal["pass", "quarantine"] = Field(
        "pass",
        description="A record whose key is null: `pass` it (not deduplicated, said in its trace) or `quarantine` it.",
    )


@step("dedupe", config=DedupeConfig)
class DedupeStep:
    """Drop a record whose key was seen within a window."""

    absorbs = False

    def __init__(self, config: DedupeConfig) -> None:
        self.config = config
        self._key = compile_expr(config.key)

    def apply(self, record: Any) -> Any:
        """Without the hub (a flow test): the record goes on; remembering keys needs the store."""
        return record

    def gate(self, record: Any, ctx: GateContext) -> tuple[DedupeClaim | None, dict[str, Any]]:
        """The claim the store settles (None: no key), and the trace entry."""
        value = self._key.search(record)
        if value is None:
            if self.config.on_missing == "quarantine":
                raise RecordInvalid([Violation("key", f"{self._key.text} is null")], step=ctx.step)
            return None, {"key": None, "note": "no key: not deduplicated"}
        digest = hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        return DedupeClaim(ctx.step, digest, self.config.within, ctx.trace_at), {"key": value}

    @classmethod
    def check(cls, config: DedupeConfig) -> Iterator[CheckIssue]:
        """A key that does not compile, a window too short or long."""
        try:
            compile_expr(config.key)
        except ExprError as exc:
            yield CheckIssue(("key",), exc.message)
        if not MIN_WITHIN_S <= config.within <= MAX_WITHIN_S:
            yield CheckIssue(("within",), f"within {config.within:g}s is out of range: from 1s to 366d")
