#!/usr/bin/env python3
"""What leases cost on PostgreSQL: a take/renew's latency, and a source batch's commit with and without
the fence check (the one extra statement a polled or streamed source pays per batch in a cluster).

Opens a fresh schema on the local PostgreSQL (127.0.0.1:5432, user postgres), renews one lease N times
(awaited one after the other, as a holder does) and commits N batches of `--records` events with their
cursor, alternating fenced and unfenced. Prints p50/p99 of each. Usage:
  .venv/bin/python bench/leases.py [--n 2000] [--records 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from patchbay.store.base import Fence, NewDelivery, NewEvent
from patchbay.store.postgres import PostgresStore

PG = os.environ.get("PATCHBAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PAYLOAD = orjson.dumps({"id": 1, "email": "someone@example.com", "note": "x" * 300})
_n = iter(range(10**9))


def event() -> NewEvent:
    n = next(_n)
    eid = f"evt_{n:09d}"
    return NewEvent(
        id=eid,
        flow="pull",
        received_at=time.time(),
        payload=PAYLOAD,
        body_hash=hashlib.sha256(PAYLOAD).hexdigest(),
        dedupe_key=f"o{n}",
        status="pending",
        deliveries=[NewDelivery("crm", {"method": "POST", "body": PAYLOAD.decode()}, f"{eid}.crm")],
    )


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000


async def main(n: int, records: int) -> None:
    schema = f"bench_leases_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{PG}?schema={schema}", holder="bench")
    try:
        token = await store.take_lease("schedule:pull", "bench", 12.0)
        assert token is not None
        fence = Fence("schedule:pull", "bench", token)
        renew = []
        for _ in range(n):
            t0 = time.perf_counter()
            await store.take_lease("schedule:pull", "bench", 12.0)
            renew.append(time.perf_counter() - t0)
        plain: list[float] = []
        fenced: list[float] = []
        for i in range(n):
            batch = [event() for _ in range(records)]
            t0 = time.perf_counter()
            await store.accept_batch(batch, "pull", {"page": i}, fence=fence if i % 2 else None)
            (fenced if i % 2 else plain).append(time.perf_counter() - t0)
        load = os.getloadavg()[0]
        print(f"load average {load:.2f}; n={n}, {records} events per batch")
        print(f"take/renew a lease      p50 {pct(renew, 0.5):6.2f} ms  p99 {pct(renew, 0.99):6.2f} ms")
        print(f"batch commit, unfenced  p50 {pct(plain, 0.5):6.2f} ms  p99 {pct(plain, 0.99):6.2f} ms")
        print(f"batch commit, fenced    p50 {pct(fenced, 0.5):6.2f} ms  p99 {pct(fenced, 0.99):6.2f} ms")
        extra = statistics.median(fenced) - statistics.median(plain)
        print(f"fence check per batch   {extra * 1000:+.2f} ms (median difference)")
    finally:
        await store.close()
        import psycopg

        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # type: ignore[arg-type]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--records", type=int, default=10)
    args = ap.parse_args()
    asyncio.run(main(args.n, args.records))
