"""Split then dedupe through a real hub: each element claims its own key, so a repeated key inside one event
(or one an element of an earlier event holds) drops that element alone, with the reason; its siblings go on."""

from __future__ import annotations

import asyncio

from tests.conftest import Sink, lead_project

SPLIT_DEDUPE = """
  - name: items
    split: items
  - name: once
    dedupe: {key: sku, within: 1h}
"""


async def _delivered(sink: Sink, n: int) -> list[str]:
    await sink.wait_for(n)
    await asyncio.sleep(0.3)  # nothing more arrives
    assert len(sink.received) == n, [r.body for r in sink.received]
    return sorted(r.body["sku"] for r in sink.received)


async def test_a_repeated_key_drops_only_the_repeating_element(tmp_path, sink: Sink, start_hub) -> None:
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=SPLIT_DEDUPE))
    status, first = await rh.post(
        "/hooks/lead-capture", {"items": [{"sku": "A"}, {"sku": "B"}, {"sku": "A"}]}
    )
    assert status == 202
    assert await _delivered(sink, 2) == ["A", "B"]
    run = await rh.run(first["event_id"])
    eid = first["event_id"]
    assert run["status"] in ("pending", "delivered")
    reason = f"once: duplicate of run {eid} (element 0)"
    assert {"step": "once", "kind": "dedupe", "element": "2", "dropped": reason} in run["trace"]
    assert f"element 2: {reason}" in (run["reason"] or "")

    # a later event: B is held by element 1 of the first run, C is new
    status, second = await rh.post("/hooks/lead-capture", {"items": [{"sku": "B"}, {"sku": "C"}]})
    assert status == 202
    assert await _delivered(sink, 3) == ["A", "B", "C"]
    run2 = await rh.run(second["event_id"])
    assert {
        "step": "once",
        "kind": "dedupe",
        "element": "0",
        "dropped": f"once: duplicate of run {eid} (element 1)",
    } in run2["trace"]

    # every element a duplicate: the event is filtered with the reasons
    status, third = await rh.post("/hooks/lead-capture", {"items": [{"sku": "C"}, {"sku": "A"}]})
    assert status == 202
    run3 = await rh.run(third["event_id"])
    assert run3["status"] == "filtered"
    assert "element 1: once: duplicate of run " + eid + " (element 0)" in run3["reason"]
    await asyncio.sleep(0.3)
    assert len(sink.received) == 3


async def test_an_element_quarantined_after_the_dedupe_does_not_take_its_key(
    tmp_path, sink: Sink, start_hub
) -> None:
    steps = SPLIT_DEDUPE + "  - validate:\n      qty: {required: true}\n"
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=steps))
    status, first = await rh.post("/hooks/lead-capture", {"items": [{"sku": "A", "qty": 1}, {"sku": "B"}]})
    assert status == 202
    assert await _delivered(sink, 1) == ["A"]
    run = await rh.run(first["event_id"])
    assert [(d["destination"], d["status"]) for d in run["deliveries"] if d["status"] == "dead"] == [
        ("quarantine:validate", "dead")
    ]
    # B was quarantined, so it did not claim its key: the corrected B passes; A is still a duplicate
    status, fixed = await rh.post(
        "/hooks/lead-capture", {"items": [{"sku": "B", "qty": 2}, {"sku": "A", "qty": 1}]}
    )
    assert status == 202
    assert await _delivered(sink, 2) == ["A", "B"]
    run2 = await rh.run(fixed["event_id"])
    assert {
        "step": "once",
        "kind": "dedupe",
        "element": "1",
        "dropped": f"once: duplicate of run {first['event_id']} (element 0)",
    } in run2["trace"]
