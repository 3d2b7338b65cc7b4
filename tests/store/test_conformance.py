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

from patchbay.errors import PatchbayError
from patchbay.store.base import (
    Actor,
    AttemptResult,
    AuditFilter,
    NewDelivery,
    NewEvent,
    RunFilter,
    SecretRow,
    SecretRows,
    Store,
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


async def test_next_due_at_is_the_earliest_pending(store: Store) -> None:
    assert await store.next_due_at("orders", "crm") is None
    await store.accept(event(received_at=1000.0))
    await store.accept(event(received_at=900.0))
    assert await store.next_due_at("orders", "crm") == 900.0


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
    later = time.time() + 600
    await store.record([result(d, "transient", "pending", next_at=later, consumed_retry=True)])
    assert await due(store) == []  # not before next_at
    assert await store.next_due_at("orders", "crm") == pytest.approx(later)
    [d] = await due(store, now=later + 1)
    assert (d.attempts, d.retries) == (1, 1)
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


class Steps:
    """A flow's steps as configured now: valid when the record has an email."""

    def __init__(self, destinations: tuple[str, ...] = ("crm",)) -> None:
        self.destinations = destinations

    def load_payload(self, payload: bytes) -> Any:
        record = orjson.loads(payload)
        if record.get("sealed"):
            raise PatchbayError("opening the sealed fields: no key")
        return record

    def process(self, record: Any, event_id: str) -> Processed:
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
    assert await store.compress_runs("orders", time.time() + 10) == 2
    assert await store.compress_runs("orders", time.time() + 10) == 0  # already compressed
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
    [r] = await store.reviews("customer")
    done = IdentityChanges(
        "customer", resolve_reviews=[(r["id"], "dismissed", {"decision": "dismissed"})], by=ALICE
    )
    await store.accept_synced([], done)
    assert await store.reviews("customer") == []
    assert (await store.review(r["id"]))["status"] == "dismissed"  # type: ignore[index]
    [entry] = await store.audit_log(AuditFilter(action="review.resolve"))
    assert entry["actor"] == "alice" and entry["target"] == str(r["id"])
