"""Verifying that an inbound webhook request comes from the system it claims to, and signing test requests."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
import secrets as _random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from patchbay.config.models import InboundAuth
from patchbay.errors import ConfigError, RejectedRequest

__all__ = [
    "InboundRequest",
    "Verified",
    "Verifier",
    "generate_whsec",
    "sign_hmac",
    "sign_stripe",
    "sign_standard_webhooks",
    "standard_webhooks_key",
]

WHSEC_PREFIX = "whsec_"
_ACTION = "verifying webhook"
_MAX_TIMESTAMP_DIGITS = 12  # Unix seconds until the year 33658; longer is garbage, not a time
_BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="patchbay", charset="UTF-8"'}

Secret = bytes | str
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class InboundRequest:
    """What the server hands the verifier: the raw body exactly as received, and the headers."""

    body: bytes
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy) or a dict with lower-case keys
    remote_ip: str | None = None
    method: str = "POST"
    url: str = ""  # the URL the request reached, scheme://host/path?query (hmac's {url})


@dataclass(slots=True, frozen=True)
class Verified:
    """A request that passed; `event_id` is the sender's webhook-id (standard_webhooks only)."""

    event_id: str | None = None
    timestamp: float | None = None


_UNSIGNED = Verified()


class Verifier:
    """Checks requests against one system's `webhook` settings; build once, call `verify` per request.

    `secrets` are the resolved values of `auth.secrets`, in the same order. A `str` secret is text
    (standard_webhooks: `whsec_<base64>`); a `bytes` secret is used as the key as it is.
    """

    def __init__(
        self, auth: InboundAuth, secrets: Sequence[bytes | str], *, now: Callable[[], float] = time.time
    ) -> None:
        if auth.scheme != "none" and not secrets:
            raise ConfigError(f"verifying webhooks with {auth.scheme}: no secret was given")
        self.auth = auth
        self._now = now
        self._tolerance_s = float(auth.tolerance_s)
        self._networks: tuple[IpNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in auth.allow_ips
        )
        self._keys: tuple[bytes, ...] = ()
        self._macs: tuple[_Mac, ...] = ()
        self._check: Callable[[InboundRequest], Verified]
        # Whether `verify` reads the request's URL (an hmac signing `{url}` with no `public_url`): building it
        # is ~2 % of a webhook's CPU, so the server builds it only then.
        self.needs_url = False
        if auth.scheme == "standard_webhooks":
            self._keys = tuple(standard_webhooks_key(s, label=_label(auth, i)) for i, s in enumerate(secrets))
            self._check = self._standard_webhooks
        elif auth.scheme == "hmac":
            self._keys = tuple(_raw(s) for s in secrets)
            self._sig_header = auth.header.lower()
            self._ts_header = auth.timestamp_header.lower() if auth.timestamp_header else None
            self._prefix = auth.prefix.lower()
            self._signed = _signed_template(auth)
            self._check = self._hmac
            self.needs_url = "{url}" in self._signed and not auth.public_url
        elif auth.scheme == "stripe":
            self._keys = tuple(_raw(s) for s in secrets)
            self._check = self._stripe
        elif auth.scheme == "bearer":
            self._keys = tuple(_raw(s) for s in secrets)
            self._check = self._bearer
        elif auth.scheme == "basic":
            self._keys = tuple(_raw(s) for s in secrets)
            self._username = (auth.username or "").encode()
            self._check = self._basic
        else:
            self._check = _accept
        if any(not k for k in self._keys):
            raise ConfigError(f"verifying webhooks with {auth.scheme}: a secret is empty")
        if auth.scheme in ("standard_webhooks", "hmac", "stripe"):
            algorithm = auth.algorithm if auth.scheme == "hmac" else "sha256"
            self._macs = tuple(_Mac(k, algorithm) for k in self._keys)

    def verify(self, req: InboundRequest) -> Verified:
        """Return what the request proved, or raise RejectedRequest (401/403) saying why."""
        if self._networks:
            self._check_ip(req.remote_ip)
        return self._check(req)

    # -- schemes ------------------------------------------------------------------------------

    def _standard_webhooks(self, req: InboundRequest) -> Verified:
        h = req.headers
        msg_id = _header(h, "webhook-id")
        ts_raw = _header(h, "webhook-timestamp")
        sig_raw = _header(h, "webhook-signature")
        if not (msg_id and ts_raw and sig_raw):
            found = {"webhook-id": msg_id, "webhook-timestamp": ts_raw, "webhook-signature": sig_raw}
            missing = [n for n, v in found.items() if not v]
            raise RejectedRequest(401, "missing_signature", f"{_ACTION}: missing header {', '.join(missing)}")
        ts = self._timestamp(ts_raw, "webhook-timestamp")
        signed = _encode(msg_id, "webhook-id") + b"." + ts_raw.encode() + b"." + req.body
        expected = [mac.digest(signed) for mac in self._macs]
        for item in sig_raw.split():
            version, _, sig = item.partition(",")
            if version != "v1":  # e.g. v1a (asymmetric): not ours to check
                continue
            try:
                got = base64.b64decode(sig, validate=True)
            except binascii.Error:
                continue
            for exp in expected:
                if hmac.compare_digest(exp, got):
                    return Verified(msg_id, ts)
        raise RejectedRequest(
            401, "bad_signature", f"{_ACTION}: no v1 entry of webhook-signature matches a configured secret"
        )

    def _hmac(self, req: InboundRequest) -> Verified:
        h = req.headers
        auth = self.auth
        raw = _header(h, self._sig_header)
        ts_raw = _header(h, self._ts_header) if self._ts_header else None
        missing = [auth.header] if not raw else []
        if auth.timestamp_header and not ts_raw:
            missing.append(auth.timestamp_header)
        if missing or raw is None:
            raise RejectedRequest(401, "missing_signature", f"{_ACTION}: missing header {', '.join(missing)}")
        ts = None
        if ts_raw is not None:
            ts = self._timestamp(ts_raw, auth.timestamp_header or "", auth.timestamp_format)
        signed = _fill_signed(
            self._signed,
            body=req.body,
            timestamp=(ts_raw or "").strip(),
            method=req.method,
            url=auth.public_url or req.url,
        )
        raw = raw.strip()
        if self._prefix:
            if raw[: len(self._prefix)].lower() != self._prefix:
                raise RejectedRequest(
                    401, "bad_signature", f"{_ACTION}: header {auth.header} lacks the prefix {auth.prefix!r}"
                )
            raw = raw[len(self._prefix) :]
        try:
            got = binascii.unhexlify(raw) if auth.encoding == "hex" else base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise RejectedRequest(
                401, "bad_signature", f"{_ACTION}: header {auth.header} is not {auth.encoding}"
            ) from None
        for mac in self._macs:
            if hmac.compare_digest(mac.digest(signed), got):
                return Verified(None, ts)
        raise RejectedRequest(
            401, "bad_signature", f"{_ACTION}: header {auth.header} matches no configured secret"
        )

    def _stripe(self, req: InboundRequest) -> Verified:
        """Stripe's scheme: `Stripe-Signature: t=<unix>,v1=<hex hmac of "t.body">[,v1=…]`."""
        raw = _header(req.headers, "stripe-signature")
        if not raw:
            raise RejectedRequest(401, "missing_signature", f"{_ACTION}: missing header Stripe-Signature")
        parts = [p.partition("=") for p in raw.split(",")]
        ts_raw = next((v for k, _, v in parts if k.strip() == "t"), None)
        sigs = [v.strip() for k, _, v in parts if k.strip() == "v1"]
        if ts_raw is None or not sigs:
            raise RejectedRequest(401, "bad_signature", f"{_ACTION}: Stripe-Signature lacks t= or v1=")
        ts = self._timestamp(ts_raw, "Stripe-Signature t")
        expected = [mac.digest(ts_raw.strip().encode() + b"." + req.body) for mac in self._macs]
        for sig in sigs:
            try:
                got = binascii.unhexlify(sig)
            except (binascii.Error, ValueError):
                continue
            if any(hmac.compare_digest(exp, got) for exp in expected):
                return Verified(None, ts)
        raise RejectedRequest(
            401, "bad_signature", f"{_ACTION}: no v1 entry of Stripe-Signature matches a configured secret"
        )

    def _bearer(self, req: InboundRequest) -> Verified:
        kind, _, token = (_header(req.headers, "authorization") or "").strip().partition(" ")
        token = token.strip()
        if kind.lower() != "bearer" or not token:
            raise RejectedRequest(
                401,
                "missing_credentials",
                f"{_ACTION}: expected header Authorization: Bearer <token>",
                {"WWW-Authenticate": "Bearer"},
            )
        if not self._matches_any(_encode(token, "Authorization")):
            raise RejectedRequest(
                401,
                "bad_credentials",
                f"{_ACTION}: the bearer token matches no configured secret",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return _UNSIGNED

    def _basic(self, req: InboundRequest) -> Verified:
        kind, _, blob = (_header(req.headers, "authorization") or "").strip().partition(" ")
        blob = blob.strip()
        if kind.lower() != "basic" or not blob:
            raise RejectedRequest(
                401,
                "missing_credentials",
                f"{_ACTION}: expected header Authorization: Basic <credentials>",
                _BASIC_CHALLENGE,
            )
        try:
            user, colon, password = base64.b64decode(blob, validate=True).partition(b":")
        except binascii.Error:
            colon = b""
        if not colon:
            raise RejectedRequest(
                401,
                "bad_credentials",
                f"{_ACTION}: Authorization: Basic is not base64 of user:password",
                _BASIC_CHALLENGE,
            )
        # Both checks always run, so timing does not tell a wrong user from a wrong password.
        user_ok = hmac.compare_digest(user, self._username)
        if not (self._matches_any(password) & user_ok):
            raise RejectedRequest(
                401, "bad_credentials", f"{_ACTION}: wrong user name or password", _BASIC_CHALLENGE
            )
        return _UNSIGNED

    # -- shared checks ------------------------------------------------------------------------

    def _matches_any(self, got: bytes) -> bool:
        ok = False
        for k in self._keys:  # no early exit: every configured secret is compared
            ok |= hmac.compare_digest(k, got)
        return ok

    def _timestamp(self, raw: str, header: str, fmt: str = "unix_s") -> float:
        raw = raw.strip()
        if fmt == "iso8601":
            ts = _iso_seconds(raw, header)
        else:
            digits = _MAX_TIMESTAMP_DIGITS + (3 if fmt == "unix_ms" else 0)
            if not (raw.isascii() and raw.isdigit() and len(raw) <= digits):
                unit = "milliseconds" if fmt == "unix_ms" else "whole seconds"
                raise RejectedRequest(
                    401, "bad_timestamp", f"{_ACTION}: header {header} is not a Unix time in {unit}"
                )
            ts = int(raw) / 1000 if fmt == "unix_ms" else int(raw)
        age = self._now() - ts
        if abs(age) > self._tolerance_s:
            when = f"{age:.0f}s old" if age > 0 else f"{-age:.0f}s in the future"
            raise RejectedRequest(
                401,
                "stale_timestamp",
                f"{_ACTION}: header {header} is {when}; the tolerance is {self._tolerance_s:g}s "
                "(a replayed request, or the sender's clock is wrong)",
            )
        return float(ts)

    def _check_ip(self, remote_ip: str | None) -> None:
        try:
            addr = ipaddress.ip_address(remote_ip or "")
        except ValueError:
            raise RejectedRequest(
                403, "ip_not_allowed", f"{_ACTION}: unknown source address and the endpoint has allow_ips"
            ) from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not any(addr in net for net in self._networks):
            raise RejectedRequest(403, "ip_not_allowed", f"{_ACTION}: source {addr} is not in allow_ips")


# -- signing (patchbay send, tests) ---------------------------------------------------------------


def standard_webhooks_key(secret: bytes | str, *, label: str = "the secret") -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after `whsec_`; bytes are used as they are.

    Text without the prefix is base64-decoded too; if it is not base64 its UTF-8 bytes are the key.
    """
    if isinstance(secret, bytes):
        return secret
    text = secret.strip()
    prefixed = text.startswith(WHSEC_PREFIX)
    if prefixed:
        text = text[len(WHSEC_PREFIX) :]
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        if prefixed:
            raise ConfigError(
                f"reading {label}: it starts with {WHSEC_PREFIX} but the rest is not base64"
            ) from None
        return secret.encode()
    if not key:
        raise ConfigError(f"reading {label}: the key is empty")
    return key


def sign_standard_webhooks(secret: bytes | str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The webhook-id, webhook-timestamp and webhook-signature headers for `body`."""
    ts = str(int(timestamp))
    signed = msg_id.encode() + b"." + ts.encode() + b"." + body
    sig = base64.b64encode(hmac.digest(standard_webhooks_key(secret), signed, "sha256")).decode()
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": f"v1,{sig}"}


def sign_hmac(
    auth: InboundAuth,
    secret: bytes | str,
    body: bytes,
    timestamp: float | None = None,
    *,
    method: str = "POST",
    url: str = "",
) -> dict[str, str]:
    """The signature header (and timestamp header, if `auth` has one) that `auth` expects for `body`.

    `timestamp` (Unix seconds) defaults to now and is used only when `auth.timestamp_header` is set;
    `method` and `url` only when `auth.signed` names them.
    """
    headers: dict[str, str] = {}
    ts = ""
    if auth.timestamp_header:
        when = time.time() if timestamp is None else timestamp
        if auth.timestamp_format == "unix_ms":
            ts = str(int(when * 1000))
        elif auth.timestamp_format == "iso8601":
            ts = datetime.fromtimestamp(int(when), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            ts = str(int(when))
        headers[auth.timestamp_header] = ts
    signed = _fill_signed(
        _signed_template(auth), body=body, timestamp=ts, method=method, url=auth.public_url or url
    )
    digest = hmac.digest(_raw(secret), signed, auth.algorithm)
    sig = digest.hex() if auth.encoding == "hex" else base64.b64encode(digest).decode()
    headers[auth.header] = auth.prefix + sig
    return headers


def sign_stripe(secret: bytes | str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Stripe-Signature header Stripe would send for `body` (for tests and `patchbay send`)."""
    key = secret if isinstance(secret, bytes) else secret.encode()
    sig = hmac.new(key, str(timestamp).encode() + b"." + body, "sha256").hexdigest()
    return {"Stripe-Signature": f"t={timestamp},v1={sig}"}


def generate_whsec() -> str:
    """A new Standard Webhooks secret: `whsec_` and the base64 of 32 random bytes."""
    return WHSEC_PREFIX + base64.b64encode(_random.token_bytes(32)).decode()


# -- helpers ----------------------------------------------------------------------------------------


class _Mac:
    """The stdlib HMAC with its key schedule done once, here; each request copies it (no hand-made crypto)."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes, algorithm: str) -> None:
        self._base = hmac.new(key, digestmod=algorithm)

    def digest(self, msg: bytes) -> bytes:
        h = self._base.copy()
        h.update(msg)
        return h.digest()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header `name` (lower case) from a case-insensitive mapping or a dict with lower-case keys."""
    value = headers.get(name)
    if value is None:
        # A plain dict in the sender's own casing; only reached when the header looks absent.
        for k, v in headers.items():
            if k.lower() == name:
                return v
    return value


def _encode(value: str, header: str) -> bytes:
    try:
        return value.encode("utf-8", "surrogateescape")  # aiohttp keeps undecodable header bytes this way
    except UnicodeEncodeError:
        raise RejectedRequest(401, "bad_signature", f"{_ACTION}: header {header} is not valid text") from None


def _raw(secret: Secret) -> bytes:
    return secret if isinstance(secret, bytes) else secret.encode()


def _label(auth: InboundAuth, i: int) -> str:
    return f"webhook secret {auth.secrets[i].label}" if i < len(auth.secrets) else f"webhook secret #{i + 1}"


def _accept(req: InboundRequest) -> Verified:
    return _UNSIGNED


def _signed_template(auth: InboundAuth) -> str:
    if auth.signed is not None:
        return auth.signed
    return "{timestamp}.{body}" if auth.timestamp_header else "{body}"


_SIGNED_PART = re.compile(r"\{(body|timestamp|method|url)\}")


def _fill_signed(template: str, *, body: bytes, timestamp: str, method: str, url: str) -> bytes:
    """The bytes a sender signs: the template's text with the raw body (never re-encoded) in place."""
    values = {"timestamp": timestamp, "method": method.upper(), "url": url}
    out = bytearray()
    pos = 0
    for m in _SIGNED_PART.finditer(template):
        out += template[pos : m.start()].encode()
        out += body if m.group(1) == "body" else values[m.group(1)].encode("utf-8", "surrogateescape")
        pos = m.end()
    out += template[pos:].encode()
    return bytes(out)


def _iso_seconds(raw: str, header: str) -> float:
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or len(raw) > 40:
        raise RejectedRequest(
            401,
            "bad_timestamp",
            f"{_ACTION}: header {header} is not an ISO 8601 time with a zone, e.g. 2021-03-25T05:09:27Z",
        )
    return when.timestamp()
