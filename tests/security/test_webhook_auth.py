"""Tests of inbound webhook verification: every scheme, rotation, replay windows, IP lists, no leaks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from patchbay.config.models import InboundAuth
from patchbay.errors import ConfigError, RejectedRequest
from patchbay.security.webhook_auth import (
    InboundRequest,
    Verified,
    Verifier,
    _Mac,
    generate_whsec,
    sign_hmac,
    sign_standard_webhooks,
    standard_webhooks_key,
)

NOW = 1_700_000_000
BODY = b'{"type":"order.created","data":{"id":"ord_1","total":42}}'
OLD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_SECRET = "whsec_" + base64.b64encode(b"n" * 32).decode()
TOKEN = "tok_3f9a0c2e7b"
PASSWORD = "correct horse battery staple"


def make_auth(scheme: str, *, n_secrets: int = 1, **kw: Any) -> InboundAuth:
    refs = [{"secret": f"s{i}"} for i in range(n_secrets)]
    return InboundAuth.model_validate({"scheme": scheme, "secrets": refs, **kw})


def verifier(scheme: str, secrets: list[bytes | str], **kw: Any) -> Verifier:
    return Verifier(make_auth(scheme, n_secrets=len(secrets), **kw), secrets, now=lambda: NOW)


def request(headers: dict[str, str], body: bytes = BODY, ip: str | None = "203.0.113.7") -> InboundRequest:
    return InboundRequest(body, {k.lower(): v for k, v in headers.items()}, ip)


def rejected(v: Verifier, req: InboundRequest) -> RejectedRequest:
    with pytest.raises(RejectedRequest) as info:
        v.verify(req)
    return info.value


def assert_no_leak(exc: RejectedRequest, *values: str | bytes) -> None:
    shown = str(exc) + repr(exc.headers)
    for value in values:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        assert text not in shown


# -- standard_webhooks ----------------------------------------------------------------------------


class TestStandardWebhooks:
    def test_accepts_a_signed_request(self) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        assert verifier("standard_webhooks", [OLD_SECRET]).verify(request(headers)) == Verified("msg_1", NOW)

    def test_headers_from_aiohttp_are_case_insensitive(self) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        proxy = CIMultiDictProxy(CIMultiDict({k.title(): v for k, v in headers.items()}))
        req = InboundRequest(BODY, proxy, "203.0.113.7")
        assert verifier("standard_webhooks", [OLD_SECRET]).verify(req).event_id == "msg_1"

    def test_plain_dict_in_sender_casing(self) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        req = InboundRequest(BODY, {k.title(): v for k, v in headers.items()}, None)
        assert verifier("standard_webhooks", [OLD_SECRET]).verify(req).event_id == "msg_1"

    def test_forged_signature(self) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        forged = "v1," + base64.b64encode(b"\x00" * 32).decode()
        exc = rejected(
            verifier("standard_webhooks", [OLD_SECRET]), request({**headers, "webhook-signature": forged})
        )
        assert (exc.status, exc.code) == (401, "bad_signature")

    def test_tampered_body(self) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        exc = rejected(verifier("standard_webhooks", [OLD_SECRET]), request(headers, body=BODY + b" "))
        assert exc.code == "bad_signature"

    @pytest.mark.parametrize("field", ["webhook-id", "webhook-timestamp"])
    def test_signed_headers_cannot_be_swapped(self, field: str) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        changed = {"webhook-id": "msg_2", "webhook-timestamp": str(NOW + 1)}[field]
        exc = rejected(verifier("standard_webhooks", [OLD_SECRET]), request({**headers, field: changed}))
        assert exc.code == "bad_signature"

    def test_wrong_secret(self) -> None:
        headers = sign_standard_webhooks(generate_whsec(), "msg_1", NOW, BODY)
        exc = rejected(verifier("standard_webhooks", [OLD_SECRET]), request(headers))
        assert (exc.status, exc.code) == (401, "bad_signature")

    @pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
    def test_missing_header_is_named(self, missing: str) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        del headers[missing]
        exc = rejected(verifier("standard_webhooks", [OLD_SECRET]), request(headers))
        assert (exc.status, exc.code) == (401, "missing_signature")
        assert missing in str(exc)

    def test_stale_timestamp(self) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW - 301, BODY)
        exc = rejected(verifier("standard_webhooks", [OLD_SECRET]), request(headers))
        assert (exc.status, exc.code) == (401, "stale_timestamp")
        assert "301s old" in str(exc) and "300s" in str(exc)

    def test_future_timestamp(self) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW + 3600, BODY)
        exc = rejected(verifier("standard_webhooks", [OLD_SECRET], tolerance_s="5m"), request(headers))
        assert exc.code == "stale_timestamp"
        assert "3600s in the future" in str(exc)

    @pytest.mark.parametrize("offset", [-300, 300, 0])
    def test_edges_of_the_tolerance_pass(self, offset: int) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW + offset, BODY)
        assert verifier("standard_webhooks", [OLD_SECRET]).verify(request(headers)).timestamp == NOW + offset

    @pytest.mark.parametrize("ts", ["17e8", "-1", "1700000000.5", "1_700_000_000", "١٧٠٠٠٠٠٠٠٠", "9" * 40])
    def test_malformed_timestamp(self, ts: str) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        exc = rejected(
            verifier("standard_webhooks", [OLD_SECRET]), request({**headers, "webhook-timestamp": ts})
        )
        assert exc.code == "bad_timestamp"

    def test_rotation_accepts_old_and_new_secret(self) -> None:
        v = verifier("standard_webhooks", [NEW_SECRET, OLD_SECRET])
        for secret in (OLD_SECRET, NEW_SECRET):
            assert v.verify(request(sign_standard_webhooks(secret, "msg_1", NOW, BODY))).event_id == "msg_1"

    def test_any_listed_signature_may_match(self) -> None:
        good = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)["webhook-signature"]
        other = sign_standard_webhooks(NEW_SECRET, "msg_1", NOW, BODY)["webhook-signature"]
        header = f"v1a,{'A' * 86} v1,!!notbase64 {other} {good}"
        headers = {**sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY), "webhook-signature": header}
        assert verifier("standard_webhooks", [OLD_SECRET]).verify(request(headers)).event_id == "msg_1"

    def test_only_v1_entries_count(self) -> None:
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
        assert rejected(verifier("standard_webhooks", [OLD_SECRET]), request(headers)).code == "bad_signature"

    def test_binary_body(self) -> None:
        body = bytes(range(256))
        headers = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, body)
        assert (
            verifier("standard_webhooks", [OLD_SECRET]).verify(request(headers, body=body)).event_id
            == "msg_1"
        )

    def test_rejections_never_show_secret_or_signatures(self) -> None:
        v = verifier("standard_webhooks", [OLD_SECRET])
        wrong = sign_standard_webhooks(NEW_SECRET, "msg_1", NOW, BODY)
        expected = sign_standard_webhooks(OLD_SECRET, "msg_1", NOW, BODY)["webhook-signature"]
        for headers in (wrong, {**wrong, "webhook-timestamp": str(NOW - 999)}):
            exc = rejected(v, request(headers))
            assert_no_leak(exc, OLD_SECRET, OLD_SECRET[6:], wrong["webhook-signature"][3:], expected[3:])


class TestStandardWebhooksKey:
    def test_whsec_prefix_is_base64(self) -> None:
        assert standard_webhooks_key(NEW_SECRET) == b"n" * 32

    def test_unprefixed_base64_is_decoded(self) -> None:
        assert standard_webhooks_key(base64.b64encode(b"k" * 24).decode()) == b"k" * 24

    def test_unprefixed_non_base64_is_used_as_text(self) -> None:
        assert standard_webhooks_key("my shared secret!") == b"my shared secret!"

    def test_bytes_are_the_key(self) -> None:
        assert standard_webhooks_key(b"whsec_raw") == b"whsec_raw"

    def test_bad_whsec_is_a_config_error_without_the_value(self) -> None:
        with pytest.raises(ConfigError, match="not base64") as info:
            Verifier(make_auth("standard_webhooks"), ["whsec_not*base64!"])
        assert "not*base64!" not in str(info.value)
        assert "secret:s0" in str(info.value)

    def test_empty_secret_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="empty"):
            Verifier(make_auth("bearer"), [""])


class TestAgainstStandardwebhooksPackage:
    """The reference implementation (PyPI `standardwebhooks`) and ours must agree both ways."""

    def test_ours_verifies_with_theirs(self) -> None:
        secret = generate_whsec()
        headers = sign_standard_webhooks(secret, "msg_2Lh9", int(time.time()), BODY)
        assert Webhook(secret).verify(BODY, headers) == {
            "type": "order.created",
            "data": {"id": "ord_1", "total": 42},
        }

    def test_theirs_verifies_with_ours(self) -> None:
        secret = generate_whsec()
        now = datetime.now(tz=UTC)
        sig = Webhook(secret).sign("msg_2Lh9", now, BODY.decode())
        headers = {
            "webhook-id": "msg_2Lh9",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": sig,
        }
        v = Verifier(make_auth("standard_webhooks"), [secret])
        assert v.verify(request(headers)).event_id == "msg_2Lh9"

    def test_theirs_rejects_our_signature_under_another_secret(self) -> None:
        headers = sign_standard_webhooks(generate_whsec(), "msg_1", int(time.time()), BODY)
        with pytest.raises(WebhookVerificationError):
            Webhook(generate_whsec()).verify(BODY, headers)

    def test_spec_example_secret(self) -> None:
        # An unpadded secret as found in the spec's examples: both sides decode it the same way.
        secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
        now = int(time.time())
        headers = sign_standard_webhooks(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", now, BODY)
        Webhook(secret).verify(BODY, headers)


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_len", [1, 32, 64, 65, 128, 129, 300])
def test_precomputed_mac_matches_hmac(algorithm: str, key_len: int) -> None:
    key = hashlib.sha512(str(key_len).encode()).digest() * 3
    key = key[:key_len]
    for msg in (b"", b"x", BODY, BODY * 50):
        assert _Mac(key, algorithm).digest(msg) == hmac.digest(key, msg, algorithm)


# -- hmac -----------------------------------------------------------------------------------------

GITHUB: dict[str, Any] = {
    "header": "X-Hub-Signature-256",
    "prefix": "sha256=",
    "algorithm": "sha256",
    "encoding": "hex",
}
SLACKISH: dict[str, Any] = {
    "header": "X-Signature",
    "timestamp_header": "X-Timestamp",
    "encoding": "base64",
    "algorithm": "sha512",
}


class TestHmac:
    def test_accepts_github_style(self) -> None:
        headers = sign_hmac(make_auth("hmac", **GITHUB), TOKEN, BODY)
        assert (
            headers["X-Hub-Signature-256"] == "sha256=" + hmac.new(TOKEN.encode(), BODY, "sha256").hexdigest()
        )
        assert verifier("hmac", [TOKEN], **GITHUB).verify(request(headers)) == Verified(None, None)

    def test_upper_case_hex_and_prefix(self) -> None:
        headers = sign_hmac(make_auth("hmac", **GITHUB), TOKEN, BODY)
        headers = {k: v.upper() for k, v in headers.items()}
        assert verifier("hmac", [TOKEN], **GITHUB).verify(request(headers)) == Verified()

    def test_forged_signature(self) -> None:
        exc = rejected(
            verifier("hmac", [TOKEN], **GITHUB), request({"X-Hub-Signature-256": "sha256=" + "ab" * 32})
        )
        assert (exc.status, exc.code) == (401, "bad_signature")

    def test_wrong_secret(self) -> None:
        headers = sign_hmac(make_auth("hmac", **GITHUB), "another", BODY)
        assert rejected(verifier("hmac", [TOKEN], **GITHUB), request(headers)).code == "bad_signature"

    def test_missing_prefix(self) -> None:
        sig = hmac.new(TOKEN.encode(), BODY, "sha256").hexdigest()
        exc = rejected(verifier("hmac", [TOKEN], **GITHUB), request({"X-Hub-Signature-256": sig}))
        assert exc.code == "bad_signature" and "sha256=" in str(exc)
        assert sig not in str(exc)

    @pytest.mark.parametrize("value", ["sha256=zz", "sha256=abc", "sha256="])
    def test_not_hex(self, value: str) -> None:
        exc = rejected(verifier("hmac", [TOKEN], **GITHUB), request({"X-Hub-Signature-256": value}))
        assert exc.code in {"bad_signature", "missing_signature"}

    def test_missing_header_is_named(self) -> None:
        exc = rejected(verifier("hmac", [TOKEN], **GITHUB), request({}))
        assert (exc.status, exc.code) == (401, "missing_signature")
        assert "X-Hub-Signature-256" in str(exc)

    def test_rotation(self) -> None:
        v = verifier("hmac", ["new-secret", TOKEN], **GITHUB)
        for secret in (TOKEN, "new-secret"):
            assert v.verify(request(sign_hmac(make_auth("hmac", **GITHUB), secret, BODY))) == Verified()

    def test_timestamped_base64_sha512(self) -> None:
        auth = make_auth("hmac", **SLACKISH)
        headers = sign_hmac(auth, TOKEN, BODY, timestamp=NOW - 10)
        expected = hmac.new(TOKEN.encode(), f"{NOW - 10}.".encode() + BODY, "sha512").digest()
        assert headers == {"X-Timestamp": str(NOW - 10), "X-Signature": base64.b64encode(expected).decode()}
        assert verifier("hmac", [TOKEN], **SLACKISH).verify(request(headers)) == Verified(None, NOW - 10)

    def test_timestamp_is_signed(self) -> None:
        headers = sign_hmac(make_auth("hmac", **SLACKISH), TOKEN, BODY, timestamp=NOW - 10)
        headers["X-Timestamp"] = str(NOW)
        assert rejected(verifier("hmac", [TOKEN], **SLACKISH), request(headers)).code == "bad_signature"

    @pytest.mark.parametrize(("offset", "words"), [(-900, "900s old"), (900, "900s in the future")])
    def test_stale_and_future_timestamps(self, offset: int, words: str) -> None:
        headers = sign_hmac(make_auth("hmac", **SLACKISH), TOKEN, BODY, timestamp=NOW + offset)
        exc = rejected(verifier("hmac", [TOKEN], **SLACKISH), request(headers))
        assert (exc.status, exc.code) == (401, "stale_timestamp")
        assert words in str(exc)

    def test_missing_timestamp_header_is_named(self) -> None:
        headers = sign_hmac(make_auth("hmac", **SLACKISH), TOKEN, BODY, timestamp=NOW)
        del headers["X-Timestamp"]
        exc = rejected(verifier("hmac", [TOKEN], **SLACKISH), request(headers))
        assert exc.code == "missing_signature" and "X-Timestamp" in str(exc)

    def test_rejections_never_show_secret_or_signatures(self) -> None:
        v = verifier("hmac", [TOKEN], **GITHUB)
        sent = sign_hmac(make_auth("hmac", **GITHUB), "another", BODY)
        expected = sign_hmac(make_auth("hmac", **GITHUB), TOKEN, BODY)
        exc = rejected(v, request(sent))
        assert_no_leak(exc, TOKEN, sent["X-Hub-Signature-256"][7:], expected["X-Hub-Signature-256"][7:])


# -- bearer and basic -----------------------------------------------------------------------------


class TestBearer:
    def test_accepts_the_token(self) -> None:
        assert verifier("bearer", [TOKEN]).verify(request({"Authorization": f"Bearer {TOKEN}"})) == Verified()

    def test_scheme_name_is_case_insensitive(self) -> None:
        assert (
            verifier("bearer", [TOKEN]).verify(request({"Authorization": f"bearer  {TOKEN}"})) == Verified()
        )

    def test_wrong_token(self) -> None:
        exc = rejected(verifier("bearer", [TOKEN]), request({"Authorization": "Bearer tok_guess"}))
        assert (exc.status, exc.code) == (401, "bad_credentials")
        assert exc.headers["WWW-Authenticate"].startswith("Bearer")
        assert_no_leak(exc, TOKEN, "tok_guess")

    def test_prefix_of_the_token_is_not_enough(self) -> None:
        exc = rejected(verifier("bearer", [TOKEN]), request({"Authorization": f"Bearer {TOKEN[:-1]}"}))
        assert exc.code == "bad_credentials"

    @pytest.mark.parametrize("value", [None, "", "Bearer", "Bearer   ", f"Basic {TOKEN}", TOKEN])
    def test_missing_credentials(self, value: str | None) -> None:
        headers = {} if value is None else {"Authorization": value}
        exc = rejected(verifier("bearer", [TOKEN]), request(headers))
        assert (exc.status, exc.code, exc.headers) == (
            401,
            "missing_credentials",
            {"WWW-Authenticate": "Bearer"},
        )

    def test_rotation(self) -> None:
        v = verifier("bearer", ["tok_new", TOKEN])
        for token in (TOKEN, "tok_new"):
            assert v.verify(request({"Authorization": f"Bearer {token}"})) == Verified()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class TestBasic:
    def test_accepts_user_and_password(self) -> None:
        v = verifier("basic", [PASSWORD], username="acme")
        assert v.verify(request(basic("acme", PASSWORD))) == Verified()

    def test_password_may_contain_colons_and_non_ascii(self) -> None:
        v = verifier("basic", ["pä:ss:wörd"], username="acme")
        assert v.verify(request(basic("acme", "pä:ss:wörd"))) == Verified()

    def test_wrong_password(self) -> None:
        exc = rejected(verifier("basic", [PASSWORD], username="acme"), request(basic("acme", "guess")))
        assert (exc.status, exc.code) == (401, "bad_credentials")
        assert exc.headers["WWW-Authenticate"].startswith("Basic")
        assert_no_leak(exc, PASSWORD, "guess")

    def test_wrong_user(self) -> None:
        exc = rejected(verifier("basic", [PASSWORD], username="acme"), request(basic("mallory", PASSWORD)))
        assert exc.code == "bad_credentials"

    @pytest.mark.parametrize("value", ["Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()])
    def test_malformed(self, value: str) -> None:
        exc = rejected(verifier("basic", [PASSWORD], username="acme"), request({"Authorization": value}))
        assert exc.code == "bad_credentials"

    def test_missing_credentials(self) -> None:
        exc = rejected(verifier("basic", [PASSWORD], username="acme"), request({"Authorization": "Bearer x"}))
        assert (exc.status, exc.code) == (401, "missing_credentials")
        assert exc.headers["WWW-Authenticate"].startswith('Basic realm="patchbay"')

    def test_rotation(self) -> None:
        v = verifier("basic", ["new password", PASSWORD], username="acme")
        for password in (PASSWORD, "new password"):
            assert v.verify(request(basic("acme", password))) == Verified()


def test_none_accepts_anything() -> None:
    v = Verifier(make_auth("none", n_secrets=0, public=True), [])
    assert v.verify(request({})) == Verified()


# -- IP allow-list --------------------------------------------------------------------------------


class TestAllowIps:
    CIDRS = ["203.0.113.0/24", "2001:db8::/32"]

    @pytest.mark.parametrize("ip", ["203.0.113.7", "2001:db8::1", "::ffff:203.0.113.9"])
    def test_inside(self, ip: str) -> None:
        v = verifier("bearer", [TOKEN], allow_ips=self.CIDRS)
        assert v.verify(request({"Authorization": f"Bearer {TOKEN}"}, ip=ip)) == Verified()

    @pytest.mark.parametrize(
        "ip", ["198.51.100.1", "2001:db9::1", "::ffff:198.51.100.1", None, "", "not-an-ip"]
    )
    def test_outside(self, ip: str | None) -> None:
        v = verifier("bearer", [TOKEN], allow_ips=self.CIDRS)
        exc = rejected(v, request({"Authorization": f"Bearer {TOKEN}"}, ip=ip))
        assert (exc.status, exc.code) == (403, "ip_not_allowed")

    def test_checked_before_the_signature(self) -> None:
        v = verifier("standard_webhooks", [OLD_SECRET], allow_ips=self.CIDRS)
        exc = rejected(v, request({}, ip="198.51.100.1"))
        assert exc.code == "ip_not_allowed"

    def test_works_with_scheme_none(self) -> None:
        v = Verifier(make_auth("none", n_secrets=0, public=True, allow_ips=["10.0.0.0/8"]), [])
        assert v.verify(request({}, ip="10.1.2.3")) == Verified()
        assert rejected(v, request({}, ip="11.1.2.3")).code == "ip_not_allowed"


# -- signing helpers ------------------------------------------------------------------------------


def test_generate_whsec() -> None:
    a, b = generate_whsec(), generate_whsec()
    assert a != b and a.startswith("whsec_")
    assert len(base64.b64decode(a[6:], validate=True)) == 32


def test_sign_hmac_without_timestamp_header_ignores_timestamp() -> None:
    assert set(sign_hmac(make_auth("hmac", **GITHUB), TOKEN, BODY, timestamp=NOW)) == {"X-Hub-Signature-256"}


def test_sign_hmac_defaults_timestamp_to_now() -> None:
    headers = sign_hmac(make_auth("hmac", **SLACKISH), TOKEN, BODY)
    assert abs(int(headers["X-Timestamp"]) - time.time()) < 5
