#!/usr/bin/env python3
"""Connector throughput, end to end through a real `patchbay serve`, on a fresh temporary project.

    .venv/bin/python bench/connectors.py [--rows 50000] [--messages 50000] [--out FILE.json]

Two flows, each with its own fresh project, store and hub process (started as a user would, with
`patchbay check` first, stopped with SIGTERM):

  sql       PostgreSQL table polled (`every: 1s`, incremental cursor `updated_at`, batch_size 1000)
            -> map -> MariaDB upsert (key order_id). The rows are loaded into a new PG table before
            the hub starts; the clock runs from /readyz until MariaDB's COUNT(*) (polled every
            0.2 s) reaches --rows. Then SUM(amount) and COUNT(DISTINCT order_id) are checked.
  rabbitmq  RabbitMQ queue consumed (rabbitmq source) -> map -> HTTP POST to a small aiohttp sink
            on 127.0.0.1 run by this script (counts POSTs, distinct Idempotency-Keys and distinct
            message numbers). --messages are published before the hub starts; the clock runs from
            /readyz until the sink has seen every message once.

For each: records/s, hub peak RSS (VmHWM from /proc/<pid>/status) and hub CPU seconds (utime+stime
from /proc/<pid>/stat, ready -> done) per 1000 records, and what the hub's store says afterwards
(deliveries by status, attempts). A Markdown table at the end; JSON with --out.

Everything runs on 127.0.0.1 (PostgreSQL :5432 user postgres db test, MariaDB :3306 root db test,
RabbitMQ :5672 guest/guest). Tables and queues get a random suffix and are dropped at the end, and the
hub is stopped, also on failure or Ctrl-C; each flow fails with a clear message after --timeout s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PATCHBAY = str(VENV_BIN / "patchbay")
HOST = "127.0.0.1"
PG_DSN = f"host={HOST} port=5432 user=postgres dbname=test"
MY = {"host": HOST, "port": 3306, "user": "root", "password": "", "db": "test"}
AMQP_URL = f"amqp://guest:guest@{HOST}:5672/"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Tuning, measured on the 2 vCPU bench VM on 2026-12-06 (rows/s and msgs/s at 50,000 records; see
# bench/RESULTS.md, "Connectors (issue 3)"); the defaults below are the fastest values:
# - MariaDB upsert, max_concurrency / pool_size: 16/4 1120, 16/16 1193, 32/4 2102, 32/8 2147-2260,
#   32/16 2044, 64/8 2269, 64/16 2439-3779, 64/32 3368, 128/8 4020, 128/16 2789-4386 (median 3841 of 5),
#   128/32 3418-3959, 256/16 2769, 256/32 4473 (once). Up to 64 the rate follows max_concurrency, not the
#   pool: the delivery feeder refills its queue (4 x max_concurrency) at most every 50 ms once no new
#   deliveries wake it, so it tops out near 80 x max_concurrency per second. From 64 on the hub is the
#   limit (~0.9 core; the store's writer thread and the event loop), and runs vary by +-25 %.
# - HTTP, max_concurrency (source batch_size 500, prefetch 1000): 16 1106, 32 1940, 64 2882-3063,
#   128 2893-3206: the hub is CPU-bound from 64 on, 128 is within the noise, and 64 holds half as many
#   deliveries in memory, so 64 it is.
# - RabbitMQ source batch_size/prefetch 100/200 vs 500/1000: 2080 vs 1940 at c32, 2668 vs 2882 at c64.
DEFAULTS = {
    "sql_concurrency": 128,
    "mysql_pool_size": 16,
    "http_concurrency": 64,
    "rabbit_batch_size": 500,
    "rabbit_prefetch": 1000,
}


warnings.filterwarnings("ignore", message="Unknown table", module="aiomysql")  # DROP TABLE IF EXISTS


class BenchError(Exception):
    """A failure with a message meant for the user (no traceback)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def reachable(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- /proc readings
def proc_cpu_s(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) is index 0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


# ----------------------------------------------------------------------------- the hub process
def _die_with_parent() -> None:
    """In the child: SIGTERM the hub if this script dies without cleaning up (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class HubProcess:
    """`patchbay serve DIR` in its own session (a Ctrl-C here reaches it only through stop())."""

    def __init__(self, project: Path) -> None:
        self.project = project
        self.port = free_port()
        self.log_path = project / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_settings(self) -> None:
        (self.project / "patchbay.yaml").write_text(
            yaml.safe_dump(
                {
                    "host": HOST,
                    "port": self.port,
                    "store": ".patchbay/patchbay.db",
                    "log_format": "text",
                    "shutdown_grace_s": 2,
                }
            )
        )

    def check(self) -> None:
        r = subprocess.run([PATCHBAY, "check", str(self.project)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise BenchError(
                f"`patchbay check {self.project}` failed (rc {r.returncode}):\n{r.stdout}{r.stderr}"
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, ready_timeout: float = 60.0) -> None:
        import aiohttp

        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [PATCHBAY, "serve", str(self.project)],
                cwd=self.project,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + ready_timeout
        url = f"http://{HOST}:{self.port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"patchbay serve exited with rc {self.proc.returncode}:\n{self.tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with http.get(url) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise BenchError(f"patchbay serve not ready after {ready_timeout:.0f} s:\n{self.tail()}")
                await asyncio.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    async def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM this PID only; SIGKILL after `grace` s. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                log(f"hub {self.proc.pid} still running {grace:.0f} s after SIGTERM: SIGKILL")
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def store_summary(self) -> dict[str, Any]:
        """What the (stopped) hub's store recorded: events and deliveries by status, attempts, timings."""
        db = self.project / ".patchbay" / "patchbay.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            q = con.execute
            events = dict(q("SELECT status, COUNT(*) FROM events GROUP BY status").fetchall())
            deliveries = dict(q("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall())
            attempts = q("SELECT COUNT(*) FROM attempts").fetchone()[0]
            first_rx, last_rx = q("SELECT MIN(received_at), MAX(received_at) FROM events").fetchone()
            last_done = q("SELECT MAX(started_at + latency_ms / 1000.0) FROM attempts").fetchone()[0]
            lat = sorted(r[0] for r in q("SELECT latency_ms FROM attempts"))
        finally:
            con.close()
        latency: dict[str, float] = {}
        if lat:
            latency = {f"p{p}": round(lat[len(lat) * p // 100], 2) for p in (50, 90, 99)}
            latency["max"] = round(lat[-1], 1)
        return {
            "events": events,
            "deliveries": deliveries,
            "attempts": attempts,
            "attempt_latency_ms": latency,
            "first_received_at": first_rx,
            "last_received_at": last_rx,
            "last_attempt_done_at": last_done,
        }


class Profiler:
    """Optional: py-spy on the hub for a while after it is ready (raw format, for bench/hotspots.py)."""

    def __init__(self, out: Path | None, pid: int, duration: int) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = out
        if out is None:
            return
        spy = VENV_BIN / "py-spy"
        if not spy.exists():
            raise BenchError(f"--profile needs {spy} (pip install py-spy)")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(duration),
                "--rate",
                "200",
                "--threads",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        log(f"py-spy ({duration} s) on hub {pid} -> {out}")

    async def finish(self) -> None:
        if self.proc is None:
            return
        deadline = time.monotonic() + 60
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        log(f"profile written: {self.out} (bench/hotspots.py {self.out})")


# ----------------------------------------------------------------------------- measuring one run
class Meter:
    """The clock and /proc readings of one run, from hub ready to the last record seen."""

    def __init__(self, hub: HubProcess, n: int) -> None:
        self.hub, self.n = hub, n
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.cpu0 = proc_cpu_s(hub.pid)
        self.first_s: float | None = None
        self.progress: list[tuple[float, int]] = []

    def seen(self, count: int) -> float:
        t = time.monotonic() - self.t0
        if count and self.first_s is None:
            self.first_s = t
        self.progress.append((round(t, 2), count))
        return t

    def result(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0
        cpu = proc_cpu_s(self.hub.pid)
        hwm = proc_status_kb(self.hub.pid, "VmHWM")
        rss = proc_status_kb(self.hub.pid, "VmRSS")
        first = self.first_s or 0.0
        return {
            "records": self.n,
            "seconds": round(elapsed, 2),
            "records_per_s": round(self.n / elapsed, 1),
            # The same, from the first record seen at the far end (leaves out the first poll/connect).
            "first_seen_s": round(first, 2),
            "records_per_s_after_first": round(self.n / (elapsed - first), 1) if elapsed > first else None,
            "hub_peak_rss_mb": round(hwm / 1024, 1),
            "hub_rss_at_end_mb": round(rss / 1024, 1),
            "hub_cpu_s": round(cpu - self.cpu0, 2),
            "hub_cpu_s_per_1000": round((cpu - self.cpu0) / self.n * 1000, 3),
            "hub_cpu_s_incl_startup": round(cpu, 2),
            # (seconds since ready, records at the far end), about once a second
            "progress": [p for i, p in enumerate(self.progress) if i % 5 == 0] + self.progress[-1:],
        }

    def store_timing(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Relative to hub ready: when the last record was ingested, when the last attempt finished."""

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.wall0, 2)

        return {
            "ingested_first_s": rel(summary.pop("first_received_at")),
            "ingested_all_s": rel(summary.pop("last_received_at")),
            "last_attempt_done_s": rel(summary.pop("last_attempt_done_at")),
        }


async def wait_until(meter: Meter, count: Any, hub: HubProcess, timeout: float, what: str) -> None:
    """Poll `count()` every 0.2 s until it reaches meter.n; fail clearly on timeout or a dead hub."""
    last_log = 0.0
    while True:
        n = await asyncio.wait_for(count(), 10)
        t = meter.seen(n)
        if n >= meter.n:
            return
        if not hub.alive():
            rc = hub.proc.returncode if hub.proc else "?"
            raise BenchError(f"the hub exited (rc {rc}) with {n}/{meter.n} {what}:\n{hub.tail()}")
        if t > timeout:
            raise BenchError(f"timed out after {timeout:.0f} s: {n}/{meter.n} {what}. Hub log:\n{hub.tail()}")
        if t - last_log >= 5:
            last_log = t
            log(f"  {t:6.1f} s: {n} {what}")
        await asyncio.sleep(0.2)


# ----------------------------------------------------------------------------- flow 1: postgres -> mariadb
async def bench_sql(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import aiomysql
    import psycopg

    n = args.rows
    tag = uuid.uuid4().hex[:8]
    src, dst = f"pb_bench_orders_{tag}", f"pb_bench_report_{tag}"
    project = root / "sql"
    (project / "flows").mkdir(parents=True)
    hub = HubProcess(project)
    pg = my = None
    profiler: Profiler | None = None
    try:
        pg = await asyncio.wait_for(psycopg.AsyncConnection.connect(PG_DSN, autocommit=True), 15)
        my = await asyncio.wait_for(aiomysql.connect(**MY, autocommit=True), 15)
        log(f"sql: loading {n} rows into PostgreSQL {src}")
        await pg.execute(
            f"CREATE TABLE {src} (id int PRIMARY KEY, customer text NOT NULL, "
            "amount_cents int NOT NULL, updated_at timestamptz NOT NULL)"
        )
        await asyncio.wait_for(
            pg.execute(
                f"INSERT INTO {src} SELECT g, 'cust-' || (g %% 97), (g * 37) %% 100003, "
                f"timestamptz '2026-11-01' + g * interval '1 second' FROM generate_series(1, %s) g",
                (n,),
            ),
            300,
        )
        await pg.execute(f"ANALYZE {src}")
        async with my.cursor() as c:
            await c.execute(
                f"CREATE TABLE {dst} (order_id INT PRIMARY KEY, customer VARCHAR(64), "
                "amount DECIMAL(12,2), source VARCHAR(16))"
            )
        expected_cents = sum((g * 37) % 100003 for g in range(1, n + 1))

        hub.write_settings()
        (project / "systems.yaml").write_text(
            yaml.safe_dump(
                {
                    "shop_db": {
                        "kind": "postgres",
                        "owner": "bench",
                        "purpose": "Source of the connector bench.",
                        "host": HOST,
                        "database": "test",
                        "user": "postgres",
                        "allow_private_network": True,
                    },
                    "reporting": {
                        "kind": "mysql",
                        "owner": "bench",
                        "purpose": "Destination of the connector bench.",
                        "host": HOST,
                        "database": "test",
                        "user": "root",
                        "allow_private_network": True,
                        "pool_size": args.mysql_pool_size,
                    },
                }
            )
        )
        (project / "flows" / "orders_sync.yaml").write_text(
            yaml.safe_dump(
                {
                    "purpose": "Bench: PostgreSQL orders polled into MariaDB reporting.",
                    "owner": "bench",
                    "trigger": {
                        "schedule": {"every": "1s"},
                        "source": {
                            "system": "shop_db",
                            "table": src,
                            "cursor_column": "updated_at",
                            "batch_size": args.batch_size,
                        },
                    },
                    "record_key": "order_id",
                    "steps": [
                        {
                            "map": {
                                "order_id": "id",
                                "customer": "upper(customer)",
                                "amount": "amount_cents",
                                "source": "'shop'",
                            }
                        }
                    ],
                    "destinations": [
                        {
                            "name": "report",
                            "system": "reporting",
                            "table": dst,
                            "write_mode": "upsert",
                            "key": ["order_id"],
                            "columns": {
                                "order_id": "order_id",
                                "customer": "customer",
                                "amount": "divide(amount, `100`)",
                                "source": "source",
                            },
                            "delivery": {"max_concurrency": args.sql_concurrency},
                        }
                    ],
                },
                sort_keys=False,
            )
        )
        hub.check()

        async def count() -> int:
            async with my.cursor() as c:
                await c.execute(f"SELECT COUNT(*) FROM {dst}")
                return int((await c.fetchone())[0])

        log(
            f"sql: starting the hub (max_concurrency {args.sql_concurrency}, "
            f"pool_size {args.mysql_pool_size}, batch_size {args.batch_size})"
        )
        await hub.start()
        meter = Meter(hub, n)
        profiler = Profiler(args.profile and args.profile / f"sql-{tag}.txt", hub.pid, args.profile_s)
        await wait_until(meter, count, hub, args.timeout, "rows in MariaDB")
        result = meter.result()
        log(f"sql: {n} rows in {result['seconds']} s = {result['records_per_s']} rows/s")

        await asyncio.sleep(1.0)  # nothing extra arrives late
        async with my.cursor() as c:
            await c.execute(
                f"SELECT COUNT(*), COUNT(DISTINCT order_id), SUM(amount), MIN(customer), "
                f"MAX(source) FROM {dst}"
            )
            rows, distinct, total, cust, source = await c.fetchone()
        ok = (
            rows == n
            and distinct == n
            and Decimal(total) == Decimal(expected_cents) / 100
            and str(cust).startswith("CUST-")
            and source == "shop"
        )
        result["check"] = {
            "ok": ok,
            "rows": rows,
            "distinct_ids": distinct,
            "sum_amount": str(total),
            "expected_sum_amount": str(Decimal(expected_cents) / 100),
        }
        await profiler.finish()
        rc = await hub.stop()
        result["hub_exit_code"] = rc
        summary = hub.store_summary()
        result.update(meter.store_timing(summary))
        result["store"] = summary
        result["settings"] = {
            "max_concurrency": args.sql_concurrency,
            "pool_size": args.mysql_pool_size,
            "batch_size": args.batch_size,
            "schedule": "every 1s",
        }
        if not ok:
            raise BenchError(f"sql: contents differ: {result['check']}")
        return result
    finally:
        if profiler is not None:
            await profiler.finish()
        await hub.stop()
        if pg is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pg.execute(f"DROP TABLE IF EXISTS {src}"), 30)
            await pg.close()
        if my is not None:
            with contextlib.suppress(Exception):
                async with my.cursor() as c:
                    await asyncio.wait_for(c.execute(f"DROP TABLE IF EXISTS {dst}"), 30)
            my.close()


# ----------------------------------------------------------------------------- flow 2: rabbitmq -> http
class CountingSink:
    """aiohttp on 127.0.0.1: counts POSTs, distinct Idempotency-Keys and distinct message numbers."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.posts = 0
        self.unkeyed = 0
        self.keys: set[str] = set()
        self.ns: set[int] = set()
        self.foreign = 0  # bodies not from this run, or unreadable
        self.port = free_port()
        self.runner: Any = None

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        self.posts += 1
        key = request.headers.get("Idempotency-Key")
        if key:
            self.keys.add(key)
        else:
            self.unkeyed += 1
        try:
            doc = json.loads(body)
            if doc.get("run") != self.run_id:
                raise ValueError
            self.ns.add(int(doc["order"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.foreign += 1
        return web.Response(text="ok")

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def bench_rabbitmq(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import aio_pika

    n = args.messages
    tag = uuid.uuid4().hex[:8]
    queue = f"pb-bench-{tag}"
    project = root / "rabbitmq"
    (project / "flows").mkdir(parents=True)
    hub = HubProcess(project)
    sink = CountingSink(tag)
    conn = None
    profiler: Profiler | None = None
    try:
        conn = await asyncio.wait_for(aio_pika.connect(AMQP_URL), 15)
        channel = await conn.channel()  # publisher confirms on: published = stored by the broker
        await channel.declare_queue(queue, durable=True)
        log(f"rabbitmq: publishing {n} persistent messages to {queue}")
        t = time.monotonic()
        chunk = 1000
        for start in range(0, n, chunk):
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        channel.default_exchange.publish(
                            aio_pika.Message(
                                json.dumps({"n": i, "run": tag}).encode(),
                                message_id=f"{tag}-{i}",
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            routing_key=queue,
                        )
                        for i in range(start, min(start + chunk, n))
                    )
                ),
                60,
            )
        q = await channel.declare_queue(queue, passive=True)
        queued = int(q.declaration_result.message_count)
        log(f"rabbitmq: {queued} messages queued in {time.monotonic() - t:.1f} s")
        if queued != n:
            raise BenchError(f"rabbitmq: {queued} messages in {queue} after publishing {n}")
        await sink.start()

        hub.write_settings()
        (project / "systems.yaml").write_text(
            yaml.safe_dump(
                {
                    "broker": {
                        "kind": "rabbitmq",
                        "owner": "bench",
                        "purpose": "Source of the connector bench.",
                        "host": HOST,
                        "allow_private_network": True,
                    },
                    "reporting": {
                        "kind": "http",
                        "owner": "bench",
                        "purpose": "The bench's counting sink.",
                        "url": f"http://{HOST}:{sink.port}",
                        "allow_private_network": True,
                    },
                }
            )
        )
        (project / "flows" / "orders_stream.yaml").write_text(
            yaml.safe_dump(
                {
                    "purpose": "Bench: orders from a RabbitMQ queue POSTed to a reporting API.",
                    "owner": "bench",
                    "trigger": {
                        "source": {
                            "system": "broker",
                            "queue": queue,
                            "batch_size": args.rabbit_batch_size,
                            "prefetch": args.rabbit_prefetch,
                        }
                    },
                    "steps": [{"map": {"order": "n", "run": "run", "source": "'queue'"}}],
                    "destinations": [
                        {
                            "name": "report",
                            "system": "reporting",
                            "method": "POST",
                            "path": "/orders",
                            "delivery": {"max_concurrency": args.http_concurrency},
                        }
                    ],
                },
                sort_keys=False,
            )
        )
        hub.check()

        async def count() -> int:
            return len(sink.ns)

        log(
            f"rabbitmq: starting the hub (max_concurrency {args.http_concurrency}, batch_size "
            f"{args.rabbit_batch_size}, prefetch {args.rabbit_prefetch})"
        )
        await hub.start()
        meter = Meter(hub, n)
        profiler = Profiler(args.profile and args.profile / f"rabbitmq-{tag}.txt", hub.pid, args.profile_s)
        await wait_until(meter, count, hub, args.timeout, "messages at the sink")
        result = meter.result()
        log(f"rabbitmq: {n} messages in {result['seconds']} s = {result['records_per_s']} msgs/s")

        await asyncio.sleep(1.0)  # nothing extra arrives late
        await profiler.finish()
        rc = await hub.stop()
        q = await channel.declare_queue(queue, passive=True)
        left = int(q.declaration_result.message_count)
        ok = (
            len(sink.keys) == n
            and len(sink.ns) == n
            and sink.unkeyed == 0
            and sink.foreign == 0
            and left == 0
        )
        result["check"] = {
            "ok": ok,
            "posts": sink.posts,
            "distinct_keys": len(sink.keys),
            "distinct_messages": len(sink.ns),
            "unkeyed": sink.unkeyed,
            "foreign": sink.foreign,
            "left_in_queue": left,
        }
        result["hub_exit_code"] = rc
        summary = hub.store_summary()
        result.update(meter.store_timing(summary))
        result["store"] = summary
        result["settings"] = {
            "max_concurrency": args.http_concurrency,
            "batch_size": args.rabbit_batch_size,
            "prefetch": args.rabbit_prefetch,
        }
        if not ok:
            raise BenchError(f"rabbitmq: contents differ: {result['check']}")
        return result
    finally:
        if profiler is not None:
            await profiler.finish()
        await hub.stop()
        await sink.stop()
        if conn is not None:
            with contextlib.suppress(Exception):
                channel = await conn.channel()
                await asyncio.wait_for(channel.queue_delete(queue), 15)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 10)


# ----------------------------------------------------------------------------- report
def table(results: dict[str, dict[str, Any]]) -> str:
    names = {"sql": "PostgreSQL poll → map → MariaDB upsert", "rabbitmq": "RabbitMQ → map → HTTP POST"}
    lines = [
        "| flow | records | seconds | records/s | hub peak RSS (MB) | hub CPU s / 1000 | check |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in results.items():
        if "error" in r:
            first = r["error"].splitlines()[0]
            lines.append(f"| {names[key]} | {r.get('records', '')} | | | | | **failed**: {first} |")
            continue
        c = r["check"]
        check = (
            f"sum ok, {c['distinct_ids']} distinct"
            if key == "sql"
            else f"{c['distinct_keys']} distinct keys, {c['posts']} POSTs"
        )
        lines.append(
            f"| {names[key]} | {r['records']} | {r['seconds']} | {r['records_per_s']:.0f} | "
            f"{r['hub_peak_rss_mb']} | {r['hub_cpu_s_per_1000']:.3f} | {check} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    versions: dict[str, str] = {}
    for mod in ("patchbay", "aiohttp", "psycopg", "aiomysql", "aio_pika"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "versions": versions,
    }


async def main_async(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # clean up on SIGTERM as on Ctrl-C

    flows = ["sql", "rabbitmq"] if args.only is None else [args.only]
    needs = {"sql": [("PostgreSQL", 5432), ("MariaDB", 3306)], "rabbitmq": [("RabbitMQ", 5672)]}
    for flow in flows:
        for name, port in needs[flow]:
            if not reachable(port):
                raise BenchError(f"{name} is not reachable on {HOST}:{port}")

    root = Path(tempfile.mkdtemp(prefix="pb-connectors-"))
    log(f"projects under {root}")
    results: dict[str, dict[str, Any]] = {}
    failed = False
    try:
        for flow in flows:
            runner = bench_sql if flow == "sql" else bench_rabbitmq
            try:
                results[flow] = await runner(args, root)
            except Exception as exc:  # one flow failing still lets the other run; cleanup already ran
                failed = True
                what = str(exc) if isinstance(exc, BenchError) else traceback.format_exc()
                log(f"{flow}: FAILED: {what}")
                results[flow] = {
                    "records": args.rows if flow == "sql" else args.messages,
                    "error": f"{type(exc).__name__}: {exc}" if what != str(exc) else what,
                }
    finally:
        if failed or args.keep:
            log(f"kept {root} (hub logs: */serve.log)")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(table(results))
    doc = {
        "environment": environment(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "flows": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.out}")
    if args.verbose:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000, help="rows loaded into PostgreSQL (default 50000)")
    ap.add_argument(
        "--messages", type=int, default=50_000, help="messages published to RabbitMQ (default 50000)"
    )
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--only", choices=["sql", "rabbitmq"], help="run one flow only")
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds from hub ready until each flow must be complete (default 300)",
    )
    ap.add_argument(
        "--batch-size", type=int, default=1000, help="PostgreSQL source batch_size (default 1000)"
    )
    ap.add_argument(
        "--sql-concurrency",
        type=int,
        default=DEFAULTS["sql_concurrency"],
        help="MariaDB destination max_concurrency (default %(default)s)",
    )
    ap.add_argument(
        "--mysql-pool-size",
        type=int,
        default=DEFAULTS["mysql_pool_size"],
        help="MariaDB system pool_size (default %(default)s)",
    )
    ap.add_argument(
        "--http-concurrency",
        type=int,
        default=DEFAULTS["http_concurrency"],
        help="HTTP destination max_concurrency (default %(default)s)",
    )
    ap.add_argument(
        "--rabbit-batch-size",
        type=int,
        default=DEFAULTS["rabbit_batch_size"],
        help="RabbitMQ source batch_size (default %(default)s)",
    )
    ap.add_argument(
        "--rabbit-prefetch",
        type=int,
        default=DEFAULTS["rabbit_prefetch"],
        help="RabbitMQ source prefetch (default %(default)s)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the hub after it is ready (raw profiles in DIR; see bench/hotspots.py)",
    )
    ap.add_argument("--profile-s", type=int, default=10, help="py-spy duration (default 10 s)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects (stores, hub logs)")
    ap.add_argument("-v", "--verbose", action="store_true", help="also print the full results as JSON")
    args = ap.parse_args()
    if args.rows < 1 or args.messages < 1:
        ap.error("--rows and --messages must be at least 1")
    if not Path(PATCHBAY).exists():
        ap.error(f"{PATCHBAY} not found: run from a checkout with its .venv")
    try:
        return asyncio.run(main_async(args))
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; cleaned up")
        return 130


if __name__ == "__main__":
    sys.exit(main())
