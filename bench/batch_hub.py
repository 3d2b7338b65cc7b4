#!/usr/bin/env python3
"""Webhook acknowledgements while the hub runs a batch sync: idle, with the run on its own thread (as the
hub does it), and with the same run on the hub's event loop (what the thread avoids).

  .venv/bin/python bench/batch_hub.py                    # 300k rows SQLite -> SQLite, probes at 50/s
  .venv/bin/python bench/batch_hub.py --rows 1000000 --rate 100

One process: a hub (its store, its aiohttp app on 127.0.0.1) with a webhook flow whose destination is
paused (so the probe measures accept -> persist -> 202 only) and a batch flow (mode full, map + validate,
SQLite files in a temporary folder). A client thread with its own event loop sends unsigned webhooks (scheme none) at
a fixed rate (open loop) and times each answer. Printed: ack latency p50 / p99 / max per phase, the batch
run's duration and rows/s, and the ratios to idle. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEMS = """
shop: {kind: sqlite, owner: ops, path: shop.db}
report: {kind: sqlite, owner: data, path: report.db}
web: {owner: web, webhook: {scheme: none, public: true}}
crm: {kind: http, owner: sales, url: "http://127.0.0.1:9", allow_private_network: true}
"""
LEADS = """
purpose: Leads (the probe).
owner: bench
trigger: {webhook: {system: web}}
steps:
  - map: {email: lower(trim(email))}
destinations:
  - {name: crm, system: crm, path: /contacts}
"""
ORDERS = """
purpose: Orders copied in full.
owner: bench
trigger: {manual: true}
steps:
  - map: {id: id, email: lower(trim(email)), total: total, note: upper(note), updated_at: updated_at}
  - validate: {email: {required: true, format: email}}
batch:
  from: {system: shop, table: orders}
  to: {system: report, table: orders}
  mode: full
"""


def project(root: Path, rows: int) -> None:
    files = {"systems.yaml": SYSTEMS, "flows/leads.yaml": LEADS, "flows/orders.yaml": ORDERS}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip())
    with sqlite3.connect(root / "shop.db") as c:
        c.execute(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, total REAL, note TEXT, updated_at TEXT)"
        )
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?, '2024-01-01 00:00:00')",
            ((i, f" Buyer{i}@Shop.io ", i * 0.5, f"order number {i}") for i in range(1, rows + 1)),
        )
    sqlite3.connect(root / "report.db").close()


class Prober:
    """Open-loop webhook posts from a thread with its own event loop; latencies per phase."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.rate = url, rate
        self.phase: str | None = None
        self.lat: dict[str, list[float]] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as s:
            tasks: set[asyncio.Task[None]] = set()
            n = 0
            t0 = time.perf_counter()
            while not self._stop.is_set():
                n += 1
                phase = self.phase
                if phase is not None:
                    t = asyncio.create_task(self._one(s, n, phase))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                await asyncio.sleep(max(0.0, t0 + n / self.rate - time.perf_counter()))
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, s: Any, n: int, phase: str) -> None:
        start = time.perf_counter()
        try:
            async with s.post(self.url, json={"email": f" Lead{n}@Example.com"}) as r:
                await r.read()
                ok = r.status == 202
        except Exception:
            ok = False
        if not ok:
            self.errors += 1
            return
        self.lat.setdefault(phase, []).append((time.perf_counter() - start) * 1000)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


async def main(rows: int, rate: float, idle_s: float) -> None:
    from aiohttp import web

    from patchbay.config.project import load_or_raise
    from patchbay.engine.batch import run_flow
    from patchbay.engine.hub import Hub
    from patchbay.server.app import make_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        project(root, rows)
        print(f"source: {rows:,} rows in SQLite ({time.perf_counter() - t:.1f}s to make)")
        hub = Hub(load_or_raise(root))
        await hub.start()
        runner = web.AppRunner(make_app(hub), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        await hub.set_state("leads", "crm", "paused")
        probe = Prober(f"http://127.0.0.1:{port}/hooks/leads", rate)
        probe.start()
        results: dict[str, tuple[float, int]] = {}
        try:
            probe.phase = "idle"
            await asyncio.sleep(idle_s)

            probe.phase = "batch on its own thread (the hub)"
            t = time.perf_counter()
            live = hub.start_batch("orders", "bench")
            await live.done.wait()
            assert live.report is not None and live.report.status == "ok", live.report
            results[probe.phase] = (time.perf_counter() - t, live.report.read)

            probe.phase = "batch on the hub's event loop"
            assert hub.resolver is not None
            t = time.perf_counter()
            report = await run_flow(hub.project, hub.resolver, hub.project.flows["orders"])
            assert report.status == "ok", report.error
            results[probe.phase] = (time.perf_counter() - t, report.read)
            probe.phase = None
        finally:
            probe.stop()
            await runner.cleanup()
            await hub.stop()

    idle = probe.lat.get("idle", [])
    print(f"\nwebhook acks at {rate:g}/s (open loop), ms; errors {probe.errors}")
    print(f"{'phase':<36} {'n':>6} {'p50':>8} {'p99':>8} {'max':>8} {'p99/idle':>9}   batch")
    for phase, xs in probe.lat.items():
        took = results.get(phase)
        batch = f"{took[0]:.1f}s, {took[1] / took[0]:,.0f} rows/s" if took else ""
        ratio = pct(xs, 99) / pct(idle, 99) if idle else float("nan")
        print(
            f"{phase:<36} {len(xs):>6} {statistics.median(xs):>8.1f} {pct(xs, 99):>8.1f} {max(xs):>8.1f}"
            f" {ratio:>8.1f}x   {batch}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--rate", type=float, default=50.0, help="webhook posts per second")
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument(
        "--switch-ms", type=float, help="sys.setswitchinterval for the whole process (default 5 ms)"
    )
    a = ap.parse_args()
    if a.switch_ms:
        sys.setswitchinterval(a.switch_ms / 1000)
    print(f"GIL switch interval {sys.getswitchinterval() * 1000:g} ms")
    asyncio.run(main(a.rows, a.rate, a.idle_s))
