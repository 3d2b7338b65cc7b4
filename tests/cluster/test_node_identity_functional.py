"""A node id belongs to one live process. A process that was paused (SIGSTOP, a suspended VM) long enough for
another one to start under its id must not go on working as that node when it wakes: both would renew the
same claims and leases as their own (two senders of one delivery, two runners of one schedule)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.harness import LEAD_SECRETS, Cluster, until
from tests.conftest import Sink, lead_project, postgres_url

pytestmark = pytest.mark.slow


async def test_a_paused_process_whose_node_id_was_taken_stops_when_it_wakes(tmp_path: Path, sink: Sink):
    from patchbay.engine.roles import HEARTBEAT_S, LOST_AFTER_S

    root = lead_project(tmp_path, sink.url, hub={"store": postgres_url()})
    async with Cluster(root, LEAD_SECRETS) as cluster:
        first = await cluster.start("w1", roles="worker")
        cluster.pause(first)
        try:

            async def lost() -> bool:
                nodes = {n["id"]: n for n in (await cluster.view())["nodes"]}
                return nodes["w1"]["status"] == "lost"

            await until(lost, LOST_AFTER_S + 10, "the paused node shown lost", every=1.0)
            second = await cluster.start("w1", roles="worker")  # its id is free again: the old one is lost
        finally:
            cluster.resume(first)
        # Its next heartbeat finds the id taken: it stops, saying why, and the new process runs on.
        await until(lambda: first.proc.returncode is not None, HEARTBEAT_S + 15, "the woken process's exit")
        assert first.proc.returncode != 0
        assert "another process has taken this node id" in first.log_tail()
        assert second.alive
        nodes = {n["id"]: n for n in (await cluster.view())["nodes"]}
        assert nodes["w1"]["status"] == "up" and nodes["w1"]["pid"] == second.proc.pid
