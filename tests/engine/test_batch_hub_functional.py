"""Batch flows inside a real `patchbay serve`: on their schedule, on demand through the API (202, progress,
report, 409 while one is going), failing and stopped runs alerting and degrading /readyz until a good run,
and kill -9 during a scheduled run: all or nothing at the destination, the schedule catching up once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from patchbay.cli import main
from tests.cluster.harness import free_port
from tests.conftest import Sink, write_project
from tests.connectors.bulk_harness import HOST, PORT, database, name

pytestmark = pytest.mark.slow

SYSTEMS = """
shop: {kind: sqlite, owner: ops, path: shop.db}
report: {kind: sqlite, owner: data, path: report.db}
"""


def hub_yaml(sink_url: str) -> dict[str, str]:
    return {
        "patchbay.yaml": "alerts:\n  - {when: batch_failed, notify: [ops-hook]}\n",
        "systems.yaml": SYSTEMS
        + f"ops-hook: {{kind: http, owner: ops, url: '{sink_url}/alerts', allow_private_network: true}}\n",
    }


FLOW = """
purpose: Orders copied into reporting, merged by id.
owner: data
trigger: {schedule: {every: 1h}, manual: true}
steps:
  - map: {id: id, email: lower(trim(email)), total: total, updated_at: updated_at}
  - validate: {email: {required: true, format: email}}
batch:
  from: {system: shop, table: orders}
  to: {system: report, table: orders}
  mode: merge
  key: [id]
  cursor: {column: updated_at}
  batch_rows: 1000
