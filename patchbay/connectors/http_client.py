"""What the HTTP connectors share (http sink and source, webhook_out, chat): auth, TLS, response classes."""

from __future__ import annotations

import base64
import email.utils
import math
import time
from collections.abc import Callable, Mapping
from ssl import SSLContext
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import Field, model_validator

from patchbay.config.models import SecretRef, Spec
from patchbay.connectors.base import Outcome, OutcomeClass, Resources, excerpt
from patchbay.connectors.http_wire import Answer
from patchbay.connectors.tls_client import TlsSettings, tls_context


class HttpAuth(Spec):
    scheme: Literal[
        "bearer", "basic", "api_key", "none", "oauth2_client_credentials", "oauth2_authorization_code"
    ] = Field(
        description="bearer (Authorization: Bearer <token>), basic (user + password), "
        "api_key (a header such as X-API-Key), oauth2_client_credentials (a token from `token_url` "
        "for the client's id and secret), oauth2_authorization_code (a user's grant: run "
        "`patchbay connect SYSTEM`; PKCE, refresh tokens kept in the vault), none."
    )
    token: SecretRef | None = Field(None, description="bearer / api_key: the credential.")
    username: str | None = Field(None, description="basic: user name.")
    password: SecretRef | None = Field(None, description="basic: password.")
    header: str = Field("X-API-Key", description="api_key: the header that carries the key.")
    token_url: str | None = Field(None, description="oauth2: the provider's token endpoint.")
    authorize_url: str | None = Field(
        None, description="oauth2_authorization_code: the provider's authorization endpoint."
    )
    client_id: str | None = Field(None, description="oauth2: the client (app) id.")
    client_secret: SecretRef | None = Field(
        None, description="oauth2: the client secret (optional for a public authorization-code client)."
    )
    client_auth: Literal["basic", "post"] = Field(
        "basic",
        description="oauth2: how the client authenticates at the token endpoint: basic (HTTP Basic, "
        "RFC 6749's default) or post (client_id and client_secret in the form).",
    )
    scopes: list[str] = Field(default_factory=list, description="oauth2: the scopes to ask for.")
    redirect_uri: str | None = Field(
        None,
        description="oauth2_authorization_code: the hub's callback as registered with the provider, "
        "e.g. https://hub.example.com/oauth/callback.",
    )
    authorize_params: dict[str, str] = Field(
        default_factory=dict,
        description="oauth2_authorization_code: extra query parameters of the authorization URL "
        "(e.g. access_type: offline for Google).",
    )

    @model_validator(mode="after")
    def _complete(self) -> HttpAuth:
        if self.scheme in ("bearer", "api_key") and self.token is None:
            raise ValueError(f"auth scheme {self.scheme} needs `token: {{secret: NAME}}`")
        if self.scheme == "basic" and (self.username is None or self.password is None):
            raise ValueError("auth scheme basic needs `username` and `password: {secret: NAME}`")
        needs: list[str] = []
        if self.scheme == "oauth2_client_credentials":
            needs = ["token_url", "client_id", "client_secret"]
        elif self.scheme == "oauth2_authorization_code":
            needs = ["authorize_url", "token_url", "client_id", "redirect_uri"]
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"auth scheme {self.scheme} needs {', '.join(f'`{n}`' for n in missing)}"
                + (" (client_secret: {secret: NAME})" if "client_secret" in missing else "")
            )
        for n in ("token_url", "authorize_url", "redirect_uri"):
            v = getattr(self, n)
            if v is not None and "{{" in v:
                raise ValueError(f"auth `{n}` is a fixed URL; it cannot hold {{{{ expressions }}}}")
            if v is not None:
                check_url(v)
        return self

    @property
    def oauth2(self) -> bool:
        return self.scheme.startswith("oauth2_")


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
    """One system's requests (`exchange`): its kept-alive connections (address guard), TLS and credentials.

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
        self._tls = TlsSettings(verify=verify_tls, ca_bundle=ca_bundle if verify_tls else None)
        # The header that carries the credentials, not carried to another server a redirect points at.
        self._credentials = frozenset(
            ()
            if auth is None or auth.scheme == "none"
            else (auth.header.lower() if auth.scheme == "api_key" else "authorization",)
        )

    def auth_headers(self) -> dict[str, str]:
        auth, secret = self.auth, self.resources.secret
        if auth is None or auth.scheme == "none":
            return {}
        if auth.oauth2:  # a token known only at send time (see `exchange`)
            return {"Authorization": "Bearer [oauth2 access token]"}
        if auth.scheme == "bearer":
            return {"Authorization": f"Bearer {secret(auth.token)}"}
        if auth.scheme == "api_key":
            return {auth.header: secret(auth.token)}
        pair = f"{auth.username or ''}:{secret(auth.password)}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
        limit: int,
        follow_redirects: bool = False,
    ) -> Answer:
        """One request with the system's credentials added to `headers` (they win over same-named ones),
        on the system's kept-alive connections (http_wire.py), with at most `limit` bytes of the answer.
        An OAuth2 system's request is sent once more with a refreshed token after a 401."""
        pool = self.resources.wire()

        async def send(own: Mapping[str, str]) -> Answer:
            return await pool.request(
                method,
                url,
                {**headers, **own} if own else headers,
                body,
                timeout_s=timeout_s,
                limit=limit,
                tls=self.tls,
                follow_redirects=follow_redirects,
                credentials=self._credentials,
            )

        if self.auth is None or not self.auth.oauth2:
            return await send(self.auth_headers() if self.auth is not None else {})
        from patchbay.connectors.oauth2_client import source_for

        tokens = await source_for(self.resources, self.auth)
        token = await tokens.access_token(self.resources, tls=self.tls)
        answer = await send({"Authorization": f"Bearer {token}"})
        if answer.status == 401:  # revoked or expired early: once more with a new token
            token = await tokens.access_token(self.resources, stale=token, tls=self.tls)
            answer = await send({"Authorization": f"Bearer {token}"})
        return answer

    async def tls(self) -> SSLContext:
        """The context https requests of this system are made with (tls_client.py: one per setting, built
        off the loop): verified (the system's CA bundle, or the machine's CAs) unless the system turned
        verification off."""
        return await tls_context(self._tls)


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


def map_response(
    mapping: Mapping[str, str],
    status: int,
    headers: Mapping[str, str],
    raw: bytes,
    redact: Callable[[str], str] = lambda s: s,
) -> dict[str, Any]:
    """Fields picked from an answer: name -> `status`, `headers.<name>` or `body.<path>` (JSON; a body that
    is not JSON, or was cut at the read limit, has no fields). Strings pass the secret redactor."""
    try:
        body: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    answer = {"status": status, "headers": {k.lower(): v for k, v in headers.items()}, "body": body}
    return pick_fields(mapping, answer, redact)


def pick_fields(
    mapping: Mapping[str, str], answer: Mapping[str, Any], redact: Callable[[str], str] = lambda s: s
) -> dict[str, Any]:
    """Fields picked from an answer already read (`status`, `headers`, `body`, and a batch's `result`)."""
    from patchbay.records import dig

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return {name: scrub(dig(answer, path)) for name, path in mapping.items()}


def appended_path(path: str) -> str:
    """A path appended to a system's URL: empty, or starting with / or ?. Anything else could name another
    server (`@evil.example/x` makes the base its user info, `.evil.example` extends its host), which would
    then receive the system's credentials. The one rule for every http connector's `path`."""
    if path and not path.startswith(("/", "?")):
        raise ValueError(f"{path!r} must start with / (or ?): it is appended to the system's URL")
    return path
