"""GET /api/v1/cluster and /readyz per node, on a real hub (SQLite: one node, its claims its workers' leases)."""

from __future__ import annotations

import asyncio

from patchbay.engine.roles import HEARTBEAT_S, LOST_AFTER_S
from tests.conftest import eventually
from tests.server.conftest import Api, lead


async def test_the_cluster_lists_this_node_with_its_roles_heartbeat_and_claims(api: Api) -> None:
    hold = asyncio.Event()
    sink = api.hub.hub.flows["lead-capture"].workers["crm"].sink

    async def stuck(request, key):  # type: ignore[no-untyped-def]
        await hold.wait()
        raise AssertionError("not reached")

    sink.send = stuck  # type: ignore[method-assign]
    status, _ = await api.hub.post("/hooks/lead-capture", lead(1))
    assert status == 202
    node = api.hub.hub.node.id

    async def held() -> bool:
        view = await api.get("cluster", token="reader")  # flows:read is enough
        return bool(view["nodes"][0]["claims"] == 1)

    await eventually(held, what="the delivery in flight counted as a claim")
    view = await api.get("cluster", token="reader")
    assert view["node"] == node and (view["heartbeat_s"], view["lost_after_s"]) == (HEARTBEAT_S, LOST_AFTER_S)
    [me] = view["nodes"]
    assert me["id"] == node and me["roles"] == ["web", "worker", "scheduler"] and me["status"] == "up"
    assert me["leases"] == [] and me["stopped_at"] is None  # (its port: tests/test_cluster_functional.py)
    assert 0 <= me["heartbeat_age_s"] <= LOST_AFTER_S
    hold.set()


async def test_the_cluster_needs_a_token_that_reads_flows(api: Api) -> None:
    await api.token("runs-only", "runs:read")
    status, body = await api.call("GET", "cluster", token="runs-only")
    assert status == 403 and "flows:read" in body["message"]


async def test_readyz_names_the_node_its_roles_and_the_state_of_each_part(api: Api) -> None:
    status, body = await api.call("GET", "/readyz", token=None)
    assert status == 200 and body["status"] == "ready"
    assert body["node"] == api.hub.hub.node.id and body["roles"] == ["web", "worker", "scheduler"]
    assert body["parts"] == {"store": "ok", "web": "ok", "worker": "ok", "scheduler": "ok"}
    w = api.hub.hub.flows["lead-capture"].workers["crm"]
    w._tasks[0].cancel()  # the feeder ends: this node's worker part is not running
    await asyncio.sleep(0.05)
    status, body = await api.call("GET", "/readyz", token=None)
    assert status == 503 and body["parts"]["worker"] == "not running: delivery lead-capture/crm"
    assert body["parts"]["web"] == "ok"
