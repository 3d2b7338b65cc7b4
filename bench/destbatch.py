#!/usr/bin/env python3
"""Batches at a destination: N contacts to a HubSpot-shaped batch upsert endpoint, one per request vs batched.

    .venv/bin/python bench/destbatch.py [--contacts 2000] [--latency-ms 40] [--max-records 100] [--sql]

For each mode a fresh temporary project and an in-process hub (the same engine `patchbay serve` runs):
a website webhook (batch trigger) takes the contacts in posts of 100 while the destination is paused,
then the destination is resumed and the clock runs until every delivery is delivered. The fake API on
127.0.0.1 answers in HubSpot's batch shape after --latency-ms (a SaaS round trip) and counts requests.
The preset holds HubSpot to 10 requests/s; here that limit is lifted (rate_limit_per_s: 1000) so the
engine's own cost shows, and the time the preset's limit would impose (requests / 10 s) is printed
beside it. Concurrency is the default 8 in both modes.

--sql adds the same for a SQLite destination (an upsert per contact into a table in the temporary folder):
one transaction per record vs the records of a batch in one transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import ClientSession, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.security.secrets import SecretResolver
from patchbay.security.webhook_auth import sign_standard_webhooks
from patchbay.server.app import make_app

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TOKEN = "pat-na1-bench-0000"


class Fake:
    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.requests = 0
        self.contacts = 0

    async def upsert(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        await asyncio.sleep(self.latency_s)
        results = [
            {"id": str(i), "properties": x["properties"], "objectWriteTraceId": x.get("objectWriteTraceId")}
            for i, x in enumerate(body["inputs"])
        ]
        self.contacts += len(results)
        return web.json_response({"status": "COMPLETE", "results": results, "errors": []})


async def run(mode: str, n: int, latency_s: float, max_records: int, sql: bool = False) -> dict[str, Any]:
    fake = Fake(latency_s)
    app = web.Application(client_max_size=32 * 2**20)
    app.router.add_post("/crm/v3/objects/contacts/batch/upsert", fake.upsert)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    root = Path(tempfile.mkdtemp(prefix="pb-destbatch-"))
    dest: dict[str, Any] = {
        "name": "crm",
        "system": "crm",
        "operation": "upsert_contact",
        "delivery": {"rate_limit_per_s": 1000},
    }
    db = root / "w.db"
    if sql:
        import sqlite3

        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE contacts (email TEXT PRIMARY KEY, firstname TEXT)")
        dest = {
            "name": "crm",
            "system": "db",
            "table": "contacts",
            "write_mode": "upsert",
            "key": ["email"],
            "columns": {"email": "properties.email", "firstname": "properties.firstname"},
        }
    if mode == "batch":
        dest["batch"] = {"max_records": max_records, "max_wait": "1s"}
    (root / "flows").mkdir()
    (root / "patchbay.yaml").write_text("port: 0\n")
    (root / "systems.yaml").write_text(
        yaml.safe_dump(
            {
                "website": {
                    "owner": "web",
                    "webhook": {"scheme": "standard_webhooks", "secrets": [{"env": "W"}]},
                },
                "crm": {
                    "preset": "hubspot",
                    "owner": "sales",
                    "url": url,
                    "allow_private_network": True,
                    "auth": {"scheme": "bearer", "token": {"env": "T"}},
                },
                "db": {"kind": "sqlite", "owner": "data", "path": str(db)},
            }
        )
    )
    (root / "flows" / "f.yaml").write_text(
        yaml.safe_dump(
            {
                "purpose": "contacts into the CRM",
                "owner": "sales",
                "trigger": {"webhook": {"system": "website", "batch": True}},
                "steps": [{"map": {"properties.email": "lower(email)", "properties.firstname": "name"}}],
                "destinations": [dest],
            }
        )
    )
    hub = Hub(load_or_raise(root), resolver=SecretResolver(None, {"W": WHSEC, "T": TOKEN}))
    await hub.start()
    hub_runner = web.AppRunner(make_app(hub), access_log=None)
    await hub_runner.setup()
    hub_site = web.TCPSite(hub_runner, "127.0.0.1", 0)
    await hub_site.start()
    hook = f"http://127.0.0.1:{hub_runner.addresses[0][1]}/hooks/f"
    store = hub.store
    assert store is not None
    try:
        await hub.set_state("f", "crm", "paused")
        async with ClientSession() as s:
            for i in range(0, n, 100):
                body = orjson.dumps(
                    [{"email": f"p{j}@example.com", "name": f"P{j}"} for j in range(i, min(n, i + 100))]
                )
                headers = {
                    "Content-Type": "application/json",
                    **sign_standard_webhooks(WHSEC, f"msg_{i}", int(time.time()), body),
                }
                async with s.post(hook, data=body, headers=headers) as r:
                    assert r.status == 202, await r.text()
        t0 = time.perf_counter()
        await hub.set_state("f", "crm", "active")
        while True:
            done = await store.read(
                lambda c: c.execute("SELECT COUNT(*) FROM deliveries WHERE status='delivered'").fetchone()[0]
            )
            if done >= n:
                break
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - t0
    finally:
        await hub_runner.cleanup()
        await hub.stop()
        await runner.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "mode": ("sqlite, " if sql else "") + mode,
        "contacts": n,
        "requests": fake.requests,
        "seconds": seconds,
        "per_s": n / seconds,
        "at_10_rps_s": fake.requests / 10,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contacts", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=40.0)
    ap.add_argument("--max-records", type=int, default=100)
    ap.add_argument("--sql", action="store_true", help="also a SQLite destination")
    a = ap.parse_args()
    rows = [await run(m, a.contacts, a.latency_ms / 1000, a.max_records) for m in ("single", "batch")]
    sql_rows = (
        [await run(m, a.contacts, 0, a.max_records, sql=True) for m in ("single", "batch")] if a.sql else []
    )
    print(f"{a.contacts} contacts, fake API latency {a.latency_ms:g} ms, max_concurrency 8\n")
    print("| mode | requests | seconds | contacts/s | time at HubSpot's 10 requests/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['requests']} | {r['seconds']:.2f} | {r['per_s']:.0f} | {r['at_10_rps_s']:.0f} s |"
        )
    for r in sql_rows:
        print(f"| {r['mode']} | - | {r['seconds']:.2f} | {r['per_s']:.0f} | - |")
    single, batch = rows
    print(
        f"\nbatched/single: {single['requests'] / batch['requests']:.0f}x fewer requests, "
        f"{batch['per_s'] / single['per_s']:.1f}x the contacts/s"
    )
    if sql_rows:
        print(f"sqlite batched/single: {sql_rows[1]['per_s'] / sql_rows[0]['per_s']:.1f}x the rows/s")


if __name__ == "__main__":
    asyncio.run(main())
