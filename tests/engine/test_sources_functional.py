"""Sources that fail, on real servers: the deliveries' vocabulary decides (transient retries with
backoff, auth pauses, terminal stops), and a failing source alerts, shows in /readyz, the API and the map."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from patchbay.cli import main
from patchbay.engine import policy, sources
from patchbay.engine.alerts import AlertManager
from patchbay.security.tokens import create_token
from patchbay.store.base import Actor
from patchbay.store.sqlite import q_schedule
from tests.conftest import RunningHub, _start, eventually
from tests.engine.test_alerts import _settle, alert_project, cli_env, hook_messages

assert cli_env  # a fixture


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff from 50 ms and alert evaluation every 100 ms, so a test sees several failures quickly."""
    monkeypatch.setattr(policy, "SOURCE_BACKOFF_S", 0.05)
    monkeypatch.setattr(policy, "SOURCE_BACKOFF_MAX_S", 0.2)
    monkeypatch.setattr(sources, "STREAM_SETTLE_S", 0.3)
    monkeypatch.setattr(AlertManager, "interval_s", 0.1)


class OrdersApi:
    """A JSON API whose answer the test sets: a status code, or 200 with one order."""

    def __init__(self) -> None:
        self.status = 200
        self.calls = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.status != 200:
            return web.json_response({"error": "no"}, status=self.status)
        return web.json_response({"data": [{"id": 1, "email": "a@example.com"}]})


@pytest.fixture
async def orders() -> AsyncIterator[OrdersApi]:
    api = OrdersApi()
    app = web.Application()
    app.router.add_get("/orders", api.handle)
    runner, api.url = await _start(app)
    yield api
    await runner.cleanup()


def with_source_flow(root: Path, sink_url: str, system: dict[str, Any], trigger: dict[str, Any]) -> Path:
    """The alert project plus flow `orders`: `trigger` reads system `upstream`, records go to the CRM."""
    alert_project(tmp := root, sink_url)
    systems = yaml.safe_load((tmp / "systems.yaml").read_text())
    systems["upstream"] = {"owner": "shop", **system}
    (tmp / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    flow = {
        "purpose": "orders reach the CRM",
        "owner": "sales",
        "trigger": trigger,
        "destinations": [{"name": "crm", "system": "crm", "path": "/orders-in"}],
        "alerts": [{"when": "source_failing", "notify": ["ops-hook"]}],
    }
    (tmp / "flows" / "orders.yaml").write_text(yaml.safe_dump(flow, sort_keys=False))
    return tmp


async def get(hub: RunningHub, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(hub.url + path, headers=headers) as r:
        return r.status, await r.json()


def state_of(hub: RunningHub) -> Any:
    health = hub.hub.flows["orders"].health
    assert health is not None
    return health.state


async def test_an_http_poll_answering_500_then_401_alerts_shows_and_pauses_until_resumed(
    tmp_path, sink, orders, start_hub, cli_env
):
    sink.default = 200
    orders.status = 500
    root = with_source_flow(
        tmp_path,
        sink.url,
        {"kind": "http", "url": orders.url, "allow_private_network": True},
        {
            "schedule": {"every": "1h"},
            "source": {"system": "upstream", "path": "/orders", "items_path": "data"},
        },
    )
    hub = await start_hub(root)
    token, _ = await create_token(hub.store, "t", ("admin",), None, Actor("test"))

    # Transient: retried with backoff long before the next hourly run, and counted.
    async def failing() -> bool:
        return state_of(hub).failures >= 3

    await eventually(failing, what="three failed polls in a row")
    assert state_of(hub).state == "failing" and "HTTP 500" in (state_of(hub).error or "")
    await eventually(lambda: _has(hook_messages(sink), 1), what="the source alert")
    [alert] = hook_messages(sink)
    assert alert["alert"] == "source_failing" and alert["title"] == "ALERT orders: source failing"
    assert "HTTP 500" in alert["text"] and "retried with backoff" in alert["text"]

    status, ready = await get(hub, "/readyz")
    assert status == 200 and ready["status"] == "degraded"
    assert ready["problems"] == {
        "orders": f"source failing: {state_of(hub).failures} failed runs in a row, retried with backoff; "
        "`patchbay state orders` shows why"
    }
    assert "HTTP 500" not in str(ready), "the upstream's answer stays behind the API's tokens"
    _, flows = await get(hub, "/api/v1/flows", token)
    [summary] = [f for f in flows["flows"] if f["name"] == "orders"]
    assert summary["health"] == "failing" and summary["source_health"]["state"] == "failing"
    _, graph = await get(hub, "/api/v1/map", token)
    [edge] = [e for e in graph["edges"] if e["flow"] == "orders"]
    assert edge["health"] == "failing" and "HTTP 500" in edge["source_error"]
    [node] = [n for n in graph["nodes"] if n["id"] == "upstream"]
    assert node["health"] == "failing"

    # Auth: the source pauses (no more polls) and the alert says so.
    orders.status = 401
    await eventually(lambda: _is(state_of(hub).state, "paused"), what="the pause")
    await eventually(lambda: _has(hook_messages(sink), 2), what="the pause alert")
    paused = hook_messages(sink)[1]
    assert paused["title"] == "ALERT orders: source paused" and "HTTP 401" in paused["text"]
    assert "destination" not in paused["text"], "a source's error speaks of the source"
    assert "`patchbay resume orders`" in paused["text"]
    calls = orders.calls
    await _settle(0.5)
    assert orders.calls == calls, "a paused source is not polled"
    assert (await hub.store.read(q_schedule, "orders"))["next_due_at"] is None  # paused, so never "late"
    _, graph = await get(hub, "/api/v1/map", token)
    assert [e["health"] for e in graph["edges"] if e["flow"] == "orders"] == ["paused"]
    shown = cli_env.invoke(main, ["state", "orders", "-p", str(root)])
    assert "source: paused since" in shown.output and "`patchbay resume orders`" in shown.output, shown.output

    # Fixed and resumed from the CLI: it polls again, the alert resolves, /readyz is ready.
    orders.status = 200
    res = cli_env.invoke(main, ["resume", "orders", "-p", str(root)])
    assert res.exit_code == 0 and "resumed the source of orders (was paused" in res.output, res.output
    await eventually(lambda: _is(state_of(hub).state, "active"), what="the source active again")
    assert orders.calls > calls
    await eventually(lambda: _has(hook_messages(sink), 3), what="the recovery")
    assert hook_messages(sink)[2]["title"] == "RESOLVED orders: source works again"
    status, ready = await get(hub, "/readyz")
    assert (status, ready["status"]) == (200, "ready")
    m = hub.hub.metrics
    assert m.source_paused.labels("orders")._value.get() == 0
    assert m.source_failures.labels("orders")._value.get() == 0


async def test_a_sql_poll_on_a_dropped_table_stops_and_alerts(tmp_path, sink, start_hub):
    sink.default = 200
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY, updated_at INTEGER)")
        conn.execute("INSERT INTO orders VALUES(1, 1)")
    root = with_source_flow(
        tmp_path,
        sink.url,
        {"kind": "sqlite", "path": str(db)},
        {
            "schedule": {"every": "1s"},
            "source": {"system": "upstream", "table": "orders", "cursor_column": "updated_at"},
        },
    )
    hub = await start_hub(root)
    await eventually(lambda: _runs(hub, 1), what="the first poll")
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE orders")

    await eventually(lambda: _is(state_of(hub).state, "stopped"), timeout=5, what="the source stopped")
    assert state_of(hub).failures == 1, "a terminal error is not retried"
    assert "no such table" in (state_of(hub).error or "")
    await eventually(lambda: _has(hook_messages(sink), 1), what="the stop alert")
    [alert] = hook_messages(sink)
    assert alert["title"] == "ALERT orders: source stopped" and "no such table" in alert["text"]
    runs = (await hub.store.read(q_schedule, "orders"))["runs"]
    await _settle(1.5)  # an every-1s schedule would have run again
    assert (await hub.store.read(q_schedule, "orders"))["runs"] == runs
    status, ready = await get(hub, "/readyz")
    assert status == 200 and ready["status"] == "degraded"
    assert ready["problems"]["orders"].startswith("source stopped after an error that retrying will not fix")

    # Fixed, then resumed through the API: it polls again.
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY, updated_at INTEGER)")
    token, _ = await create_token(hub.store, "ops", ("destinations:write",), None, Actor("test"))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{hub.url}/api/v1/flows/orders/source/resume", headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        assert r.status == 200 and (await r.json())["resumed"] is True
    await eventually(lambda: _is(state_of(hub).state, "active"), what="the source active again")
    assert (await hub.store.read(q_schedule, "orders"))["runs"] > runs
    status, ready = await get(hub, "/readyz")
    assert ready["status"] == "ready"


