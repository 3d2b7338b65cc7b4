"""Calls inside flows, through a real hub and a real HTTP server on 127.0.0.1: a call's answer bound for
later steps and routes, find-or-create on a 404, the delivery vocabulary for a call's failures (retry
with the same key, dead letter, replay that resumes at the call, pause on 401), the answers' cache, and
split: one record per element with per-element keys, a quarantined element not holding back the rest."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.cli.trace import render_trace
from patchbay.store.base import Actor
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, Received, eventually, lead_project

FAST = {"timeout_s": 2, "retry": {"schedule": ["100ms"] * 3, "jitter": 0}}
FIND = """
- name: normalise
  map:
    email: "lower(email)"
- name: find_contact
  call:
    system: crm
    method: GET
    path: "/search?email={{ email }}"
    as: contact
    on_404: continue
"""
CREATE_OR_UPDATE: dict[str, Any] = {
    "dest": {"when": "contact.status == `404`", "body": {"email": "email"}},
    "extra_dests": [
        {
            "name": "crm_update",
            "system": "crm",
            "method": "PATCH",
            "path": "/contacts/{{ contact.body.id }}",
            "when": "contact.status == `200`",
            "body": {"email": "email", "id": "contact.body.id"},
        }
    ],
}


def crm(known: dict[str, str], calls: list[Received] | None = None) -> Any:
    """A CRM fake: GET /search finds a known email (200 {id}) or answers 404; writes answer 201."""

    def answer(request: Any, rec: Received) -> Any:
        if request.method == "GET":
            if calls is not None:
                calls.append(rec)
            email = request.query.get("email", "")
            if email in known:
                return (
                    200,
                    {"Content-Type": "application/json"},
                    orjson.dumps({"id": known[email]}).decode(),
                )
            return (404, {}, '{"message": "not found"}')
        return 201

    return answer


async def settled(hub: Any, event_id: str, status: str) -> dict[str, Any]:
    async def check() -> bool:
        return (await hub.run(event_id))["status"] == status

    await eventually(check, what=f"run {status}")
    return await hub.run(event_id)


def project(tmp_path: Any, url: str, steps: str = FIND, **kw: Any) -> Any:
    return lead_project(tmp_path, url, steps=steps, delivery=FAST, hub={"delivery": FAST}, **kw)


async def test_find_or_create_routes_on_the_answer_and_keys_the_call(tmp_path, sink, start_hub):
    sink.default = crm({"known@example.com": "c-42"})
    hub = await start_hub(project(tmp_path, sink.url, **CREATE_OR_UPDATE))

    _, new = await hub.post("/hooks/lead-capture", {"email": "New@Example.com"})
    _, old = await hub.post("/hooks/lead-capture", {"email": "known@example.com"})
    run_new = await settled(hub, new["event_id"], "delivered")
    run_old = await settled(hub, old["event_id"], "delivered")

    by_key = {r.headers["Idempotency-Key"]: r for r in sink.received}
    find_new = by_key[f"{new['event_id']}.find_contact"]
    # sent as rendered (the template quotes the value: %40); the server reads the same email from it
    assert find_new.method == "GET" and find_new.path == "/search?email=new%40example.com"
    assert unquote(find_new.path) == "/search?email=new@example.com"
    assert find_new.headers["Authorization"] == f"Bearer {SECRET_TOKEN}"  # the system's own auth
    create = by_key[f"{new['event_id']}.crm"]
    assert create.method == "POST" and create.body == {"email": "new@example.com"}
    update = by_key[f"{old['event_id']}.crm_update"]
    assert update.method == "PATCH" and update.path == "/contacts/c-42"
    assert update.body == {"email": "known@example.com", "id": "c-42"}
    assert f"{old['event_id']}.crm" not in by_key and f"{new['event_id']}.crm_update" not in by_key

    dests = {d["destination"]: d for d in run_new["deliveries"]}
    assert set(dests) == {"call:find_contact", "crm"}
    assert dests["call:find_contact"]["attempts_log"][0]["status_code"] == 404
    call_trace = next(s for s in run_new["trace"] if s["step"] == "find_contact")
    assert call_trace["status"] == 404 and call_trace["call"] == f"{new['event_id']}.find_contact"
    assert {d["destination"] for d in run_old["deliveries"]} == {"call:find_contact", "crm_update"}


async def test_a_failing_call_retries_with_the_same_key_then_the_run_goes_on(tmp_path, sink, start_hub):
    sink.script = [503, 503]
    sink.default = crm({"ada@example.com": "c-1"})
    hub = await start_hub(project(tmp_path, sink.url, **CREATE_OR_UPDATE))
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    run = await settled(hub, body["event_id"], "delivered")

    keys = [r.headers["Idempotency-Key"] for r in sink.received]
    assert keys == [f"{body['event_id']}.find_contact"] * 3 + [f"{body['event_id']}.crm_update"]
    call = next(d for d in run["deliveries"] if d["destination"] == "call:find_contact")
    assert [a["status_code"] for a in call["attempts_log"]] == [503, 503, 200]
    text = render_trace(run)  # `patchbay runs show`: the step, then the call with its attempts
    assert "3. find_contact  answer HTTP 200 (call:find_contact below)" in text, text
    assert "deliver to call:find_contact: DELIVERED  GET http://127.0.0.1:" in text, text
    assert SECRET_TOKEN not in text and SECRET_TOKEN not in orjson.dumps(run).decode()


async def test_a_dead_call_is_listed_and_its_replay_resumes_at_the_call(tmp_path, sink, start_hub):
    sink.default = 400
    hub = await start_hub(project(tmp_path, sink.url, **CREATE_OR_UPDATE))
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    eid = body["event_id"]
    run = await settled(hub, eid, "dead")
    assert [d["destination"] for d in run["deliveries"]] == ["call:find_contact"]
    dead = await hub.store.list_dead("lead-capture")
    assert [(d["event_id"], d["destination"]) for d in dead] == [(eid, "call:find_contact")]

    sink.default = crm({"ada@example.com": "c-7"})
    report = await hub.store.replay(
        {"lead-capture": hub.hub.flows["lead-capture"].pipeline}, [eid], None, Actor("t")
    )
    assert report.requeued == [eid]
    hub.hub.flows["lead-capture"].workers["call:find_contact"].notify(rescan=True)
    await settled(hub, eid, "delivered")
    keys = [r.headers["Idempotency-Key"] for r in sink.received]
    assert keys == [f"{eid}.find_contact", f"{eid}.find_contact", f"{eid}.crm_update"]


async def test_patchbay_replay_of_a_dead_call_resumes_the_run_in_the_serving_hub(tmp_path, sink, start_hub):
    sink.default = 422
    hub = await start_hub(project(tmp_path, sink.url, **CREATE_OR_UPDATE))
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    eid = body["event_id"]
    await settled(hub, eid, "dead")

    sink.default = crm({"ada@example.com": "c-5"})  # the CRM is fixed; an operator replays from the shell
    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC, "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN}
    res = CliRunner(env=env).invoke(main, ["replay", eid, "-p", str(hub.root)])
    assert res.exit_code == 0, res.output
    await settled(hub, eid, "delivered")  # the hub picks the requeued call up from the store
    keys = [r.headers["Idempotency-Key"] for r in sink.received]
    assert keys == [f"{eid}.find_contact", f"{eid}.find_contact", f"{eid}.crm_update"]


async def test_a_refused_credential_pauses_the_call_until_it_is_resumed(tmp_path, sink, start_hub):
    sink.default = 401
    hub = await start_hub(project(tmp_path, sink.url, **CREATE_OR_UPDATE))
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})

    async def paused() -> bool:
        states = await hub.store.destination_states()
        return states.get(("lead-capture", "call:find_contact"), ("active",))[0] == "paused"

    await eventually(paused, what="the call paused")
    run = await hub.run(body["event_id"])
    assert run["status"] == "pending"
    assert [d["status"] for d in run["deliveries"]] == ["pending"]  # waits, untouched, for a resume

    sink.default = crm({"ada@example.com": "c-3"})  # the credential is fixed; `patchbay resume` does this
    await hub.hub.set_state("lead-capture", "call:find_contact", "active", Actor("ops"))
    await settled(hub, body["event_id"], "delivered")
    keys = {r.headers["Idempotency-Key"] for r in sink.received}
    assert keys == {f"{body['event_id']}.find_contact", f"{body['event_id']}.crm_update"}


async def test_cached_answers_are_shared_across_events(tmp_path, sink, start_hub):
    steps = FIND.replace("on_404: continue", "on_404: continue\n    cache: {key: email, ttl: 10m}")
    gets: list[Received] = []
    sink.default = crm({"ada@example.com": "c-1"}, gets)
    hub = await start_hub(project(tmp_path, sink.url, steps, **CREATE_OR_UPDATE))
    ids = []
    for _ in range(3):
        _, body = await hub.post("/hooks/lead-capture", {"email": "ADA@example.com"})
        ids.append(body["event_id"])
        await settled(hub, body["event_id"], "delivered")
    assert len(gets) == 1  # the second and third event used the cached answer
    updates = [r for r in sink.received if r.method == "PATCH"]
    assert [r.path for r in updates] == ["/contacts/c-1"] * 3
    assert [r.headers["Idempotency-Key"] for r in updates] == [f"{i}.crm_update" for i in ids]


SPLIT = """
- split: {path: items, with: {order_id: id}}
- validate:
    sku: {required: true}
