"""Presets' batch operations through a running hub, each against a fake that answers in the vendor's
documented batch shape: many records in one request, one refused record dead-lettered alone."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.conftest import _start, eventually, write_project

TOKEN = "batch-op-token-0123456789"


async def mailchimp(request: web.Request, seen: list[Any]) -> web.Response:
    """POST /3.0/lists/{list_id}: members[] (up to 500) and update_existing; errors[] name the email."""
    body = await request.json()
    seen.append(body)
    assert body["update_existing"] is True and len(body["members"]) <= 500
    new, errors = [], []
    for m in body["members"]:
        if "@" not in m["email_address"]:
            errors.append(
                {
                    "email_address": m["email_address"],
                    "error": f"{m['email_address']} looks fake or invalid, please enter a real email address.",
                    "error_code": "ERROR_GENERIC",
                }
            )
        else:
            h = hashlib.md5(m["email_address"].lower().encode()).hexdigest()
            new.append({"id": h, "email_address": m["email_address"], "status": m["status"]})
    return web.json_response(
        {
            "new_members": new,
            "updated_members": [],
            "errors": errors,
            "total_created": len(new),
            "total_updated": 0,
            "error_count": len(errors),
        }
    )


async def jira(request: web.Request, seen: list[Any]) -> web.Response:
    """POST /rest/api/3/issue/bulk: issueUpdates[] (up to 50); errors[].failedElementNumber is the position."""
    body = await request.json()
    seen.append(body)
    assert len(body["issueUpdates"]) <= 50
    issues, errors = [], []
    for i, u in enumerate(body["issueUpdates"]):
        if not u["fields"].get("summary"):
            errors.append(
                {
                    "status": 400,
                    "elementErrors": {
                        "errorMessages": [],
                        "errors": {"summary": "You must specify a summary."},
                    },
                    "failedElementNumber": i,
                }
            )
        else:
            n = 10000 + len(issues)
            issues.append(
                {"id": str(n), "key": f"SUP-{n}", "self": f"https://x.atlassian.net/rest/api/3/issue/{n}"}
            )
    return web.json_response({"issues": issues, "errors": errors}, status=201 if issues else 400)


async def sheets(request: web.Request, seen: list[Any]) -> web.Response:
    """POST /v4/spreadsheets/{id}/values/{range}:append {values: [[...], ...]}."""
    body = await request.json()
    seen.append(body)
    rows = body["values"]
    return web.json_response(
        {
            "spreadsheetId": "1BxiMVs0XRA5",
            "updates": {"updatedRows": len(rows), "updatedRange": "Sheet1!A2:C9"},
        }
    )


async def brevo(request: web.Request, seen: list[Any]) -> web.Response:
    """POST /v3/contacts/batch {contacts[]}: 204 when every contact is updated, else 400 for the request."""
    assert request.headers["api-key"] == TOKEN
    body = await request.json()
    seen.append(body)
    if any("@" not in c["email"] for c in body["contacts"]):
        return web.json_response(
            {"code": "invalid_parameter", "message": "Invalid email address"}, status=400
        )
    return web.Response(status=204)


async def hubspot_deals(request: web.Request, seen: list[Any]) -> web.Response:
    """POST /crm/v3/objects/deals/batch/create: inputs[] with objectWriteTraceId; 207 names the refused."""
    body = await request.json()
    seen.append(body)
    results, errors = [], []
    for i, item in enumerate(body["inputs"]):
        trace = item["objectWriteTraceId"]
        if not item["properties"].get("dealname"):
            errors.append(
                {
                    "status": "error",
                    "category": "VALIDATION_ERROR",
                    "message": "Property values were not valid: dealname is required",
                    "context": {"objectWriteTraceId": [trace]},
                }
            )
        else:
            results.append(
                {"id": str(9000 + i), "properties": item["properties"], "objectWriteTraceId": trace}
            )
    answer = {"status": "COMPLETE", "results": results, "errors": errors, "numErrors": len(errors)}
    return web.json_response(answer, status=207 if errors else 201)


@dataclass
class Op:
    preset: str
    system: dict[str, Any]
    route: str
    handler: Callable[[web.Request, list[Any]], Awaitable[web.Response]]
    operation: str
    vars: dict[str, str]
    record: Callable[[int], dict[str, Any]]  # record i; the bad one is record 4 (None if none)
    bad: int | None
    items: str
    split: bool = False  # the API refuses the whole request: the engine splits it to find the bad record
    result_id: Callable[[dict[str, Any]], str] | None = None  # a record's id in the answer's results


OPS = [
    Op(
        "mailchimp",
        {
            "url": "/3.0",
            "auth": {"scheme": "basic", "username": "patchbay", "password": {"env": "BATCH_OP_TOKEN"}},
        },
        "/3.0/lists/{list_id}",
        mailchimp,
        "batch_members",
        {"list_id": "a1b2c3"},
        lambda i: {
            "email_address": f"m{i}@example.com" if i != 4 else "nobody",
            "merge_fields": {"FNAME": f"M{i}"},
        },
        4,
        "members",
        result_id=lambda rec: hashlib.md5(rec["email_address"].lower().encode()).hexdigest(),
    ),
    Op(
        "jira",
        {"auth": {"scheme": "basic", "username": "me@example.com", "password": {"env": "BATCH_OP_TOKEN"}}},
        "/rest/api/3/issue/bulk",
        jira,
        "create_issues",
        {},
        lambda i: {
            "fields": {
                "project": {"key": "SUP"},
                "issuetype": {"name": "Task"},
                "summary": f"Call {i}" if i != 4 else "",
            }
        },
        4,
        "issueUpdates",
    ),
    Op(
        "google_sheets",
        {"url": "/v4", "auth": {"scheme": "bearer", "token": {"env": "BATCH_OP_TOKEN"}}},
        "/v4/spreadsheets/{sid}/values/{range}",
        sheets,
        "append_row",
        {"spreadsheet_id": "1BxiMVs0XRA5", "range": "Sheet1!A1"},
        lambda i: {"values": [f"o-{i}", f"c{i}@example.com", i]},
        None,
        "values",
    ),
    Op(
        "brevo",
        {
            "url": "/v3",
            "auth": {"scheme": "api_key", "header": "api-key", "token": {"env": "BATCH_OP_TOKEN"}},
        },
        "/v3/contacts/batch",
        brevo,
        "update_contacts",
        {},
        lambda i: {
            "email": f"b{i}@example.com" if i != 4 else "b4-at-example.com",
            "attributes": {"FIRSTNAME": "B"},
        },
        4,
        "contacts",
        split=True,
    ),
    Op(
        "hubspot",
        {"auth": {"scheme": "bearer", "token": {"env": "BATCH_OP_TOKEN"}}},
        "/crm/v3/objects/deals/batch/create",
        hubspot_deals,
        "create_deals",
        {},
        lambda i: {
            "properties": {"dealname": f"Deal {i}" if i != 4 else "", "dealstage": "appointmentscheduled"}
        },
        4,
        "inputs",
    ),
]


@pytest.mark.parametrize("op", OPS, ids=[o.preset for o in OPS])
async def test_batch_operation(op: Op, tmp_path, start_hub, monkeypatch) -> None:
    seen: list[Any] = []

    async def handle(request: web.Request) -> web.Response:
        return await op.handler(request, seen)

    app = web.Application()
    app.router.add_post(op.route, handle)
    runner, url = await _start(app)
    monkeypatch.setenv("BATCH_OP_TOKEN", TOKEN)
    system = {**op.system, "url": url + op.system.get("url", "")}
    write_project(
        tmp_path,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": yaml.safe_dump(
                {
                    "website": {
                        "owner": "web",
                        "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
                    },
                    "app": {"preset": op.preset, "owner": "ops", "allow_private_network": True, **system},
                }
            ),
            "flows/f.yaml": yaml.safe_dump(
                {
                    "purpose": "many records, few requests",
                    "owner": "ops",
                    "trigger": {"webhook": {"system": "website", "batch": True}},
                    "destinations": [
                        {
                            "name": "app",
                            "system": "app",
                            "operation": op.operation,
                            "vars": op.vars,
                            "batch": {"max_records": 50, "max_wait": "300ms"},
                            **({"response": {"id": "result.id"}} if op.result_id else {}),
                            "delivery": {"rate_limit_per_s": 100},
                        }
                    ],
                }
            ),
        },
    )
    try:
        hub = await start_hub(tmp_path)
        status, body = await hub.post("/hooks/f", [op.record(i) for i in range(10)])
        assert status == 202
        ids = body["event_ids"]
        want = {"delivered": 9, "dead": 1} if op.bad is not None else {"delivered": 10}

        async def settled() -> bool:
            rows = await hub.store.read(
                lambda c: c.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall()
            )
            return {r[0]: r[1] for r in rows} == want

        await eventually(settled, what=str(want))
        if op.split:  # 10 refused -> 5 + 5, one half refused -> ... -> the one record alone
            assert len(seen[0][op.items]) == 10 and len(seen) <= 2 * 10 - 1
            assert sum(len(b[op.items]) == 1 for b in seen) >= 1
        else:
            assert [len(b[op.items]) for b in seen] == [10]  # one request for all ten
        if op.bad is not None:
            run = await hub.run(ids[op.bad])
            assert run["deliveries"][0]["status"] == "dead"
            assert run["deliveries"][0]["attempts_log"][0]["error"].startswith("batch ")
        if op.result_id is not None:  # each record's own id, from its own element of the results
            run = await hub.run(ids[0])
            assert run["deliveries"][0]["response"] == {"id": op.result_id(op.record(0))}
    finally:
        await runner.cleanup()
