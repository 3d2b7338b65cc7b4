"""The delivery policy: what an attempt's outcome means for its delivery and its destination."""

from __future__ import annotations

import random
from dataclasses import dataclass

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Outcome, OutcomeClass


@dataclass
class Decision:
    status: str  # delivered | pending | dead
    next_at: float | None = None
    consumed_retry: bool = False
    destination_state: str | None = None  # paused | disabled
    reason: str = ""


def retry_delay(
    policy: DeliveryPolicy, retries_done: int, retry_after_s: float | None, rng: random.Random
) -> float | None:
    """Seconds until the next try, or None when the schedule is spent."""
    sched = policy.retry.schedule
    if retries_done >= len(sched):
        return None
    base = sched[retries_done]
    delay = base * (1 + rng.uniform(-policy.retry.jitter, policy.retry.jitter)) if base else 0.0
    if retry_after_s is not None:
        # The destination knows when it will be ready: wait that long (bounded), never less.
        delay = max(min(retry_after_s, policy.retry.max_retry_after), 0.0)
    return delay


def decide(
    outcome: Outcome, retries_done: int, policy: DeliveryPolicy, now: float, rng: random.Random
) -> Decision:
    c = outcome.cls
    if c is OutcomeClass.SUCCESS:
        return Decision("delivered")
    if c is OutcomeClass.TRANSIENT:
        delay = retry_delay(policy, retries_done, outcome.retry_after_s, rng)
        if delay is None:
            return Decision("dead", reason=f"gave up after {retries_done + 1} attempts: {outcome.summary}")
        return Decision("pending", now + delay, consumed_retry=True, reason=f"retry in {delay:.1f}s")
    if c is OutcomeClass.AUTH:
        # Not the event's fault: it waits, untouched, until someone fixes the credential and resumes.
        return Decision("pending", now, destination_state="paused", reason=outcome.summary)
    if c is OutcomeClass.GONE:
        return Decision("dead", destination_state="disabled", reason=outcome.summary)
    return Decision("dead", reason=outcome.summary)
