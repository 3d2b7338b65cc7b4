"""Prebuilt definitions against local servers that follow each vendor's published request/response shapes."""

from __future__ import annotations

import hashlib
import time

import orjson
import pytest
import yaml
from aiohttp import web

from patchbay import presets
from tests.conftest import _start, eventually, write_project

HUBSPOT_TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"
MAILCHIMP_KEY = "0123456789abcdef0123456789abcdef-us1"
STRIPE_SECRET = "whsec_test_5f8a0c3e9d2b4a6f8e1c3d5b7a9f0e2d"


class FakeHubSpot:
    """POST /crm/v3/objects/contacts/batch/upsert as documented: inputs[] of {id, idProperty, properties}."""

    def __init__(self) -> None:
        self.contacts: dict[str, dict] = {}
        self.requests: list[dict] = []

    async def upsert(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {HUBSPOT_TOKEN}":
            return web.json_response(
                {
                    "status": "error",
                    "message": "Authentication credentials not found.",
                    "category": "INVALID_AUTHENTICATION",
                },
                status=401,
            )
        body = await request.json()
        self.requests.append(body)
        results = []
        for item in body["inputs"]:
            if item.get("idProperty") != "email" or "@" not in str(item.get("id")):
                return web.json_response(
                    {"status": "error", "category": "VALIDATION_ERROR", "message": "Invalid input JSON"},
                    status=400,
                )
            self.contacts[item["id"]] = {**self.contacts.get(item["id"], {}), **item["properties"]}
            results.append(
                {
                    "id": str(abs(hash(item["id"])) % 10**6),
                    "properties": self.contacts[item["id"]],
                    "new": True,
                }
            )
        return web.json_response(
            {
                "status": "COMPLETE",
                "results": results,
                "startedAt": "2026-11-23T00:00:00Z",
                "completedAt": "2026-11-23T00:00:01Z",
            }
        )


class FakeMailchimp:
    """PUT /3.0/lists/{list_id}/members/{subscriber_hash}, basic auth with the API key as the password."""

    def __init__(self) -> None:
        self.members: dict[tuple[str, str], dict] = {}

    async def put(self, request: web.Request) -> web.Response:
        import base64

        auth = request.headers.get("Authorization", "")
        if base64.b64decode(auth.removeprefix("Basic ")).split(b":", 1)[1].decode() != MAILCHIMP_KEY:
            return web.json_response(
                {
                    "type": "https://mailchimp.com/developer/marketing/docs/errors/",
                    "title": "API Key Invalid",
                    "status": 401,
                },
                status=401,
            )
        body = await request.json()
        h = request.match_info["hash"]
        if hashlib.md5(body["email_address"].lower().encode()).hexdigest() != h:
            return web.json_response(
                {
                    "title": "Invalid Resource",
                    "status": 400,
                    "detail": "The subscriber hash does not match the email",
                },
                status=400,
            )
        key = (request.match_info["list_id"], h)
        member = {**self.members.get(key, {"status": body.get("status_if_new")}), **body, "id": h}
        self.members[key] = member
        return web.json_response(member)


def preset_project(root, systems: dict, flow: dict) -> None:
    write_project(
        root,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": yaml.safe_dump(systems),
            "flows/f.yaml": yaml.safe_dump(flow),
        },
    )


def test_every_preset_loads_and_documents_itself():
    assert {"hubspot", "mailchimp", "slack", "stripe"} <= set(presets.available())
    for name in presets.available():
        doc = presets.load(name)
        assert doc["summary"] and doc["docs"].startswith("https://")
        for op in doc.get("operations", {}).values():
            assert op["description"]


async def test_hubspot_upsert_contact(tmp_path, start_hub, monkeypatch):
    api = FakeHubSpot()
    app = web.Application()
    app.router.add_post("/crm/v3/objects/contacts/batch/upsert", api.upsert)
    runner, url = await _start(app)
    monkeypatch.setenv("PATCHBAY_SECRET_HUBSPOT_TOKEN", HUBSPOT_TOKEN)
    preset_project(
        tmp_path,
        {
            "website": {
                "owner": "web",
                "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
            },
            "crm": {
                "preset": "hubspot",
                "owner": "sales",
                "url": url,
                "allow_private_network": True,
                "auth": {"scheme": "bearer", "token": {"secret": "hubspot_token"}},
            },
        },
        {
            "purpose": "leads into the CRM",
            "owner": "sales",
            "trigger": {"webhook": {"system": "website"}},
            "steps": [{"map": {"properties.email": "lower(email)", "properties.firstname": "first_name"}}],
            "destinations": [{"name": "crm", "system": "crm", "operation": "upsert_contact"}],
        },
    )
    try:
        hub = await start_hub(tmp_path)
        await hub.post("/hooks/f", {"email": "Ada@Example.com", "first_name": "Ada"})
        await hub.post("/hooks/f", {"email": "ada@example.com", "first_name": "Augusta"})

        async def two() -> bool:
            return len(api.requests) == 2

        await eventually(two, what="two upserts")
        assert api.requests[0] == {
            "inputs": [
                {
                    "id": "ada@example.com",
                    "idProperty": "email",
                    "properties": {"email": "ada@example.com", "firstname": "Ada"},
                }
            ]
        }
        assert api.contacts == {"ada@example.com": {"email": "ada@example.com", "firstname": "Augusta"}}
    finally:
        await runner.cleanup()


