"""Batches at an http destination: many deliveries in one request, per-record outcomes mapped back.

The fake answers in HubSpot's documented batch upsert shape: `inputs[]` each with an `objectWriteTraceId`,
an answer with `results[]` (each with its objectWriteTraceId) and `errors[]` whose
`context.objectWriteTraceId` names the refused inputs, 207 when some failed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import orjson
import yaml
from aiohttp import web

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.http import HttpSink, HttpSinkConfig, HttpSystem
from tests.conftest import SECRET_WHSEC, _start, eventually, write_project

TOKEN = "pat-na1-batch-0000-1111-2222-333333333333"


class FakeHubSpotBatch:
    """POST /crm/v3/objects/contacts/batch/upsert, at most 100 inputs. `atomic`: an invalid input refuses
    the whole batch with a 400 that names no input (the case the engine must split to find)."""

    def __init__(self, *, atomic: bool = False, throttle_first: int = 0, delay_s: float = 0.0) -> None:
        self.atomic = atomic
        self.delay_s = delay_s
        self.throttle = throttle_first
        self.requests: list[dict[str, Any]] = []
        self.headers: list[str] = []
        self.keys: dict[str, set[str]] = defaultdict(set)  # email -> the trace ids (idempotency keys) seen
        self.contacts: dict[str, dict[str, Any]] = {}

    async def upsert(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"status": "error", "category": "INVALID_AUTHENTICATION"}, status=401)
        body = await request.json()
        self.requests.append(body)
        self.headers.append(request.headers.get("Idempotency-Key", ""))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.throttle:
            self.throttle -= 1
            return web.json_response(
                {
                    "status": "error",
                    "message": "You have reached your secondly limit.",
                    "category": "RATE_LIMITS",
                },
                status=429,
                headers={"Retry-After": "1"},
            )
        inputs = body["inputs"]
        if len(inputs) > 100:
            return web.json_response(
                {"status": "error", "category": "VALIDATION_ERROR", "message": "Batch size limit is 100"},
                status=400,
            )
        results, errors = [], []
        for item in inputs:
            trace = item.get("objectWriteTraceId")
            self.keys[item["id"]].add(trace)
            if "@" not in item["id"]:
                if self.atomic:
                    return web.json_response(
                        {"status": "error", "category": "VALIDATION_ERROR", "message": "Invalid input JSON"},
                        status=400,
                    )
                errors.append(
                    {
                        "status": "error",
                        "category": "VALIDATION_ERROR",
                        "message": f"Property values were not valid: email {item['id']!r}",
                        "context": {"objectWriteTraceId": [trace]},
                    }
                )
                continue
        for item in inputs:
            if "@" not in item["id"]:
                continue
            self.contacts[item["id"]] = {**self.contacts.get(item["id"], {}), **item["properties"]}
            results.append(
                {
                    "id": str(1000 + len(self.contacts)),
                    "properties": self.contacts[item["id"]],
                    "new": True,
                    "objectWriteTraceId": item.get("objectWriteTraceId"),
                }
            )
        answer = {"status": "COMPLETE", "results": results, "errors": errors, "numErrors": len(errors)}
        return web.json_response(answer, status=207 if errors else 200)


async def fake(api: FakeHubSpotBatch) -> tuple[web.AppRunner, str]:
    app = web.Application(client_max_size=10 * 2**20)
    app.router.add_post("/crm/v3/objects/contacts/batch/upsert", api.upsert)
    return await _start(app)


def project(
    root,
    url: str,
    batch: dict[str, Any] | None,
    *,
    extra_dest: dict[str, Any] | None = None,
    hub: dict[str, Any] | None = None,
) -> None:
    dest: dict[str, Any] = {
        "name": "crm",
        "system": "crm",
        "operation": "upsert_contact",
        "response": {"id": "result.id"},
        "delivery": {"retry": {"schedule": ["1s", "1s", "1s"]}},
        **(extra_dest or {}),
    }
    if batch is not None:
        dest["batch"] = batch
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "crm": {
            "preset": "hubspot",
            "owner": "sales",
            "url": url,
            "allow_private_network": True,
            "auth": {"scheme": "bearer", "token": {"env": "HUBSPOT_BATCH_TOKEN"}},
        },
    }
    flow = {
        "purpose": "contacts into the CRM in batches",
        "owner": "sales",
        "trigger": {"webhook": {"system": "website", "batch": True}},
        "steps": [{"map": {"properties.email": "lower(email)", "properties.firstname": "name"}}],
        "destinations": [dest],
    }
    write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump(hub or {"port": 0}),
            "systems.yaml": yaml.safe_dump(systems),
            "flows/f.yaml": yaml.safe_dump(flow),
        },
    )


def contacts(n: int, bad: set[int] = frozenset()) -> list[dict[str, str]]:  # type: ignore[assignment]
    return [
        {"email": f"bad-contact-{i}" if i in bad else f"Person{i}@Example.com", "name": f"P{i}"}
        for i in range(n)
    ]


async def post_all(hub, items: list[dict[str, str]], per_post: int = 100) -> list[str]:
    ids: list[str] = []
    for i in range(0, len(items), per_post):
        status, body = await hub.post("/hooks/f", items[i : i + per_post])
        assert status == 202, body
        ids += body["event_ids"]
    return ids


async def statuses(hub) -> dict[str, int]:
    rows = await hub.store.read(
        lambda c: c.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall()
    )
    return {r[0]: r[1] for r in rows}


async def test_a_thousand_contacts_in_ten_requests_one_invalid_dead_alone(tmp_path, start_hub, monkeypatch):
    api = FakeHubSpotBatch()
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, {"max_records": 100, "max_wait": "5s"})
    try:
        hub = await start_hub(tmp_path)
        ids = await post_all(hub, contacts(1000, bad={537}))

        async def settled() -> bool:
            return await statuses(hub) == {"delivered": 999, "dead": 1}

        await eventually(settled, timeout=60, what="999 delivered and 1 dead")
        assert len(api.requests) <= 10, [len(r["inputs"]) for r in api.requests]
        assert sum(len(r["inputs"]) for r in api.requests) == 1000
        assert len(api.contacts) == 999
        # Every contact was sent with its delivery's own idempotency key, and only ever one key.
        assert all(len(k) == 1 for k in api.keys.values()) and len(api.keys) == 1000
        assert len(set(api.headers)) == len(api.headers)  # one batch key per distinct batch

        dead = await hub.run(ids[537])
        [d] = dead["deliveries"]
        assert d["status"] == "dead" and "Property values were not valid" in d["last_error"]
        [attempt] = d["attempts_log"]
        assert attempt["status_code"] == 207 and attempt["outcome"] == "terminal"
        assert attempt["error"].startswith("batch ") and "of 100)" in attempt["error"]
        assert api.keys["bad-contact-537"] == {d["idempotency_key"]}

        ok = await hub.run(ids[3])
        [d] = ok["deliveries"]
        assert d["status"] == "delivered" and d["response"]["id"].isdigit()  # this contact's own result
        [attempt] = d["attempts_log"]
        assert attempt["outcome"] == "success" and "objectWriteTraceId" in attempt["excerpt"]
        assert api.keys["person3@example.com"] == {d["idempotency_key"]}
    finally:
        await runner.cleanup()


async def test_a_refused_batch_without_detail_is_split_to_find_the_bad_record(
    tmp_path, start_hub, monkeypatch
):
    api = FakeHubSpotBatch(atomic=True)
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, {"max_records": 20, "max_wait": "5s"})
    try:
        hub = await start_hub(tmp_path)
        ids = await post_all(hub, contacts(20, bad={13}), per_post=20)

        async def settled() -> bool:
            return await statuses(hub) == {"delivered": 19, "dead": 1}

        await eventually(settled, timeout=30, what="19 delivered and 1 dead")
        # 20 -> 10+10 -> 5+5 -> 3+2 -> 1+1 (+1+1): bounded by 2n-1, far fewer here.
        assert 5 <= len(api.requests) <= 2 * 20 - 1
        assert len(api.contacts) == 19
        assert all(len(k) == 1 for k in api.keys.values())
        dead = await hub.run(ids[13])
        [d] = dead["deliveries"]
        assert d["status"] == "dead"
        notes = [a["error"] for a in d["attempts_log"]]
        assert "split into halves" in notes[0] and "without per-record detail" in notes[0]
        assert "(1 of 1)" in notes[-1] and "split" not in notes[-1].split(": ", 1)[1]
        good = await hub.run(ids[0])
        assert good["deliveries"][0]["status"] == "delivered"
    finally:
        await runner.cleanup()


async def test_a_throttled_batch_is_retried_whole_with_the_same_keys(tmp_path, start_hub, monkeypatch):
    api = FakeHubSpotBatch(throttle_first=1)
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, {"max_records": 100, "max_wait": "500ms"})
    try:
        hub = await start_hub(tmp_path)
        ids = await post_all(hub, contacts(50), per_post=50)

        async def settled() -> bool:
            return await statuses(hub) == {"delivered": 50}

        await eventually(settled, timeout=30, what="50 delivered after a 429")
        assert [len(r["inputs"]) for r in api.requests] == [50, 50]
        assert api.requests[0] == api.requests[1] and api.headers[0] == api.headers[1]
        run = await hub.run(ids[7])
        attempts = run["deliveries"][0]["attempts_log"]
        assert [a["status_code"] for a in attempts] == [429, 200]
        assert run["deliveries"][0]["retries"] == 1
    finally:
        await runner.cleanup()


async def test_without_batch_each_contact_is_its_own_request(tmp_path, start_hub, monkeypatch):
    api = FakeHubSpotBatch()
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, None)
    try:
        hub = await start_hub(tmp_path)
        await post_all(hub, contacts(3), per_post=3)

        async def settled() -> bool:
            return await statuses(hub) == {"delivered": 3}

        await eventually(settled, what="3 delivered")
        assert [len(r["inputs"]) for r in api.requests] == [1, 1, 1]
    finally:
        await runner.cleanup()


# ----------------------------------------------------------------------------- the connector alone
def sink(url: str, **cfg: Any) -> HttpSink:
    return HttpSink(
        HttpSystem(url=url),
        HttpSinkConfig(**cfg),
        DeliveryPolicy(),
        Resources(allow_private=True),
    )


async def close(s: HttpSink) -> None:
    await s.close()
    if s.resources.http is not None:
        await s.resources.http.close()


async def test_a_json_array_batch_by_default_and_records_matched_by_index():
    seen: list[Any] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        errors = [
            {"failedElementNumber": i, "status": 400, "message": "no"}
            for i, x in enumerate(body)
            if x["n"] == 2
        ]
        return web.json_response({"errors": errors}, status=201)

    app = web.Application()
    app.router.add_post("/bulk", handle)
    runner, url = await _start(app)
    try:
        s = sink(
            url,
            path="/bulk",
            batch_format={
                "errors": {
                    "path": "body.errors",
                    "ref": "failedElementNumber",
                    "status": "status",
                    "message": "message",
                }
            },
        )
        reqs = [s.render({"n": n}, f"k{n}") for n in range(4)]
        outs = await s.send_batch(reqs, [f"k{n}" for n in range(4)])
        assert seen == [[{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]]
        assert [o.cls for o in outs] == [
            OutcomeClass.SUCCESS,
            OutcomeClass.SUCCESS,
            OutcomeClass.TERMINAL,
            OutcomeClass.SUCCESS,
        ]
        assert outs[2].error == "no"
        await close(s)
    finally:
        await runner.cleanup()


async def test_a_4xx_naming_records_resends_the_others():
    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        errors = [
            {"email_address": m["email_address"], "error": "fake"}
            for m in body["members"]
            if "x" in m["email_address"]
        ]
        return web.json_response({"errors": errors}, status=400 if errors else 200)

    app = web.Application()
    app.router.add_post("/lists/L", handle)
    runner, url = await _start(app)
    try:
        s = sink(
            url,
            path="/lists/L",
            body={"members": "[{email_address: email}]", "update_existing": "`true`"},
            batch_format={
                "items": "members",
                "errors": {
                    "path": "body.errors",
                    "ref": "email_address",
                    "match": "item.email_address",
                    "message": "error",
                },
            },
        )
        emails = ["a@e.com", "x@e.com", "b@e.com"]
        outs = await s.send_batch([s.render({"email": e}, e) for e in emails], emails)
        assert [o.cls for o in outs] == [OutcomeClass.TERMINAL, OutcomeClass.TERMINAL, OutcomeClass.TERMINAL]
        assert [o.resend for o in outs] == [True, False, True] and outs[1].error == "fake"
        again = await s.send_batch([s.render({"email": e}, e) for e in emails[::2]], emails[::2])
        assert [o.cls for o in again] == [OutcomeClass.SUCCESS, OutcomeClass.SUCCESS]
        await close(s)
    finally:
        await runner.cleanup()


async def test_no_answer_applies_to_every_member():
    s = sink("http://127.0.0.1:9", path="/x")  # nothing listens on the discard port
    outs = await s.send_batch([s.render({"a": 1}, "k1"), s.render({"a": 2}, "k2")], ["k1", "k2"])
    assert [o.cls for o in outs] == [OutcomeClass.TRANSIENT, OutcomeClass.TRANSIENT]
    await close(s)


# ----------------------------------------------------------------------------- check
def check_problems(root) -> list[str]:
    from patchbay.config.project import load_project

    _, problems = load_project(root)
    return [f"{p.file}:{p.line}: {p.message}" for p in problems]


def test_check_refuses_batch_beyond_the_operations_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    project(tmp_path, "https://api.hubapi.com", {"max_records": 500})
    problems = check_problems(tmp_path)
    assert len(problems) == 1, problems
    assert "flows/f.yaml:" in problems[0]
    assert "max_records 500 is beyond this API's documented limit of 100" in problems[0]


def test_check_refuses_batch_on_a_connector_that_cannot(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    write_project(
        tmp_path,
        {
            "systems.yaml": """
            website:
              owner: web
              webhook: {scheme: standard_webhooks, secrets: [{secret: website_whsec}]}
            mail:
              kind: smtp
              owner: ops
              host: 127.0.0.1
              from_address: hub@example.com
            """,
            "flows/f.yaml": """
            purpose: mail
            owner: ops
            trigger: {webhook: {system: website}}
            destinations:
              - name: m
                system: mail
                to: ["ops@example.com"]
                subject: hi
                text: hello
                batch: {max_records: 10}
            """,
        },
    )
    problems = check_problems(tmp_path)
    assert any(
        "flows/f.yaml:" in p and "sends one record per request; remove `batch`" in p for p in problems
    ), problems


def test_check_refuses_batch_of_form_bodies(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    project(tmp_path, "https://api.hubapi.com", {"max_records": 10}, extra_dest={"body_format": "form"})
    problems = check_problems(tmp_path)
    assert any("form-encoded bodies cannot be combined" in p for p in problems), problems


async def test_refused_credentials_pause_the_destination_and_keep_every_member(
    tmp_path, start_hub, monkeypatch
):
    api = FakeHubSpotBatch()
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", "pat-na1-revoked")
    project(tmp_path, url, {"max_records": 100, "max_wait": "200ms"})
    try:
        hub = await start_hub(tmp_path)
        await post_all(hub, contacts(30), per_post=30)

        async def paused() -> bool:
            states = await hub.store.destination_states()
            return states.get(("f", "crm"), ("active",))[0] == "paused"

        await eventually(paused, what="the destination paused")
        assert await statuses(hub) == {"pending": 30}  # waiting, untouched, for a resume
        rows = await hub.store.read(
            lambda c: c.execute(
                "SELECT COUNT(*), MIN(status_code), MAX(status_code) FROM attempts"
            ).fetchone()
        )
        assert tuple(rows) == (30, 401, 401)  # one request: every member has its attempt row
    finally:
        await runner.cleanup()


async def test_sensitive_values_of_any_member_never_reach_the_store(tmp_path, monkeypatch):
    """A batch answer speaks of every member: a 429 body echoing all the inputs is stored, for each
    member, without any member's sensitive value, and so are the members' own results."""
    from tests.conftest import vault_hub

    class Echoing(FakeHubSpotBatch):
        async def upsert(self, request: web.Request) -> web.Response:
            if not self.requests:
                body = await request.json()
                self.requests.append(body)
                phones = [i["properties"]["phone"] for i in body["inputs"]]
                return web.json_response(
                    {
                        "status": "error",
                        "message": f"slow down; you sent {phones}",
                        "category": "RATE_LIMITS",
                    },
                    status=429,
                    headers={"Retry-After": "0"},
                )
            return await super().upsert(request)

    api = Echoing()
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, {"max_records": 100, "max_wait": "300ms"})
    flow_file = tmp_path / "flows" / "f.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["steps"][0]["map"]["properties.phone"] = "phone"
    flow["sensitive"] = ["phone", "properties.phone"]
    flow["encrypt_sensitive"] = True
    flow_file.write_text(yaml.safe_dump(flow))
    phones = [f"+1-555-01{i:02d}-7788" for i in range(5)]
    try:
        async with vault_hub(tmp_path, {"website_whsec": SECRET_WHSEC}) as (hub, log):
            items = [{"email": f"s{i}@example.com", "name": "S", "phone": p} for i, p in enumerate(phones)]
            await post_all(hub, items)

            async def settled() -> bool:
                return await statuses(hub) == {"delivered": 5}

            await eventually(settled, timeout=20, what="5 delivered after the echoing 429")
            assert api.contacts["s0@example.com"]["phone"] == phones[0]  # sent in clear to the API
            rows = await hub.store.read(lambda c: c.execute("SELECT excerpt, error FROM attempts").fetchall())
            assert len(rows) == 10
            stored = " ".join(f"{r[0]} {r[1]}" for r in rows)
            assert "slow down" in stored and "objectWriteTraceId" in stored
            assert not any(p in stored for p in phones), stored
            assert not any(p in log.getvalue() for p in phones)
    finally:
        await runner.cleanup()


async def test_a_batch_whose_results_cannot_be_recorded_is_not_sent_again(tmp_path, start_hub, monkeypatch):
    """The store fills up while a batch is in flight: its members stay leased until their results are on
    disk, nothing is sent meanwhile, and after room returns each member has one attempt and one key."""
    from tests.store.test_disk_full_functional import fill_up, lift, limit_pages

    class Gated(FakeHubSpotBatch):
        gate = asyncio.Event()

        async def upsert(self, request: web.Request) -> web.Response:
            await self.gate.wait()
            return await super().upsert(request)

    api = Gated()
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, {"max_records": 100, "max_wait": "200ms"})
    try:
        hub = await start_hub(tmp_path)
        await post_all(hub, contacts(20), per_post=20)
        await eventually(lambda: hub.hub.flows["f"].workers["crm"].inflight == 20, what="the batch sent")
        await hub.store.write(limit_pages)
        await fill_up(hub.store)
        Gated.gate.set()  # the API answers 200 for all; the store cannot record it
        await asyncio.sleep(2.5)
        assert len(api.requests) == 1  # not sent again while its results wait
        assert await statuses(hub) == {"pending": 20}
        await lift(hub.store)

        async def settled() -> bool:
            return await statuses(hub) == {"delivered": 20}

        await eventually(settled, what="the held results recorded")
        assert len(api.requests) == 1 and all(len(k) == 1 for k in api.keys.values())
        rows = await hub.store.read(  # the filler's rows have no delivery
            lambda c: c.execute("SELECT n, outcome FROM attempts WHERE delivery_id > 0").fetchall()
        )
        assert [tuple(r) for r in rows] == [(1, "success")] * 20
    finally:
        Gated.gate.set()
        await runner.cleanup()


async def test_an_error_naming_no_record_is_never_taken_for_a_delivery():
    """A 2xx listing an error that points at no record: split to find it; alone, the record failed.
    An error with a retryable status of its own retries only that record."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        errors = [{"message": "something was refused"} for x in body if x["n"] == 1]
        errors += [{"i": i, "status": 503, "message": "busy"} for i, x in enumerate(body) if x["n"] == 3]
        return web.json_response({"errors": errors}, status=207 if errors else 200)

    app = web.Application()
    app.router.add_post("/bulk", handle)
    runner, url = await _start(app)
    try:
        s = sink(
            url,
            path="/bulk",
            batch_format={
                "errors": {"path": "body.errors", "ref": "i", "status": "status", "message": "message"}
            },
        )
        pair = await s.send_batch([s.render({"n": n}, f"k{n}") for n in (0, 1)], ["k0", "k1"])
        assert [(o.cls, o.split) for o in pair] == [(OutcomeClass.TERMINAL, True)] * 2
        alone = await s.send_batch([s.render({"n": 1}, "k1")], ["k1"])
        assert [(o.cls, o.split, o.error) for o in alone] == [
            (OutcomeClass.TERMINAL, False, "something was refused")
        ]
        busy = await s.send_batch([s.render({"n": n}, f"k{n}") for n in (2, 3)], ["k2", "k3"])
        assert [o.cls for o in busy] == [OutcomeClass.SUCCESS, OutcomeClass.TRANSIENT]
        await close(s)
    finally:
        await runner.cleanup()


