"""The poll loop every SQL source shares: one kept connection, pages by keyset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, ClassVar, Generic, TypeVar

from patchbay.connectors.base import Batch, Resources
from patchbay.connectors.sql_client.errors import source_error
from patchbay.connectors.sql_client.names import Dialect
from patchbay.connectors.sql_client.pool import Pool
from patchbay.connectors.sql_client.source_config import SqlSourceConfig
from patchbay.connectors.sql_client.source_query import SourcePosition, SourceQuery
from patchbay.errors import (
    TransientError,
)

C = TypeVar("C")


class SqlSource(Generic[C]):
    """The poll loop every SQL source shares; subclasses connect and fetch.

    One connection, kept between polls. A read on a kept connection that the server closed in the
    meantime (restart, idle timeout, killed) is retried once on a new one: a SELECT is safe to repeat.
    """

    kind: ClassVar[str]
    dialect: ClassVar[Dialect]
    mode: ClassVar[str] = "poll"

    def __init__(self, config: SqlSourceConfig, resources: Resources) -> None:
        self.config = config
        self.resources = resources
        self.query = SourceQuery(config, self.dialect)
        self._pool: Pool[C] = Pool(self._connect, self._disconnect, 1)
        # With `lookback`: record id -> the newest cursor value when it was handed over (and committed).
        self._seen: dict[str, Any] = {}

    async def _connect(self) -> C:
        raise NotImplementedError

    async def _disconnect(self, conn: C) -> None:
        raise NotImplementedError

    async def _fetch(self, conn: C, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one SELECT; its rows as dicts keyed by column name."""
        raise NotImplementedError

    def _healthy(self, conn: C) -> bool:
        return True

    def _deadline(self) -> float | None:
        return self.config.timeout_s

    @property
    def action(self) -> str:
        where = f" on {self.resources.system}" if self.resources.system else ""
        return f"polling {self.query.target}{where}"

    async def poll(self, cursor: Any) -> AsyncGenerator[Batch, None]:
        """Pages from the saved cursor on, each with the position of its last row, until a short page.

        With `lookback`, the read starts that far behind the saved position; rows this source already
        handed over in that window (same id and cursor value) are dropped, and each batch's cursor is the
        newest position read so far, never an older one."""
        pos = self.query.resume(cursor)
        if not self.config.lookback:
            async for batch in self._pages(pos):
                yield batch
            return
        if not pos.after:
            self._seen.clear()  # read from the start (or a reset): nothing was handed over
            newest = None
        else:
            newest = pos
            pos = SourcePosition(self.query.back(pos.value))
            self._forget(newest)
        async for batch in self._pages(pos):
            last = self.query.resume(batch.cursor)
            if newest is None or _key(last) > _key(newest):
                newest = last
            fresh = [r for r in batch.records if r.id not in self._seen]
            if not fresh:
                continue
            yield Batch(fresh, self.query.cursor_of(newest))
            # Resumed: the consumer committed the batch (a failed commit never resumes the generator).
            for r in fresh:
                self._seen[str(r.id)] = newest.value
        if newest is not None:
            self._forget(newest)

    async def _pages(self, pos: SourcePosition) -> AsyncGenerator[Batch, None]:
        while True:
            sql, params = self.query.page(pos)
            rows = await self._read(sql, params)
            if not rows:
                return
            batch, pos = self.query.batch(rows)
            yield batch  # the connection is back in the pool: dropping the generator here leaks nothing
            if len(rows) < self.config.batch_size:
                return

    def _forget(self, newest: SourcePosition) -> None:
        """Drop the handed-over ids that the next window no longer reaches."""
        floor = self.query.back(newest.value)
        self._seen = {k: v for k, v in self._seen.items() if not v < floor}

    async def _read(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self._pool.slot():
            for attempt in (1, 2):
                kept = bool(self._pool.idle)
                conn: C | None = None
                reuse = False
                deadline = asyncio.timeout(self._deadline())
                try:
                    async with deadline:
                        conn = await self._pool.take()
                        rows = await self._fetch(conn, sql, params)
                    reuse = True
                    return rows
                except Exception as exc:
                    if isinstance(exc, TimeoutError) and deadline.expired():
                        # Mid-statement: the connection's state is unknown, so it is not reused.
                        raise TransientError(
                            f"{self.action}: timed out after {self.config.timeout_s:g}s"
                        ) from exc
                    broken = conn is not None and not self._healthy(conn)
                    if broken:
                        await self._pool.clear()
                    reuse = conn is not None and not broken
                    if attempt == 1 and kept and broken:
                        continue  # the kept connection died between polls: once more on a new one
                    raise source_error(
                        exc, self.dialect, self.action, self.resources.redact, self.resources.system or None
                    ) from exc
                finally:
                    if conn is not None:
                        await self._pool.give_back(conn, reuse)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._pool.close()


def _key(pos: SourcePosition) -> tuple[Any, Any]:
    return (pos.value, pos.id)
