"""The Store protocol's monitoring block on the SQLite store: source health, alert state, the snapshot."""

from __future__ import annotations

import time

import pytest

from patchbay.store.base import AlertChange, NewEvent, SourceState
from patchbay.store.sqlite import SqliteStore


def event(eid: str) -> NewEvent:
    return NewEvent(eid, "_alerts", time.time(), b"{}", "h", f"k-{eid}", "filtered")


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "store.db")
    yield s
    await s.close()


async def test_source_states_round_trip_and_upsert(store):
    assert await store.source_states() == {}
    first = SourceState("orders", "failing", 1, "polling x: HTTP 503", 10.0, 10.0)
    await store.set_source_state(first)
    await store.set_source_state(SourceState("orders", "paused", 2, "polling x: HTTP 401", 11.0, 11.0))
    await store.set_source_state(SourceState("nightly", "active", 0, None, 5.0, 5.0))
    got = await store.source_states()
    assert got["orders"] == SourceState("orders", "paused", 2, "polling x: HTTP 401", 11.0, 11.0)
    assert got["nightly"].state == "active" and got["nightly"].error is None


async def test_an_alert_message_and_its_state_commit_together_or_not_at_all(store):
    now = time.time()
    accepted = await store.accept_alert(
        event("e1"), AlertChange("hub/failures", "f/d", "firing", now, "", now)
    )
    snap = await store.snapshot(now, None, 0.0, [], set(), None, timeout=5)
    row = snap.states[("hub/failures", "f/d")]
    assert (row["state"], row["event_id"], row["fired_at"], row["cleared_at"]) == (
        "firing",
        accepted.event_id,
        now,
        None,
    )

    bad = AlertChange("hub/failures", "f/d2", None, now, "", now)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="NOT NULL"):
        await store.accept_alert(event("e2"), bad)
    count = await store.read(lambda c: c.execute("SELECT COUNT(*) FROM events WHERE id='e2'").fetchone()[0])
    assert count == 0, "the message is not stored without the rule's state"


async def test_a_snapshot_past_its_timeout_raises_and_the_next_one_reads(store):
    await store.set_source_state(SourceState("orders", "stopped", 1, "no such table", 1.0, 1.0))
    with pytest.raises(TimeoutError):
        await store.snapshot(time.time(), None, 0.0, [], set(), None, timeout=0)
    snap = await store.snapshot(time.time(), None, 0.0, [], set(), None, timeout=5)
    assert snap.sources["orders"].state == "stopped"
