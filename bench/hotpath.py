#!/usr/bin/env python3
"""One webhook event's CPU cost on the hub, split into its parts, without the network or fsync batching.

The bench project's `lead` flow (bench/patchbay_peer.sh: map, validate, one HTTP destination) in
process: the webhook body parsed as the endpoint does, the hub's `_event` (payload sealing, steps,
routing, the NewEvent), `_after_commit` (metrics, notify), and the store's accept transaction (64
events per commit, as a group commit under load), then the delivery's attempt rows (`tx_record`,
64 per commit). Best of `--reps` rounds, CPU microseconds of this process per event (process
time, so other work on a shared machine moves it less than wall time; a commit's fsync wait is not in it). Runs against whichever checkout's
interpreter runs it, so two versions compare on the same machine in the same minute:

    /work/wt/hp-old/.venv/bin/python bench/hotpath.py --repo /work/wt/hp-old
    .venv/bin/python bench/hotpath.py

`--repo` is only checked against the imported package (the script runs from any checkout's bench/).
Not a timed test: it only prints (and `--json` writes) figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


def bench_project(root: Path, repo: Path, sink_port: int | None = None) -> Path:
    """bench/patchbay_peer.sh's project (checked by `repo`'s patchbay) under `root`; its destination
    posts to 127.0.0.1:`sink_port` (the harness's default when None)."""
    env = dict(os.environ, PB_RUN_DIR=str(root), PB_REPO=str(repo), PB_PYTHON=sys.executable)
    if sink_port is not None:
        env["SINK_PORT"] = str(sink_port)
    subprocess.run([str(HERE / "patchbay_peer.sh"), "setup"], env=env, check=True, capture_output=True)
    return root / "project"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000, help="events per round")
    ap.add_argument("--reps", type=int, default=5, help="rounds (the best one counts)")
    ap.add_argument("--repo", help="expect patchbay to be imported from this checkout")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import orjson

    import patchbay
    from patchbay.config.project import load_or_raise
    from patchbay.engine.hub import Hub, build_sinks
    from patchbay.engine.pipeline import Pipeline
    from patchbay.metrics import Metrics
    from patchbay.security.secrets import SecretResolver
    from patchbay.store.base import Accepted, AttemptResult
    from patchbay.store.sqlite import open_store, tx_accept, tx_record

    src = Path(patchbay.__file__).resolve().parent.parent
    if args.repo and src != Path(args.repo).resolve():
        sys.exit(f"patchbay is imported from {src}, not {args.repo}: run this checkout's .venv/bin/python")
    commit = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = bench_project(Path(tmp), src)
        os.environ.setdefault("PB_BENCH_WHSEC", (Path(tmp) / "whsec").read_text().strip())
        proj = load_or_raise(root)
        flow = proj.flows["lead"]
        pipe = Pipeline(flow, build_sinks(flow, proj, SecretResolver(None, {}), None))

        class _Worker:
            def notify(self) -> None:
                pass

        fr = SimpleNamespace(spec=flow, pipeline=pipe, workers={"crm": _Worker()})
        hub = Hub.__new__(Hub)
        hub.metrics = Metrics()
        hub.alert_manager = None
        hub.store = None  # one process: no other to tell (Hub._tell_others)
        bodies = [
            orjson.dumps(
                {
                    "email": f"Lead{i}@Example.com",
                    "first_name": "Ada",
                    "last_name": f"Lovelace{i}",
                    "company": "Analytical Engines Ltd",
                    "utm_source": "newsletter",
                }
            )
            for i in range(args.n)
        ]
        result_fields = {f.name for f in dataclasses.fields(AttemptResult)}
        for rep in range(args.reps):
            t0 = time.process_time()
            records = [orjson.loads(b) for b in bodies]
            t1 = time.process_time()
            events = [
                hub._event(fr, b, r, None, {"remote": "127.0.0.1"})
                for b, r in zip(bodies, records, strict=True)
            ]  # type: ignore[arg-type]
            t2 = time.process_time()
            for e in events:
                hub._after_commit(fr, e, Accepted(e.id))  # type: ignore[arg-type]
            t3 = time.process_time()
            conn = open_store(Path(tmp) / f"store{rep}.db")
            for j in range(0, len(events), 64):
                conn.execute("BEGIN IMMEDIATE")
                for e in events[j : j + 64]:
                    tx_accept(conn, e)
                conn.execute("COMMIT")
            t4 = time.process_time()
            ids = [r[0] for r in conn.execute("SELECT id, event_id FROM deliveries ORDER BY id")]
            eids = [r[0] for r in conn.execute("SELECT event_id FROM deliveries ORDER BY id")]
            now = time.time()
            results = []
            for did, eid in zip(ids, eids, strict=True):
                kw = dict(
                    delivery_id=did,
                    event_id=eid,
                    started_at=now,
                    latency_ms=1.0,
                    status_code=200,
                    outcome="success",
                    excerpt="",
                    error="",
                    new_status="delivered",
                    next_at=None,
                    consumed_retry=False,
                    response=None,
                )
                results.append(AttemptResult(**{k: v for k, v in kw.items() if k in result_fields}))
            t5 = time.process_time()
            for j in range(0, len(results), 64):
                conn.execute("BEGIN IMMEDIATE")
                tx_record(conn, results[j : j + 64])
                conn.execute("COMMIT")
            t6 = time.process_time()
            conn.close()
            n = len(events)
            for name, s in (
                ("parse", t1 - t0),
                ("hub _event (steps, routing)", t2 - t1),
                ("after commit (metrics)", t3 - t2),
                ("store accept transaction", t4 - t3),
                ("store attempt rows (tx_record)", t6 - t5),
            ):
                best[name] = min(best.get(name, float("inf")), s / n * 1e6)
    best["total"] = sum(best.values())
    print(f"patchbay at {commit} ({src}), {args.n} events, best of {args.reps}, us/event:")
    for name, us in best.items():
        print(f"  {name:<32} {us:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "us_per_event": best}, indent=1))


if __name__ == "__main__":
    main()
