"""aggregate and dedupe through a real hub: webhooks in, one record per window and key out to a real sink."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from tests.conftest import RunningHub, Sink, eventually, lead_project

AGGREGATE = """
  - name: daily
    aggregate:
      by: shop
      window: 1s
      time: at
      values:
        revenue: {sum: amount}
        orders: {count: true}
        customers: {distinct: lower(email)}
        smallest: {min: amount}
        largest: {max: amount}
        average: {avg: amount}
  - map:
      shop: key
      day: window.start
      revision: window.revision
      revenue: revenue
      orders: orders
      customers: customers
      smallest: smallest
      largest: largest
      average: average
"""


def next_window(now: float | None = None) -> float:
    """The start of a 1s window that opens within the next two seconds (and so is not late yet)."""
    return math.ceil(time.time() if now is None else now) + 1.0


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


async def post_all(rh: RunningHub, bodies: list[dict[str, Any]]) -> list[Any]:
    out = await asyncio.gather(*(rh.post("/hooks/lead-capture", b) for b in bodies))
    assert all(status == 202 for status, _ in out), out
    return [body for _, body in out]


async def test_each_window_and_key_is_emitted_once_with_its_totals(tmp_path, sink: Sink, start_hub) -> None:
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=AGGREGATE))
    t0 = next_window()
    bodies = [
        {"shop": "paris", "amount": 19.99, "email": "A@x.com", "at": iso(t0 + 0.1)},
        {"shop": "paris", "amount": 5, "email": "a@x.com", "at": iso(t0 + 0.5)},
        {"shop": "paris", "amount": 0.01, "email": "b@x.com", "at": iso(t0 + 0.9)},
        {"shop": "lyon", "amount": 7.5, "email": "c@x.com", "at": iso(t0 + 0.2)},
        {"shop": "lyon", "amount": 1, "email": "c@x.com", "at": iso(t0 + 1.2)},  # the next window
    ]
    accepted = await post_all(rh, bodies)
    for a in accepted:  # counted, not delivered: the window's record is
        run = await rh.run(a["event_id"])
        assert run["status"] == "aggregated" and run["deliveries"] == []
        assert run["trace"][-1]["kind"] == "aggregate" and "window" in run["trace"][-1]
    assert rh.hub.windows is not None
    await eventually(lambda: _open(rh, 3), what="three open windows")
    await eventually(lambda: _api_open(rh, 3), what="the API's open_windows at 3")

    await sink.wait_for(3, timeout=10)
    got = {(r.body["shop"], r.body["day"]): r.body for r in sink.received}
    assert len(sink.received) == 3
    paris = next(v for (shop, _), v in got.items() if shop == "paris")
    assert paris["revenue"] == 25.0 and paris["orders"] == 3 and paris["customers"] == 2
    assert (paris["smallest"], paris["largest"], paris["revision"]) == (0.01, 19.99, 1)
    assert paris["average"] == round(25.0 / 3, 6)
    lyon = sorted((v for (shop, _), v in got.items() if shop == "lyon"), key=lambda v: v["day"])
    assert [(v["revenue"], v["orders"]) for v in lyon] == [(7.5, 1), (1, 1)]
    assert isinstance(lyon[1]["revenue"], int)  # a sum of whole numbers stays whole

    # The window's record is a run of its own: its trace says which window, its key is the window's. The
    # sink answers before the hub records the attempt: the third run is "delivered" a moment after.
    async def delivered() -> list[dict[str, Any]]:
        return [r for r in await rh.store.list_runs(_filter("lead-capture")) if r["status"] == "delivered"]

    async def three_delivered() -> bool:
        return len(await delivered()) == 3

    await eventually(three_delivered, what="three delivered runs")
    emitted = await delivered()
    run = await rh.run(emitted[0]["id"])
    assert run["trace"][0]["kind"] == "aggregate" and run["trace"][0]["emitted"]["revision"] == 1
    assert run["meta"]["after_step"] == "daily"
    await eventually(lambda: _open(rh, 0), what="no open windows")
    assert 'patchbay_windows_open{flow="lead-capture"} 0.0' in rh.hub.metrics.render().decode()

    # Closing again emits nothing more.
    assert await rh.hub.windows.close_due(time.time() + 10) == 0
    await asyncio.sleep(0.3)
    assert len(sink.received) == 3


async def test_a_record_late_for_its_window_is_quarantined_with_the_reason(tmp_path, sink, start_hub) -> None:
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=AGGREGATE))
    [late] = await post_all(
        rh, [{"shop": "paris", "amount": 1, "email": "a@x.com", "at": iso(time.time() - 5)}]
    )
    run = await rh.run(late["event_id"])
    assert run["status"] == "quarantined"
    assert run["reason"].startswith("daily: late for window") and "too_late: revise" in run["reason"]
    assert [d for d in await rh.store.list_dead("lead-capture")][0]["kind"] == "quarantine"


async def test_a_late_record_revises_the_window_when_asked(tmp_path, sink, start_hub) -> None:
    steps = AGGREGATE.replace("window: 1s", "window: 1s\n      too_late: revise\n      keep: 1h")
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=steps))
    t0 = next_window()
    await post_all(rh, [{"shop": "paris", "amount": 10, "email": "a@x.com", "at": iso(t0 + 0.5)}])
    await sink.wait_for(1, timeout=10)
    [late] = await post_all(rh, [{"shop": "paris", "amount": 2, "email": "b@x.com", "at": iso(t0 + 0.6)}])
    assert (await rh.run(late["event_id"]))["status"] == "aggregated"
    await sink.wait_for(2, timeout=10)
    first, revised = sorted((r.body for r in sink.received), key=lambda b: b["revision"])
    assert (first["revenue"], first["orders"], first["revision"]) == (10, 1, 1)
    assert (revised["revenue"], revised["orders"], revised["revision"]) == (12, 2, 2)
    assert first["day"] == revised["day"]


async def test_a_window_that_closed_while_the_hub_was_down_is_emitted_at_start(
    tmp_path, sink, start_hub
) -> None:
    root = lead_project(tmp_path, sink.url, steps=AGGREGATE)
    rh = await start_hub(root)
    t0 = next_window()
    await post_all(rh, [{"shop": "paris", "amount": 3, "email": "a@x.com", "at": iso(t0 + 0.5)}])
    await rh.runner.cleanup()
    await rh.hub.stop()
    while time.time() < t0 + 1.2:  # the window closes while nothing runs
        await asyncio.sleep(0.1)
    assert sink.received == []
    again = await start_hub(root)
    await sink.wait_for(1, timeout=10)
    await asyncio.sleep(0.5)
    assert [r.body["revenue"] for r in sink.received] == [3]
    assert await again.hub.windows.close_due(time.time()) == 0  # type: ignore[union-attr]


DEDUPE = """
  - name: once
    dedupe: {key: lower(email), within: 1h}
