"""What only the PostgreSQL store does: round trips of the hot path, delivery leases shared by several
hubs, the one-hub lock, and `check` on a store it cannot reach. (Its behaviour otherwise is the
conformance suite's, run on both stores.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.store.postgres import PostgresStore
from patchbay.store.postgres.ops import LEASE_S
from patchbay.store.sqlite import StoreLocked
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


async def test_a_second_serving_hub_is_refused() -> None:
    url = postgres_url()
    a, b = PostgresStore(url), PostgresStore(url)
    try:
        a.lock()
        with pytest.raises(StoreLocked, match="another `patchbay serve` is using it"):
            b.lock()
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
