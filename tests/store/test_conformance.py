"""What every store must do, written against the Store protocol only (store/base.py).

Each test takes the parametrised `store` fixture (tests/store/conftest.py), so a second store passes
the same suite by adding one parameter there.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from patchbay.errors import LeaseLost, PatchbayError
from patchbay.store.base import (
    Actor,
    AlertChange,
    AttemptResult,
    AuditFilter,
    CachedAnswer,
    Contribution,
    DedupeClaim,
    Fence,
    NewDelivery,
    NewEvent,
    NodeRow,
    RunFilter,
    SecretRow,
    SecretRows,
    Store,
    WindowAdd,
)

ALICE = Actor("alice", "127.0.0.1", {"token_id": "t1"})
_seq = iter(range(1_000_000))


def event(
    flow: str = "orders",
    body: Any = None,
    *,
    dedupe_key: str | None = None,
    destinations: tuple[str, ...] = ("crm",),
    status: str = "pending",
    record_key: str | None = None,
    reason: str | None = None,
    received_at: float | None = None,
) -> NewEvent:
    n = next(_seq)
    payload = orjson.dumps(body if body is not None else {"n": n})
    eid = f"evt_{n:06d}_{time.time_ns()}"
    return NewEvent(
        id=eid,
        flow=flow,
        received_at=time.time() if received_at is None else received_at,
        payload=payload,
        body_hash=hashlib.sha256(payload).hexdigest(),
        dedupe_key=dedupe_key,
        status=status,
        record_key=record_key,
        meta={"source": "test"},
        trace=[{"step": "map", "ok": True}],
        reason=reason,
        deliveries=[
            NewDelivery(d, {"method": "POST", "body": payload.decode()}, f"{eid}:{d}") for d in destinations
        ]
        if status == "pending"
        else [],
    )


def result(d: Any, outcome: str, new_status: str, **kw: Any) -> AttemptResult:
    return AttemptResult(
        delivery_id=d.id,
        event_id=d.event_id,
        started_at=time.time(),
        latency_ms=kw.pop("latency_ms", 12.5),
        status_code=kw.pop("status_code", 200 if outcome == "success" else 503),
        outcome=outcome,
        excerpt=kw.pop("excerpt", "ok" if outcome == "success" else "unavailable"),
        error=kw.pop("error", "" if outcome == "success" else "HTTP 503"),
        new_status=new_status,
        **kw,
    )


async def due(store: Store, flow: str = "orders", dest: str = "crm", **kw: Any) -> list[Any]:
    return await store.due(flow, dest, kw.pop("now", time.time() + 1), kw.pop("limit", 100), set(), **kw)


# ------------------------------------------------------------------ accept, dedupe, conflict
async def test_accept_stores_the_event_with_its_deliveries(store: Store) -> None:
    e = event(body={"email": "a@example.com"}, destinations=("crm", "chat"), record_key="a@example.com")
    acc = await store.accept(e)
    assert (acc.event_id, acc.duplicate, acc.conflict) == (e.id, False, False)
    run = await store.get_run(e.id)
    assert run is not None
    assert run["payload"] == {"email": "a@example.com"} and run["status"] == "pending"
    assert run["meta"] == {"source": "test"} and run["trace"] == [{"step": "map", "ok": True}]
    assert [d["destination"] for d in run["deliveries"]] == ["crm", "chat"]
    assert run["deliveries"][0]["request"]["method"] == "POST"
    assert run["deliveries"][0]["attempts_log"] == []
    assert (await store.get_run(e.id.removeprefix("evt_")))["id"] == e.id  # type: ignore[index]
    assert await store.get_run("evt_missing") is None


async def test_same_dedupe_key_is_a_duplicate_and_a_different_body_a_conflict(store: Store) -> None:
    first = event(body={"a": 1}, dedupe_key="msg_1")
    await store.accept(first)
    again = await store.accept(event(body={"a": 1}, dedupe_key="msg_1"))
    assert (again.event_id, again.duplicate, again.conflict) == (first.id, True, False)
    changed = await store.accept(event(body={"a": 2}, dedupe_key="msg_1"))
    assert (changed.event_id, changed.duplicate, changed.conflict) == (first.id, True, True)
    other_flow = await store.accept(event("invoices", body={"a": 1}, dedupe_key="msg_1"))
    assert not other_flow.duplicate  # keys are per flow
    assert len(await store.list_runs(RunFilter(flow="orders"))) == 1
    assert len(await due(store)) == 1  # a duplicate adds no delivery


async def test_events_without_a_dedupe_key_are_never_duplicates(store: Store) -> None:
    for _ in range(3):
        assert not (await store.accept(event(body={"same": True}))).duplicate
    assert len(await store.list_runs(RunFilter(flow="orders"))) == 3


async def test_concurrent_accepts_of_one_key_store_it_once(store: Store) -> None:
    results = await asyncio.gather(*(store.accept(event(body={"x": 1}, dedupe_key="k")) for _ in range(20)))
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.event_id for r in results}) == 1


async def test_a_batch_and_its_cursor_commit_together(store: Store) -> None:
    assert await store.cursor("poller") is None and await store.cursor_info("poller") is None
    events = [event("poller", dedupe_key=f"r{i}") for i in range(3)]
    accepted = await store.accept_batch(events, "poller", {"page": 2})
    assert [a.event_id for a in accepted] == [e.id for e in events]
    assert await store.cursor("poller") == {"page": 2}
    info = await store.cursor_info("poller")
    assert info is not None and info["value"] == {"page": 2} and info["updated_at"] <= time.time()
    again = await store.accept_batch([event("poller", dedupe_key="r0")], "poller", None)
    assert again[0].duplicate and await store.cursor("poller") == {"page": 2}  # None keeps the cursor


async def test_quarantined_and_filtered_events_have_no_deliveries(store: Store) -> None:
    q = event(status="quarantined", reason="email: required")
    f = event(status="filtered", reason="when: false")
    await store.accept(q)
    await store.accept(f)
    assert await due(store) == []
    assert (await store.get_run(q.id))["status"] == "quarantined"  # type: ignore[index]
    assert (await store.get_run(f.id))["reason"] == "when: false"  # type: ignore[index]


# ------------------------------------------------------------------ due and the feed's cursor
async def test_due_is_arrival_order_past_a_cursor_without_leased_ones(store: Store) -> None:
    ids = [(await store.accept(event())).event_id for _ in range(5)]
    await store.accept(event(destinations=("chat",)))
    rows = await due(store)
    assert [r.event_id for r in rows] == ids and all(r.destination == "crm" for r in rows)
    assert (rows[0].attempts, rows[0].retries, rows[0].flow) == (0, 0, "orders")
    assert [r.event_id for r in await due(store, limit=2)] == ids[:2]
    assert [r.event_id for r in await due(store, after_id=rows[2].id)] == ids[3:]
    skipped = await store.due("orders", "crm", time.time() + 1, 2, {rows[0].id, rows[1].id})
    assert [r.event_id for r in skipped] == ids[2:4]
    assert await store.due("orders", "crm", time.time() - 3600, 10, set()) == []  # not due yet
    assert await due(store, "other") == []


async def next_due_at(store: Store, flow: str = "orders", dest: str = "crm") -> float | None:
    return (await store.next_due([(flow, dest)])).get((flow, dest))


async def test_next_due_is_the_earliest_pending_of_each_destination_asked_in_one_read(store: Store) -> None:
    assert await store.next_due([]) == {}
    assert await store.next_due([("orders", "crm")]) == {}
    await store.accept(event(received_at=1000.0, destinations=("crm", "chat")))
    await store.accept(event(received_at=900.0))
    asked = [("orders", "crm"), ("orders", "chat"), ("orders", "erp"), ("other", "crm"), ("orders", "crm")]
    assert await store.next_due(asked) == {("orders", "crm"): 900.0, ("orders", "chat"): 1000.0}
    [chat] = await due(store, dest="chat")
    await store.record([result(chat, "success", "delivered")])
    assert await store.next_due(asked) == {("orders", "crm"): 900.0}  # nothing pending: absent


async def test_the_snapshot_counts_each_destinations_queue_a_few_hundred_destinations_a_statement(
    store: Store,
) -> None:
    first = event(received_at=900.0, destinations=("crm", "chat"))
    await store.accept(first)
    await store.accept(event(received_at=1000.0))
    [chat] = await due(store, dest="chat")
    await store.record([result(chat, "success", "delivered")])
    pairs = [("orders", "crm"), ("orders", "chat")] + [("idle", f"d{i}") for i in range(450)]
    snap = await store.snapshot(time.time(), None, 0.0, pairs, set(), None, timeout=5)
    assert len(snap.queue) == len(pairs)
    n, oldest = snap.queue[("orders", "crm")]
    assert n == 2 and oldest is not None and oldest <= time.time()
    assert snap.queue[("orders", "chat")] == (0, None) == snap.queue[("idle", "d449")]


# ------------------------------------------------------------------ record outcomes
async def test_success_delivers_and_the_event_follows(store: Store) -> None:
    e = event(destinations=("crm", "chat"))
    await store.accept(e)
    [crm] = await due(store)
    await store.record([result(crm, "success", "delivered")])
    run = await store.get_run(e.id)
    assert run is not None and run["status"] == "pending"  # chat is still pending
    assert run["deliveries"][0]["status"] == "delivered" and run["deliveries"][0]["attempts"] == 1
    [log] = run["deliveries"][0]["attempts_log"]
    assert (log["n"], log["status_code"], log["outcome"], log["excerpt"]) == (1, 200, "success", "ok")
    [chat] = await due(store, dest="chat")
    await store.record([result(chat, "success", "delivered")])
    assert (await store.get_run(e.id))["status"] == "delivered"  # type: ignore[index]
    assert await due(store) == []


async def test_a_retry_waits_and_counts_then_dead_marks_the_event(store: Store) -> None:
    e = event()
    await store.accept(e)
    [d] = await due(store)
    assert (
        e.received_at <= d.due_at <= time.time()
    )  # due since it came: how long it waited (engine/intake.py)
    later = time.time() + 600
    await store.record([result(d, "transient", "pending", next_at=later, consumed_retry=True)])
    assert await due(store) == []  # not before next_at
    assert await next_due_at(store) == pytest.approx(later)
    [d] = await due(store, now=later + 1)
    assert (d.attempts, d.retries) == (1, 1) and d.due_at == pytest.approx(later)
    await store.record([result(d, "terminal", "dead", status_code=400, error="", excerpt="bad email")])
    run = await store.get_run(e.id)
    assert run is not None and run["status"] == "dead"
    [dl] = run["deliveries"]
    assert dl["status"] == "dead" and dl["last_error"] == "HTTP 400" and dl["attempts"] == 2
    assert [a["n"] for a in dl["attempts_log"]] == [1, 2]
    [row] = await store.list_runs(RunFilter(flow="orders"))
    assert row["reason"] == "crm: HTTP 400" and row["attempts"] == 2 and row["deliveries"] == 1


async def test_one_record_call_updates_many_deliveries(store: Store) -> None:
    for _ in range(10):
        await store.accept(event())
    rows = await due(store)
    await store.record([result(d, "success", "delivered") for d in rows])
    assert await due(store) == []
    assert (await store.counts())["events"] == {"delivered": 10}


async def test_a_nul_in_a_payload_or_in_a_destinations_answer_is_stored(store: Store) -> None:
    """A string may hold NUL (\\u0000 in JSON) and a destination may answer with a NUL byte. PostgreSQL's text
    holds no NUL and its JSON functions refuse \\u0000; SQLite's cut a text there. The event is kept whole,
    and the attempt recorded with the answer's NUL shown as U+FFFD (store/common.py `attempt_row`)."""
    e = event(body={"note": "a\x00b"})
    e.meta["note"] = "a\x00b"
    await store.accept(e)
    [d] = await due(store)
    await store.record([result(d, "transient", "pending", excerpt="a\x00b", error="HTTP 503: a\x00b")])
    run = await store.get_run(e.id)
    assert run is not None and run["payload"] == {"note": "a\x00b"} and run["meta"]["note"] == "a\x00b"
    [attempt] = run["deliveries"][0]["attempts_log"]
    assert (attempt["excerpt"], attempt["error"]) == ("a\ufffdb", "HTTP 503: a\ufffdb")


