"""webhook_out against a real receiver on 127.0.0.1 that verifies with the `standardwebhooks` package."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.webhook_out import WebhookOutSink, WebhookOutSinkConfig, WebhookOutSystem
from patchbay.records import new_id
from patchbay.security.webhook_auth import generate_whsec
from tests.connectors import declared_secrets

OLD, NEW = generate_whsec(), generate_whsec()
SECRETS = {"partner_new": NEW, "partner_old": OLD, "broken": "whsec_%%%"}


@pytest.fixture
async def resources() -> AsyncIterator[Resources]:
    res = Resources(secret=lambda ref: SECRETS[ref.secret], allow_private=True)  # a loopback receiver
    yield res
    if res.http is not None:
        await res.http.close()


class Receiver:
    """Verifies every request with each secret it knows, independently of Patchbay's code."""

    def __init__(self, secrets: list[str]) -> None:
        self.hooks = [Webhook(s) for s in secrets]
        self.requests: list[dict[str, Any]] = []
        self.script: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = dict(request.headers)
        verified = []
        for hook in self.hooks:
            try:
                hook.verify(raw, headers)
                verified.append(True)
            except WebhookVerificationError:
                verified.append(False)
        self.requests.append(
            {"path": request.path, "headers": headers, "body": orjson.loads(raw), "verified": verified}
        )
        status = self.script.pop(0) if self.script else 204
        return web.Response(status=status if all(verified) else 401)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver([NEW, OLD])
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield rec, f"http://{host}:{port}"
    await runner.cleanup()


def make(
    url: str, resources: Resources, secrets: tuple[str, ...] = ("partner_new", "partner_old"), **dest: Any
) -> WebhookOutSink:
    system = WebhookOutSystem(
        url=url, secrets=[{"secret": s} for s in secrets], headers={"X-Sender": "patchbay"}
    )
    return WebhookOutSink(system, WebhookOutSinkConfig(**dest), DeliveryPolicy(timeout_s=2), resources)


async def test_signed_for_both_secrets_during_rotation(receiver, resources):
    rec, url = receiver
    dest = make(url, resources, path="/hooks/{{ kind }}")
    key = f"{new_id()}.partner"
    record = {"kind": "lead", "email": "ada@example.com"}
    outcome = await dest.send(dest.render(record, key), key)

    assert outcome.cls is OutcomeClass.SUCCESS, outcome
    [req] = rec.requests
    assert req["verified"] == [True, True]  # a receiver holding either secret accepts it
    assert req["path"] == "/hooks/lead"
    assert req["body"] == record
    assert req["headers"]["webhook-id"] == key
    assert req["headers"]["X-Sender"] == "patchbay"
    assert req["headers"]["Content-Type"] == "application/json"
    assert abs(int(req["headers"]["webhook-timestamp"]) - time.time()) < 5
    sigs = req["headers"]["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)


async def test_a_receiver_with_only_the_old_secret_still_verifies(receiver, resources):
    rec, url = receiver
    rec.hooks = [Webhook(OLD)]
    dest = make(url, resources, secrets=("partner_new", "partner_old"))
    outcome = await dest.send(dest.render({"a": 1}, "evt_1.p"), "evt_1.p")
    assert outcome.cls is OutcomeClass.SUCCESS
    rec.hooks = [Webhook(generate_whsec())]  # a secret we do not sign with
    outcome = await dest.send(dest.render({"a": 1}, "evt_1.p"), "evt_1.p")
    assert outcome.cls is OutcomeClass.AUTH and outcome.status_code == 401


async def test_retry_keeps_the_webhook_id_and_signs_again(receiver, resources):
    rec, url = receiver
    rec.script = [503, 200]
    dest = make(url, resources)
    key = f"{new_id()}.partner"
    request = dest.render({"email": "ada@example.com"}, key)

    dest.clock = lambda: time.time() - 90  # the first attempt, a minute and a half ago
    first = await dest.send(request, key)
    dest.clock = time.time
    second = await dest.send(request, key)

    assert (first.cls, second.cls) == (OutcomeClass.TRANSIENT, OutcomeClass.SUCCESS)
    a, b = (r["headers"] for r in rec.requests)
    assert a["webhook-id"] == b["webhook-id"] == key
    assert int(b["webhook-timestamp"]) - int(a["webhook-timestamp"]) >= 89
    assert a["webhook-signature"] != b["webhook-signature"]
    assert [r["verified"] for r in rec.requests] == [[True, True], [True, True]]
    assert a["Idempotency-Key"] == b["Idempotency-Key"] == key


async def test_envelope_carries_type_timestamp_and_data(receiver, resources):
    rec, url = receiver
    dest = make(url, resources, envelope=True, event_type="lead.{{ status }}", body={"email": "email"})
    key = f"{new_id()}.partner"
    request = dest.render({"status": "created", "email": "ada@example.com", "secret_note": "x"}, key)
    assert request == dest.render(
        {"status": "created", "email": "ada@example.com", "secret_note": "x"}, key
    )  # pure
    outcome = await dest.send(request, key)

    assert outcome.cls is OutcomeClass.SUCCESS
    body = rec.requests[0]["body"]
    assert body["type"] == "lead.created" and body["data"] == {"email": "ada@example.com"}
    sent_at = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - sent_at).total_seconds()) < 5


