"""smtp: send each record as an email (plain text, or text + HTML) through an SMTP server.

Each delivery opens its own connection. The Message-ID is derived from the idempotency key
(`<key@patchbay>`), the same on every retry, so mail systems that dedupe by Message-ID drop a
message re-sent after a lost reply; others may show it twice (at-least-once).

Reply codes: 4xx and lost connections are retried; 5xx go to the dead letter; a refused login
(530/534/535/538), a server without STARTTLS or AUTH when they are required, and an untrusted
certificate pause the destination until the settings are fixed and it is resumed.
"""

from __future__ import annotations

import email.errors
import email.utils
import html
import re
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from pydantic import Field, field_validator, model_validator

from patchbay.config.models import DeliveryPolicy, SecretRef, Spec
from patchbay.connectors.base import (
    BaseSink,
    Outcome,
    OutcomeClass,
    Resources,
    Stopwatch,
    excerpt,
    import_driver,
)
from patchbay.connectors.tls_client import TlsSettings, tls_context
from patchbay.errors import PatchbayError, RecordInvalid, Violation
from patchbay.expressions import Template, render_template
from patchbay.registry import connector
from patchbay.security.ssrf import BlockedAddress, open_socket

_AUTH_CODES = frozenset({530, 534, 535, 538})  # authentication required / too weak / refused / needs TLS
_NOT_IN_MSG_ID = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]")
_LINE_BREAKS = re.compile(r"[\r\n]+")


def parse_addresses(value: str) -> list[str]:
    """`a@x.org, "Doe, J" <j@y.org>` -> each address, normalised; ValueError saying what is wrong."""
    if _LINE_BREAKS.search(value):
        raise ValueError("an address cannot contain a line break")
    out = []
    for name, addr in email.utils.getaddresses([value]):
        try:
            parsed: Address | None = Address(display_name=name, addr_spec=addr)
        except (ValueError, IndexError, email.errors.HeaderParseError):
            parsed = None
        if parsed is None or not parsed.username or not parsed.domain:
            raise ValueError(f"{value!r} is not an email address")
        out.append(str(parsed))
    return out


def _check_address(v: str) -> str:
    if len(parse_addresses(v)) != 1:
        raise ValueError(
            f"give one address, e.g. alerts@example.com or 'Patchbay <alerts@example.com>', not {v!r}"
        )
    return v


class SmtpSystem(Spec):
    host: str = Field(description="SMTP server name or address.", examples=["smtp.example.com"])
    port: int | None = Field(
        None, ge=1, le=65535, description="Server port; default 465 with `tls`, 587 with `starttls`, else 25."
    )
    starttls: bool | None = Field(
        None,
        description="Upgrade the connection with STARTTLS, and fail if the server does not offer it. "
        "Default: on, unless `tls` is on. Turn it off only for a relay on a trusted network.",
    )
    tls: bool = Field(False, description="Implicit TLS from the first byte (usually port 465).")
    username: str | None = Field(None, description="Login name, when the server needs one.")
    password: SecretRef | None = Field(None, description="Login password, e.g. `{secret: smtp_password}`.")
    from_address: str = Field(
        description="The From of every message.", examples=["Patchbay <alerts@example.com>"]
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=600,
        description="Seconds to wait for each step (connect, each command); "
        "default: the destination's delivery.timeout_s.",
    )
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate (leave on).")
    ca_bundle: str | None = Field(
        None,
        description="Path to a PEM file of the CAs to trust for this server instead of the system's "
        "(e.g. a private CA).",
    )

    _from = field_validator("from_address")(classmethod(lambda cls, v: _check_address(v)))

    @model_validator(mode="after")
    def _coherent(self) -> SmtpSystem:
        if self.tls and self.starttls:
            raise ValueError("choose one of `tls` (implicit TLS, port 465) or `starttls` (port 587)")
        if (self.username is None) != (self.password is None):
            raise ValueError("give both `username` and `password: {secret: NAME}`, or neither")
        return self

    @property
    def use_starttls(self) -> bool:
        return not self.tls if self.starttls is None else self.starttls

    @property
    def effective_port(self) -> int:
        return self.port or (465 if self.tls else 587 if self.use_starttls else 25)


