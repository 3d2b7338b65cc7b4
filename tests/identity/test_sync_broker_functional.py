"""A sync flow triggered by a broker: a "marketing" system's change messages on a RabbitMQ queue, synced
with a PostgreSQL "crm" table (polled the other way), through a real hub.

Marketing publishes every change of a contact as a JSON message on its change queue, its own API's
included (as most do); the hub's writes to marketing are commands published on a second queue, which
the test applies as marketing would and publishes back as a change: the echo must be recognised.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import IN_CI, eventually, require_service, write_project
from tests.identity.helpers import (
    CRM_SYSTEM,
    PG,
    create_crm_table,
    crm_sync,
    customer,
    deliveries,
    drop_crm_table,
    pg_connect,
    sync_files,
)

AMQP = "amqp://guest:guest@127.0.0.1:5672/"


class Setup:
    """A crm table (stamping its own updated_at), marketing's change queue and its command queue."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.crm = f"pb_crm_{tag}"
        self.changes = f"pb-mk-changes-{tag}"
        self.commands = f"pb-mk-commands-{tag}"
        self.published = 0

    async def open(self) -> Setup:
        import aio_pika

        self.pg = await pg_connect()
        await create_crm_table(self.pg, self.crm, "email text, name text, plan text, phone text")
        self.aio_pika = aio_pika
        self.amqp = await aio_pika.connect(AMQP)
        self.channel = await self.amqp.channel()
        await self.channel.declare_queue(self.changes, durable=True)
        await self.channel.declare_queue(self.commands, durable=True)
        return self

    async def publish(self, contact: dict[str, Any]) -> str:
        """Marketing announces a change of a contact: one message, its own id in Idempotency-Key."""
        self.published += 1
        key = f"chg-{self.published}"
        await self.channel.default_exchange.publish(
            self.aio_pika.Message(orjson.dumps(contact), headers={"Idempotency-Key": key}),
            routing_key=self.changes,
        )
        return key

    async def ready(self, queue: str) -> int:
        """Messages waiting in a queue (not handed to a consumer, or handed back)."""
        q = await self.channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count)

    async def commands_sent(self) -> list[Any]:
        """Take the hub's commands to marketing published so far."""
        q = await self.channel.get_queue(self.commands)
        out = []
        while (m := await q.get(fail=False)) is not None:
            await m.ack()
            out.append(orjson.loads(m.body))
        return out

    async def crm_rows(self) -> list[tuple[Any, ...]]:
        cur = await self.pg.execute(f'SELECT id, email, name, plan, phone FROM "{self.crm}" ORDER BY id')
        return list(await cur.fetchall())

    async def close(self) -> None:
        await self.channel.queue_delete(self.changes)
        await self.channel.queue_delete(self.commands)
        await self.amqp.close()
        await drop_crm_table(self.pg, self.crm)
        await self.pg.close()


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    require_service("PostgreSQL", PG["host"], PG["port"])
    require_service("RabbitMQ", "127.0.0.1", 5672)
    if not IN_CI:
        pytest.importorskip("psycopg", reason="the postgres extra is not installed")
        pytest.importorskip("aio_pika", reason="the amqp extra is not installed")
    s = await Setup().open()
    yield s
    await s.close()


FIELDS = ("email", "name", "plan", "phone")


def project(root: Path, s: Setup) -> Path:
    entity = customer(
        {"id": "id", "fields": {f: f for f in FIELDS}}, {"id": "id", "fields": {f: f for f in FIELDS}}
    )
    systems = {
        "crm": CRM_SYSTEM,
        "marketing": {
            "kind": "rabbitmq",
            "owner": "growth",
            "host": "127.0.0.1",
            "allow_private_network": True,
        },
    }
    dests = [
        {
            "name": "crm_create",
            "system": "crm",
            "when": "op == 'create'",
            "table": s.crm,
            "write_mode": "insert",
            "columns": {c: f"record.{c}" for c in FIELDS},
        },
        {
            "name": "crm_update",
            "system": "crm",
            "when": "op == 'update'",
            "table": s.crm,
            "write_mode": "update",
            "key": ["id"],
            "columns": {"id": "id", "plan": "record.plan", "phone": "record.phone"},
            "expect": {"plan": "expected.plan", "phone": "expected.phone"},
        },
        {
            "name": "mk_command",
            "system": "marketing",
            "routing_key": s.commands,
            "body": {"op": "op", "id": "id", "fields": "fields"},
        },
    ]
    flows = {
        "crm_sync": crm_sync(s.crm, dests),
        "marketing_sync": {
            "purpose": "marketing's change messages reach the CRM",
            "owner": "ops",
            "sync": "customer",
            "trigger": {"source": {"system": "marketing", "queue": s.changes, "max_wait_ms": 20}},
            "destinations": dests,
        },
    }
    return write_project(root, sync_files(systems, entity, flows))


async def events(hub: Any, flow: str) -> int:
    return int(
        await hub.store.read(
            lambda c: c.execute("SELECT COUNT(*) FROM events WHERE flow = ?", (flow,)).fetchone()[0]
        )
    )


