"""`patchbay init --template stripe-hubspot`, run by a real hub against local fakes that answer in
HubSpot's and Stripe's documented shapes: find-or-create of the contact, its id written back to the
customer, each call once per key, a customer re-sent by Stripe handled once."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
import yaml
from aiohttp import web

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.scaffold import create_project
from tests.conftest import eventually


class Fakes:
    """HubSpot: POST /crm/v3/objects/contacts/search ({total, results}) and POST /crm/v3/objects/contacts
    (201 {id, properties}); Stripe: POST /v1/customers/{id} keeps the customer's metadata."""

    def __init__(self) -> None:
        self.contacts: dict[str, str] = {"grace@example.com": "42"}  # email -> id
        self.metadata: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, int] = defaultdict(int)
        self.auth: set[str] = set()

    async def search(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.json()
        email = body["filterGroups"][0]["filters"][0]["value"]
        found = (
            [{"id": self.contacts[email], "properties": {"email": email}}] if email in self.contacts else []
        )
        return web.json_response({"total": len(found), "results": found})

    async def create(self, request: web.Request) -> web.Response:
        self._seen(request)
        props = (await request.json())["properties"]
        if props["email"] in self.contacts:
            return web.json_response({"status": "error", "category": "CONFLICT"}, status=409)
        self.contacts[props["email"]] = str(500 + len(self.contacts))
        return web.json_response({"id": self.contacts[props["email"]], "properties": props}, status=201)

    async def update_customer(self, request: web.Request) -> web.Response:
        self._seen(request)
        cid = request.match_info["id"]
        if request.content_type != "application/x-www-form-urlencoded":  # Stripe takes form bodies only
            return web.json_response({"error": {"type": "invalid_request_error"}}, status=400)
        form = await request.post()
        metadata = {k[len("metadata[") : -1]: str(v) for k, v in form.items() if k.startswith("metadata[")}
        self.metadata.setdefault(cid, {}).update(metadata)
        return web.json_response({"id": cid, "object": "customer", "metadata": self.metadata[cid]})

    def _seen(self, request: web.Request) -> None:
        self.keys[f"{request.path}|{request.headers['Idempotency-Key']}"] += 1
        self.auth.add(request.headers["Authorization"].split(" ")[0])


async def test_the_template_runs_end_to_end_against_fakes(tmp_path):
    fakes = Fakes()
    app = web.Application()
    app.router.add_post("/crm/v3/objects/contacts/search", fakes.search)
    app.router.add_post("/crm/v3/objects/contacts", fakes.create)
    app.router.add_post("/v1/customers/{id}", fakes.update_customer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake_url = f"http://{host}:{port}"

    root = tmp_path / "sh"
    create_project(root, template="stripe-hubspot")
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    for name in ("stripe", "hubspot"):
        systems[name]["url"] = fake_url
        systems[name]["allow_private_network"] = True
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    hub = Hub(load_or_raise(root))
    await hub.start()
    flow = "stripe-customer-to-hubspot"
    try:
        events: list[dict[str, Any]] = [
            {
                "id": "evt_1",
                "type": "customer.created",
                "data": {"object": {"id": "cus_1", "email": "Ada@Example.com"}},
            },
            {
                "id": "evt_2",
                "type": "customer.created",
                "data": {"object": {"id": "cus_2", "email": "grace@example.com"}},
            },
        ]
        ids = []
        for e in events:
            accepted, _ = await hub.ingest(flow, orjson.dumps(e), e, dedupe_key=e["id"])
            ids.append(accepted.event_id)
        again, _ = await hub.ingest(flow, orjson.dumps(events[0]), events[0], dedupe_key="evt_1")
        assert again.duplicate  # Stripe re-sends: stored once, nothing asked again

        async def written() -> bool:
            return set(fakes.metadata) == {"cus_1", "cus_2"}

        await eventually(written, what="both customers' metadata written")
        assert fakes.metadata == {"cus_1": {"hubspot_id": "501"}, "cus_2": {"hubspot_id": "42"}}
        assert fakes.contacts == {"grace@example.com": "42", "ada@example.com": "501"}
        ada, grace = ids
        assert dict(fakes.keys) == {
            f"/crm/v3/objects/contacts/search|{ada}.find_contact": 1,
            f"/crm/v3/objects/contacts|{ada}.create_contact": 1,
            f"/v1/customers/cus_1|{ada}.billing": 1,
            f"/crm/v3/objects/contacts/search|{grace}.find_contact": 1,
            f"/v1/customers/cus_2|{grace}.billing": 1,
        }
        assert fakes.auth == {"Bearer"}
        assert hub.store is not None
        run = await hub.store.get_run(ada)
        assert run is not None and run["status"] == "delivered"
        assert [d["destination"] for d in run["deliveries"]] == [
            "call:find_contact",
            "call:create_contact",
            "billing",
        ]
    finally:
        await hub.stop()
        await runner.cleanup()
