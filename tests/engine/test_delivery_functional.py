"""Delivery policy against a real HTTP destination: retries, dead letters, pause/resume, fan-out."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.engine.replay import replay
from patchbay.store.base import Actor
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, eventually, lead_project

FAST = {"timeout_s": 0.5, "retry": {"schedule": ["100ms", "100ms", "100ms", "100ms"], "jitter": 0}}


def lead(n: int) -> dict[str, str]:
    return {"email": f"lead-{n}@example.com", "first_name": f"L{n}"}


@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", SECRET_TOKEN)
    return CliRunner()


async def test_503_then_429_then_timeout_then_201_is_delivered_with_four_attempts(tmp_path, sink, start_hub):
    async def slow(request, rec):
        await asyncio.sleep(1.0)
        return 201

    sink.script = [503, (429, {"Retry-After": "1"}, "slow down"), slow, 201]
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    _, body = await hub.post("/hooks/lead-capture", lead(1))
    await sink.wait_for(1, timeout=10)

    async def done() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "delivered"

    await eventually(done, what="run delivered")
    run = await hub.run(body["event_id"])
    [d] = run["deliveries"]
    attempts = d["attempts_log"]
    assert [a["status_code"] for a in attempts] == [503, 429, None, 201]
    assert [a["outcome"] for a in attempts] == ["transient", "transient", "transient", "success"]
    assert "timed out" in attempts[2]["error"]
    assert attempts[2]["started_at"] - attempts[1]["started_at"] >= 0.95  # Retry-After: 1 honoured
    # One idempotency key for every attempt, and the credential was sent.
    keys = {r.headers["Idempotency-Key"] for r in sink.received}
    assert keys == {f"{body['event_id']}.crm"}
    assert all(r.headers["Authorization"] == f"Bearer {SECRET_TOKEN}" for r in sink.received)
    assert sink.received[0].body == {
        "properties": {"email": "lead-1@example.com", "firstname": "L1", "lead_source": "website"}
    }


async def test_400_dead_letter_then_fix_config_then_replay(tmp_path, sink, start_hub, cli_env):
    def by_path(request, rec):
        return (400, {}, '{"error":"unknown field properties.lead_source"}') if "wrong" in rec.path else 201

    sink.default = by_path
    root = lead_project(tmp_path, sink.url, delivery=FAST, dest={"path": "/wrong"})
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/lead-capture", lead(1))

    async def dead() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "dead"

    await eventually(dead, what="dead letter")
    run = await hub.run(body["event_id"])
    [d] = run["deliveries"]
    assert d["attempts"] == 1  # a 400 is not retried
    assert "unknown field" in d["attempts_log"][0]["excerpt"]

    res = cli_env.invoke(main, ["dead", "-p", str(root)])
    assert res.exit_code == 0 and body["event_id"] in res.output and "HTTP 400" in res.output

    # Fix the config: the right path. Replay re-runs the flow as it is configured now.
    flow = root / "flows" / "lead-capture.yaml"
    flow.write_text(flow.read_text().replace("/wrong", "/contacts"))
    res = cli_env.invoke(main, ["replay", body["event_id"], "-p", str(root)])
    assert res.exit_code == 0, res.output
    assert f"requeued {body['event_id']}" in res.output

    # The replay stored the request rendered by the fixed flow; the running hub sends it within a second.
    await sink.wait_for(1)

    async def delivered() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "delivered"

    await eventually(delivered, what="delivered after replay")
    run = await hub.run(body["event_id"])
    codes = [a["status_code"] for a in run["deliveries"][0]["attempts_log"]]
    assert codes == [400, 201]
    assert sink.received[-1].path == "/contacts"


async def test_401_pauses_destination_until_resume_then_all_in_order(tmp_path, sink, start_hub, cli_env):
    sink.script = [401]
    root = lead_project(tmp_path, sink.url, delivery={**FAST, "max_concurrency": 1})
    hub = await start_hub(root)
    ids = []
    for n in range(5):
        _, body = await hub.post("/hooks/lead-capture", lead(n))
        ids.append(body["event_id"])

    async def paused() -> bool:
        rows = await hub.store.read(lambda c: c.execute("SELECT state FROM destinations").fetchall())
        return [r[0] for r in rows] == ["paused"]

    await eventually(paused, what="destination paused")
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1  # later events wait; they do not fail
    runs = [await hub.run(i) for i in ids]
    assert {r["status"] for r in runs} == {"pending"}

    res = cli_env.invoke(main, ["resume", "lead-capture", "crm", "-p", str(root)])
    assert res.exit_code == 0, res.output
    await sink.wait_for(5)
    emails = [r.body["properties"]["email"] for r in sink.received[1:]]
    assert emails == [f"lead-{n}@example.com" for n in range(5)]  # in order of arrival


async def test_a_pause_lets_go_at_once_of_a_claim_waiting_for_a_slot_so_order_holds_after_resume(
    tmp_path, sink, start_hub
):
    """With one slot, a second sender holds the next delivery's claim while it waits for the slot. A pause lets
    that claim go at once: kept until the slot freed, the feed could take the slot back first, and the claim
    was then sent first after the resume, ahead of older deliveries (a CI failure of the test above)."""
    gate = asyncio.Event()

    async def held(request, rec):
        await gate.wait()
        return 201

    sink.script = [held]
    root = lead_project(tmp_path, sink.url, delivery={**FAST, "timeout_s": 10, "max_concurrency": 1})
    hub = await start_hub(root)
    for n in range(3):
        await hub.post("/hooks/lead-capture", lead(n))
    worker = hub.hub.flows["lead-capture"].workers["crm"]
    # lead-0 in flight, lead-1 in a sender waiting for the slot, lead-2 queued
    await eventually(
        lambda: worker.inflight == 1 and worker.queue.qsize() == 1 and len(worker.leased) == 3,
        what="one delivery in flight, one waiting for the slot, one queued",
    )
    await hub.hub.set_state("lead-capture", "crm", "paused")
    await asyncio.sleep(0.05)
    assert len(worker.leased) == 1  # only the one in flight is still claimed

    gate.set()
    await sink.wait_for(1)
    await eventually(lambda: worker.inflight == 0 and not worker.leased, what="the answer recorded")
    await asyncio.sleep(0.2)
    assert len(sink.received) == 1  # nothing more goes while paused
    await hub.hub.set_state("lead-capture", "crm", "active")
    await sink.wait_for(3)
    emails = [r.body["properties"]["email"] for r in sink.received]
    assert emails == [f"lead-{n}@example.com" for n in range(3)]


async def test_410_dead_letters_and_disables(tmp_path, sink, start_hub):
    sink.script = [410]
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    _, body = await hub.post("/hooks/lead-capture", lead(1))

    async def disabled() -> bool:
        rows = await hub.store.read(lambda c: c.execute("SELECT state FROM destinations").fetchall())
        return [r[0] for r in rows] == ["disabled"]

    await eventually(disabled, what="disabled")
    assert (await hub.run(body["event_id"]))["status"] == "dead"
    _, body2 = await hub.post("/hooks/lead-capture", lead(2))
    await asyncio.sleep(0.3)
    assert len(sink.received) == 1 and (await hub.run(body2["event_id"]))["status"] == "pending"


async def test_redirect_is_not_followed_by_default(tmp_path, sink, start_hub):
    sink.script = [(302, {"Location": "http://127.0.0.1:9/elsewhere"}, "")]
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    _, body = await hub.post("/hooks/lead-capture", lead(1))

    async def dead() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "dead"

    await eventually(dead, what="dead letter")
    d = (await hub.run(body["event_id"]))["deliveries"][0]
    assert "follow_redirects" in d["last_error"]


async def test_fan_out_each_destination_has_its_own_state(tmp_path, sink, start_hub):
    def by_path(request, rec):
        return 500 if rec.path == "/chat" else 201

    sink.default = by_path
    chat = {
        "name": "chat",
        "system": "crm",
        "path": "/chat",
        "delivery": {**FAST, "retry": {"schedule": ["50ms"]}},
        "body": {"text": "concat('New lead ', properties.email)"},
    }
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST, extra_dests=[chat]))
    _, body = await hub.post("/hooks/lead-capture", lead(7))

    async def settled() -> bool:
        run = await hub.run(body["event_id"])
        return all(d["status"] != "pending" for d in run["deliveries"])

    await eventually(settled, what="both destinations settled")
    run = await hub.run(body["event_id"])
    states = {d["destination"]: (d["status"], d["attempts"]) for d in run["deliveries"]}
    assert states == {"crm": ("delivered", 1), "chat": ("dead", 2)}
    assert run["status"] == "dead"
    chat_bodies = [r.body for r in sink.received if r.path == "/chat"]
    assert chat_bodies[0] == {"text": "New lead lead-7@example.com"}


async def test_routing_when_sends_only_matching_records(tmp_path, sink, start_hub):
    vip = {
        "name": "vip",
        "system": "crm",
        "path": "/vip",
        "when": "ends_with(properties.email, '@bigco.com')",
    }
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST, extra_dests=[vip]))
    await hub.post("/hooks/lead-capture", lead(1))
    await hub.post("/hooks/lead-capture", {"email": "ceo@bigco.com"})
    await sink.wait_for(3)
    assert sorted(r.path for r in sink.received) == ["/contacts", "/contacts", "/vip"]


async def test_a_scheduled_retry_survives_a_restart(tmp_path, sink, start_hub):
    sink.script = [503]
    root = lead_project(tmp_path, sink.url, delivery={**FAST, "retry": {"schedule": ["1s"], "jitter": 0}})
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/lead-capture", lead(1))
    await eventually(lambda: _has_attempt(hub, body["event_id"]), what="first attempt")
    await hub.runner.cleanup()
    await hub.hub.stop()
    # The retry lives in the store, not in a sleeping coroutine: a new hub makes it.
    hub2 = await start_hub(root)
    await sink.wait_for(1, timeout=10)

    async def delivered() -> bool:
        return (await hub2.run(body["event_id"]))["status"] == "delivered"

    await eventually(delivered, what="delivered")
    run = await hub2.run(body["event_id"])
    assert [a["status_code"] for a in run["deliveries"][0]["attempts_log"]] == [503, 201]


async def _has_attempt(hub, event_id: str) -> bool:
    run = await hub.run(event_id)
    return bool(run["deliveries"][0]["attempts_log"])


async def test_rate_limit_spreads_attempts(tmp_path, sink, start_hub):
    hub = await start_hub(
        lead_project(tmp_path, sink.url, delivery={**FAST, "rate_limit_per_s": 10, "max_concurrency": 4})
    )
    for n in range(25):
        await hub.post("/hooks/lead-capture", lead(n))
    await sink.wait_for(25, timeout=10)
    times = sorted(r.at for r in sink.received)
    # A bucket of 10 tokens, then 10/s: 25 attempts need at least 1.5 s.
    assert times[-1] - times[0] >= 1.3


async def test_the_next_request_goes_while_the_last_ones_record_is_written_and_never_two_at_once(
    tmp_path, sink, start_hub
):
    """A sending slot is a request in flight (max_concurrency), not a request and its record: with the
    store's writes held, a second request still goes to the destination, and never two at once."""
    at_once, peak = 0, 0

    async def counting(request, rec):
        nonlocal at_once, peak
        at_once += 1
        peak = max(peak, at_once)
        await asyncio.sleep(0.02)
        at_once -= 1
        return 201

    sink.default = counting
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery={**FAST, "max_concurrency": 1}))
    gate, record = asyncio.Event(), hub.store.record

    async def held(results):
        await gate.wait()
        return await record(results)

    hub.store.record = held
    try:
        ids = [(await hub.post("/hooks/lead-capture", lead(n)))[1]["event_id"] for n in range(4)]
        await eventually(lambda: _at_least(sink, 2), what="a second request while the first's record waits")
        assert {(await hub.run(i))["status"] for i in ids} == {"pending"}  # nothing recorded yet
    finally:
        gate.set()
    await sink.wait_for(4)
    for i in ids:
        await eventually(lambda i=i: _delivered(hub, i), what=f"{i} recorded as delivered")
    assert peak == 1 and len(sink.received) == 4


