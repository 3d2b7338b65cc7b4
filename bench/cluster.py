"""Patchbay on PostgreSQL (one node, and split over processes by role) and on SQLite, beside Node-RED, in
one run through the shared webhook harness (sink.py, load.py and Node-RED's flow in HARNESS_DIR).

    .venv/bin/python bench/cluster.py [--duration 20] [--concurrency 16] [--reps 1]
        [--variants node-red,sqlite,pg,pg-web1-worker1,pg-web2-worker1]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres] [--out DIR] [--profile]
        [--other CHECKOUT --variants ...,pg@other]   (the same variant run by another checkout: before/after)

Every variant takes the same lead-capture flow (bench/patchbay_peer.sh writes it: map, validate, POST to
the harness's sink) and the same closed-loop load (load.py, N connections). It prints per variant:
- acknowledged/s (2xx answers; Node-RED answers after delivering, Patchbay after the commit) and
  delivered/s: what the sink received per second, sampled from its /stats between 20% of the run and its
  end (sustained: a hub that acknowledges faster than it delivers shows its real rate here), and the
  ratio of each to Node-RED's of the same run. After the load the backlog drains (--drain-s), and the
  costs below are over that whole time and every acknowledged event, each through its whole path:
- CPU ms per event: the CPU time of the hub's processes, and of the PostgreSQL server processes
  serving them (backends found by application_name);
- on PostgreSQL, per event: statements, round trips and transactions (the store's own
  counters, /metrics `patchbay_store_*_total`), WAL bytes: the WAL records of the run's own database
  (pg_walinspect over the run's LSN range, by database oid and transaction), or, when those records are
  gone or the extension is missing, pg_current_wal_lsn's difference (then any other client's writes on
  the server count too; it says which), and the database's growth on disk.

Each PostgreSQL variant runs in a database of its own (created and dropped here), so the WAL and the
backends are told apart on a shared server. A split variant needs `patchbay serve --role`; without it
the variant is skipped with a note. Two web processes listen on two ports and the load is split between
them (two load.py, half the connections each). Loopback only; only processes started here are stopped.

Any variant named with `-cpus` after it (`sqlite-web1-worker1-cpus`, `pg-cpus`) runs each of its processes on a
CPU of its own (`serve --cpus`: the first on CPU 0, the next on 1, ...); `node-red-cpus` is Node-RED with every
thread on CPU 0, for the same comparison. The ratios stay to plain `node-red`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchbay.engine.roles import pin

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PATCHBAY = REPO / ".venv" / "bin" / "patchbay"


@dataclass
class Proc:
    roles: str | None  # None: every role (a plain `patchbay serve`)
    port: int
    web: bool = True
    cpus: str | None = None  # `serve --cpus` (variants NAME-cpus: each process a CPU of its own)


@dataclass
class Variant:
    name: str
    store: str  # sqlite | pg
    procs: list[Proc] = field(default_factory=list)
    patchbay: Path = PATCHBAY  # `pg@other`: another checkout's (--other)


def variants(base_port: int) -> dict[str, Variant]:
    p = base_port
    return {
        "sqlite": Variant("sqlite", "sqlite", [Proc(None, p)]),
        "pg": Variant("pg", "pg", [Proc(None, p)]),
        "sqlite-web1-worker1": Variant(
            "sqlite-web1-worker1", "sqlite", [Proc("web", p), Proc("worker,scheduler", p + 1, False)]
        ),
        "sqlite-web2-worker1": Variant(
            "sqlite-web2-worker1",
            "sqlite",
            [Proc("web", p), Proc("web", p + 1), Proc("worker,scheduler", p + 2, False)],
        ),
        "pg-web1-worker1": Variant(
            "pg-web1-worker1", "pg", [Proc("web", p), Proc("worker,scheduler", p + 1, False)]
        ),
        "pg-web2-worker1": Variant(
            "pg-web2-worker1",
            "pg",
            [Proc("web", p), Proc("web", p + 1), Proc("worker,scheduler", p + 2, False)],
        ),
        "pg-web2-worker2": Variant(
            "pg-web2-worker2",
            "pg",
            [
                Proc("web,scheduler", p),
                Proc("web", p + 1),
                Proc("worker", p + 2, False),
                Proc("worker", p + 3, False),
            ],
        ),
        "pg-web1-worker2": Variant(
            "pg-web1-worker2",
            "pg",
            [Proc("web,scheduler", p), Proc("worker", p + 1, False), Proc("worker", p + 2, False)],
        ),
    }


# ------------------------------------------------------------------ helpers
def http(method: str, url: str, timeout: float = 5) -> bytes:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return bytes(r.read())


def wait_http(url: str, secs: float = 60, proc: subprocess.Popen[Any] | None = None) -> None:
    end = time.time() + secs
    while time.time() < end:
        try:
            http("GET", url, timeout=1)
            return
        except Exception:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"{url}: the process exited ({proc.returncode})") from None
            time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {secs} s")


def children(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in children(k)]


def cpu_s(pid: int) -> float:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_times() -> tuple[float, float]:
    """(idle, total) jiffies of the whole machine (/proc/stat): the share of the cores nobody used."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    return fields[3] + fields[4], sum(fields)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class CpuWatch:
    """CPU seconds of a set of processes over a run, sampled so that processes that end (a pooled
    PostgreSQL backend closed) still count up to their last sample; new ones count from zero."""

    def __init__(self, pids: Any) -> None:
        self.pids = pids  # a callable giving the current pids
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._sample(initial=True)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _sample(self, initial: bool = False) -> None:
        for p in self.pids():
            c = cpu_s(p)
            if p not in self.first:
                self.first[p] = c if initial else 0.0
            self.last[p] = c

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self.t.join()
        self._sample()
        return sum(self.last[p] - self.first[p] for p in self.last)


