"""Webhook endpoints: size limits, authentication, JSON or form checks, then persist-before-acknowledge."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from patchbay.config.project import FlowSpec
from patchbay.connectors.base import Batch, SourceRecord
from patchbay.engine.hub import Hub
from patchbay.errors import RejectedRequest, StoreUnavailable
from patchbay.expressions import compile_expr, is_truthy
from patchbay.records import dig, json_depth
from patchbay.security.ratelimit import limits_for, rate_limited
from patchbay.security.webhook_auth import InboundRequest, Verifier
from patchbay.server.forms import FORM_TYPES, media_type, parse_form

log = logging.getLogger("patchbay.webhooks")
STORE_RETRY_AFTER_S = 30  # what a sender waits when the store cannot write (disk full)
KEEP_HEADERS = ("content-type", "user-agent", "webhook-id", "webhook-timestamp", "x-request-id")


def error_response(exc: RejectedRequest, flow: str) -> web.Response:
    body = {"error": exc.code, "message": str(exc), "flow": flow}
    return web.Response(
        status=exc.status, body=orjson.dumps(body), content_type="application/json", headers=exc.headers
    )


class WebhookEndpoint:
    """One flow's endpoint. Everything before `hub.ingest` is checked without touching the store."""

    def __init__(self, hub: Hub, flow: FlowSpec) -> None:
        assert flow.trigger.webhook is not None
        self.hub = hub
        self.flow = flow
        self.trigger = flow.trigger.webhook
        system = hub.project.systems[self.trigger.system]
        assert system.common.webhook is not None and hub.resolver is not None
        self.auth = system.common.webhook
        secrets = [hub.resolver.resolve(r) for r in self.auth.secrets]
        self.verifier = Verifier(self.auth, secrets)
        settings = hub.project.settings
        self.max_body = settings.max_body_bytes
        self.max_depth = settings.max_json_depth
        m = hub.metrics
        self.m_received = m.received.labels(flow.name)
        self.m_rejected = m.rejected
        self.handshakes = [
            (compile_expr(h.when), compile_expr(h.body) if h.body else None, h.status)
            for h in self.trigger.handshakes
        ]

    def reject(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> RejectedRequest:
        return RejectedRequest(status, code, message, headers)

    async def handle(self, request: web.Request) -> web.Response:
        self.m_received.inc()
        # While a destination of this process falls behind: a few at a time (engine/intake.py).
        turn = await self.hub.intake.enter()
        try:
            return await self._handle(request)
        except RejectedRequest as exc:
            self.m_rejected.labels(self.flow.name, exc.code).inc()
            if exc.code == "store_unavailable":  # the store logs the condition once, not each request
                return error_response(exc, self.flow.name)
            log.info(
                "rejected %s %s: %s %s",
                request.method,
                request.path,
                exc.status,
                exc.code,
                extra={"flow": self.flow.name, "code": exc.code, "remote": request.remote},
            )
            return error_response(exc, self.flow.name)
        finally:
            if turn:
                self.hub.intake.leave()

    async def _handle(self, request: web.Request) -> web.Response:
        wait = limits_for(self.hub).check(self.trigger.system, self.auth)  # before reading anything
        if wait is not None:
            raise rate_limited(self.trigger.system, self.auth, wait)
        if not self.flow.enabled:
            raise self.reject(
                503,
                "flow_disabled",
                f"flow {self.flow.name} is disabled; nothing was stored",
                {"Retry-After": "60"},
            )
        length = request.content_length
        if length is not None and length > self.max_body:
            raise self.reject(
                413, "body_too_large", f"body of {length} bytes is over the limit of {self.max_body}"
            )
        body = await _read_limited(request, self.max_body)
        if body is None:
            raise self.reject(413, "body_too_large", f"body is over the limit of {self.max_body} bytes")
        url = str(request.url) if self.verifier.needs_url else ""
        verified = self.verifier.verify(
            InboundRequest(body, request.headers, request.remote, request.method, url)
        )
        ctype = request.headers.get("Content-Type", "")
        record = self.parse(ctype, body)
        for when, answer, code in self.handshakes:  # authenticated above; answered, never stored
            if is_truthy(when.search(record)):
                value = answer.search(record) if answer is not None else None
                log.info("answered a handshake of %s", self.trigger.system, extra={"flow": self.flow.name})
                if value is None:
                    return web.Response(status=code)
                return web.Response(status=code, body=orjson.dumps(value), content_type="application/json")
        meta: dict[str, Any] = {k: request.headers[k] for k in KEEP_HEADERS if k in request.headers}
        meta["remote"] = request.remote
        if isinstance(record, list):  # a batch (the trigger says so): every element one event
            return await self._ingest_batch(record, verified.event_id, request, meta)
        dedupe: str | None = verified.event_id
        if dedupe is None and self.trigger.id_header:
            dedupe = request.headers.get(self.trigger.id_header)
        if dedupe is None and self.trigger.id_path:
            v = dig(record, self.trigger.id_path)
            dedupe = None if v is None else str(v)
        if media_type(ctype) in FORM_TYPES:  # the stored payload is the record, so a replay reads JSON
            body = orjson.dumps(record)
        try:
            accepted, status = await self.hub.ingest(
                self.flow.name, body, record, dedupe_key=dedupe, meta=meta
            )
        except StoreUnavailable as exc:
            raise self.reject(
                503,
                "store_unavailable",
                f"the hub cannot store events right now ({exc.condition}); nothing was stored: send it again later",
                {"Retry-After": str(STORE_RETRY_AFTER_S)},
            ) from exc
        if accepted.conflict:
            raise self.reject(
                409,
                "replayed_id",
                f"event id {dedupe!r} was already received with a different body; a new event needs a new id",
            )
        if accepted.duplicate:
            return _json(200, {"event_id": accepted.event_id, "status": "duplicate"})
        return _json(self.trigger.accept_status, {"event_id": accepted.event_id, "status": status})

    def parse(self, ctype: str, body: bytes) -> Any:
        """The record (or, for a batch trigger, the list of records) a body makes; RejectedRequest if none."""
        kind = media_type(ctype)
        if kind in FORM_TYPES:
            record: Any = parse_form(ctype, body, self.trigger.files)
        elif ctype and "json" not in kind:
            raise self.reject(
                415,
                "unsupported_media_type",
                f"expected Content-Type application/json, application/x-www-form-urlencoded or "
                f"multipart/form-data, got {ctype}",
            )
        elif not body.strip():
            raise self.reject(400, "empty_body", "the body is empty; send a JSON object")
        else:
            try:
                record = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise self.reject(400, "malformed_json", f"the body is not valid JSON: {exc}") from exc
        if isinstance(record, list) and self.trigger.batch:
            if not record:
                raise self.reject(422, "empty_batch", "the batch is an empty array; send at least one object")
            for i, item in enumerate(record):
                if not isinstance(item, dict):
                    raise self.reject(
                        422,
                        "not_an_object",
                        f"element {i} of the batch is a {type(item).__name__}; each element must be an object",
                    )
        elif not isinstance(record, dict):
            hint = " (set `batch: true` on the flow's webhook trigger to take an array as a batch)"
            raise self.reject(
                422,
                "not_an_object",
                f"expected a JSON object, got {type(record).__name__}"
                + (hint if isinstance(record, list) else ""),
            )
        if json_depth(record, self.max_depth) > self.max_depth:
            raise self.reject(400, "too_deep", f"JSON nested deeper than {self.max_depth} levels")
        return record

    async def _ingest_batch(
        self, items: list[dict[str, Any]], sender_id: str | None, request: web.Request, meta: dict[str, Any]
    ) -> web.Response:
        """Every element one event, all in one transaction. An element's dedupe key is its id_path value,
        else the request's id (signature scheme or id_header) with its index, so a re-sent batch is known."""
        if sender_id is None and self.trigger.id_header:
            sender_id = request.headers.get(self.trigger.id_header)
        records = []
        for i, item in enumerate(items):
            key: str | None = None
            if self.trigger.id_path:
                v = dig(item, self.trigger.id_path)
                key = None if v is None else str(v)
            if key is None and sender_id is not None:
                key = f"{sender_id}#{i}"
            records.append(SourceRecord(item, id=key, raw=orjson.dumps(item)))
        try:
            accepted = await self.hub.ingest_batch(self.flow.name, Batch(records), meta=meta)
        except StoreUnavailable as exc:
            raise self.reject(
                503,
                "store_unavailable",
                f"the hub cannot store events right now ({exc.condition}); nothing was stored: send it again later",
                {"Retry-After": str(STORE_RETRY_AFTER_S)},
            ) from exc
        events = [
            {
                "event_id": a.event_id,
                "status": "replayed_id" if a.conflict else "duplicate" if a.duplicate else "accepted",
            }
            for a in accepted
        ]
        # 202 when anything was stored; else 409 if an element reused a known id with another body, else 200.
        status: int = self.trigger.accept_status if any(e["status"] == "accepted" for e in events) else 200
        if status == 200 and any(a.conflict for a in accepted):
            status = 409
        return _json(status, {"event_ids": [a.event_id for a in accepted], "events": events})


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None past `limit`. A declared length was checked against the limit already (and the
    parser never reads past it): read it in one go; a chunked body is counted as it arrives."""
    if request.content_length is not None and request.content_length <= limit:
        return await request.read()
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