async def test_a_nul_in_an_events_keys_or_reasons_is_stored_the_same_on_every_store(store: Store) -> None:
    """A sender's value may hold NUL, and the steps carry it into the event's dedupe key (id_path), record
    key, order key and reasons. PostgreSQL's text holds no NUL: every store shows it as U+FFFD there, so
    the event is accepted alike on both, and the same key is the same duplicate on both."""
    e = event(
        body={"id": "a\x00b"}, dedupe_key="a\x00b", record_key="k\x00", reason="email: 'x\x00' is not valid"
    )
    first = e.deliveries[0]
    e.deliveries = [
        NewDelivery(first.destination, first.request, first.idempotency_key, order_key="o\x00"),
        NewDelivery("quarantine:map", {"element": "1"}, f"{e.id}.1.q", "dead", "bad \x00 value"),
    ]
    acc = await store.accept(e)
    assert not acc.duplicate
    run = await store.get_run(e.id)
    assert run is not None and run["payload"] == {"id": "a\x00b"}
    assert (run["dedupe_key"], run["record_key"], run["reason"]) == (
        "a\ufffdb",
        "k\ufffd",
        "email: 'x\ufffd' is not valid",
    )
    assert [d["last_error"] for d in run["deliveries"]] == [None, "bad \ufffd value"]
    again = await store.accept(event(body={"id": "a\x00b"}, dedupe_key="a\x00b"))
    assert (again.event_id, again.duplicate) == (e.id, True)
    [found] = await store.list_runs(RunFilter(key="k\x00"))  # a search, say `?key=k%00`, finds it too
    assert found["id"] == e.id
    assert await store.audit_log(AuditFilter(target="\x00")) == []
    assert await store.get_run("evt_\x00") is None  # an id from a URL: not found, on every store


# ------------------------------------------------------------------ destination states
async def test_destination_states_keep_since_until_the_state_changes(store: Store) -> None:
    assert await store.destination_states() == {}
    await store.set_destination_state("orders", "crm", "paused", "HTTP 401")
    state, reason, since = (await store.destination_states())[("orders", "crm")]
    assert (state, reason) == ("paused", "HTTP 401")
    await store.set_destination_state("orders", "crm", "paused", "HTTP 403")
    assert (await store.destination_states())[("orders", "crm")] == ("paused", "HTTP 403", since)
    await store.set_destination_state("orders", "crm", "active", None, ALICE)
    state, reason, since2 = (await store.destination_states())[("orders", "crm")]
    assert (state, reason) == ("active", None) and since2 >= since
    [entry] = await store.audit_log(AuditFilter())
    assert (entry["actor"], entry["action"], entry["target"], entry["origin"]) == (
        "alice",
        "resume",
        "orders/crm",
        "127.0.0.1",
    )
    assert entry["detail"] == {"token_id": "t1"}


async def test_pausing_by_hand_is_audited_under_the_state(store: Store) -> None:
    await store.set_destination_state("orders", "crm", "paused", None, Actor("bob", "cli", {"was": "active"}))
    [entry] = await store.audit_log(AuditFilter())
    assert (entry["action"], entry["detail"]) == ("paused", {"was": "active"})


# ------------------------------------------------------------------ schedules and cursors
async def test_schedules_record_runs_and_refuse_unknown_fields(store: Store) -> None:
    assert await store.schedule("nightly") is None and await store.schedules() == {}
    await store.update_schedule("nightly", {"next_due_at": 100.0})
    await store.update_schedule("nightly", {"last_started_at": 101.0, "next_due_at": 200.0})
    await store.update_schedule(
        "nightly",
        {"last_finished_at": 102.0, "last_status": "error", "last_error": "boom", "next_due_at": 200.0},
        count_run=True,
    )
    row = await store.schedule("nightly")
    assert row is not None
    assert {k: row[k] for k in ("last_started_at", "last_finished_at", "last_status", "last_error")} == {
        "last_started_at": 101.0,
        "last_finished_at": 102.0,
        "last_status": "error",
        "last_error": "boom",
    }
    assert (row["next_due_at"], row["runs"]) == (200.0, 1)
    assert list(await store.schedules()) == ["nightly"]
    with pytest.raises(ValueError, match="unknown field.*runs"):
        await store.update_schedule("nightly", {"runs": 99})
    with pytest.raises(ValueError, match="unknown field"):
        await store.update_schedule("nightly", {"next_due_at=0 --": 1})
    assert (await store.schedule("nightly"))["runs"] == 1  # type: ignore[index]


async def test_resetting_a_cursor_is_audited(store: Store) -> None:
    await store.accept_batch([event("poller")], "poller", "etag-1")
    assert await store.reset_cursor("poller", ALICE) is True
    assert await store.cursor("poller") is None
    assert await store.reset_cursor("poller") is False  # unaudited without an actor
    [entry] = await store.audit_log(AuditFilter(action="cursor.reset"))
    assert entry["target"] == "poller" and entry["detail"] == {"token_id": "t1", "had_cursor": True}


# ------------------------------------------------------------------ runs queries
async def test_runs_filter_newest_first(store: Store) -> None:
    now = time.time()
    old = event(received_at=now - 7200, record_key="a@example.com")
    new = event(received_at=now - 60, record_key="b@example.com")
    other = event("invoices", received_at=now - 30)
    quarantined = event(status="quarantined", reason="bad", received_at=now - 10)
    for e in (old, new, other, quarantined):
        await store.accept(e)
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids(await store.list_runs(RunFilter())) == [quarantined.id, other.id, new.id, old.id]
    assert ids(await store.list_runs(RunFilter(flow="orders", limit=2))) == [quarantined.id, new.id]
    assert ids(await store.list_runs(RunFilter(status="quarantined"))) == [quarantined.id]
    assert ids(await store.list_runs(RunFilter(since=now - 3600, until=now - 20))) == [other.id, new.id]
    assert ids(await store.list_runs(RunFilter(key="a@example.com"))) == [old.id]
    assert ids(await store.list_runs(RunFilter(key="A@example.com"))) == [old.id]  # as given or lowercased


async def test_recent_payloads_are_the_flows_newest_as_stored(store: Store) -> None:
    now = time.time()
    old, new = event(body={"a": 1}, received_at=now - 10), event(body={"a": 2}, received_at=now - 5)
    for e in (old, new, event("invoices")):
        await store.accept(e)
    assert await store.recent_payloads("orders", 10) == [
        (new.id, new.received_at, new.payload),
        (old.id, old.received_at, old.payload),
    ]
    assert len(await store.recent_payloads("orders", 1)) == 1


