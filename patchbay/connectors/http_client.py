"""What the HTTP connectors share (http sink and source, webhook_out, chat): auth, TLS, response classes."""

from __future__ import annotations

import base64
import email.utils
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import Field, model_validator

from patchbay.config.models import SecretRef, Spec
from patchbay.connectors.base import Outcome, OutcomeClass, Resources, excerpt
from patchbay.connectors.tls_client import TlsSettings, tls_context


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


def check_url(v: str) -> str:
    """A config validator: an absolute http(s) URL (or a template, checked when rendered)."""
    if "{{" in v:
        return v
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"bad URL {v!r}: write an absolute http:// or https:// URL, e.g. https://api.example.com/v1"
        )
    return v


class HttpClient:
    """One system's requests: the shared session (address guard), its TLS settings and credentials.

    Credentials are resolved on every request, so a rotated secret is used at once, and never stored
    in what `render` returns.
    """

    def __init__(
        self,
        resources: Resources,
        *,
        auth: HttpAuth | None = None,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
    ) -> None:
        self.resources = resources
        self.auth = auth
        self.verify_tls = verify_tls
        self.ca_bundle = ca_bundle

    def auth_headers(self) -> dict[str, str]:
        auth, secret = self.auth, self.resources.secret
        if auth is None or auth.scheme == "none":
            return {}
        if auth.scheme == "bearer":
            return {"Authorization": f"Bearer {secret(auth.token)}"}
        if auth.scheme == "api_key":
            return {auth.header: secret(auth.token)}
        pair = f"{auth.username or ''}:{secret(auth.password)}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

    async def ssl(self) -> ssl.SSLContext | bool:
        """aiohttp's `ssl`: False (not verified), the system's CAs (built once), or True (aiohttp's)."""
        if not self.verify_tls:
            return False
        if self.ca_bundle:
            return await tls_context(TlsSettings(ca_bundle=self.ca_bundle))
        return True

    @asynccontextmanager
    async def request(
        self, method: str, url: str, *, headers: Mapping[str, str], **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request with the system's credentials added to `headers` (they win over same-named ones)."""
        session = await self.resources.http_session()
        all_headers = {**headers, **self.auth_headers()}
        async with session.request(method, url, headers=all_headers, ssl=await self.ssl(), **kwargs) as resp:
            yield resp


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
    redact: Callable[[str], str] = lambda s: s,
    retry_after: tuple[str, str] = ("Retry-After", "seconds"),
) -> Outcome:
    """The response-class rules every HTTP-shaped destination shares; `retry_after` names the header
    (and its unit) in which the API says how long to wait after a 429."""
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
