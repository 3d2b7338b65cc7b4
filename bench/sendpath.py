#!/usr/bin/env python3
"""One delivery's CPU cost in the hub's HTTP sink (`HttpSink.send`: the request, the bounded read of the
answer, its class), against a small HTTP server in another process on 127.0.0.1, N requests in flight.

    .venv/bin/python bench/sendpath.py [-n 20000] [--reps 5] [--concurrency 32]

Prints CPU microseconds of this process per send (process time: kernel time of the socket calls
included). On a shared VM that figure moves by ±15 % from run to run; for a before/after of a change,
count instructions instead, which repeat to within 0.1 %: run it under callgrind at two sizes and take
the difference, so start-up cancels out:

    N=3000:  valgrind --tool=callgrind .venv/bin/python bench/sendpath.py -n 3000 --reps 1
    N=6000:  the same with -n 6000;  instructions per send = (I6000 - I3000) / 3000

Not a timed test: it only prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hotpath import bench_project

SERVER = """
import sys
from aiohttp import web
async def answer(request):
    await request.read()
    return web.json_response({"ok": True}, status=201)
app = web.Application()
app.router.add_post("/{tail:.*}", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            sys.exit("the answering server exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("the answering server did not listen")


async def run(args: argparse.Namespace, root: Path) -> None:
    from patchbay.config.project import load_or_raise
    from patchbay.engine.hub import build_sinks
    from patchbay.security.secrets import SecretResolver

    proj = load_or_raise(root)
    flow = proj.flows["lead"]
    sink = build_sinks(flow, proj, SecretResolver(None, {}), None)["crm"]
    record = {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace", "company": "AE"}
    request = sink.render(record, "evt_0.crm")
    n, conc = args.n, args.concurrency

    async def sender(k: int) -> None:
        for i in range(k, n, conc):
            outcome = await sink.send(request, f"evt_{i}.crm")
            if outcome.cls.value != "success":
                raise SystemExit(f"send {i}: {outcome.cls.value} {outcome.error}")

    figures = []
    for rep in range(args.reps):
        t0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(sender(k) for k in range(conc)))
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        figures.append(cpu / n * 1e6)
        print(f"  rep {rep + 1}: {figures[-1]:6.1f} us CPU a send, {n / wall:,.0f} sends/s")
    print(f"median {statistics.median(figures):.1f} us, best {min(figures):.1f} us CPU a send")
    if sink.resources.http is not None:
        await sink.resources.http.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000, help="sends per round")
    ap.add_argument("--reps", type=int, default=5, help="rounds")
    ap.add_argument(
        "--concurrency", type=int, default=32, help="sends in flight (a destination's max_concurrency)"
    )
    args = ap.parse_args()
    import uvloop

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        wait_port(port, server)
        with tempfile.TemporaryDirectory() as tmp:
            root = bench_project(Path(tmp), Path(__file__).resolve().parent.parent, sink_port=port)
            os.environ.setdefault("PB_BENCH_WHSEC", (Path(tmp) / "whsec").read_text().strip())
            uvloop.run(run(args, root))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