async def test_recent_answers_are_the_flows_newest_successes(store: Store) -> None:
    first, second = event(destinations=("crm", "chat")), event(destinations=("crm",))
    for e in (first, second, event("invoices")):
        await store.accept(e)
    [crm1, crm2] = await due(store)
    await store.record([result(crm1, "success", "delivered", excerpt='{"id": "c1"}')])
    await store.record([result(crm2, "transient", "pending", next_at=time.time() + 600)])
    [chat] = await due(store, dest="chat")
    await store.record([result(chat, "success", "delivered", excerpt='{"ok": true}')])
    got = await store.recent_answers("orders", 10)
    assert [(d, e, x) for d, e, _, x in got] == [
        ("chat", first.id, '{"ok": true}'),
        ("crm", first.id, '{"id": "c1"}'),
    ]
    assert got[0][2] >= got[1][2]
    assert len(await store.recent_answers("orders", 1)) == 1
    assert await store.recent_answers("invoices", 10) == []


async def test_counts_overall_and_per_flow(store: Store) -> None:
    await store.accept(event())
    await store.accept(event("invoices", status="quarantined", reason="x"))
    total = await store.counts()
    assert total == {
        "events": {"pending": 1, "quarantined": 1},
        "deliveries": {"pending": 1},
    }
    per = await store.counts_by_flow()
    assert per["orders"] == {"events": {"pending": 1}, "deliveries": {"pending": 1}}
    assert per["invoices"] == {"events": {"quarantined": 1}, "deliveries": {}}


async def test_flow_stats_and_destination_backlog(store: Store) -> None:
    for _ in range(3):
        await store.accept(event())
    await store.accept(event(status="quarantined", reason="x"))
    rows = await due(store)
    await store.record([result(rows[0], "success", "delivered", latency_ms=10.0)])
    await store.record([result(rows[1], "terminal", "dead")])
    await store.record(
        [result(rows[2], "transient", "pending", next_at=time.time() + 60, consumed_retry=True)]
    )
    now = time.time()
    stats = await store.flow_stats(["orders", "idle"], now)
    hour = stats["orders"]["hour"]
    assert hour["runs"] == 4 and hour["by_status"] == {
        "delivered": 1,
        "dead": 1,
        "pending": 1,
        "quarantined": 1,
    }
    assert hour["success_rate"] == round(1 / 3, 4) and hour["p95_latency_ms"] == 12.5
    assert stats["orders"]["last_run"]["status"] == "quarantined"
    assert stats["idle"]["last_run"] is None and stats["idle"]["day"]["runs"] == 0
    backlog = (await store.destination_backlog(now))[("orders", "crm")]
    assert {k: backlog[k] for k in ("pending", "retrying", "dead", "dead_last_hour")} == {
        "pending": 1,
        "retrying": 1,
        "dead": 1,
        "dead_last_hour": 1,
    }
    assert backlog["next_due_at"] > now


# ------------------------------------------------------------------ dead letters and replay
@dataclass
class Processed:
    status: str
    trace: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    deliveries: list[NewDelivery] = field(default_factory=list)
    record_key: str | None = None
    claims: list[DedupeClaim] = field(default_factory=list)
    windows: list[WindowAdd] = field(default_factory=list)


class Steps:
    """A flow's steps as configured now: valid when the record has an email."""

    def __init__(self, destinations: tuple[str, ...] = ("crm",)) -> None:
        self.destinations = destinations

    def load_payload(self, payload: bytes) -> Any:
        record = orjson.loads(payload)
        if record.get("sealed"):
            raise PatchbayError("opening the sealed fields: no key")
        return record

    def process(self, record: Any, event_id: str, **kw: Any) -> Processed:
        if "email" not in record:
            return Processed("quarantined", [{"step": "validate"}], reason="email: required")
        return Processed(
            "pending",
            [{"step": "validate", "ok": True}],
            deliveries=[NewDelivery(d, {"body": "v2"}, f"{event_id}:{d}") for d in self.destinations],
            record_key=record["email"],
        )


async def _dead(store: Store, body: Any, destinations: tuple[str, ...] = ("crm",)) -> str:
    e = event(body=body, destinations=destinations)
    await store.accept(e)
    for d in await store.due("orders", "crm", time.time() + 1, 100, set()):
        if d.event_id == e.id:
            await store.record([result(d, "terminal", "dead", status_code=422, error="rejected")])
    return e.id


async def test_dead_letters_listed_grouped_and_found_by_reason(store: Store) -> None:
    d1 = await _dead(store, {"email": "a@example.com"})
    d2 = await _dead(store, {"email": "b@example.com"})
    q = event(body={"name": "x"}, status="quarantined", reason="email: required")
    await store.accept(q)
    listed = await store.list_dead()
    assert {(r["kind"], r["event_id"]) for r in listed} == {
        ("delivery", d1),
        ("delivery", d2),
        ("quarantine", q.id),
    }
    assert await store.list_dead(flow="invoices") == []
    grouped = await store.dead_letters(None, None, None, 10)
    assert grouped["total"] == 3
    assert {(g["kind"], g["reason"], g["count"]) for g in grouped["groups"]} == {
        ("delivery", "rejected", 2),
        ("quarantine", "email: required", 1),
    }
    assert len((await store.dead_letters("orders", "crm", None, 1))["items"]) == 1
    assert await store.dead_event_ids(None, None, "rej") == [d1, d2]  # a reason prefix, oldest first
    assert await store.dead_event_ids(None, "crm", None) == [d1, d2]  # quarantines have no destination
    assert await store.replayable(None, None) == [d1, d2, q.id]
    assert await store.replayable("orders", "crm") == [d1, d2, q.id]  # a fixed step may now route to it
    assert await store.replayable("invoices", None) == []


async def test_replay_requeues_dead_and_fixed_quarantined_events(store: Store) -> None:
    dead = await _dead(store, {"email": "a@example.com"})
    fixed = event(body={"email": "b@example.com"}, status="quarantined", reason="old rule")
    still = event(body={"name": "x"}, status="quarantined", reason="email: required")
    delivered = event()
    for e in (fixed, still, delivered):
        await store.accept(e)
    for d in await due(store):
        if d.event_id == delivered.id:
            await store.record([result(d, "success", "delivered")])
    sealed = event(body={"sealed": True}, status="quarantined", reason="x")
    await store.accept(sealed)
    ids = [dead, fixed.id, still.id, delivered.id, "evt_gone", sealed.id]
    rep = await store.replay({"orders": Steps()}, ids, None, ALICE)
    assert rep.requeued == [dead, fixed.id]
    assert rep.still_invalid == [(still.id, "email: required")]
    assert dict(rep.skipped) == {
        delivered.id: "nothing to replay (status delivered)",
        "evt_gone": "no such event",
        sealed.id: "opening the sealed fields: no key",
    }
    rows = await due(store)
    assert sorted(r.event_id for r in rows) == sorted([dead, fixed.id])
    assert all(r.request == {"body": "v2"} and r.retries == 0 for r in rows)
    run = await store.get_run(fixed.id)
    assert run is not None and run["status"] == "pending" and run["reason"] is None
    assert run["record_key"] == "b@example.com"
    audit = await store.audit_log(AuditFilter(action="replay"))
    assert sorted(a["target"] for a in audit) == sorted([dead, fixed.id])
    assert all(a["origin"] == "127.0.0.1" and a["detail"]["token_id"] == "t1" for a in audit)


async def test_replay_of_an_unconfigured_flow_or_other_destination_is_skipped(store: Store) -> None:
    dead = await _dead(store, {"email": "a@example.com"})
    rep = await store.replay({}, [dead], None, ALICE)
    assert rep.skipped == [(dead, "flow 'orders' is no longer configured")]
    rep = await store.replay({"orders": Steps()}, [dead], "chat", ALICE)
    assert rep.skipped == [(dead, "no dead delivery matches")]
    assert await due(store) == []


async def test_discard_gives_up_and_is_audited(store: Store) -> None:
    dead = await _dead(store, {"email": "a@example.com"})
    q = event(status="quarantined", reason="bad")
    pending = event()
    await store.accept(q)
    await store.accept(pending)
    rep = await store.discard([dead, q.id, pending.id, "evt_gone"], None, ALICE)
    assert rep.discarded == [dead, q.id]
    assert dict(rep.skipped) == {
        pending.id: "nothing to discard (status pending)",
        "evt_gone": "no such event",
    }
    assert (await store.get_run(dead))["status"] == "discarded"  # type: ignore[index]
    assert (await store.get_run(q.id))["status"] == "discarded"  # type: ignore[index]
    assert await store.list_dead() == []
    audit = await store.audit_log(AuditFilter(action="discard"))
    assert {a["target"] for a in audit} == {dead, q.id} and audit[0]["detail"]["token_id"] == "t1"


# ------------------------------------------------------------------ tokens and audit
# ------------------------------------------------------------------ calls inside flows
class CallingSteps:
    """A flow that asks `call:find` first, then delivers to crm with the answer's id."""

    def load_payload(self, payload: bytes) -> Any:
        return orjson.loads(payload)

    def process(self, record: Any, event_id: str, *, answers: Any = None, **kw: Any) -> Processed:
        answer = (answers or {}).get(f"{event_id}.find")
        if answer is None:
            call = NewDelivery("call:find", {"url": record["email"]}, f"{event_id}.find")
            return Processed("pending", [{"step": "find", "waiting": True}], deliveries=[call])
        if answer["status"] == 404:
            return Processed("quarantined", [{"step": "find"}], reason="find: not found")
        crm = NewDelivery("crm", {"id": answer["body"]["id"]}, f"{event_id}.crm")
        return Processed(
            "pending", [{"step": "find", "status": 200}], deliveries=[crm], record_key=record["email"]
        )


def call_event(steps: CallingSteps) -> NewEvent:
    e = event(body={"email": "ada@example.com"}, destinations=())
    p = steps.process({"email": "ada@example.com"}, e.id)
    e.deliveries, e.trace = p.deliveries, p.trace
    return e


