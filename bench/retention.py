#!/usr/bin/env python3
"""Does history cleanup hold ingest up, and what does it cost? Accept latency with and without a sweep.

Fills a fresh store with N finished runs (each with a delivery, an attempt and response fields), then
accepts events one at a time (as webhooks do, each awaited) for a few seconds alone, and again while a
sweep removes every finished run in chunks (compressing first with --compress). Prints p50/p99/max
accept latency for both, runs removed per second, the store's size before and after.

With --postgres URL (a server; a database of its own is created and dropped) it also prints what the
server spends, per run, to insert it (the fill: accept, due read, attempt record), to remove it (the
sweep) and to vacuum what the removal left (a VACUUM run at once instead of autovacuum later): CPU of
the server's processes serving this bench, and WAL bytes (pg_current_wal_lsn's difference: other
clients of the server count too). That is the measure of whether partitioning by time pays
(docs/scaling.md): a partition's DROP costs next to nothing, a run removed by DELETE costs this.

    .venv/bin/python bench/retention.py [--runs 200000] [--chunk 500] [--compress]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cluster import CpuWatch, Pg

from patchbay.store.base import AttemptResult, NewDelivery, NewEvent, Store
from patchbay.store.sqlite import SqliteStore

APP = "pb-retention-bench"  # the application_name of the bench's connections: its backends' CPU is counted

PAYLOAD = orjson.dumps({"email": "someone@example.com", "first_name": "Ada", "note": "x" * 600})
_n = iter(range(10**9))


def event(status: str = "pending") -> NewEvent:
    eid = f"evt_{next(_n):09d}"
    return NewEvent(
        id=eid,
        flow="leads",
        received_at=time.time(),
        payload=PAYLOAD,
        body_hash=hashlib.sha256(PAYLOAD).hexdigest(),
        dedupe_key=eid,
        status=status,
        record_key="someone@example.com",
        meta={},
        trace=[
            {"step": "map", "output": {"email": "someone@example.com"}},
            {"step": "route", "routes": ["crm"]},
        ],
        reason=None,
        deliveries=[NewDelivery("crm", {"method": "POST", "body": PAYLOAD.decode()}, f"{eid}.crm")]
        if status == "pending"
        else [],
    )


async def fill(store: Store, n: int) -> None:
    done = 0
    while done < n:
        batch = [event() for _ in range(min(2000, n - done))]
        await store.accept_batch(batch, "leads", None)
        due = await store.due("leads", "crm", time.time() + 1, len(batch), set())
        await store.record(
            [
                AttemptResult(
                    d.id,
                    d.event_id,
                    time.time(),
                    12.0,
                    201,
                    "success",
                    '{"id":"c-1"}',
                    "",
                    "delivered",
                    response={"id": "c-1"},
                )
                for d in due
            ]
        )
        done += len(batch)
        print(f"\r  filled {done:,} / {n:,} finished runs", end="", file=sys.stderr)
    print(file=sys.stderr)


async def ingest(store: Store, seconds: float) -> list[float]:
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        await store.accept(event("filtered"))
        lat.append((time.perf_counter() - t0) * 1000)
    return lat


def summary(lat: list[float]) -> str:
    q = statistics.quantiles(lat, n=100)
    return f"{len(lat):,} accepts  p50 {q[49]:.2f} ms  p99 {q[98]:.2f} ms  max {max(lat):.1f} ms"


class ServerCost:
    """The server's CPU and WAL over a phase (PostgreSQL only; None on SQLite)."""

    def __init__(self, pg: Pg | None, db: str | None) -> None:
        self.pg = pg
        # the bench's own backends, and autovacuum's while it works on the bench's database
        self.watch = CpuWatch(lambda: pg.backends(APP) + pg.autovacuum(db)) if pg is not None else None
        self.lsn = pg.lsn() if pg is not None else None

    def per(self, n: int, what: str) -> str:
        if self.pg is None or self.watch is None or not n:
            return ""
        cpu = self.watch.stop()
        wal = self.pg.q("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (self.lsn,))[0][0]
        return f"  server per {what}: {cpu / n * 1e6:,.0f} us CPU, {float(wal) / n:,.0f} B of WAL"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--compress", action="store_true", help="compress every run first, then remove them")
    ap.add_argument("--postgres", help="a PostgreSQL server's URL: measure there (a database of its own)")
    a = ap.parse_args()
    pg = Pg(a.postgres) if a.postgres else None
    db = pg.create()[0] if pg is not None else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            await measure(a, Path(tmp), pg, db)
    finally:
        if pg is not None and db is not None:
            pg.drop(db)


async def measure(a: argparse.Namespace, tmp: Path, pg: Pg | None, db: str | None) -> None:
    store: Store
    if pg is not None:
        from patchbay.store.postgres import PostgresStore

        store = PostgresStore(f"{pg.url.rsplit('/', 1)[0]}/{db}?application_name={APP}")
    else:
        store = SqliteStore(tmp / "store.db")

    def size() -> float:
        if pg is not None:
            return float(pg.q("SELECT pg_database_size(%s)", (db,))[0][0]) / 1e6
        return os.path.getsize(tmp / "store.db") / 1e6

    cost = ServerCost(pg, db)
    await fill(store, a.runs)
    print(f"fill: {a.runs:,} finished runs{cost.per(a.runs, 'run inserted')}")
    if pg is not None:
        pg.q("ANALYZE", db=db)  # as autovacuum does after a table grew: plans for the tables as they are
    size0 = size()
    cost = ServerCost(pg, db)
    base = await ingest(store, a.seconds)
    print(f"ingest alone:          {summary(base)}{cost.per(len(base), 'accept')}")
    from types import SimpleNamespace

    from patchbay.config.models import History
    from patchbay.engine.retention import Retention

    history = History(keep=None, compress_after=60) if a.compress else History(keep=60, compress_after=None)
    flow = SimpleNamespace(name="leads", history=history)  # what a sweep reads of a FlowSpec
    ret = Retention(store, lambda: [flow], chunk=a.chunk, clock=lambda: time.time() + 3600)  # type: ignore[list-item]
    t0 = time.perf_counter()
    sweep = asyncio.create_task(ret.sweep())
    during = await ingest(store, a.seconds)
    report = await sweep
    took = time.perf_counter() - t0
    what = "compressed" if a.compress else "removed"
    n = report.total_compressed if a.compress else report.total_removed
    print(f"ingest during a sweep: {summary(during)}")
    print(f"sweep: {n:,} runs {what} in {took:.1f} s ({n / took:,.0f} runs/s, chunk {a.chunk})")
    await store.close()
    if pg is not None:  # the server's cost of the sweep alone: the same again with nothing else running
        vacuum(pg, db)
        await sweep_alone(a, pg, db, n)
    print(
        f"store: {size0:.0f} MB before, {size():.0f} MB after (free pages are reused; VACUUM FULL returns them)"
    )


def vacuum(pg: Pg, db: str | None, n: int = 0, what: str = "") -> str:
    """VACUUM the bench's database (what the removal left that autovacuum has not done yet): its time, and
    with `n` the server's cost per run (the connection is open before the count starts, and until it ends)."""
    with pg.psycopg.connect(
        f"{pg.url.rsplit('/', 1)[0]}/{db}?application_name={APP}", autocommit=True
    ) as conn:
        cost = ServerCost(pg, db)
        t0 = time.perf_counter()
        conn.execute("VACUUM")
        took = time.perf_counter() - t0
        return f"{took:.1f} s{cost.per(n, what)}" if n else f"{took:.1f} s"


async def sweep_alone(a: argparse.Namespace, pg: Pg, db: str | None, n: int) -> None:
    """Fill again (not counted), then sweep, then VACUUM, each with nothing else running."""
    from types import SimpleNamespace

    from patchbay.config.models import History
    from patchbay.engine.retention import Retention
    from patchbay.store.postgres import PostgresStore

    store = PostgresStore(f"{pg.url.rsplit('/', 1)[0]}/{db}?application_name={APP}-fill")
    await fill(store, n)
    await store.close()
    pg.q("ANALYZE", db=db)
    store = PostgresStore(f"{pg.url.rsplit('/', 1)[0]}/{db}?application_name={APP}")
    history = History(keep=None, compress_after=60) if a.compress else History(keep=60, compress_after=None)
    flow = SimpleNamespace(name="leads", history=history)
    ret = Retention(store, lambda: [flow], chunk=a.chunk, clock=lambda: time.time() + 3600)  # type: ignore[list-item]
    what = "compressed" if a.compress else "removed"
    cost = ServerCost(pg, db)
    t0 = time.perf_counter()
    report = await ret.sweep()
    took = time.perf_counter() - t0
    await store.close()
    done = report.total_compressed if a.compress else report.total_removed
    print(
        f"the same sweep alone (filled again): {done:,} runs {what} in {took:.1f} s{cost.per(done, 'run ' + what)}"
    )
    print(f"VACUUM after it: {vacuum(pg, db, done, 'run ' + what)}")


if __name__ == "__main__":
    asyncio.run(main())
