"""Intake yields to delivery in a process that does both.

One event loop runs a process's webhooks and its deliveries. Taking webhooks costs less than delivering
them (a parse and a share of a group commit, against a request to the destination and the attempt's
record), so under a sustained load the loop fills with requests and the deliveries wait their turn in it:
measured on PostgreSQL, one process at 64 connections acknowledged 3,464 events/s and delivered 952/s, a
backlog growing by 2,500 a second. The hub would take in far more than it can hand on, for as long as the
load lasts.

So while a destination of this process falls behind (its worker finds more deliveries due than it holds:
`DestinationWorker` reports it), webhooks are taken at most `limit` at a time (the hub's
`intake_when_behind`); the others wait their turn, in arrival order, before their body is read. None is
refused for it: a sender sees a slower answer, as it would from any busy server. Once every destination
has caught up, webhooks are taken as they come again. Measured in the same run: 1,702 delivered/s, with
acknowledgements at the same pace.

A process that does not deliver (`--role web`) never falls behind here: its webhooks are taken as they
come, and the delivering processes keep their own pace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

DEFAULT_LIMIT = 16


class Intake:
    def __init__(self, limit: int = DEFAULT_LIMIT, on_change: Callable[[bool], None] | None = None) -> None:
        self.limit = limit
        self._behind: set[str] = set()
        self._turns: asyncio.Semaphore | None = None
        self._on_change = on_change  # (limited or not): the metric's gauge

    def report(self, who: str, behind: bool) -> None:
        """`who` (a destination, "flow/name") is behind, or has caught up."""
        was = bool(self._behind)
        if behind:
            self._behind.add(who)
        else:
            self._behind.discard(who)
        if was != bool(self._behind) and self._on_change is not None:
            self._on_change(not was)

    @property
    def limited(self) -> bool:
        return bool(self._behind)

    @property
    def behind(self) -> frozenset[str]:
        return frozenset(self._behind)

    async def enter(self) -> bool:
        """Wait for a turn while intake is limited; True when the caller holds one (then `leave()` it)."""
        if not self._behind:
            return False
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.limit)
        await self._turns.acquire()
        return True

    def leave(self) -> None:
        assert self._turns is not None
        self._turns.release()


__all__ = ["DEFAULT_LIMIT", "Intake"]