async def test_an_answered_call_continues_its_run_in_the_same_write(store: Store) -> None:
    steps = CallingSteps()
    e = call_event(steps)
    await store.accept(e)
    [call] = await due(store, dest="call:find")
    assert call.idempotency_key == f"{e.id}.find" and await due(store) == []

    await store.record_calls([result(call, "transient", "pending", next_at=time.time() - 1)], steps)
    assert await due(store) == [] and await store.call_answers(e.id) == {}  # a failure continues nothing

    answer = {"status": 200, "body": {"id": "c-1"}}
    [call] = await due(store, dest="call:find")
    kept = CachedAnswer("orders/find", "ada@example.com", answer, time.time() + 60)
    continued = await store.record_calls(
        [result(call, "success", "delivered", response=answer)], steps, [kept]
    )
    assert continued == [(e.id, ["crm"])]
    assert await store.cached_answer("orders/find", "ada@example.com", time.time()) == answer  # same write
    assert await store.call_answers(e.id) == {f"{e.id}.find": answer}
    [crm] = await due(store)
    assert crm.request == {"id": "c-1"} and crm.idempotency_key == f"{e.id}.crm"
    run = await store.get_run(e.id)
    assert run is not None and run["status"] == "pending" and run["record_key"] == "ada@example.com"
    assert run["trace"] == [{"step": "find", "status": 200}]

    # Recorded twice (a replayed call): the run's deliveries are not made twice.
    assert await store.record_calls([result(call, "success", "delivered", response=answer)], steps) == [
        (e.id, [])
    ]
    await store.record([result(crm, "success", "delivered")])
    assert (await store.get_run(e.id) or {})["status"] == "delivered"


async def test_an_answer_that_quarantines_the_run_marks_the_event(store: Store) -> None:
    steps = CallingSteps()
    e = call_event(steps)
    await store.accept(e)
    [call] = await due(store, dest="call:find")
    await store.record_calls(
        [result(call, "success", "delivered", response={"status": 404, "body": None})], steps
    )
    run = await store.get_run(e.id)
    assert run is not None and run["status"] == "quarantined" and run["reason"] == "find: not found"
    assert e.id in await store.replayable(None, None)


async def test_a_dead_call_of_a_compressed_run_is_replayed_and_continues(store: Store) -> None:
    steps = CallingSteps()
    e = call_event(steps)
    await store.accept(e)
    [call] = await due(store, dest="call:find")
    await store.record_calls([result(call, "terminal", "dead", status_code=400, error="bad")], steps)
    assert (await store.compress_runs("orders", time.time() + 1))[0] == 1  # a dead run: old enough
    assert (await store.replay({"orders": steps}, [e.id], None, ALICE)).requeued == [e.id]
    [call] = await due(store, dest="call:find")
    answer = {"status": 200, "body": {"id": "c-2"}}
    assert await store.record_calls([result(call, "success", "delivered", response=answer)], steps) == [
        (e.id, ["crm"])
    ]
    [crm] = await due(store)
    assert crm.request == {"id": "c-2"}


class BrokenAfterTheCall(CallingSteps):
    """A flow whose steps raise once the answer is there (a bug in a custom step)."""

    def process(self, record: Any, event_id: str, *, answers: Any = None, **kw: Any) -> Processed:
        if answers:
            raise ZeroDivisionError("division by zero")
        return super().process(record, event_id)


async def test_a_flow_that_raises_after_the_answer_quarantines_the_run_and_records_the_call(
    store: Store,
) -> None:
    steps = BrokenAfterTheCall()
    e = call_event(steps)
    await store.accept(e)
    [call] = await due(store, dest="call:find")
    answer = {"status": 200, "body": {"id": "c-1"}}
    assert await store.record_calls([result(call, "success", "delivered", response=answer)], steps) == [
        (e.id, [])
    ]
    assert await due(store, dest="call:find") == []  # recorded: never asked again in a loop
    run = await store.get_run(e.id)
    assert run is not None and run["status"] == "quarantined"
    assert run["reason"] == "continuing after a call: ZeroDivisionError: division by zero"


async def test_cached_answers_expire(store: Store) -> None:
    now = time.time()
    await store.cache_answer("f/find", "ada", {"status": 200, "body": {"id": 1}}, now + 60)
    await store.cache_answer("f/find", "old", {"status": 200, "body": None}, now - 1)
    assert await store.cached_answer("f/find", "ada", now) == {"status": 200, "body": {"id": 1}}
    assert await store.cached_answer("f/other", "ada", now) is None  # per flow and step
    assert await store.cached_answer("f/find", "ada", now + 61) is None
    assert await store.cached_answer("f/find", "old", now) is None
    await store.cache_answer("f/find", "ada", {"status": 200, "body": {"id": 2}}, now + 60)
    assert await store.cached_answer("f/find", "ada", now) == {"status": 200, "body": {"id": 2}}


async def test_a_dead_element_row_is_listed_and_discarded_when_its_replay_passes(store: Store) -> None:
    e = event(body={"email": "a@example.com"})
    e.deliveries.append(
        NewDelivery(
            "quarantine:validate", {"element": "1"}, f"{e.id}.1.quarantine:validate", "dead", "sku: missing"
        )
    )
    await store.accept(e)
    [crm] = await due(store)
    await store.record([result(crm, "success", "delivered")])
    run = await store.get_run(e.id)
    assert run is not None and run["status"] == "dead"
    assert [d["destination"] for d in await store.list_dead()] == ["quarantine:validate"]
    rep = await store.replay({"orders": Steps()}, [e.id], None, ALICE)  # now every element passes
    assert rep.requeued == [e.id]
    assert await store.list_dead() == []


async def test_tokens_created_listed_touched_and_revoked(store: Store) -> None:
    info = await store.create_token("ci", ["runs:read"], None, "ab" * 32, ALICE)
    assert len(info.id) == 12 and info.scopes == ("runs:read",) and info.created_by == "alice"
    other = await store.create_token("old", ["admin"], time.time() - 1, "cd" * 32, ALICE)
    assert info.id != other.id
    found = await store.token_secret(info.id)
    assert found is not None and found == (info, "ab" * 32)
    assert await store.token_secret("000000000000") is None
    assert [t.name for t in await store.tokens()] == ["ci", "old"]
    assert [t.name for t in await store.tokens(include_inactive=False)] == ["ci"]
    await store.touch_token(info.id, 1234.5)
    assert (await store.token_secret(info.id))[0].last_used_at == 1234.5  # type: ignore[index]
    revoked = await store.revoke_token(info.id, ALICE)
    assert revoked is not None and revoked.status() == "revoked"
    again = await store.revoke_token(info.id)
    assert again is not None and again.revoked_at == revoked.revoked_at  # the first revocation stays
    assert await store.revoke_token("000000000000", ALICE) is None
    audit = await store.audit_log(AuditFilter(action="token."))
    assert [(a["action"], a["target"]) for a in audit] == [
        ("token.revoke", info.id),
        ("token.create", other.id),
        ("token.create", info.id),
    ]
    assert audit[2]["detail"] == {"token_id": "t1", "name": "ci", "scopes": ["runs:read"], "expires_at": None}
    assert "ab" * 32 not in str(audit)


async def test_audit_log_filters_newest_first(store: Store) -> None:
    t0 = time.time()
    await store.audit("secret.set", "crm_token", Actor("alice", "cli", {"version": 1}))
    await store.audit("secret.delete", "old", Actor("token abc (deploy)", "10.0.0.1"))
    await store.audit("replay", "evt_1", Actor("bob"))
    everything = await store.audit_log(AuditFilter())
    assert [a["action"] for a in everything] == ["replay", "secret.delete", "secret.set"]
    assert everything[2]["detail"] == {"version": 1} and everything[2]["origin"] == "cli"
    assert [a["target"] for a in await store.audit_log(AuditFilter(action="secret."))] == ["old", "crm_token"]
    assert await store.audit_log(AuditFilter(action="secret")) == []  # exact unless it ends in '.'
    assert [a["target"] for a in await store.audit_log(AuditFilter(actor="deploy"))] == ["old"]
    assert [a["action"] for a in await store.audit_log(AuditFilter(target="evt_1"))] == ["replay"]
    assert len(await store.audit_log(AuditFilter(limit=2))) == 2
    assert await store.audit_log(AuditFilter(until=t0 - 1)) == []
    assert len(await store.audit_log(AuditFilter(since=t0 - 1))) == 3


# ------------------------------------------------------------------ retention
async def _delivered(store: Store, flow: str = "orders") -> str:
    e = event(flow=flow)
    await store.accept(e)
    for d in await due(store, flow=flow):
        if d.event_id == e.id:
            await store.record([result(d, "success", "delivered", response={"id": "c-1"})])
    return e.id


async def test_purge_removes_old_finished_runs_whole_and_never_pending_work(store: Store) -> None:
    done = [await _delivered(store) for _ in range(3)]
    filtered = event(status="filtered", reason="no destination matched")
    quarantined = event(status="quarantined", reason="email: required")
    pending = event()
    other = await _delivered(store, flow="invoices")
    for e in (filtered, quarantined, pending):
        await store.accept(e)
    later = time.time() + 10
    assert await store.purge_runs("orders", ("delivered", "filtered"), later, limit=2) == 2  # a bounded chunk
    assert await store.purge_runs("orders", ("delivered", "filtered"), later, limit=2) == 2
    assert await store.purge_runs("orders", ("delivered", "filtered"), later, limit=2) == 0
    for gone in (*done, filtered.id):
        assert await store.get_run(gone) is None
        assert await store.response_fields(gone, "crm") is None
    for kept in (quarantined.id, pending.id, other):
        assert await store.get_run(kept) is not None
    assert [d.event_id for d in await due(store)] == [pending.id]
    assert await store.purge_runs("orders", ("delivered", "filtered"), time.time() - 3600) == 0  # not old yet
    assert {r["id"] for r in await store.list_runs(RunFilter(flow="orders"))} == {quarantined.id, pending.id}


