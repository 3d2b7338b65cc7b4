"""kill -9 the hub while it delivers: after a restart every accepted event arrives, each key's effect once."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.cluster.harness import LEAD_SECRETS, Cluster, Sender, free_port, lead, until
from tests.conftest import lead_project, postgres_url

pytestmark = pytest.mark.slow
N = 1000
# PostgreSQL: the claims of a process that died on this host are let go when the next one starts there, not when
# they run out. A long lease here: a restart that waited for them would fail the test, not only slow it down.
LEASE_S = 120.0


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_sigkill_during_delivery_loses_nothing(tmp_path, sink, store):
    async def slowish(request, rec):
        await asyncio.sleep(0.005)  # deliveries take time, so plenty are in flight at the kill
        return 201

    sink.default = slowish
    port = free_port()
    hub: dict[str, object] = {"port": port}
    if store == "postgres":  # the same crash with the store on a PostgreSQL server (issue 13)
        hub |= {"store": postgres_url(), "claim_lease": f"{LEASE_S:g}s"}
    root = lead_project(
        tmp_path,
        sink.url,
        hub=hub,
        delivery={"max_concurrency": 4, "retry": {"schedule": ["200ms"] * 20, "jitter": 0}},
    )
    sender = Sender([f"http://127.0.0.1:{port}/hooks/lead-capture"], concurrency=16, pause_s=0.05)
    state: dict[str, float] = {}

    async with Cluster(root, LEAD_SECRETS) as cluster:
        proc = await cluster.serve(port=port)

        async def killer() -> None:
            await until(lambda: len(sink.keys) >= 150, 60, "150 deliveries", every=0.005)
            await cluster.kill(proc)  # for real: no shutdown code runs
            state["delivered_at_kill"] = len(sink.keys)
            await cluster.serve(port=port)
            state["restarted"] = time.monotonic()

        k = asyncio.create_task(killer())
        await sender.send({n: lead(n) for n in range(N)}, timeout=120, client_timeout=5)
        await asyncio.wait_for(k, 60)
        assert state["delivered_at_kill"] < N
        await sink.wait_for(N, timeout=60)
        after_restart_s = time.monotonic() - state["restarted"]
    # Every acknowledged event reached the sink...
    delivered_emails = {r.body["properties"]["email"] for r in sink.received if r.body}
    assert delivered_emails == {f"lead-{n}@example.com" for n in range(N)}
    # ...and each event's key had its effect once: redeliveries after the crash reuse the key.
    expected_keys = {f"{eid}.crm" for eid in sender.accepted.values()}
    assert set(sink.keys) == expected_keys
    assert len(set(sender.accepted.values())) == N
    # The restarted hub sent what the killed one held at once, not after its claims ran out.
    assert after_restart_s < LEASE_S / 2, f"everything delivered {after_restart_s:.0f} s after the restart"
    if store == "postgres":  # the runs are in the server, not in a file beside the project
        assert not (root / ".patchbay" / "patchbay.db").exists()