def test_check_refuses_matching_by_key_without_an_item_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    write_project(
        tmp_path,
        {
            "systems.yaml": """
            website:
              owner: web
              webhook: {scheme: standard_webhooks, secrets: [{secret: website_whsec}]}
            api:
              kind: http
              owner: ops
              url: https://api.example.com
            """,
            "flows/f.yaml": """
            purpose: bulk
            owner: ops
            trigger: {webhook: {system: website}}
            destinations:
              - name: bulk
                system: api
                path: /bulk
                batch: {max_records: 10}
                batch_format:
                  errors: {path: body.errors, ref: trace, match: key}
            """,
        },
    )
    problems = check_problems(tmp_path)
    assert any("flows/f.yaml:" in p and "match: key needs `item_key`" in p for p in problems), problems


async def test_a_replayed_member_goes_out_again_under_its_own_key(tmp_path, start_hub, monkeypatch):
    from patchbay.engine.replay import replay
    from patchbay.store.base import Actor

    class Fixable(FakeHubSpotBatch):
        fixed = False

        async def upsert(self, request: web.Request) -> web.Response:
            if not self.fixed:
                return await super().upsert(request)
            body = await request.json()  # the account now takes the value: every input is written
            self.requests.append(body)
            for item in body["inputs"]:
                self.keys[item["id"]].add(item["objectWriteTraceId"])
            results = [{"id": "1", "objectWriteTraceId": i["objectWriteTraceId"]} for i in body["inputs"]]
            return web.json_response({"status": "COMPLETE", "results": results, "errors": []})

    api = Fixable()
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, {"max_records": 100, "max_wait": "200ms"})
    try:
        hub = await start_hub(tmp_path)
        ids = await post_all(hub, contacts(5, bad={2}), per_post=5)

        async def first() -> bool:
            return await statuses(hub) == {"delivered": 4, "dead": 1}

        await eventually(first, what="4 delivered, 1 dead")
        api.fixed = True
        pipelines = {name: fr.pipeline for name, fr in hub.hub.flows.items()}
        rep = await replay(hub.store, pipelines, [ids[2]], None, Actor("test"))
        assert rep.requeued
        for fr in hub.hub.flows.values():
            for w in fr.workers.values():
                w.notify(rescan=True)

        async def replayed() -> bool:
            return await statuses(hub) == {"delivered": 5}

        await eventually(replayed, what="the replayed contact delivered")
        assert len(api.keys["bad-contact-2"]) == 1  # the same key as its first try
        attempts = (await hub.run(ids[2]))["deliveries"][0]["attempts_log"]
        assert [a["outcome"] for a in attempts] == ["terminal", "success"]
        assert attempts[1]["error"].endswith("(1 of 1)")
    finally:
        await runner.cleanup()