async def test_a_purged_runs_dedupe_key_is_forgotten(store: Store) -> None:
    e = event(status="filtered", dedupe_key="order-7")
    await store.accept(e)
    assert (await store.accept(event(status="filtered", dedupe_key="order-7"))).duplicate
    assert await store.purge_runs("orders", ("filtered",), time.time() + 10) == 1
    assert not (await store.accept(event(status="filtered", dedupe_key="order-7"))).duplicate


async def test_compressed_runs_read_replay_and_export_as_before(store: Store) -> None:
    delivered = await _delivered(store)
    body = {"email": "b@example.com", "note": "x" * 2000}
    fixed = event(body=body, status="quarantined", reason="old rule")
    await store.accept(fixed)
    before = await store.get_run(fixed.id)
    assert (await store.compress_runs("orders", time.time() + 10))[0] == 2
    assert (await store.compress_runs("orders", time.time() + 10))[0] == 0  # already compressed
    after = await store.get_run(fixed.id)
    assert after is not None and before is not None
    assert (after["payload"], after["trace"]) == (before["payload"], before["trace"]) == (body, fixed.trace)
    assert (await store.get_run(delivered))["deliveries"][0]["response"] == {"id": "c-1"}  # type: ignore[index]
    [(eid, _, payload), *_] = await store.recent_payloads("orders", 1)
    assert eid == fixed.id and orjson.loads(payload) == body
    rep = await store.replay({"orders": Steps()}, [fixed.id], None, ALICE)
    assert rep.requeued == [fixed.id]
    [d] = await due(store)
    assert d.event_id == fixed.id


async def test_compression_goes_on_from_the_arrival_of_the_last_run_it_compressed(store: Store) -> None:
    """A chunk answers how many it compressed and the last one's arrival; the next chunk starts there, and
    a run that arrived before it is left to a pass from the first run (`after=None`)."""
    t = time.time() - 100
    runs = [event(status="quarantined", reason="r", received_at=t + i) for i in range(5)]
    for e in runs:
        await store.accept(e)
    assert await store.compress_runs("orders", time.time() + 10, 2) == (2, t + 1)
    assert await store.compress_runs("orders", time.time() + 10, 2, t + 1) == (2, t + 3)
    late = event(status="quarantined", reason="r", received_at=t + 0.5)  # arrived between compressed ones
    await store.accept(late)
    assert await store.compress_runs("orders", time.time() + 10, 2, t + 3) == (1, t + 4)
    assert await store.compress_runs("orders", time.time() + 10, 2, t + 4) == (0, None)
    assert await store.compress_runs("orders", time.time() + 10, 2) == (1, t + 0.5)  # a pass from the first
    assert [(await store.get_run(e.id))["reason"] for e in [*runs, late]] == ["r"] * 6  # type: ignore[index]


async def test_writes_are_visible_to_reads_at_once(store: Store) -> None:
    e = event()
    await store.accept(e)
    assert (await store.get_run(e.id)) is not None and store.writing


# ------------------------------------------------------------------ the vault's rows
def test_secret_rows_put_replace_list_delete(secret_rows: SecretRows) -> None:
    assert secret_rows.get("crm") is None and secret_rows.list() == []
    secret_rows.put("crm", ("k1", b"n1", b"c1"), 100.0)
    assert secret_rows.get("crm") == SecretRow("crm", "k1", b"n1", b"c1", 100.0, None, 1)
    secret_rows.put("crm", ("k1", b"n2", b"c2"), 200.0)  # a replacement is a rotation
    assert secret_rows.get("crm") == SecretRow("crm", "k1", b"n2", b"c2", 100.0, 200.0, 2)
    secret_rows.put("a", ("k1", b"n3", b"c3"), 300.0)
    assert [r.name for r in secret_rows.list()] == ["a", "crm"]
    assert secret_rows.delete("a") is True and secret_rows.delete("a") is False
    assert [r.name for r in secret_rows.list()] == ["crm"]
    secret_rows.ensure_schema()  # twice is harmless
    assert secret_rows.get("crm") is not None


def test_secret_rows_put_if_absent_keeps_the_first(secret_rows: SecretRows) -> None:
    first = secret_rows.put_if_absent("field_key", ("k1", b"n1", b"first"), 10.0)
    assert first == SecretRow("field_key", "k1", b"n1", b"first", 10.0, None, 1)
    assert secret_rows.put_if_absent("field_key", ("k1", b"n2", b"second"), 20.0) == first
    assert secret_rows.get("field_key") == first


def test_secret_rows_reseal_is_all_or_nothing(secret_rows: SecretRows) -> None:
    for name in ("a", "b", "c"):
        secret_rows.put(name, ("old", b"n", name.encode()), 1.0)
    assert secret_rows.reseal(lambda r: ("new", b"m", r.ciphertext + b"!")) == 3
    assert {(r.key_id, r.ciphertext) for r in secret_rows.list()} == {
        ("new", b"a!"),
        ("new", b"b!"),
        ("new", b"c!"),
    }

    def fail_on_b(r: SecretRow) -> tuple[str, bytes, bytes]:
        if r.name == "b":
            raise ValueError("cannot decrypt b")
        return "newer", b"x", b"x"

    with pytest.raises(ValueError, match="cannot decrypt b"):
        secret_rows.reseal(fail_on_b)
    assert {r.key_id for r in secret_rows.list()} == {"new"}  # nothing changed
    assert all(r.version == 1 for r in secret_rows.list())  # resealing is not a rotation


# ------------------------------------------------------------------ identity map (issue 9)
def _identity(iid: str, **systems: str) -> Any:
    from patchbay.store.base import Identity

    return Identity(
        iid,
        "customer",
        1.0,
        2.0,
        golden={"email": {"value": "ada@example.com", "system": "crm", "at": 1.0}},
        systems={
            s: {
                "id": rid,
                "seen": {"email": {"value": "ada@example.com", "at": 1.0, "event": None}},
                "written": {},
            }
            for s, rid in systems.items()
        },
        keys=[("email", f"{iid}@example.com")],
    )


async def test_identities_are_found_by_link_and_key_and_written_with_their_events(store: Store):
    from patchbay.store.base import IdentityChanges, NewConflict, NewReview

    ident = _identity("idn_1", crm="45", billing="cus_9")
    ev = event("crm_sync")
    conflict = NewConflict(
        "customer",
        "idn_1",
        "name",
        "owned",
        [{"system": "crm", "value": "Ada", "at": 1.0}, {"system": "mkt", "value": "Ada L.", "at": 2.0}],
        "crm",
        "Ada",
        "owner",
        "mkt changed name",
        "settled",
        3.0,
    )
    review = NewReview("customer", "mkt", "m7", {"email": "x@y.z"}, ["idn_1"], "weak", 4.0, ev.id)
    changes = IdentityChanges("customer", [ident], [conflict], [review])
    [acc] = await store.accept_synced([ev], changes, {"crm_sync": {"at": 5}})
    assert not acc.duplicate
    assert await store.cursor("crm_sync") == {"at": 5}
    assert (await store.get_run(ev.id)) is not None

    found = await store.identity_lookup(
        "customer", [("crm", "45"), ("billing", "nope")], [("email", "idn_1@example.com"), ("email", "zz")]
    )
    assert found.by_link == {("crm", "45"): "idn_1"}
    assert found.by_key == {("email", "idn_1@example.com"): ["idn_1"]}
    assert found.identities["idn_1"].systems["billing"]["id"] == "cus_9"
    assert found.open_reviews == {}
    again = await store.identity_lookup("customer", [("mkt", "m7")], [])
    assert list(again.open_reviews) == [("mkt", "m7")]
    assert (await store.identity("idn_1")) == ident
    assert [i.id for i in await store.search_identities("customer", "cus_9")] == ["idn_1"]
    assert [i.id for i in await store.search_identities(None, "idn_1@example.com")] == ["idn_1"]
    assert [i.id for i in await store.all_identities("customer")] == ["idn_1"]
    assert await store.all_identities("customer", after="idn_1") == []

    [c] = await store.conflicts("customer")
    assert (c["field"], c["winner"], c["status"]) == ("name", "crm", "settled")
    assert [v["value"] for v in c["values"]] == ["Ada", "Ada L."]
    assert await store.conflict(c["id"]) == c
    [r] = await store.reviews("customer")
    assert (r["record_id"], r["candidates"], r["status"]) == ("m7", ["idn_1"], "open")
    stats = await store.identity_stats("customer")
    assert stats["identities"] == 1 and stats["linked"] == {"billing": 1, "crm": 1}
    assert stats["conflicts"] == {"settled": 1} and stats["reviews"] == {"open": 1}


async def test_an_identity_rewritten_moves_its_links_and_decisions_are_audited(store: Store):
    from patchbay.store.base import IdentityChanges, NewReview

    await store.accept_synced([], IdentityChanges("customer", [_identity("idn_2", crm="1")]))
    moved = _identity("idn_2", crm="2")
    moved.status = "archived"
    review = NewReview("customer", "mkt", "m1", {}, [], "two match", 1.0)
    await store.accept_synced([], IdentityChanges("customer", [moved], reviews=[review]))
    assert (await store.identity_lookup("customer", [("crm", "1")], [])).by_link == {}
    assert (await store.identity_lookup("customer", [("crm", "2")], [])).by_link == {("crm", "2"): "idn_2"}
    assert (await store.identity_stats("customer"))["status"] == {"archived": 1}
    # The delete guard's count: identities deleted or archived since a time.
    assert (await store.identity_stats("customer", closed_since=moved.updated_at))["closed_since"] == 1
    assert (await store.identity_stats("customer", closed_since=moved.updated_at + 1))["closed_since"] == 0
    [r] = await store.reviews("customer")
    done = IdentityChanges(
        "customer", resolve_reviews=[(r["id"], "dismissed", {"decision": "dismissed"})], by=ALICE
    )
    await store.accept_synced([], done)
    assert await store.reviews("customer") == []
    assert (await store.review(r["id"]))["status"] == "dismissed"  # type: ignore[index]
    [entry] = await store.audit_log(AuditFilter(action="review.resolve"))
    assert entry["actor"] == "alice" and entry["target"] == str(r["id"])


