"""Disk full, for real: SQLite's SQLITE_FULL from the writer's own connection, and a full tmpfs under a
real `patchbay serve`. Ingest answers 503 JSON with Retry-After, /readyz says why, one log line per
condition, and a delivery whose result cannot be recorded is not sent again."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from patchbay.errors import StoreUnavailable
from tests.cluster.harness import free_port, start_serve
from tests.conftest import IN_CI, SECRET_WHSEC, eventually, lead_project

NOTES = "n" * 20_000  # a payload that needs new pages (overflow pages) wherever it is written


def limit_pages(conn: Any) -> None:
    """The writer's connection may not grow the file: SQLite answers SQLITE_FULL, as on a full disk."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}").fetchone()


def lift_limit(conn: Any) -> None:
    conn.execute("PRAGMA max_page_count=4294967294").fetchone()


async def lift(store: Any) -> None:
    """Room again. The pragma may share a group commit with a write that still fails for want of room
    (the worker records its held result every second); that group fails as a whole, so try again."""
    for _ in range(40):
        try:
            await store.write(lift_limit)
            return
        except StoreUnavailable:
            await asyncio.sleep(0.05)
    raise AssertionError("the limit could not be lifted")


def filler(conn: Any) -> None:
    conn.execute(
        "INSERT INTO attempts(delivery_id, n, started_at, latency_ms, outcome, excerpt)"
        " VALUES(-1, 0, 0, 0, 'filler', ?)",
        ("f" * 600,),
    )


async def fill_up(store: Any) -> None:
    """Rows that take the room left in the existing pages, until the limit stops them."""
    for _ in range(10_000):
        try:
            await store.write(filler)
        except StoreUnavailable:
            return
    raise AssertionError("the store never filled up")


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def test_ingest_answers_503_with_retry_after_and_readyz_follows_the_writes(
    tmp_path, sink, start_hub, caplog
):
    caplog.set_level(logging.INFO)
    rh = await start_hub(lead_project(tmp_path, sink.url))
    lead = {"email": "ada@example.com", "first_name": "Ada", "notes": NOTES}
    status, accepted = await rh.post("/hooks/lead-capture", lead)
    assert status == 202

    # The delivery's result is on disk before the disk fills: this test is about ingest, and a result
    # recorded in the same group as the limit would fail that group (and this test) at random.
    async def delivered() -> bool:
        return (await rh.run(accepted["event_id"]))["status"] == "delivered"

    await eventually(delivered, what="the first lead delivered and recorded")
    await rh.store.write(limit_pages)
    await fill_up(rh.store)

    for _ in range(5):
        status, body = await rh.post("/hooks/lead-capture", lead)
        assert status == 503, body
        assert body["error"] == "store_unavailable" and "the disk is full" in body["message"]
        assert str(rh.store.path) not in body["message"]  # no server paths to a sender
    async with aiohttp.ClientSession() as s, s.post(rh.url + "/hooks/lead-capture", data=b"{}") as r:
        pass  # unsigned: refused before the store, whatever its state
    assert r.status == 401
    status, ready = await get(rh.url + "/readyz")
    assert status == 503 and "the disk is full" in ready["reason"], ready
    headers = await _post_headers(rh, lead)
    assert headers["Retry-After"] == "30" and headers["Content-Type"].startswith("application/json")

    failing = [r for r in caplog.records if "fails: the disk is full" in r.getMessage()]
    assert len(failing) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "no traceback per request"
    assert await rh.count() == 1

    await lift(rh.store)  # room again: the next write succeeds
    assert (await get(rh.url + "/readyz"))[0] == 200
    assert (await rh.post("/hooks/lead-capture", lead))[0] == 202
    assert await rh.count() == 2
    again = [r for r in caplog.records if "succeeds again" in r.getMessage()]
    assert len(again) == 1


async def _post_headers(rh: Any, body: dict[str, Any]) -> dict[str, str]:
    from patchbay.records import new_id
    from patchbay.security.webhook_auth import sign_standard_webhooks

    raw = orjson.dumps(body)
    h = {"Content-Type": "application/json"}
    h.update(sign_standard_webhooks(SECRET_WHSEC, new_id("msg"), int(time.time()), raw))
    async with aiohttp.ClientSession() as s, s.post(rh.url + "/hooks/lead-capture", data=raw, headers=h) as r:
        assert r.status == 503
        return dict(r.headers)


