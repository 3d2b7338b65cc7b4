"""Waiting on an event with a deadline, without Python 3.11's `asyncio.wait_for` swallowing a cancel.

On 3.11, `wait_for(event.wait(), t)` returns normally when the event is set in the same tick as the
task is cancelled, so a loop built on it can miss its stop and run forever. `asyncio.timeout` has no
such race.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True when it was set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, seconds)):
            await event.wait()
        return True
    except TimeoutError:
        return False