# ------------------------------------------------------------------ windows and dedupe keys (NewEvent.claims, .windows)
DAILY = [("orders", "daily")]


def window_add(
    start: float,
    key: str = '"shop-1"',
    *,
    length: float = 60.0,
    grace: float = 0.0,
    keep: float | None = None,
    **values: Contribution,
) -> WindowAdd:
    return WindowAdd(
        step="daily",
        key=key,
        start=start,
        end=start + length,
        grace_s=grace,
        keep_s=keep,
        label=f"w{start:.0f}",
        values=values or {"orders": Contribution(1)},
        trace_at=1,
    )


def counted(add: WindowAdd, flow: str = "orders") -> NewEvent:
    e = event(flow, status="aggregated")
    e.windows = [add]
    e.trace = [{"step": "map"}, {"step": "daily", "kind": "aggregate"}]
    return e


def claimed(key: str, within: float = 60.0, flow: str = "leads", **kw: Any) -> NewEvent:
    e = event(flow, **kw)
    e.claims = [DedupeClaim("once", key, within, 1)]
    e.trace = [{"step": "map"}, {"step": "once", "kind": "dedupe"}, {"step": "route"}]
    return e


async def test_records_add_to_their_window_and_close_with_the_totals(store: Store) -> None:
    start = time.time() + 1000  # open for a while
    amounts = [19.99, 5, 0.01]
    for i, amount in enumerate(amounts):
        values = {
            "orders": Contribution(1),
            "revenue": Contribution(1, num=float(amount), scale=2 if i != 1 else 0, is_float=i != 1),
            "smallest": Contribution(1, extreme=amount),
            "largest": Contribution(1, extreme=amount),
            "customers": Contribution(1, item=f'"c{i % 2}"'),
            "coupons": Contribution(0),
        }
        acc = await store.accept(counted(window_add(start, **values)))
        assert acc.status is None and not acc.duplicate
    await store.accept(counted(window_add(start, key='"shop-2"')))
    assert await store.open_windows() == {"orders": 2}
    assert await store.closable_windows(start + 59, 10, DAILY) == []  # not yet closed
    assert await store.closable_windows(start + 60, 10, [("orders", "hourly"), ("other", "daily")]) == []
    due = await store.closable_windows(start + 60, 10, DAILY)
    assert [(w.key, w.adds, w.revision) for w in due] == [('"shop-1"', 3, 1), ('"shop-2"', 1, 1)]
    v = due[0].values
    assert (v["orders"].n, v["coupons"].n, v["customers"].distinct) == (3, 0, 2)
    assert round(v["revenue"].total, 2) == 25.0 and v["revenue"].scale == 2 and v["revenue"].is_float
    assert (v["smallest"].lo, v["largest"].hi) == (0.01, 19.99)
    run = await store.get_run((await store.list_runs(RunFilter(flow="orders")))[-1]["id"])
    assert run is not None and run["status"] == "aggregated" and run["deliveries"] == []


async def test_emitting_a_window_is_once_per_revision(store: Store) -> None:
    start = time.time() - 120  # ended a minute ago: records are late, but the window can be emitted
    for _ in range(2):
        await store.accept(counted(window_add(start, grace=1000)))
    [w] = await store.closable_windows(start + 2000, 10, DAILY)
    out = event("orders", dedupe_key="window:daily:1:r1")
    acc = await store.emit_window(out, w)
    assert not acc.duplicate
    assert await store.closable_windows(start + 2000, 10, DAILY) == []
    assert await store.open_windows() == {}
    again = await store.emit_window(event("orders", dedupe_key="window:daily:1:r1"), w)
    assert again.duplicate and again.event_id == out.id  # closing twice never emits twice
    assert len(await due(store)) == 1


async def test_a_late_record_is_quarantined_with_the_reason(store: Store) -> None:
    start = time.time() - 120
    late = counted(window_add(start, grace=30))
    acc = await store.accept(late)
    assert acc.status == "quarantined" and "late for window" in (acc.reason or "")
    run = await store.get_run(late.id)
    assert run is not None and run["status"] == "quarantined" and run["reason"] == acc.reason
    assert run["trace"][-1]["kind"] == "aggregate" and run["trace"][-1]["error"] == [acc.reason]
    assert await store.open_windows() == {}  # nothing counted


async def test_a_record_after_its_window_was_emitted_is_late(store: Store) -> None:
    start = time.time() - 30
    await store.accept(counted(window_add(start, grace=1000)))
    [w] = await store.closable_windows(start + 2000, 10, DAILY)
    await store.emit_window(event("orders", dedupe_key="w1"), w)
    acc = await store.accept(counted(window_add(start, grace=1000)))  # in its grace, but emitted already
    assert acc.status == "quarantined"


async def test_a_late_record_revises_its_window_when_asked(store: Store) -> None:
    start = time.time() - 120
    await store.accept(counted(window_add(start, grace=1000, keep=3600)))
    [w] = await store.closable_windows(start + 2000, 10, DAILY)
    await store.emit_window(event("orders", dedupe_key="r1"), w)
    acc = await store.accept(counted(window_add(start, grace=0, keep=3600)))
    assert acc.status is None  # counted
    assert await store.closable_windows(time.time(), 10, DAILY) == []  # a revision waits briefly for others
    [r2] = await store.closable_windows(time.time() + 60, 10, DAILY)
    assert (r2.revision, r2.adds, r2.values["orders"].n) == (2, 2, 2)
    too_late = await store.accept(counted(window_add(start - 7200, grace=0, keep=60)))
    assert too_late.status == "quarantined" and "too late" in (too_late.reason or "")


async def test_emitted_windows_are_let_go_after_their_keep_time(store: Store) -> None:
    start = time.time() - 120
    await store.accept(counted(window_add(start, grace=1000)))
    [w] = await store.closable_windows(start + 2000, 10, DAILY)
    assert await store.tidy_windows(start + 2000) == (0, 0)  # not emitted yet: kept
    await store.emit_window(event("orders", dedupe_key="t1"), w)
    assert await store.tidy_windows(start + 2000) == (1, 0)
    assert await store.closable_windows(start + 5000, 10, DAILY) == []


async def test_concurrent_records_with_one_dedupe_key_let_exactly_one_through(store: Store) -> None:
    events = [claimed("k1") for _ in range(10)]
    results = await asyncio.gather(*(store.accept(e) for e in events))
    passed = [e for e, r in zip(events, results, strict=True) if r.status is None]
    assert len(passed) == 1
    first = passed[0].id
    for e, r in zip(events, results, strict=True):
        if e.id == first:
            continue
        assert (r.status, r.reason) == ("filtered", f"once: duplicate of run {first}")
        run = await store.get_run(e.id)
        assert run is not None and run["status"] == "filtered" and run["deliveries"] == []
        assert run["trace"] == [{"step": "map"}, {"step": "once", "kind": "dedupe", "dropped": r.reason}]
    assert len(await due(store, "leads")) == 1
    assert not (await store.accept(claimed("k2"))).status  # another key passes


async def test_a_dedupe_key_is_claimed_only_by_a_record_that_gets_through(store: Store) -> None:
    assert (await store.accept(claimed("k", status="quarantined", reason="bad"))).status is None
    assert (await store.accept(claimed("k", status="filtered", reason="no destination"))).status is None
    assert (await store.accept(claimed("k"))).status is None  # the first to get through
    assert (await store.accept(claimed("k"))).status == "filtered"


def split_claims(keys: list[str], flow: str = "leads") -> NewEvent:
    """A split event: element i claims keys[i] and has its own delivery `<event>.<i>.crm`."""
    e = event(flow, destinations=())
    e.deliveries = [NewDelivery("crm", {"i": i}, f"{e.id}.{i}.crm") for i in range(len(keys))]
    e.claims = [DedupeClaim("once", k, 60.0, 1 + i, element=str(i)) for i, k in enumerate(keys)]
    e.trace = [
        {"step": "items", "kind": "split"},
        *({"step": "once", "element": str(i)} for i in range(len(keys))),
    ]
    return e


async def test_a_split_elements_claim_drops_that_element_alone(store: Store) -> None:
    first = split_claims(["a", "b", "a"])
    acc = await store.accept(first)
    assert acc.status is None  # the event goes on
    run = await store.get_run(first.id)
    assert run is not None
    assert sorted(d["idempotency_key"] for d in run["deliveries"]) == [
        f"{first.id}.0.crm",
        f"{first.id}.1.crm",
    ]
    reason = f"once: duplicate of run {first.id} (element 0)"
    assert {"step": "once", "kind": "dedupe", "element": "2", "dropped": reason} in run["trace"]
    second = split_claims(["c", "b"])  # b is held by element 1 of the first run
    assert (await store.accept(second)).status is None
    run = await store.get_run(second.id)
    assert run is not None and [d["idempotency_key"] for d in run["deliveries"]] == [f"{second.id}.0.crm"]
    third = split_claims(["b", "c"])  # every element a duplicate: filtered
    await store.accept(third)
    run = await store.get_run(third.id)
    assert run is not None and run["status"] == "filtered" and run["deliveries"] == []
    assert f"element 1: once: duplicate of run {second.id} (element 0)" in run["reason"]
    assert len(await due(store, "leads")) == 3


