"""Three hub processes on one PostgreSQL store (issue 13): a destination's max_concurrency, rate limit and
per-key order hold across all of them, and a worker killed with SIGKILL has its claims taken over within
the lease. The sink is a real aiohttp server on 127.0.0.1 that records concurrency, times and order."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
import yaml
from aiohttp import web

from patchbay.engine.delivery import SharedBucket
from patchbay.security.webhook_auth import sign_standard_webhooks
from tests.cluster.harness import EVERY_ROLE, LEAD_SECRETS, Cluster, NodeProcess, until
from tests.conftest import PG_URL, SECRET_WHSEC, postgres_url, write_project

pytestmark = pytest.mark.slow


@dataclass
class Path_:
    """What one path of the sink saw."""

    current: int = 0
    most: int = 0
    ok: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)  # (at, key, body) of successes
    attempts: list[dict[str, Any]] = field(default_factory=list)  # every body, in the order they came
    by_key: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # in flight per order key
    most_by_key: int = 0


class RecordingSink:
    def __init__(self) -> None:
        self.paths: dict[str, Path_] = defaultdict(Path_)
        self.failed_once: set[int] = set()
        self.delay = {"/conc": 0.05, "/ordered": 0.01, "/slow": 0.2}
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        p = self.paths[request.path]
        p.current += 1
        p.most = max(p.most, p.current)
        k = str(body.get("key"))
        p.by_key[k] += 1
        p.most_by_key = max(p.most_by_key, p.by_key[k])
        p.attempts.append(body)
        try:
            await asyncio.sleep(self.delay.get(request.path, 0.0))
            n = body["n"]
            if request.path == "/ordered" and n % 3 == 0 and n not in self.failed_once:
                self.failed_once.add(n)  # the first attempt of every third record fails: retried in order
                return web.Response(status=503)
            p.ok.append((time.time(), request.headers["Idempotency-Key"], body))
            return web.Response(status=201, text="{}")
        finally:
            p.current -= 1
            p.by_key[k] -= 1

    def keys(self, path: str) -> list[str]:
        return [k for _, k, _ in self.paths[path].ok]


@pytest.fixture
async def rec_sink() -> Any:
    s = RecordingSink()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", s.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    s.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield s
    await runner.cleanup()


def cluster_project(
    root: Path, sink_url: str, store: str, lease: str, flows: dict[str, dict[str, Any]]
) -> Path:
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "crm": {"kind": "http", "owner": "sales", "url": sink_url, "allow_private_network": True},
    }
    files = {
        "patchbay.yaml": yaml.safe_dump({"port": 0, "store": store, "claim_lease": lease}),
        "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
    }
    for name, dest in flows.items():
        flow = {
            "purpose": "claims across workers",
            "owner": "ops",
            "trigger": {"webhook": {"system": "website"}},
            "destinations": [{"name": "crm", "system": "crm", **dest}],
        }
        files[f"flows/{name}.yaml"] = yaml.safe_dump(flow, sort_keys=False)
    return write_project(root, files)


async def start_nodes(cluster: Cluster, n: int) -> list[NodeProcess]:
    """n hub processes of every role, node-0 ... node-{n-1}, at once; each ready at /readyz."""
    return list(await asyncio.gather(*(cluster.start(f"node-{i}", roles=EVERY_ROLE) for i in range(n))))


async def post(
    session: aiohttp.ClientSession, port: int, flow: str, body: dict[str, Any], msg_id: str
) -> None:
    raw = orjson.dumps(body)
    headers = {
        "Content-Type": "application/json",
        **sign_standard_webhooks(SECRET_WHSEC, msg_id, int(time.time()), raw),
    }
    async with session.post(f"http://127.0.0.1:{port}/hooks/{flow}", data=raw, headers=headers) as r:
        assert r.status == 202, await r.text()


async def test_three_workers_keep_concurrency_rate_and_per_key_order(tmp_path: Path, rec_sink: Any) -> None:
    retry = {"schedule": ["200ms"] * 10, "jitter": 0}
    root = cluster_project(
        tmp_path,
        rec_sink.url,
        postgres_url(),
        "6s",
        {
            "conc": {"path": "/conc", "delivery": {"max_concurrency": 2}},
            "rate": {"path": "/rate", "delivery": {"max_concurrency": 4, "rate_limit_per_s": 20}},
            "ordered": {
                "path": "/ordered",
                "order_by": "key",
                "delivery": {"max_concurrency": 4, "retry": retry},
            },
        },
    )
    async with Cluster(root, LEAD_SECRETS) as cluster:
        ports = [node.port for node in await start_nodes(cluster, 3)]
        async with aiohttp.ClientSession() as s:
            for n in range(60):  # one after another: arrival order is n's order; spread over the nodes
                port = ports[n % 3]
                await post(s, port, "conc", {"n": n}, f"c{n}")
                await post(s, port, "rate", {"n": n}, f"r{n}")
                await post(s, port, "ordered", {"n": n, "key": f"k{n % 4}"}, f"o{n}")
        await until(lambda: len(set(rec_sink.keys("/conc"))) >= 60, 90, "60 deliveries to /conc")
        await until(lambda: len(set(rec_sink.keys("/rate"))) >= 60, 90, "60 deliveries to /rate")
        await until(lambda: len(set(rec_sink.keys("/ordered"))) >= 60, 90, "60 deliveries to /ordered")
    conc, rate, ordered = (rec_sink.paths[p] for p in ("/conc", "/rate", "/ordered"))
    # max_concurrency 2 over three workers: never more than 2 requests at once
    assert conc.most <= 2, conc.most
    assert len(rec_sink.keys("/conc")) == 60  # each once
    # 20/s over three workers: any run of sends fits the one bucket (burst 20, grants held up to GRANT_S)
    times = sorted(at for at, _, _ in rate.ok)
    for i in range(len(times)):
        for j in range(i, len(times)):
            allowed = 20 + 20 * (times[j] - times[i] + SharedBucket.GRANT_S) + 1
            assert j - i + 1 <= allowed, (j - i + 1, times[j] - times[i])
    assert times[-1] - times[0] >= (60 - 20) / 20 - SharedBucket.GRANT_S
    # per key: one at a time, every attempt (failed first tries and their retries too) in arrival order
    assert ordered.most_by_key == 1
    for k in range(4):
        seen = [b["n"] for b in ordered.attempts if b["key"] == f"k{k}"]
        assert seen == sorted(seen), (k, seen)
        assert [b["n"] for _, _, b in ordered.ok if b["key"] == f"k{k}"] == list(range(k, 60, 4))
    assert len(rec_sink.failed_once) == 20  # the failures happened, and were retried


async def test_a_killed_workers_claims_are_taken_over_within_the_lease(tmp_path: Path, rec_sink: Any) -> None:
    url = postgres_url()
    lease = 6.0
    root = cluster_project(
        tmp_path,
        rec_sink.url,
        url,
        f"{lease:g}s",
        {"slow": {"path": "/slow", "delivery": {"max_concurrency": 4}}},
    )
    schema = url.split("schema=")[1]
    total = 80
    async with Cluster(root, LEAD_SECRETS) as cluster:
        nodes = await start_nodes(cluster, 3)
        async with aiohttp.ClientSession() as s:
            for n in range(total):
                await post(s, nodes[n % 3].port, "slow", {"n": n}, f"s{n}")
        await until(lambda: len(rec_sink.paths["/slow"].ok) >= 5, 30, "the first deliveries")
        with psycopg.connect(PG_URL, autocommit=True, options=f"-c search_path={schema}") as conn:
            held = conn.execute(
                "SELECT leased_by, COUNT(*) FROM deliveries WHERE status='pending' AND leased_by IS NOT NULL"
                " GROUP BY leased_by ORDER BY 2 DESC"
            ).fetchall()
            assert held, "no worker holds claims"
            victim = held[0][0]
            await cluster.kill(
                next(n for n in nodes if n.name == victim)
            )  # no shutdown code runs, nothing is let go
            killed_at = time.time()
            claimed = conn.execute(
                "SELECT idempotency_key FROM deliveries WHERE status='pending' AND leased_by=%s", (victim,)
            ).fetchall()
            assert claimed, "the killed worker held no claims"
            while conn.execute(
                "SELECT COUNT(*) FROM deliveries WHERE status='pending' AND leased_by=%s", (victim,)
            ).fetchone()[0]:  # type: ignore[index]
                assert time.time() - killed_at < lease + 30, "claims not taken over within lease + 30 s"
                await asyncio.sleep(0.1)
            taken_over_s = time.time() - killed_at
        await until(lambda: len(set(rec_sink.keys("/slow"))) >= total, 120, "every event delivered")
    print(
        f"claims of {len(claimed)} deliveries taken over {taken_over_s:.1f}s after SIGKILL (lease {lease:g}s)"
    )
    assert taken_over_s <= lease + 30
    keys = rec_sink.keys("/slow")
    assert len(set(keys)) == total  # every event, under its one idempotency key
    # a key twice only if the killed worker was sending it when it died (then taken over, same key)
    assert len(keys) - total <= 4
    assert {k for (k,) in claimed} <= set(keys)
