"""A paginated JSON API -> table batch sync against a real aiohttp server on 127.0.0.1: pages, a 429 waited
out, the since cursor with a lookback, records that fit no column quarantined, and `check`'s problems."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import web

from patchbay.config.project import load_or_raise, load_project
from patchbay.engine.batch import RunReport, run_flow
from patchbay.engine.hub import open_resolver_for
from tests.conftest import _start, write_project


class Api:
    """GET /orders?updated_since=…&page=…&per_page=… answering {"data": [...]}; a 429 when told to."""

    def __init__(self, n: int) -> None:
        self.orders: list[dict[str, Any]] = [
            {
                "id": i,
                "total": i * 1.5,
                "customer": {"email": f"c{i}@x.io"},
                "updated_at": f"2026-11-01T00:{i // 60:02d}:{i % 60:02d}Z",
            }
            for i in range(1, n + 1)
        ]
        self.calls: list[dict[str, str]] = []
        self.busy_on_page: int | None = None  # one 429 on this page
        self.always_busy_page: int | None = None  # a 429 every time on this page

    async def handle(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.calls.append(q)
        page = int(q.get("page", 1))
        if self.always_busy_page == page:
            return web.json_response({"error": "busy"}, status=429, headers={"Retry-After": "0"})
        if self.busy_on_page == page:
            self.busy_on_page = None
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "1"})
        since = q.get("updated_since")
        rows = sorted(
            (o for o in self.orders if since is None or o["updated_at"] >= since),
            key=lambda o: o["updated_at"],
        )
        size = int(q.get("per_page", 100))
        return web.json_response({"data": rows[(page - 1) * size : page * size]})


async def serve(n: int) -> tuple[Api, Any, str]:
    api = Api(n)
    app = web.Application()
    app.router.add_get("/orders", api.handle)
    runner, url = await _start(app)
    return api, runner, url


FLOW = """
purpose: Orders from the shop's API into the reporting file.
owner: data
trigger: {manual: true}
steps:
  - map: {id: id, total: total, email: customer.email, updated_at: updated_at}
batch:
  from:
    system: shop
    api: {path: /orders, items_path: data, pagination: {type: page, size: 50}, max_pages: 1000}
    api_since_param: updated_since
  to: {system: report, table: orders}
  mode: merge
  key: [id]
  cursor: {column: updated_at, lookback: 10s}
"""


def project(root: Path, url: str, flow: str = FLOW) -> None:
    systems = f"shop: {{kind: http, owner: ops, url: '{url}', allow_private_network: true}}\n"
    systems += "report: {kind: sqlite, owner: data, path: report.db}\n"
    write_project(root, {"systems.yaml": systems, "flows/orders.yaml": flow})
    sqlite3.connect(root / "report.db").close()


async def run(root: Path) -> RunReport:
    p = load_or_raise(root)
    return await run_flow(p, open_resolver_for(root), p.flows["orders"])


async def test_pages_into_a_table_with_a_429_waited_out_then_only_what_changed(tmp_path):
    api, runner, url = await serve(420)
    try:
        project(tmp_path, url)
        api.busy_on_page = 3
        first = await run(tmp_path)
        assert (first.status, first.read, first.inserted) == ("ok", 420, 420), first.error
        assert first.cursor_to == "2026-11-01T00:07:00Z"
        pages = [c.get("page") for c in api.calls]
        assert pages.count("3") == 2  # the 429, then the same page again
        assert "updated_since" not in api.calls[-1]
        with sqlite3.connect(tmp_path / "report.db") as c:
            assert c.execute("SELECT id, total, email FROM orders WHERE id = 7").fetchone() == (
                7,
                10.5,
                "c7@x.io",
            )

        api.calls.clear()
        api.orders[4]["total"] = 99.0
        api.orders[4]["updated_at"] = "2026-11-02T00:00:00Z"
        second = await run(tmp_path)
        # Sent back the last mark less the 10 s lookback: the 11 records it covers plus the changed one.
        assert api.calls[0]["updated_since"] == "2026-11-01T00:06:50Z"
        assert (second.status, second.read, second.updated, second.unchanged) == ("ok", 12, 1, 11), (
            second.error
        )
        assert second.cursor_to == "2026-11-02T00:00:00Z"
        with sqlite3.connect(tmp_path / "report.db") as c:
            assert c.execute("SELECT count(*) FROM orders").fetchone() == (420,)
            assert c.execute("SELECT total FROM orders WHERE id = 5").fetchone() == (99.0,)
    finally:
        await runner.cleanup()


async def test_a_record_with_a_field_no_column_has_is_quarantined_and_the_rest_go_on(tmp_path):
    api, runner, url = await serve(60)
    try:
        api.orders[55]["coupon"] = "X"  # page 2: the columns come from page 1
        api.orders[56]["id"] = "not a number"
        project(tmp_path, url)
        report = await run(tmp_path)
        assert (report.status, report.read, report.inserted, report.quarantined) == ("ok", 60, 58, 2), (
            report.error
        )
        assert [s["reason"] for s in report.samples] == [
            "page 2, record 6: field(s) coupon not among the columns",
            "page 2, record 7: id is not int",
        ]
    finally:
        await runner.cleanup()


async def test_an_api_that_keeps_answering_429_fails_the_run_and_writes_nothing(tmp_path, monkeypatch):
    import patchbay.connectors.http_bulk as http_bulk

    monkeypatch.setattr(http_bulk, "_TRIES", 2)
    api, runner, url = await serve(120)
    try:
        project(tmp_path, url)
        api.always_busy_page = 2
        report = await run(tmp_path)
        assert report.status == "failed" and "HTTP 429" in (report.error or "")
        with sqlite3.connect(tmp_path / "report.db") as c:
            assert c.execute("SELECT count(*) FROM sqlite_master WHERE name = 'orders'").fetchone() == (0,)
    finally:
        await runner.cleanup()


def test_check_knows_what_an_api_side_needs(tmp_path):
    project(tmp_path, "https://shop.example", FLOW.replace("    api_since_param: updated_since\n", ""))
    _, problems = load_project(tmp_path)
    text = "\n".join(str(p) for p in problems)
    assert "a cursor on an API needs `api_since_param`" in text
    bad = FLOW.replace("max_pages: 1000", "max_pages: 0")
    project(tmp_path, "https://shop.example", bad)
    text = "\n".join(str(p) for p in load_project(tmp_path)[1])
    assert "batch.from.api.max_pages: Input should be greater than or equal to 1" in text
    elsewhere = FLOW.replace("path: /orders", "path: '@evil.example/orders'")
    project(tmp_path, "https://shop.example", elsewhere)
    text = "\n".join(str(p) for p in load_project(tmp_path)[1])
    assert "batch.from.api.path: '@evil.example/orders' must start with /" in text
    swapped = FLOW.replace("to: {system: report, table: orders}", "to: {system: shop, table: orders}")
    project(tmp_path, "https://shop.example", swapped)
    text = "\n".join(str(p) for p in load_project(tmp_path)[1])
    assert "an http system is a batch source only" in text
