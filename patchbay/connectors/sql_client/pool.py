"""A small connection pool shared by the SQL sinks and sources: no background tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

C = TypeVar("C")


class Pool(Generic[C]):
    """At most `size` connections, opened on demand and kept while healthy; no background tasks."""

    def __init__(
        self, open_conn: Callable[[], Awaitable[C]], close_conn: Callable[[C], Awaitable[None]], size: int
    ) -> None:
        self._open = open_conn
        self._close_conn = close_conn
        self._sem = asyncio.Semaphore(size)
        self._idle: list[C] = []
        self._closed = False

    @property
    def idle(self) -> list[C]:
        return list(self._idle)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._sem:
            yield

    async def take(self) -> C:
        """An idle connection (most recently used first) or a new one; call within slot()."""
        return self._idle.pop() if self._idle else await self._open()

    async def give_back(self, conn: C, reuse: bool) -> None:
        if reuse and not self._closed:
            self._idle.append(conn)
        else:
            await self._quietly_close(conn)

    async def clear(self) -> None:
        """Close the idle connections (after a lost connection they are likely dead too)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._quietly_close(conn)

    async def close(self) -> None:
        # Connections in use are closed when given back; a later take() opens a fresh one.
        self._closed = True
        await self.clear()

    async def _quietly_close(self, conn: C) -> None:
        try:
            await self._close_conn(conn)
        except Exception:  # closing a broken connection may fail; it is gone either way
            pass
