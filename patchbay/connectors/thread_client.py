"""One thread per connector for drivers whose connections are not safe to share between threads (sqlite3,
duckdb): every use of the connection runs there, in order.

A cancelled await leaves its statement running in the worker thread. A close queued behind it on the same
thread waits for it; a close on another thread freed the connection under the running statement, which
crashed the process (a segfault). SQLite's sink and source, its bulk connector and DuckDB's all use this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class OneThread:
    """Mixin: `await self._in_thread(fn, *args)` runs fn on this connector's one thread."""

    _thread: ThreadPoolExecutor | None = None
    _thread_name = "patchbay-db"

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix=self._thread_name)
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _let_thread_go(self) -> None:
        """After the last close was queued: the thread ends once it has run it."""
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.shutdown(wait=False)
