"""What only the PostgreSQL store does: round trips of the hot path, delivery leases shared by several
hubs, the cluster's claims and wake-ups, and `check` on a store it cannot reach. (Its behaviour otherwise is the
conformance suite's, run on both stores.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.errors import StoreUnavailable
from patchbay.security.vault import MasterKey
from patchbay.store.base import Accepted, NodeRow
from patchbay.store.postgres import PostgresStore
from patchbay.store.postgres.ops import LEASE_S
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, lead_project, postgres_url
from tests.store.test_conformance import event, result


async def test_an_event_and_its_deliveries_are_one_statement_and_one_round_trip() -> None:
    s = PostgresStore(postgres_url())
    try:
        before = dict(s.counter)
        await s.accept(event(destinations=("crm", "erp", "mail")))
        assert (
            s.counter["statements"] - before["statements"],
            s.counter["round_trips"] - before["round_trips"],
        ) == (
            1,
            1,
        )
        before = dict(s.counter)
        due = await s.due("orders", "crm", time.time() + 1, 10, set())
        await s.record([result(d, "success", "delivered") for d in due])
        assert s.counter["round_trips"] - before["round_trips"] == 2  # claim the batch, record the batch
    finally:
        await s.close()


def _committed(url: str, ids: list[str]) -> set[str]:
    """The event ids among `ids` that another connection sees (committed)."""
    import psycopg

    from patchbay.store.postgres.store import _split_schema

    conninfo, schema = _split_schema(url)
    with psycopg.connect(conninfo, autocommit=True, options=f"-c search_path={schema}") as conn:
        rows = conn.execute("SELECT id FROM events WHERE id = ANY(%s)", (ids,)).fetchall()
    return {r[0] for r in rows}


async def test_concurrent_accepts_share_one_statement_and_one_commit_each_committed_before_it_returns() -> (
    None
):
    url = postgres_url()
    s = PostgresStore(url)
    try:
        events = [event(destinations=("crm", "erp")) for _ in range(40)]

        async def accept_and_look(e: object) -> bool:
            accepted = await s.accept(e)  # type: ignore[arg-type]
            return _committed(url, [accepted.event_id]) == {accepted.event_id}

        before = dict(s.counter)
        seen = await asyncio.gather(*(accept_and_look(e) for e in events))
        assert all(seen)  # each one committed when its accept returned (the 202 comes after)
        assert s.counter["transactions"] - before["transactions"] <= 10  # not one COMMIT per event
        due = await s.due("orders", "erp", time.time() + 1, 100, set())
        assert [d.event_id for d in due] == [e.id for e in events]  # arrival order kept in the group
    finally:
        await s.close()


async def test_a_duplicate_in_the_same_group_is_answered_as_a_duplicate_of_the_first() -> None:
    s = PostgresStore(postgres_url())
    try:
        first = event(body={"a": 1}, dedupe_key="k1")
        same = event(body={"a": 1}, dedupe_key="k1")
        other_body = event(body={"a": 2}, dedupe_key="k1")
        rest = [event() for _ in range(5)]
        got = await asyncio.gather(*(s.accept(e) for e in [*rest[:2], first, same, other_body, *rest[2:]]))
        assert got[2] == Accepted(first.id)
        assert got[3] == Accepted(first.id, duplicate=True, conflict=False)
        assert got[4] == Accepted(first.id, duplicate=True, conflict=True)
        assert [a.event_id for a in got[:2] + got[5:]] == [e.id for e in rest]
        assert len(await s.due("orders", "crm", time.time() + 1, 100, set())) == 6
    finally:
        await s.close()


async def test_one_event_that_cannot_be_written_fails_alone_the_rest_of_its_group_is_committed() -> None:
    url = postgres_url()
    s = PostgresStore(url)
    try:
        first = event()
        await s.accept(first)
        good = [event() for _ in range(8)]
        bad = event(body={"other": True})
        bad.id = first.id  # an id already taken: the insert is refused
        got = await asyncio.gather(
            *(s.accept(e) for e in [*good[:4], bad, *good[4:]]), return_exceptions=True
        )
        assert isinstance(got[4], Exception)
        assert [a.event_id for a in got[:4] + got[5:]] == [e.id for e in good]  # type: ignore[union-attr]
        assert _committed(url, [e.id for e in good]) == {e.id for e in good}
        assert (await s.get_run(first.id))["payload"] == orjson.loads(first.payload)  # type: ignore[index]
    finally:
        await s.close()


async def test_concurrent_records_share_one_statement_and_one_commit() -> None:
    s = PostgresStore(postgres_url())
    try:
        await asyncio.gather(*(s.accept(event()) for _ in range(30)))
        due = await s.due("orders", "crm", time.time() + 1, 100, set())
        before = dict(s.counter)
        await asyncio.gather(*(s.record([result(d, "success", "delivered")]) for d in due))
        assert s.counter["transactions"] - before["transactions"] <= 10  # not one COMMIT per attempt
        assert await s.due("orders", "crm", time.time() + 1, 100, set()) == []
        assert (await s.counts())["events"] == {"delivered": 30}
    finally:
        await s.close()


async def test_an_attempt_record_commits_without_waiting_for_the_wal_flush_an_accept_waits() -> None:
    """A record lost in a server crash means its delivery is sent again under its idempotency key (at least
    once); an accepted event is acknowledged to its sender, so its COMMIT waits for the flush."""
    s = PostgresStore(postgres_url())
    try:
        await s.accept(event())
        due = await s.due("orders", "crm", time.time() + 1, 100, set())
        await s.record([result(d, "success", "delivered") for d in due])
        levels = {}
        for name, groups in (("accept", s._accepts), ("record", s._records)):
            conns = [c for c in groups._conns if c is not None]
            assert conns, f"no {name} writer connected"
            levels[name] = {(await (await c.execute("SHOW synchronous_commit")).fetchone())[0] for c in conns}
        assert levels == {"accept": {"on"}, "record": {"off"}}
        assert (await s.counts())["events"] == {"delivered": 1}
    finally:
        await s.close()


def test_the_hot_path_runs_on_the_event_loop_and_an_accept_from_another_loop_is_written_too() -> None:
    """The group commits are tasks on the hub's event loop (no store thread between the accept and its
    COMMIT); a caller on another loop meanwhile (a CLI command, a thread's asyncio.run) is served on a thread."""
    import threading

    url = postgres_url()
    s = PostgresStore(url)

    async def main() -> None:
        first = await s.accept(event())
        assert [t.name for t in threading.enumerate() if t.name.startswith("patchbay-store-accept")] == []
        second = await asyncio.to_thread(lambda: asyncio.run(s.accept(event())))
        assert _committed(url, [first.event_id, second.event_id]) == {first.event_id, second.event_id}
        await s.close()

    asyncio.run(main())


async def test_two_hubs_share_the_feed_each_delivery_claimed_by_one_until_its_lease_runs_out() -> None:
    url = postgres_url()
    a, b = PostgresStore(url, holder="hub-a"), PostgresStore(url, holder="hub-b")
    try:
        for _ in range(10):
            await a.accept(event())
        now = time.time() + 1
        first = await a.due("orders", "crm", now, 6, set())
        second = await b.due("orders", "crm", now, 10, set())
        assert len(first) == 6 and len(second) == 4
        assert {d.id for d in first}.isdisjoint({d.id for d in second})
        assert [d.id for d in await a.due("orders", "crm", now, 10, set())] == [
            d.id for d in first
        ]  # its own
        await a.record([result(d, "success", "delivered") for d in first[:3]])
        # hub-a stops answering: past the lease, hub-b takes over what it held and never finished
        later = await b.due("orders", "crm", now + LEASE_S + 1, 10, set())
        assert {d.id for d in later} == {d.id for d in first[3:]} | {d.id for d in second}
    finally:
        await a.close()
        await b.close()


async def test_a_holder_that_lost_its_lease_learns_it_on_renewal() -> None:
    url = postgres_url()
    a, b = PostgresStore(url, holder="hub-a", lease_s=0.5), PostgresStore(url, holder="hub-b", lease_s=0.5)
    try:
        for _ in range(4):
            await a.accept(event())
        held = {d.id for d in await a.due("orders", "crm", time.time(), 10, set())}
        assert await a.renew("orders", "crm", held) == held
        time.sleep(0.6)  # hub-a missed its renewal: hub-b takes two over
        taken = {d.id for d in await b.due("orders", "crm", time.time(), 2, set())}
        assert len(taken) == 2 and await a.renew("orders", "crm", held) == held - taken
        await a.release("orders", "crm", held)
        rest = {d.id for d in await b.due("orders", "crm", time.time(), 10, taken)}
        assert rest == held - taken  # released: hub-b takes them at once, before any lease runs out
    finally:
        await a.close()
        await b.close()


async def test_next_due_skips_another_holders_live_claims_and_finds_them_once_their_lease_ran_out() -> None:
    """What an idle feed is woken for (Hub._watch_states): a claim given up by a dead worker, once its lease
    ran out; never what a live worker holds."""
    url = postgres_url()
    a, b = PostgresStore(url, holder="hub-a", lease_s=0.5), PostgresStore(url, holder="hub-b", lease_s=0.5)
    try:
        await a.accept(event())
        asked = [("orders", "crm"), ("orders", "chat")]
        assert set(await b.next_due(asked)) == {("orders", "crm")}
        [d] = await a.due("orders", "crm", time.time(), 10, set())
        assert await b.next_due(asked) == {}  # hub-a's claim
        assert set(await a.next_due(asked)) == {("orders", "crm")}  # its own
        time.sleep(0.6)  # hub-a died: its lease ran out
        assert (await b.next_due(asked))[("orders", "crm")] <= time.time()
        assert [x.id for x in await b.due("orders", "crm", time.time(), 10, set())] == [d.id]
    finally:
        await a.close()
        await b.close()


async def test_sending_slots_are_shared_fairly_and_never_more_than_the_limit() -> None:
    url = postgres_url()
    a, b, c = (PostgresStore(url, holder=f"hub-{x}", lease_s=0.5) for x in "abc")
    try:
        assert await a.take_slots("orders", "crm", 4, 4) == 4  # alone: all of them
        assert await b.take_slots("orders", "crm", 4, 4) == 0  # none free
        assert await a.take_slots("orders", "crm", 4, 4, busy=3) == 3  # its share is 2, but 3 are sending
        assert await a.take_slots("orders", "crm", 4, 4, busy=0) == 2  # then it lets go of its share's rest
        assert await b.take_slots("orders", "crm", 4, 4) == 2
        assert await c.take_slots("orders", "crm", 4, 4) == 0  # 2 + 2 held: c waits
        assert await a.take_slots("orders", "crm", 4, 0) == 0  # a is idle: it lets go of all
        assert await c.take_slots("orders", "crm", 4, 4) == 2  # share of 4 among b, c
        time.sleep(0.6)  # b and c die: their slots' leases run out
        assert await a.take_slots("orders", "crm", 4, 4) == 4
    finally:
        for s in (a, b, c):
            await s.close()


async def test_a_paused_process_in_the_middle_of_a_transaction_holds_its_locks_for_seconds_not_forever() -> (
    None
):
    """A process stopped inside a transaction (SIGSTOP, a frozen VM, a stall) holds that transaction's locks:
    here the sending slots' lock. Its leases run out, but a lock does not: every other worker would wait for
    it forever (a CI failure: the node that took a paused node's schedule over never sent). The server ends
    a transaction left idle longer than the store's `idle_in_transaction_s`, and its locks with it."""
    url = postgres_url()
    a = PostgresStore(url, holder="hub-a", idle_in_transaction_s=1.0)
    b = PostgresStore(url, holder="hub-b")
    paused, woken = threading.Event(), threading.Event()

    def stopped_inside_take_slots(conn: Any, *args: Any) -> None:
        a.claims.take_slots(conn, *args)  # the slots' lock taken...
        paused.set()
        woken.wait(10)  # ...and the process stopped before it commits

    try:
        frozen = asyncio.ensure_future(
            a._submit(stopped_inside_take_slots, "orders", "crm", 4, 4, 0, time.time())
        )
        await asyncio.to_thread(paused.wait, 5)
        started = time.monotonic()
        got = await asyncio.wait_for(b.take_slots("orders", "crm", 4, 4), 15)
        waited = time.monotonic() - started
        assert got == 4  # a's transaction ended uncommitted: every slot is free
        assert 0.5 < waited < 5, waited  # it waited for a's lock until the server ended a's transaction
        woken.set()
        with pytest.raises(StoreUnavailable):  # the woken process learns its transaction is gone
            await frozen
        assert await a.take_slots("orders", "crm", 4, 4) == 0  # and goes on on a fresh connection
    finally:
        woken.set()
        await a.close()
        await b.close()


async def test_one_token_bucket_for_every_holder() -> None:
    url = postgres_url()
    a, b = PostgresStore(url, holder="hub-a"), PostgresStore(url, holder="hub-b")
    try:
        t = 1000.0
        assert await a.take_tokens("orders", "crm", 10.0, 10.0, 6, t) == (6, 0.0)
        assert (await b.take_tokens("orders", "crm", 10.0, 10.0, 6, t))[0] == 4  # the same bucket
        assert (await a.take_tokens("orders", "crm", 10.0, 10.0, 6, t))[0] == 0
        assert (await b.take_tokens("orders", "crm", 10.0, 10.0, 6, t + 0.3))[0] == 3
    finally:
        await a.close()
        await b.close()


def test_processes_opening_a_new_schema_at_once_all_open_it() -> None:
    import threading

    url = postgres_url()
    start, errors = threading.Barrier(4), []

    def open_it() -> None:
        start.wait()
        try:
            PostgresStore.migrate_only(url)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


async def test_many_hubs_share_the_store_and_the_cluster_view_counts_each_ones_claims() -> None:
    url = postgres_url()
    a, b = PostgresStore(url, holder="hub-a"), PostgresStore(url, holder="hub-b")
    try:
        a.lock()
        b.lock()  # no one-hub lock: any number of hubs share a PostgreSQL store
        now = time.time()
        for holder in ("hub-a", "hub-b"):
            row = NodeRow(holder, "h", 1, ("worker",), "1", None, now, now)
            assert await a.join_cluster(row, alive_within=10) is None
        for _ in range(5):
            await a.accept(event())
        await a.due("orders", "crm", now + 1, 3, set())
        held = await b.due("orders", "crm", now + 1, 10, set())
        await b.record([result(held[0], "success", "delivered")])  # recorded: the claim is let go
        assert {n.id: n.claims for n in await a.nodes(now + 2)} == {"hub-a": 3, "hub-b": 1}
        assert {n.id: n.claims for n in await a.nodes(now + LEASE_S + 2)} == {"hub-a": 0, "hub-b": 0}
    finally:
        await a.close()
        await b.close()


async def test_processes_opening_a_new_store_at_once_all_open_it() -> None:
    """Several nodes of a cluster start together on a store nobody created yet: each opens it (one creates
    the schema, the others wait for it), none fails on the schema's creation."""
    for _ in range(3):
        opened, failed = open_together(postgres_url(), 6)
        for s in opened:
            await s.close()
        assert not failed, [str(e) for e in failed]
        assert len(opened) == 6


def open_together(url: str, n: int) -> tuple[list[PostgresStore], list[BaseException]]:
    """`n` threads open the store at `url` at the same moment: the stores opened, the errors raised."""
    import threading

    start = threading.Barrier(n)
    opened: list[PostgresStore] = []
    failed: list[BaseException] = []

    def open_it() -> None:
        start.wait()
        try:
            opened.append(PostgresStore(url, max_connections=1))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return opened, failed


async def test_an_announcement_reaches_the_listeners_of_the_same_schema_only() -> None:
    url = postgres_url()
    a, b, other = PostgresStore(url), PostgresStore(url), PostgresStore(postgres_url())
    heard: list[tuple[str, bool]] = []
    elsewhere: list[tuple[str, bool]] = []
    try:
        b.listen(lambda flow, rescan: heard.append((flow, rescan)))
        other.listen(lambda flow, rescan: elsewhere.append((flow, rescan)))
        await eventually(lambda: ("", True) in heard and ("", True) in elsewhere)  # listening (and a rescan)
        await a.announce(["orders", "leads"])
        await a.announce(["orders"], rescan=True)
        await eventually(lambda: len(heard) >= 4)
        assert heard[1:] == [("orders", False), ("leads", False), ("orders", True)]
        assert elsewhere == [("", True)]
    finally:
        for s in (a, b, other):
            await s.close()


async def test_a_backlog_report_reaches_the_other_processes_intake_and_wakes_no_worker() -> None:
    url = postgres_url()
    a, b = PostgresStore(url), PostgresStore(url)
    woken: list[tuple[str, bool]] = []
    told: list[tuple[str, bool]] = []
    try:
        b.listen(
            lambda flow, rescan: woken.append((flow, rescan)), lambda who, behind: told.append((who, behind))
        )
        await eventually(lambda: ("", True) in woken)
        await a.announce_intake("node-a", ["lead-capture/crm"], ["orders/erp"])
        await eventually(lambda: len(told) >= 2)
        assert told == [("lead-capture/crm on node-a", True), ("orders/erp on node-a", False)]
        await asyncio.sleep(0.1)
        assert woken == [("", True)]  # no worker is woken by it
    finally:
        for s in (a, b):
            await s.close()


async def test_a_process_that_does_not_deliver_hears_rescans_and_backlogs_but_no_new_deliveries() -> None:
    """Every listener heard every NOTIFY, so web processes woke each other at every accepted group: new
    deliveries go on a channel of their own, which only processes that deliver listen to."""
    url = postgres_url()
    sender, web, worker = PostgresStore(url), PostgresStore(url), PostgresStore(url)
    heard: dict[str, list[tuple[str, bool]]] = {"web": [], "worker": []}
    told: list[tuple[str, bool]] = []
    try:
        web.listen(
            lambda flow, rescan: heard["web"].append((flow, rescan)),
            lambda who, behind: told.append((who, behind)),
            deliveries=False,
        )
        worker.listen(lambda flow, rescan: heard["worker"].append((flow, rescan)))
        await eventually(lambda: heard == {"web": [("", True)], "worker": [("", True)]})
        await sender.announce(["lead-capture"])
        await sender.announce(["orders"], rescan=True)
        await sender.announce_intake("node-w", ["lead-capture/crm"], [])
        await eventually(lambda: len(heard["worker"]) >= 3 and len(told) >= 1)
        await asyncio.sleep(0.1)
        assert heard["worker"][1:] == [("lead-capture", False), ("orders", True)]
        assert heard["web"][1:] == [("orders", True)]  # a rescan: states changed
        assert told == [("lead-capture/crm on node-w", True)]
    finally:
        for s in (sender, web, worker):
            await s.close()


async def test_a_process_does_not_hear_its_own_announcements() -> None:
    """A process wakes its own workers in memory; its NOTIFY is for the others (as SQLite's wake is). Hearing
    it back cost a second wake, and a feed read, per accepted group."""
    url = postgres_url()
    a, b = PostgresStore(url), PostgresStore(url)
    mine: list[tuple[str, bool]] = []
    theirs: list[tuple[str, bool]] = []
    try:
        a.listen(lambda flow, rescan: mine.append((flow, rescan)))
        b.listen(lambda flow, rescan: theirs.append((flow, rescan)))
        await eventually(lambda: ("", True) in mine and ("", True) in theirs)
        await a.announce(["orders"])
        await b.announce(["leads"])
        await eventually(lambda: ("orders", False) in theirs and ("leads", False) in mine)
        await asyncio.sleep(0.3)
        assert mine == [("", True), ("leads", False)]
        assert theirs == [("", True), ("orders", False)]
    finally:
        for s in (a, b):
            await s.close()


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


def test_check_reports_a_postgres_store_it_cannot_reach_at_the_store_line(tmp_path: Path) -> None:
    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC, "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN}
    root = lead_project(
        tmp_path / "p", "http://127.0.0.1:9", hub={"store": "postgresql://postgres@127.0.0.1:1/pb"}
    )
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert res.exit_code == 2, res.output
    line = next(
        n
        for n, ln in enumerate((root / "patchbay.yaml").read_text().splitlines(), 1)
        if ln.startswith("store:")
    )
    assert (
        f"{root / 'patchbay.yaml'}:{line}: store: the PostgreSQL store cannot be used: cannot connect"
        in res.output
    )
    ok = lead_project(tmp_path / "q", "http://127.0.0.1:9", hub={"store": postgres_url()})
    res = CliRunner().invoke(main, ["check", str(ok)], env=env)
    assert res.exit_code == 0, res.output


def test_check_blames_the_unreachable_store_not_the_secrets_kept_in_it(tmp_path: Path) -> None:
    """The secrets live in the store's vault: with the store unreachable, `check` says so at the store
    line, and does not report each secret as missing (setting them again would not help)."""
    root = lead_project(
        tmp_path / "p",
        "http://127.0.0.1:9",
        hub={"store": "postgresql://postgres@127.0.0.1:5432/pb_no_such_db"},
    )
    MasterKey.load_ring(root / ".patchbay", create=True)  # the project keeps its secrets in the vault
    res = CliRunner().invoke(main, ["check", str(root)], env={})
    assert res.exit_code == 2, res.output
    assert "store: the PostgreSQL store cannot be used" in res.output
    assert 'database "pb_no_such_db" does not exist' in res.output
    assert "missing secret" not in res.output
    doc = orjson.loads(CliRunner().invoke(main, ["check", str(root), "--json"], env={}).output)
    assert [p["message"].split(":")[0] for p in doc["problems"]] == ["store"]


@pytest.mark.parametrize(
    ("command", "code"), [(["store", "migrate"], 1), (["store", "prune"], 3), (["cluster"], 3)]
)
def test_store_commands_on_a_store_that_cannot_be_reached_say_so_in_one_line(
    tmp_path: Path, command: list[str], code: int
) -> None:
    root = lead_project(
        tmp_path / "p",
        "http://127.0.0.1:9",
        hub={"store": "postgresql://postgres@127.0.0.1:5432/pb_no_such_db"},
    )
    res = CliRunner().invoke(main, [*command, "-p", str(root)])
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert 'database "pb_no_such_db" does not exist' in res.output
    assert "Traceback" not in res.output


def _grow(url: str, copies: int) -> None:
    """Copy every event and its deliveries `copies` times (new ids): a store that grew since it opened."""
    import psycopg

    from patchbay.store.postgres.store import _split_schema

    conninfo, schema = _split_schema(url)
    with psycopg.connect(conninfo, autocommit=True, options=f"-c search_path={schema}") as conn:

        def columns(table: str, skip: str) -> list[str]:
            rows = conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema=%s AND table_name=%s"
                " AND column_name<>%s ORDER BY ordinal_position",
                (schema, table, skip),
            ).fetchall()
            return [r[0] for r in rows]

        changed = {"id": "t.id || '_' || g", "event_id": "t.event_id || '_' || g", "dedupe_key": "NULL"}
        for table, skip in (("events", "seq"), ("deliveries", "id")):
            cols = columns(table, skip)
            select = ", ".join(changed.get(c, f"t.{c}") for c in cols)
            conn.execute(
                f"INSERT INTO {table}({', '.join(cols)}) SELECT {select} FROM {table} t,"  # type: ignore[arg-type]
                f" generate_series(1, {copies}) g"
            )


