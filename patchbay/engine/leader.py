"""One rule for what must run once in the whole cluster: it runs under a lease, on one node at a time.

Several hubs may share one PostgreSQL store. Each flow's schedule (`schedule:<flow>`) and broker or
folder consumer (`source:<flow>`), the window closer (`windows`), the alert loop (`alerts`), retention
(`retention`) and each entity's first run (`first-run:<entity>`) run where their lease is held:

  hold(name, work)   standby: try to take the lease every STANDBY_S (jittered); taken: start `work(fence)`,
                     renew every TTL_S / 3; a renewal that fails (refused, an error, too slow) cancels the
                     work at once and the node goes back to standby; a clean stop cancels it and releases
                     the lease, so another node takes it within STANDBY_S. With `until` (an event that
                     also ends the work), the hold ends once it is set, in standby too: a stop that came as
                     the lease was lost does not wait to take the lease again only to end the work.
  once(name, work)   the same for a job that ends: wait until this node holds the lease, run it, release.

A node that dies stops renewing: its lease runs out after TTL_S and a standby node takes it within
STANDBY_S more, so its work moves within TTL_S + STANDBY_S (15 s). The lease's fencing token goes with
the work (`current_fence()`, also set for every task the work starts): the store writes that commit the
work's effects (a schedule's state, a source's cursor with its events, a first run) carry it and fail
with LeaseLost once another node took the lease, so a paused holder that wakes up commits nothing.

On a store whose leases are not in the store (SQLite, `store.leases_in_store` False: the scheduler role's
flock makes one process their only holder) every lease is that hub's: `hold` is a plain task, `once` a plain
call, the fence None, and the store is never asked.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from patchbay.engine.waiting import wait_set
from patchbay.errors import LeaseLost
from patchbay.store.base import Fence, Leases

log = logging.getLogger("patchbay.leader")

TTL_S = 12.0  # a holder that stops renewing loses its leases after this long
STANDBY_S = 3.0  # how often a node without a lease tries to take it

Work = Callable[[Fence | None], Awaitable[None]]


_FENCE: contextvars.ContextVar[Fence | None] = contextvars.ContextVar("patchbay_fence", default=None)


def current_fence() -> Fence | None:
    """The lease the running work holds (None outside a lease, or on a store one hub owns)."""
    return _FENCE.get()


class Leader:
    """This node's side of the leases in `store` (see the module's docstring)."""

    def __init__(
        self,
        store: Leases | None,
        node_id: str = "local",
        *,
        ttl_s: float | None = None,
        standby_s: float | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        # The one rule (store/base.py `Leases.leases_in_store`); SQLite: one process holds the scheduler role
        # (an flock), so every lease is its own, never stored.
        self.leases_in_store = store is not None and store.leases_in_store
        self.ttl_s = TTL_S if ttl_s is None else ttl_s
        self.standby_s = STANDBY_S if standby_s is None else standby_s
        self.held: dict[str, Fence] = {}  # the leases this node holds now, by name

    def hold(self, name: str, work: Work, until: asyncio.Event | None = None) -> asyncio.Task[None]:
        """Run `work` whenever this node holds lease `name`; the task runs until cancelled, until `work`
        returns, or until `until` is set (see the module's docstring)."""
        if not self.leases_in_store:
            return asyncio.create_task(_as_coroutine(work, None), name=name)
        return asyncio.create_task(self._hold(name, work, until), name=f"lease {name}")

    async def once(self, name: str, work: Work) -> None:
        """Wait until this node holds lease `name`, run `work` once, release it. Another node may have
        done the job meanwhile: `work` looks at what is done first. Its exception is raised here."""
        if not self.leases_in_store:
            await work(None)
            return
        told = False
        while True:
            fence = await self._take(name)
            if fence is None:
                if not told:
                    log.info("lease %s is held by another node: node %s waits for it", name, self.node_id)
                    told = True
                await self._standby()
            elif await self._run(fence, work, raising=True):
                return

    async def _hold(self, name: str, work: Work, until: asyncio.Event | None) -> None:
        while until is None or not until.is_set():
            fence = await self._take(name)
            if fence is None:
                await self._standby(until)
                continue
            if await self._run(fence, work, raising=False):
                return
            await self._standby(until)  # lost, or the work failed: another node may take it meanwhile

    async def _run(self, fence: Fence, work: Work, *, raising: bool) -> bool:
        """Run `work` while renewing `fence`: True when it returned, False when the lease was lost or it
        failed (raised instead, when `raising`). The lease is released unless lost."""
        name = fence.name
        log.info("lease %s taken by node %s (fence %d): running it here", name, self.node_id, fence.token)
        self.held[name] = fence
        reset = _FENCE.set(fence)
        try:  # the task copies the context: the work and every task it starts see the fence
            task = asyncio.create_task(_as_coroutine(work, fence), name=name)
        finally:
            _FENCE.reset(reset)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.ttl_s / 3)
                if done:
                    break
                if not await self._renew(fence):
                    log.warning(
                        "lease %s lost by node %s (not renewed within %.0f s): its work stops here and"
                        " another node takes it over",
                        name,
                        self.node_id,
                        self.ttl_s,
                    )
                    await _cancel(task)
                    return False
        except asyncio.CancelledError:  # the hub stops: hand the lease over at once
            await _cancel(task)
            await asyncio.shield(self._release(fence))
            raise
        finally:
            self.held.pop(name, None)
        if task.cancelled():
            await self._release(fence)
            return False
        exc = task.exception()
        if isinstance(exc, LeaseLost):
            log.warning("%s", exc)
            return False
        await self._release(fence)
        if exc is None:
            return True
        if raising:
            raise exc
        log.error("the work under lease %s failed on node %s; trying again", name, self.node_id, exc_info=exc)
        return False

    async def _take(self, name: str) -> Fence | None:
        assert self.store is not None
        try:
            async with asyncio.timeout(self.ttl_s / 3):
                token = await self.store.take_lease(name, self.node_id, self.ttl_s)
        except Exception as exc:  # the store is unreachable: its own health says so; try again later
            log.debug("taking lease %s: %s", name, exc)
            return None
        return None if token is None else Fence(name, self.node_id, token)

    async def _renew(self, fence: Fence) -> bool:
        taken = await self._take(fence.name)
        return taken is not None and taken.token == fence.token

    async def _release(self, fence: Fence) -> None:
        assert self.store is not None
        try:
            async with asyncio.timeout(5):
                await self.store.release_lease(fence.name, fence.holder)
        except Exception as exc:  # it runs out by itself after ttl
            log.warning("releasing lease %s: %s; it runs out in %.0f s", fence.name, exc, self.ttl_s)

    async def _standby(self, until: asyncio.Event | None = None) -> None:
        delay = self.standby_s * random.uniform(0.8, 1.2)
        if until is None:
            await asyncio.sleep(delay)
        else:
            await wait_set(until, delay)


async def _as_coroutine(work: Work, fence: Fence | None) -> None:
    await work(fence)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


LOCAL = Leader(None)  # every lease this process's own: for a store one hub owns, and for tests

__all__ = ["LOCAL", "STANDBY_S", "TTL_S", "Leader", "current_fence"]
