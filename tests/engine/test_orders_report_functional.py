"""Issue 11's scenario on the local PostgreSQL: order webhooks become one row per line item and ONE revenue
row per day in a reporting table (aggregate by day -> SQL upsert), corrected in place by a late order."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.conftest import IN_CI, eventually, require_service, write_project

if not IN_CI:
    pytest.importorskip(
        "psycopg", reason="the postgres extra is not installed: pip install 'patchbay[postgres]'"
    )
import psycopg

PARIS = ZoneInfo("Europe/Paris")
SERVER = {"kind": "postgres", "host": "127.0.0.1", "port": 5432, "database": "test", "user": "postgres"}


@pytest.fixture
async def pg() -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], str, str]]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    conn = await psycopg.AsyncConnection.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True)
    tag = uuid.uuid4().hex[:10]
    lines, report = f"order_lines_{tag}", f"daily_revenue_{tag}"
    await conn.execute(
        f"CREATE TABLE {lines} (order_id text, sku text, qty int, amount numeric(12,2), PRIMARY KEY(order_id, sku))"
    )
    await conn.execute(
        f"CREATE TABLE {report} (day date PRIMARY KEY, revenue numeric(12,2), orders int, revision int)"
    )
    try:
        yield conn, lines, report
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {lines}")
        await conn.execute(f"DROP TABLE IF EXISTS {report}")
        await conn.close()


def project(root: Any, lines: str, report: str) -> Any:
    # The window records skip the split (they have no items) and go to the report only.
    per_line = [{"split": {"path": "items", "with": {"order_id": "id"}}, "when": "window == null"}]
    line_columns = {"order_id": "order_id", "sku": "sku", "qty": "qty", "amount": "amount"}
    flow = {
        "purpose": "orders reach the database; revenue per day reaches the report",
        "owner": "finance",
        "trigger": {"webhook": {"system": "shop"}},
        "delivery": {"max_concurrency": 1, "retry": {"schedule": ["100ms"] * 5, "jitter": 0}},
        "steps": [
            {
                "name": "daily_revenue",
                "aggregate": {
                    "window": "1d",
                    "timezone": "Europe/Paris",
                    "time": "created_at",
                    "too_late": "revise",  # past days: counted, and the day's row written again
                    "keep": "30d",
                    "pass_through": True,  # the orders go on to their lines as well
                    "values": {"revenue": {"sum": "total"}, "orders": {"count": True}},
                },
            },
            *per_line,
        ],
        "destinations": [
            {
                "name": "lines",
                "system": "warehouse",
                "when": "window == null",
                "table": lines,
                "write_mode": "upsert",
                "key": ["order_id", "sku"],
                "columns": line_columns,
            },
            {
                "name": "report",
                "system": "warehouse",
                "when": "window != null",
                "table": report,
                "write_mode": "upsert",
                "key": ["day"],
                "columns": {
                    "day": "window.date",
                    "revenue": "revenue",
                    "orders": "orders",
                    "revision": "window.revision",
                },
            },
        ],
    }
    systems = {
        "shop": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "warehouse": {"owner": "data", "allow_private_network": True, **SERVER},
    }
    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            "flows/orders.yaml": yaml.safe_dump(flow, sort_keys=False),
        },
    )


def order(n: int, day: datetime, items: list[tuple[str, int, float]]) -> dict[str, Any]:
    return {
        "id": f"ord-{n}",
        "created_at": (day + timedelta(hours=10, minutes=n)).isoformat(),
        "total": round(sum(q * a for _, q, a in items), 2),
        "items": [{"sku": s, "qty": q, "amount": a} for s, q, a in items],
    }


async def test_orders_become_line_rows_and_one_revenue_row_per_day(tmp_path, start_hub, pg) -> None:
    conn, lines, report = pg
    rh = await start_hub(project(tmp_path, lines, report))
    today = datetime.now(PARIS).replace(hour=0, minute=0, second=0, microsecond=0)
    d1, d2 = today - timedelta(days=2), today - timedelta(days=1)
    orders = [
        order(1, d1, [("tea", 2, 4.5), ("cup", 1, 12.0), ("pot", 1, 30.0)]),  # 3 line items: 51.00
        order(2, d1, [("tea", 1, 4.5)]),
        order(3, d2, [("cup", 4, 12.0), ("tea", 2, 4.5)]),
    ]
    for o in orders:
        status, _ = await rh.post("/hooks/orders", o)
        assert status == 202

    async def report_rows() -> list[tuple[Any, ...]]:
        cur = await conn.execute(
            f"SELECT day::text, revenue::float, orders, revision FROM {report} ORDER BY day"
        )
        return [tuple(r) for r in await cur.fetchall()]

    want = [(d1.date().isoformat(), 55.5, 2, 1), (d2.date().isoformat(), 57.0, 1, 1)]
    await eventually(lambda: _equals(report_rows, want), timeout=20, what=f"report rows {want}")

    cur = await conn.execute(f"SELECT order_id, sku, qty, amount::float FROM {lines} ORDER BY order_id, sku")
    got = [tuple(r) for r in await cur.fetchall()]
    assert got == [
        ("ord-1", "cup", 1, 12.0),
        ("ord-1", "pot", 1, 30.0),
        ("ord-1", "tea", 2, 4.5),
        ("ord-2", "tea", 1, 4.5),
        ("ord-3", "cup", 4, 12.0),
        ("ord-3", "tea", 2, 4.5),
    ]  # one row per line item

    # A late order for the first day: the day's row is written again with the corrected totals.
    status, _ = await rh.post("/hooks/orders", order(4, d1, [("pot", 1, 30.0)]))
    assert status == 202
    want = [(d1.date().isoformat(), 85.5, 3, 2), (d2.date().isoformat(), 57.0, 1, 1)]
    await eventually(lambda: _equals(report_rows, want), timeout=20, what=f"report rows {want}")
    cur = await conn.execute(f"SELECT count(*) FROM {report}")
    assert (await cur.fetchone()) == (2,)  # one row per day, never two


async def _equals(read: Any, want: list[tuple[Any, ...]]) -> bool:
    return bool(await read() == want)
