"""chat: post a message to a Slack, Microsoft Teams or Mattermost channel through its incoming-webhook URL.

The URL of an incoming webhook is itself the credential (anyone holding it can post to the
channel), so prefer `url_secret` to a plain `url`: it stays out of the project files and is
scrubbed from logs and attempt excerpts. The stored request holds only the message, never the URL.

Chat services have no idempotency key: a retry after a timeout whose post did go through shows the
message twice (at-least-once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import orjson
from pydantic import Field, ValidationError, field_validator, model_validator

from patchbay.config.models import DeliveryPolicy, SecretRef, Spec
from patchbay.connectors.base import BaseSink, Outcome, OutcomeClass, Resources
from patchbay.connectors.http import HttpSink, HttpSinkConfig, HttpSystem
from patchbay.connectors.http_client import check_url
from patchbay.errors import PatchbayError, RecordInvalid, Violation
from patchbay.expressions import render_template
from patchbay.registry import connector

Style = Literal["slack", "teams", "mattermost"]

# Slack Block Kit limits: a longer text makes Slack refuse the whole message (400 invalid_blocks).
_SLACK_HEADER_MAX = 150
_SLACK_SECTION_MAX = 3000
_SLACK_FIELD_MAX = 2000
_SLACK_FIELDS_PER_SECTION = 10


class ChatSystem(Spec):
    style: Style = Field(
        description="Which service the URL belongs to, so the message is shaped for it: slack, teams "
        "(a Teams Workflows / incoming-webhook URL; sent as an Adaptive Card) or mattermost."
    )
    url_secret: SecretRef | None = Field(
        None,
        description="The incoming-webhook URL, kept as a secret (`patchbay secrets set NAME`). Preferred: "
        "whoever has the URL can post to the channel.",
    )
    url: str | None = Field(
        None,
        description="The incoming-webhook URL written in the project. Only for URLs that are not secret "
        "(e.g. a local test receiver); use `url_secret` for Slack, Teams and Mattermost.",
    )
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None,
        description="Path to a PEM file of the CAs to trust instead of the system's "
        "(e.g. the private CA of a self-hosted Mattermost).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and "{{" in v:
            raise ValueError("the webhook URL cannot hold {{ expressions }}")
        return None if v is None else check_url(v)

    @model_validator(mode="after")
    def _one(self) -> ChatSystem:
        if (self.url is None) == (self.url_secret is None):
            raise ValueError("give exactly one of `url_secret: {secret: NAME}` (preferred) or `url`")
        return self


class ChatSinkConfig(Spec):
    text: str = Field(
        description="The message; may hold {{ expressions }}, e.g. `New lead {{ properties.email }}`. "
        "Slack and Mattermost read it as markdown.",
        examples=["New lead {{ properties.email }} from {{ properties.lead_source }}"],
    )
    title: str | None = Field(None, description="A heading above the message; may hold {{ expressions }}.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Label -> {{ template }}, shown as a list of facts under the message, in this order.",
        examples=[{"Email": "{{ properties.email }}", "Source": "{{ properties.lead_source }}"}],
    )


@connector("chat", roles=("destination",), config=ChatSinkConfig, system_config=ChatSystem)
class ChatSink(BaseSink[ChatSystem, ChatSinkConfig]):
    """Post each record as one chat message."""

    def __init__(
        self, system: ChatSystem, config: ChatSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        super().__init__(system, config, policy, resources)
        self._text = render_template(config.text)
        self._title = render_template(config.title) if config.title else None
        self._fields = {name: render_template(t) for name, t in config.fields.items()}
        self._shape: Callable[[str, str, list[tuple[str, str]], str], dict[str, Any]] = _SHAPES[system.style]
        self._quote = _slack_escape if system.style == "slack" else None
        self._http: HttpSink | None = None

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        q = self._quote
        text = self._text.render(record, quote=q).strip()
        title = self._title.render(record).strip() if self._title else ""
        fields = [(_q(name, q), t.render(record, quote=q)) for name, t in self._fields.items()]
        if not text and not title:
            raise RecordInvalid([Violation("text", "the message is empty for this record")], step="chat")
        return {"body": orjson.dumps(self._shape(text, title, fields, key)).decode()}

    # -- delivery half -----------------------------------------------------
    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        try:
            url = self._url()
        except (PatchbayError, ValueError) as exc:  # no URL in the secret: fix it, then resume
            return Outcome(OutcomeClass.AUTH, error=f"posting to chat: {self.resources.redact(str(exc))}")
        http = self._sink(url)
        outcome = await http.send({"method": "POST", "url": url, "body": request["body"]}, key)
        if self.system.style == "slack" and outcome.status_code == 404 and "no_service" in outcome.excerpt:
            # Slack's answer for a deleted or revoked webhook: every later message would fail too.
            outcome.cls = OutcomeClass.GONE
            outcome.error = "the Slack webhook was removed; destination disabled"
        return outcome

    def _url(self) -> str:
        ref = self.system.url_secret
        if ref is None:
            assert self.system.url is not None  # the model holds exactly one
            return self.system.url
        try:
            return check_url(self.resources.secret(ref).strip())
        except ValueError:
            raise ValueError(f"secret {ref.label} is not an http(s) URL") from None

    def _sink(self, url: str) -> HttpSink:
        if self._http is None or self._http.system.url != url:  # a rotated secret: new URL
            try:
                system = HttpSystem(
                    url=url, verify_tls=self.system.verify_tls, ca_bundle=self.system.ca_bundle
                )
            except ValidationError:
                raise ValueError("the webhook URL is not valid") from None
            self._http = HttpSink(system, HttpSinkConfig(method="POST"), self.policy, self.resources)
        return self._http


# -- message shapes: (text, title, [(label, value)], key) -> JSON body ---------------------------


def _slack(text: str, title: str, fields: list[tuple[str, str]], key: str) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    if title:
        blocks.append(
            {"type": "header", "text": {"type": "plain_text", "text": _cut(title, _SLACK_HEADER_MAX)}}
        )
    if text:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(text, _SLACK_SECTION_MAX)}})
    items = [
        {"type": "mrkdwn", "text": _cut(f"*{name}*\n{value}", _SLACK_FIELD_MAX)} for name, value in fields
    ]
    for i in range(0, len(items), _SLACK_FIELDS_PER_SECTION):
        blocks.append({"type": "section", "fields": items[i : i + _SLACK_FIELDS_PER_SECTION]})
    # `text` is what notifications and screen readers show.
    return {"text": text or _slack_escape(title), "blocks": blocks}


def _teams(text: str, title: str, fields: list[tuple[str, str]], key: str) -> dict[str, Any]:
    body: list[dict[str, Any]] = []
    if title:
        body.append({"type": "TextBlock", "text": title, "weight": "Bolder", "size": "Medium", "wrap": True})
    if text:
        body.append({"type": "TextBlock", "text": text, "wrap": True})
    if fields:
        body.append({"type": "FactSet", "facts": [{"title": n, "value": v} for n, v in fields]})
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    }
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}
        ],
    }


def _mattermost(text: str, title: str, fields: list[tuple[str, str]], key: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"text": f"#### {title}\n{text}".rstrip() if title else text}
    if fields:
        msg["attachments"] = [
            {
                "fallback": text or title,
                "fields": [{"short": True, "title": n, "value": v} for n, v in fields],
            }
        ]
    msg["props"] = {"patchbay_key": key}  # kept with the post: ties it to the run that sent it
    return msg


_SHAPES: dict[str, Callable[[str, str, list[tuple[str, str]], str], dict[str, Any]]] = {
    "slack": _slack,
    "teams": _teams,
    "mattermost": _mattermost,
}


def _slack_escape(s: str) -> str:
    """Slack's three control characters: a record value cannot become a link or an @channel mention."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _q(s: str, quote: Callable[[str], str] | None) -> str:
    return quote(s) if quote else s


def _cut(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"
