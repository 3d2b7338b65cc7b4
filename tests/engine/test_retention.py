"""History retention: finished runs removed whole and compressed by the flow's `history` policy, through a
running hub and its real store; pending work and dead letters are kept; the CLI applies it by hand."""

from __future__ import annotations

import sqlite3
import time

import aiohttp
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.engine.retention import Retention
from tests.conftest import eventually, lead_project

FAST = {"timeout_s": 0.5, "retry": {"schedule": ["100ms"], "jitter": 0}}


async def test_a_sweep_removes_old_delivered_runs_keeps_dead_letters_and_compresses(
    tmp_path, sink, start_hub
):
    sink.default = lambda request, rec: 400 if rec.body["properties"]["email"].startswith("bad") else 201
    root = lead_project(
        tmp_path, sink.url, delivery=FAST, hub={"history": {"keep": "1h", "compress_after": "10m"}}
    )
    hub = await start_hub(root)
    ids = {}
    for who in ("a", "b", "bad-c"):
        _, body = await hub.post("/hooks/lead-capture", {"email": f"{who}@example.com"})
        ids[who] = body["event_id"]
    _, body = await hub.post("/hooks/lead-capture", {"first_name": "no email"})  # quarantined
    ids["quarantined"] = body["event_id"]

    async def settled() -> bool:
        return [(await hub.run(i))["status"] for i in ids.values()] == [
            "delivered",
            "delivered",
            "dead",
            "quarantined",
        ]

    await eventually(settled, what="runs settled")
    store, flows = hub.hub.store, lambda: [fr.spec for fr in hub.hub.flows.values()]
    assert store is not None
    now = time.time()
    assert (await Retention(store, flows, clock=lambda: now).sweep()).total_removed == 0  # nothing old yet

    report = await Retention(store, flows, clock=lambda: now + 20 * 60).sweep()  # 20 minutes later
    assert report.removed == {} and report.compressed == {"lead-capture": 4}
    run = await hub.run(ids["quarantined"])
    assert run["payload"] == {"first_name": "no email"} and run["trace"][0]["step"] == "normalise"

    report = await Retention(store, flows, clock=lambda: now + 2 * 3600, chunk=1).sweep()  # 2 hours later
    assert report.removed == {"lead-capture": 2}  # the delivered ones, one chunk at a time
    for gone in ("a", "b"):
        assert await store.get_run(ids[gone]) is None
    assert (
        await hub.count("deliveries") == 1 and await hub.count("attempts") == 1
    )  # bad-c's; quarantined has none
    assert (await hub.run(ids["bad-c"]))["status"] == "dead"  # kept until replayed or discarded
    assert (await hub.run(ids["quarantined"]))["status"] == "quarantined"

    # The flow's own keep_failures removes failures too, and the metric counts what went.
    hub.hub.flows["lead-capture"].spec.history = hub.hub.flows["lead-capture"].spec.history.model_copy(
        update={"keep_failures": 3600.0}
    )
    report = await Retention(
        store, flows, clock=lambda: now + 2 * 3600, on_counts=hub.hub._count_history
    ).sweep()
    assert report.removed == {"lead-capture": 2}
    assert await hub.count("events") == 0 and await hub.count("deliveries") == 0
    async with aiohttp.ClientSession() as s, s.get(hub.url + "/metrics") as r:
        assert 'patchbay_history_removed_total{flow="lead-capture"} 2.0' in await r.text()


def test_history_settings_are_checked_where_they_are_written(tmp_path):
    root = lead_project(tmp_path, "http://127.0.0.1:9/", hub={"history": {"keep": "30s"}})
    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 32, "PATCHBAY_SECRET_CRM_TOKEN": "y" * 8}
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert (
        res.exit_code == 2 and "patchbay.yaml:" in res.output and "`keep` must be at least 1m" in res.output
    )

    flow = root / "flows" / "lead-capture.yaml"
    (root / "patchbay.yaml").write_text("port: 0\n")
    flow.write_text(flow.read_text() + "history:\n  keep: 7d\n  keep_fail: 1d\n")
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert res.exit_code == 2 and "lead-capture.yaml:" in res.output and "keep_fail" in res.output


def test_prune_by_hand_removes_runs_past_keep(tmp_path, monkeypatch):
    from patchbay.config.project import load_project
    from patchbay.store.blocking import BlockingStore
    from tests.store.test_conformance import event

    root = lead_project(tmp_path, "http://127.0.0.1:9/")
    flow = root / "flows" / "lead-capture.yaml"
    flow.write_text(flow.read_text() + "history: {keep: 1d}\n")
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", "x" * 32)
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", "y" * 8)
    project, problems = load_project(root)
    assert project is not None, problems
    with BlockingStore(project.store_path) as store:
        for _ in range(3):
            store.run(lambda s: s.accept(event(flow="lead-capture", status="filtered")))
    with sqlite3.connect(project.store_path) as conn:  # age two runs by two days
        conn.execute(
            "UPDATE events SET received_at=received_at-172800, updated_at=updated_at-172800"
            " WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT 2)"
        )
    res = CliRunner().invoke(main, ["store", "prune", "-p", str(root)])
    assert res.exit_code == 0, res.output
    assert "lead-capture: removed 2 runs" in res.output
    res = CliRunner().invoke(main, ["runs", "-p", str(root), "--json"])
    assert res.exit_code == 0 and res.output.count('"id"') == 1, res.output
    res = CliRunner().invoke(main, ["store", "prune", "-p", str(root)])
    assert "nothing is due" in res.output


async def test_compression_resumes_where_the_last_sweep_stopped_and_starts_over_once_a_day(
    tmp_path, monkeypatch
) -> None:
    """Each chunk, and each sweep after the first, starts at the arrival of the last run compressed, not at
    the first run kept (which would read past every run compressed before); once a day it starts over."""
    from types import SimpleNamespace

    from patchbay.config.models import History
    from patchbay.engine import retention
    from patchbay.store.sqlite import SqliteStore
    from tests.store.test_conformance import event

    store = SqliteStore(tmp_path / "store.db")
    asked: list[float | None] = []
    compress = store.compress_runs

    async def spy(flow, before, limit=500, after=None):  # type: ignore[no-untyped-def]
        asked.append(after)
        return await compress(flow, before, limit, after)

    store.compress_runs = spy  # type: ignore[method-assign]
    t = time.time() - 1000
    for i in range(5):
        await store.accept(event(status="quarantined", reason="r", received_at=t + i))
    flow = SimpleNamespace(name="orders", history=History(keep=None, compress_after=60))
    ret = Retention(store, lambda: [flow], chunk=2, pause_s=0.0, clock=lambda: time.time() + 3600)  # type: ignore[list-item]
    try:
        assert (await ret.sweep()).compressed == {"orders": 5}
        assert asked == [None, t + 1, t + 3]  # chunks of 2, 2, then 1 (fewer: done)
        await store.accept(event(status="quarantined", reason="r", received_at=t + 10))
        asked.clear()
        assert (await ret.sweep()).compressed == {"orders": 1}
        assert asked == [t + 4]
        monkeypatch.setattr(retention, "FULL_PASS_S", 0.0)
        asked.clear()
        assert (await ret.sweep()).compressed == {}
        assert asked == [None]
    finally:
        await store.close()
