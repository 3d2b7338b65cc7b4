"""The REST API on a real socket: every endpoint, its auth failures, and changes that reach the store and the audit log."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
import yaml

from patchbay.security.tokens import SCOPES
from patchbay.server.api import Api as ApiImpl
from patchbay.store.sqlite import tx_schedule, tx_set_cursor
from tests.conftest import SECRET_TOKEN, eventually, lead_project, write_project
from tests.server.conftest import FAST, lead, past

FILL = {
    "flow": "lead-capture",
    "destination": "crm",
    "run_id": "evt_nothing",
    "name": "unused_secret",
    "token_id": "000000000000",
    "entity": "customer",
    "identity_id": "idn_nothing",
    "conflict_id": "1",
    "review_id": "1",
}


async def _status(api, eid: str) -> str:
    return (await api.hub.run(eid))["status"]


async def _audit(api, **params):
    return (await api.get("audit", params=params))["entries"]


# ----------------------------------------------------------------------------- authentication and scopes
async def test_every_endpoint_refuses_missing_bad_revoked_expired_and_wrong_scope_tokens(api):
    revoked = await api.token("gone", "admin")
    await api.revoke(revoked)
    expired = await api.token("old", "admin", expires_at=past(1))
    real_id = api.tokens["admin"].split("_")[1]
    wrong_secret = f"pbt_{real_id}_{'A' * 43}"
    cases = [
        (None, "missing_token"),
        ("Basic dXNlcjpwYXNz", "bad_token"),
        ("Bearer ", "bad_token"),
        ("Bearer not-a-token", "bad_token"),
        (f"Bearer pbt_{'0' * 12}_{'A' * 43}", "bad_token"),
        (f"Bearer {wrong_secret}", "bad_token"),
        (f"Bearer {revoked}", "revoked_token"),
        (f"Bearer {expired}", "expired_token"),
    ]
    endpoints = ApiImpl(api.hub.hub).endpoints()
    assert len(endpoints) >= 24
    for ep in endpoints:
        path = re.sub(r"\{(\w+)\}", lambda mt: FILL[mt.group(1)], ep.path)
        body = {} if ep.body is not None else None
        for header, code in cases:
            headers = {"Authorization": header} if header is not None else {}
            status, err = await api.call(ep.method, path, token=None, headers=headers, json=body)
            assert (status, err["error"]) == (401, code), (ep.method, path, header)
            assert err["message"]
        if ep.scope is None:
            continue
        other = next(s for s in SCOPES if s not in (ep.scope, "admin"))
        weak = await api.token(f"only-{other.replace(':', '-')}", other)
        status, err = await api.call(ep.method, path, token=weak, json=body)
        assert (status, err["error"], err["scope"]) == (403, "insufficient_scope", ep.scope), (
            ep.method,
            path,
        )
        assert ep.scope in err["message"]
        exact = await api.token(f"exact-{ep.scope.replace(':', '-')}", ep.scope)
        status, _ = await api.call(ep.method, path, token=exact, json=body)
        assert status not in (401, 403), (ep.method, path, status)


async def test_health_metrics_and_the_openapi_document_are_public(api):
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"):
        status, _ = await api.call("GET", path, token=None)
        assert status == 200, path
    _, doc = await api.call("GET", "/api/v1/openapi.json", token=None)
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"
    table = {(ep.method.lower(), ep.path): ep.scope for ep in ApiImpl(api.hub.hub).endpoints()}
    for (method, path), scope in table.items():
        op = doc["paths"][path][method]
        assert op["security"] == [{"bearerToken": [scope] if scope else []}]
        assert {"401"} <= set(op["responses"])
        if scope:
            assert "403" in op["responses"] and scope in op["description"]
    for public in ("/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"):
        assert doc["paths"][public]["get"]["security"] == []
    # Scopes are documented and are exactly the ones tokens take.
    assert {s for s in table.values() if s} <= set(SCOPES)
    assert all(s in doc["info"]["description"] for s in SCOPES)


async def test_whoami_and_last_used(api):
    me = await api.get("whoami", token="reader")
    assert me["token"]["name"] == "reader" and me["token"]["scopes"] == ["flows:read", "runs:read"]
    assert me["token"]["last_used_at"] is not None
    tokens = (await api.get("tokens"))["tokens"]
    reader = next(t for t in tokens if t["name"] == "reader")
    assert reader["last_used_at"] is not None and reader["status"] == "active"


# ----------------------------------------------------------------------------- systems, flows, map
async def test_systems_show_owners_and_never_credentials(tmp_path, sink, api_for):
    root = lead_project(tmp_path, sink.url, delivery=FAST)
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["crm"]["headers"] = {
        "X-Api-Token": "inline-header-credential",
        "X-Team": "sales",
        "secret": "another-inline-credential",
    }
    systems["crm"]["owns"] = ["contact.email"]
    (root / "systems.yaml").write_text(yaml.safe_dump(systems))
    api = await api_for(root)
    status, text = await api.call("GET", "systems")
    assert status == 200
    by = {s["name"]: s for s in text["systems"]}
    assert (
        by["crm"]["owner"] == "sales"
        and by["crm"]["kind"] == "http"
        and by["crm"]["owns"] == ["contact.email"]
    )
    assert by["crm"]["secrets"] == ["secret:crm_token"] and by["crm"]["used_by"] == ["lead-capture"]
    assert by["crm"]["config"]["headers"] == {
        "X-Api-Token": "[redacted]",
        "X-Team": "sales",
        "secret": "[redacted]",
    }
    assert by["crm"]["config"]["auth"]["token"] == {"secret": "crm_token"}  # a reference, never a value
    assert by["website"]["webhook"]["scheme"] == "standard_webhooks"
    raw = str(text)
    assert "inline-header-credential" not in raw and "another-inline" not in raw and SECRET_TOKEN not in raw


async def test_flows_list_detail_and_stats(api, sink):
    _, ok = await api.hub.post("/hooks/lead-capture", lead(1))
    await api.hub.post("/hooks/lead-capture", {"email": "not-an-email"})
    await sink.wait_for(1)
    await eventually(lambda: _is(api, ok["event_id"], "delivered"), what="delivered")
    [flow] = (await api.get("flows", token="reader"))["flows"]
    assert (flow["name"], flow["owner"], flow["trigger"], flow["source_system"]) == (
        "lead-capture",
        "sales",
        "webhook",
        "website",
    )
    assert flow["purpose"] == "leads reach the CRM" and flow["health"] == "ok"
    assert [d["name"] for d in flow["destinations"]] == ["crm"]
    hour = flow["stats"]["hour"]
    assert hour["runs"] == 2 and hour["by_status"] == {"delivered": 1, "quarantined": 1}
    assert hour["success_rate"] == 0.5 and hour["p95_latency_ms"] > 0 and hour["p95_end_to_end_ms"] > 0
    assert flow["stats"]["day"]["runs"] == 2
    assert flow["stats"]["last_run"]["status"] == "quarantined"

    detail = await api.get("flows/lead-capture", token="reader")
    assert [s["kind"] for s in detail["definition"]["steps"]] == ["map", "validate"]
    assert detail["definition"]["trigger"]["webhook"]["system"] == "website"
    [dest] = detail["destinations"]
    assert dest["policy"]["timeout_s"] == 0.5 and dest["policy"]["retry"]["schedule"] == [0.1, 0.1]
    assert detail["definition"]["destinations"][0]["config"]["path"] == "/contacts"
    assert len(detail["recent_runs"]) == 2 and detail["schedule"] is None
    assert detail["file"].endswith("lead-capture.yaml") and detail["record_key"] == "properties.email"

    status, err = await api.call("GET", "flows/nope")
    assert (status, err["error"]) == (404, "not_found") and "lead-capture" in err["message"]
    status, err = await api.call("GET", "flows/Not%20A%20Name")
    assert (status, err["error"]) == (422, "invalid_request")


async def _is(api, eid: str, status: str) -> bool:
    return await _status(api, eid) == status


async def test_map_has_systems_as_nodes_and_flows_as_edges_with_health(api):
    m = await api.get("map", token="reader")
    assert {n["id"] for n in m["nodes"]} == {"website", "crm"}
    [edge] = m["edges"]
    assert (edge["source"], edge["target"], edge["flow"], edge["health"]) == (
        "website",
        "crm",
        "lead-capture",
        "ok",
    )
    await api.post("flows/lead-capture/destinations/crm/pause")
    m = await api.get("map")
    assert m["edges"][0]["health"] == "paused" and m["edges"][0]["state"] == "paused"
    assert {n["id"]: n["health"] for n in m["nodes"]} == {"website": "ok", "crm": "paused"}


# ----------------------------------------------------------------------------- runs
async def test_runs_filters_and_trace(tmp_path, sink, api_for):
    root = lead_project(tmp_path, sink.url, delivery=FAST)
    flow = yaml.safe_load((root / "flows/lead-capture.yaml").read_text())
    flow["sensitive"] = ["first_name"]
    (root / "flows/lead-capture.yaml").write_text(yaml.safe_dump(flow))
    api = await api_for(root)
    _, a = await api.hub.post("/hooks/lead-capture", {**lead(1), "note": f"pasted {SECRET_TOKEN}"})
    _, b = await api.hub.post("/hooks/lead-capture", {"email": "broken"})
    await sink.wait_for(1)
    await eventually(lambda: _is(api, a["event_id"], "delivered"), what="delivered")

    runs = (await api.get("runs", token="reader"))["runs"]
    assert [r["id"] for r in runs] == [b["event_id"], a["event_id"]]
    assert [r["id"] for r in (await api.get("runs", params={"status": "quarantined"}))["runs"]] == [
        b["event_id"]
    ]
    assert [r["id"] for r in (await api.get("runs", params={"key": "lead-1@example.com"}))["runs"]] == [
        a["event_id"]
    ]
    assert (await api.get("runs", params={"flow": "lead-capture", "limit": 1}))["runs"][0]["id"] == b[
        "event_id"
    ]
    assert (await api.get("runs", params={"since": "2100-01-01T00:00:00"}))["runs"] == []
    assert len((await api.get("runs", params={"until": "2100-01-01T00:00:00Z"}))["runs"]) == 2

    trace = await api.get(f"runs/{a['event_id']}", token="reader")
    assert trace["status"] == "delivered" and trace["record_key"] == "lead-1@example.com"
    assert trace["payload"]["first_name"] == "[redacted]"  # the flow's sensitive field
    assert trace["payload"]["note"] == "pasted [secret]"  # a known secret value
    [d] = trace["deliveries"]
    assert d["destination"] == "crm" and d["attempts_log"][0]["status_code"] == 201
    assert d["idempotency_key"] == f"{a['event_id']}.crm"
    assert [s["step"] for s in trace["trace"]][:2] == ["normalise", "validate"]
    short = a["event_id"].removeprefix("evt_")
    assert (await api.get(f"runs/{short}"))["id"] == a["event_id"]
    status, err = await api.call("GET", "runs/evt_missing")
    assert (status, err["error"]) == (404, "not_found")

    counts = await api.get("counts", token="reader")
    assert counts["events"] == {"delivered": 1, "quarantined": 1} and counts["dead_letters"] == 1
    assert counts["flows"]["lead-capture"]["deliveries"] == {"delivered": 1}


# ----------------------------------------------------------------------------- dead letters: replay and discard
async def test_replay_from_the_api_delivers_for_real_and_is_audited(api, sink):
    sink.script = [(400, {}, '{"error": "bad field"}')]
    _, body = await api.hub.post("/hooks/lead-capture", lead(1))
    eid = body["event_id"]
    await eventually(lambda: _is(api, eid, "dead"), what="dead letter")

    dead = await api.get("dead-letters", token="reader")
    assert dead["total"] == 1
    [group] = dead["groups"]
    assert (group["kind"], group["flow"], group["destination"], group["count"]) == (
        "delivery",
        "lead-capture",
        "crm",
        1,
    )
    assert "400" in group["reason"]
    assert dead["items"][0]["event_id"] == eid
    [run] = (await api.get("runs", params={"status": "dead"}))["runs"]  # the runs list says why, too
    assert run["id"] == eid and run["reason"].startswith("crm: ") and "400" in run["reason"]

    status, err = await api.call("POST", "dead-letters/replay", token="reader", json={"run_ids": [eid]})
    assert (status, err["scope"]) == (403, "runs:replay")
    rep = await api.post("dead-letters/replay", {"run_ids": [eid]})
    assert rep == {"matched": 1, "requeued": [eid], "still_invalid": [], "skipped": []}
    await sink.wait_for(1)
    await eventually(lambda: _is(api, eid, "delivered"), what="delivered after replay")
    run = await api.hub.run(eid)
    assert [a["status_code"] for a in run["deliveries"][0]["attempts_log"]] == [400, 201]
    assert {r.headers["Idempotency-Key"] for r in sink.received} == {f"{eid}.crm"}
    assert (await api.get("dead-letters"))["total"] == 0

    [row] = await _audit(api, action="replay")
    admin_id = api.tokens["admin"].split("_")[1]
    assert row["target"] == eid and row["origin"] == "127.0.0.1"
    assert admin_id in row["actor"] and row["detail"]["token_name"] == "admin"


async def test_replay_all_matching_a_reason_leaves_the_others(api, sink):
    def by_email(request, rec):
        return 422 if "lead-2" in str(rec.body) else 400

    sink.default = by_email
    ids = []
    for n in (1, 2):
        _, body = await api.hub.post("/hooks/lead-capture", lead(n))
        ids.append(body["event_id"])
    for eid in ids:
        await eventually(lambda e=eid: _is(api, e, "dead"), what="dead letters")
    groups = (await api.get("dead-letters"))["groups"]
    assert len(groups) == 2
    reason_400 = next(g["reason"] for g in groups if "400" in g["reason"])
    assert (await api.get("dead-letters", params={"reason": reason_400}))["total"] == 1
    sink.default = 201
    rep = await api.post("dead-letters/replay", {"all": True, "flow": "lead-capture", "reason": reason_400})
    assert rep["requeued"] == [ids[0]]
    await eventually(lambda: _is(api, ids[0], "delivered"), what="delivered")
    assert await _status(api, ids[1]) == "dead"
    rep = await api.post("dead-letters/replay", {"all": True, "destination": "crm"})
    assert rep["requeued"] == [ids[1]]
    await eventually(lambda: _is(api, ids[1], "delivered"), what="delivered")


async def test_discard_selected_dead_letters_and_quarantined_events(api, sink):
    sink.script = [400]
    _, dead = await api.hub.post("/hooks/lead-capture", lead(1))
    _, bad = await api.hub.post("/hooks/lead-capture", {"email": "broken"})
    await eventually(lambda: _is(api, dead["event_id"], "dead"), what="dead letter")
    assert (await api.get("dead-letters"))["total"] == 2

    out = await api.post("dead-letters/discard", {"run_ids": [dead["event_id"], bad["event_id"], "evt_nope"]})
    assert out["discarded"] == [dead["event_id"], bad["event_id"]]
    assert out["skipped"] == [{"id": "evt_nope", "reason": "no such event"}]
    run = await api.hub.run(dead["event_id"])
    assert run["status"] == "discarded" and run["deliveries"][0]["status"] == "discarded"
    assert await _status(api, bad["event_id"]) == "discarded"
    assert (await api.get("dead-letters"))["total"] == 0
    rows = await _audit(api, action="discard")
    assert {r["target"] for r in rows} == {dead["event_id"], bad["event_id"]}
    assert all(r["origin"] == "127.0.0.1" and r["detail"]["token_name"] == "admin" for r in rows)
    # Discarded is final: replay finds nothing to do.
    rep = await api.post("dead-letters/replay", {"run_ids": [dead["event_id"]]})
    assert rep["requeued"] == [] and rep["skipped"]


async def test_replay_and_discard_bodies_are_validated(api):
    for body, code in [
        ({}, 422),
        ({"run_ids": []}, 422),
        ({"run_ids": ["x"], "all": True}, 422),
        ({"all": True, "bogus": 1}, 422),
        ({"run_ids": ["bad id!"]}, 422),
        ([1, 2], 422),
        ({"run_ids": ["evt_1"], "flow": "lead-capture"}, 422),
    ]:
        status, err = await api.call("POST", "dead-letters/replay", json=body)
        assert (status, err["error"]) == (code, "invalid_request"), body
        assert err["details"] and err["details"][0]["loc"][0] == "body"
    status, err = await api.call("POST", "dead-letters/discard", json={"all": True})
    assert status == 422
    status, err = await api.call(
        "POST", "dead-letters/replay", data=b'{"all": tru', headers={"Content-Type": "application/json"}
    )
    assert (status, err["error"]) == (400, "malformed_json")
    status, err = await api.call(
        "POST", "dead-letters/replay", data=b"", headers={"Content-Type": "application/json"}
    )
    assert (status, err["error"]) == (400, "empty_body")
    status, err = await api.call(
        "POST",
        "dead-letters/replay",
        data=b"all=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (status, err["error"]) == (415, "unsupported_media_type")
    status, err = await api.call("POST", "dead-letters/discard", json={"run_ids": ["evt_1"] * 40000})
    assert (status, err["error"]) == (413, "body_too_large")


# ----------------------------------------------------------------------------- destinations
async def test_pause_and_resume_a_destination(api, sink):
    out = await api.post("flows/lead-capture/destinations/crm/pause")
    assert out == {"flow": "lead-capture", "destination": "crm", "state": "paused", "changed": True}
    assert (await api.post("flows/lead-capture/destinations/crm/pause"))["changed"] is False
    _, body = await api.hub.post("/hooks/lead-capture", lead(1))
    await asyncio.sleep(0.4)
    assert sink.received == [] and await _status(api, body["event_id"]) == "pending"
    [dest] = (await api.get("destinations", token="reader"))["destinations"]
    assert (dest["state"], dest["health"], dest["pending"]) == ("paused", "paused", 1)
    assert dest["policy"]["max_concurrency"] == 8
    states = await api.hub.store.read(lambda c: c.execute("SELECT state FROM destinations").fetchall())
    assert [s[0] for s in states] == ["paused"]

    status, err = await api.call("POST", "flows/lead-capture/destinations/crm/resume", token="reader")
    assert (status, err["scope"]) == (403, "destinations:write")
    out = await api.post("flows/lead-capture/destinations/crm/resume")
    assert out["state"] == "active" and out["changed"] is True
    await sink.wait_for(1)
    await eventually(lambda: _is(api, body["event_id"], "delivered"), what="delivered after resume")

    rows = await _audit(api, target="lead-capture/crm")
    assert [r["action"] for r in rows] == ["resume", "paused"]
    assert all(r["origin"] == "127.0.0.1" and "admin" in r["actor"] for r in rows)
    assert rows[1]["detail"]["was"] == "active"
    for path in ("flows/nope/destinations/crm/pause", "flows/lead-capture/destinations/nope/resume"):
        status, err = await api.call("POST", path)
        assert (status, err["error"]) == (404, "not_found")


# ----------------------------------------------------------------------------- cursors and schedules
async def test_an_ordered_destinations_held_key_shows_why(tmp_path, sink, api_for):
    root = lead_project(tmp_path, sink.url, delivery=FAST, dest={"order_by": "properties.email"})
    api = await api_for(root)
    sink.script = [(400, {}, '{"error": "bad field"}')]
    _, first = await api.hub.post("/hooks/lead-capture", lead(1))
    await eventually(lambda: _is(api, first["event_id"], "dead"), what="dead letter")
    _, second = await api.hub.post("/hooks/lead-capture", lead(1))  # same key: held behind the dead letter
    _, other = await api.hub.post("/hooks/lead-capture", lead(2))  # another key goes on
    await eventually(lambda: _is(api, other["event_id"], "delivered"), what="the other key delivered")
    [dest] = (await api.get("destinations", token="reader"))["destinations"]
    assert dest["order_by"] == "properties.email"
    [held] = dest["held_keys"]
    assert (held["key"], held["event_id"], held["status"], held["waiting"]) == (
        "lead-1@example.com",
        first["event_id"],
        "dead",
        1,
    )
    assert "dead letter" in held["reason"] and "replay or discard" in held["reason"]
    assert await _status(api, second["event_id"]) == "pending"
    await api.post("dead-letters/discard", {"run_ids": [first["event_id"]]})
    await eventually(lambda: _is(api, second["event_id"], "delivered"), what="the held one delivered")
    [dest] = (await api.get("destinations"))["destinations"]
    assert dest["held_keys"] == []


async def test_cursor_get_and_reset(api):
    assert await api.get("flows/lead-capture/cursor", token="reader") == {
        "flow": "lead-capture",
        "has_source": False,
        "cursor": None,
        "updated_at": None,
    }
    await api.hub.store.write(tx_set_cursor, "lead-capture", {"etag": "abc", "page": 3})
    got = await api.get("flows/lead-capture/cursor")
    assert got["cursor"] == {"etag": "abc", "page": 3} and got["updated_at"] is not None
    status, err = await api.call("DELETE", "flows/lead-capture/cursor", token="reader")
    assert (status, err["scope"]) == (403, "runs:replay")
    status, out = await api.call("DELETE", "flows/lead-capture/cursor")
    assert (status, out) == (200, {"flow": "lead-capture", "reset": True})
    assert (await api.get("flows/lead-capture/cursor"))["cursor"] is None
    [row] = await _audit(api, action="cursor.reset")
    assert (
        row["target"] == "lead-capture"
        and row["origin"] == "127.0.0.1"
        and row["detail"]["had_cursor"] is True
    )


async def test_schedules_and_a_late_schedule_on_the_map(tmp_path, sink, api_for):
    root = lead_project(tmp_path, sink.url, delivery=FAST)
    write_project(
        root,
        {
            "flows/nightly.yaml": """
        purpose: a tick every hour
        owner: ops
        trigger: {schedule: {every: 1h}}
        destinations: [{name: crm, system: crm, path: /ticks}]
    """
        },
    )
    api = await api_for(root)

    async def ran() -> bool:
        s = (await api.get("schedules"))["schedules"]
        return bool(s) and s[0]["runs"] >= 1

    await eventually(ran, what="the first scheduled run")
    [s] = (await api.get("schedules", token="reader"))["schedules"]
    assert (s["flow"], s["every_s"], s["last_status"], s["late_s"], s["cron"]) == (
        "nightly",
        3600.0,
        "ok",
        0.0,
        None,
    )
    await api.hub.store.write(lambda c: tx_schedule(c, "nightly", next_due_at=past(7200)))
    [s] = (await api.get("schedules"))["schedules"]
    assert s["late_s"] > 3600
    flows = {f["name"]: f for f in (await api.get("flows"))["flows"]}
    assert flows["nightly"]["health"] == "late" and flows["nightly"]["trigger"] == "schedule"
    assert flows["lead-capture"]["health"] == "ok"
    m = await api.get("map")
    assert {n["id"]: n["health"] for n in m["nodes"]}["hub"] == "late"
    assert {e["id"]: e["source"] for e in m["edges"]} == {"lead-capture/crm": "website", "nightly/crm": "hub"}


# ----------------------------------------------------------------------------- secrets
async def test_secrets_names_only_set_rotate_delete_audited(api, caplog):
    caplog.set_level(logging.DEBUG)
    listed = await api.get("secrets", token=await api.token("sr", "secrets:read"))
    assert listed["vault"] is True
    assert {s["name"]: s["used_by"] for s in listed["secrets"]} == {
        "crm_token": ["lead-capture"],
        "website_whsec": ["lead-capture"],
    }
    assert SECRET_TOKEN not in str(listed)
    status, err = await api.call("GET", "secrets", token="reader")
    assert (status, err["scope"]) == (403, "secrets:read")
    writer = await api.token("sw", "secrets:write")
    status, err = await api.call("PUT", "secrets/new_key", token="sr", json={"value": "v1-very-secret"})
    assert (status, err["scope"]) == (403, "secrets:write")

    status, out = await api.call("PUT", "secrets/new_key", token=writer, json={"value": "v1-very-secret"})
    assert (status, out) == (200, {"name": "new_key", "action": "created", "version": 1})
    status, out = await api.call("PUT", "secrets/new_key", token=writer, json={"value": "v2-very-secret"})
    assert (status, out) == (200, {"name": "new_key", "action": "rotated", "version": 2})
    from patchbay.security.project import require_vault

    assert require_vault(api.root).get("new_key") == "v2-very-secret"
    for bad in ({"value": ""}, {"value": 5}, {"value": "x", "extra": 1}, {}):
        status, err = await api.call("PUT", "secrets/new_key", token=writer, json=bad)
        assert status == 422 and "very-secret" not in str(err)
    status, _ = await api.call("PUT", "secrets/bad%20name", token=writer, json={"value": "x"})
    assert status == 422

    status, err = await api.call("DELETE", "secrets/crm_token", token=writer)
    assert (status, err["error"]) == (409, "secret_in_use")
    status, out = await api.call("DELETE", "secrets/new_key", token=writer)
    assert (status, out) == (200, {"name": "new_key", "deleted": True})
    status, _ = await api.call("DELETE", "secrets/new_key", token=writer)
    assert status == 404
    status, _ = await api.call("DELETE", "secrets/crm_token", token=writer, params={"force": "true"})
    assert status == 200

    rows = await _audit(api, action="secret.")
    assert [(r["action"], r["target"]) for r in rows] == [
        ("secret.delete", "crm_token"),
        ("secret.delete", "new_key"),
        ("secret.rotate", "new_key"),
        ("secret.set", "new_key"),
    ]
    assert all(r["origin"] == "127.0.0.1" and r["detail"]["token_name"] == "sw" for r in rows)
    assert "very-secret" not in str(rows) and "very-secret" not in caplog.text


async def test_secrets_without_a_vault(tmp_path, sink, start_hub):
    import aiohttp

    from patchbay.security.tokens import create_token
    from patchbay.store.base import Actor
    from tests.server.conftest import Api

    hub = await start_hub(lead_project(tmp_path, sink.url))  # no master key: the hub uses the environment
    async with aiohttp.ClientSession() as s:
        api = Api(hub, s)
        text, _ = await create_token(hub.store, "admin", ["admin"], None, Actor("test"))
        api.tokens["admin"] = text
        listed = await api.get("secrets")
        assert listed["vault"] is False and {x["stored"] for x in listed["secrets"]} == {False}
        status, err = await api.call("PUT", "secrets/x", json={"value": "y"})
        assert (status, err["error"]) == (409, "no_vault") and "secrets init" in err["message"]


# ----------------------------------------------------------------------------- tokens and the audit log
async def test_tokens_created_used_and_revoked_through_the_api(api):
    status, err = await api.call(
        "POST", "tokens", token="reader", json={"name": "x", "scopes": ["runs:read"]}
    )
    assert (status, err["scope"]) == (403, "admin")
    status, made = await api.call(
        "POST", "tokens", json={"name": "ci", "scopes": ["runs:read"], "expires_in_s": 3600}
    )
    assert status == 201 and made["token"].startswith(f"pbt_{made['id']}_")
    assert made["scopes"] == ["runs:read"] and made["expires_at"] > past(-3500) and made["status"] == "active"
    assert (await api.get("whoami", token=made["token"]))["token"]["id"] == made["id"]
    listed = (await api.get("tokens"))["tokens"]
    assert made["token"] not in str(listed) and made["token"].split("_", 2)[2] not in str(listed)
    rows = await api.hub.store.read(
        lambda c: c.execute("SELECT * FROM api_tokens WHERE id=?", (made["id"],)).fetchall()
    )
    assert made["token"].split("_", 2)[2] not in str([tuple(r) for r in rows])  # only a hash is stored

    for bad in (
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["root"]},
        {"name": "", "scopes": ["admin"]},
        {"name": "x", "scopes": ["admin"], "expires_in_s": 1},
    ):
        status, _ = await api.call("POST", "tokens", json=bad)
        assert status == 422, bad

    revoked = await api.call("DELETE", f"tokens/{made['id']}")
    assert revoked[0] == 200 and revoked[1]["status"] == "revoked"
    status, err = await api.call("GET", "whoami", token=made["token"])
    assert (status, err["error"]) == (401, "revoked_token")
    status, _ = await api.call("DELETE", "tokens/0123456789ab")
    assert status == 404
    rows = await _audit(api, action="token.")
    assert [(r["action"], r["target"]) for r in rows[:2]] == [
        ("token.revoke", made["id"]),
        ("token.create", made["id"]),
    ]
    assert {r["actor"] for r in rows[2:]} == {"test"}  # the fixture's tokens are audited too
    assert rows[1]["detail"]["scopes"] == ["runs:read"] and made["token"] not in str(rows)


async def test_audit_is_admin_only_read_only_and_filterable(api):
    await api.post("flows/lead-capture/destinations/crm/pause")
    status, err = await api.call("GET", "audit", token="reader")
    assert (status, err["scope"]) == (403, "admin")
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, err = await api.call(method, "audit", json={})
        assert (status, err["error"]) == (405, "method_not_allowed"), method
    status, err = await api.call("DELETE", "audit/1")
    assert (status, err["error"]) == (404, "not_found")
    entries = await _audit(api)
    assert entries[0]["action"] == "paused"
    assert await _audit(api, action="resume") == []
    assert len(await _audit(api, actor=api.tokens["admin"].split("_")[1])) == 1
    assert await _audit(api, since="2100-01-01T00:00:00Z") == []


async def test_bad_query_strings_are_422_and_unknown_routes_json_404(api):
    for params in (
        {"limit": "0"},
        {"limit": "abc"},
        {"limit": "1001"},
        {"status": "weird"},
        {"since": "yesterday"},
        {"bogus": "1"},
        {"flow": "Bad Flow"},
    ):
        status, err = await api.call("GET", "runs", params=params)
        assert (status, err["error"]) == (422, "invalid_request"), params
        assert err["details"][0]["loc"][0] == "query"
    status, err = await api.call("GET", "/api/v1/runs?limit=1&limit=2")
    assert status == 422 and "more than once" in err["message"]
    status, err = await api.call("GET", "nothing-here")
    assert (status, err["error"]) == (404, "not_found")
    status, err = await api.call("PUT", "runs")
    assert (status, err["error"]) == (405, "method_not_allowed")


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_scopes_admin_implies_all(scope):
    from patchbay.security.tokens import TokenInfo

    admin = TokenInfo("a" * 12, "a", ("admin",), 0.0, "", None, None, None)
    only = TokenInfo("b" * 12, "b", (scope,), 0.0, "", None, None, None)
    assert admin.allows(scope) and only.allows(scope)
    assert only.allows("admin") == (scope == "admin")


def test_flow_stats_percentiles_and_success_rate(tmp_path):
    import time as _time

    from patchbay.store.api_queries import flow_stats
    from patchbay.store.sqlite import connect, init_schema

    conn = connect(tmp_path / "s.db")
    init_schema(conn)
    now = _time.time()
    for i in range(100):  # 100 delivered runs, latencies 1..100 ms; end to end (i+1)*10 ms
        eid = f"evt_{i}"
        t = now - 60 - i
        conn.execute(
            "INSERT INTO events(id, flow, body_hash, received_at, updated_at, status, payload)"
            " VALUES(?, 'f', '', ?, ?, 'delivered', x'7b7d')",
            (eid, t, t + (i + 1) / 100),
        )
        conn.execute(
            "INSERT INTO deliveries(event_id, flow, destination, status, request, idempotency_key, next_at,"
            " created_at, updated_at) VALUES(?, 'f', 'd', 'delivered', '{}', ?, 0, 0, 0)",
            (eid, eid),
        )
        conn.execute(
            "INSERT INTO attempts(delivery_id, n, started_at, latency_ms, outcome)"
            " VALUES(last_insert_rowid(), 1, ?, ?, 'success')",
            (t, float(i + 1)),
        )
    for status, n in (("dead", 20), ("quarantined", 5), ("filtered", 7)):
        for i in range(n):
            conn.execute(
                "INSERT INTO events(id, flow, body_hash, received_at, updated_at, status, payload)"
                " VALUES(?, 'f', '', ?, ?, ?, x'7b7d')",
                (f"evt_{status}{i}", now - 7200, now, status),
            )
    stats = flow_stats(conn, ["f", "g"], now)
    hour, day = stats["f"]["hour"], stats["f"]["day"]
    assert hour["runs"] == 100 and hour["success_rate"] == 1.0
    assert hour["p95_latency_ms"] == 95.0 and hour["p95_end_to_end_ms"] == 950.0
    assert day["runs"] == 132 and day["success_rate"] == round(100 / 125, 4)
    assert stats["f"]["last_run"]["id"] == "evt_0"
    assert stats["g"] == {
        "last_run": None,
        "hour": {
            "runs": 0,
            "by_status": {},
            "success_rate": None,
            "p95_latency_ms": None,
            "p95_end_to_end_ms": None,
        },
        "day": {
            "runs": 0,
            "by_status": {},
            "success_rate": None,
            "p95_latency_ms": None,
            "p95_end_to_end_ms": None,
        },
    }
    conn.close()


def test_the_openapi_document_is_valid_openapi_3_1():
    validator = pytest.importorskip("openapi_spec_validator", reason="pip install openapi-spec-validator")

    class NoHub:
        store = None
        flows: dict = {}
        resolver = None

    validator.validate(ApiImpl(NoHub()).openapi)  # type: ignore[arg-type]
