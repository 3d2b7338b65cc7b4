"""http: call a REST API: method, URL, headers and JSON body rendered from the record."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import orjson
from pydantic import Field, field_validator, model_validator

from patchbay.config.models import DeliveryPolicy, SecretRef, Spec
from patchbay.connectors.base import Outcome, OutcomeClass, Resources, Stopwatch, excerpt
from patchbay.processors.expressions import compile_expr, render_template
from patchbay.registry import connector
from patchbay.security.ssrf import BlockedAddress


class HttpAuth(Spec):
    scheme: Literal["bearer", "basic", "api_key", "none"] = Field(
        description="bearer (Authorization: Bearer <token>), basic (user + password), "
        "api_key (a header such as X-API-Key), none."
    )
    token: SecretRef | None = Field(None, description="bearer / api_key: the credential.")
    username: str | None = Field(None, description="basic: user name.")
    password: SecretRef | None = Field(None, description="basic: password.")
    header: str = Field("X-API-Key", description="api_key: the header that carries the key.")

    @model_validator(mode="after")
    def _complete(self) -> HttpAuth:
        if self.scheme in ("bearer", "api_key") and self.token is None:
            raise ValueError(f"auth scheme {self.scheme} needs `token: {{secret: NAME}}`")
        if self.scheme == "basic" and (self.username is None or self.password is None):
            raise ValueError("auth scheme basic needs `username` and `password: {secret: NAME}`")
        return self

    def refs(self) -> list[SecretRef]:
        return [r for r in (self.token, self.password) if r is not None]


def _check_url(v: str) -> str:
    from urllib.parse import urlsplit

    if "{{" in v:
        return v
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"bad URL {v!r}: write an absolute http:// or https:// URL, e.g. https://api.example.com/v1"
        )
    return v


class HttpSystem(Spec):
    url: str = Field(description="Base URL of the API; a destination's `path` is appended to it.")
    auth: HttpAuth | None = Field(None, description="How Patchbay authenticates to this API.")
    headers: dict[str, str] = Field(default_factory=dict, description="Headers sent with every request.")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None, description="Path to a PEM file of extra CAs to trust for this system."
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

    _url = field_validator("url")(classmethod(lambda cls, v: _check_url(v)))


class HttpDestination(Spec):
    method: Literal["POST", "PUT", "PATCH", "DELETE", "GET"] = Field("POST", description="HTTP method.")
    path: str = Field(
        "", description="Appended to the system's URL; may hold {{ expressions }} (URL-quoted)."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers; values may hold {{ expr }}."
    )
    body: str | dict[str, Any] | None = Field(
        None,
        description="The JSON body: omitted = the record as it is after the steps; a string = one expression; "
        "a mapping = target path -> expression, like map.",
    )


@connector("http", roles=("destination",), config=HttpDestination, system_config=HttpSystem)
class HttpSink:
    """Deliver each record as one HTTP request."""

    def __init__(
        self,
        system: HttpSystem,
        config: HttpDestination,
        policy: DeliveryPolicy,
        resources: Resources,
    ) -> None:
        self.system = system
        self.config = config
        self.policy = policy
        self.resources = resources
        base = system.url.rstrip("/")
        self._url = render_template(base + config.path if config.path else base)
        self._headers = {k: render_template(v) for k, v in {**system.headers, **config.headers}.items()}
        self._body_expr = compile_expr(config.body) if isinstance(config.body, str) else None
        self._body_map = (
            {k: compile_expr(v) if isinstance(v, str) else v for k, v in config.body.items()}
            if isinstance(config.body, dict)
            else None
        )
        self._timeout = aiohttp.ClientTimeout(total=policy.timeout_s)
        self._ssl: Any = None if system.verify_tls else False
        if system.ca_bundle:
            import ssl

            self._ssl = ssl.create_default_context(cafile=system.ca_bundle)

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
            req["body"] = orjson.dumps(body).decode()
        return req

    # -- delivery half -----------------------------------------------------
    def _auth_headers(self) -> dict[str, str]:
        auth = self.system.auth
        if auth is None or auth.scheme == "none":
            return {}
        if auth.scheme == "bearer":
            return {"Authorization": f"Bearer {self.resources.secret(auth.token)}"}
        if auth.scheme == "api_key":
            return {auth.header: self.resources.secret(auth.token)}
        pair = f"{auth.username or ''}:{self.resources.secret(auth.password)}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        session = await self.resources.http_session()
        headers = {"Content-Type": "application/json", "User-Agent": "patchbay/0.1"}
        headers.update(request.get("headers") or {})
        headers[self.policy.idempotency_header] = key
        headers.update(self._auth_headers())
        body = request.get("body")
        sw = Stopwatch()
        try:
            async with session.request(
                request["method"],
                request["url"],
                data=body.encode() if body is not None else None,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=self.policy.follow_redirects,
                ssl=self._ssl,
            ) as resp:
                raw = await resp.content.read(4096)
                return classify_response(
                    resp.status, resp.headers, raw, sw.ms, self.resources.redact, self.retry_after
                )
        except BlockedAddress as exc:  # the same address is refused on every try: not worth a retry
            error = exc.explain(self.resources.system or None)
            return Outcome(OutcomeClass.TERMINAL, None, sw.ms, error=error)
        except aiohttp.InvalidURL as exc:  # e.g. a legacy numeric IPv4 form such as http://2130706433/
            return Outcome(OutcomeClass.TERMINAL, None, sw.ms, error=f"invalid URL: {exc}")
        except TimeoutError:
            return Outcome(
                OutcomeClass.TRANSIENT, None, sw.ms, error=f"timed out after {self.policy.timeout_s:g}s"
            )
        except aiohttp.ClientConnectorError as exc:
            return Outcome(OutcomeClass.TRANSIENT, None, sw.ms, error=f"cannot connect: {exc.os_error}")
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return Outcome(OutcomeClass.TRANSIENT, None, sw.ms, error=f"{type(exc).__name__}: {exc}")

    @property
    def retry_after(self) -> tuple[str, str]:
        """Where this API says how long to wait after a 429: (header, unit)."""
        return self.system.retry_after_header, self.system.retry_after_unit

    async def close(self) -> None:
        return None

    def secret_refs(self) -> list[SecretRef]:
        return self.system.auth.refs() if self.system.auth else []


def parse_retry_after(value: str | None, now: float | None = None, unit: str = "seconds") -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or from a vendor's
    reset header: `unit` unix_time reads a Unix time (Intercom's X-RateLimit-Reset)."""
    if not value:
        return None
    value = value.strip()
    try:
        number = float(value)  # Shopify writes "2.0"
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number < 0:  # NaN, inf or negative: no usable hint
            return None
        if unit == "unix_time":
            return max(0.0, number - (now or time.time()))
        return number
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now or time.time()))