async def test_a_delivery_whose_result_cannot_be_recorded_is_not_sent_again(
    tmp_path, sink, start_hub, caplog
):
    gate = asyncio.Event()

    async def held_201(request, rec):
        await gate.wait()
        return (201, {}, "x" * 4000)

    sink.default = held_201
    rh = await start_hub(
        lead_project(tmp_path, sink.url, delivery={"retry": {"schedule": ["200ms"] * 5, "jitter": 0}})
    )
    status, body = await rh.post("/hooks/lead-capture", {"email": "ada@example.com"})
    assert status == 202
    await eventually(lambda: len(sink.received) == 1, what="the first send")
    await rh.store.write(limit_pages)
    await fill_up(rh.store)
    gate.set()  # the destination says 201; the store cannot record it

    # The old worker sent it again every 0.5 s; now the delivery stays leased until its 201 is on disk.
    await asyncio.sleep(3.0)
    assert len(sink.received) == 1, [r.at for r in sink.received]
    run = await rh.run(body["event_id"])
    assert run["deliveries"][0]["status"] == "pending" and run["deliveries"][0]["attempts"] == 0
    assert (await get(rh.url + "/readyz"))[0] == 503
    waits = [r for r in caplog.records if "could not be recorded" in r.getMessage()]
    assert len(waits) == 1

    await lift(rh.store)

    async def delivered() -> bool:
        run = await rh.run(body["event_id"])
        return run["deliveries"][0]["status"] == "delivered"

    await eventually(delivered, what="the held 201 recorded")
    run = await rh.run(body["event_id"])
    assert run["deliveries"][0]["attempts"] == 1 and run["status"] == "delivered"
    assert len(sink.received) == 1 and sink.keys == {run["deliveries"][0]["idempotency_key"]: 1}
    assert (await get(rh.url + "/readyz"))[0] == 200


# ----------------------------------------------------------------------------- a real full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs, mounted for this test (root only); skipped with the reason when mounting is refused."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, and mounting needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=700", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        msg = f"cannot mount a tmpfs: {res.stderr.strip()}"
        if IN_CI and "permission" not in res.stderr.lower() and "not permitted" not in res.stderr.lower():
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(where: Path) -> Path:
    path = where / "filler"
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return path


async def test_a_full_disk_under_a_real_serve(tmp_path, small_disk, sink):
    gate = asyncio.Event()

    async def held_201(request, rec):
        if rec.body.get("properties", {}).get("email") == "held@example.com":
            await gate.wait()
        return 201

    sink.default = held_201
    port = free_port()
    root = lead_project(
        tmp_path / "project",
        sink.url,
        hub={"port": port, "store": str(small_disk / "patchbay.db")},
        delivery={"retry": {"schedule": ["200ms"] * 5, "jitter": 0}},
    )
    proc = await start_serve(root, port)
    url = f"http://127.0.0.1:{port}"
    try:
        hub = _Client(url)
        assert (await hub.post({"email": "first@example.com"}))[0] == 202
        status, held = await hub.post({"email": "held@example.com"})
        assert status == 202
        await eventually(lambda: len(sink.received) == 2, what="the held send")
        filler_file = fill_disk(small_disk)

        statuses = []
        for n in range(300):  # the WAL may still have room for a few; then writes fail
            status, body = await hub.post({"email": f"lead-{n}@example.com", "notes": NOTES})
            statuses.append(status)
            if status == 503:
                break
        assert statuses[-1] == 503, statuses
        assert body["error"] == "store_unavailable" and "disk is full" in body["message"], body
        assert (await hub.post({"email": "again@example.com", "notes": NOTES}))[0] == 503
        status, ready = await get(url + "/readyz")
        assert status == 503 and "disk is full" in ready["reason"], ready

        gate.set()  # the held delivery's 201 meets the full disk
        await asyncio.sleep(3.0)
        held_sends = [r for r in sink.received if r.body["properties"]["email"] == "held@example.com"]
        assert len(held_sends) == 1, "sent again while its result could not be recorded"

        filler_file.unlink()
        await eventually(lambda: _ready(url), timeout=15, what="/readyz back to ready")
        assert (await hub.post({"email": "after@example.com"}))[0] == 202
        await sink.wait_for(3)
        held_sends = [r for r in sink.received if r.body["properties"]["email"] == "held@example.com"]
        assert len(held_sends) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    log = (root / "serve.log").read_text()
    assert log.count("fails: the disk is full") == 1, log[-3000:]
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


async def _ready(url: str) -> bool:
    return (await get(url + "/readyz"))[0] == 200


class _Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.n = 0

    async def post(self, body: dict[str, Any]) -> tuple[int, Any]:
        from patchbay.security.webhook_auth import sign_standard_webhooks

        self.n += 1
        raw = orjson.dumps(body)
        h = {"Content-Type": "application/json"}
        h.update(sign_standard_webhooks(SECRET_WHSEC, f"msg_{self.n}_{time.time()}", int(time.time()), raw))
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.url + "/hooks/lead-capture", data=raw, headers=h) as r,
        ):
            return r.status, await r.json()