"""


def shop(root: Path, n: int) -> None:
    with sqlite3.connect(root / "shop.db") as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, total REAL, updated_at TEXT)")
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?)",
            [
                (
                    i,
                    f" Buyer{i}@Shop.io",
                    i * 2.5,
                    f"2024-01-01 {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}",
                )
                for i in range(1, n + 1)
            ],
        )
        c.execute("UPDATE orders SET email = 'nope' WHERE id = 7")
    sqlite3.connect(root / "report.db").close()


def token(root: Path, *scopes: str) -> str:
    args = ["tokens", "create", "t", "-p", str(root), "--json"]
    for s in scopes:
        args += ["--scope", s]
    got = CliRunner().invoke(main, args)
    assert got.exit_code == 0, got.output
    return str(json.loads(got.stdout)["token"])


class Serve:
    """`patchbay serve` in a subprocess, and a JSON client of its API."""

    def __init__(self, root: Path, tok: str) -> None:
        self.root, self.tok, self.port = root, tok, free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        log = open(self.root / "serve.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "patchbay",
            "serve",
            str(self.root),
            "--port",
            str(self.port),
            stdout=log,
            stderr=log,
            env={**os.environ},
        )
        log.close()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                status, _ = await self.call("GET", "/healthz")
                if status == 200:
                    return
            except aiohttp.ClientError:
                pass
            assert self.proc.returncode is None, self.log()
            await asyncio.sleep(0.05)
        raise AssertionError("the hub did not start:\n" + self.log())

    def log(self) -> str:
        return (self.root / "serve.log").read_text()[-4000:]

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tok}"}
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, self.url + path, json=body, headers=headers) as r,
        ):
            return r.status, await r.json()

    async def get(self, path: str) -> Any:
        status, body = await self.call("GET", path)
        assert status == 200, (status, body)
        return body

    async def until(self, what: str, check: Any, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = await check()
            if got:
                return got
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.log()}")

    async def run_done(self, flow: str, run_id: str) -> dict[str, Any]:
        async def done() -> Any:
            view = await self.get(f"/api/v1/flows/{flow}/runs/{run_id}")
            return view if view["status"] != "running" else None

        return dict(await self.until(f"run {run_id}", done))

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL
        await self.proc.wait()


def alerts(sink: Sink) -> list[dict[str, Any]]:
    return [r.body for r in sink.received if r.path == "/alerts"]


async def test_scheduled_and_api_runs_progress_409_drift_alert_readyz_and_recovery(tmp_path, sink):
    sink.default = 200
    write_project(tmp_path, {**hub_yaml(sink.url), "flows/orders.yaml": FLOW})
    shop(tmp_path, 300)
    hub = Serve(tmp_path, token(tmp_path, "runs:start", "runs:read", "flows:read"))
    await hub.start()
    try:
        # The interval schedule runs at the first start: its run is listed with its report.
        async def scheduled() -> Any:
            runs = (await hub.get("/api/v1/runs?flow=orders&status=delivered"))["runs"]
            return runs[0] if runs else None

        first = await hub.until("the scheduled run", scheduled)
        view = await hub.run_done("orders", first["id"])
        assert (view["trigger"], view["status"], view["phase"]) == ("schedule", "ok", "done")
        assert (view["report"]["read"], view["report"]["inserted"], view["report"]["quarantined"]) == (
            300,
            299,
            1,
        )
        schedules = (await hub.get("/api/v1/schedules"))["schedules"]
        assert schedules[0]["runs"] == 1 and schedules[0]["last_status"] == "ok"

        # A bigger window on demand: 202 at once with the run id, a second start is refused with 409 naming it.
        with sqlite3.connect(tmp_path / "shop.db") as c:
            c.executemany(
                "INSERT INTO orders VALUES (?, ?, ?, '2025-01-01 00:00:00')",
                [(i, f"b{i}@shop.io", 1.0) for i in range(1000, 121000)],
            )
        status, started = await hub.call("POST", "/api/v1/flows/orders/runs", {})
        assert status == 202, started
        assert started["status"] == "running" and started["kind"] == "batch" and started["trigger"] == "api"
        status, refused = await hub.call("POST", "/api/v1/flows/orders/runs", {})
        assert status == 409 and refused["error"] == "run_in_progress"
        assert refused["run_id"] == started["run_id"] and started["run_id"] in refused["message"]
        # The trace endpoint has it once recorded; meanwhile it says where to follow it (or it has just ended).
        status, trace = await hub.call("GET", f"/api/v1/runs/{started['run_id']}")
        assert status == 200 or (status == 404 and "is still going" in trace["message"]), (status, trace)
        seen: list[dict[str, Any]] = []

        async def finished() -> Any:
            v = await hub.get(f"/api/v1/flows/orders/runs/{started['run_id']}")
            seen.append(v)
            return v if v["status"] != "running" else None

        done = await hub.until("the API's run", finished)
        progress = [v["progress"] for v in seen if v["status"] == "running" and v["progress"]["read"]]
        assert progress, "no progress was seen while the run went"
        p = progress[-1]
        assert p["total"] == 120001 and 0 < p["read"] <= p["total"] and p["rows_per_s"] > 0
        assert p["eta_s"] is not None and 0 < p["share"] <= 1
        assert done["status"] == "ok" and done["report"]["inserted"] == 120000, done
        flows = {f["name"]: f for f in (await hub.get("/api/v1/flows"))["flows"]}
        assert flows["orders"]["health"] == "ok" and flows["orders"]["batch"]["last_run"]["status"] == "ok"

        # The source gains a column: the run stops (nothing written), alerts, and /readyz says so.
        with sqlite3.connect(tmp_path / "shop.db") as c:
            c.execute("ALTER TABLE orders ADD COLUMN note TEXT")
        status, started = await hub.call("POST", "/api/v1/flows/orders/runs", {})
        stopped = await hub.run_done("orders", started["run_id"])
        assert stopped["status"] == "stopped" and "new column note" in stopped["report"]["error"]
        msg = await hub.until("the alert", lambda: _first(alerts(sink), "firing"))
        assert msg["alert"] == "batch_failed" and msg["title"] == "ALERT orders: batch run stopped"
        assert started["run_id"] in msg["text"] and "new column note" in msg["text"]
        status, ready = await hub.call("GET", "/readyz")
        assert status == 200 and ready["status"] == "degraded"
        assert started["run_id"] in ready["problems"]["orders"] and "stopped" in ready["problems"]["orders"]
        flows = {f["name"]: f for f in (await hub.get("/api/v1/flows"))["flows"]}
        assert flows["orders"]["health"] == "failing"
        assert flows["orders"]["batch"]["last_run"]["status"] == "stopped"
        edge = next(e for e in (await hub.get("/api/v1/map"))["edges"] if e["flow"] == "orders")
        assert (edge["source"], edge["target"], edge["health"]) == ("shop", "report", "failing")

        # Accepting the change: a good run clears the health, /readyz and the alert.
        status, started = await hub.call("POST", "/api/v1/flows/orders/runs", {"accept_schema": True})
        assert (await hub.run_done("orders", started["run_id"]))["status"] == "ok"
        msg = await hub.until("the recovery", lambda: _first(alerts(sink), "resolved"))
        assert msg["title"] == "RESOLVED orders: batch run ok again"
        status, ready = await hub.call("GET", "/readyz")
        assert (status, ready["status"]) == (200, "ready")
        flows = {f["name"]: f for f in (await hub.get("/api/v1/flows"))["flows"]}
        assert flows["orders"]["health"] == "ok"
        assert len(alerts(sink)) == 2  # one alert, one recovery
        with sqlite3.connect(tmp_path / "report.db") as c:
            assert c.execute("SELECT count(*) FROM orders").fetchone() == (120299,)

        # The CLI asks the running hub (--remote), follows the run, and `runs show` prints its report.
        remote = await cli(tmp_path, hub, "run", "orders", "--remote", "--url", hub.url)
        assert remote.returncode == 0, remote.stderr
        assert (
            remote.stdout.startswith("orders: run run_") and " ok: read 120000, inserted 0" in remote.stdout
        )
        run_id = remote.stdout.split()[2]
        shown = await cli(tmp_path, hub, "runs", "show", run_id)
        assert f"run {run_id}  flow orders  batch run OK" in shown.stdout, shown.stdout + shown.stderr
        assert "read 120,000, inserted 0, updated 0, unchanged 120,000" in shown.stdout
        assert "started " in shown.stdout and " by api, took " in shown.stdout
    finally:
        await hub.stop()


async def cli(root: Path, hub: Serve, *args: str) -> Any:
    import subprocess

    env = {**os.environ, "PATCHBAY_TOKEN": hub.tok}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "patchbay",
        *args,
        "-p",
        str(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


async def _first(items: list[dict[str, Any]], status: str) -> dict[str, Any] | None:
    return next((m for m in items if m["status"] == status), None)


PG_SYSTEMS = f"""
crm:
  kind: postgres
  owner: data
  host: {HOST}
  port: {PORT}
  database: test
  user: postgres
  allow_private_network: true