def classify_response(
    status: int,
    headers: Mapping[str, str],
    raw: bytes,
    latency_ms: float,
    redact: Any = lambda s: s,
    retry_after: tuple[str, str] = ("Retry-After", "seconds"),
) -> Outcome:
    """The response-class rules every HTTP-shaped destination shares."""
    text = redact(excerpt(raw))
    if 200 <= status < 300:
        return Outcome(OutcomeClass.SUCCESS, status, latency_ms, text)
    if 300 <= status < 400:
        loc = headers.get("Location", "?")
        return Outcome(
            OutcomeClass.TERMINAL,
            status,
            latency_ms,
            text,
            error=f"redirect to {redact(loc)} not followed; fix the URL or set delivery.follow_redirects: true",
        )
    if status in (401, 403):
        return Outcome(
            OutcomeClass.AUTH, status, latency_ms, text, error="credentials refused; destination paused"
        )
    if status == 410:
        return Outcome(OutcomeClass.GONE, status, latency_ms, text, error="destination gone; disabled")
    if status in (408, 425, 429) or status >= 500:
        return Outcome(
            OutcomeClass.TRANSIENT,
            status,
            latency_ms,
            text,
            retry_after_s=parse_retry_after(headers.get(retry_after[0]), unit=retry_after[1]),
        )
    return Outcome(OutcomeClass.TERMINAL, status, latency_ms, text)
