#!/usr/bin/env python3
"""Peak RSS while a backlog builds behind a paused destination, then (optionally) its drain.

The bench project's `lead_backlog` flow delivers to deny_sink.py, which answers 401: the first
attempts pause the destination and every later event just queues in the store. This script
POSTs leads in count-bounded phases up to each target (default 10k, 25k, 50k, 100k queued),
and after each phase samples the hub's RSS (process tree) and VmHWM (peak so far). Flat means
the backlog lives on disk, not in memory.

With --drain it then lets the sink accept (POST /_allow), runs `patchbay resume`, and times
how fast the hub empties the backlog with no ingress competing (bounded by --drain-timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import drive  # noqa: E402
from drive import load  # noqa: E402


def tree_rss_mb(pid: int) -> float:
    return round(sum(load._rss_kb(p) for p in [pid, *load._children(pid)]) / 1024, 1)


def hwm_mb(pid: int) -> float:
    return round(load._hwm_kb(pid) / 1024, 1)


def pending(store: str, flow: str) -> tuple[int, str]:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        n = conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE flow=? AND status='pending'", (flow,)
        ).fetchone()[0]
        row = conn.execute("SELECT state FROM destinations WHERE flow=?", (flow,)).fetchone()
    finally:
        conn.close()
    return n, row[0] if row else "active"


def http(method: str, url: str) -> bytes:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:18787/hook/lead-backlog")
    ap.add_argument("--flow", default="lead_backlog")
    ap.add_argument("--hub-pid", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--project", required=True, help="for `patchbay resume` (with --drain)")
    ap.add_argument(
        "--deny", default="http://127.0.0.1:18081", help="deny_sink.py base URL (must be running)"
    )
    ap.add_argument("--targets", default="10000,25000,50000,100000")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--max-time", type=float, default=900, help="bound on the whole fill, s")
    ap.add_argument("--drain", action="store_true")
    ap.add_argument("--drain-timeout", type=float, default=300)
    ap.add_argument("--out")
    a = ap.parse_args()
    load.check_target(a.url, False)
    load.check_target(a.deny, False)
    targets = [int(x) for x in a.targets.split(",")]
    res: dict[str, object] = {
        "idle_rss_mb": tree_rss_mb(a.hub_pid),
        "idle_hwm_mb": hwm_mb(a.hub_pid),
        "points": [],
    }
    points: list[dict[str, object]] = res["points"]  # type: ignore[assignment]
    run = drive.Run(first_id=10**9)
    args = argparse.Namespace(url=a.url, concurrency=a.concurrency, timeout=15.0, body=drive.DEFAULT_BODY)
    t_begin = time.time()
    sent_ok = 0
    for target in targets:
        already, _ = pending(a.store, a.flow)
        if already >= target:
            continue
        left = a.max_time - (time.time() - t_begin)
        if left <= 0:
            res["stopped"] = f"--max-time {a.max_time}s reached before {target}"
            break
        run.last = run.counter + (target - already)
        args.duration = left
        t0 = time.time()
        ok0 = run.ok
        wall = asyncio.run(drive.drive(args, run, None))
        sent_ok += run.ok - ok0
        time.sleep(1.0)  # let the group commit and the allocator settle before sampling
        queued, state = pending(a.store, a.flow)
        pt = {
            "target": target,
            "queued": queued,
            "destination": state,
            "rss_mb": tree_rss_mb(a.hub_pid),
            "hwm_mb": hwm_mb(a.hub_pid),
            "phase_s": round(time.time() - t0, 1),
            "phase_accepted_per_s": round((run.ok - ok0) / wall, 1) if wall else 0.0,
            "db_mb": round(
                sum(os.path.getsize(a.store + s) for s in ("", "-wal") if os.path.exists(a.store + s))
                / 2**20,
                1,
            ),
        }
        points.append(pt)
        print(json.dumps(pt), file=sys.stderr, flush=True)
    errors = [r for r in run.records if not (isinstance(r[3], int) and 200 <= r[3] < 300)]
    res["acked"] = sent_ok
    res["errors"] = len(errors)
    if points:
        first, last = points[0], points[-1]
        res["rss_growth_mb"] = round(float(last["rss_mb"]) - float(first["rss_mb"]), 1)  # type: ignore[arg-type]
        res["peak_hwm_mb"] = max(float(p["hwm_mb"]) for p in points)  # type: ignore[arg-type]
    if a.drain:
        queued, _ = pending(a.store, a.flow)
        http("POST", a.deny + "/_allow")
        repo = os.path.dirname(HERE)
        subprocess.run(
            [os.path.join(repo, ".venv", "bin", "patchbay"), "resume", a.flow, "-p", a.project],
            check=True,
            capture_output=True,
            timeout=60,
        )
        t0 = time.time()
        peak = 0.0
        left = queued
        while time.time() - t0 < a.drain_timeout:
            time.sleep(0.5)
            peak = max(peak, tree_rss_mb(a.hub_pid))
            left, _ = pending(a.store, a.flow)
            if left == 0:
                break
        dt = time.time() - t0
        accepted = json.loads(http("GET", a.deny + "/_stats"))["accepted"]
        res["drain"] = {
            "queued": queued,
            "left": left,
            "seconds": round(dt, 1),
            "delivered": accepted,
            "per_s": round(accepted / dt, 1),
            "peak_rss_mb": peak,
            "hwm_mb": hwm_mb(a.hub_pid),
        }
    drive.emit(res, a.out)


if __name__ == "__main__":
    main()
