"""The hmac scheme's `signed` text and timestamp formats, checked against vendors' documented recipes.

Each signer below is written from the vendor's page (cited), not from our code, so a test passes only
when the verifier agrees with the vendor.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest

from patchbay.config.models import InboundAuth
from patchbay.errors import RejectedRequest
from patchbay.security.webhook_auth import InboundRequest, Verifier, sign_hmac

NOW = 1_700_000_000
BODY = b'{"event":{"type":"app_mention","text":"hi \xc3\xa9"}}'
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


def verifier(**kw: Any) -> Verifier:
    auth = InboundAuth.model_validate({"scheme": "hmac", "secrets": [{"secret": "s"}], **kw})
    return Verifier(auth, [SECRET], now=lambda: NOW)


SLACK = {
    "header": "X-Slack-Signature",
    "prefix": "v0=",
    "timestamp_header": "X-Slack-Request-Timestamp",
    "signed": "v0:{timestamp}:{body}",
}
HUBSPOT_V3 = {
    "header": "X-HubSpot-Signature-v3",
    "encoding": "base64",
    "timestamp_header": "X-HubSpot-Request-Timestamp",
    "timestamp_format": "unix_ms",
    "signed": "{method}{url}{body}{timestamp}",
}
ZENDESK = {
    "header": "X-Zendesk-Webhook-Signature",
    "encoding": "base64",
    "timestamp_header": "X-Zendesk-Webhook-Signature-Timestamp",
    "timestamp_format": "iso8601",
    "signed": "{timestamp}{body}",
}


def slack_headers(ts: int, body: bytes) -> dict[str, str]:
    # https://api.slack.com/authentication/verifying-requests-from-slack
    base = b"v0:" + str(ts).encode() + b":" + body
    sig = "v0=" + hmac.new(SECRET.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Signature": sig, "X-Slack-Request-Timestamp": str(ts)}


def hubspot_headers(ts_ms: int, method: str, uri: str, body: bytes) -> dict[str, str]:
    # https://developers.hubspot.com/docs/api/webhooks/validating-requests (v3)
    text = method.encode() + uri.encode() + body + str(ts_ms).encode()
    sig = base64.b64encode(hmac.new(SECRET.encode(), text, hashlib.sha256).digest()).decode()
    return {"X-HubSpot-Signature-v3": sig, "X-HubSpot-Request-Timestamp": str(ts_ms)}


def zendesk_headers(stamp: str, body: bytes) -> dict[str, str]:
    # https://developer.zendesk.com/documentation/webhooks/verifying/ : base64(HMACSHA256(TIMESTAMP + BODY))
    sig = base64.b64encode(hmac.new(SECRET.encode(), stamp.encode() + body, hashlib.sha256).digest()).decode()
    return {"X-Zendesk-Webhook-Signature": sig, "X-Zendesk-Webhook-Signature-Timestamp": stamp}


def test_slack_v0_signature() -> None:
    v = verifier(**SLACK)
    assert v.verify(InboundRequest(BODY, slack_headers(NOW, BODY))).timestamp == NOW
    with pytest.raises(RejectedRequest) as exc:
        v.verify(InboundRequest(BODY + b" ", slack_headers(NOW, BODY)))
    assert exc.value.code == "bad_signature"
    with pytest.raises(RejectedRequest) as exc:
        v.verify(InboundRequest(BODY, slack_headers(NOW - 301, BODY)))
    assert exc.value.code == "stale_timestamp"


def test_hubspot_v3_signs_method_url_and_milliseconds() -> None:
    url = "https://hub.example.com/hooks/crm?portal=1"
    v = verifier(**HUBSPOT_V3)
    ok = hubspot_headers(NOW * 1000 + 250, "POST", url, BODY)
    assert v.verify(InboundRequest(BODY, ok, method="POST", url=url)).timestamp == NOW + 0.25
    for method, at in (("PUT", url), ("POST", url.replace("portal=1", "portal=2"))):
        with pytest.raises(RejectedRequest) as exc:
            v.verify(InboundRequest(BODY, ok, method=method, url=at))
        assert exc.value.code == "bad_signature"
    # Five minutes, in milliseconds, as HubSpot says.
    with pytest.raises(RejectedRequest) as exc:
        v.verify(InboundRequest(BODY, hubspot_headers((NOW - 301) * 1000, "POST", url, BODY), url=url))
    assert exc.value.code == "stale_timestamp"


def test_hubspot_v3_behind_a_proxy_uses_public_url() -> None:
    public = "https://hooks.example.com/hooks/crm"
    v = verifier(**HUBSPOT_V3, public_url=public)
    headers = hubspot_headers(NOW * 1000, "POST", public, BODY)
    assert v.verify(InboundRequest(BODY, headers, url="http://127.0.0.1:8080/hooks/crm"))


def test_zendesk_iso8601_timestamp() -> None:
    v = verifier(**ZENDESK)
    assert v.verify(InboundRequest(BODY, zendesk_headers("2023-11-14T22:13:20Z", BODY))).timestamp == NOW
    for bad in ("1700000000", "2023-11-14T22:13:20", "yesterday"):
        with pytest.raises(RejectedRequest) as exc:
            v.verify(InboundRequest(BODY, zendesk_headers(bad, BODY)))
        assert exc.value.code == "bad_timestamp"
    with pytest.raises(RejectedRequest) as exc:
        v.verify(InboundRequest(BODY, zendesk_headers("2023-11-14T21:13:20Z", BODY)))
    assert exc.value.code == "stale_timestamp"


@pytest.mark.parametrize("scheme", [SLACK, HUBSPOT_V3, ZENDESK], ids=["slack", "hubspot_v3", "zendesk"])
def test_sign_hmac_round_trips(scheme: dict[str, str]) -> None:
    auth = InboundAuth.model_validate({"scheme": "hmac", "secrets": [{"secret": "s"}], **scheme})
    url = "https://hub.example.com/hooks/f"
    headers = sign_hmac(auth, SECRET, BODY, NOW, url=url)
    assert Verifier(auth, [SECRET], now=lambda: NOW).verify(InboundRequest(BODY, headers, url=url))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"signed": "{ts}.{body}", "timestamp_header": "T"}, "use only {body}, {timestamp}"),
        ({"signed": "{timestamp}", "timestamp_header": "T"}, "must include {body}"),
        ({"signed": "{timestamp}.{body}"}, "add `timestamp_header`"),
    ],
)
def test_bad_signed_template_is_refused_at_load(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        InboundAuth.model_validate({"scheme": "hmac", "secrets": [{"secret": "s"}], **settings})