"""


async def test_split_delivers_each_element_and_a_bad_one_is_dead_alone(tmp_path, sink, start_hub):
    hub = await start_hub(
        project(tmp_path, sink.url, SPLIT, dest={"body": {"order": "order_id", "sku": "sku"}})
    )
    order = {"email": "a@example.com", "id": "o-1", "items": [{"sku": "A"}, {"qty": 2}, {"sku": "C"}]}
    _, body = await hub.post("/hooks/lead-capture", order)
    eid = body["event_id"]
    run = await settled(hub, eid, "dead")

    got = {r.headers["Idempotency-Key"]: r.body for r in sink.received}
    assert got == {f"{eid}.0.crm": {"order": "o-1", "sku": "A"}, f"{eid}.2.crm": {"order": "o-1", "sku": "C"}}
    dests = {(d["destination"], d["status"]) for d in run["deliveries"]}
    assert dests == {("crm", "delivered"), ("quarantine:validate", "dead")}
    [bad] = [d for d in run["deliveries"] if d["status"] == "dead"]
    assert "element 1" in run["reason"] and "sku" in (bad["last_error"] or "")
    assert [s.get("element") for s in run["trace"] if s["step"] == "validate"] == ["0", "1", "2"]

    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC, "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN}
    res = CliRunner(env=env).invoke(main, ["dead", "-p", str(hub.root)])
    assert eid in res.output and "lead-capture/quarantine:" in res.output, res.output
    assert "validate: sku: required but missing" in res.output


async def test_split_then_a_call_per_element(tmp_path, sink, start_hub):
    steps = """
