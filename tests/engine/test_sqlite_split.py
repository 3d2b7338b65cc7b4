"""Hubs with roles on one SQLite file (one machine): any number of web processes, one worker, one scheduler.
A web node's deliveries wake the worker node at once (unix datagram sockets beside the store), a pause made
on the web node reaches the worker, a second process wanting the worker or scheduler role is refused, and
write transactions of several processes are serialised by an flock, not SQLite's sleeping busy handler."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.engine.roles import ALL_ROLES, SCHEDULER, WEB, WORKER, Node
from patchbay.store.common import Heard, intake_lines, wake_lines
from patchbay.store.sqlite import SqliteStore, StoreLocked
from patchbay.store.sqlite_wake import Wake, socket_name, wake_dir
from tests.conftest import Sink, eventually, lead_project, resolver


async def hub_of(root: Path, node: Node) -> Hub:
    hub = Hub(load_or_raise(root), resolver=resolver(), node=node)
    await hub.start()
    return hub


@pytest.fixture
async def pair(tmp_path: Path, sink: Sink) -> AsyncIterator[tuple[Hub, Hub]]:
    root = lead_project(tmp_path, sink.url)
    web = await hub_of(root, Node("web-a", frozenset({WEB})))
    worker = await hub_of(root, Node("worker-a", frozenset({WORKER, SCHEDULER})))
    try:
        yield web, worker
    finally:
        await web.stop()
        await worker.stop()


def lead(n: int) -> tuple[bytes, dict[str, str]]:
    record = {"email": f"lead-{n}@example.com", "first_name": "x"}
    return orjson.dumps(record), record


def quiet(hub: Hub) -> None:
    """No state watcher: a worker then finds new rows only by a wake-up or its own rescan each second."""
    assert hub._watch is not None
    hub._watch.cancel()


async def test_a_web_nodes_deliveries_wake_the_worker_node_at_once(pair: tuple[Hub, Hub], sink: Sink) -> None:
    web, worker = pair
    quiet(worker)
    assert web.store is not None and web.store.shared  # several processes may use the file: it announces
    assert not web.flows["lead-capture"].workers["crm"].running  # a web node sends nothing itself
    await asyncio.sleep(1.2)  # the worker has settled into its idle wait
    waits = []
    for n in range(8):
        sent = time.monotonic()
        await web.ingest("lead-capture", *lead(n))
        await sink.wait_for(n + 1, timeout=5)
        waits.append(time.monotonic() - sent)
        await asyncio.sleep(0.37)  # a different point of the worker's one-second rescan each time
    # Without the wake-up a delivery waits for the rescan: half a second on average.
    assert statistics.median(waits) < 0.25, waits


async def test_a_pause_on_the_web_node_reaches_the_worker_node(pair: tuple[Hub, Hub], sink: Sink) -> None:
    web, worker = pair
    worker.watch_s = 60.0  # the watcher looks only when another process says a state changed
    await asyncio.sleep(0.6)  # (past its first half-second wait)
    await web.set_state("lead-capture", "crm", "paused")
    w = worker.flows["lead-capture"].workers["crm"]
    deadline = time.monotonic() + 3
    while w.state != "paused":
        assert time.monotonic() < deadline, "the worker node never saw the pause"
        await asyncio.sleep(0.02)
    await web.ingest("lead-capture", *lead(3))
    await asyncio.sleep(0.5)
    assert not sink.keys  # paused on the worker node too
    await web.set_state("lead-capture", "crm", "active")
    await sink.wait_for(1, timeout=5)


async def test_one_worker_and_one_scheduler_per_file_any_number_of_web(tmp_path: Path, sink: Sink) -> None:
    root = lead_project(tmp_path, sink.url)
    worker = await hub_of(root, Node("w1", frozenset({WORKER, SCHEDULER})))
    webs = [await hub_of(root, Node(f"web{i}", frozenset({WEB}))) for i in (1, 2, 3)]
    try:
        with pytest.raises(StoreLocked) as second:
            await hub_of(root, Node("w2", frozenset({WORKER})))
        msg = str(second.value)
        assert "needs the worker role of this SQLite file, and another process runs it" in msg
        assert f"pid {os.getpid()}, node w1" in msg  # who holds it
        assert "--role web" in msg and "patchbay store copy --to postgresql://" in msg
        with pytest.raises(StoreLocked, match="needs the scheduler role"):
            await hub_of(root, Node("s2", frozenset({SCHEDULER})))
        with pytest.raises(StoreLocked, match="needs the worker role"):  # a plain serve: every role
            await hub_of(root, Node("all", ALL_ROLES))
        assert len(webs) == 3
    finally:
        await worker.stop()
    try:  # web processes alone: a CLI command wanting the file to itself is refused
        cli = SqliteStore(root / ".patchbay" / "patchbay.db")
        try:
            with pytest.raises(StoreLocked, match="a `patchbay serve` process is using it"):
                cli.lock()
        finally:
            await cli.close()
    finally:
        for h in webs:
            await h.stop()
    # Stopped cleanly: the roles are free again, for a plain serve too; a second plain serve is refused.
    everything = await hub_of(root, Node("all", ALL_ROLES))
    try:
        with pytest.raises(StoreLocked, match="another `patchbay serve` is using it"):
            await hub_of(root, Node("all-2", ALL_ROLES))
        web = await hub_of(root, Node("web4", frozenset({WEB})))  # a web process beside a plain serve
        await web.stop()
    finally:
        await everything.stop()


async def test_a_backlog_report_reaches_the_other_processes_intake_and_wakes_no_worker(
    tmp_path: Path,
) -> None:
    store = tmp_path / "patchbay.db"
    loop = asyncio.get_running_loop()
    woken: list[tuple[str, bool]] = []
    told: list[tuple[str, bool]] = []
    a, b = Wake(store, "a"), Wake(store, "b")
    b.listen(Heard(loop, lambda f, r: woken.append((f, r)), lambda who, behind: told.append((who, behind))))
    try:
        await eventually(lambda: woken == [("", True)], what="b listening")
        a.send(intake_lines("a", ["lead-capture/crm"], ["orders/erp"]))
        await eventually(lambda: len(told) >= 2, what="b told")
        assert told == [("lead-capture/crm on a", True), ("orders/erp on a", False)]
        await asyncio.sleep(0.05)
        assert woken == [("", True)]  # no worker is woken by it
    finally:
        for w in (a, b):
            w.close()


async def test_a_process_that_does_not_deliver_hears_rescans_and_backlogs_but_no_new_deliveries(
    tmp_path: Path,
) -> None:
    """Every listener was sent every line, so web processes woke each other at every accepted group."""
    store = tmp_path / "patchbay.db"
    loop = asyncio.get_running_loop()
    heard: dict[str, list[tuple[str, bool]]] = {"web": [], "worker": []}
    told: list[tuple[str, bool]] = []
    sender, web, worker = Wake(store, "web1"), Wake(store, "web2"), Wake(store, "worker")
    web.listen(
        Heard(loop, lambda f, r: heard["web"].append((f, r)), lambda who, b: told.append((who, b))),
        deliveries=False,
    )
    worker.listen(Heard(loop, lambda f, r: heard["worker"].append((f, r))))
    try:
        await eventually(
            lambda: heard == {"web": [("", True)], "worker": [("", True)]}, what="both listening"
        )
        assert sorted(os.listdir(wake_dir(store))) == ["web2+quiet.sock", "worker.sock"]
        sender.send(
            wake_lines(["lead-capture"], rescan=False)
            + wake_lines(["orders"], rescan=True)
            + intake_lines("worker", ["lead-capture/crm"], [])
        )
        await eventually(lambda: len(heard["worker"]) >= 3 and len(told) >= 1, what="both told")
        await asyncio.sleep(0.05)
        assert heard["worker"][1:] == [("lead-capture", False), ("orders", True)]
        assert heard["web"][1:] == [("orders", True)]  # a rescan: states changed
        assert told == [("lead-capture/crm on worker", True)]
    finally:
        for w in (sender, web, worker):
            w.close()


async def test_an_announcement_reaches_every_listener_and_dead_sockets_are_removed(tmp_path: Path) -> None:
    store = tmp_path / "deep" / ("x" * 90) / "patchbay.db"  # longer than a socket address may be
    store.parent.mkdir(parents=True)
    loop = asyncio.get_running_loop()
    heard: dict[str, list[tuple[str, bool]]] = {"a": [], "b": []}
    a, b, c = Wake(store, "a"), Wake(store, "b"), Wake(store, "host:12/3")
    a.listen(Heard(loop, lambda f, r: heard["a"].append((f, r))))
    b.listen(Heard(loop, lambda f, r: heard["b"].append((f, r))))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # a process that died without removing its socket
    cwd = os.getcwd()
    os.chdir(wake_dir(store))  # (created by the first listen)
    try:
        dead.bind(socket_name("gone"))
    finally:
        os.chdir(cwd)
    dead.close()
    assert (wake_dir(store) / "gone.sock").exists()
    try:
        await asyncio.sleep(0.05)
        assert heard == {"a": [("", True)], "b": [("", True)]}  # listening starts with a rescan of everything
        c.send(wake_lines(["lead-capture", "orders"], rescan=False))
        a.send(wake_lines(["lead-capture"], rescan=True))
        deadline = time.monotonic() + 2
        while len(heard["b"]) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert heard["b"][1:] == [("lead-capture", False), ("orders", False), ("lead-capture", True)]
        assert heard["a"][1:] == [("lead-capture", False), ("orders", False)]  # not its own announcement
        assert not (wake_dir(store) / "gone.sock").exists()
    finally:
        for w in (a, b, c):
            w.close()
    assert sorted(p.name for p in wake_dir(store).iterdir()) == []


async def test_a_close_while_the_listener_checks_its_socket_leaves_no_socket_behind(tmp_path: Path) -> None:
    """The listener checks, at each quiet half second, that its socket file is still its own (and binds it
    again if not). A close landing between that check's start and its answer removed the file, the check
    then found it gone and bound a new one, which the close never removed."""
    checking = threading.Event()

    class Preempted(Wake):
        def _still_bound(self) -> bool:
            if not checking.is_set():
                checking.set()
                time.sleep(0.3)  # the listener loses the CPU here, and the close runs meanwhile
            return super()._still_bound()

    store = tmp_path / "patchbay.db"
    w = Preempted(store, "b")
    w.listen(Heard(asyncio.get_running_loop(), lambda f, r: None))
    assert await asyncio.to_thread(checking.wait, 2.0)
    w.close()
    assert sorted(p.name for p in wake_dir(store).iterdir()) == []


def test_writes_of_two_processes_are_serialised_by_the_write_lock(tmp_path: Path) -> None:
    """While one writer holds `<store>.write.lock`, another store's writer waits on it, and goes on the moment
    it is released (not after a busy-handler sleep)."""
    import fcntl

    path = tmp_path / "patchbay.db"
    held = threading.Event()

    async def main() -> float:
        store = SqliteStore(path)
        try:
            fd = os.open(str(path) + ".write.lock", os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" holds it
            held.set()
            write = asyncio.ensure_future(
                store.write(lambda c: c.execute("INSERT INTO meta(key, value) VALUES('k', 'v')"))
            )
            await asyncio.sleep(0.3)
            assert not write.done()  # waiting for the lock
            released = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            await write
            return time.monotonic() - released
        finally:
            await store.close()

    assert asyncio.run(main()) < 0.1


async def test_a_listener_whose_socket_was_removed_binds_it_again(tmp_path: Path) -> None:
    """Another process may remove a live socket, taking it for the dead one of the same node id that it found
    refusing just before: the listener notices within half a second and binds it again."""
    store = tmp_path / "patchbay.db"
    heard: list[tuple[str, bool]] = []
    a, b = Wake(store, "a"), Wake(store, "b")
    b.listen(Heard(asyncio.get_running_loop(), lambda f, r: heard.append((f, r))))
    try:
        os.unlink(wake_dir(store) / "b.sock")
        deadline = time.monotonic() + 3
        while (
            len(heard) < 2 and time.monotonic() < deadline
        ):  # the first rescan, then the one after rebinding
            await asyncio.sleep(0.05)
        assert heard == [("", True), ("", True)]
        a.send(wake_lines(["lead-capture"], rescan=False))
        while len(heard) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert heard[2] == ("lead-capture", False)
    finally:
        a.close()
        b.close()


async def test_a_listener_stops_at_once_when_closed_and_wakes_nobody(tmp_path: Path) -> None:
    """Closing ends the listener's wait for its next datagram (every hub's stop does it): at once, not at its
    half-second timeout, and without a last wake of its own."""
    heard: list[tuple[str, bool]] = []
    w = Wake(tmp_path / "patchbay.db", "a")
    w.listen(Heard(asyncio.get_running_loop(), lambda f, r: heard.append((f, r))))
    await asyncio.sleep(0.05)
    assert heard == [("", True)]  # listening (its first rescan)
    took = []
    for _ in range(5):  # a timeout would show as ~0.25 s on average
        started = time.monotonic()
        w.close()
        took.append(time.monotonic() - started)
        w = Wake(tmp_path / "patchbay.db", "a")
        w.listen(Heard(asyncio.get_running_loop(), lambda f, r: heard.append((f, r))))
        await asyncio.sleep(0.05)
    w.close()
    await asyncio.sleep(0.05)
    assert max(took) < 0.1, took
    assert heard == [("", True)] * 6  # each listener's first rescan, and nothing from a close
    assert list(wake_dir(tmp_path / "patchbay.db").iterdir()) == []
