"""Rate limits: the one token bucket, and the inbound limits (one bucket per source system, shared by all
of its webhook endpoints). Deliveries use the same bucket for a destination's `rate_limit_per_s`."""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Callable

from patchbay.config.models import InboundAuth
from patchbay.errors import RejectedRequest

__all__ = ["InboundLimits", "TokenBucket", "limits_for", "rate_limited"]

Clock = Callable[[], float]


class TokenBucket:
    """`rate` tokens a second, at most `capacity` saved up; each request takes one."""

    __slots__ = ("at", "capacity", "clock", "rate", "tokens")

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.clock = clock
        self.at = clock()

    def take(self) -> float | None:
        """None when a token was taken; otherwise the seconds until one is available."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate

    async def wait(self) -> None:
        """Take a token, sleeping until one is available (several waiters share the rate)."""
        while (seconds := self.take()) is not None:
            await asyncio.sleep(seconds)


class InboundLimits:
    """The buckets of one hub, by system name, built from each system's `webhook` settings.

    The check runs before the body is read or the signature checked, so a flood costs the hub
    almost nothing; the price is that unauthenticated requests spend the system's budget too.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[InboundAuth, TokenBucket]] = {}

    def check(self, system: str, auth: InboundAuth) -> float | None:
        """None when the request may go on; otherwise the seconds the sender should wait."""
        rate = auth.rate_per_s
        if rate is None:
            return None
        found = self._buckets.get(system)
        if found is None or found[0] is not auth:  # first request, or the settings were reloaded
            burst = float(auth.burst) if auth.burst is not None else max(1.0, rate)
            found = (auth, TokenBucket(rate, burst, self._clock))
            self._buckets[system] = found
        return found[1].take()


_BY_OWNER: weakref.WeakKeyDictionary[object, InboundLimits] = weakref.WeakKeyDictionary()


def limits_for(owner: object) -> InboundLimits:
    """The limits shared by every endpoint of one hub (`owner`), created on first use."""
    limits = _BY_OWNER.get(owner)
    if limits is None:
        limits = _BY_OWNER[owner] = InboundLimits()
    return limits


def rate_limited(system: str, auth: InboundAuth, wait_s: float) -> RejectedRequest:
    """The 429 a sender gets, with Retry-After in whole seconds (at least 1)."""
    retry = max(1, math.ceil(wait_s))
    return RejectedRequest(
        429,
        "rate_limited",
        f"more than {auth.rate_per_s:g} requests/s from system {system}; "
        f"nothing was stored, retry in {retry}s",
        {"Retry-After": str(retry)},
    )