async def test_two_changes_of_one_contact_go_in_two_requests_in_arrival_order(
    tmp_path, start_hub, monkeypatch
):
    api = FakeHubSpotBatch()
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, {"max_records": 100, "max_wait": "300ms"})
    try:
        hub = await start_hub(tmp_path)
        items = [
            {"email": "ada@example.com", "name": "Ada"},
            {"email": "bob@example.com", "name": "Bob"},
            {"email": "ADA@example.com", "name": "Augusta"},  # the same contact, changed again
            {"email": "cy@example.com", "name": "Cy"},
        ]
        await post_all(hub, items)

        async def settled() -> bool:
            return await statuses(hub) == {"delivered": 4}

        await eventually(settled, what="4 delivered")
        sent = [[i["id"] for i in r["inputs"]] for r in api.requests]
        assert sent == [["ada@example.com", "bob@example.com", "cy@example.com"], ["ada@example.com"]]
        assert api.contacts["ada@example.com"]["firstname"] == "Augusta"  # the later change wins
    finally:
        await runner.cleanup()


async def test_a_batch_members_answer_is_checked_against_the_response_contract(
    tmp_path, start_hub, monkeypatch
):
    """Each member's success is checked against the flow's pinned answer shape (the request's answer, as
    a batch of one gets it): a field the API starts sending shows as drift in every member's row."""
    from patchbay.contracts import learn

    class Versioned(FakeHubSpotBatch):
        v2 = False

        async def upsert(self, request: web.Request) -> web.Response:
            resp = await super().upsert(request)
            if not self.v2:
                return resp
            answer = orjson.loads(resp.body)  # type: ignore[arg-type]
            answer["requestedAt"] = "2026-12-06T10:00:00Z"  # the API ships a new field
            return web.json_response(answer, status=resp.status)

    api = Versioned()
    runner, url = await fake(api)
    monkeypatch.setenv("HUBSPOT_BATCH_TOKEN", TOKEN)
    project(tmp_path, url, {"max_records": 100, "max_wait": "200ms"})
    sample = {
        "status": "COMPLETE",
        "results": [
            {
                "id": "1",
                "properties": {"email": "a@b.co", "firstname": "A"},
                "new": True,
                "objectWriteTraceId": "k",
            }
        ],
        "errors": [],
        "numErrors": 0,
    }
    pinned = learn("f", [])
    pinned.responses = {"crm": learn("f", [sample])}
    (tmp_path / "flows" / "f.contract.yaml").write_text(pinned.dump())
    try:
        hub = await start_hub(tmp_path)
        ids = await post_all(hub, contacts(3), per_post=3)

        async def delivered(n: int) -> bool:
            return await statuses(hub) == {"delivered": n}

        await eventually(lambda: delivered(3), what="3 delivered")
        notes = [(await hub.run(i))["deliveries"][0]["attempts_log"][0]["error"] for i in ids]
        assert not any("DRIFT" in n for n in notes), notes
        api.v2 = True
        ids = await post_all(hub, [{"email": f"v2-{i}@example.com", "name": "V"} for i in range(3)])
        await eventually(lambda: delivered(6), what="6 delivered")
        notes = [(await hub.run(i))["deliveries"][0]["attempts_log"][0]["error"] for i in ids]
        assert all("DRIFT" in n and "requestedAt: new field" in n for n in notes), notes
    finally:
        await runner.cleanup()
