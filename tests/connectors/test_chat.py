"""chat: Slack, Teams and Mattermost shapes posted to a real server on 127.0.0.1; one flow end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.chat import ChatSink, ChatSinkConfig, ChatSystem
from patchbay.errors import RecordInvalid
from tests.conftest import eventually, write_project
from tests.connectors import declared_secrets

LEAD = {"email": "ada@example.com", "name": "Ada <!channel> & co", "source": "ads", "score": 42}
HOOK_SECRET = "https://hooks.example.test/services/T000/B000/XXXXsecretXXXX"


@pytest.fixture
async def resources() -> AsyncIterator[Resources]:
    secrets = {"slack_url": HOOK_SECRET}
    res = Resources(secret=lambda ref: secrets.get(ref.secret, ""), allow_private=True)  # a loopback server
    yield res
    if res.http is not None:
        await res.http.close()


def make(resources: Resources, style: str, url: str, **dest: Any) -> ChatSink:
    dest = {"text": "New lead *{{ email }}* from {{ source }}", **dest}
    return ChatSink(
        ChatSystem(style=style, url=url), ChatSinkConfig(**dest), DeliveryPolicy(timeout_s=2), resources
    )


async def deliver(sink_: ChatSink, record: Any, key: str = "evt_1.chat") -> Any:
    request = sink_.render(record, key)
    assert set(request) == {"body"}  # the URL (a credential) is never stored with the request
    return await sink_.send(request, key)


async def test_slack_blocks_with_title_fields_and_escaped_values(sink, resources):
    fields = {f"F{i}": "{{ score }}" for i in range(11)}
    dest = make(
        resources,
        "slack",
        sink.url + "/slack",
        title="Lead: {{ name }}",
        text="<https://crm.example.com/|Open the CRM> for {{ name }}",
        fields={"Email": "{{ email }}", **fields},
    )
    outcome = await deliver(dest, LEAD)

    assert outcome.cls is OutcomeClass.SUCCESS, outcome
    [req] = sink.received
    assert req.path == "/slack" and req.method == "POST"
    body = req.body
    # Record values cannot ping the channel or forge links; the template's own link stays a link.
    assert body["text"] == "<https://crm.example.com/|Open the CRM> for Ada &lt;!channel&gt; &amp; co"
    header, section, facts1, facts2 = body["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": "Lead: Ada <!channel> & co"}}
    assert section == {"type": "section", "text": {"type": "mrkdwn", "text": body["text"]}}
    assert facts1["type"] == "section" and len(facts1["fields"]) == 10  # Slack's limit per section
    assert facts1["fields"][0] == {"type": "mrkdwn", "text": "*Email*\nada@example.com"}
    assert [f["text"] for f in facts2["fields"]] == ["*F9*\n42", "*F10*\n42"]


async def test_teams_adaptive_card(sink, resources):
    dest = make(resources, "teams", sink.url + "/teams", title="New lead", fields={"Email": "{{ email }}"})
    outcome = await deliver(dest, LEAD)

    assert outcome.cls is OutcomeClass.SUCCESS
    body = sink.received[0].body
    assert body["type"] == "message"
    [att] = body["attachments"]
    assert att["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = att["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    assert card["body"] == [
        {"type": "TextBlock", "text": "New lead", "weight": "Bolder", "size": "Medium", "wrap": True},
        {"type": "TextBlock", "text": "New lead *ada@example.com* from ads", "wrap": True},
        {"type": "FactSet", "facts": [{"title": "Email", "value": "ada@example.com"}]},
    ]


async def test_mattermost_text_attachment_fields_and_props(sink, resources):
    dest = make(resources, "mattermost", sink.url + "/mm", title="New lead", fields={"Score": "{{ score }}"})
    outcome = await deliver(dest, LEAD, key="evt_9.mm")

    assert outcome.cls is OutcomeClass.SUCCESS
    assert sink.received[0].body == {
        "text": "#### New lead\nNew lead *ada@example.com* from ads",
        "attachments": [
            {
                "fallback": "New lead *ada@example.com* from ads",
                "fields": [{"short": True, "title": "Score", "value": "42"}],
            }
        ],
        "props": {"patchbay_key": "evt_9.mm"},
    }


async def test_url_secret_is_resolved_at_send_and_kept_out_of_errors(resources):
    dest = ChatSink(
        ChatSystem(style="slack", url_secret={"secret": "slack_url"}),
        ChatSinkConfig(text="hi"),
        DeliveryPolicy(timeout_s=1),
        resources,
    )
    assert declared_secrets(dest.system) == ["secret:slack_url"]
    resources.redact = lambda s: s.replace(HOOK_SECRET, "[secret]")
    outcome = await deliver(dest, {})
    assert outcome.cls is OutcomeClass.TRANSIENT  # hooks.example.test does not resolve
    assert "XXXXsecretXXXX" not in outcome.error + outcome.excerpt


async def test_a_secret_that_is_not_a_url_pauses(resources):
    dest = ChatSink(
        ChatSystem(style="slack", url_secret={"secret": "missing"}),
        ChatSinkConfig(text="hi"),
        DeliveryPolicy(),
        resources,
    )
    outcome = await deliver(dest, {})
    assert outcome.cls is OutcomeClass.AUTH and "not an http(s) URL" in outcome.error


@pytest.mark.parametrize(
    ("reply", "cls"),
    [
        ((404, {}, "no_service"), OutcomeClass.GONE),
        ((410, {}, "channel_is_archived"), OutcomeClass.GONE),
        ((403, {}, "invalid_token"), OutcomeClass.AUTH),
        ((400, {}, "invalid_blocks"), OutcomeClass.TERMINAL),
        ((429, {"Retry-After": "30"}, "rate_limited"), OutcomeClass.TRANSIENT),
        ((500, {}, "oops"), OutcomeClass.TRANSIENT),
    ],
)
async def test_slack_answers_are_classified(sink, resources, reply, cls):
    sink.script = [reply]
    outcome = await deliver(make(resources, "slack", sink.url), LEAD)
    assert outcome.cls is cls
    if reply[0] == 429:
        assert outcome.retry_after_s == 30


def test_an_empty_message_is_invalid(resources):
    dest = make(resources, "slack", "https://chat.example.com/hook", text="{{ missing }}")
    with pytest.raises(RecordInvalid, match="empty"):
        dest.render({}, "k")


@pytest.mark.parametrize(
    ("system", "message"),
    [
        ({"style": "slack"}, "exactly one of `url_secret"),
        ({"style": "slack", "url": "https://x.example.com", "url_secret": {"secret": "s"}}, "exactly one"),
        ({"style": "discord", "url": "https://x.example.com"}, "slack', 'teams' or 'mattermost'"),
        ({"style": "slack", "url": "ftp://x.example.com"}, "absolute http"),
    ],
)
def test_system_mistakes_are_refused(system, message):
    with pytest.raises(ValueError, match=message):
        ChatSystem(**system)


# ----------------------------------------------------------------------------- end to end
def chat_project(root: Path, url: str) -> Path:
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "sales-chat": {
            "kind": "chat",
            "owner": "sales",
            "style": "slack",
            "url": url,
            "allow_private_network": True,
        },
    }
    flow = {
        "purpose": "sales hears about every lead",
        "owner": "sales",
        "trigger": {"webhook": {"system": "website"}},
        "steps": [
            {
                "map": {
                    "email": "lower(trim(email))",
                    "name": "first_name",
                    "source": "coalesce(utm_source, 'website')",
                }
            }
        ],
        "destinations": [
            {
                "name": "announce",
                "system": "sales-chat",
                "title": "New lead",
                "text": "{{ name }} ({{ email }}) via {{ source }}",
                "fields": {"Email": "{{ email }}"},
                "delivery": {"retry": {"schedule": ["100ms"], "jitter": 0}},
            }
        ],
    }
    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            "flows/lead-chat.yaml": yaml.safe_dump(flow, sort_keys=False),
        },
    )


async def test_webhook_to_slack_end_to_end(tmp_path, sink, start_hub):
    sink.script = [503]  # the first try fails; the retry delivers
    hub = await start_hub(chat_project(tmp_path, sink.url + "/services/hook"))
    status, body = await hub.post("/hooks/lead-chat", {"email": " Ada@Example.com ", "first_name": "Ada"})
    assert status in (200, 202), body

    async def delivered() -> bool:
        return bool((await hub.run(body["event_id"]))["status"] == "delivered")

    await eventually(delivered, what="chat message delivered")
    assert len(sink.received) == 2
    msg = sink.received[-1].body
    assert msg["text"] == "Ada (ada@example.com) via website"
    assert msg["blocks"][0]["text"]["text"] == "New lead"
    assert msg["blocks"][2]["fields"] == [{"type": "mrkdwn", "text": "*Email*\nada@example.com"}]
    run = await hub.run(body["event_id"])
    assert [a["outcome"] for a in run["deliveries"][0]["attempts_log"]] == ["transient", "success"]
    stored = run["deliveries"][0]["request"]
    assert set(stored) == {"body"} and orjson.loads(stored["body"]) == msg  # the URL is not stored


def test_check_accepts_a_chat_project_and_locates_unknown_settings(tmp_path):
    from click.testing import CliRunner

    from patchbay.cli import main

    root = chat_project(tmp_path, "https://hooks.example.com/x")
    systems = root / "systems.yaml"
    systems.write_text(
        systems.read_text().replace("url: https://hooks.example.com/x", "url_secret: {secret: slack_url}")
    )
    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8, "PATCHBAY_SECRET_SLACK_URL": HOOK_SECRET}
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert res.exit_code == 0, res.output

    systems.write_text(systems.read_text().replace("style:", "styel:"))
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    line = next(i for i, t in enumerate(systems.read_text().splitlines(), 1) if "styel" in t)
    assert f"{systems}:{line}: unknown setting 'styel'; did you mean 'style'?" in res.output
