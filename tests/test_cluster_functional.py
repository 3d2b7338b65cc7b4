"""Several `patchbay serve --role …` processes on one PostgreSQL schema (issue 13): webhooks taken by two web
processes, delivered by two worker processes exactly once; the cluster view; a killed node is lost."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.engine.roles import LOST_AFTER_S
from patchbay.store.postgres import PostgresStore
from tests.cluster.harness import LEAD_SECRETS, Cluster, Sender, lead, until
from tests.conftest import Sink, lead_project, postgres_url

pytestmark = pytest.mark.slow
N = 200
ENV = {**os.environ, **LEAD_SECRETS}


async def post(session: aiohttp.ClientSession, base: str, n: int) -> str:
    body = lead(n)
    async with session.post(
        f"{base}/hooks/lead-capture", data=body, headers=Sender.headers(body, f"msg_{n}")
    ) as r:
        assert r.status == 202, await r.text()
        return str((await r.json())["event_id"])


def cluster_json(root: Path) -> tuple[int, dict[str, Any]]:
    r = CliRunner().invoke(main, ["cluster", "-p", str(root), "--json"])
    return r.exit_code, json.loads(r.output)


async def test_two_web_and_two_worker_processes_deliver_every_event_once(tmp_path: Path, sink: Sink) -> None:
    release = asyncio.Event()

    async def held(request: Any, rec: Any) -> int:
        await release.wait()  # the first deliveries wait, so the workers hold claims the view can show
        return 201

    sink.default = held
    url = postgres_url()
    root = lead_project(tmp_path, sink.url, hub={"store": url}, delivery={"max_concurrency": 4})
    PostgresStore.migrate_only(url)  # the schema once, before four processes open it at the same time
    names = {"web-1": "web", "web-2": "web", "worker-1": "worker", "worker-2": "worker"}
    async with Cluster(root, LEAD_SECRETS) as cluster:
        try:
            nodes = dict(
                zip(
                    names,
                    await asyncio.gather(*(cluster.start(n, roles=r) for n, r in names.items())),
                    strict=True,
                )
            )
            ports = {name: node.port for name, node in nodes.items()}
            readyz = {name: node.readyz for name, node in nodes.items()}
            assert readyz["web-1"]["node"] == "web-1" and readyz["web-1"]["roles"] == ["web"]
            assert readyz["web-1"]["parts"] == {"store": "ok", "web": "ok"}
            assert readyz["worker-2"]["parts"] == {"store": "ok", "worker": "ok"}

            # The same node id twice: the second process is refused while the first is alive.
            twin = await cluster.start("web-1", roles="web", wait=False)
            assert await cluster.exited(twin) == 3
            assert "node web-1 is already running" in twin.log_tail()

            webs = [nodes[n].url for n in ("web-1", "web-2")]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                # A process without the web role answers health, readiness and metrics only.
                async with session.post(f"{nodes['worker-1'].url}/hooks/lead-capture", data=b"{}") as r:
                    assert r.status == 404
                sem = asyncio.Semaphore(16)

                async def one(n: int) -> str:
                    async with sem:
                        return await post(session, webs[n % 2], n)

                event_ids = await asyncio.gather(*(one(n) for n in range(N)))

                # Deliveries are in flight (the sink holds them): the workers hold the claims, the web nodes none.
                await until(
                    lambda: len(sink.received) >= 4, 20, "four deliveries held at the sink", every=0.05
                )
                code, view = cluster_json(root)
                assert code == 0, view
                by_id = {n["id"]: n for n in view["nodes"]}
                assert set(by_id) == set(names)
                assert {i: (n["roles"], n["status"]) for i, n in by_id.items()} == {
                    i: ([role], "up") for i, role in names.items()
                }
                assert by_id["web-1"]["claims"] == by_id["web-2"]["claims"] == 0
                assert by_id["worker-1"]["claims"] + by_id["worker-2"]["claims"] >= 4
                assert all(n["port"] == ports[i] for i, n in by_id.items())
                release.set()

                await sink.wait_for(N, timeout=45)
                # Every event reached the sink once: its idempotency key, once, and nothing else.
                assert sink.keys == {f"{eid}.crm": 1 for eid in event_ids}

                # No delivery worker ran in a web process; the workers made every attempt between them.
                attempts = {}
                for name in names:
                    async with session.get(f"{nodes[name].url}/metrics") as r:
                        text = await r.text()
                    found = re.findall(
                        r'^patchbay_delivery_attempts_total\{[^}]*outcome="success"[^}]*\} (\S+)', text, re.M
                    )
                    attempts[name] = sum(float(v) for v in found)
                assert attempts["web-1"] == attempts["web-2"] == 0
                assert attempts["worker-1"] + attempts["worker-2"] == N

            # A node killed for real (no shutdown code runs) is shown as lost once its heartbeat is old.
            killed_at = await cluster.kill(nodes["worker-2"])
            store = PostgresStore(url)
            try:
                while True:
                    now = time.time()
                    status = {n.id: n.status(now, LOST_AFTER_S) for n in await store.nodes(now)}
                    if status["worker-2"] == "lost":
                        break
                    assert time.monotonic() - killed_at < LOST_AFTER_S + 10, status
                    await asyncio.sleep(0.5)
            finally:
                await store.close()
            code, view = cluster_json(root)
            assert code == 1  # a lost node is a problem the command reports
            assert {n["id"]: n["status"] for n in view["nodes"]} == {
                "web-1": "up",
                "web-2": "up",
                "worker-1": "up",
                "worker-2": "lost",
            }
            # A clean stop marks the node stopped, not lost.
            await cluster.stop(nodes["web-2"])
            assert nodes["web-2"].proc.returncode == 0
            _, view = cluster_json(root)
            assert {n["id"]: n["status"] for n in view["nodes"]}["web-2"] == "stopped"
        finally:
            release.set()  # the held deliveries end before the processes are stopped


def test_a_second_worker_on_a_sqlite_store_is_refused_with_how_to_go_on(tmp_path: Path) -> None:
    """On SQLite one process runs the worker role (its flock): another is refused, exit 3, before it serves."""
    import fcntl

    root = lead_project(tmp_path, "http://127.0.0.1:9/")
    db = root / ".patchbay" / "patchbay.db"
    db.parent.mkdir(parents=True)
    fd = os.open(f"{db}.worker.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's worker
        os.pwrite(fd, b"4242 worker-1\n", 0)
        r = CliRunner().invoke(main, ["serve", str(root), "--port", "0", "--role", "worker"], env=ENV)
    finally:
        os.close(fd)
    assert r.exit_code == 3, r.output
    assert (
        "`serve --role worker` needs the worker role of this SQLite file, and another process runs it"
        in r.output
    )
    assert "(pid 4242, node worker-1)" in r.output
    assert "run this one with `--role web`" in r.output
    assert "patchbay store copy --to postgresql://" in r.output


def test_an_unknown_role_is_refused(tmp_path: Path) -> None:
    root = lead_project(tmp_path, "http://127.0.0.1:9/")
    r = CliRunner().invoke(main, ["serve", str(root), "--role", "web,cron"])
    assert r.exit_code == 2 and "unknown role cron" in r.output
