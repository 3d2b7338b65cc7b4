"""A schedule's run that started and did not finish is fired again as the same tick, once, whatever
`catch_up` says; a finished one is not fired again. (Across nodes: tests/test_leases_functional.py.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from patchbay.config.models import ScheduleTrigger
from patchbay.engine.scheduler import ScheduleRunner
from patchbay.engine.sources import SourceHealth, _unrecorded
from patchbay.store.sqlite import SqliteStore


async def fired_first(tmp_path: Path, row: dict[str, float], catch_up: str) -> float:
    store = SqliteStore(tmp_path / "store.db")
    await store.update_schedule("pull", row)
    got: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def job(due: float) -> None:
        if not got.done():
            got.set_result(due)

    spec = ScheduleTrigger.model_validate({"every": "1h", "catch_up": catch_up})
    runner = ScheduleRunner("pull", spec, store, job, SourceHealth("pull", _unrecorded))
    runner.start()
    try:
        return await asyncio.wait_for(got, 5)
    finally:
        await runner.stop()
        await store.close()


@pytest.mark.parametrize("catch_up", ["once", "skip"])
async def test_a_run_cut_short_is_fired_again_as_its_own_tick(tmp_path: Path, catch_up: str) -> None:
    now = time.time()
    tick = now - 120.0
    row = {
        "last_due_at": tick,
        "last_started_at": tick + 0.5,
        "last_finished_at": tick - 3600,
        "next_due_at": now + 3000,
    }
    assert await fired_first(tmp_path, row, catch_up) == tick  # its dedupe key, `tick:<due>`, is the same


async def test_a_finished_run_is_not_fired_again(tmp_path: Path) -> None:
    now = time.time()
    row = {
        "last_due_at": now - 10,
        "last_started_at": now - 10,
        "last_finished_at": now - 9,
        "next_due_at": now + 0.2,
    }
    assert await fired_first(tmp_path, row, "once") == pytest.approx(now + 0.2)
