#!/usr/bin/env python3
"""What do dedupe and aggregate cost on the hot path? Events accepted per second with and without them.

Each variant runs the flow's steps (Pipeline.process) and the store's accept (one group-committed
SQLite transaction per batch of concurrent events) for N events, C at a time, into a fresh store:

  plain      map, then one HTTP delivery per event (the baseline)
  dedupe     + dedupe on a key (every key new: each event claims one)
  aggregate  aggregate by one of K keys into 1d windows (the event is counted, no delivery)
  both       dedupe, then aggregate with pass_through (counted and delivered)

Prints events/s per variant and its ratio to plain, and the time the window closer takes to emit the
K windows (their records into the store). `--costs` splits one event's cost into the steps and the
store's transaction instead. Usage: .venv/bin/python bench/aggregate.py [-n 20000] [-c 64] [--costs]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from patchbay.config.project import load_or_raise
from patchbay.engine.hub import build_sinks
from patchbay.engine.pipeline import Pipeline
from patchbay.security.secrets import SecretResolver
from patchbay.store.base import NewEvent
from patchbay.store.sqlite import SqliteStore

MAP = {"map": {"email": "lower(email)", "shop": "shop", "amount": "amount"}}
DEDUPE = {"name": "once", "dedupe": {"key": "email", "within": "24h"}}


def aggregate(pass_through: bool) -> dict[str, Any]:
    return {
        "name": "daily",
        "aggregate": {
            "by": "shop",
            "window": "1d",
            "pass_through": pass_through,
            "values": {
                "revenue": {"sum": "amount"},
                "orders": {"count": True},
                "customers": {"distinct": "email"},
            },
        },
    }


VARIANTS = {
    "plain": [MAP],
    "dedupe": [MAP, DEDUPE],
    "aggregate": [MAP, aggregate(False)],
    "both": [MAP, DEDUPE, aggregate(True)],
}


def project(root: Path, steps: list[dict[str, Any]]) -> Path:
    files = {
        "patchbay.yaml": {"port": 0},
        "systems.yaml": {
            "website": {"owner": "web", "webhook": {"scheme": "none", "public": True}},
            "crm": {"kind": "http", "owner": "sales", "url": "https://crm.example.com"},
        },
        "flows/orders.yaml": {
            "purpose": "bench",
            "owner": "bench",
            "trigger": {"webhook": {"system": "website"}},
            "steps": steps,
            "destinations": [{"name": "crm", "system": "crm", "path": "/orders"}],
        },
    }
    for name, doc in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


async def run(name: str, n: int, c: int, keys: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = project(Path(tmp), VARIANTS[name])
        proj = load_or_raise(root)
        flow = proj.flows["orders"]
        pipe = Pipeline(flow, build_sinks(flow, proj, SecretResolver(None, {}), None))
        store = SqliteStore(Path(tmp) / "store.db")
        sem = asyncio.Semaphore(c)

        async def one(i: int) -> None:
            record = {"email": f"c{i}@example.com", "shop": f"shop-{i % keys}", "amount": (i % 50) + 0.99}
            payload = orjson.dumps(record)
            async with sem:
                eid = f"evt_{i:09d}"
                now = time.time()
                p = pipe.process(record, eid, received_at=now)
                await store.accept(
                    NewEvent(
                        eid, "orders", now, payload, hashlib.sha256(payload).hexdigest(), None, p.status,
                        p.record_key, {}, p.trace, p.reason, p.deliveries, p.claims, p.windows,
                    )
                )  # fmt: skip

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        rate = n / (time.perf_counter() - t0)
        close_s = 0.0
        if "aggregate" in name or name == "both":
            t1 = time.perf_counter()
            due = await store.closable_windows(time.time() + 3 * 86400, 10_000, [("orders", "daily")])
            assert len(due) == keys, len(due)
            step = next(s for s in flow.steps if s.name == "daily").step
            for i, w in enumerate(due):
                rec = step.window_record(w)
                payload = orjson.dumps(rec)
                p = pipe.process(rec, f"win_{i}", after="daily")
                ev = NewEvent(
                    f"win_{i}", "orders", time.time(), payload, "", f"w{i}", p.status, None, {}, p.trace,
                    p.reason, p.deliveries,
                )  # fmt: skip
                await store.emit_window(ev, w)
            close_s = time.perf_counter() - t1
        await store.close()
        return rate, close_s


def costs(n: int, keys: int) -> None:
    """Per event, without the event loop or fsync batching: the steps, then the store's transaction
    (64 events per commit, as a group commit under load), best of 3."""
    from patchbay.store.sqlite import open_store, tx_accept

    best = {name: (float("inf"), float("inf")) for name in VARIANTS}
    for _ in range(3):  # interleaved, as in main()
        for name in VARIANTS:
            with tempfile.TemporaryDirectory() as tmp:
                root = project(Path(tmp), VARIANTS[name])
                proj = load_or_raise(root)
                flow = proj.flows["orders"]
                pipe = Pipeline(flow, build_sinks(flow, proj, SecretResolver(None, {}), None))
                conn = open_store(Path(tmp) / "store.db")
                events = []
                t0 = time.perf_counter()
                for i in range(n):
                    record = {
                        "email": f"c{i}@example.com",
                        "shop": f"shop-{i % keys}",
                        "amount": (i % 50) + 0.99,
                    }
                    payload, now = orjson.dumps(record), time.time()
                    p = pipe.process(record, f"e{i}", received_at=now)
                    events.append(
                        NewEvent(
                            f"e{i}", "orders", now, payload, "", None, p.status, p.record_key, {}, p.trace,
                            p.reason, p.deliveries, p.claims, p.windows,
                        )
                    )  # fmt: skip
                t1 = time.perf_counter()
                for j in range(0, n, 64):
                    conn.execute("BEGIN IMMEDIATE")
                    for e in events[j : j + 64]:
                        tx_accept(conn, e)
                    conn.execute("COMMIT")
                t2 = time.perf_counter()
                conn.close()
                b = best[name]
                best[name] = (min(b[0], (t1 - t0) / n * 1e6), min(b[1], (t2 - t1) / n * 1e6))
    for name, (steps_us, tx_us) in best.items():
        print(f"  {name:<10} steps {steps_us:6.1f} us/event   store transaction {tx_us:6.1f} us/event")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000, help="events per variant")
    ap.add_argument("-c", type=int, default=64, help="events in flight")
    ap.add_argument("-k", "--keys", type=int, default=50, help="aggregate keys (shops)")
    ap.add_argument("-r", "--rounds", type=int, default=3, help="rounds (variants interleaved; best kept)")
    ap.add_argument(
        "--costs", action="store_true", help="per-event cost of the steps and of the store's transaction"
    )
    args = ap.parse_args()
    if args.costs:
        print(f"{args.n:,} events per variant, {args.keys} aggregate keys")
        costs(args.n, args.keys)
        return
    print(
        f"{args.n:,} events per variant, {args.c} in flight, {args.keys} aggregate keys, best of {args.rounds}"
    )
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):  # interleaved: a busy moment of the machine hurts every variant alike
        for name in VARIANTS:
            rate, close_s = await run(name, args.n, args.c, args.keys)
            if rate > best.get(name, (0.0, 0.0))[0]:
                best[name] = (rate, close_s)
    base = best["plain"][0]
    for name, (rate, close_s) in best.items():
        extra = f"   closing {args.keys} windows: {close_s * 1000:.0f} ms" if close_s else ""
        print(f"  {name:<10} {rate:>9,.0f} events/s   x{rate / base:.2f} of plain{extra}")


if __name__ == "__main__":
    asyncio.run(main())
