#!/usr/bin/env python3
"""Does history cleanup hold ingest up? Accept latency with and without a retention sweep running.

Fills a fresh SQLite store with N finished runs (each with a delivery, an attempt and response
fields), then accepts events one at a time (as webhooks do, each awaited) for a few seconds while
a sweep removes every finished run in chunks (compressing first with --compress), and again
without a sweep. Prints p50/p99/max accept latency for both, runs removed per second, the store's
size before and after. Usage: .venv/bin/python bench/retention.py [--runs 200000] [--chunk 500]
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
from patchbay.store.base import AttemptResult, NewDelivery, NewEvent
from patchbay.store.sqlite import SqliteStore

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


async def fill(store: SqliteStore, n: int) -> None:
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


async def ingest(store: SqliteStore, seconds: float) -> list[float]:
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


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--compress", action="store_true", help="compress every run first, then remove them")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.db"
        store = SqliteStore(path)
        await fill(store, a.runs)
        size0 = os.path.getsize(path) / 1e6
        base = await ingest(store, a.seconds)
        print(f"ingest alone:          {summary(base)}")
        from types import SimpleNamespace

        from patchbay.config.models import History
        from patchbay.engine.retention import Retention

        history = (
            History(keep=None, compress_after=60) if a.compress else History(keep=60, compress_after=None)
        )
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
        print(f"store file: {size0:.0f} MB before (free pages are reused; VACUUM returns them to the disk)")


if __name__ == "__main__":
    asyncio.run(main())
