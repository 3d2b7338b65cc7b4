"""Intake yields to delivery: while a destination falls behind, webhooks are taken a few at a time."""

from __future__ import annotations

import asyncio
from typing import Any

from patchbay.engine.intake import Intake
from tests.conftest import eventually, lead_project


def lead(n: int) -> dict[str, str]:
    return {"email": f"lead-{n}@example.com", "first_name": f"L{n}"}


async def test_while_a_destination_falls_behind_webhooks_are_taken_a_few_at_a_time_and_none_is_refused(
    tmp_path, sink, start_hub
):
    async def slow(request: Any, rec: Any) -> int:
        await asyncio.sleep(0.25)
        return 201

    sink.default = slow
    root = lead_project(tmp_path, sink.url, delivery={"max_concurrency": 1}, hub={"intake_when_behind": 3})
    hub = await start_hub(root)

    # How many webhooks the hub works on at once, seen at the store: each accept lingers 50 ms there.
    inside, peaks = 0, []
    accept = hub.store.accept

    async def lingering(event: Any) -> Any:
        nonlocal inside
        inside += 1
        peaks[-1] = max(peaks[-1], inside)
        try:
            await asyncio.sleep(0.05)
            return await accept(event)
        finally:
            inside -= 1

    hub.store.accept = lingering

    async def burst(first: int) -> list[int]:
        peaks.append(0)
        got = await asyncio.gather(*(hub.post("/hooks/lead-capture", lead(first + i)) for i in range(12)))
        return [status for status, _ in got]

    def gauge() -> float:
        return hub.hub.metrics.registry.get_sample_value("patchbay_intake_limited") or 0.0

    # Nothing due: a burst is taken as it comes.
    assert await burst(0) == [202] * 12
    assert peaks[-1] > 3
    # Twelve due at one a time, 250 ms each: the worker holds four and finds more due. Once what it reads has
    # waited over a second since it came due (its third read, at 1.5 s), the backlog grows: it is behind.
    await asyncio.sleep(0.5)
    assert not hub.hub.intake.limited  # a backlog that exists, not yet one that grows
    await eventually(lambda: hub.hub.intake.limited, what="the destination reported behind")
    assert hub.hub.intake.behind == {"lead-capture/crm"} and gauge() == 1.0
    assert await burst(100) == [202] * 12  # none refused...
    assert peaks[-1] <= 3  # ...but taken three at a time
    # Caught up: webhooks are taken as they come again.
    await sink.wait_for(24, timeout=20)
    await eventually(lambda: not hub.hub.intake.limited, what="the destination caught up")
    assert gauge() == 0.0
    assert await burst(200) == [202] * 12
    assert peaks[-1] > 3
    await sink.wait_for(36, timeout=20)
    assert await hub.count() == 36


async def test_another_processs_report_lasts_its_time_unless_said_again_and_this_processs_until_caught_up() -> (
    None
):
    changes: list[bool] = []
    intake = Intake(2, changes.append)
    intake.report("lead-capture/crm on w1", True, ttl_s=0.3)
    assert intake.limited and changes == [True]
    await asyncio.sleep(0.2)
    intake.report("lead-capture/crm on w1", True, ttl_s=0.3)  # said again: it holds
    await asyncio.sleep(0.2)
    assert intake.behind == {"lead-capture/crm on w1"}
    intake.report("lead-capture/crm", True)  # this process's own
    await asyncio.sleep(0.35)
    intake.expire()  # the other's report ran out; this process's own holds until it caught up
    assert intake.behind == {"lead-capture/crm"} and changes == [True]
    assert await intake.enter() is True
    intake.leave()
    intake.report("lead-capture/crm", False)
    assert not intake.limited and changes == [True, False]
    assert await intake.enter() is False
    intake.report("orders/erp on w2", True, ttl_s=0.05)
    await asyncio.sleep(0.1)
    assert await intake.enter() is False  # expired: taken as it comes, the gauge down again
    assert changes == [True, False, True, False]
