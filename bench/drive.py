#!/usr/bin/env python3
"""Bounded closed-loop POST driver that can sign (Standard Webhooks) and stop after N requests.

The shared harness's load.py cannot send headers, so this driver measures the authenticated
ingress variant; it records every request (id, start, end, status) like load.py's py engine,
so the same figures come out for signed and unsigned runs. Stdlib only; loopback only.

  drive.py --url http://127.0.0.1:18787/hook/lead-signed --sign-secret-file RUN/whsec -c 64 -d 10
  drive.py --url http://127.0.0.1:18787/hook/lead-backlog -c 16 --count 10000 -d 120
  drive.py --url http://127.0.0.1:18787/hook/lead -c 64 --rate 200 -d 20     (open loop)

Output: one JSON object on stdout (and --out); --records-out writes `id t0 t1 status` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.parse

HARNESS = os.environ.get("HARNESS_DIR", "/work/shared/bench/webhook")
sys.path.insert(0, HARNESS)
import load  # noqa: E402  (the shared harness: RSS/CPU watchers, response parser, body template)

DEFAULT_BODY = load.DEFAULT_BODY


class Signer:
    """Standard Webhooks headers: webhook-id, webhook-timestamp, v1 HMAC-SHA256 over id.ts.body."""

    def __init__(self, whsec: str) -> None:
        self.key = base64.b64decode(whsec.strip().removeprefix("whsec_"))
        self.run = os.urandom(4).hex()

    def headers(self, rid: str, body: bytes) -> str:
        msg_id = f"msg_{self.run}_{rid}"
        ts = str(int(time.time()))
        sig = base64.b64encode(
            hmac.digest(self.key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256)
        ).decode()
        return f"webhook-id: {msg_id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: v1,{sig}\r\n"


class Run:
    """Request ids and records, shared by the workers; `last` bounds the ids of the current phase."""

    def __init__(self, first_id: int = 1) -> None:
        self.records: list[tuple[str, float, float, int | str]] = []
        self.counter = first_id - 1
        self.last: int | None = None
        self.ok = 0

    def next_id(self) -> str | None:
        if self.last is not None and self.counter >= self.last:
            return None
        self.counter += 1
        return str(self.counter)


async def _worker(
    u: urllib.parse.SplitResult,
    a: argparse.Namespace,
    run: Run,
    signer: Signer | None,
    deadline: float,
    hard: float,
    first_at: float | None = None,
) -> None:
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = (u.path or "/") + (("?" + u.query) if u.query else "")
    reader = writer = None
    loop = asyncio.get_running_loop()
    rate = getattr(a, "rate", None)
    interval = a.concurrency / rate if rate else 0.0  # open loop: this connection's share of the rate
    due = first_at
    while loop.time() < deadline:
        if due is not None:
            if due >= deadline:
                break
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
        rid = run.next_id()
        if rid is None:
            break
        body = a.body.replace("{id}", rid).encode()
        extra = signer.headers(rid, body) if signer else ""
        req = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: keep-alive\r\n\r\n"
        ).encode() + body
        # open loop: latency counts from when the request was due, not when a busy connection got
        # round to it (no coordinated omission)
        t0 = time.time() - (loop.time() - due) if due is not None else time.time()
        if due is not None:
            due += interval
        try:
            remaining = max(0.001, min(a.timeout, hard - loop.time()))
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), remaining)
            writer.write(req)
            status, close, _ = await asyncio.wait_for(load._read_response(reader), remaining)
            run.records.append((rid, t0, time.time(), status))
            if 200 <= status < 300:
                run.ok += 1
            if close:
                writer.close()
                reader = writer = None
        except Exception as exc:  # refused, reset, timeout: record, back off, reconnect
            run.records.append((rid, t0, time.time(), type(exc).__name__))
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


async def drive(a: argparse.Namespace, run: Run, signer: Signer | None) -> float:
    """One bounded phase: `a.concurrency` connections until `a.duration` s or `run.count` requests."""
    u = urllib.parse.urlsplit(a.url)
    loop = asyncio.get_running_loop()
    t = loop.time()
    deadline, hard = t + a.duration, t + a.duration + a.timeout
    rate = getattr(a, "rate", None)
    starts = [t + i / rate for i in range(a.concurrency)] if rate else [None] * a.concurrency
    await asyncio.gather(*(_worker(u, a, run, signer, deadline, hard, s) for s in starts))
    return loop.time() - t


def summarize(records: list[tuple[str, float, float, int | str]], wall: float) -> dict[str, object]:
    ok = [r for r in records if isinstance(r[3], int) and 200 <= r[3] < 300]
    lat = sorted((r[2] - r[1]) * 1000 for r in ok)
    errs: dict[str, int] = {}
    for r in records:
        if not (isinstance(r[3], int) and 200 <= r[3] < 300):
            errs[str(r[3])] = errs.get(str(r[3]), 0) + 1
    return {
        "engine": "drive",
        "duration_s": round(wall, 3),
        "attempts": len(records),
        "ok_2xx": len(ok),
        "errors": errs,
        "rps_ok": round(len(ok) / wall, 1) if wall else 0.0,
        "latency_ms": {f"p{p}": pct(lat, p) for p in (50, 90, 99, 99.9)}
        | {"max": round(lat[-1], 3) if lat else None},
    }


def pct(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    return round(sorted_vals[min(len(sorted_vals) - 1, int(p / 100 * len(sorted_vals)))], 3)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-d", "--duration", type=float, default=10.0, help="upper bound, s")
    ap.add_argument("--count", type=int, help="stop after this many requests")
    ap.add_argument(
        "--rate",
        type=float,
        help="open loop: offered requests/s, spread over the connections "
        "(latency counted from each request's due time); default closed loop",
    )
    ap.add_argument("--first-id", type=int, default=1, help="first value of {id}")
    ap.add_argument("--timeout", type=float, default=15.0, help="per-request timeout, s")
    ap.add_argument("--body", default=DEFAULT_BODY, help='JSON template; "{id}" -> unique id')
    ap.add_argument("--sign-secret-file", help="sign with this Standard Webhooks secret (whsec_...)")
    ap.add_argument("--watch-pid", type=int, help="sample RSS/CPU of this process tree")
    ap.add_argument("--sink-pid", type=int, help="count this process tree's CPU as the sink's")
    ap.add_argument("--label", default="")
    ap.add_argument("--out")
    ap.add_argument("--records-out")
    return ap


def main() -> None:
    a = parser().parse_args()
    load.check_target(a.url, False)
    signer = Signer(open(a.sign_secret_file).read()) if a.sign_secret_file else None
    watch = load.Watcher(a.watch_pid) if a.watch_pid else None
    cpu = load.CpuShare(a.watch_pid, a.sink_pid)
    res: dict[str, object] = {
        "label": a.label,
        "url": a.url,
        "concurrency": a.concurrency,
        "rate": a.rate,
        "signed": bool(signer),
        "started_at": time.time(),
    }
    if watch:
        watch.start()
    run = Run(a.first_id)
    if a.count:
        run.last = run.counter + a.count
    wall = asyncio.run(drive(a, run, signer))
    res.update(summarize(run.records, wall))
    if watch:
        res["server"] = watch.stop()
    res["cpu"] = cpu.stop(res.get("server", {}).get("tree_cpu_s", 0.0))  # type: ignore[union-attr]
    if a.records_out:
        with open(a.records_out, "w") as f:
            for r in run.records:
                f.write(f"{r[0]} {r[1]:.6f} {r[2]:.6f} {r[3]}\n")
    emit(res, a.out)


def emit(res: dict, path: str | None) -> None:
    """A run's figures: one JSON line on stdout and, with --out, in that file."""
    out = json.dumps(res)
    print(out)
    if path:
        with open(path, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
