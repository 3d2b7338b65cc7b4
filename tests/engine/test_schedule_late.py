"""One rule for "this schedule is late", asked the same way by alerts, the API, the console and the CLI."""

from __future__ import annotations

import time

import pytest

from patchbay.cli.main import _late as cli_late
from patchbay.config.models import ScheduleTrigger
from patchbay.engine.scheduler import late_after, late_by
from patchbay.server.api.common import Resource
from tests.conftest import eventually
from tests.engine.test_alerts import alert_project, hook_messages, manual_clock

assert manual_clock  # a fixture

CASES = [
    # (schedule, seconds overdue, late?)
    ({"every": "1s"}, 30, False),  # the default tolerance is at least a minute
    ({"every": "1s"}, 90, True),
    ({"every": "10m"}, 300, False),  # one interval
    ({"every": "10m"}, 700, True),
    ({"every": "1s", "late_after": "10s"}, 30, True),  # an explicit late_after is kept, even under a minute
    ({"every": "1d"}, 3000, False),
    ({"every": "1d"}, 3700, True),  # at most an hour
]


@pytest.mark.parametrize(("schedule", "over", "late"), CASES)
def test_every_reader_gives_the_same_answer(schedule, over, late):
    spec = ScheduleTrigger.model_validate(schedule)
    now = time.time()
    due = now - over
    assert bool(late_by(spec, due, now)) is late
    flow = type("Flow", (), {"trigger": type("T", (), {"schedule": spec})(), "enabled": True})()
    assert bool(Resource._late_s(flow, {"next_due_at": due}, now)) is late  # type: ignore[arg-type]
    assert bool(cli_late({"next_due_at": due}, spec)) is late


def test_the_default_tolerance_is_one_interval_between_a_minute_and_an_hour():
    assert late_after(ScheduleTrigger.model_validate({"every": "5s"})) == 60.0
    assert late_after(ScheduleTrigger.model_validate({"every": "15m"})) == 900.0
    assert late_after(ScheduleTrigger.model_validate({"every": "1d"})) == 3600.0
    assert late_after(ScheduleTrigger.model_validate({"every": "5s", "late_after": "2s"})) == 2.0


FREQUENT = """
purpose: a tick every second reaches the CRM
owner: ops
trigger:
  schedule: {every: 1s}
destinations:
  - {name: crm, system: crm, path: /ticks}
alerts:
  - {when: schedule_late, notify: [ops-hook]}
"""


async def test_alerts_use_the_same_rule(tmp_path, sink, start_hub, manual_clock):
    sink.default = 200
    hub = await start_hub(alert_project(tmp_path, sink.url, extra={"flows/frequent.yaml": FREQUENT}))
    alerts = hub.hub.alert_manager
    assert alerts is not None

    async def ran() -> bool:
        return bool(await hub.store.read(_runs) >= 1)

    await eventually(ran, what="the first tick")
    await alerts.evaluate(now=time.time() + 30)  # 30 s late on a 1 s schedule: within the minute
    assert [f.subject for f in alerts.active] == []
    await alerts.evaluate(now=time.time() + 120)
    assert [f.subject for f in alerts.active] == ["frequent"]
    await eventually(lambda: _one(hook_messages(sink)), what="the late alert")


def _runs(conn) -> int:
    row = conn.execute("SELECT runs FROM schedules WHERE flow='frequent'").fetchone()
    return int(row[0]) if row else 0


async def _one(messages) -> bool:
    return len(messages) == 1