async def test_dedupe_keys_expire_and_are_cleaned_up(store: Store) -> None:
    assert (await store.accept(claimed("k", within=0.2))).status is None
    assert (await store.accept(claimed("k", within=0.2))).status == "filtered"
    await asyncio.sleep(0.3)
    assert (await store.accept(claimed("k", within=0.2))).status is None  # seen again after the window
    assert await store.tidy_windows(time.time() + 1) == (0, 1)


async def test_replay_counts_a_fixed_quarantined_record_into_its_window(store: Store) -> None:
    start = time.time() + 1000
    q = event("orders", body={"email": "x@example.com"}, status="quarantined", reason="bad")
    await store.accept(q)

    class Counting(Steps):
        def process(self, record: Any, event_id: str, **kw: Any) -> Processed:
            return Processed(
                "aggregated", [{"step": "daily", "kind": "aggregate"}], windows=[window_add(start)]
            )

    rep = await store.replay({"orders": Counting()}, [q.id], None, ALICE)
    assert rep.requeued == [q.id]
    run = await store.get_run(q.id)
    assert run is not None and run["status"] == "aggregated" and run["reason"] is None
    [w] = await store.closable_windows(start + 60, 10, DAILY)
    assert w.adds == 1


async def test_replay_of_a_dead_run_passes_its_own_dedupe_key(store: Store) -> None:
    e = claimed("k", flow="orders", body={"email": "a@example.com"})
    await store.accept(e)
    for d in await due(store):
        await store.record([result(d, "terminal", "dead", status_code=422, error="rejected")])

    class Deduping(Steps):
        def process(self, record: Any, event_id: str, **kw: Any) -> Processed:
            out = super().process(record, event_id)
            out.claims = [DedupeClaim("once", "k", 60.0, 1)]
            return out

    rep = await store.replay({"orders": Deduping()}, [e.id], None, ALICE)
    assert rep.requeued == [e.id]  # the key is its own
    assert (await store.accept(claimed("k", flow="orders"))).status == "filtered"  # and still held


async def test_purge_keeps_the_run_of_a_create_whose_id_the_identity_map_still_waits_for(store: Store):
    from patchbay.store.base import IdentityChanges

    e = event("crm_sync")  # a create sent to the marketing system (destination "crm" in these helpers)
    ident = _identity("idn_p", crm="45")
    ident.systems["mkt"] = {
        "id": None,
        "seen": {},
        "written": {"email": {"value": "ada@example.com", "at": 1.0, "event": e.id}},
        "pending": {"event": e.id, "destination": "crm", "at": 1.0},
    }
    await store.accept_synced([e], IdentityChanges("customer", [ident]))
    [d] = await due(store, flow="crm_sync")
    await store.record([result(d, "success", "delivered", response={"id": "m-9"})])
    later = time.time() + 10
    assert await store.purge_runs("crm_sync", ("delivered", "filtered"), later) == 0
    assert await store.response_fields(e.id, "crm") == {"id": "m-9"}  # still there for the map to read
    waiting = await store.pending_creates("customer", older_than=2.0)
    assert [(p["identity_id"], p["system"], p["event_id"], p["destination"]) for p in waiting] == [
        ("idn_p", "mkt", e.id, "crm")
    ]
    assert await store.pending_creates("customer", older_than=0.5) == []  # not that old
    ident.systems["mkt"].update(id="m-9", pending=None)  # linked: the map no longer needs the run
    await store.accept_synced([], IdentityChanges("customer", [ident]))
    assert await store.pending_creates("customer", older_than=later) == []
    assert await store.purge_runs("crm_sync", ("delivered", "filtered"), later) == 1


# ------------------------------------------------------------------ claims: per-key order, leases, slots, tokens
def keyed(key: str | None, dest: str = "crm", body: Any = None) -> NewEvent:
    """An event whose one delivery to `dest` is ordered by `key` (a destination's `order_by`)."""
    e = event(body=body, destinations=(dest,))
    e.deliveries[0].order_key = key
    return e


async def test_ordered_deliveries_go_one_at_a_time_per_key_in_arrival_order(store: Store) -> None:
    a1, b1, a2, b2, free, a3 = (keyed(k) for k in ("a", "b", "a", "b", None, "a"))
    for e in (a1, b1, a2, b2, free, a3):
        await store.accept(e)
    # only each key's oldest is due (and deliveries without a key, as before)
    assert [d.event_id for d in await due(store)] == [a1.id, b1.id, free.id]
    [da1, db1, _] = await due(store)
    await store.record([result(db1, "success", "delivered")])
    assert [d.event_id for d in await due(store)] == [a1.id, b2.id, free.id]
    # a retrying delivery holds back the later ones of its key, not other keys
    later = time.time() + 600
    await store.record([result(da1, "transient", "pending", next_at=later, consumed_retry=True)])
    assert [d.event_id for d in await due(store)] == [b2.id, free.id]
    [held] = await store.held_keys("orders", "crm")
    assert (held["key"], held["event_id"], held["status"], held["waiting"]) == ("a", a1.id, "retrying", 2)
    assert held["next_at"] == pytest.approx(later) and "HTTP 503" in held["reason"]
    [db2, dfree] = await due(store)
    await store.record([result(db2, "success", "delivered"), result(dfree, "success", "delivered")])
    assert await due(store) == []
    assert await next_due_at(store) == pytest.approx(later)  # a2 waits for a1, not due
    # a dead letter blocks its key until it is replayed or discarded
    [da1] = await due(store, now=later + 1)
    await store.record([result(da1, "terminal", "dead", status_code=422, error="rejected")])
    assert await due(store, now=later + 1) == []
    [held] = await store.held_keys("orders", "crm")
    assert (held["key"], held["status"], held["waiting"]) == ("a", "dead", 2)
    assert "dead letter" in held["reason"] and "replay or discard" in held["reason"]
    await store.discard([a1.id], None, ALICE)
    assert [d.event_id for d in await due(store)] == [a2.id]
    assert await store.held_keys("orders", "crm") == []
    assert await store.held_keys("orders", "other") == []


async def test_a_replayed_dead_letter_goes_first_again_in_its_key(store: Store) -> None:
    class KeyedSteps(Steps):
        def process(self, record: Any, event_id: str, **kw: Any) -> Processed:
            out = super().process(record, event_id, **kw)
            for d in out.deliveries:
                d.order_key = "k"
            return out

    first, second = keyed("k", body={"email": "a@example.com"}), keyed("k", body={"email": "b@example.com"})
    await store.accept(first)
    await store.accept(second)
    [d] = await due(store)
    await store.record([result(d, "terminal", "dead", status_code=422, error="rejected")])
    rep = await store.replay({"orders": KeyedSteps()}, [first.id], None, ALICE)
    assert rep.requeued == [first.id]
    assert [d.event_id for d in await due(store)] == [first.id]  # its place in the key kept


async def test_claims_renew_and_release(store: Store) -> None:
    for _ in range(3):
        await store.accept(event())
    rows = await due(store)
    ids = {d.id for d in rows}
    assert await store.renew("orders", "crm", ids) == ids  # held: queued or in flight
    await store.release("orders", "crm", ids)
    assert {d.id for d in await due(store)} == ids  # due again, for any worker
    await store.record([result(rows[0], "success", "delivered")])
    assert await store.renew("orders", "crm", ids) == ids - {rows[0].id}  # recorded: not held any more


async def test_sending_slots_are_bounded_by_the_limit(store: Store) -> None:
    assert await store.take_slots("orders", "crm", limit=2, want=5) == 2
    assert await store.take_slots("orders", "crm", limit=2, want=1) == 1
    assert await store.take_slots("orders", "crm", limit=4, want=4) == 4
    assert await store.take_slots("orders", "chat", limit=1, want=1) == 1  # per destination
    assert await store.take_slots("orders", "crm", limit=4, want=0) == 0


async def test_tokens_come_from_one_bucket_per_destination(store: Store) -> None:
    t = 1000.0
    assert await store.take_tokens("orders", "crm", 10.0, 5.0, 3, t) == (3, 0.0)  # a full bucket: burst 5
    granted, wait = await store.take_tokens("orders", "crm", 10.0, 5.0, 3, t)
    assert granted == 2 and wait == 0.0
    granted, wait = await store.take_tokens("orders", "crm", 10.0, 5.0, 3, t)
    assert granted == 0 and wait == pytest.approx(0.1)  # one token more in 1/rate s
    assert (await store.take_tokens("orders", "crm", 10.0, 5.0, 3, t + 0.25))[0] == 2  # refilled 2.5
    assert (await store.take_tokens("orders", "chat", 10.0, 5.0, 3, t))[0] == 3


# ================================================================== cluster: the processes sharing the store
def node(node_id: str = "host-a:1", at: float | None = None, **kw: Any) -> NodeRow:
    now = time.time() if at is None else at
    fields: dict[str, Any] = {
        "host": "host-a",
        "pid": 1,
        "roles": ("web", "worker"),
        "version": "1.2.3",
        "port": 8787,
        "started_at": now,
        "heartbeat_at": now,
    }
    return NodeRow(node_id, **{**fields, **kw})


