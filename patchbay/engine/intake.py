"""Intake yields to delivery in a process that does both.

One event loop runs a process's webhooks and its deliveries. Taking webhooks costs less than delivering
them (a parse and a share of a group commit, against a request to the destination and the attempt's
record), so under a sustained load the loop fills with requests and the deliveries wait their turn in it:
measured on PostgreSQL, one process at 64 connections acknowledged 3,464 events/s and delivered 952/s, a
backlog growing by 2,500 a second. The hub would take in far more than it can hand on, for as long as the
load lasts.

So while a destination of this process falls behind, webhooks are taken at most `limit` at a time (the
hub's `intake_when_behind`); the others wait their turn, in arrival order, before their body is read. None
is refused for it: a sender sees a slower answer, as it would from any busy server. Once every destination
has caught up, webhooks are taken as they come again. Measured in the same run: 1,702 delivered/s, with
acknowledgements at the same pace.

Behind means a backlog that grows, not one that exists: its worker finds more deliveries due than it holds,
and what it reads has waited longer than `LAGGING_S` since it came due (`DestinationWorker` reports it).
Under a high rate a worker that keeps up finds more due than it holds at every read, and yielding to that
only slowed intake: at 64 connections PostgreSQL one process delivered 4–11 % more with the wait as part of
the rule than without it (3 of 3 repetitions), a split over processes lost 5–29 % without it.

A process that does not deliver (`--role web`) hears it from the processes that do: a worker process tells
the others while a destination of its is behind, and when that ends (the store's `announce_intake`:
NOTIFY, or the wake sockets on SQLite; at most every `TELL_INTAKE_S`, where each destination ended up). It
tells them again with every heartbeat while it lasts. What another process said lasts `REMOTE_TTL_S` unless
said again, so a worker that dies behind does not hold the web processes' intake down: they take webhooks as
they come again within that time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

DEFAULT_LIMIT = 16
# How long another process's "behind" holds unless said again: three of its heartbeats (engine/roles.py).
REMOTE_TTL_S = 6.0
# How often a process tells the others at most (where its destinations ended up since it last did).
TELL_INTAKE_S = 0.5
# A destination is behind while what its worker reads has waited longer than this since it came due (and it
# finds more due than it holds): a backlog that grows, not one that exists.
LAGGING_S = 1.0


class Intake:
    def __init__(self, limit: int = DEFAULT_LIMIT, on_change: Callable[[bool], None] | None = None) -> None:
        self.limit = limit
        # Who is behind ("flow/name", or "flow/name on node" for another process's) -> until when
        # (time.monotonic; this process's own: until it says it caught up).
        self._behind: dict[str, float] = {}
        self._turns: asyncio.Semaphore | None = None
        self._on_change = on_change  # (limited or not): the metric's gauge

    def report(self, who: str, behind: bool, ttl_s: float | None = None) -> None:
        """`who` (a destination, "flow/name") is behind, or has caught up; `ttl_s`: for that long only
        unless reported again (another process's report)."""
        was = self.limited
        if behind:
            self._behind[who] = math.inf if ttl_s is None else time.monotonic() + ttl_s
        else:
            self._behind.pop(who, None)
        self._changed(was)

    def expire(self) -> None:
        """Forget what other processes said and did not say again in time."""
        if self._behind:
            was, now = True, time.monotonic()
            for who in [w for w, until in self._behind.items() if until <= now]:
                del self._behind[who]
            self._changed(was)

    def _changed(self, was: bool) -> None:
        if was != bool(self._behind) and self._on_change is not None:
            self._on_change(not was)

    @property
    def limited(self) -> bool:
        self.expire()
        return bool(self._behind)

    @property
    def behind(self) -> frozenset[str]:
        self.expire()
        return frozenset(self._behind)

    @property
    def own(self) -> frozenset[str]:
        """This process's destinations that are behind (what it tells the other processes)."""
        return frozenset(w for w, until in self._behind.items() if until == math.inf)

    async def enter(self) -> bool:
        """Wait for a turn while intake is limited; True when the caller holds one (then `leave()` it)."""
        if not self._behind or not self.limited:
            return False
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.limit)
        await self._turns.acquire()
        return True

    def leave(self) -> None:
        assert self._turns is not None
        self._turns.release()


__all__ = ["DEFAULT_LIMIT", "LAGGING_S", "REMOTE_TTL_S", "TELL_INTAKE_S", "Intake"]
