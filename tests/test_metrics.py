"""/metrics of a running hub: queue depth, oldest pending age, step latencies, retries, lag, alerts."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from patchbay.engine.alerts import AlertManager
from patchbay.store.sqlite import tx_schedule
from tests.conftest import eventually, lead_project, write_project

FAST = {"timeout_s": 0.5, "retry": {"schedule": ["100ms"] * 10, "jitter": 0}}


@pytest.fixture(autouse=True)
def manual_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store snapshot is refreshed when the test says so (evaluate), not every 5 s."""
    monkeypatch.setattr(AlertManager, "interval_s", 3600.0)


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def lead(n: int) -> dict[str, str]:
    return {"email": f"lead-{n}@example.com", "first_name": f"L{n}"}


async def test_queue_depth_and_oldest_age_of_a_paused_destination(tmp_path, sink, start_hub):
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    await hub.hub.set_state("lead-capture", "crm", "paused")
    for n in range(4):
        status, _ = await hub.post("/hooks/lead-capture", lead(n))
        assert status == 202
    await hub.hub.alert_manager.evaluate()
    m = await scrape(hub.url)
    crm = {"flow": "lead-capture", "destination": "crm"}
    assert m[series("patchbay_delivery_queue_depth", **crm)] == 4
    assert m[series("patchbay_delivery_oldest_pending_age_seconds", **crm)] > 0
    assert m[series("patchbay_destination_paused", **crm)] == 1
    assert time.time() - m[series("patchbay_store_snapshot_timestamp_seconds")] < 5
    # Each of the two steps ran once per event; routing has no duration of its own.
    for step in ("normalise", "validate"):
        assert m[series("patchbay_step_duration_seconds_count", flow="lead-capture", step=step)] == 4
        assert (
            m[series("patchbay_step_duration_seconds_bucket", flow="lead-capture", step=step, le="+Inf")] == 4
        )
    assert series("patchbay_step_duration_seconds_count", flow="lead-capture", step="route") not in m

    await hub.hub.set_state("lead-capture", "crm", "active")
    await sink.wait_for(4)

    async def drained() -> bool:
        await hub.hub.alert_manager.evaluate()
        m = await scrape(hub.url)
        return m[series("patchbay_delivery_queue_depth", **crm)] == 0

    await eventually(drained, what="queue drained")
    m = await scrape(hub.url)
    assert m[series("patchbay_delivery_oldest_pending_age_seconds", **crm)] == 0
    assert m[series("patchbay_delivery_attempts_total", outcome="success", **crm)] == 4


async def test_retries_are_counted_per_destination(tmp_path, sink, start_hub):
    sink.script = [503, 503]
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    await hub.post("/hooks/lead-capture", lead(1))
    await sink.wait_for(1)

    async def counted() -> bool:
        await hub.hub.alert_manager.evaluate()
        m = await scrape(hub.url)
        return m.get(series("patchbay_delivery_retries_total", flow="lead-capture", destination="crm")) == 2

    await eventually(counted, what="two retries counted")
    m = await scrape(hub.url)
    crm = {"flow": "lead-capture", "destination": "crm"}
    assert m[series("patchbay_delivery_attempts_total", outcome="transient", **crm)] == 2
    assert m[series("patchbay_delivery_latency_seconds_count", **crm)] == 3


HOURLY = """
purpose: an hourly tick reaches the CRM
owner: ops
trigger:
  schedule: {every: 1h}
destinations:
  - {name: crm, system: crm, path: /ticks}
"""


async def test_schedule_lag_and_alerts_firing(tmp_path, sink, start_hub):
    root = lead_project(
        tmp_path,
        sink.url,
        delivery=FAST,
        hub={
            "alerts": [
                {"when": "schedule_late", "notify": ["crm"]},
                {"when": "destination_paused", "notify": ["crm"]},
            ]
        },
    )
    write_project(root, {"flows/hourly.yaml": HOURLY})
    hub = await start_hub(root)
    await sink.wait_for(1)  # the first tick ran at start
    await hub.hub.alert_manager.evaluate()
    m = await scrape(hub.url)
    assert m[series("patchbay_schedule_lag_seconds", flow="hourly")] == 0
    assert m[series("patchbay_alerts_firing", kind="schedule_late", flow="hourly")] == 0

    # The hub was stuck: the run due 2 hours ago never started.
    stuck = time.time() - 7200
    await hub.store.write(lambda c: tx_schedule(c, "hourly", next_due_at=stuck))
    await hub.hub.alert_manager.evaluate()
    m = await scrape(hub.url)
    lag = m[series("patchbay_schedule_lag_seconds", flow="hourly")]
    assert 7190 < lag < 7300
    labels: dict[str, Any] = {"kind": "schedule_late", "flow": "hourly"}
    assert m[series("patchbay_alerts_firing", **labels)] == 1
    assert m[series("patchbay_alerts_firing", kind="destination_paused", flow="lead-capture")] == 0


async def test_a_postgres_store_counts_its_statements_round_trips_and_transactions(tmp_path, sink, start_hub):
    from tests.conftest import postgres_url

    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST, hub={"store": postgres_url()}))
    for n in range(3):
        status, _ = await hub.post("/hooks/lead-capture", lead(n))
        assert status == 202
    await sink.wait_for(3)
    m = await scrape(hub.url)
    for what in ("statements", "round_trips", "transactions"):
        assert m[series(f"patchbay_store_{what}_total")] >= 3  # the three accepts at least