class SmtpSinkConfig(Spec):
    to: list[str] = Field(
        min_length=1,
        description="Recipients; each entry may hold {{ expressions }} and may render to several "
        "comma-separated addresses.",
        examples=[["sales@example.com", "{{ properties.owner_email }}"]],
    )
    cc: list[str] = Field(default_factory=list, description="Copy recipients, like `to`.")
    reply_to: str | None = Field(None, description="Reply-To address; may hold {{ expressions }}.")
    subject: str = Field(
        description="Subject line; may hold {{ expressions }}.", examples=["New lead {{ properties.email }}"]
    )
    text: str = Field(description="Plain-text body; may hold {{ expressions }}.")
    html: str | None = Field(
        None,
        description="Optional HTML body, sent with `text` as its alternative; values from the record are "
        "HTML-escaped.",
    )


@connector("smtp", roles=("destination",), config=SmtpSinkConfig, system_config=SmtpSystem, extra="email")
class SmtpSink(BaseSink[SmtpSystem, SmtpSinkConfig]):
    """Send each record as an email."""

    def __init__(
        self, system: SmtpSystem, config: SmtpSinkConfig, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        super().__init__(system, config, policy, resources)
        self._smtp: Any = import_driver("aiosmtplib", package="aiosmtplib", extra="email", kind="smtp")
        self._to = [render_template(t) for t in config.to]
        self._cc = [render_template(t) for t in config.cc]
        self._reply_to = render_template(config.reply_to) if config.reply_to else None
        self._subject = render_template(config.subject)
        self._text = render_template(config.text)
        self._html = render_template(config.html) if config.html else None

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        problems: list[Violation] = []
        to = _addresses(self._to, record, "to", problems)
        cc = _addresses(self._cc, record, "cc", problems)
        reply_to = _addresses([self._reply_to], record, "reply_to", problems) if self._reply_to else []
        if not to and not problems:
            problems.append(Violation("to", "no recipient for this record"))
        if problems:
            raise RecordInvalid(problems, step="smtp")
        req: dict[str, Any] = {
            "to": to,
            "subject": _LINE_BREAKS.sub(" ", self._subject.render(record)).strip(),
            "text": self._text.render(record),
        }
        if cc:
            req["cc"] = cc
        if reply_to:
            req["reply_to"] = ", ".join(reply_to)
        if self._html is not None:
            req["html"] = self._html.render(record, quote=html.escape)
        return req

    # -- delivery half -----------------------------------------------------
    def message(self, request: Mapping[str, Any], key: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.system.from_address
        msg["To"] = ", ".join(request["to"])
        if request.get("cc"):
            msg["Cc"] = ", ".join(request["cc"])
        if request.get("reply_to"):
            msg["Reply-To"] = request["reply_to"]
        msg["Subject"] = request["subject"]
        msg["Date"] = email.utils.format_datetime(datetime.now(UTC))
        msg["Message-ID"] = message_id(key)
        msg.set_content(request["text"])
        if request.get("html"):
            msg.add_alternative(request["html"], subtype="html")
        return msg

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        smtp = self._smtp
        sw = Stopwatch()
        try:
            msg = self.message(request, key)
        except (KeyError, TypeError, ValueError) as exc:
            return Outcome(OutcomeClass.TERMINAL, error=f"building the message: {exc}")
        password = None
        if self.system.password is not None:
            try:
                password = self.resources.secret(self.system.password)
            except PatchbayError as exc:
                return Outcome(OutcomeClass.AUTH, error=f"sending mail: {exc}")
        s = self.system
        timeout_s = s.timeout_s or self.policy.timeout_s
        sock = None
        try:
            # The host is resolved and checked by the address guard, and aiosmtplib is handed a socket
            # already connected to a checked IP address (its `sock` argument), so the name is never
            # resolved again; `hostname` stays the configured name, which aiosmtplib uses for TLS
            # (implicit or STARTTLS) as the server name to verify.
            addresses = await self.resources.allowed_addresses(s.host, s.effective_port)
            tls = await self._tls()
            sock = await open_socket(addresses, s.effective_port, timeout_s)
            refused, reply = await smtp.send(
                msg,
                hostname=s.host.strip("[]"),
                sock=sock,
                port=None,
                username=s.username,
                password=password,
                use_tls=s.tls,
                start_tls=s.use_starttls,
                timeout=timeout_s,
                tls_context=tls,
            )
        except BlockedAddress as exc:  # refused before connecting, the same way on every try
            return Outcome(
                OutcomeClass.TERMINAL,
                None,
                sw.ms,
                error=f"sending mail: {exc.explain(self.resources.system or None)}",
            )
        except Exception as exc:
            if sock is not None:
                sock.close()  # aiosmtplib owns it once connected; closing it again is harmless
            return self._classify(exc, sw.ms)
        text = self.resources.redact(excerpt(str(reply)))
        if refused:  # accepted for some recipients: a retry would send them a second copy
            lost = ", ".join(f"{rcpt} ({r.code} {r.message})" for rcpt, r in refused.items())
            return Outcome(
                OutcomeClass.SUCCESS, None, sw.ms, text, error=self.resources.redact(f"refused: {lost}")
            )
        return Outcome(OutcomeClass.SUCCESS, None, sw.ms, text)

    async def _tls(self) -> ssl.SSLContext | None:
        """The system's TLS context (built once per system), or None when it speaks plain SMTP."""
        s = self.system
        if not (s.tls or s.use_starttls):
            return None
        return await tls_context(
            TlsSettings(verify=s.verify_tls, check_hostname=s.verify_tls, ca_bundle=s.ca_bundle)
        )

    def _classify(self, exc: Exception, ms: float) -> Outcome:
        smtp, redact = self._smtp, self.resources.redact
        if isinstance(exc, smtp.SMTPRecipientsRefused):
            codes = [r.code for r in exc.recipients]
            why = ", ".join(f"{r.recipient} ({r.code} {r.message})" for r in exc.recipients)
            cls = OutcomeClass.TRANSIENT if any(400 <= c < 500 for c in codes) else OutcomeClass.TERMINAL
            return Outcome(cls, None, ms, error=redact(f"sending mail: every recipient refused: {why}"))
        if isinstance(exc, smtp.SMTPResponseException):
            return Outcome(
                classify_reply(exc.code, isinstance(exc, smtp.SMTPAuthenticationError)),
                None,
                ms,
                error=redact(f"sending mail: SMTP {exc.code} {exc.message}"),
            )
        if _untrusted_certificate(exc):
            return Outcome(
                OutcomeClass.AUTH,
                None,
                ms,
                error=redact(
                    f"sending mail: TLS certificate of {self.system.host} not trusted ({exc}); "
                    "fix the server or set ca_bundle, then resume"
                ),
            )
        if isinstance(exc, smtp.SMTPTimeoutError | TimeoutError):
            detail = f" ({exc})" if str(exc) else ""
            return Outcome(OutcomeClass.TRANSIENT, None, ms, error=f"sending mail: timed out{detail}")
        if isinstance(exc, smtp.SMTPConnectError | smtp.SMTPServerDisconnected | OSError):
            return Outcome(
                OutcomeClass.TRANSIENT, None, ms, error=redact(f"sending mail: cannot connect: {exc}")
            )
        if isinstance(exc, smtp.SMTPException):  # STARTTLS or AUTH required but not offered
            return Outcome(
                OutcomeClass.AUTH,
                None,
                ms,
                error=redact(f"sending mail: {exc}; fix the settings, then resume"),
            )
        if isinstance(exc, ValueError):
            return Outcome(OutcomeClass.TERMINAL, None, ms, error=redact(f"sending mail: {exc}"))
        return Outcome(
            OutcomeClass.TRANSIENT, None, ms, error=redact(f"sending mail: {type(exc).__name__}: {exc}")
        )


def classify_reply(code: int, during_auth: bool = False) -> OutcomeClass:
    """What an SMTP error reply means: 4xx try again, 5xx give up, refused login pause."""
    if code in _AUTH_CODES or (during_auth and code >= 500):
        return OutcomeClass.AUTH
    if 400 <= code < 500:
        return OutcomeClass.TRANSIENT
    if 500 <= code < 600:
        return OutcomeClass.TERMINAL
    return OutcomeClass.TRANSIENT


def message_id(key: str) -> str:
    """`<key@patchbay>`: the same for every attempt of a delivery."""
    local = re.sub(r"\.{2,}", ".", _NOT_IN_MSG_ID.sub("-", key)).strip(".") or "patchbay"
    return f"<{local}@patchbay>"


def _addresses(templates: list[Template], record: Any, field: str, problems: list[Violation]) -> list[str]:
    out: list[str] = []
    for t in templates:
        value = t.render(record).strip()
        if value:
            try:
                out.extend(parse_addresses(value))
            except ValueError as exc:
                problems.append(Violation(field, str(exc)))
    return out


def _untrusted_certificate(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
