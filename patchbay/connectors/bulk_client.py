"""What the bulk (batch sync) side of a database connector provides, and the SQL they share.

A bulk connector is registered with role "bulk" and implements `BulkSystem`: it reads a table or
query as Frames (COPY-text rows) inside one snapshot, and writes Frames into a table inside one
transaction that also records the flow's sync state (cursor, columns), so a run is all or nothing
at the destination and a crash at any point leaves the last committed state intact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from patchbay.batch.frame import Column, Frame
from patchbay.config.batch import BatchFrom

STATE_TABLE = "_patchbay_sync_state"
BUCKETS = 256  # key ranges compared for delete detection (first two hex digits of md5(key))


@dataclass
class Window:
    """Which rows a run reads: cursor column >= start (None = every row)."""

    column: str | None = None
    start: Any = None  # a cursor value as the database gave it (text), lookback already applied
    lookback_s: float = 0.0


@dataclass
class SyncState:
    """What the destination remembers of a flow after each committed run."""

    cursor: str | None = None  # the highest cursor value read (text)
    columns: list[dict[str, str]] = field(default_factory=list)  # the source's columns last run saw
    runs: int = 0


@dataclass
class Applied:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0


class Load(Protocol):
    async def write(self, rows: list[list[bytes]]) -> None: ...
    async def delete_keys(self, keys: list[tuple[Any, ...]]) -> None: ...
    async def commit(self, state: SyncState) -> Applied: ...
    async def abort(self) -> None: ...


class BulkSystem(Protocol):
    """One database, as a batch sync sees it (source, destination or both)."""

    async def columns(self, frm: BatchFrom) -> list[Column]: ...
    async def cursor_max(self, frm: BatchFrom, window: Window) -> str | None: ...
    async def count(self, frm: BatchFrom, window: Window) -> int | None: ...
    def read(
        self, frm: BatchFrom, columns: list[Column], window: Window, batch_rows: int
    ) -> AsyncIterator[Frame]: ...
    async def key_buckets(self, relation: BatchFrom, key: list[str]) -> dict[str, tuple[int, int]]: ...
    async def bucket_keys(self, relation: BatchFrom, key: list[str], bucket: str) -> set[str]: ...
    async def table_columns(self, table: str) -> list[Column] | None: ...
    async def row_count(self, table: str) -> int: ...
    async def state(self, flow: str) -> SyncState | None: ...
    async def begin(
        self, flow: str, table: str, columns: list[Column], mode: str, key: list[str], evolve: list[Column]
    ) -> Load: ...
    async def close(self) -> None: ...


def key_text(values: tuple[Any, ...]) -> str:
    """A key as the databases render it for hashing: the values as text, joined by |."""
    return "|".join("" if v is None else str(v) for v in values)
