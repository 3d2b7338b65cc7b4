#!/usr/bin/env python3
"""What an idle cluster costs its PostgreSQL: statements, transactions and CPU per second when no event comes.

Most destinations of a real hub are idle most of the time, and every worker process looks after every
destination, so what one idle destination costs per process is multiplied by destinations x processes.
This starts PROCS `patchbay serve` processes (every role) on a fresh database of the local PostgreSQL with
a project of FLOWS webhook flows, each with one HTTP destination (a loopback URL nothing is sent to), lets
them settle, and counts over SECONDS: the store's statements and round trips (each process's /metrics),
the database's transactions (pg_stat_database), and the CPU of the hub processes and of their backends.

    .venv/bin/python bench/idle.py [--flows 50] [--procs 3] [--seconds 20] [--patchbay PATH]

`--patchbay` runs another checkout's `patchbay` (before/after). Loopback only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cluster import CpuWatch, Pg, children, metrics, stop, wait_http  # noqa: E402

PG = os.environ.get("PATCHBAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def project(root: Path, store: str, flows: int) -> None:
    (root / "flows").mkdir(parents=True)
    (root / "patchbay.yaml").write_text(
        f"host: 127.0.0.1\nport: 18900\nstore: {store}\nlog_format: text\nshutdown_grace_s: 2\n"
    )
    (root / "systems.yaml").write_text(
        "website:\n  owner: bench\n  purpose: Nobody; the flows stay idle.\n"
        "  webhook:\n    scheme: none\n    public: true\n\n"
        "crm:\n  kind: http\n  owner: bench\n  purpose: Never called.\n"
        "  url: http://127.0.0.1:9\n  allow_private_network: true\n"
    )
    for i in range(flows):
        (root / "flows" / f"f{i:03d}.yaml").write_text(
            f"purpose: Idle flow {i}.\nowner: bench\n"
            f"trigger:\n  webhook:\n    system: website\n    path: /hook/f{i}\n\n"
            "destinations:\n  - name: crm\n    system: crm\n    method: POST\n    path: /contacts\n"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=50)
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--patchbay", default=str(HERE.parent / ".venv" / "bin" / "patchbay"))
    ap.add_argument("--postgres", default=PG)
    a = ap.parse_args()
    pg = Pg(a.postgres)
    db, _, _ = pg.create()
    app = f"pbidle_{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[Any]] = []
    with tempfile.TemporaryDirectory(prefix="pb-idle-") as tmp:
        root = Path(tmp) / "project"
        project(root, f"{a.postgres.rsplit('/', 1)[0]}/{db}?application_name={app}", a.flows)
        ports = [18900 + i for i in range(a.procs)]
        try:
            for i, port in enumerate(ports):
                log = open(Path(tmp) / f"serve-{i}.log", "ab")
                cmd = [a.patchbay, "serve", str(root), "--port", str(port), "--node", f"idle-{i}"]
                procs.append(subprocess.Popen(cmd, cwd=root, stdout=log, stderr=log))
            for port, proc in zip(ports, procs, strict=True):
                wait_http(f"http://127.0.0.1:{port}/readyz", 60, proc)
            time.sleep(a.settle)
            xacts = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname=%s"
            before = [metrics(p) for p in ports]
            x0 = pg.q(xacts, (db,))[0][0]
            hub = CpuWatch(lambda: [x for p in procs for x in (p.pid, *children(p.pid))])
            server = CpuWatch(lambda: pg.backends(app))
            t0 = time.time()
            time.sleep(a.seconds)
            hub_s, server_s = hub.stop(), server.stop()
            span = time.time() - t0
            x1 = pg.q(xacts, (db,))[0][0]
            after = [metrics(p) for p in ports]
        finally:
            for proc in procs:
                stop(proc)
            pg.drop(db)
    per = a.flows * a.procs
    stmts = sum(b.get("statements", 0) - x.get("statements", 0) for x, b in zip(before, after, strict=True))
    trips = sum(b.get("round_trips", 0) - x.get("round_trips", 0) for x, b in zip(before, after, strict=True))
    print(f"{a.procs} processes x {a.flows} idle destinations, {span:.1f} s ({a.patchbay})")
    print(f"  statements/s   {stmts / span:8.1f}   per destination and process {stmts / span / per:.3f}")
    print(f"  round trips/s  {trips / span:8.1f}   per destination and process {trips / span / per:.3f}")
    print(f"  transactions/s {(x1 - x0) / span:8.1f}   (pg_stat_database, includes this script's two reads)")
    print(f"  hub CPU        {100 * hub_s / span:7.1f} % of a core, server CPU {100 * server_s / span:.1f} %")


if __name__ == "__main__":
    main()
