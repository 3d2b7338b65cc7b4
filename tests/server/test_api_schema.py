"""The API accepts exactly what its OpenAPI document says: parameters and bodies, checked from the document."""

from __future__ import annotations

from typing import Any

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="pip install schemathesis (a dev dependency)")


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, ops in doc["paths"].items()
        if path.startswith("/api/v1/") and "{" not in path
        for method, op in ops.items()
    ]


async def test_date_time_query_parameters_take_only_date_times(api):
    doc = await api.get("/api/v1/openapi.json", token=None)
    checked = []
    for method, path, op in _operations(doc):
        for p in op.get("parameters", []):
            if p["in"] != "query" or p["schema"].get("format") != "date-time":
                continue
            checked.append((path, p["name"]))
            for good in ("2026-11-23T10:00:00Z", "2026-11-23T10:00", "2026-11-23T10:00:00.5%2B01:00"):
                status, body = await api.call(method, f"{path}?{p['name']}={good}")
                assert status == 200, (path, p["name"], good, body)
            for bad in ("0.5", "1700000000", "2026-11-23", "yesterday", "2026-11-23T10:00:00 01:00"):
                status, err = await api.call(method, path, params={p["name"]: bad})
                assert (status, err["error"]) == (422, "invalid_request"), (path, p["name"], bad)
                assert err["details"][0]["loc"] == ["query", p["name"]]
                assert "ISO 8601" in err["message"], err["message"]
    assert {("/api/v1/runs", "until"), ("/api/v1/runs", "since"), ("/api/v1/audit", "since")} <= set(checked)


REPLAY_BODIES: list[Any] = [
    {},
    {"all": False},
    {"all": True},
    {"all": True, "flow": "lead-capture", "destination": "crm", "reason": "HTTP 4"},
    {"all": True, "run_ids": None},
    {"run_ids": ["evt_1"]},
    {"run_ids": ["evt_1"], "destination": "crm"},
    {"run_ids": ["evt_1"], "all": False},
    {"run_ids": ["evt_1"], "all": True},
    {"run_ids": ["evt_1"], "flow": "lead-capture"},
    {"run_ids": ["evt_1"], "reason": "HTTP"},
    {"run_ids": None},
    {"run_ids": []},
    {"all": True, "bogus": 1},
    {"destination": "crm"},
]


@pytest.mark.parametrize("op", ["dead-letters/replay", "dead-letters/discard"])
async def test_bodies_are_refused_exactly_when_the_document_refuses_them(api, op):
    doc = await api.get("/api/v1/openapi.json", token=None)
    schema = doc["paths"][f"/api/v1/{op}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
    bodies = REPLAY_BODIES + [{"run_ids": ["evt_1"], "destination": None}, {"run_ids": ["evt 1"]}]
    for body in bodies:
        allowed = validator.is_valid(body)
        status, answer = await api.call("POST", op, json=body)
        assert (status != 422) == allowed, (body, allowed, status, answer)
        if not allowed:
            assert answer["details"][0]["loc"][0] == "body"


async def test_the_admin_scope_is_named_once(api):
    doc = await api.get("/api/v1/openapi.json", token=None)
    admin_ops = [
        op for ops in doc["paths"].values() for op in ops.values() if op.get("x-required-scope") == "admin"
    ]
    assert admin_ops
    for op in admin_ops:
        assert "`admin` (or `admin`)" not in op["description"] and "scope `admin`" in op["description"]
    status, err = await api.call("GET", "audit", token="reader")
    assert status == 403 and "(or admin)" not in err["message"] and "scope admin" in err["message"]
    status, err = await api.call("GET", "secrets", token="reader")
    assert status == 403 and "scope secrets:read (or admin)" in err["message"]