def _seq_scans(plan: object) -> list[str]:
    """The tables an EXPLAIN (FORMAT JSON) plan reads whole."""
    if isinstance(plan, dict):
        here = [plan["Relation Name"]] if plan.get("Node Type") == "Seq Scan" else []
        return here + [t for v in plan.values() for t in _seq_scans(v)]
    if isinstance(plan, list):
        return [t for v in plan for t in _seq_scans(v)]
    return []


async def test_an_attempt_record_reads_only_its_own_rows_however_much_the_tables_grew_after_its_first_plan() -> (
    None
):
    """psycopg prepares a statement on its fifth execution, and PostgreSQL then keeps a generic plan: one
    made while the tables were small (a sequential scan is cheapest there) read all of deliveries and
    events for every attempt record once they had grown (1.7 ms of server CPU per event at 30,000 rows,
    bench/cluster.py). The record, prepared and executed on the store's own connections while small, is
    planned again for the grown tables."""
    assert _seq_scans(await _record_plan(grown_after=3000)) == []


async def test_an_attempt_record_looks_its_deliveries_up_by_id_in_a_table_of_a_few_thousand() -> None:
    """The record's rows come as one JSON text, and PostgreSQL guesses 100 rows for any JSON set: at a
    few thousand deliveries it planned a hash join over all of them for 8 attempts (3.0 ms against 1.1 ms).
    The ids go as an array too, whose length it knows."""
    assert _seq_scans(await _record_plan(grown_before=250)) == []


