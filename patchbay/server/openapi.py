"""The OpenAPI 3.1 document of the REST API, generated from the endpoint table and its pydantic models."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from patchbay.security.tokens import SCOPES
from patchbay.server.api_models import ErrorOut, StatusOut

REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "bearerToken"


@dataclass(frozen=True)
class Endpoint:
    """One API operation: its route, the scope it needs and the models of its input and output."""

    method: str
    path: str
    handler: Callable[..., Awaitable[Any]]
    scope: str | None  # None: any valid token
    summary: str
    tag: str
    response: type[BaseModel] | None = None
    status: int = 200
    query: type[BaseModel] | None = None
    path_params: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    description: str = ""

    @property
    def operation_id(self) -> str:
        return self.handler.__name__.lstrip("_")


def _strip_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: drop the null branch of `X | None`."""
    any_of = schema.get("anyOf")
    if any_of:
        rest = [s for s in any_of if s.get("type") != "null"]
        if len(rest) == 1:
            out = {k: v for k, v in schema.items() if k != "anyOf"}
            out.update(rest[0])
            if out.get("default", 0) is None:
                out.pop("default")
            return out
    return schema


def _parameters(model: type[BaseModel], where: str, defs: dict[str, Any]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF)
    defs.update(schema.pop("$defs", {}))
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = _strip_null(dict(prop))
        description = prop.pop("description", None)
        prop.pop("title", None)
        param: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": prop,
        }
        if description:
            param["description"] = description
        out.append(param)
    return out


def _error(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_openapi(endpoints: list[Endpoint], *, version: str) -> dict[str, Any]:
    outputs = {ErrorOut, StatusOut} | {ep.response for ep in endpoints if ep.response is not None}
    inputs = {ep.body for ep in endpoints if ep.body is not None}
    wanted = [(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)]
    wanted += [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)]
    refs, top = models_json_schema(wanted, ref_template=REF)  # type: ignore[arg-type]
    schemas: dict[str, Any] = dict(top.get("$defs", {}))

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return dict(refs[(model, mode)])  # type: ignore[index]

    err = ref(ErrorOut, "serialization")
    status_ref = ref(StatusOut, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op: dict[str, Any] = {
            "operationId": ep.operation_id,
            "summary": ep.summary,
            "tags": [ep.tag],
            "security": [{SECURITY_SCHEME: [ep.scope] if ep.scope else []}],
            "x-required-scope": ep.scope,
        }
        desc = ep.description or ""
        if ep.scope is None:
            desc += "\n\nRequires any valid token."
        elif ep.scope == "admin":
            desc += "\n\nRequires a token with scope `admin`."
        else:
            desc += f"\n\nRequires a token with scope `{ep.scope}` (or `admin`)."
        op["description"] = desc.strip()
        params: list[dict[str, Any]] = []
        if ep.path_params is not None:
            params += _parameters(ep.path_params, "path", schemas)
        if ep.query is not None:
            params += _parameters(ep.query, "query", schemas)
        if params:
            op["parameters"] = params
        if ep.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(ep.body, "validation")}},
            }
        responses: dict[str, Any] = {}
        ok = "Success."
        if ep.response is not None:
            responses[str(ep.status)] = {
                "description": ok,
                "content": {"application/json": {"schema": ref(ep.response, "serialization")}},
            }
        else:
            responses[str(ep.status)] = {"description": ok}
        if ep.body is not None:
            responses["400"] = _error("The body is empty or not JSON.", err)
            responses["415"] = _error("The body is not sent as application/json.", err)
        if ep.body is not None or ep.query is not None or ep.path_params is not None:
            responses["422"] = _error("A parameter or the body is invalid; `details` says where.", err)
        responses["401"] = _error("Missing, malformed, unknown, expired or revoked token.", err)
        if ep.scope is not None:
            responses["403"] = _error("The token lacks the scope this endpoint needs (in `scope`).", err)
        if ep.path_params is not None:
            responses["404"] = _error("No such flow, destination, run, secret or token.", err)
        if ep.method in ("POST", "PUT", "DELETE"):
            responses["409"] = _error("Conflicts with the current state (e.g. no vault yet).", err)
        responses["413"] = _error("The request body is too large.", err)
        op["responses"] = responses
        paths.setdefault(_openapi_path(ep.path), {})[ep.method.lower()] = op
    health = (
        ("/healthz", "The process is up."),
        (
            "/readyz",
            "The store answers and every worker runs; 503 (with the reason) when not. 200 with status "
            "`degraded` and `problems` (flow: what is wrong) while a source or schedule is paused, stopped or failing.",
        ),
    )
    for path, what in health:
        paths[path] = {
            "get": {
                "operationId": path.strip("/"),
                "summary": what,
                "tags": ["health"],
                "security": [],
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": status_ref}}},
                    **(
                        {
                            "503": {
                                "description": "Not ready",
                                "content": {"application/json": {"schema": status_ref}},
                            }
                        }
                        if path == "/readyz"
                        else {}
                    ),
                },
            }
        }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "tags": ["health"],
            "security": [],
            "summary": "Prometheus metrics. Public: counts and latencies by flow and destination; no payloads or "
            "secrets.",
            "responses": {
                "200": {
                    "description": "Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    paths["/api/v1/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "tags": ["meta"],
            "security": [],
            "summary": "This document (public).",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    scopes = "\n".join(f"- `{s}`: {d}" for s, d in SCOPES.items())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Patchbay API",
            "version": version,
            "description": (
                "The hub's REST API: systems, flows, the map, runs and traces, dead letters with replay, "
                "destinations, source cursors, schedules, secrets (names only), tokens and the audit log.\n\n"
                "Every `/api/v1` endpoint but this document needs `Authorization: Bearer pbt_...` "
                "(`patchbay tokens create NAME --scope ...`). Scopes:\n\n" + scopes + "\n\n"
                'Errors are JSON: `{"error": code, "message": ...}`. Every change is written to the '
                "audit log."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{SECURITY_SCHEME: []}],
        "tags": [{"name": t} for t in dict.fromkeys([*(ep.tag for ep in endpoints), "health", "meta"])],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "pbt_<id>_<secret>",
                    "description": "A token from `patchbay tokens create`; each operation names its scope.",
                }
            },
        },
    }


def _openapi_path(path: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)