async def _at_least(sink, n: int) -> bool:
    return len(sink.received) >= n


async def _delivered(hub, event_id: str) -> bool:
    return (await hub.run(event_id))["status"] == "delivered"


async def test_a_feed_that_read_all_that_was_due_reads_again_only_when_new_deliveries_come(
    tmp_path, sink, start_hub
):
    """Senders taking from a queue below half wake the feed to refill it, but only when its last read left more
    due behind. After a short read the store had no more: reading again at every take found nothing, twice
    (the due read, then when the next comes due), and was a third of a busy worker's reads."""

    async def slow(request, rec):
        await asyncio.sleep(0.15)
        return 201

    sink.default = slow
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery={**FAST, "max_concurrency": 2}))
    hub.hub.watch_s = 60.0  # the state watcher's rescan each half second is not what is counted here
    await hub.hub.set_state("lead-capture", "crm", "paused")
    for n in range(6):  # fewer than the feed has room for (4 a slot)
        await hub.post("/hooks/lead-capture", lead(n))
    await asyncio.sleep(0.6)  # the watcher's last half-second wait is over
    store, reads = hub.store, []
    due = store.due

    async def counted_due(*args, **kwargs):
        found = await due(*args, **kwargs)
        reads.append(len(found))
        return found

    store.due = counted_due
    await hub.hub.set_state("lead-capture", "crm", "active")
    await sink.wait_for(6)
    worker = hub.hub.flows["lead-capture"].workers["crm"]
    await eventually(lambda: worker.inflight == 0 and not worker.leased, what="the answers recorded")
    # Six deliveries, three rounds of two: one read found them all; the takes in between did not read again
    # (the feed's own rescan may come after half a second; it finds nothing, and the feed waits idle).
    assert reads[0] == 6, reads
    assert len(reads) <= 3, reads


