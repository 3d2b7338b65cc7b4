"""The store from synchronous code (the CLI): each call runs one store operation to completion."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from patchbay.store.base import Store

T = TypeVar("T")


class BlockingStore:
    """`store.run(lambda s: s.list_runs(f))`: the protocol's operations, awaited on a private loop.

    The loop runs on its own thread, so a caller that already runs an event loop (a test invoking
    the CLI) can use it too. The SQLite store runs in WAL mode: the CLI works beside a serving hub.
    """

    def __init__(self, path: Path | str) -> None:
        from patchbay.store.opening import open_hub_store

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="patchbay-cli-store", daemon=True)
        self._thread.start()
        self.store: Store = open_hub_store(path, check=False)  # the hub runs quick_check, not each command
        self._closed = False

    def run(self, op: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(op(self.store), self._loop).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.run(lambda s: s.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> BlockingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
