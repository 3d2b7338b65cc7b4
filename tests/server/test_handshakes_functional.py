"""Webhook handshakes declared in a preset: Slack's url_verification and Xero's intent to receive, answered
after authentication and never stored; a wrong signature still gets 401."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import orjson
import yaml

from tests.conftest import write_project

SIGNING = "8f742231b10e8888abcd99yyyzzz85a5"


def slack_headers(body: bytes, secret: str = SIGNING) -> dict[str, str]:
    ts = str(int(time.time()))
    mac = hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Signature": "v0=" + mac,
        "X-Slack-Request-Timestamp": ts,
        "Content-Type": "application/json",
    }


def xero_headers(body: bytes, secret: str = SIGNING) -> dict[str, str]:
    mac = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {"x-xero-signature": mac, "Content-Type": "application/json"}


def project(root, preset: str) -> None:
    systems = {
        "app": {"preset": preset, "owner": "ops", "webhook": {"secrets": [{"env": "HANDSHAKE_SIGNING"}]}},
        "log": {"kind": "http", "owner": "ops", "url": "http://127.0.0.1:9", "allow_private_network": True},
    }
    if preset == "slack":  # its outbound side (the incoming-webhook URL) is a secret
        systems["app"]["url_secret"] = {"env": "HANDSHAKE_SIGNING"}
    if preset == "xero":  # its system settings need a tenant id header
        systems["app"]["headers"] = {"xero-tenant-id": "45e4708e-d862-4111-ab3a-dd8cd03913e1"}
        systems["app"]["auth"] = {"scheme": "bearer", "token": {"env": "HANDSHAKE_SIGNING"}}
    flow = {
        "purpose": "events from the app",
        "owner": "ops",
        "trigger": {"webhook": {"system": "app"}},
        "destinations": [{"name": "log", "system": "log", "path": "/x"}],
    }
    write_project(
        root,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": yaml.safe_dump(systems),
            "flows/f.yaml": yaml.safe_dump(flow),
        },
    )


async def test_slack_url_verification_echoes_the_challenge(tmp_path, start_hub, monkeypatch):
    monkeypatch.setenv("HANDSHAKE_SIGNING", SIGNING)
    project(tmp_path, "slack")
    hub = await start_hub(tmp_path)
    body = orjson.dumps(
        {
            "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
            "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
            "type": "url_verification",
        }
    )
    status, answer = await hub.post("/hooks/f", body, headers=slack_headers(body), sign=False)
    assert (status, answer) == (200, {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"})
    assert await hub.count() == 0  # a handshake is not an event
    status, answer = await hub.post("/hooks/f", body, headers=slack_headers(body, "wrong"), sign=False)
    assert (status, answer["error"]) == (401, "bad_signature")
    event = orjson.dumps(
        {"type": "event_callback", "event_id": "Ev08MFMKH6", "event": {"type": "app_mention"}}
    )
    status, answer = await hub.post("/hooks/f", event, headers=slack_headers(event), sign=False)
    assert status == 202 and await hub.count() == 1


async def test_xero_intent_to_receive(tmp_path, start_hub, monkeypatch):
    monkeypatch.setenv("HANDSHAKE_SIGNING", SIGNING)
    project(tmp_path, "xero")
    hub = await start_hub(tmp_path)
    itr = orjson.dumps(
        {"events": [], "firstEventSequence": 0, "lastEventSequence": 0, "entropy": "S0m3r4Nd0mt3xt"}
    )
    status, answer = await hub.post("/hooks/f", itr, headers=xero_headers(itr), sign=False)
    assert (status, answer) == (200, b"")
    status, _ = await hub.post("/hooks/f", itr, headers=xero_headers(itr, "not-the-key"), sign=False)
    assert status == 401
    assert await hub.count() == 0
    event = orjson.dumps(
        {
            "events": [
                {
                    "resourceUrl": "https://api.xero.com/api.xro/2.0/Contacts/717f2bfc",
                    "resourceId": "717f2bfc",
                    "eventDateUtc": "2026-12-06T10:00:00.000",
                    "eventType": "UPDATE",
                    "eventCategory": "CONTACT",
                    "tenantId": "45e4708e-d862-4111-ab3a-dd8cd03913e1",
                    "tenantType": "ORGANISATION",
                }
            ],
            "firstEventSequence": 1,
            "lastEventSequence": 1,
            "entropy": "Wz1FfAhKmo",
        }
    )
    status, _ = await hub.post("/hooks/f", event, headers=xero_headers(event), sign=False)
    assert status == 200 and await hub.count() == 1  # Xero counts only a 200 as received


def test_check_reports_a_handshake_expression_that_does_not_compile(tmp_path, monkeypatch):
    from patchbay.config.project import load_project

    monkeypatch.setenv("HANDSHAKE_SIGNING", SIGNING)
    project(tmp_path, "slack")
    flow = yaml.safe_load((tmp_path / "flows/f.yaml").read_text())
    flow["trigger"]["webhook"]["handshakes"] = [{"when": "type == ", "status": 200}]
    (tmp_path / "flows/f.yaml").write_text(yaml.safe_dump(flow))
    _, problems = load_project(tmp_path)
    assert problems and problems[0].file.endswith("flows/f.yaml") and problems[0].line > 0
    assert problems[0].message.startswith("trigger.webhook.handshakes.0.when: invalid expression")
