"""Driving source connectors: polled on a schedule, or consumed continuously, acknowledged after commit."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

from patchbay.connectors.base import Batch

if TYPE_CHECKING:
    from patchbay.engine.hub import FlowRuntime, Hub

log = logging.getLogger("patchbay.sources")


async def poll_once(hub: Hub, fr: FlowRuntime, source: Any) -> int:
    """One scheduled poll: read from the saved cursor, commit each batch with its cursor."""
    assert hub.store is not None
    cursor = await hub.store.cursor(fr.spec.name)
    n = 0
    async for batch in source.poll(cursor):
        await hub.ingest_batch(fr.spec.name, batch)
        n += len(batch.records)
    if n:
        log.info("polled %s: %d records", fr.spec.name, n, extra={"flow": fr.spec.name})
    return n


async def consume(hub: Hub, fr: FlowRuntime, source: Any) -> None:
    """Run a streaming source forever; restart it with backoff when it fails (a lost connection)."""
    delay = 0.5

    async def emit(batch: Batch) -> None:
        await hub.ingest_batch(fr.spec.name, batch)

    while True:
        try:
            await source.stream(emit)
            delay = 0.5
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "source of %s stopped (%s: %s); reconnecting in %.1fs",
                fr.spec.name,
                type(exc).__name__,
                exc,
                delay,
                extra={"flow": fr.spec.name},
            )
        await asyncio.sleep(delay * (1 + random.random() * 0.2))
        delay = min(delay * 2, 30.0)
