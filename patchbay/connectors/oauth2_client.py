"""OAuth2 for HTTP systems: client credentials, and authorization code with PKCE (RFC 6749, RFC 7636).

One `TokenSource` per system and hub hands out access tokens:

- `oauth2_client_credentials`: a token is fetched from `token_url` with the client's id and secret,
  kept in memory, and fetched again before it expires or once when the API answers 401.
- `oauth2_authorization_code`: `patchbay connect SYSTEM` keeps a pending grant (state, PKCE
  verifier, system) in the vault and prints the URL to open; the hub's `GET /oauth/callback` takes
  the pending grant (once), exchanges the code and saves the tokens in the vault as one secret
  (`oauth2.SYSTEM`), so a rotated refresh token replaces the old one in one transaction. Tokens are
  refreshed before they expire and once on a 401. A refused refresh (`invalid_grant`: the grant was
  revoked) raises `OAuth2Error` with `refused=True`, which the HTTP connectors turn into the AUTH
  outcome: the destination is paused with an alert until someone reconnects and resumes it.

Token values are added to the hub's redactor as soon as they are known and never put in a message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets as _random
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

import orjson

from patchbay.connectors.http_wire import BadAnswer, BadRequest, Tls
from patchbay.connectors.tls_client import machine_tls
from patchbay.errors import PatchbayError
from patchbay.security.ssrf import BlockedAddress

if TYPE_CHECKING:
    from patchbay.connectors.base import Resources
    from patchbay.connectors.http_client import HttpAuth
    from patchbay.security.ssrf import HttpPools
    from patchbay.security.vault import Vault

log = logging.getLogger("patchbay.oauth2")

TOKENS_PREFIX = "oauth2."  # vault name of a system's tokens: oauth2.SYSTEM
PENDING_PREFIX = "oauth2.pending."  # a grant waiting for its callback: oauth2.pending.<SHA-256 of its state>
PENDING_TTL_S = 600.0  # how long the URL printed by `patchbay connect` stays usable
REFRESH_MARGIN_S = 60.0  # refresh this long before expiry (at most a quarter of the token's lifetime)
TOKEN_TIMEOUT_S = 15.0
_STATE_RE = re.compile(r"^[A-Za-z0-9_\-]{32,64}$")
AUTHORIZATION_CODE = "oauth2_authorization_code"
CLIENT_CREDENTIALS = "oauth2_client_credentials"


class OAuth2Error(PatchbayError):
    """No access token. `refused`: the provider refused the grant or the client (pause, reconnect);
    otherwise the token endpoint could not be reached or failed (retry later)."""

    def __init__(self, message: str, *, refused: bool, code: str | None = None) -> None:
        super().__init__(message)
        self.refused = refused
        self.code = code  # the provider's `error` (RFC 6749 §5.2), e.g. invalid_grant


@dataclass
class Tokens:
    access_token: str
    refresh_token: str | None = None
    expires_at: float | None = None  # Unix seconds; None: the provider did not say
    obtained_at: float = 0.0
    scope: str | None = None

    def __repr__(self) -> str:  # never the values
        return f"Tokens(expires_at={self.expires_at}, refresh_token={'yes' if self.refresh_token else 'no'})"

    def fresh(self, now: float) -> bool:
        if self.expires_at is None:
            return True
        margin = min(REFRESH_MARGIN_S, max(0.0, self.expires_at - self.obtained_at) / 4)
        return now < self.expires_at - margin

    def dumps(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def loads(cls, text: str) -> Tokens:
        doc = orjson.loads(text)
        return cls(
            **{k: doc.get(k) for k in ("access_token", "refresh_token", "expires_at", "scope")},
            obtained_at=float(doc.get("obtained_at") or 0.0),
        )


def tokens_name(system: str) -> str:
    return TOKENS_PREFIX + system


def pending_name(state: str) -> str:
    """The vault name of a pending grant: a hash of its state, so listing the vault's names (`patchbay
    secrets list`, the API) does not give away a state that would let someone else's code be accepted."""
    return PENDING_PREFIX + hashlib.sha256(state.encode()).hexdigest()[:32]


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier (43 URL-safe characters) and its S256 challenge."""
    verifier = _random.token_urlsafe(32)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


# ----------------------------------------------------------------------------- connect and callback
@dataclass
class Pending:
    system: str
    verifier: str
    redirect_uri: str
    created_at: float


def begin(vault: Vault, system: str, auth: HttpAuth, *, now: float | None = None) -> str:
    """Keep a new pending grant for `system` in the vault; return the URL the user opens."""
    assert auth.authorize_url and auth.client_id and auth.redirect_uri
    now = time.time() if now is None else now
    for info in vault.list():  # grants never finished: their URLs have expired
        if info.name.startswith(PENDING_PREFIX) and now - info.created_at > PENDING_TTL_S:
            vault.delete(info.name)
    state = _random.token_urlsafe(32)
    verifier, challenge = pkce_pair()
    pending = Pending(system, verifier, auth.redirect_uri, now)
    vault.set(pending_name(state), orjson.dumps(asdict(pending)).decode())
    params = {
        "response_type": "code",
        "client_id": auth.client_id,
        "redirect_uri": auth.redirect_uri,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **({"scope": " ".join(auth.scopes)} if auth.scopes else {}),
        **auth.authorize_params,
    }
    sep = "&" if urlsplit(auth.authorize_url).query else "?"
    return auth.authorize_url + sep + urlencode(params, quote_via=quote)


def take_pending(vault: Vault, state: str, *, now: float | None = None) -> Pending:
    """The pending grant of `state`, removed from the vault (a state is good once); OAuth2Error if
    there is none or it is older than PENDING_TTL_S."""
    if not _STATE_RE.match(state or ""):
        raise OAuth2Error("the callback's `state` is missing or malformed", refused=True)
    name = pending_name(state)
    text = vault.get(name)
    if text is None or not vault.delete(name):  # delete() is the single use: of two racers, one wins
        raise OAuth2Error(
            "no connection is waiting for this callback (already used, or never started here); "
            "run `patchbay connect SYSTEM` again",
            refused=True,
        )
    pending = Pending(**orjson.loads(text))
    if (time.time() if now is None else now) - pending.created_at > PENDING_TTL_S:
        raise OAuth2Error(
            f"this connection was started more than {PENDING_TTL_S / 60:g} minutes ago; "
            f"run `patchbay connect {pending.system}` again",
            refused=True,
        )
    return pending


async def finish(
    resources: Resources, auth: HttpAuth, pending: Pending, code: str, *, tls: Tls = machine_tls
) -> Tokens:
    """Exchange the callback's code (with the PKCE verifier) and save the tokens in the vault."""
    source = await source_for(resources, auth)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": pending.redirect_uri,
        "code_verifier": pending.verifier,
    }
    tokens = await source.token_request(resources, form, action="exchanging the authorization code", tls=tls)
    if tokens.refresh_token is None:
        log.warning(
            "system %s: the provider gave no refresh token; when the access token expires, run "
            "`patchbay connect %s` again (some providers need an authorize parameter such as "
            "access_type=offline for one)",
            source.system,
            source.system,
        )
    await source.save(tokens)
    return tokens


# ----------------------------------------------------------------------------- the token source
_SOURCES: weakref.WeakKeyDictionary[HttpPools, dict[tuple[str, str], TokenSource]] = (
    weakref.WeakKeyDictionary()
)


async def source_for(resources: Resources, auth: HttpAuth) -> TokenSource:
    """The token source of `resources.system` for this hub (its shared HTTP connection pools): one per system,
    so the destinations and the source of one system never refresh the same grant twice."""
    resources.wire()  # makes sure resources.http exists
    assert resources.http is not None
    by_system = _SOURCES.setdefault(resources.http, {})
    key = (resources.system, auth.model_dump_json())
    found = by_system.get(key)
    if found is None:
        found = by_system[key] = TokenSource(resources.system, auth, _vault_opener(resources))
    return found


def _vault_opener(resources: Resources) -> Callable[[], Vault | None]:
    given = resources.extra.get("vault")
    root = resources.extra.get("root")

    def open_vault() -> Vault | None:
        if given is not None:
            return given  # type: ignore[no-any-return]
        if root is None:
            return None
        from patchbay.security.project import open_project_secrets

        return open_project_secrets(Path(root))[0]

    return open_vault


class TokenSource:
    """Access tokens of one system: cached, refreshed before expiry, and once after a 401."""

    def __init__(
        self,
        system: str,
        auth: HttpAuth,
        open_vault: Callable[[], Vault | None],
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.system = system
        self.auth = auth
        self._open_vault = open_vault
        self._vault: Vault | None = None
        self._now = now
        self._lock = asyncio.Lock()
        self._tokens: Tokens | None = None
        self._refused: tuple[Tokens, OAuth2Error] | None = None  # stored tokens whose refresh was refused

    async def access_token(
        self, resources: Resources, *, stale: str | None = None, tls: Tls = machine_tls
    ) -> str:
        """A token to send. `stale`: the token a 401 answered; a different one is returned or the call fails."""
        t = self._tokens
        if t is not None and t.access_token != stale and t.fresh(self._now()):
            return t.access_token
        async with self._lock:
            t = self._tokens
            if t is not None and t.access_token != stale and t.fresh(self._now()):
                return t.access_token  # another request refreshed while this one waited
            if self.auth.scheme == CLIENT_CREDENTIALS:
                form = {"grant_type": "client_credentials"}
                if self.auth.scopes:
                    form["scope"] = " ".join(self.auth.scopes)
                self._tokens = await self.token_request(resources, form, action="getting a token", tls=tls)
                return self._tokens.access_token
            return (await self._refresh(resources, stale, tls)).access_token

    async def _refresh(self, resources: Resources, stale: str | None, tls: Tls) -> Tokens:
        # The vault is read again first: `patchbay connect` may have stored a new grant since.
        stored = await self._load(resources)
        if stored is None:
            raise OAuth2Error(
                f"system {self.system} is not connected: run `patchbay connect {self.system}`, open the "
                "URL it prints, then resume the paused destinations",
                refused=True,
            )
        if stored.access_token != stale and stored.fresh(self._now()):
            self._tokens = stored
            return stored
        if self._refused is not None and stored.refresh_token == self._refused[0].refresh_token:
            refused = self._refused[1]  # the same grant again: do not ask the provider twice
            raise OAuth2Error(str(refused), refused=True, code=refused.code)
        if not stored.refresh_token:
            raise OAuth2Error(
                f"system {self.system}: the access token expired and there is no refresh token; "
                f"run `patchbay connect {self.system}` again",
                refused=True,
            )
        form = {"grant_type": "refresh_token", "refresh_token": stored.refresh_token}
        try:
            new = await self.token_request(resources, form, action="refreshing the access token", tls=tls)
        except OAuth2Error as exc:
            if not exc.refused:
                raise
            if exc.code == "invalid_grant":
                exc = self._revoked()
            self._refused, self._tokens = (stored, exc), None
            raise exc from None
        if new.refresh_token is None:  # not rotated: the old one stays good
            new.refresh_token = stored.refresh_token
        await self.save(new)
        return new

    def _revoked(self) -> OAuth2Error:
        return OAuth2Error(
            f"system {self.system}: the provider refused the refresh token (invalid_grant: the grant was "
            f"revoked or expired); run `patchbay connect {self.system}`, then resume the paused destinations",
            refused=True,
            code="invalid_grant",
        )

    async def _load(self, resources: Resources) -> Tokens | None:
        vault = await self._vault_or_fail()
        text = await asyncio.to_thread(vault.get, tokens_name(self.system))
        if text is None:
            return None
        tokens = Tokens.loads(text)
        _remember(resources, tokens)
        return tokens

    async def save(self, tokens: Tokens) -> None:
        """Store the tokens as one vault secret: the old pair or the new one, never half of each."""
        vault = await self._vault_or_fail()
        await asyncio.to_thread(vault.set, tokens_name(self.system), tokens.dumps())
        self._tokens = tokens
        self._refused = None

    async def _vault_or_fail(self) -> Vault:
        if self._vault is None:
            self._vault = await asyncio.to_thread(self._open_vault)
        if self._vault is None:
            raise OAuth2Error(
                f"system {self.system}: OAuth2 tokens are kept in the vault, and this project has none; "
                "run `patchbay secrets init`",
                refused=True,
            )
        return self._vault

    async def token_request(
        self, resources: Resources, form: dict[str, str], *, action: str, tls: Tls = machine_tls
    ) -> Tokens:
        """POST to the token endpoint (RFC 6749 §3.2) on the system's guarded connections (http_wire.py)
        and parse the answer; errors name no value."""
        auth = self.auth
        assert auth.token_url and auth.client_id
        what = f"system {self.system}: {action} at {auth.token_url}"
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "patchbay/0.1",
        }
        body = dict(form)
        secret = resources.secret(auth.client_secret) if auth.client_secret is not None else None
        if secret is not None and auth.client_auth == "basic":
            pair = f"{quote(auth.client_id, safe='')}:{quote(secret, safe='')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            body["client_id"] = auth.client_id
            if secret is not None:
                body["client_secret"] = secret
        started = self._now()
        try:
            answer = await resources.wire().request(
                "POST",
                auth.token_url,
                headers,
                urlencode(body).encode(),
                timeout_s=TOKEN_TIMEOUT_S,
                limit=65536,
                tls=tls,
            )
        except BlockedAddress as exc:  # the same on every try: paused until the system's policy changes
            raise OAuth2Error(f"{what}: {exc}", refused=True) from None
        except BadRequest as exc:
            raise OAuth2Error(f"{what}: invalid request: {exc}", refused=True) from None
        except TimeoutError:
            raise OAuth2Error(f"{what}: timed out after {TOKEN_TIMEOUT_S:g}s", refused=False) from None
        except BadAnswer as exc:
            raise OAuth2Error(f"{what}: {exc}", refused=False) from None
        except OSError as exc:
            raise OAuth2Error(f"{what}: cannot connect: {exc}", refused=False) from None
        status, raw = answer.status, answer.body
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            doc = {}
        if status == 200 and isinstance(doc.get("access_token"), str) and doc["access_token"]:
            tokens = _parse_tokens(doc, started)
            _remember(resources, tokens)
            return tokens
        if status == 200:
            raise OAuth2Error(f"{what}: the answer holds no access_token", refused=False)
        error = doc.get("error") if isinstance(doc.get("error"), str) else None
        described = resources.redact(str(doc.get("error_description") or ""))[:200]
        detail = f"HTTP {status}" + (f" {error}" if error else "") + (f": {described}" if described else "")
        if status == 429 or status >= 500:
            raise OAuth2Error(f"{what}: {detail}; will retry", refused=False, code=error)
        raise OAuth2Error(f"{what}: {detail}", refused=True, code=error)


def _parse_tokens(doc: Mapping[str, Any], now: float) -> Tokens:
    expires_in = doc.get("expires_in")
    try:
        expires_at = now + float(expires_in) if expires_in is not None else None
    except (TypeError, ValueError):
        expires_at = None
    refresh = doc.get("refresh_token")
    return Tokens(
        access_token=str(doc["access_token"]),
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        expires_at=expires_at,
        obtained_at=now,
        scope=doc.get("scope") if isinstance(doc.get("scope"), str) else None,
    )


def _remember(resources: Resources, tokens: Tokens) -> None:
    """Teach the hub's redactor the token values, so no log line, trace or answer can show them."""
    add = getattr(resources.redact, "add", None)
    if callable(add):
        add(tokens.access_token)
        if tokens.refresh_token:
            add(tokens.refresh_token)
