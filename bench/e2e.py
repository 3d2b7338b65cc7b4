#!/usr/bin/env python3
"""One end-to-end run against a serving hub: load for D seconds, then wait for the drain.

Patchbay answers 202 once an event is durable, before delivering it, so the acknowledgement rate
is the *ingress* rate and the sink's count is the *delivery* rate. This script reports both:

  accepted/s       events persisted by the hub during the load (from the store), per second
  ack p50/p99      what the caller waited for its 202 (from the driver)
  delivered/s      sink count growth during the load window, per second
  backlog_at_end   accepted - delivered when the load stops
  sustained/s      every event of the run delivered / (first request -> last delivery), i.e. the
                   delivered rate over the run INCLUDING the drain: the figure compared with peers
  hub CPU ms/event hub CPU time (load + drain) / events delivered: the figure least moved by
                   other processes on a shared machine
  e2e p50/p99      request -> delivery (the sink answered the successful attempt). With the
                   `drive` engine the start is the client's send time; with `wrk` (no per-request
                   times) it is the hub's received_at, which misses only the request read (< 1 ms)

Load comes from the shared harness's load.py (wrk engine) or bench/drive.py (can sign).
Delivery times are read from the hub's SQLite store read-only (attempts of the run's events).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.environ.get("HARNESS_DIR", "/work/shared/bench/webhook")
sys.path.insert(0, HARNESS)
sys.path.insert(0, HERE)
import drive  # noqa: E402
import load  # noqa: E402


def http_json(method: str, url: str) -> dict:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read() or b"{}")


def tree_rss_mb(pid: int) -> float:
    return round(sum(load._rss_kb(p) for p in [pid, *load._children(pid)]) / 1024, 1)


def tree_cpu_s(pid: int) -> float:
    return sum(load._cpu_s(p) for p in [pid, *load._children(pid)])


def ro(store: str) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def store_counts(store: str, flow: str, t0: float) -> dict[str, int]:
    with ro(store) as c:
        accepted = c.execute(
            "SELECT COUNT(*) FROM events WHERE flow=? AND received_at>=?", (flow, t0)
        ).fetchone()[0]
        rows = c.execute(
            "SELECT d.status, COUNT(*) FROM deliveries d JOIN events e ON e.id=d.event_id"
            " WHERE e.flow=? AND e.received_at>=? GROUP BY d.status",
            (flow, t0),
        ).fetchall()
    return {"accepted": accepted, **{f"deliveries_{s}": n for s, n in rows}}


def delivery_times(store: str, flow: str, t0: float, t1: float) -> list[tuple[str | None, float, float]]:
    """(record_key, received_at, end of the successful attempt) for events received in [t0, t1]."""
    with ro(store) as c:
        return c.execute(
            "SELECT e.record_key, e.received_at, a.started_at + a.latency_ms/1000.0 FROM events e"
            " JOIN deliveries d ON d.event_id=e.id"
            " JOIN attempts a ON a.delivery_id=d.id AND a.outcome='success'"
            " WHERE e.flow=? AND e.received_at>=? AND e.received_at<=?",
            (flow, t0, t1),
        ).fetchall()


def pcts(vals: list[float]) -> dict[str, float | None]:
    vals = sorted(vals)
    out: dict[str, float | None] = {}
    for p in (50, 90, 99):
        out[f"p{p}"] = round(vals[min(len(vals) - 1, int(p / 100 * len(vals)))], 1) if vals else None
    out["max"] = round(vals[-1], 1) if vals else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--flow", default="lead")
    ap.add_argument("--store", required=True, help="the hub's SQLite file (read-only here)")
    ap.add_argument("--hub-pid", type=int, required=True)
    ap.add_argument("--sink", default="http://127.0.0.1:18080")
    ap.add_argument("--sink-pid", type=int)
    ap.add_argument("--engine", choices=["wrk", "drive"], default="wrk")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-d", "--duration", type=float, default=20)
    ap.add_argument("--sign-secret-file", help="drive engine: sign requests (Standard Webhooks)")
    ap.add_argument("--rate", type=float, help="drive engine: open loop at this many requests/s")
    ap.add_argument("--drain-timeout", type=float, default=120)
    ap.add_argument("--label", default="")
    ap.add_argument("--out")
    a = ap.parse_args()
    load.check_target(a.url, False)
    load.check_target(a.sink, False)
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="pb-e2e-")
    load_out, records = os.path.join(tmp, "load.json"), os.path.join(tmp, "records.txt")
    if a.engine == "wrk":
        cmd = [py, os.path.join(HARNESS, "load.py"), "--engine", "wrk"]
    else:
        cmd = [
            py,
            os.path.join(HERE, "drive.py"),
            "--records-out",
            records,
            "--first-id",
            str(int(time.time() * 1000) % 10**9 * 100),
        ]
        if a.sign_secret_file:
            cmd += ["--sign-secret-file", a.sign_secret_file]
        if a.rate:
            cmd += ["--rate", str(a.rate)]
    cmd += [
        "--url",
        a.url,
        "-c",
        str(a.concurrency),
        "-d",
        str(a.duration),
        "--watch-pid",
        str(a.hub_pid),
        "--label",
        a.label,
        "--out",
        load_out,
    ]
    if a.sink_pid:
        cmd += ["--sink-pid", str(a.sink_pid)]

    http_json("POST", a.sink + "/reset")
    cpu0 = tree_cpu_s(a.hub_pid)
    t_start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    timeline = []
    while proc.poll() is None:
        time.sleep(0.5)
        timeline.append(
            (
                round(time.time() - t_start, 2),
                http_json("GET", a.sink + "/stats")["count"],
                tree_rss_mb(a.hub_pid),
            )
        )
        if time.time() - t_start > a.duration + 60:
            proc.kill()  # the driver bounds itself; this is a second fence
            break
    proc.wait()
    t_load_end = time.time()
    delivered_at_end = http_json("GET", a.sink + "/stats")["count"]
    lr = json.load(open(load_out))
    counts = store_counts(a.store, a.flow, t_start)
    accepted = counts["accepted"]

    # drain: until every delivery of this run's events has left 'pending' (bounded)
    deadline = time.time() + a.drain_timeout
    while time.time() < deadline:
        counts = store_counts(a.store, a.flow, t_start)
        if counts.get("deliveries_pending", 0) == 0:
            break
        time.sleep(0.25)
        timeline.append(
            (
                round(time.time() - t_start, 2),
                http_json("GET", a.sink + "/stats")["count"],
                tree_rss_mb(a.hub_pid),
            )
        )
    sink = http_json("GET", a.sink + "/stats")
    hub_cpu = tree_cpu_s(a.hub_pid) - cpu0
    times = delivery_times(a.store, a.flow, t_start, t_load_end + 1)
    load_s = t_load_end - t_start
    if times:
        last = max(t for _, _, t in times)
        sustained = len(times) / (last - t_start)
    else:
        last, sustained = t_start, 0.0
    if a.engine == "drive":
        sent = {}
        for ln in open(records):
            rid, t0, _, status = ln.split()
            if status.startswith("2"):
                sent[f"lead-{rid}@example.com"] = float(t0)
        e2e = [(end - sent[k]) * 1000 for k, _, end in times if k in sent]
        basis = "client send time"
    else:
        e2e = [(end - rec) * 1000 for _, rec, end in times]
        basis = "hub received_at"
    ok = lr.get("ok_2xx_3xx", lr.get("ok_2xx", 0))
    res = {
        "label": a.label,
        "engine": a.engine,
        "signed": bool(a.sign_secret_file),
        "concurrency": a.concurrency,
        "offered_rate": a.rate,
        "load_s": round(load_s, 2),
        "acked_2xx": ok,
        "errors": lr.get("non_2xx", 0) + sum((lr.get("socket_errors") or {}).values())
        if a.engine == "wrk"
        else sum(lr.get("errors", {}).values()),
        "ack_rps": lr["rps_ok"],
        "ack_ms": lr["latency_ms"],
        "accepted": accepted,
        "accepted_per_s": round(accepted / load_s, 1),
        "delivered_during_load": delivered_at_end,
        "delivered_per_s_during_load": round(delivered_at_end / load_s, 1),
        "backlog_at_end": accepted - delivered_at_end,
        "drain_s": round(max(0.0, last - t_load_end), 2),
        "delivered": len(times),
        "sustained_delivered_per_s": round(sustained, 1),
        "undelivered_after_drain": counts.get("deliveries_pending", 0),
        "hub_cpu_s": round(hub_cpu, 2),
        "hub_cpu_ms_per_event": round(hub_cpu * 1000 / len(times), 3) if times else None,
        "e2e_ms": pcts(e2e),
        "e2e_basis": basis,
        "e2e_samples": len(e2e),
        "sink": {k: sink[k] for k in ("count", "unique", "keyed", "unique_keys")},
        "server": lr.get("server"),
        "cpu": lr.get("cpu"),
        "timeline": timeline,
    }
    drive.emit(res, a.out)


if __name__ == "__main__":
    main()