- split: {path: items, with: {email: email}}
- name: find_product
  call: {system: crm, method: GET, path: "/search?email={{ sku }}", as: product, on_404: continue}
"""
    sink.default = crm({"A": "p-a", "C": "p-c"})
    hub = await start_hub(
        project(tmp_path, sink.url, steps, dest={"body": {"sku": "sku", "product": "product.body.id"}})
    )
    _, body = await hub.post(
        "/hooks/lead-capture", {"email": "a@example.com", "items": [{"sku": "A"}, {"sku": "B"}, {"sku": "C"}]}
    )
    eid = body["event_id"]
    await settled(hub, eid, "delivered")
    got = {r.headers["Idempotency-Key"]: r.body for r in sink.received if r.method == "POST"}
    assert got == {
        f"{eid}.0.crm": {"sku": "A", "product": "p-a"},
        f"{eid}.1.crm": {"sku": "B", "product": None},
        f"{eid}.2.crm": {"sku": "C", "product": "p-c"},
    }
    calls = sorted(r.headers["Idempotency-Key"] for r in sink.received if r.method == "GET")
    assert calls == [f"{eid}.{i}.find_product" for i in range(3)]


async def test_a_call_to_a_private_address_is_refused_by_the_ssrf_guard(tmp_path, sink, start_hub):
    import yaml

    root = project(tmp_path, sink.url, **CREATE_OR_UPDATE)
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["crm"]["allow_private_network"] = False  # the default: 127.0.0.1 is not for outbound calls
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    run = await settled(hub, body["event_id"], "dead")
    [call] = run["deliveries"]
    assert call["destination"] == "call:find_contact" and sink.received == []
    assert "allow_private_network" in (call["last_error"] or ""), call["last_error"]


async def test_kept_answer_headers_are_bound(tmp_path, sink, start_hub):
    steps = """
- name: create
  call: {system: crm, method: POST, path: /contacts, body: {email: email}, as: created, headers_kept: [Location]}
"""

    def answer(request: Any, rec: Received) -> Any:
        if request.path == "/contacts":
            return (201, {"Location": "/contacts/c-77", "Content-Type": "application/json"}, "{}")
        return 201

    sink.default = answer
    dest = {"path": "/notes", "body": {"contact": "created.headers.location"}}
    hub = await start_hub(project(tmp_path, sink.url, steps, dest=dest))
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})
    await settled(hub, body["event_id"], "delivered")
    assert [(r.path, r.body) for r in sink.received] == [
        ("/contacts", {"email": "ada@example.com"}),
        ("/notes", {"contact": "/contacts/c-77"}),
    ]


async def test_a_call_whose_answer_changes_shape_is_reported_as_contract_drift(tmp_path, sink, start_hub):
    """A call step's answers are checked against the flow's `responses:` like a destination's."""
    known = {"a@example.com": "c-1"}
    sink.default = crm(known)
    root = project(tmp_path, sink.url, **CREATE_OR_UPDATE)
    (root / "flows" / "lead-capture.contract.yaml").write_text(
        "responses:\n  find_contact:\n    fields: {id: string}\n"
    )
    hub = await start_hub(root)
    _, ok = await hub.post("/hooks/lead-capture", {"email": "a@example.com"})
    await settled(hub, ok["event_id"], "delivered")
    assert hub.hub.metrics.answer_drift.labels("lead-capture", "find_contact")._value.get() == 0

    known["a@example.com"] = 7  # type: ignore[assignment]  # the CRM starts answering ids as numbers
    _, drifted = await hub.post("/hooks/lead-capture", {"email": "a@example.com"})
    run = await settled(hub, drifted["event_id"], "delivered")  # drift is reported, the run goes on
    assert hub.hub.metrics.answer_drift.labels("lead-capture", "find_contact")._value.get() == 1
    call = next(d for d in run["deliveries"] if d["destination"] == "call:find_contact")
    assert "DRIFT" in call["attempts_log"][-1]["error"] or "drift" in orjson.dumps(call).decode().lower()
