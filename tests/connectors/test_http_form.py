"""`body_format: form` on the http destination: Stripe's bracket-style form bodies, checked by a fake that
parses them the way a form server does."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import yaml
from aiohttp import web

from patchbay.connectors.http_batch import form_encode
from tests.conftest import _start, eventually, write_project

STRIPE_KEY = "sk_test_form0000000000000000000000"


class FakeStripe:
    """POST /v1/customers and /v1/customers/{id}: form-encoded bodies only, as Stripe's API takes them."""

    def __init__(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}
        self.seen: list[tuple[str, list[tuple[str, str]], str]] = []  # path, fields, idempotency key

    async def write(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {STRIPE_KEY}":
            return web.json_response({"error": {"type": "invalid_request_error"}}, status=401)
        if request.content_type != "application/x-www-form-urlencoded":
            return web.json_response(
                {
                    "error": {
                        "type": "invalid_request_error",
                        "message": "Invalid request: unsupported Content-Type",
                    }
                },
                status=400,
            )
        fields = parse_qsl((await request.read()).decode(), keep_blank_values=True)
        self.seen.append((request.path, fields, request.headers.get("Idempotency-Key", "")))
        cid = request.match_info.get("id") or f"cus_{len(self.customers) + 1:04d}"
        customer = self.customers.setdefault(cid, {"id": cid, "object": "customer", "metadata": {}})
        for name, value in fields:
            if name.startswith("metadata[") and name.endswith("]"):
                customer["metadata"][name[9:-1]] = value
            elif "[" in name:
                return web.json_response(
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "message": f"Received unknown parameter: {name}",
                        }
                    },
                    status=400,
                )
            else:
                customer[name] = value
        return web.json_response(customer)


def test_form_encoding_is_stripes_bracket_style():
    body = {
        "email": "a@b.io",
        "metadata": {"plan": "pro", "seats": 3},
        "items": [{"price": "p_1"}],
        "x": None,
    }
    assert parse_qsl(form_encode(body)) == [
        ("email", "a@b.io"),
        ("metadata[plan]", "pro"),
        ("metadata[seats]", "3"),
        ("items[0][price]", "p_1"),
    ]
    assert form_encode({"ok": True, "off": False, "note": ""}) == "ok=true&off=false&note="


async def test_stripe_create_and_update_customer_with_form_bodies(tmp_path, start_hub, monkeypatch):
    api = FakeStripe()
    app = web.Application()
    app.router.add_post("/v1/customers", api.write)
    app.router.add_post("/v1/customers/{id}", api.write)
    runner, url = await _start(app)
    monkeypatch.setenv("STRIPE_FORM_KEY", STRIPE_KEY)
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "billing": {
            "preset": "stripe",
            "owner": "finance",
            "url": url,
            "allow_private_network": True,
            "auth": {"scheme": "bearer", "token": {"env": "STRIPE_FORM_KEY"}},
        },
    }
    flow = {
        "purpose": "customers into billing",
        "owner": "finance",
        "trigger": {"webhook": {"system": "website"}},
        "steps": [
            {"map": {"email": "email", "name": "name", "id": "customer_id", "metadata.hubspot_id": "crm_id"}}
        ],
        "destinations": [
            {"name": "create", "system": "billing", "operation": "create_customer", "when": "!id"},
            {"name": "update", "system": "billing", "operation": "update_customer", "when": "id"},
        ],
    }
    write_project(
        tmp_path,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": yaml.safe_dump(systems),
            "flows/f.yaml": yaml.safe_dump(flow),
        },
    )
    try:
        hub = await start_hub(tmp_path)
        status, created = await hub.post(
            "/hooks/f", {"email": "ada@example.com", "name": "Ada L", "crm_id": 512}
        )
        assert status == 202

        async def one() -> bool:
            return len(api.seen) == 1

        await eventually(one, what="the create")
        path, fields, key = api.seen[0]
        assert path == "/v1/customers" and key == f"{created['event_id']}.create"
        assert fields == [("email", "ada@example.com"), ("name", "Ada L"), ("metadata[hubspot_id]", "512")]
        run = await hub.run(created["event_id"])
        assert run["deliveries"][0]["status"] == "delivered"
        assert run["deliveries"][0]["response"] == {"id": "cus_0001"}

        status, _ = await hub.post("/hooks/f", {"customer_id": "cus_0001", "crm_id": "513"})
        assert status == 202

        async def two() -> bool:
            return len(api.seen) == 2

        await eventually(two, what="the update")
        path, fields, _ = api.seen[1]
        assert path == "/v1/customers/cus_0001" and fields == [("metadata[hubspot_id]", "513")]
        assert api.customers["cus_0001"]["metadata"] == {"hubspot_id": "513"}
        assert api.customers["cus_0001"]["email"] == "ada@example.com"  # left out, so left unchanged
    finally:
        await runner.cleanup()


def test_a_flow_test_reads_a_form_body_as_its_fields(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from patchbay.cli.main import main

    write_project(
        tmp_path,
        {
            "systems.yaml": """
            website:
              owner: web
              webhook: {scheme: standard_webhooks, secrets: [{secret: website_whsec}]}
            billing:
              preset: stripe
              owner: finance
              auth: {scheme: bearer, token: {secret: stripe_key}}
            """,
            "flows/f.yaml": """
            purpose: the CRM id written back to billing
            owner: finance
            trigger: {webhook: {system: website}}
            steps:
              - map: {id: customer, metadata.hubspot_id: crm_id}
            destinations:
              - {name: billing, system: billing, operation: update_customer}
            """,
            "flows/f.test.yaml": """
            tests:
              - name: metadata in Stripe's bracket style
                event: {customer: cus_9, crm_id: 512}
                expect:
                  deliveries:
                    billing:
                      method: POST
                      path: /v1/customers/cus_9
                      body: {"metadata[hubspot_id]": "512"}
            """,
        },
    )
    res = CliRunner().invoke(main, ["test", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "1 passed, 0 failed" in res.output