async def test_idle_destinations_cost_one_read_a_look_together_however_many_they_are(
    tmp_path, sink, start_hub
):
    """Each feed that found nothing due asked the store again each second, and the state watcher woke every
    worker at each of its looks (each half second), as if new deliveries had come: each idle destination then
    took its sending slots and read the store twice, every half second, in every process (an idle cluster of
    3 processes and 50 destinations: 1,961 statements/s on PostgreSQL, bench/idle.py). Now an idle feed waits
    to be woken, and the watcher asks for all of them in one read: what is due for whom."""
    dests = [{"name": f"d{i}", "system": "crm", "path": f"/d{i}", "delivery": FAST} for i in range(3)]
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST, extra_dests=dests))
    assert hub.hub.watch_s == 0.5
    workers = hub.hub.flows["lead-capture"].workers
    await eventually(lambda: all(w.idle for w in workers.values()), what="every feed idle")
    store, calls = hub.store, []

    def counted(name):
        real = getattr(store, name)

        async def call(*args, **kwargs):
            calls.append((name, *args))
            return await real(*args, **kwargs)

        return call

    for name in ("due", "next_due", "take_slots"):
        setattr(store, name, counted(name))
    await asyncio.sleep(2.0)
    looks = [c for c in calls if c[0] == "next_due"]
    assert 2 <= len(looks) <= 6, calls  # one a look (each half second), asking for the four at once
    assert all(sorted(c[1]) == sorted(("lead-capture", n) for n in workers) for c in looks), looks
    assert not [c for c in calls if c[0] == "due"], calls  # no feed read on its own
    assert len([c for c in calls if c[0] == "take_slots"]) <= 4, calls  # slots given back once, if held
    # A rescan of every flow (a replay through the API, a listener that connected again) is one look too: no
    # idle feed takes its slots and reads for it.
    calls.clear()
    hub.hub.wake()
    await asyncio.sleep(0.2)
    assert [c[0] for c in calls] == ["next_due"], calls
    # An event wakes the feeds of its destinations at once, and each goes idle again after.
    _, body = await hub.post("/hooks/lead-capture", lead(1))
    await eventually(lambda: _delivered(hub, body["event_id"]), what="delivered to the four")
    await eventually(lambda: all(w.idle for w in workers.values()), what="every feed idle again")
    # A state changed in the store (the CLI's way) reaches the worker at the watcher's next look.
    await store.set_destination_state("lead-capture", "crm", "paused", "by hand")
    await eventually(lambda: workers["crm"].state == "paused", what="the pause read from the store")
    await store.set_destination_state("lead-capture", "crm", "active", None)
    await eventually(lambda: workers["crm"].state == "active", what="the resume read from the store")


async def test_an_idle_feed_finds_what_became_due_without_a_wake_at_the_watchers_next_look(
    tmp_path, sink, start_hub
):
    """Deliveries made pending again in the store without telling the hub (a retry another process scheduled,
    a lost wake, `patchbay replay` from the CLI) reach an idle feed through the watcher's look."""
    sink.script = [400]
    hub = await start_hub(lead_project(tmp_path, sink.url, delivery=FAST))
    _, body = await hub.post("/hooks/lead-capture", lead(1))
    await eventually(lambda: _dead(hub, body["event_id"]), what="dead letter")
    worker = hub.hub.flows["lead-capture"].workers["crm"]
    await eventually(lambda: worker.idle, what="the feed idle")
    pipelines = {name: fr.pipeline for name, fr in hub.hub.flows.items()}
    await replay(hub.store, pipelines, [body["event_id"]], None, Actor("cli"))  # as the CLI does: no wake
    await sink.wait_for(1, timeout=3)  # within the watcher's half second, not its own 10 s default
    await eventually(lambda: _delivered(hub, body["event_id"]), what="delivered after the replay")


async def _dead(hub, event_id: str) -> bool:
    return (await hub.run(event_id))["status"] == "dead"
