"""A chained flow on real servers: PostgreSQL polled -> mapped -> RabbitMQ publish + MariaDB upsert, 10,000 rows."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest
import yaml

from tests.conftest import require_service, write_project

pytestmark = pytest.mark.slow
N = 10_000


async def test_postgres_to_rabbitmq_and_mariadb(tmp_path, start_hub):
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("MariaDB", "127.0.0.1", 3306)
    require_service("RabbitMQ", "127.0.0.1", 5672)
    import aio_pika
    import aiomysql
    import psycopg

    tag = uuid.uuid4().hex[:8]
    src_table, dst_table, queue = f"orders_{tag}", f"report_orders_{tag}", f"orders-{tag}"
    pg = await psycopg.AsyncConnection.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True)
    my = await aiomysql.connect(host="127.0.0.1", user="root", password="", db="test", autocommit=True)
    amqp = await aio_pika.connect_robust("amqp://guest:guest@127.0.0.1/")
    channel = await amqp.channel()
    try:
        await pg.execute(
            f"CREATE TABLE {src_table} (id int PRIMARY KEY, customer text NOT NULL, "
            "amount_cents int NOT NULL, updated_at timestamptz NOT NULL)"
        )
        await pg.execute(
            f"INSERT INTO {src_table} SELECT g, 'cust-' || (g % 97), g * 3, "
            f"timestamptz '2026-11-01' + g * interval '1 second' FROM generate_series(1, {N}) g"
        )
        async with my.cursor() as c:
            await c.execute(
                f"CREATE TABLE {dst_table} (order_id INT PRIMARY KEY, customer VARCHAR(64), "
                "amount DECIMAL(12,2), source VARCHAR(16))"
            )
        await channel.declare_queue(queue, durable=False, auto_delete=False)

        write_project(
            tmp_path,
            {
                "patchbay.yaml": "port: 0\n",
                "systems.yaml": yaml.safe_dump(
                    {
                        "shop_db": {
                            "kind": "postgres",
                            "owner": "ops",
                            "host": "127.0.0.1",
                            "database": "test",
                            "user": "postgres",
                            "allow_private_network": True,
                        },
                        "broker": {
                            "kind": "rabbitmq",
                            "owner": "data",
                            "host": "127.0.0.1",
                            "allow_private_network": True,
                        },
                        "reporting": {
                            "kind": "mysql",
                            "owner": "finance",
                            "host": "127.0.0.1",
                            "database": "test",
                            "user": "root",
                            "allow_private_network": True,
                        },
                    }
                ),
                "flows/orders-sync.yaml": yaml.safe_dump(
                    {
                        "purpose": "orders reach the broker and the reporting database",
                        "owner": "data",
                        "trigger": {
                            "schedule": {"every": "1s"},
                            "source": {
                                "system": "shop_db",
                                "table": src_table,
                                "cursor_column": "updated_at",
                                "batch_size": 1000,
                            },
                        },
                        "record_key": "order_id",
                        "steps": [
                            {
                                "map": {
                                    "order_id": "id",
                                    "customer": "upper(customer)",
                                    "amount": "amount_cents",
                                    "source": "'shop'",
                                }
                            }
                        ],
                        "destinations": [
                            {
                                "name": "events",
                                "system": "broker",
                                "routing_key": queue,
                                "delivery": {"max_concurrency": 32},
                            },
                            {
                                "name": "report",
                                "system": "reporting",
                                "table": dst_table,
                                "write_mode": "upsert",
                                "key": ["order_id"],
                                "columns": {
                                    "order_id": "order_id",
                                    "customer": "customer",
                                    "amount": "divide(amount, `100`)",
                                    "source": "source",
                                },
                                "delivery": {"max_concurrency": 16},
                            },
                        ],
                    }
                ),
            },
        )
        # Count what reaches the queue by consuming it: every message body is kept to check contents.
        seen: list[int] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.append(orjson.loads(message.body)["order_id"])
            await message.ack()

        queue_obj = await channel.declare_queue(queue, passive=True)
        await queue_obj.consume(on_message)
        hub = await start_hub(tmp_path)
        deadline = time.monotonic() + 100
        rows = 0
        while not (rows == N and len(seen) >= N):
            assert time.monotonic() < deadline, (
                f"after 100 s: mariadb has {rows} rows, rabbitmq gave {len(seen)}"
            )
            await asyncio.sleep(0.5)
            async with my.cursor() as c:
                await asyncio.wait_for(c.execute(f"SELECT COUNT(*) FROM {dst_table}"), 10)
                (rows,) = await c.fetchone()
        await asyncio.sleep(1)  # nothing extra arrives late
        assert sorted(seen) == list(range(1, N + 1))  # each order once, none missing

        # Contents match, not only counts.
        async with my.cursor() as c:
            await c.execute(
                f"SELECT COUNT(DISTINCT order_id), SUM(amount), MIN(customer), MAX(source) FROM {dst_table}"
            )
            distinct, total, cust, source = await c.fetchone()
        assert distinct == N and float(total) == sum(g * 3 for g in range(1, N + 1)) / 100
        assert cust.startswith("CUST-") and source == "shop"
        counts = await hub.store.read(
            lambda c: dict(c.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall())
        )
        assert counts == {"delivered": 2 * N}
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {src_table}")
        async with my.cursor() as c:
            await c.execute(f"DROP TABLE IF EXISTS {dst_table}")
        await asyncio.wait_for(channel.queue_delete(queue), 10)
        await amqp.close()
        my.close()
        await pg.close()
