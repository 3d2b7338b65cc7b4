"""A scheduled batch flow inside the hub: a failing run is read by the schedule's health (a stop waits for a
resume or a good run started by hand), alerts once, and a good run clears both."""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import yaml

from patchbay.engine.batch_runs import latest_run
from patchbay.engine.sources import health_of
from tests.conftest import eventually, write_project

SYSTEMS = {
    "shop": {"kind": "sqlite", "owner": "ops", "path": "shop.db"},
    "report": {"kind": "sqlite", "owner": "data", "path": "report.db"},
}
FLOW = {
    "purpose": "Orders copied into reporting.",
    "owner": "data",
    "trigger": {"schedule": {"every": "1s"}, "manual": True},
    "steps": [{"map": {"id": "id", "email": "email", "updated_at": "updated_at"}}],
    "batch": {
        "from": {"system": "shop", "table": "orders"},
        "to": {"system": "report", "table": "orders"},
        "mode": "merge",
        "key": ["id"],
        "cursor": {"column": "updated_at"},
    },
}


async def test_a_stopped_scheduled_run_stops_the_schedule_until_a_good_run(tmp_path, start_hub):
    write_project(
        tmp_path,
        {"systems.yaml": yaml.safe_dump(SYSTEMS), "flows/orders.yaml": yaml.safe_dump(FLOW, sort_keys=False)},
    )
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, updated_at TEXT)")
        c.execute("INSERT INTO orders VALUES (1, 'a@x.io', '2024-01-01')")
    sqlite3.connect(tmp_path / "report.db").close()
    hub = await start_hub(tmp_path)
    fr = hub.hub.flows["orders"]
    assert fr.health is not None and fr.schedule is not None

    async def last_is(status: str) -> bool:
        last = await latest_run(hub.store, "orders")
        return last is not None and last.status == status

    await eventually(lambda: last_is("ok"), what="a good scheduled run")
    # The source gains a column: the next scheduled run stops (on_drift: stop), and so does the schedule.
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("ALTER TABLE orders ADD COLUMN note TEXT")

    async def stopped() -> bool:
        return fr.health is not None and fr.health.state.state == "stopped"

    await eventually(stopped, what="the schedule stopped")
    assert await last_is("stopped")
    runs_before = (await hub.store.schedule("orders"))["runs"]
    await asyncio.sleep(2.5)  # every 1s, but it waits for a resume or a good run
    assert (await hub.store.schedule("orders"))["runs"] == runs_before
    assert fr.health.state.state == "stopped" and health_of(fr.health.state) == "failing"
    assert fr.health.waiting
    async with aiohttp.ClientSession() as s, s.get(hub.url + "/readyz") as r:
        ready = await r.json()
    assert ready["status"] == "degraded"
    assert "its schedule waits for `patchbay resume orders` or a good run" in ready["problems"]["orders"]

    # A good run by hand (accepting the change) clears the batch health and resumes the schedule.
    live = hub.hub.start_batch("orders", "test", accept_schema=True)
    await live.done.wait()
    assert live.report is not None and live.report.status == "ok", live.report.error
    assert fr.health.state.state == "active" and not fr.health.waiting
    async with aiohttp.ClientSession() as s, s.get(hub.url + "/readyz") as r:
        assert (await r.json())["status"] == "ready"


async def test_the_latest_run_ignores_a_failure_older_than_history_keeps_good_runs(tmp_path):
    import time

    from patchbay.config.project import load_or_raise
    from patchbay.engine.batch import RunReport, record_run
    from patchbay.store.sqlite import SqliteStore

    write_project(
        tmp_path,
        {"systems.yaml": yaml.safe_dump(SYSTEMS), "flows/orders.yaml": yaml.safe_dump(FLOW, sort_keys=False)},
    )
    flow = load_or_raise(tmp_path).flows["orders"]
    store = SqliteStore(tmp_path / "store.db")
    try:
        day = 86400.0
        old = RunReport("orders", "merge", status="failed", error="boom", started_at=time.time() - 40 * day)
        await record_run(store, flow, old, trigger="schedule")
        # Retention (keep 30d) may have removed the good runs after it: a restart must not call it failing.
        assert await latest_run(store, "orders", 30 * day) is None
        last = await latest_run(store, "orders")  # no retention: it is the latest there is
        assert last is not None and (last.status, last.error) == ("failed", "boom")
        recent = RunReport("orders", "merge", status="stopped", error="drift", started_at=time.time() - day)
        await record_run(store, flow, recent, trigger="api")
        last = await latest_run(store, "orders", 30 * day)
        assert last is not None and (last.status, last.error, last.run_id) == (
            "stopped",
            "drift",
            recent.run_id,
        )
        good = RunReport("orders", "merge", status="ok")
        await record_run(store, flow, good, trigger="api")
        last = await latest_run(store, "orders", 30 * day)
        assert last is not None and (last.status, last.failing) == ("ok", False)
    finally:
        await store.close()


async def test_a_hub_stopping_during_a_run_aborts_it_whole_and_says_so(tmp_path, caplog):
    from patchbay.config.project import load_or_raise
    from patchbay.engine.hub import Hub
    from tests.conftest import resolver

    flow = {**FLOW, "trigger": {"manual": True}, "batch": {**FLOW["batch"], "batch_rows": 1000}}
    write_project(
        tmp_path,
        {"systems.yaml": yaml.safe_dump(SYSTEMS), "flows/orders.yaml": yaml.safe_dump(flow, sort_keys=False)},
    )
    with sqlite3.connect(tmp_path / "shop.db") as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, email TEXT, updated_at TEXT)")
        c.executemany(
            "INSERT INTO orders VALUES (?, ?, '2024-01-01')", [(i, f"u{i}@x.io") for i in range(1, 400_001)]
        )
    sqlite3.connect(tmp_path / "report.db").close()
    hub = Hub(load_or_raise(tmp_path), resolver=resolver())
    await hub.start()
    stopped = False
    try:
        live = hub.start_batch("orders", "test")

        async def copying() -> bool:
            return live.progress is not None and live.progress.read >= 20_000

        await eventually(copying, what="the run half way")
        await hub.stop()
        stopped = True
        assert live.done.is_set() and live.report is None and live.status == "failed"
        assert "was cancelled (the hub is stopping)" in caplog.text
    finally:
        if not stopped:
            await hub.stop()
    with sqlite3.connect(tmp_path / "report.db") as c:  # nothing of it: no table, or no rows
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "orders" not in tables or c.execute("SELECT count(*) FROM orders").fetchone() == (0,)