async def crm_polls(hub: Any, n: int) -> None:
    """Wait until the CRM's poll ran `n` more times (each reads back what the hub wrote there)."""

    async def runs() -> int:
        rows = await hub.store.read(
            lambda c: c.execute("SELECT runs FROM schedules WHERE flow = 'crm_sync'").fetchall()
        )
        return int(rows[0][0]) if rows else 0

    start = await runs()

    async def more() -> bool:
        return await runs() >= start + n

    await eventually(more, timeout=20, what=f"{n} more polls of the CRM")


async def test_broker_changes_link_create_then_update_once_and_their_echo_is_nothing(
    tmp_path, setup: Setup, start_hub
):
    s = setup
    hub = await start_hub(project(tmp_path, s))
    ada = {"id": "m-1", "email": " Ada@Example.com", "name": "Ada", "plan": "pro", "phone": "111"}
    await s.publish(ada)

    async def crm_count(n: int) -> bool:
        return len(await s.crm_rows()) == n

    await eventually(lambda: crm_count(1), timeout=20, what="marketing's customer created in the CRM")
    # The CRM's poll reads the hub's own insert back: that links the CRM's id, and is no change.
    await crm_polls(hub, 3)
    [row] = await s.crm_rows()
    assert row[1:] == (" Ada@Example.com", "Ada", "pro", "111")
    assert await deliveries(hub) == {"crm_create": 1}
    assert await s.commands_sent() == []  # nothing went back to marketing
    stats = await hub.store.identity_stats("customer")
    assert stats["identities"] == 1 and stats["linked"] == {"crm": 1, "marketing": 1}
    assert stats["pending"]["waiting"] == 0
    assert await s.ready(s.changes) == 0  # consumed and acknowledged

    # A second message for the same customer: an update of the CRM's row, not a second row.
    await s.publish({**ada, "plan": "enterprise", "phone": "222"})

    async def updated() -> bool:
        rows = await s.crm_rows()
        return len(rows) == 1 and rows[0][3:] == ("enterprise", "222")

    await eventually(updated, timeout=20, what="the second message applied to the CRM's row")
    await crm_polls(hub, 3)
    assert len(await s.crm_rows()) == 1
    assert await deliveries(hub) == {"crm_create": 1, "crm_update": 1}
    assert await s.commands_sent() == []

    # The other way: the CRM renames the customer; marketing gets one command, applies it and announces
    # the change on its queue like any other: that echo gives nothing.
    await s.pg.execute(f'UPDATE "{s.crm}" SET name = %s', ["Ada L."])

    async def commanded() -> bool:
        return await s.ready(s.commands) == 1

    await eventually(commanded, timeout=20, what="the rename sent to marketing")
    [command] = await s.commands_sent()
    assert command == {"op": "update", "id": "m-1", "fields": {"name": "Ada L."}}
    await s.publish({**ada, "plan": "enterprise", "phone": "222", "name": "Ada L."})

    async def echo_read() -> bool:
        return await events(hub, "marketing_sync") == 3 and await s.ready(s.changes) == 0

    await eventually(echo_read, timeout=20, what="marketing's echo of the rename consumed")
    await crm_polls(hub, 2)
    assert await deliveries(hub) == {"crm_create": 1, "crm_update": 1, "mk_command": 1}
    assert await s.commands_sent() == []
    assert await hub.store.conflicts("customer") == []
    [row] = await s.crm_rows()
    assert row[1:] == (" Ada@Example.com", "Ada L.", "enterprise", "222")


async def test_a_change_message_is_acknowledged_only_after_its_commit(tmp_path, setup: Setup, start_hub):
    s = setup
    hub = await start_hub(project(tmp_path, s))
    ada = {"id": "m-1", "email": "ada@example.com", "name": "Ada", "plan": "pro", "phone": "111"}
    await s.publish(ada)

    async def crm_count(n: int) -> bool:
        return len(await s.crm_rows()) == n

    await eventually(lambda: crm_count(1), timeout=20, what="the customer created in the CRM")
    fr = hub.hub.flows["marketing_sync"]
    assert fr.source is not None
    settled = fr.source.settled

    # The entity is busy (another step holds its lock): the next message is handed to the hub, and its
    # commit waits. It is neither committed nor acknowledged.
    sync = hub.hub.syncs["customer"]
    await sync.lock.acquire()
    try:
        await s.publish({**ada, "phone": "222"})

        async def handed_over() -> bool:
            return await s.ready(s.changes) == 0

        await eventually(handed_over, timeout=20, what="the message handed to the hub")
        assert await events(hub, "marketing_sync") == 1
        assert fr.source.settled == settled
        # The connection drops while the commit waits: the broker takes the message back, which it
        # would not do had it been acknowledged.
        await fr.source._connection.close()

        async def back() -> bool:
            return await s.ready(s.changes) == 1

        await eventually(back, timeout=20, what="the unacknowledged message back in the queue")
    finally:
        sync.lock.release()

    # The commit goes through; its acknowledgement cannot (the channel is gone): the broker hands the
    # message out again on the next connection, and its id drops the copy. One update, one event.
    async def updated() -> bool:
        rows = await s.crm_rows()
        return rows[0][4] == "222" and await s.ready(s.changes) == 0 and fr.source.connections >= 2

    await eventually(updated, timeout=30, what="the update committed and the redelivery consumed")
    await crm_polls(hub, 2)
    assert await events(hub, "marketing_sync") == 2
    assert await deliveries(hub) == {"crm_create": 1, "crm_update": 1}
    assert len(await s.crm_rows()) == 1
    assert await s.commands_sent() == []