async def test_a_stream_source_that_cannot_start_backs_off_then_recovers(tmp_path, sink, start_hub):
    sink.default = 200
    parent = tmp_path / "drops"  # missing: the source cannot create its folder inside it
    root = with_source_flow(
        tmp_path,
        sink.url,
        {"kind": "files", "folder": str(parent / "in")},
        {"source": {"system": "upstream", "pattern": "*.jsonl", "min_age_s": 0, "scan_every_s": "50ms"}},
    )
    hub = await start_hub(root)
    await eventually(lambda: _at_least(state_of(hub).failures, 3), what="three failed starts")
    assert state_of(hub).state == "failing" and "watching" in (state_of(hub).error or "")
    status, ready = await get(hub, "/readyz")
    assert ready["status"] == "degraded" and "orders" in ready["problems"]
    await eventually(lambda: _has(hook_messages(sink), 1), what="the source alert")

    (parent / "in").mkdir(parents=True)
    (parent / "in" / "a.jsonl").write_text('{"id": 1}\n')
    await eventually(lambda: _is(state_of(hub).state, "active"), what="the source active again")
    await eventually(lambda: _has(hook_messages(sink), 2), what="the recovery")
    status, ready = await get(hub, "/readyz")
    assert ready["status"] == "ready"


async def _has(messages: list[Any], n: int) -> bool:
    assert len(messages) <= n, messages
    return len(messages) == n


async def _is(value: Any, expected: Any) -> bool:
    return bool(value == expected)


async def _at_least(value: int, n: int) -> bool:
    return value >= n


async def _runs(hub: RunningHub, n: int) -> bool:
    row = await hub.store.read(q_schedule, "orders")
    return bool(row and row["runs"] >= n)