async def test_a_node_joins_beats_and_leaves(store: Store) -> None:
    now = time.time()
    me = node(at=now - 30)
    assert await store.join_cluster(me, alive_within=10) is None
    assert await store.join_cluster(node("host-b:2", host="host-b", pid=2, roles=("scheduler",)), 10) is None
    [a, b] = await store.nodes(now)
    assert (a.id, a.host, a.pid, a.roles, a.version, a.port) == (
        "host-a:1",
        "host-a",
        1,
        ("web", "worker"),
        "1.2.3",
        8787,
    )
    assert b.roles == ("scheduler",) and a.claims == 0
    assert a.status(now, 10) == "lost"  # no heartbeat for 30 s
    assert await store.heartbeat(me.id, me.started_at, now, port=9000)
    [a, _] = await store.nodes(now)
    assert a.status(now, 10) == "up" and a.heartbeat_at == pytest.approx(now) and a.port == 9000
    await store.leave_cluster(me.id, me.started_at, now + 1)
    [a, _] = await store.nodes(now + 1)
    assert a.status(now + 1, 10) == "stopped" and a.stopped_at == pytest.approx(now + 1)
    assert not await store.heartbeat(me.id, me.started_at, now + 2)  # a stopped row is not brought back


async def test_a_live_node_id_is_refused_a_lost_or_stopped_one_taken_over(store: Store) -> None:
    now = time.time()
    first = node(at=now)
    assert await store.join_cluster(first, alive_within=10) is None
    second = node(pid=2, at=now + 1)
    held = await store.join_cluster(second, alive_within=10)  # the first one beats: alive
    assert held is not None and held.pid == 1
    assert [n.pid for n in await store.nodes(now)] == [1]  # nothing written
    lost = node(pid=3, at=now + 11)  # 11 s without a heartbeat of the first: lost, its id free again
    assert await store.join_cluster(lost, alive_within=10) is None
    assert not await store.heartbeat(first.id, first.started_at, now + 12)  # the first's row is gone
    await store.leave_cluster(lost.id, lost.started_at, now + 12)
    assert await store.join_cluster(node(pid=4, at=now + 13), alive_within=10) is None  # stopped: free
    assert await store.join_cluster(node(pid=5, at=now + 14), alive_within=10, force=True) is None
    assert [n.pid for n in await store.nodes(now + 14)] == [5]


async def test_old_node_rows_are_removed_when_a_node_joins(store: Store) -> None:
    now = time.time()
    await store.join_cluster(node("gone:1", at=now - 7200), 10)
    await store.leave_cluster("gone:1", now - 7200, now - 7200)  # stopped two hours ago
    await store.join_cluster(node("lost:1", at=now - 2 * 86400), 10)  # lost two days ago
    await store.join_cluster(node("lost:2", at=now - 600), 10)  # lost ten minutes ago: still shown
    await store.join_cluster(node("new:1", at=now), 10)
    assert [n.id for n in await store.nodes(now)] == ["lost:2", "new:1"]


async def test_a_nodes_claims_come_from_its_heartbeat_where_leases_are_not_in_the_store(store: Store) -> None:
    """One rule for the cluster view's CLAIMS: the deliveries' leases where they are rows (PostgreSQL), the
    figure each node writes with its heartbeat where they are in its memory (SQLite: no other reader knows it)."""
    for _ in range(2):
        await store.accept(event())
    claimed = await store.due("orders", "crm", time.time() + 1, 10, set())
    assert len(claimed) == 2  # on PostgreSQL leased to the node this store is
    now = time.time()
    holder = getattr(store, "holder", "host-a:1") if store.leases_in_store else "host-a:1"
    me = node(holder, at=now)
    assert await store.join_cluster(me, alive_within=10) is None
    [n] = await store.nodes(now)
    assert n.claims == (2 if store.leases_in_store else 0)  # a new row has none of its own figure yet
    assert await store.heartbeat(me.id, me.started_at, now + 1, claims=7)
    [n] = await store.nodes(now + 1)
    assert n.claims == (2 if store.leases_in_store else 7)  # PostgreSQL: the deliveries stay the truth
    assert await store.heartbeat(me.id, me.started_at, now + 2, claims=3)
    [n] = await store.nodes(now + 2)
    assert n.claims == (2 if store.leases_in_store else 3)
    await store.leave_cluster(me.id, me.started_at, now + 3)
    [n] = await store.nodes(now + 3)
    assert n.status(now + 3, 10) == "stopped"
    if not store.leases_in_store:
        assert n.claims == 0  # a clean stop holds nothing


async def test_a_store_that_is_not_shared_announces_to_nobody(store: Store) -> None:
    """SQLite: one process per file; PostgreSQL: NOTIFY (tests/store/test_postgres_store.py hears it)."""
    heard: list[tuple[str, bool]] = []
    if not store.shared:
        store.listen(lambda flow, rescan: heard.append((flow, rescan)))
        await store.announce(["orders"])
        await asyncio.sleep(0.05)
        assert heard == []


async def test_a_gone_nodes_claims_are_let_go(store: Store) -> None:
    for _ in range(2):
        await store.accept(event())
    due = await store.due("orders", "crm", time.time() + 1, 10, set())
    assert len(due) == 2
    assert await store.release_claims(["nobody"]) == 0
    if store.leases_in_store:  # PostgreSQL: claims are rows (SQLite keeps them in its one worker's memory)
        [n] = {store.holder}
        assert await store.take_slots("orders", "crm", 4, 4) == 4  # its destination's sending slots too
        assert await store.release_claims([n]) == 2
        assert len(await store.due("orders", "crm", time.time() + 1, 10, set())) == 2
        slots = await store.read(lambda c: c.execute("SELECT holder, until FROM delivery_slots").fetchall())
        wants = await store.read(lambda c: c.execute("SELECT COUNT(*) FROM delivery_wants").fetchone()[0])
        assert sorted(slots) == [(None, 0)] * 4 and wants == 0


# ------------------------------------------------------------------ leases (one holder per name, fencing)
async def test_a_lease_is_taken_renewed_by_its_holder_and_refused_to_another(store: Store) -> None:
    assert await store.leases() == []
    token = await store.take_lease("schedule:nightly", "node-a", 30.0)
    assert token is not None
    assert await store.take_lease("schedule:nightly", "node-b", 30.0) is None  # held: refused
    assert await store.take_lease("schedule:nightly", "node-a", 30.0) == token  # renewed: same fence
    assert await store.take_lease("alerts", "node-b", 30.0) is not None  # another name: its own lease
    [alerts, nightly] = await store.leases()
    assert (nightly.name, nightly.holder, nightly.fence) == ("schedule:nightly", "node-a", token)
    assert nightly.until > time.time() + 25 and nightly.taken_at <= time.time()
    assert (alerts.name, alerts.holder) == ("alerts", "node-b")


async def test_an_expired_or_released_lease_goes_to_the_next_taker_with_a_higher_fence(store: Store) -> None:
    first = await store.take_lease("windows", "node-a", 0.05)
    assert first is not None
    await asyncio.sleep(0.15)  # node-a stopped renewing: the lease runs out
    second = await store.take_lease("windows", "node-b", 30.0)
    assert second is not None and second > first
    assert await store.take_lease("windows", "node-a", 30.0) is None  # the old holder cannot renew it
    await store.release_lease("windows", "node-a")  # not its lease: nothing happens
    assert (await store.leases())[0].holder == "node-b"
    await store.release_lease("windows", "node-b")
    [released] = await store.leases()
    assert released.holder is None
    third = await store.take_lease("windows", "node-a", 30.0)  # free at once after a release
    assert third is not None and third > second


async def test_one_of_many_concurrent_takers_gets_a_free_lease(store: Store) -> None:
    tokens = await asyncio.gather(*(store.take_lease("retention", f"node-{i}", 30.0) for i in range(6)))
    assert sum(t is not None for t in tokens) == 1


async def test_writes_under_a_lost_fence_fail_and_change_nothing(store: Store) -> None:
    token = await store.take_lease("schedule:pull", "node-a", 0.05)
    assert token is not None
    mine = Fence("schedule:pull", "node-a", token)
    await store.update_schedule("pull", {"next_due_at": 100.0}, fence=mine)  # held: written
    await store.accept_batch([event("pull", dedupe_key="r1")], "pull", {"page": 1}, fence=mine)
    await asyncio.sleep(0.15)
    # Expired but nobody took it: still this holder's, so its writes are harmless and go through.
    await store.update_schedule("pull", {"next_due_at": 150.0}, fence=mine)
    assert await store.take_lease("schedule:pull", "node-b", 30.0) is not None  # node-a paused; b takes
    with pytest.raises(LeaseLost, match="schedule:pull"):
        await store.update_schedule("pull", {"next_due_at": 200.0}, count_run=True, fence=mine)
    with pytest.raises(LeaseLost):
        await store.accept_batch([event("pull", dedupe_key="r2")], "pull", {"page": 2}, fence=mine)
    alerts = Fence("alerts", "node-a", token)  # never this node's: its alert message is refused
    with pytest.raises(LeaseLost):
        await store.accept_alert(
            event("_alerts"), AlertChange("r", "s", "firing", 1.0, "", 1.0), fence=alerts
        )
    assert await store.list_runs(RunFilter(flow="_alerts")) == []
    row = await store.schedule("pull")
    assert row is not None and (row["next_due_at"], row["runs"]) == (150.0, 0)
    assert await store.cursor("pull") == {"page": 1}
    assert len(await store.list_runs(RunFilter(flow="pull"))) == 1


async def test_a_schedule_keeps_the_tick_of_its_last_run(store: Store) -> None:
    await store.update_schedule(
        "pull", {"last_started_at": 101.5, "last_due_at": 100.0, "next_due_at": 160.0}
    )
    row = await store.schedule("pull")
    assert row is not None and row["last_due_at"] == 100.0