async def test_mailchimp_upsert_member_with_vars(tmp_path, start_hub, monkeypatch):
    api = FakeMailchimp()
    app = web.Application()
    app.router.add_put("/3.0/lists/{list_id}/members/{hash}", api.put)
    runner, url = await _start(app)
    monkeypatch.setenv("PATCHBAY_SECRET_MAILCHIMP_KEY", MAILCHIMP_KEY)
    preset_project(
        tmp_path,
        {
            "website": {
                "owner": "web",
                "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
            },
            "newsletter": {
                "preset": "mailchimp",
                "owner": "marketing",
                "url": url + "/3.0",
                "allow_private_network": True,
                "auth": {"scheme": "basic", "username": "patchbay", "password": {"secret": "mailchimp_key"}},
            },
        },
        {
            "purpose": "sign-ups join the audience",
            "owner": "marketing",
            "trigger": {"webhook": {"system": "website"}},
            "steps": [{"map": {"email_address": "email", "merge_fields.FNAME": "first_name"}}],
            "destinations": [
                {
                    "name": "audience",
                    "system": "newsletter",
                    "operation": "upsert_member",
                    "vars": {"list_id": "a1b2c3"},
                }
            ],
        },
    )
    try:
        hub = await start_hub(tmp_path)
        await hub.post("/hooks/f", {"email": "Ada@Example.com", "first_name": "Ada"})

        async def stored() -> bool:
            return bool(api.members)

        await eventually(stored, what="member stored")
        [(key, member)] = api.members.items()
        assert key == ("a1b2c3", hashlib.md5(b"ada@example.com").hexdigest())
        assert member["status"] == "subscribed" and member["merge_fields"] == {"FNAME": "Ada"}
    finally:
        await runner.cleanup()


async def test_operation_needs_its_vars(tmp_path):
    from patchbay.config.project import load_project

    preset_project(
        tmp_path,
        {
            "website": {"owner": "web", "webhook": {"scheme": "bearer", "secrets": [{"env": "X"}]}},
            "newsletter": {
                "preset": "mailchimp",
                "owner": "m",
                "auth": {"scheme": "basic", "username": "u", "password": {"env": "Y"}},
            },
        },
        {
            "purpose": "p",
            "owner": "o",
            "trigger": {"webhook": {"system": "website"}},
            "destinations": [{"name": "a", "system": "newsletter", "operation": "upsert_membr"}],
        },
    )
    _, problems = load_project(tmp_path)
    assert "unknown operation 'upsert_membr'" in str(problems[0]) and "did you mean 'upsert_member'" in str(
        problems[0]
    )


async def test_stripe_signed_webhooks_are_verified_and_deduped(tmp_path, start_hub, sink, monkeypatch):
    stripe = pytest.importorskip("stripe")  # an independent implementation of Stripe's signature
    monkeypatch.setenv("PATCHBAY_SECRET_STRIPE_WHSEC", STRIPE_SECRET)
    steps = presets.load("stripe")["example_steps"]
    preset_project(
        tmp_path,
        {
            "payments": {
                "preset": "stripe",
                "owner": "finance",
                "webhook": {"secrets": [{"secret": "stripe_whsec"}]},
            },
            "finance": {"kind": "http", "owner": "finance", "url": sink.url, "allow_private_network": True},
        },
        {
            "purpose": "payments reach finance",
            "owner": "finance",
            "trigger": {"webhook": {"system": "payments"}},
            "record_key": "payment_id",
            "steps": steps,
            "destinations": [{"name": "ledger", "system": "finance", "path": "/payments"}],
        },
    )
    hub = await start_hub(tmp_path)
    event = {
        "id": "evt_1Q2w3E",
        "object": "event",
        "type": "payment_intent.succeeded",
        "data": {
            "object": {
                "id": "pi_3MtwBw",
                "object": "payment_intent",
                "amount": 2000,
                "currency": "usd",
                "customer": "cus_NffrFeUfNV2Hib",
                "status": "succeeded",
            }
        },
    }
    raw = orjson.dumps(event)

    def headers(body: bytes) -> dict[str, str]:
        t = int(time.time())
        sig = stripe.WebhookSignature._compute_signature(f"{t}.{body.decode()}", STRIPE_SECRET)
        return {"Stripe-Signature": f"t={t},v1={sig}"}

    s1, b1 = await hub.post("/hooks/f", raw, headers=headers(raw), sign=False)
    s2, b2 = await hub.post("/hooks/f", raw, headers=headers(raw), sign=False)  # Stripe re-sends
    s3, b3 = await hub.post("/hooks/f", raw, headers={"Stripe-Signature": "t=1,v1=00"}, sign=False)
    assert (s1, s2, s3) == (202, 200, 401)
    assert b2["status"] == "duplicate" and b3["error"] in ("bad_signature", "stale_timestamp")
    await sink.wait_for(1)
    assert sink.received[0].body == {
        "payment_id": "pi_3MtwBw",
        "event_type": "payment_intent.succeeded",
        "amount_cents": 2000,
        "currency": "USD",
        "customer_id": "cus_NffrFeUfNV2Hib",
        "status": "succeeded",
    }
    # Our signature, Stripe's verifier.
    from patchbay.security.webhook_auth import sign_stripe

    h = sign_stripe(STRIPE_SECRET, int(time.time()), raw)
    assert stripe.WebhookSignature.verify_header(raw.decode(), h["Stripe-Signature"], STRIPE_SECRET, 300)
