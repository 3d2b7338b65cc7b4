"""http as a source: a real JSON API on 127.0.0.1, polled on a schedule, paged, incremental, deduped."""

from __future__ import annotations

import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Resources
from patchbay.connectors.http import HttpSystem
from patchbay.connectors.http_poll import HttpPollConfig, HttpPollSource
from patchbay.errors import TerminalError, TransientError
from tests.conftest import _start, eventually, write_project
from tests.connectors import polls_more

assert DeliveryPolicy


class Api:
    """A paged orders API: ?updated_since=…&page=…&per_page=…"""

    def __init__(self) -> None:
        self.orders = [
            {"id": i, "total": i * 10, "updated_at": f"2026-11-01T00:00:{i:02d}"} for i in range(1, 8)
        ]
        self.calls: list[dict[str, str]] = []
        self.fail_next = 0

    async def handle(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.calls.append(q)
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"error": "busy"}, status=503)
        since = q.get("updated_since")
        rows = sorted(
            (o for o in self.orders if since is None or o["updated_at"] > since),
            key=lambda o: o["updated_at"],
        )
        size, page = int(q.get("per_page", 100)), int(q.get("page", 1))
        return web.json_response({"data": rows[(page - 1) * size : page * size]})


@pytest.fixture
async def api():
    a = Api()
    app = web.Application()
    app.router.add_get("/orders", a.handle)
    runner, url = await _start(app)
    a.url = url
    yield a
    await runner.cleanup()


def source(url: str, **over) -> HttpPollSource:
    cfg = HttpPollConfig.model_validate(
        {
            "path": "/orders",
            "items_path": "data",
            "cursor": {"field": "updated_at", "param": "updated_since"},
            "pagination": {"type": "page", "size": 3},
            **over,
        }
    )
    return HttpPollSource(HttpSystem(url=url), cfg, Resources(allow_private=True))


async def collect(src, cursor=None):
    try:
        return [b async for b in src.poll(cursor)]
    finally:
        if src.resources.http is not None:
            await src.resources.http.close()


async def test_pages_until_a_short_page_and_saves_cursor_with_the_last(api):
    batches = await collect(source(api.url))
    assert [len(b.records) for b in batches] == [3, 3, 1]
    assert [b.cursor for b in batches] == [None, None, "2026-11-01T00:00:07"]
    assert batches[0].records[0].id == "1@2026-11-01T00:00:01"
    assert [c.get("page") for c in api.calls] == ["1", "2", "3"]


async def test_incremental_poll_sends_the_cursor(api):
    batches = await collect(source(api.url), cursor="2026-11-01T00:00:05")
    assert [r.data["id"] for b in batches for r in b.records] == [6, 7]
    assert api.calls[0]["updated_since"] == "2026-11-01T00:00:05"


async def test_503_is_transient(api):
    api.fail_next = 1
    with pytest.raises(TransientError, match="polling .*HTTP 503"):
        await collect(source(api.url))


async def test_link_header_pagination():
    pages = {"1": ([{"id": 1}, {"id": 2}], '</items?p=2>; rel="next"'), "2": ([{"id": 3}], "")}

    async def handle(request: web.Request) -> web.Response:
        items, link = pages[request.query.get("p", "1")]
        return web.json_response(items, headers={"Link": link} if link else {})

    app = web.Application()
    app.router.add_get("/items", handle)
    runner, url = await _start(app)  # loopback: allowed for this test's system
    try:
        src = source(url, path="/items", items_path="", cursor=None, pagination={"type": "link"})
        batches = await collect(src)
        assert [r.data["id"] for b in batches for r in b.records] == [1, 2, 3]
    finally:
        await runner.cleanup()


