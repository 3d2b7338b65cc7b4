"""webhook_out: POST each record, signed per Standard Webhooks (webhook-id/-timestamp/-signature).

The request is rendered and sent by the `http` connector; this module adds the envelope and the
signature. `webhook-id` is the delivery's idempotency key, the same on every retry, so receivers
can drop duplicates; `webhook-timestamp` is the time of each attempt, so every attempt is signed
afresh (receivers reject timestamps older than a few minutes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import Field, field_validator, model_validator

from patchbay.config.models import DeliveryPolicy, SecretRef, Spec
from patchbay.connectors.base import BaseSink, Outcome, OutcomeClass, Resources
from patchbay.connectors.http import HttpSink, HttpSinkConfig, HttpSystem
from patchbay.connectors.http_client import check_url
from patchbay.errors import ConfigError, PatchbayError
from patchbay.expressions import iso, render_template
from patchbay.registry import connector
from patchbay.security.webhook_auth import sign_standard_webhooks, standard_webhooks_key

_B32 = "0123456789abcdefghjkmnpqrstvwxyz"


class WebhookOutSystem(Spec):
    url: str = Field(description="Base URL of the receiver; a destination's `path` is appended to it.")
    secrets: list[SecretRef] = Field(
        min_length=1,
        description="Signing secrets (`whsec_<base64>`), e.g. `[{secret: partner_whsec}]`. During a rotation "
        "list the new and the old one: each request then carries one signature per secret, so the receiver "
        "accepts it whichever secret it has.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Headers sent with every request.")
    verify_tls: bool = Field(True, description="Verify the receiver's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None,
        description="Path to a PEM file of the CAs to trust for this receiver instead of the system's "
        "(e.g. a private CA).",
    )

    _url = field_validator("url")(classmethod(lambda cls, v: check_url(v)))


class WebhookOutSinkConfig(Spec):
    path: str = Field(
        "", description="Appended to the system's URL; may hold {{ expressions }} (URL-quoted)."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers; values may hold {{ expr }}."
    )
    body: str | dict[str, Any] | None = Field(
        None,
        description="The JSON payload: omitted = the record as it is after the steps; "
        "a string = one expression; a mapping = target path -> expression, like map.",
    )
    envelope: bool = Field(
        False,
        description="Wrap the payload as {type, timestamp, data}, the Standard Webhooks event shape; "
        "`timestamp` is when the event arrived.",
    )
    event_type: str | None = Field(
        None,
        description="envelope: the event's `type`, e.g. `lead.created`; may hold {{ expressions }}.",
        examples=["lead.created"],
    )

    @model_validator(mode="after")
    def _coherent(self) -> WebhookOutSinkConfig:
        if self.envelope and not self.event_type:
            raise ValueError("envelope: true needs `event_type`, e.g. event_type: lead.created")
        if self.event_type and not self.envelope:
            raise ValueError("event_type is only sent inside the envelope: add `envelope: true` or remove it")
        return self


@connector("webhook_out", roles=("destination",), config=WebhookOutSinkConfig, system_config=WebhookOutSystem)
class WebhookOutSink(BaseSink[WebhookOutSystem, WebhookOutSinkConfig]):
    """Deliver each record as a signed Standard Webhooks POST."""

    def __init__(
        self,
        system: WebhookOutSystem,
        config: WebhookOutSinkConfig,
        policy: DeliveryPolicy,
        resources: Resources,
    ) -> None:
        super().__init__(system, config, policy, resources)
        self._http = HttpSink(
            HttpSystem(
                url=system.url,
                headers=system.headers,
                verify_tls=system.verify_tls,
                ca_bundle=system.ca_bundle,
            ),
            HttpSinkConfig(method="POST", path=config.path, headers=config.headers, body=config.body),
            policy,
            resources,
        )
        self._type = render_template(config.event_type) if config.event_type else None
        self.clock: Callable[[], float] = time.time  # webhook-timestamp of each attempt

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        req = self._http.render(record, key)
        if self._type is not None:
            data = orjson.loads(req["body"])
            envelope = {"type": self._type.render(record), "timestamp": iso(_arrival(key)), "data": data}
            req["body"] = orjson.dumps(envelope).decode()
        return req

    # -- delivery half -----------------------------------------------------
    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        body = str(request.get("body", "")).encode()
        try:
            signature = self._sign(key, int(self.clock()), body)
        except PatchbayError as exc:  # a secret that is missing or not whsec_: fix it, then resume
            return Outcome(OutcomeClass.AUTH, error=f"signing the webhook: {exc}")
        headers = {**(request.get("headers") or {}), **signature}
        return await self._http.send({**request, "headers": headers}, key)

    def _sign(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        sigs = []
        for ref in self.system.secrets:
            value = self.resources.secret(ref)
            if not value:
                raise ConfigError(f"secret {ref.label} is empty")
            key = standard_webhooks_key(value, label=ref.label)  # names the secret if it is malformed
            headers = sign_standard_webhooks(key, msg_id, timestamp, body)
            sigs.append(headers["webhook-signature"])
        headers["webhook-signature"] = " ".join(sigs)
        return headers

    async def close(self) -> None:
        await self._http.close()


def _arrival(key: str) -> datetime:
    """When the event arrived: the milliseconds in its ULID-style id (`evt_<26 chars>.<destination>`).

    Read from the key, not the clock, so that rendering stays a pure function of (record, key).
    """
    ident = key.split(".", 1)[0].rpartition("_")[2]
    if len(ident) == 26 and all(c in _B32 for c in ident):
        n = 0
        for c in ident[:10]:  # the first 10 chars are the 48-bit millisecond time (2 bits of padding)
            n = n * 32 + _B32.index(c)
        return datetime.fromtimestamp(n / 1000, UTC)
    return datetime.now(UTC)