async def _record_plan(*, grown_before: int = 0, grown_after: int = 0) -> Any:
    """The plan (EXPLAIN, JSON) of an attempt record of 8 deliveries on the store's own connection: the
    tables copied `grown_before` times before it is prepared, or `grown_after` times after six executions."""
    url = postgres_url()
    s = PostgresStore(url)
    try:
        await asyncio.gather(*(s.accept(event(destinations=("crm", "erp"))) for _ in range(8)))
        if grown_before:
            _grow(url, grown_before)
        due = await s.due("orders", "crm", time.time() + 1, 8, set())
        with s._pool.connection() as conn:
            conn.execute("ANALYZE deliveries")
            explain = _prepare_record(conn, [result(d, "success", "delivered") for d in due])
            for _ in range(
                6 if grown_after else 0
            ):  # past the five custom plans after which a generic plan may be kept
                conn.execute(explain)  # type: ignore[arg-type]
            if grown_after:
                _grow(url, grown_after)
            got = conn.execute(explain).fetchone()  # type: ignore[arg-type]
            conn.execute("DEALLOCATE rec")
        assert got is not None
        return got[0]
    finally:
        await s.close()


async def test_a_retention_chunk_deletes_its_runs_by_index_in_a_grown_store() -> None:
    """A purge chunk deleted by joining a temporary table of its ids, whose size PostgreSQL does not know:
    it could hash it and read the whole of events and deliveries (attempts and responses too, without
    statistics) for every chunk, a chunk's cost growing with the store. Each delete now lists its ids."""
    from patchbay.store.postgres.dialect import PgConnection
    from patchbay.store.retention import FINISHED, tx_purge

    url = postgres_url()
    s = PostgresStore(url)
    try:
        for _ in range(4):
            await s.accept_batch([event() for _ in range(500)], "orders", None)
            due = await s.due("orders", "crm", time.time() + 1, 500, set())
            await s.record([result(d, "success", "delivered", response={"id": d.id}) for d in due])
        _grow(url, 10)  # the events and deliveries of a store that has run a while
        with s._pool.connection() as conn:
            # and their answers (other deliveries'), made here
            conn.execute(
                "INSERT INTO attempts(delivery_id, n, started_at, latency_ms, status_code, outcome)"
                " SELECT -g, 1, 0, 1, 200, 'success' FROM generate_series(1, 50000) g"
            )
            conn.execute(
                "INSERT INTO responses(delivery_id, fields, at) SELECT -g, '{}', 0 FROM generate_series(1, 50000) g"
            )
            conn.execute("ANALYZE")
            with conn.transaction(force_rollback=True):  # the tables as they were for the store's other tests
                removed = tx_purge(PgConnection(conn), "orders", FINISHED, time.time() + 1, 100)  # type: ignore[arg-type]
                scanned = conn.execute(
                    "SELECT relname FROM pg_stat_xact_user_tables WHERE seq_scan > 0"
                    " AND relname IN ('events', 'deliveries', 'attempts', 'responses')"
                ).fetchall()
        assert removed == 100 and scanned == []
    finally:
        await s.close()


def _prepare_record(conn: Any, results: list[Any]) -> str:
    """PREPARE the attempt record as `rec` and return an EXPLAIN of its EXECUTE with `results`' values."""
    import re

    from psycopg.sql import Literal

    from patchbay.store.postgres.ops import _RECORD, _record_params

    names: list[str] = []  # the statement's parameters in order, each with the type it is cast to
    types: dict[str, str] = {"now": "float8"}
    for name, cast in re.findall(r"%\((\w+)\)[sb](?:::([\w\[\]]+))?", _RECORD):
        if name not in names:
            names.append(name)
        types[name] = cast or types[name]
    sql = re.sub(r"%\((\w+)\)[sb]", lambda m: f"${names.index(m[1]) + 1}", _RECORD)
    values = _record_params(results)
    conn.pgconn.exec_(f"PREPARE rec AS {sql}".encode())  # the simple protocol: $n are PREPARE's
    literals = ", ".join(f"{Literal(values[n]).as_string(conn)}::{types[n]}" for n in names)
    return f"EXPLAIN (FORMAT JSON) EXECUTE rec({literals})"