async def test_scheduled_poll_flow_end_to_end(tmp_path, api, sink, start_hub, monkeypatch):
    write_project(
        tmp_path,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": yaml.safe_dump(
                {
                    "shop": {"kind": "http", "owner": "ops", "url": api.url, "allow_private_network": True},
                    "reporting": {
                        "kind": "http",
                        "owner": "finance",
                        "url": sink.url,
                        "allow_private_network": True,
                    },
                }
            ),
            "flows/orders.yaml": yaml.safe_dump(
                {
                    "purpose": "orders reach reporting",
                    "owner": "finance",
                    "trigger": {
                        "schedule": {"every": "1s"},
                        "source": {
                            "system": "shop",
                            "path": "/orders",
                            "items_path": "data",
                            "cursor": {"field": "updated_at", "param": "updated_since"},
                            "pagination": {"type": "page", "size": 3},
                        },
                    },
                    "record_key": "id",
                    "steps": [{"map": {"order_id": "id", "amount_cents": "total"}}],
                    "destinations": [{"name": "report", "system": "reporting", "path": "/orders"}],
                }
            ),
        },
    )
    hub = await start_hub(tmp_path)
    await sink.wait_for(7)
    api.fail_next = 1  # the next poll fails: visible in the schedule, nothing lost
    api.orders[2]["updated_at"] = "2026-11-01T00:01:00"  # order 3 changed: a new event
    api.orders.append({"id": 8, "total": 80, "updated_at": "2026-11-01T00:01:01"})
    await sink.wait_for(9, timeout=10)
    bodies = [r.body for r in sink.received]
    assert sorted(b["order_id"] for b in bodies) == [1, 2, 3, 3, 4, 5, 6, 7, 8]
    await polls_more(hub, 2)
    assert len(sink.received) == 9  # polls that find nothing new add nothing

    async def failed_once() -> bool:
        row = await hub.store.read(lambda c: c.execute("SELECT runs FROM schedules").fetchone())
        return row[0] >= 3

    await eventually(failed_once, what="several scheduled runs")
    monkeypatch.setenv("PATCHBAY_PROJECT", str(tmp_path))
    res = CliRunner().invoke(main, ["state", "orders"])
    assert res.exit_code == 0, res.output
    assert '"2026-11-01T00:01:01"' in res.output and "every 1s" in res.output
    res = CliRunner().invoke(main, ["state", "orders", "--reset"])
    assert "reset" in res.output


async def test_a_link_to_another_server_is_never_followed_with_the_systems_credentials():
    seen: list[str] = []  # requests the other server got: a system's auth goes only to its own server

    async def other(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response([{"id": 99}])

    other_app = web.Application()
    other_app.router.add_get("/steal", other)
    other_runner, other_url = await _start(other_app)

    async def handle(request: web.Request) -> web.Response:
        return web.json_response([{"id": 1}], headers={"Link": f'<{other_url}/steal>; rel="next"'})

    app = web.Application()
    app.router.add_get("/items", handle)
    runner, url = await _start(app)
    try:
        cfg = HttpPollConfig.model_validate(
            {"path": "/items", "items_path": "", "pagination": {"type": "link"}}
        )
        src = HttpPollSource(HttpSystem(url=url), cfg, Resources(allow_private=True))
        with pytest.raises(TerminalError, match="another server"):
            await collect(src)
        assert seen == []
    finally:
        await runner.cleanup()
        await other_runner.cleanup()


@pytest.mark.parametrize("path", ["@evil.example/orders", ".evil.example/orders", "orders"])
def test_a_path_that_could_name_another_server_is_refused(path):
    with pytest.raises(ValueError, match="must start with /"):
        HttpPollConfig.model_validate({"path": path})
    from patchbay.connectors.http import HttpSinkConfig

    with pytest.raises(ValueError, match="must start with /"):
        HttpSinkConfig.model_validate({"path": path})


async def test_the_paths_own_query_and_the_polls_parameters_reach_the_api_together(api):
    batches = await collect(
        source(api.url, path="/orders?status=open&per_page=50", params={"channel": "web shop"})
    )
    assert [r.data["id"] for b in batches for r in b.records] == list(range(1, 8))
    first = api.calls[0]
    # the path's own parameter kept, one of the same name replaced by the pagination's
    assert (first["status"], first["channel"], first["per_page"], first["page"]) == (
        "open",
        "web shop",
        "3",
        "1",
    )


async def test_a_page_over_the_read_limit_is_refused_not_cut(api, monkeypatch):
    from patchbay.connectors import http_poll

    monkeypatch.setattr(http_poll, "PAGE_LIMIT", 64)
    with pytest.raises(TerminalError, match="ask for smaller pages"):
        await collect(source(api.url))
