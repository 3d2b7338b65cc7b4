"""One error vocabulary: what an outcome means for a delivery and its destination, or for a source.

Destinations return an `Outcome`; sources raise `TransientError`, `AuthError` or `TerminalError`
(`patchbay.errors`), and `outcome_of` reads any exception into the same `OutcomeClass`. Then:
transient retries with backoff and jitter, auth pauses (and alerts), terminal stops (and alerts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Outcome, OutcomeClass
from patchbay.errors import (
    AuthError,
    ConfigError,
    SecretMissing,
    StoreUnavailable,
    StoreUnusable,
    TerminalError,
    TransientError,
)
from patchbay.security.ssrf import BlockedAddress


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


def outcome_of(exc: BaseException, action: str = "") -> Outcome:
    """An exception, read as an outcome: what a source raised, or a connector bug.

    Patchbay's own errors say what they are. Anything else is unexpected: probably transient (a lost
    connection, a driver hiccup), so it is retried, and its type and message are kept.
    """
    prefix = f"{action}: " if action else ""
    if isinstance(exc, TransientError):
        return Outcome(OutcomeClass.TRANSIENT, error=f"{prefix}{exc}", retry_after_s=exc.retry_after_s)
    if isinstance(exc, StoreUnavailable):  # the hub's own store (disk full): the same write may work later
        return Outcome(OutcomeClass.TRANSIENT, error=f"{prefix}{exc}")
    if isinstance(exc, AuthError | SecretMissing):
        return Outcome(OutcomeClass.AUTH, error=f"{prefix}{exc}")
    if isinstance(exc, TerminalError | ConfigError | BlockedAddress | StoreUnusable):
        return Outcome(OutcomeClass.TERMINAL, error=f"{prefix}{exc}")
    return Outcome(OutcomeClass.TRANSIENT, error=f"{prefix}unexpected {type(exc).__name__}: {exc}")


# A source's retries: 1 s, doubling, at most SOURCE_BACKOFF_MAX_S, each ±SOURCE_JITTER.
SOURCE_BACKOFF_S = 1.0
SOURCE_BACKOFF_MAX_S = 300.0
SOURCE_JITTER = 0.2


@dataclass
class SourceDecision:
    state: str  # failing (retry in `retry_in`) | paused (auth) | stopped (terminal): both wait for a resume
    retry_in: float | None
    reason: str


def decide_source(outcome: Outcome, failures: int, rng: random.Random) -> SourceDecision:
    """What the `failures`-th failure in a row of a source (or a schedule's run) means."""
    c = outcome.cls
    reason = outcome.summary
    if c is OutcomeClass.AUTH:
        return SourceDecision("paused", None, reason)
    if c in (OutcomeClass.TERMINAL, OutcomeClass.GONE):
        return SourceDecision("stopped", None, reason)
    base = min(SOURCE_BACKOFF_S * 2 ** max(0, failures - 1), SOURCE_BACKOFF_MAX_S)
    delay = base * (1 + rng.uniform(-SOURCE_JITTER, SOURCE_JITTER))
    if outcome.retry_after_s is not None:  # the remote's own hint, bounded like the backoff
        delay = max(0.0, min(outcome.retry_after_s, SOURCE_BACKOFF_MAX_S))
    return SourceDecision("failing", delay, reason)
