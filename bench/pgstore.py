"""The webhook path on the PostgreSQL store, beside the same run on the embedded SQLite store.

    .venv/bin/python bench/pgstore.py [--events 3000] [--concurrency 32]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

One process: a hub (its aiohttp app on 127.0.0.1), a sink that answers 201 at once, and a driver that
posts signed webhooks with N in flight. Prints, per store: acknowledged events/s (the 202 means the
event and its delivery are committed), delivered/s (first request -> last delivery), and for
PostgreSQL the statements and round trips per event as the store counted them (pg_stat_statements is
rarely loaded) and the WAL written per event (pg_current_wal_lsn before and after; the server is
shared, so another client's writes during the run count too: run it on a quiet server). The PostgreSQL
run uses a schema of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRETS = {"PATCHBAY_SECRET_WEBSITE_WHSEC": WHSEC, "PATCHBAY_SECRET_CRM_TOKEN": "t"}


async def sink() -> tuple[web.AppRunner, str, dict[str, int]]:
    seen = {"n": 0}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen["n"] += 1
        return web.json_response({"ok": True}, status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", seen


def project(root: Path, sink_url: str, store: str) -> Path:
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "crm": {
            "kind": "http",
            "owner": "sales",
            "url": sink_url,
            "allow_private_network": True,
            "auth": {"scheme": "bearer", "token": {"secret": "crm_token"}},
        },
    }
    policy = {"max_concurrency": 16, "retry": {"schedule": ["100ms"] * 5}}
    flow = {
        "purpose": "bench",
        "owner": "bench",
        "trigger": {"webhook": {"system": "website"}},
        "steps": [{"map": {"properties.email": "email"}}],
        "destinations": [{"name": "crm", "system": "crm", "path": "/contacts", "delivery": policy}],
    }
    (root / "flows").mkdir(parents=True)
    (root / "patchbay.yaml").write_text(yaml.safe_dump({"port": 0, "store": store, "delivery": policy}))
    (root / "systems.yaml").write_text(yaml.safe_dump(systems))
    (root / "flows" / "bench.yaml").write_text(yaml.safe_dump(flow, sort_keys=False))
    return root


def wal_lsn(url: str) -> int:
    import psycopg

    from patchbay.store.postgres.store import _split_schema

    with psycopg.connect(_split_schema(url)[0], autocommit=True) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()
        return int(row[0]) if row else 0


async def run(store: str, root: Path, events: int, concurrency: int) -> dict[str, Any]:
    from patchbay.config.project import load_or_raise
    from patchbay.engine.hub import Hub
    from patchbay.security.secrets import SecretResolver
    from patchbay.security.webhook_auth import sign_standard_webhooks
    from patchbay.server.app import make_app

    runner, url, seen = await sink()
    project(root, url, store)
    hub = Hub(load_or_raise(root), resolver=SecretResolver(None, {**os.environ, **SECRETS}))
    await hub.start()
    app_runner = web.AppRunner(make_app(hub), access_log=None)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    host, port = app_runner.addresses[0][:2]
    hook = f"http://{host}:{port}/hooks/bench"
    pg = store.startswith("postgresql://")
    counter = getattr(hub.store, "counter", None)
    before = dict(counter) if counter else {}
    wal0 = wal_lsn(store) if pg else 0
    todo = iter(range(events))
    try:
        t0 = time.perf_counter()

        async def sender(session: aiohttp.ClientSession) -> None:
            for n in todo:
                body = orjson.dumps({"email": f"u{n}@example.com"})
                headers = {
                    "Content-Type": "application/json",
                    **sign_standard_webhooks(WHSEC, f"m{n}", int(time.time()), body),
                }
                async with session.post(hook, data=body, headers=headers) as r:
                    assert r.status == 202, await r.text()

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(sender(session) for _ in range(concurrency)))
        acked = time.perf_counter() - t0
        after_ingest = dict(counter) if counter else {}
        while seen["n"] < events:
            await asyncio.sleep(0.02)
        total = time.perf_counter() - t0
        await asyncio.sleep(0.3)  # the last attempts' records
        after = dict(counter) if counter else {}
        wal1 = wal_lsn(store) if pg else 0
    finally:
        await app_runner.cleanup()
        await hub.stop()
        await runner.cleanup()
    out: dict[str, Any] = {"acked_per_s": events / acked, "delivered_per_s": events / total}
    if counter:
        out["ingest_statements"] = (after_ingest["statements"] - before["statements"]) / events
        out["ingest_round_trips"] = (after_ingest["round_trips"] - before["round_trips"]) / events
        out["statements"] = (after["statements"] - before["statements"]) / events
        out["round_trips"] = (after["round_trips"] - before["round_trips"]) / events
        out["wal_bytes"] = (wal1 - wal0) / events
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    a = ap.parse_args()
    schema = f"pb_bench_{uuid.uuid4().hex[:12]}"
    pg_url = f"{a.postgres}?schema={schema}"
    results: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pb-pgstore-") as tmp:
            results["sqlite"] = await run(
                ".patchbay/patchbay.db", Path(tmp) / "sqlite", a.events, a.concurrency
            )
            results["postgres"] = await run(pg_url, Path(tmp) / "postgres", a.events, a.concurrency)
    finally:
        import psycopg

        with psycopg.connect(a.postgres, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # type: ignore[arg-type]
    print(
        f"{a.events} signed webhooks, {a.concurrency} in flight, one process (hub + sink + driver), 127.0.0.1"
    )
    for name, r in results.items():
        line = f"  {name:9} acknowledged {r['acked_per_s']:7.0f}/s   delivered {r['delivered_per_s']:7.0f}/s"
        if "statements" in r:
            line += (
                f"   per event: ingest {r['ingest_statements']:.2f} statements / {r['ingest_round_trips']:.2f} round trips,"
                f" whole path {r['statements']:.2f} / {r['round_trips']:.2f}, WAL {r['wal_bytes'] / 1024:.1f} KiB"
            )
        print(line)
    s, p = results["sqlite"], results["postgres"]
    print(
        f"  postgres / sqlite: acknowledged x{p['acked_per_s'] / s['acked_per_s']:.2f},"
        f" delivered x{p['delivered_per_s'] / s['delivered_per_s']:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