# ------------------------------------------------------------------ PostgreSQL
class Pg:
    def __init__(self, url: str) -> None:
        import psycopg

        self.psycopg = psycopg
        self.url = url

    def q(self, sql: str, args: Any = (), db: str | None = None) -> list[Any]:
        url = self.url if db is None else self.url.rsplit("/", 1)[0] + "/" + db
        with self.psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql, args)
            return cur.fetchall() if cur.description else []

    def create(self) -> tuple[str, int, bool]:
        name = f"pb_cluster_bench_{uuid.uuid4().hex[:10]}"
        self.q(f'CREATE DATABASE "{name}"')
        oid = self.q("SELECT oid FROM pg_database WHERE datname=%s", (name,))[0][0]
        try:
            self.q("CREATE EXTENSION IF NOT EXISTS pg_walinspect", db=name)
            inspect = True
        except self.psycopg.Error:
            inspect = False
        return name, int(oid), inspect

    def drop(self, name: str) -> None:
        self.q(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def lsn(self) -> str:
        return str(self.q("SELECT pg_current_wal_lsn()")[0][0])

    def backends(self, app: str) -> list[int]:
        return [r[0] for r in self.q("SELECT pid FROM pg_stat_activity WHERE application_name=%s", (app,))]

    def autovacuum(self, db: str | None) -> list[int]:
        """The autovacuum workers at work in database `db` now."""
        sql = "SELECT pid FROM pg_stat_activity WHERE backend_type='autovacuum worker' AND datname=%s"
        return [r[0] for r in self.q(sql, (db,))]

    def wal(self, db: str, oid: int, inspect: bool, start: str, end: str) -> tuple[float, str]:
        """WAL bytes of database `oid` between two LSNs, and how they were told apart."""
        if inspect:
            try:
                row = self.q(
                    """WITH r AS (SELECT xid, record_length, block_ref FROM pg_get_wal_records_info(%s, %s)),
                         x AS (SELECT DISTINCT xid FROM r WHERE xid <> '0' AND block_ref LIKE %s)
                       SELECT COALESCE(SUM(record_length), 0) FROM r
                       WHERE block_ref LIKE %s OR xid IN (SELECT xid FROM x)""",
                    (start, end, f"% rel %/{oid}/%", f"% rel %/{oid}/%"),
                    db=db,
                )
                self.breakdown = self.q(
                    """WITH r AS (SELECT * FROM pg_get_wal_records_info(%s, %s)),
                         x AS (SELECT DISTINCT xid FROM r WHERE xid <> '0' AND block_ref LIKE %s)
                       SELECT resource_manager, record_type, count(*), SUM(record_length), SUM(fpi_length)
                       FROM r WHERE block_ref LIKE %s OR xid IN (SELECT xid FROM x)
                       GROUP BY 1, 2 ORDER BY 4 DESC""",
                    (start, end, f"% rel %/{oid}/%", f"% rel %/{oid}/%"),
                    db=db,
                )
                return float(row[0][0]), "its own records (pg_walinspect)"
            except self.psycopg.Error as exc:
                why = str(exc).splitlines()[0]
                note = f"LSN difference (whole server; pg_walinspect: {why})"
        else:
            note = "LSN difference (whole server; no pg_walinspect)"
        row = self.q("SELECT pg_wal_lsn_diff(%s, %s)", (end, start))
        return float(row[0][0]), note


# ------------------------------------------------------------------ one load run
def metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        text = http("GET", f"http://127.0.0.1:{port}/metrics").decode()
    except Exception:
        return out
    for line in text.splitlines():
        for what in ("statements", "round_trips", "transactions"):
            if line.startswith(f"patchbay_store_{what}_total "):
                out[what] = float(line.split()[1])
    return out


def load(
    a: argparse.Namespace, urls: list[str], sink: str, label: str, out_dir: Path
) -> tuple[dict[str, Any], float]:
    """Run load.py against `urls` (the connections split between them); returns (merged result,
    sustained delivered/s from the sink's count)."""
    http("POST", sink + "/reset")
    per = max(1, a.concurrency // len(urls))
    procs = []
    for i, url in enumerate(urls):
        cmd = [
            sys.executable if a.load_python == "venv" else a.load_python,
            str(Path(a.harness) / "load.py"),
            "--url",
            url,
            "-c",
            str(per),
            "-d",
            str(a.duration),
            "--label",
            f"{label} #{i}",
            "--out",
            str(out_dir / f"{label}-load{i}.json"),
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    t0 = time.time()
    samples: list[tuple[float, int]] = []
    while any(p.poll() is None for p in procs) and time.time() - t0 < a.duration:
        samples.append((time.time() - t0, json.loads(http("GET", sink + "/stats"))["count"]))
        time.sleep(0.25)
    samples.append((time.time() - t0, json.loads(http("GET", sink + "/stats"))["count"]))
    for p in procs:
        p.wait(a.duration + 60)
    merged: dict[str, Any] = {"ok": 0, "non_2xx": 0, "rps_ok": 0.0, "p50": [], "p99": []}
    for i in range(len(urls)):
        r = json.loads((out_dir / f"{label}-load{i}.json").read_text())
        merged["ok"] += r["ok_2xx_3xx"]
        merged["non_2xx"] += r["non_2xx"] + sum(r["socket_errors"].values())
        merged["rps_ok"] += r["rps_ok"]
        merged["p50"].append(r["latency_ms"]["p50"])
        merged["p99"].append(r["latency_ms"]["p99"])
    # sustained: from 20% of the run to its end, by the sink's count
    start = next(s for s in samples if s[0] >= 0.2 * a.duration)
    end = samples[-1]
    delivered = (end[1] - start[1]) / max(1e-6, end[0] - start[0])
    merged["sink_at_end"] = end[1]
    # then the backlog drains, so that the costs below are those of every acknowledged event's whole path
    deadline, count = time.time() + a.drain_s, end[1]
    while count < merged["ok"] and time.time() < deadline:
        time.sleep(0.2)
        count = json.loads(http("GET", sink + "/stats"))["count"]
    merged["drained"] = count
    merged["drain_s"] = round(time.time() - t0 - end[0], 1)
    return merged, delivered


# ------------------------------------------------------------------ the variants
def run_node_red(
    a: argparse.Namespace, sink: str, out_dir: Path, env: dict[str, str], pinned: bool = False
) -> dict[str, Any]:
    """Node-RED's flow; `pinned` (variant node-red-cpus): every thread of it on CPU 0, as `serve --cpus 0`."""
    peer = str(Path(a.harness) / "peer.sh")
    subprocess.run([peer, "node-red", "setup", "sync"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([peer, "node-red", "start"], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        pid = int(Path(env["RUN_DIR"], "node-red.pid").read_text())
        for p in [pid, *children(pid)] if pinned else []:
            pin(frozenset({0}), p)
        url = f"http://127.0.0.1:{env['NR_BENCH_PORT']}/hook/lead"
        warm(a, [url])
        watch = CpuWatch(lambda: [pid, *children(pid)])
        res, delivered = load(a, [url], sink, "node-red-cpus" if pinned else "node-red", out_dir)
        cpu = watch.stop()
    finally:
        subprocess.run([peer, "node-red", "stop"], env=env, check=False)
    res.update(delivered=delivered, hub_cpu_s=cpu, db_cpu_s=0.0, loadavg=loadavg())
    return res


def warm(a: argparse.Namespace, urls: list[str]) -> None:
    for url in urls:
        subprocess.run(
            [sys.executable, str(Path(a.harness) / "load.py"), "--url", url, "-c", "8", "-d", str(a.warmup)],
            stdout=subprocess.DEVNULL,
            check=False,
        )


def run_patchbay(
    a: argparse.Namespace, v: Variant, sink: str, out_dir: Path, pg: Pg | None
) -> dict[str, Any] | None:
    if (
        any(p.roles for p in v.procs)
        and "--role"
        not in subprocess.run([str(PATCHBAY), "serve", "--help"], capture_output=True, text=True).stdout
    ):
        print(f"  {v.name}: skipped (this Patchbay's serve has no --role)")
        return None
    run_dir = out_dir / v.name
    env = {
        **os.environ,
        "PB_RUN_DIR": str(run_dir),
        "PB_PORT": str(v.procs[0].port),
        "SINK_PORT": str(a.sink_port),
        "PB_MAX_CONCURRENCY": str(a.max_concurrency),  # the destination's (patchbay_peer.sh writes the flow)
    }
    subprocess.run([str(HERE / "patchbay_peer.sh"), "setup"], env=env, check=True, stdout=subprocess.DEVNULL)
    project = run_dir / "project"
    db = oid = None
    inspect = False
    app = f"pbbench_{uuid.uuid4().hex[:8]}"
    if v.store == "pg":
        assert pg is not None
        db, oid, inspect = pg.create()
        base = a.postgres.rsplit("/", 1)[0]
        cfg = project / "patchbay.yaml"
        cfg.write_text(
            cfg.read_text().replace(
                "store: .patchbay/patchbay.db", f"store: {base}/{db}?application_name={app}"
            )
        )
    secret = subprocess.run(
        [str(HERE / "patchbay_peer.sh"), "secret"], env=env, capture_output=True, text=True
    )
    env["PB_BENCH_WHSEC"] = secret.stdout.strip()
    procs: list[subprocess.Popen[Any]] = []
    try:
        for i, p in enumerate(v.procs):
            cmd = [str(v.patchbay), "serve", str(project), "--port", str(p.port)]
            if p.roles:
                cmd += ["--role", p.roles, "--node", f"{v.name}-{i}"]
            if p.cpus is not None:
                cmd += ["--cpus", p.cpus]
            log = open(run_dir / f"serve-{i}.log", "ab")
            procs.append(subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=log))
        for p, proc in zip(v.procs, procs, strict=True):
            wait_http(f"http://127.0.0.1:{p.port}/readyz", 60, proc)
        urls = [f"http://127.0.0.1:{p.port}/hook/lead" for p in v.procs if p.web]
        warm(a, urls)
        time.sleep(1)
        before = [metrics(p.port) for p in v.procs]
        lsn0 = pg.lsn() if pg and db else None
        size0 = pg.q("SELECT pg_database_size(current_database())", db=db)[0][0] if pg and db else 0
        spies = []
        if a.profile and shutil.which("py-spy", path=str(PATCHBAY.parent)):
            for i, proc in enumerate(procs):  # every process of the variant: -spy.txt, -spy-1.txt, ...
                suffix = "" if i == 0 else f"-{i}"
                spies.append(
                    subprocess.Popen(
                        [
                            str(PATCHBAY.parent / "py-spy"),
                            "record",
                            "--gil",
                            "-p",
                            str(proc.pid),
                            "-d",
                            str(int(a.duration)),
                            "-r",
                            "100",
                            "-f",
                            "raw",
                            "-o",
                            str(out_dir / f"{v.name}-spy{suffix}.txt"),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        hub_watch = CpuWatch(lambda: [x for proc in procs for x in (proc.pid, *children(proc.pid))])
        by_proc = [CpuWatch(lambda pid=proc.pid: [pid, *children(pid)]) for proc in procs]
        db_watch = CpuWatch(lambda: pg.backends(app)) if pg and db else None
        idle0 = cpu_times()
        res, delivered = load(a, urls, sink, v.name, out_dir)
        idle1 = cpu_times()
        res["idle_pct"] = round(100 * (idle1[0] - idle0[0]) / max(1.0, idle1[1] - idle0[1]), 1)
        hub_cpu = hub_watch.stop()
        db_cpu = db_watch.stop() if db_watch else 0.0
        res.update(delivered=delivered, hub_cpu_s=hub_cpu, db_cpu_s=db_cpu, loadavg=loadavg())
        res["cpu_s_by_process"] = [round(w.stop(), 2) for w in by_proc]  # the hub's processes, in order
        for spy in spies:
            spy.wait(30)
        if pg and db and lsn0:
            lsn1 = pg.lsn()
            after = [metrics(p.port) for p in v.procs]
            for what in ("statements", "round_trips", "transactions"):
                n = sum(x.get(what, 0) for x in after) - sum(x.get(what, 0) for x in before)
                res[what] = n / max(1, res["drained"])
            assert oid is not None
            wal, how = pg.wal(db, oid, inspect, lsn0, lsn1)
            res["wal_bytes"] = wal / max(1, res["drained"])
            size1 = pg.q("SELECT pg_database_size(current_database())", db=db)[0][0]
            res["disk_bytes"] = (size1 - size0) / max(1, res["drained"])
            res["wal_how"] = how
            if getattr(pg, "breakdown", None):
                (out_dir / f"{v.name}-wal.json").write_text(
                    json.dumps([[*r[:2], int(r[2]), int(r[3]), int(r[4] or 0)] for r in pg.breakdown])
                )
    finally:
        for proc in procs:
            stop(proc)
        if pg and db:
            pg.drop(db)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--drain-s", type=float, default=90.0, help="wait this long at most for the backlog")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--max-concurrency", type=int, default=32, help="the destination's max_concurrency")
    ap.add_argument("--variants", default="node-red,sqlite,pg,pg-web1-worker1,pg-web2-worker1")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--harness", default=os.environ.get("HARNESS_DIR", "/work/shared/bench/webhook"))
    ap.add_argument("--load-python", default="python3", help="the interpreter of load.py ('venv': this one)")
    ap.add_argument("--base-port", type=int, default=18800)
    ap.add_argument("--sink-port", type=int, default=18180)
    ap.add_argument("--node-red-port", type=int, default=18880)
    ap.add_argument("--out", default="")
    ap.add_argument("--other", default="", help="another checkout (its .venv): variants NAME@other run it")
    ap.add_argument(
        "--profile", action="store_true", help="py-spy (GIL holder) of each process of each variant"
    )
    a = ap.parse_args()
    out_dir = Path(a.out or f"/tmp/patchbay-cluster-bench/results-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    table = variants(a.base_port)
    for n in {n.removesuffix("@other") for n in names}:
        if n.endswith("-cpus") and n.removesuffix("-cpus") in table:
            # Each process on a CPU of its own: the first on CPU 0, the next on 1, ... (`serve --cpus`).
            base, ncpu = table[n.removesuffix("-cpus")], os.cpu_count() or 1
            pinned = [dataclasses.replace(p, cpus=str(i % ncpu)) for i, p in enumerate(base.procs)]
            table[n] = Variant(n, base.store, pinned, base.patchbay)
    if a.other:  # the same variants run by another checkout's patchbay, named NAME@other
        other = Path(a.other).resolve() / ".venv" / "bin" / "patchbay"
        for n in [n for n in names if n.endswith("@other")]:
            base = table[n.removesuffix("@other")]
            table[n] = Variant(n, base.store, base.procs, other)
    unknown = [n for n in names if n not in ("node-red", "node-red-cpus") and n not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: node-red, {', '.join(table)}")
    env = {
        **os.environ,
        "SINK_PORT": str(a.sink_port),
        "NR_BENCH_PORT": str(a.node_red_port),
        "RUN_DIR": str(out_dir / "peers"),
    }
    sink_url = f"http://127.0.0.1:{a.sink_port}"
    sink = subprocess.Popen(
        ["python3", str(Path(a.harness) / "sink.py"), "--port", str(a.sink_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pg = Pg(a.postgres) if any(table[n].store == "pg" for n in names if n in table) else None
    rows: dict[str, list[dict[str, Any]]] = {}
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cores, load average {loadavg()};"
        f" {a.reps} x {a.duration:.0f} s at c{a.concurrency}, max_concurrency {a.max_concurrency};"
        f" load.py engine {'wrk' if shutil.which('wrk') else 'py'}; results in {out_dir}"
    )
    try:
        wait_http(sink_url + "/stats", 10, sink)
        for rep in range(a.reps):
            for name in names:
                print(f"  rep {rep + 1} {name} ...", flush=True)
                if name.startswith("node-red"):
                    r: dict[str, Any] | None = run_node_red(
                        a, sink_url, out_dir, env, name == "node-red-cpus"
                    )
                else:
                    r = run_patchbay(a, table[name], sink_url, out_dir, pg)
                if r is not None:
                    rows.setdefault(name, []).append(r)
                    print("   ", json.dumps({k: v for k, v in r.items() if k not in ("p50", "p99")}))
    finally:
        stop(sink)
    (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    report(rows)


def med(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def report(rows: dict[str, list[dict[str, Any]]]) -> None:
    nr = med([r["delivered"] for r in rows["node-red"]]) if "node-red" in rows else None
    print()
    print(
        "| variant | ack/s | delivered/s | x Node-RED | CPU ms/event hub + db | statements | round trips"
        " | transactions | WAL/event | disk/event | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        d = med([r["delivered"] for r in rs])
        ack = med([r["rps_ok"] for r in rs])
        hub = med([r["hub_cpu_s"] * 1000 / max(1, r.get("drained", r["sink_at_end"])) for r in rs])
        db = med([r["db_cpu_s"] * 1000 / max(1, r.get("drained", r["sink_at_end"])) for r in rs])
        ratio = f"{d / nr:.2f}" if nr else "n/a"
        pgcols = "| | | | |"
        if "statements" in rs[0]:
            pgcols = (
                f"| {med([r['statements'] for r in rs]):.2f} | {med([r['round_trips'] for r in rs]):.2f}"
                f" | {med([r['transactions'] for r in rs]):.2f} | {med([r['wal_bytes'] for r in rs]) / 1024:.1f} KiB"
                f" | {med([r.get('disk_bytes', 0) for r in rs]) / 1024:.1f} KiB"
            )
        print(
            f"| {name} | {ack:.0f} | {d:.0f} | {ratio} | {hub:.2f} + {db:.2f} {pgcols} | {rs[-1]['loadavg']} |"
        )
    hows = {str(r["wal_how"]) for rs in rows.values() for r in rs if r.get("wal_how")}
    for how in sorted(hows):
        print(f"WAL per event: {how}")
    if shutil.which("wrk") is None:
        print("load.py ran its py engine (no wrk on PATH): the driver's CPU is the machine's too")


if __name__ == "__main__":
    main()
