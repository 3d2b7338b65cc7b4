"""Webhook endpoints on a real socket: what is accepted is stored before the 202; nothing else leaves a trace."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from patchbay.security.webhook_auth import sign_standard_webhooks
from tests.conftest import SECRET_WHSEC, lead_project

LEAD = {"email": " Ada@Example.com ", "first_name": "Ada", "utm_source": "ads"}


@pytest.fixture
async def hub(tmp_path, sink, start_hub):
    sink.default = 201
    return await start_hub(
        lead_project(tmp_path, sink.url, hub={"max_body_bytes": 2048, "max_json_depth": 8})
    )


async def test_accepted_event_is_stored_before_the_response(hub):
    status, body = await hub.post("/hooks/lead-capture", LEAD)
    assert status == 202
    assert body["event_id"].startswith("evt_") and body["status"] == "pending"
    # The 202 came back: the event is already readable from the store by another connection.
    run = await hub.run(body["event_id"])
    assert run["payload"] == LEAD
    assert run["record_key"] == "ada@example.com"


async def test_resent_event_is_acknowledged_once(hub, sink):
    raw = orjson.dumps(LEAD)
    s1, b1 = await hub.post("/hooks/lead-capture", raw, msg_id="msg_same")
    s2, b2 = await hub.post("/hooks/lead-capture", raw, msg_id="msg_same")
    assert (s1, s2) == (202, 200)
    assert b2 == {"event_id": b1["event_id"], "status": "duplicate"}
    assert await hub.count() == 1
    await sink.wait_for(1)
    assert len(sink.received) == 1


def _signed(body: bytes, **over: str) -> dict[str, str]:
    h = sign_standard_webhooks(SECRET_WHSEC, "msg_1", int(time.time()), body)
    h.update(over)
    return h


BAD_CASES = [
    # name, body, headers (sign=False means: send exactly these), expected status, expected error code
    ("unsigned", orjson.dumps(LEAD), {}, False, 401, "missing_signature"),
    (
        "forged signature",
        orjson.dumps(LEAD),
        {"webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="},
        True,
        401,
        "bad_signature",
    ),
    ("signed with another secret", orjson.dumps(LEAD), None, False, 401, "bad_signature"),
    ("stale timestamp", orjson.dumps(LEAD), "stale", False, 401, "stale_timestamp"),
    ("malformed JSON", b'{"email": "a@b.c",', None, True, 400, "malformed_json"),
    ("empty body", b"", None, True, 400, "empty_body"),
    ("not an object", b'["a@b.c"]', None, True, 422, "not_an_object"),
    (
        "too deep",
        orjson.dumps({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}),
        None,
        True,
        400,
        "too_deep",
    ),
    ("oversized", orjson.dumps({"email": "a@b.co", "pad": "x" * 4000}), None, True, 413, "body_too_large"),
    (
        "wrong content type",
        b"email=a@b.co",
        {"Content-Type": "text/plain"},
        True,
        415,
        "unsupported_media_type",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "headers", "sign", "status", "code"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
async def test_bad_input_is_rejected_and_leaves_no_trace(hub, name, body, headers, sign, status, code):
    if headers is None and not sign:
        headers = sign_standard_webhooks(
            "whsec_" + "b3RoZXItc2VjcmV0LW90aGVyLXNlY3JldA==", "msg_x", int(time.time()), body
        )
        headers["Content-Type"] = "application/json"
    elif headers == "stale":
        headers = sign_standard_webhooks(SECRET_WHSEC, "msg_x", int(time.time()) - 3600, body)
        headers["Content-Type"] = "application/json"
    got_status, got = await hub.post("/hooks/lead-capture", body, headers=headers or {}, sign=sign)
    assert got_status == status, got
    assert got["error"] == code
    assert got["flow"] == "lead-capture" and got["message"]
    assert SECRET_WHSEC not in got["message"]
    assert await hub.count("events") == 0
    assert await hub.count("deliveries") == 0
    metrics = hub.hub.metrics.render().decode()
    assert f'patchbay_requests_rejected_total{{code="{code}",flow="lead-capture"}} 1.0' in metrics


async def test_same_id_with_another_body_is_refused(hub):
    s1, _ = await hub.post("/hooks/lead-capture", LEAD, msg_id="msg_replayed")
    s2, body = await hub.post(
        "/hooks/lead-capture", {**LEAD, "email": "eve@evil.test"}, msg_id="msg_replayed"
    )
    assert (s1, s2) == (202, 409)
    assert body["error"] == "replayed_id"
    assert await hub.count() == 1


@pytest.mark.parametrize("public", [False, True], ids=["url-it-reached", "public-url"])
async def test_an_hmac_that_signs_the_url_is_checked_against_the_url_the_request_reached(
    tmp_path, sink, start_hub, public
):
    """HubSpot v3 signs method, URL and body. The server builds the URL only for a scheme that signs it; the
    signature over the URL the request reached (or the `public_url` set behind a proxy) passes, over another
    URL it is refused."""
    import yaml

    from patchbay.config.models import InboundAuth
    from patchbay.security.webhook_auth import sign_hmac

    root = lead_project(tmp_path, sink.url)
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    webhook = {
        "scheme": "hmac",
        "secrets": [{"secret": "website_whsec"}],
        "header": "X-Signature",
        "signed": "{method}{url}{body}",
    }
    if public:
        webhook["public_url"] = "https://hooks.example.com/hooks/lead-capture"
    systems["website"]["webhook"] = webhook
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    hub = await start_hub(root)
    signer = InboundAuth.model_validate({k: v for k, v in webhook.items() if k != "public_url"})
    raw = orjson.dumps(LEAD)
    reached = hub.url + "/hooks/lead-capture"
    right = webhook.get("public_url", reached)
    for url, status in ((right, 202), (reached if public else reached + "?other=1", 401)):
        headers = sign_hmac(signer, SECRET_WHSEC, raw, url=url)
        got, _ = await hub.post("/hooks/lead-capture", raw, headers=headers, sign=False)
        assert got == status, url


async def test_invalid_record_is_quarantined_with_every_reason(tmp_path, sink, start_hub):
    steps = """
      - map:
          properties.email: "lower(email)"
          amount: amount
      - validate:
          properties.email: {required: true, format: email}
          amount: {type: number}
    """
    hub = await start_hub(lead_project(tmp_path, sink.url, steps=steps))
    status, body = await hub.post("/hooks/lead-capture", {"email": "not-an-email", "amount": "12x"})
    assert status == 202 and body["status"] == "quarantined"
    run = await hub.run(body["event_id"])
    assert run["status"] == "quarantined"
    assert "properties.email" in run["reason"] and "amount" in run["reason"]
    assert run["deliveries"] == []  # never half-delivered
    assert sink.received == []


async def test_health_and_metrics(hub):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(hub.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(hub.url + "/readyz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"
        worker = hub.hub.flows["lead-capture"].workers["crm"]
        worker._tasks[0].cancel()  # the feeder dies: the hub is alive but no longer delivering
        await asyncio.sleep(0)
        async with s.get(hub.url + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["reason"] == "not running: delivery lead-capture/crm"
        async with s.get(hub.url + "/healthz") as r:
            assert r.status == 200  # liveness is about the process, not the workers
        async with s.get(hub.url + "/metrics") as r:
            assert "patchbay_events_received_total" in await r.text()
