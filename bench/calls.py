"""Calls inside flows, timed: the same events through a hub with no call, with a call per event (the
run continues in the store write that records the answer), with a cached call, and split into
elements each with its own call; against a local HTTP fake on 127.0.0.1 that answers at once.

    .venv/bin/python bench/calls.py [--events 2000] [--elements 3] [--latency-ms 50]

Prints, per variant, the events (and requests) per second from the first ingest to the last delivery
and the ratio to the flow without a call. One process, the embedded SQLite store (group commit,
synchronous=FULL) in a temporary folder; the figures depend on the disk's fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

SECRETS = {
    "PATCHBAY_SECRET_WEBSITE_WHSEC": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "PATCHBAY_SECRET_CRM_TOKEN": "t",
}
CALL = """
- name: find_contact
  call: {system: crm, method: GET, path: "/search?email={{ email }}", as: contact, on_404: continue%s}
"""
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "no call": ("", {"path": "/contacts"}),
    "one call": (CALL % "", {"path": "/contacts/{{ contact.body.id }}"}),
    "one call, cached": (
        CALL % ", cache: {key: email, ttl: 10m}",
        {"path": "/contacts/{{ contact.body.id }}"},
    ),
    "split + call each": (
        "- split: {path: items, with: {email: email}}\n" + CALL.replace("{{ email }}", "{{ sku }}") % "",
        {"path": "/contacts/{{ contact.body.id }}"},
    ),
}


async def fake(latency_s: float) -> tuple[web.AppRunner, str, dict[str, int]]:
    counts = {"requests": 0}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if latency_s:
            await asyncio.sleep(latency_s)  # a remote API's answer time
        counts["requests"] += 1
        if request.method == "GET":
            return web.json_response({"id": "c-1"})
        return web.json_response({"ok": True}, status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", counts


def project(root: Path, url: str, steps: str, dest: dict[str, Any]) -> Path:
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "crm": {
            "kind": "http",
            "owner": "sales",
            "url": url,
            "allow_private_network": True,
            "auth": {"scheme": "bearer", "token": {"secret": "crm_token"}},
        },
    }
    policy = {"max_concurrency": 16, "retry": {"schedule": ["100ms"] * 5}}
    flow = {
        "purpose": "bench",
        "owner": "bench",
        "trigger": {"webhook": {"system": "website"}},
        "steps": yaml.safe_load(textwrap.dedent(steps)) or [],
        "destinations": [{"name": "crm", "system": "crm", "method": "POST", **dest, "delivery": policy}],
    }
    (root / "flows").mkdir(parents=True)
    (root / "patchbay.yaml").write_text(yaml.safe_dump({"port": 0, "delivery": policy}))
    (root / "systems.yaml").write_text(yaml.safe_dump(systems))
    (root / "flows" / "bench.yaml").write_text(yaml.safe_dump(flow, sort_keys=False))
    return root


async def run(name: str, events: int, elements: int, tmp: Path, latency_s: float) -> tuple[float, int]:
    from patchbay.config.project import load_or_raise
    from patchbay.engine.hub import Hub
    from patchbay.security.secrets import SecretResolver

    steps, dest = VARIANTS[name]
    runner, url, counts = await fake(latency_s)
    root = project(tmp / name.replace(" ", "_").replace(",", "").replace("+", "and"), url, steps, dest)
    hub = Hub(load_or_raise(root), resolver=SecretResolver(None, {**os.environ, **SECRETS}))
    await hub.start()
    assert hub.store is not None
    try:
        t0 = time.perf_counter()
        for n in range(events):
            rec = {"email": f"u{n % 50}@example.com", "items": [{"sku": f"s{i}"} for i in range(elements)]}
            await hub.ingest("bench", orjson.dumps(rec), rec)
        want = events * (elements if name.startswith("split") else 1)
        while True:
            done = await hub.store.read(
                lambda c: c.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE destination='crm' AND status='delivered'"
                ).fetchone()[0]
            )
            if done >= want:
                break
            await asyncio.sleep(0.05)
        return time.perf_counter() - t0, counts["requests"]
    finally:
        await hub.stop()
        await runner.cleanup()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--elements", type=int, default=3, help="Elements per event in the split variant.")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="The fake's answer time (a remote API's)."
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pb-calls-") as tmp:
        for name in VARIANTS:
            seconds, requests = await run(name, args.events, args.elements, Path(tmp), args.latency_ms / 1000)
            rows.append((name, seconds, requests))
    base = args.events / rows[0][1]
    print(
        f"{args.events} events (ingest one at a time, in process) -> delivered; fake on 127.0.0.1 answering "
        f"in {args.latency_ms:g} ms; 16 senders per destination and per call"
    )
    print(f"{'VARIANT':<20} {'SECONDS':>8} {'EVENTS/S':>9} {'REQUESTS':>9} {'REQ/S':>7} {'VS NO CALL':>10}")
    for name, seconds, requests in rows:
        eps = args.events / seconds
        print(
            f"{name:<20} {seconds:>8.2f} {eps:>9.0f} {requests:>9} {requests / seconds:>7.0f} {eps / base:>9.2f}x"
        )


if __name__ == "__main__":
    asyncio.run(main())