"""


async def test_kill_9_during_a_scheduled_run_then_the_schedule_catches_up_once(tmp_path):
    async with database() as pg:
        src, dst = name(pg, "src"), name(pg, "dst")
        flow_name = f"copy-{dst.replace('_', '-')}"[:60]
        await pg.execute(f'CREATE TABLE "{src}" (id bigint PRIMARY KEY, email text, at timestamptz NOT NULL)')
        await pg.execute(
            f"""INSERT INTO "{src}" SELECT g, 'u' || g || '@x.io', timestamptz '2024-01-01' + g * interval '1 s'
            FROM generate_series(1, 200000) g"""
        )
        flow = textwrap.dedent(
            f"""
            purpose: A nightly copy that is killed half way.
            owner: data
            trigger: {{schedule: {{every: 1h}}}}
            steps:
              - map: {{id: id, email: upper(email), at: at}}
            batch:
              from: {{system: crm, table: {src}}}
              to: {{system: crm, table: {dst}}}
              mode: merge
              key: [id]
              cursor: {{column: at}}
              batch_rows: 2000
            """
        )
        write_project(tmp_path, {"systems.yaml": PG_SYSTEMS, f"flows/{flow_name}.yaml": flow})
        hub = Serve(tmp_path, token(tmp_path, "flows:read", "runs:read"))
        await hub.start()
        try:

            async def half_way() -> bool:
                f = (await hub.get(f"/api/v1/flows/{flow_name}"))["batch"]
                running = f["running"]
                return bool(running and running["progress"] and running["progress"]["read"] >= 60000)

            await hub.until("the scheduled run half way", half_way)
            await hub.kill()
            # Nothing of the killed run is visible: no rows, no sync state.
            exists = await (await pg.execute("SELECT to_regclass(%s)", (dst,))).fetchone()
            if exists and exists[0]:
                assert await (await pg.execute(f'SELECT count(*) FROM "{dst}"')).fetchone() == (0,)
            if (await (await pg.execute("SELECT to_regclass('_patchbay_sync_state')")).fetchone())[0]:
                state = await (
                    await pg.execute(
                        "SELECT count(*) FROM _patchbay_sync_state WHERE flow = %s", (flow_name,)
                    )
                ).fetchone()
                assert state == (0,)
            await asyncio.sleep(0.2)  # the server notices the dead client and rolls back

            # Restarted, the interrupted run is done again at once (its next time is an hour away): once.
            await hub.start()

            async def recorded() -> Any:
                runs = (await hub.get(f"/api/v1/runs?flow={flow_name}"))["runs"]
                return runs if runs else None

            runs = await hub.until("the caught-up run", recorded, timeout=120)
            assert [r["status"] for r in runs] == ["delivered"], runs
            view = await hub.get(f"/api/v1/flows/{flow_name}/runs/{runs[0]['id']}")
            assert view["trigger"] == "schedule" and view["report"]["inserted"] == 200000
            got = await (
                await pg.execute(f"""SELECT count(*), count(DISTINCT id), sum(id) FROM "{dst}" """)
            ).fetchone()
            assert got == (200000, 200000, 200000 * 200001 // 2)
            await asyncio.sleep(1.0)  # no second catch-up run
            schedule = (await hub.get(f"/api/v1/flows/{flow_name}"))["schedule"]
            assert schedule["runs"] == 1 and schedule["next_due_at"] > time.time() + 3000
            assert len((await hub.get(f"/api/v1/runs?flow={flow_name}"))["runs"]) == 1
            assert "did not finish (its hub stopped during it): running that tick again now" in hub.log()
        finally:
            await hub.stop()
            await pg.execute("DELETE FROM _patchbay_sync_state WHERE flow = %s", (flow_name,))