"""


async def test_dedupe_lets_one_of_many_concurrent_posts_through(tmp_path, sink, start_hub) -> None:
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=DEDUPE))
    bodies = [{"email": "Dup@x.com" if i % 2 else "dup@x.com", "n": i} for i in range(8)]
    accepted = await post_all(rh, bodies)
    await sink.wait_for(1)
    runs = [await rh.run(a["event_id"]) for a in accepted]
    passed = [r for r in runs if r["status"] != "filtered"]
    assert len(passed) == 1
    for r in runs:
        if r is passed[0]:
            continue
        assert r["reason"] == f"once: duplicate of run {passed[0]['id']}"
        assert r["trace"][-1] == {"step": "once", "kind": "dedupe", "dropped": r["reason"]}
    [other] = await post_all(rh, [{"email": "other@x.com"}])
    await sink.wait_for(2)
    assert (await rh.run(other["event_id"]))["status"] in ("pending", "delivered")
    await asyncio.sleep(0.2)
    assert len(sink.received) == 2


async def _api_open(rh: RunningHub, n: int) -> bool:
    import aiohttp

    from patchbay.security.tokens import create_token
    from patchbay.store.base import Actor

    token, _ = await create_token(rh.store, "t", ["flows:read"], None, Actor("test"))
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s, s.get(rh.url + "/api/v1/flows", headers=headers) as r:
        assert r.status == 200, await r.text()
        [flow] = (await r.json())["flows"]
    return bool(flow["open_windows"] == n)


async def _open(rh: RunningHub, n: int) -> bool:
    return sum((await rh.store.open_windows()).values()) == n


def _filter(flow: str) -> Any:
    from patchbay.store.base import RunFilter

    return RunFilter(flow=flow, limit=100)


async def test_dedupe_before_aggregate_counts_a_resent_order_once(tmp_path, sink, start_hub) -> None:
    steps = "\n  - name: once\n    dedupe: {key: id, within: 1h}" + AGGREGATE
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=steps))
    t0 = next_window()
    order = {"id": "ord-1", "shop": "paris", "amount": 10, "email": "a@x.com", "at": iso(t0 + 0.5)}
    other = {**order, "id": "ord-2", "amount": 5}
    first, again, second = await post_all(rh, [order, order, other])  # new message ids: not webhook dupes
    statuses = sorted([(await rh.run(a["event_id"]))["status"] for a in (first, again, second)])
    assert statuses == ["aggregated", "aggregated", "filtered"]
    await sink.wait_for(1, timeout=10)
    [window] = [r.body for r in sink.received]
    assert (window["revenue"], window["orders"]) == (15, 2)


async def test_a_quarantined_window_record_replays_from_after_its_aggregate(
    tmp_path, sink, start_hub
) -> None:
    from patchbay.engine.replay import replay
    from patchbay.store.base import Actor

    strict = AGGREGATE + "  - validate:\n      approved_by: {required: true}\n"
    root = lead_project(tmp_path, sink.url, steps=strict)
    rh = await start_hub(root)
    t0 = next_window()
    await post_all(rh, [{"shop": "paris", "amount": 4, "email": "a@x.com", "at": iso(t0 + 0.5)}])

    async def quarantined() -> list[Any]:
        runs = await rh.store.list_runs(_filter("lead-capture"))
        return [r for r in runs if r["status"] == "quarantined"]

    await eventually(lambda: _truthy(quarantined()), timeout=10, what="the window record quarantined")
    [bad] = await quarantined()
    await rh.runner.cleanup()
    await rh.hub.stop()

    lead_project(tmp_path, sink.url, steps=AGGREGATE)  # the rule is fixed
    again = await start_hub(root)
    pipelines = {name: fr.pipeline for name, fr in again.hub.flows.items()}
    rep = await replay(again.store, pipelines, [bad["id"]], None, Actor("test"))
    assert rep.requeued == [bad["id"]]
    await sink.wait_for(1, timeout=10)
    [window] = [r.body for r in sink.received]
    assert (window["shop"], window["revenue"], window["orders"]) == ("paris", 4, 1)  # not counted again
    run = await again.run(bad["id"])
    assert run["trace"][0]["kind"] == "aggregate" and run["trace"][0]["emitted"]["records"] == 1
    assert [s["kind"] for s in run["trace"][1:]] == ["map", "route"]


async def _truthy(aw: Any) -> bool:
    return bool(await aw)


async def test_hopping_windows_emit_each_window_once(tmp_path, sink, start_hub) -> None:
    steps = AGGREGATE.replace("window: 1s", "window: 2s\n      hop: 1s")
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=steps))
    t0 = next_window()
    bodies = [
        {"shop": "paris", "amount": 1, "email": "a@x.com", "at": iso(t0 + 0.5)},  # windows from t0-1 and t0
        {"shop": "paris", "amount": 2, "email": "b@x.com", "at": iso(t0 + 1.5)},  # windows from t0 and t0+1
    ]
    [first, _] = await post_all(rh, bodies)
    assert len((await rh.run(first["event_id"]))["trace"][-1]["windows"]) == 2
    await sink.wait_for(3, timeout=10)
    await asyncio.sleep(0.5)
    got = sorted((r.body["day"], r.body["revenue"], r.body["orders"]) for r in sink.received)
    assert [(revenue, orders) for _, revenue, orders in got] == [(1, 1), (3, 2), (2, 1)]


async def test_a_window_whose_record_cannot_be_built_does_not_hold_the_others(
    tmp_path, sink, start_hub
) -> None:
    rh = await start_hub(lead_project(tmp_path, sink.url, steps=AGGREGATE))
    step = rh.hub.flows["lead-capture"].spec.steps[0].step
    real = step.window_record

    def broken(w: Any) -> Any:
        if w.key == '"bad"':
            raise ZeroDivisionError("a bug")
        return real(w)

    step.window_record = broken
    t0 = next_window()
    await post_all(
        rh, [{"shop": s, "amount": 1, "email": "a@x.com", "at": iso(t0 + 0.5)} for s in ("bad", "good")]
    )
    await sink.wait_for(1, timeout=10)
    assert [r.body["shop"] for r in sink.received] == ["good"]
    step.window_record = real  # fixed: the next round emits it
    await sink.wait_for(2, timeout=10)
    assert sorted(r.body["shop"] for r in sink.received) == ["bad", "good"]