async def test_a_malformed_secret_pauses_without_sending(receiver, resources):
    rec, url = receiver
    dest = make(url, resources, secrets=("broken",))
    outcome = await dest.send(dest.render({"a": 1}, "k"), "k")
    assert outcome.cls is OutcomeClass.AUTH and "secret:broken" in outcome.error
    assert rec.requests == []


async def test_receiver_down_is_transient(resources):
    dest = make("http://127.0.0.1:9", resources)
    outcome = await dest.send(dest.render({"a": 1}, "k"), "k")
    assert outcome.cls is OutcomeClass.TRANSIENT and "cannot connect" in outcome.error


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ({"envelope": True}, "envelope: true needs `event_type`"),
        ({"event_type": "lead.created"}, "add `envelope: true`"),
        ({"colour": "red"}, "Extra inputs"),
    ],
)
def test_config_mistakes_are_refused(dest, message):
    with pytest.raises(ValueError, match=message):
        WebhookOutSinkConfig(**dest)


def test_secrets_are_required_and_referenced():
    with pytest.raises(ValueError, match="at least 1"):
        WebhookOutSystem(url="https://partner.example.com", secrets=[])
    with pytest.raises(ValueError, match="never written inline"):
        WebhookOutSystem(url="https://partner.example.com", secrets=["whsec_abc"])
    system = WebhookOutSystem(url="https://partner.example.com", secrets=[{"secret": "a"}, {"env": "B"}])
    sink = WebhookOutSink(system, WebhookOutSinkConfig(), DeliveryPolicy(), Resources())
    assert declared_secrets(sink.system) == ["secret:a", "env:B"]


def test_check_accepts_a_webhook_out_project_and_locates_unknown_settings(tmp_path):
    from click.testing import CliRunner

    from patchbay.cli import main
    from tests.conftest import write_project

    systems = """
    website:
      owner: web
      webhook: {scheme: standard_webhooks, secrets: [{secret: website_whsec}]}
    partner:
      kind: webhook_out
      owner: partnerships
      url: https://partner.example.com/hooks
      secrets: [{secret: partner_new}, {secret: partner_old}]
    """
    flow = """
    purpose: partners hear about leads
    owner: partnerships
    trigger:
      webhook: {system: website}
    destinations:
      - name: partner
        system: partner
        path: /leads
        envelope: true
        event_type: lead.created
    """
    root = write_project(tmp_path, {"systems.yaml": systems, "flows/partner.yaml": flow})
    env = {
        "PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8,
        "PATCHBAY_SECRET_PARTNER_NEW": NEW,
        "PATCHBAY_SECRET_PARTNER_OLD": OLD,
    }
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert res.exit_code == 0, res.output

    flow_file = root / "flows/partner.yaml"
    flow_file.write_text(flow_file.read_text().replace("event_type", "event_typ"))
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert f"{flow_file}:10: unknown setting 'event_typ'; did you mean 'event_type'?" in res.output
