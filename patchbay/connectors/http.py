"""http: call a REST API: method, URL, headers and JSON (or form) body rendered from the record."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import quote

import orjson
from pydantic import Field, field_validator

from patchbay.config.models import DeliveryPolicy, Spec
from patchbay.connectors.base import BaseSink, Outcome, OutcomeClass, Resources, Stopwatch, batch_key
from patchbay.connectors.http_batch import BatchShape, BodyFormat, Combined, HttpBatchFormat, form_encode
from patchbay.connectors.http_client import (
    HttpAuth,
    HttpClient,
    appended_path,
    check_url,
    classify_response,
    map_response,
    pick_fields,
)
from patchbay.connectors.http_wire import BadAnswer, BadRequest
from patchbay.connectors.oauth2_client import OAuth2Error
from patchbay.contracts import parse_answer
from patchbay.expressions import compile_expr, render_template
from patchbay.registry import connector
from patchbay.security.ssrf import BlockedAddress

RESPONSE_LIMIT = 65536  # bytes of an answer read to map `response:` fields; the trace keeps an excerpt


class HttpSystem(Spec):
    url: str = Field(description="Base URL of the API; a destination's `path` is appended to it.")
    auth: HttpAuth | None = Field(None, description="How Patchbay authenticates to this API.")
    headers: dict[str, str] = Field(default_factory=dict, description="Headers sent with every request.")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None,
        description="Path to a PEM file of the CAs to trust for this system instead of the system's "
        "(e.g. a private CA).",
    )
    retry_after_header: str = Field(
        "Retry-After",
        description="Header of a 429 or 5xx answer that says when to try again; some APIs use their own, "
        "e.g. X-RateLimit-Reset.",
    )
    retry_after_unit: Literal["seconds", "unix_time"] = Field(
        "seconds",
        description="seconds: a delay (an HTTP date is read too); unix_time: the Unix time the limit resets.",
    )

    _url = field_validator("url")(classmethod(lambda cls, v: check_url(v)))


class HttpSinkConfig(Spec):
    method: Literal["POST", "PUT", "PATCH", "DELETE", "GET"] = Field("POST", description="HTTP method.")
    path: str = Field(
        "",
        description="Appended to the system's URL (starts with /); may hold {{ expressions }} (URL-quoted).",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return appended_path(v)

    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers; values may hold {{ expr }}."
    )
    body: str | dict[str, Any] | None = Field(
        None,
        description="The JSON body: omitted = the record as it is after the steps; a string = one expression; "
        "a mapping = target path -> expression, like map.",
    )
    body_format: BodyFormat = Field(
        "json",
        description="json (application/json) or form (application/x-www-form-urlencoded, nested fields in "
        "the bracket style `metadata[plan]=pro`, lists as `items[0][price]=...`, booleans true/false, null "
        "fields left out: Stripe's writes).",
    )
    response: dict[str, str] = Field(
        default_factory=dict,
        description="Fields to keep from a successful answer: name -> path into `status`, `headers.<name>` "
        "(lower case) or `body.<path>` (the JSON body, read up to 64 KiB), e.g. `{id: body.id}`; in a batch, "
        "`result.<path>` is the record's own element of the answer's results. They show in the run's trace "
        "and are stored with the delivery; a path the answer lacks gives null.",
        examples=[{"id": "body.id", "location": "headers.location"}],
    )
    batch_format: HttpBatchFormat | None = Field(
        None,
        description="How records share one request when the destination has `batch:` (a preset's batch "
        "operation fills it): where the records go in the body, the API's limit, and where the answer lists "
        "per-record results and errors. Without it a batch is a JSON array of the records' bodies.",
    )

    @field_validator("response")
    @classmethod
    def _response(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            root = path.split(".", 1)[0]
            if root not in ("status", "headers", "body", "result") or (root == "status" and path != "status"):
                raise ValueError(
                    f"response field {name!r}: bad path {path!r}; start it with body (body.id), "
                    "headers (headers.location), result (a batch's per-record result) or write status"
                )
        return v


@connector("http", roles=("destination",), config=HttpSinkConfig, system_config=HttpSystem)
class HttpSink(BaseSink[HttpSystem, HttpSinkConfig]):
    keep_answer = False  # the hub turns it on when the flow pins this destination's answers (contracts.py)
    """Deliver each record as one HTTP request."""

    def __init__(
        self, system: HttpSystem, config: HttpSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        super().__init__(system, config, policy, resources)
        base = system.url.rstrip("/")
        self._url = render_template(base + config.path if config.path else base)
        self._headers = {k: render_template(v) for k, v in {**system.headers, **config.headers}.items()}
        self._body_expr = compile_expr(config.body) if isinstance(config.body, str) else None
        self._body_map = (
            {k: compile_expr(v) if isinstance(v, str) else v for k, v in config.body.items()}
            if isinstance(config.body, dict)
            else None
        )
        self.client = HttpClient(
            resources, auth=system.auth, verify_tls=system.verify_tls, ca_bundle=system.ca_bundle
        )
        self._batch = BatchShape(config.batch_format or HttpBatchFormat())

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        from patchbay.records import put

        if self._body_expr is not None:
            body = self._body_expr.search(record)
        elif self._body_map is not None:
            body = {}
            for target, expr in self._body_map.items():
                put(body, target, expr.search(record) if hasattr(expr, "search") else expr)
        else:
            body = record
        req: dict[str, Any] = {
            "method": self.config.method,
            "url": self._url.render(record, quote=lambda s: quote(s, safe="")),
        }
        if self._headers:
            req["headers"] = {k: t.render(record) for k, t in self._headers.items()}
        if self.config.method != "GET":
            if self.config.body_format == "form":
                req["body"] = form_encode(body)
                req.setdefault("headers", {})["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                req["body"] = orjson.dumps(body).decode()
        return req

    # -- delivery half -----------------------------------------------------
    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        body = request.get("body")
        outcome, raw, status, headers = await self._exchange(request, body, key)
        if self.config.response and outcome.cls is OutcomeClass.SUCCESS and status is not None:
            outcome.fields = map_response(self.config.response, status, headers, raw, self.resources.redact)
        if self.keep_answer and outcome.cls is OutcomeClass.SUCCESS:
            outcome.body = parse_answer(raw)  # checked against the flow's response contract
        return outcome

    async def _exchange(
        self, request: Mapping[str, Any], body: str | None, key: str
    ) -> tuple[Outcome, bytes, int | None, Mapping[str, str]]:
        """One request: its outcome, the answer's body (bounded), status and headers (None, {} if none)."""
        headers = {"Content-Type": "application/json", "User-Agent": "patchbay/0.1"}
        headers.update(request.get("headers") or {})
        headers[self.policy.idempotency_header] = key
        sw = Stopwatch()
        keep = self.config.response or self.config.batch_format or self.keep_answer
        try:
            answer = await self.client.exchange(
                request["method"],
                request["url"],
                headers=headers,
                body=body.encode() if body is not None else None,
                timeout_s=self.policy.timeout_s,
                limit=RESPONSE_LIMIT if keep else 4096,
                follow_redirects=self.policy.follow_redirects,
            )
        except BlockedAddress as exc:  # the same address is refused on every try: not worth a retry
            error = exc.explain(self.resources.system or None)
            return Outcome(OutcomeClass.TERMINAL, None, sw.ms, error=error), b"", None, {}
        except OAuth2Error as exc:  # no token: a refused grant pauses (AUTH), an unreachable provider retries
            cls = OutcomeClass.AUTH if exc.refused else OutcomeClass.TRANSIENT
            return Outcome(cls, None, sw.ms, error=str(exc)), b"", None, {}
        except BadRequest as exc:  # e.g. a header value with a line break: every try would be the same
            return Outcome(OutcomeClass.TERMINAL, None, sw.ms, error=f"invalid request: {exc}"), b"", None, {}
        except TimeoutError:
            error = f"timed out after {self.policy.timeout_s:g}s"
            return Outcome(OutcomeClass.TRANSIENT, None, sw.ms, error=error), b"", None, {}
        except BadAnswer as exc:
            return Outcome(OutcomeClass.TRANSIENT, None, sw.ms, error=str(exc)), b"", None, {}
        except OSError as exc:  # refused, unreachable, a name that does not resolve, a certificate refused
            error = f"cannot connect: {exc}"
            return Outcome(OutcomeClass.TRANSIENT, None, sw.ms, error=error), b"", None, {}
        outcome = classify_response(
            answer.status, answer.headers, answer.body, sw.ms, self.resources.redact, self.retry_after
        )
        return outcome, answer.body, answer.status, answer.headers

    # -- batches -----------------------------------------------------------
    @property
    def batch_limit(self) -> int | None:
        fmt = self.config.batch_format
        return fmt.max_records if fmt is not None else None

    def batch_problem(self) -> str | None:
        if self.config.method == "GET":
            return "a GET request has no body to carry several records"
        if self.config.body_format == "form":
            return "form-encoded bodies cannot be combined; use body_format: json"
        return None

    async def send_batch(self, requests: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[Outcome]:
        """Records rendered for the same method, URL and headers go in one request (`batch_format`);
        records whose rendered URL or headers differ go in requests of their own."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            sig = orjson.dumps([r.get("method"), r.get("url"), r.get("headers") or {}]).decode()
            groups.setdefault(sig, []).append(i)
        out: list[Outcome | None] = [None] * len(requests)
        for members in groups.values():
            got = await self._send_group([requests[i] for i in members], [keys[i] for i in members])
            for i, o in zip(members, got, strict=True):
                out[i] = o
        return [o for o in out if o is not None]

    async def _send_group(self, requests: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[Outcome]:
        bodies: list[Any] = []
        for r in requests:
            try:
                bodies.append(orjson.loads(r["body"]) if r.get("body") is not None else None)
            except orjson.JSONDecodeError as exc:
                return [Outcome(OutcomeClass.TERMINAL, error=f"stored body is not JSON: {exc}") for _ in keys]
        rounds = self._batch.rounds(bodies)
        if len(rounds) == 1:
            return await self._send_round(requests, bodies, keys)
        out: list[Outcome | None] = [None] * len(keys)
        for members in rounds:  # one after the other: a later change of a record goes after the earlier
            got = await self._send_round(
                [requests[i] for i in members], [bodies[i] for i in members], [keys[i] for i in members]
            )
            for i, o in zip(members, got, strict=True):
                out[i] = o
        return [o for o in out if o is not None]

    async def _send_round(
        self, requests: Sequence[Mapping[str, Any]], bodies: list[Any], keys: Sequence[str]
    ) -> list[Outcome]:
        combined: Combined = self._batch.combine(bodies, keys)
        whole, raw, status, headers = await self._exchange(
            requests[0], orjson.dumps(combined.body).decode(), batch_key(keys)
        )
        try:
            parsed: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        answer = {"status": status, "headers": {k.lower(): v for k, v in headers.items()}, "body": parsed}
        redact = self.resources.redact
        mapping = self.config.response

        def pick(ans: dict[str, Any]) -> dict[str, Any] | None:
            return pick_fields(mapping, ans, redact) if mapping else None

        def classify(code: int) -> OutcomeClass:
            return classify_response(code, {}, b"", 0.0).cls

        outcomes = self._batch.outcomes(whole, answer, combined, keys, redact, pick, classify)
        if self.keep_answer:  # each member's answer is the request's, as one record's would be
            for o in outcomes:
                if o.cls is OutcomeClass.SUCCESS:
                    o.body = parsed
        return outcomes

    @property
    def retry_after(self) -> tuple[str, str]:
        """Where this API says how long to wait after a 429: (header, unit)."""
        return self.system.retry_after_header, self.system.retry_after_unit
