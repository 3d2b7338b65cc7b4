"""smtp against a real SMTP server (aiosmtpd) on 127.0.0.1: messages, login, replies; one flow end to end."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.smtp import SmtpSink, SmtpSinkConfig, SmtpSystem, message_id
from patchbay.errors import ConfigError, RecordInvalid
from tests.conftest import SECRET_TOKEN, eventually, write_project
from tests.connectors import TcpProxy, count_tls_builds, declared_secrets, tls_server_context

PASSWORD = "correct horse battery"


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    msg: EmailMessage
    login: bytes | None


@dataclass
class Mailbox:
    """aiosmtpd handler: keeps what it accepts; scripted replies for RCPT and DATA."""

    password: str = PASSWORD
    mails: list[Mail] = field(default_factory=list)
    data_replies: list[str] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    port: int = 25

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), msg, session.login_data))
        return "250 2.0.0 queued"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == b"hub"
            and data.password == self.password.encode()
        )
        return AuthResult(success=ok, handled=False, auth_data=data)


@pytest.fixture
async def mailbox() -> AsyncIterator[Mailbox]:
    box = Mailbox()
    loop = asyncio.get_running_loop()
    # Login over a plain connection is allowed here only: the test server has no certificate.
    server = await loop.create_server(
        lambda: SMTP(
            box, hostname="localhost", authenticator=box.authenticate, auth_require_tls=False, loop=loop
        ),
        "127.0.0.1",
        0,
    )
    box.port = server.sockets[0].getsockname()[1]
    yield box
    server.close()
    await server.wait_closed()


@pytest.fixture
def resources() -> Resources:
    return Resources(  # a loopback server
        secret=lambda ref: {"smtp_password": PASSWORD, "wrong": "nope"}[ref.secret], allow_private=True
    )


def make(box: Mailbox, resources: Resources, system: dict[str, Any] | None = None, **dest: Any) -> SmtpSink:
    sys_cfg = {
        "host": "127.0.0.1",
        "port": box.port,
        "starttls": False,
        "from_address": "Patchbay <hub@example.com>",
        **(system or {}),
    }
    dest = {
        "to": ["sales@example.com"],
        "subject": "New lead {{ email }}",
        "text": "Hello {{ name }}",
        **dest,
    }
    return SmtpSink(SmtpSystem(**sys_cfg), SmtpSinkConfig(**dest), DeliveryPolicy(timeout_s=5), resources)


LEAD = {"email": "ada@example.com", "name": "Ada <b>Lovelace</b>", "owner": "Bob <bob@example.com>"}


async def test_implicit_tls_trusts_the_ca_bundle_and_builds_its_context_once(
    mailbox, resources, tmp_path, monkeypatch
):
    server_tls, cert = tls_server_context(tmp_path, "localhost")
    proxy = await TcpProxy("127.0.0.1", mailbox.port, tls=server_tls).start()  # TLS in front of it
    built = count_tls_builds(monkeypatch)
    try:
        tls = {"host": "localhost", "port": proxy.port, "tls": True}
        sinks = [make(mailbox, resources, {**tls, "ca_bundle": str(cert)}) for _ in range(2)]
        for sink in [*sinks, sinks[0]]:  # two sinks of one system, three connections
            outcome = await sink.send(sink.render(LEAD, "k1"), "k1")
            assert outcome.cls is OutcomeClass.SUCCESS, outcome
        assert len(mailbox.mails) == 3
        assert len(built) == 1  # one context for the system, however many connections
        untrusted = make(mailbox, resources, tls)  # the system's CAs do not know the test's CA
        outcome = await untrusted.send(untrusted.render(LEAD, "k2"), "k2")
        assert outcome.cls is not OutcomeClass.SUCCESS and "certificate" in outcome.error.lower(), outcome
    finally:
        await proxy.stop()


async def test_plain_text_message_with_message_id_from_the_key(mailbox, resources):
    sink = make(
        mailbox,
        resources,
        to=["sales@example.com", "{{ owner }}"],
        cc=["audit@example.com"],
        reply_to="{{ email }}",
    )
    request = sink.render(LEAD, "evt_01abc.mail")
    outcome = await sink.send(request, "evt_01abc.mail")

    assert outcome.cls is OutcomeClass.SUCCESS, outcome
    assert "queued" in outcome.excerpt
    [mail] = mailbox.mails
    assert mail.mail_from == "hub@example.com"
    assert sorted(mail.rcpt_tos) == ["audit@example.com", "bob@example.com", "sales@example.com"]
    msg = mail.msg
    assert msg["Message-ID"] == "<evt_01abc.mail@patchbay>"
    assert msg["From"] == "Patchbay <hub@example.com>"
    assert msg["To"] == "sales@example.com, Bob <bob@example.com>"
    assert msg["Cc"] == "audit@example.com" and msg["Reply-To"] == "ada@example.com"
    assert msg["Subject"] == "New lead ada@example.com"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == "Hello Ada <b>Lovelace</b>"
    assert mail.login is None  # no credentials configured, none sent


async def test_html_alternative_escapes_record_values(mailbox, resources):
    sink = make(mailbox, resources, html="<p>Hello <strong>{{ name }}</strong></p>")
    outcome = await sink.send(sink.render(LEAD, "k1"), "k1")

    assert outcome.cls is OutcomeClass.SUCCESS
    msg = mailbox.mails[0].msg
    assert msg.get_content_type() == "multipart/alternative"
    text, html = msg.iter_parts()
    assert text.get_content_type() == "text/plain" and html.get_content_type() == "text/html"
    assert html.get_content().strip() == "<p>Hello <strong>Ada &lt;b&gt;Lovelace&lt;/b&gt;</strong></p>"


async def test_login_with_the_password_secret(mailbox, resources):
    sink = make(mailbox, resources, {"username": "hub", "password": {"secret": "smtp_password"}})
    outcome = await sink.send(sink.render(LEAD, "k1"), "k1")
    assert outcome.cls is OutcomeClass.SUCCESS, outcome
    assert mailbox.mails[0].login == b"hub"
    assert declared_secrets(sink.system) == ["secret:smtp_password"]


async def test_a_refused_login_pauses_the_destination(mailbox, resources):
    sink = make(mailbox, resources, {"username": "hub", "password": {"secret": "wrong"}})
    outcome = await sink.send(sink.render(LEAD, "k1"), "k1")
    assert outcome.cls is OutcomeClass.AUTH and "SMTP 535" in outcome.error
    assert mailbox.mails == []


@pytest.mark.parametrize(
    ("where", "reply", "cls"),
    [
        ("data", "451 4.3.0 Try again later", OutcomeClass.TRANSIENT),
        ("data", "550 5.7.1 Message rejected as spam", OutcomeClass.TERMINAL),
        ("rcpt", "550 5.1.1 No such user", OutcomeClass.TERMINAL),
        ("rcpt", "452 4.2.2 Mailbox full", OutcomeClass.TRANSIENT),
    ],
)
async def test_reply_codes_decide_retry_or_dead_letter(mailbox, resources, where, reply, cls):
    if where == "data":
        mailbox.data_replies = [reply]
    else:
        mailbox.rcpt_replies = {"sales@example.com": reply}
    sink = make(mailbox, resources)
    outcome = await sink.send(sink.render(LEAD, "k1"), "k1")
    assert outcome.cls is cls, outcome
    assert f"SMTP {reply[:3]}" in outcome.error or f"({reply[:3]} " in outcome.error


async def test_some_recipients_refused_is_delivered_and_says_so(mailbox, resources):
    mailbox.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
    sink = make(mailbox, resources, to=["sales@example.com", "gone@example.com"])
    outcome = await sink.send(sink.render(LEAD, "k1"), "k1")
    # Retrying would send the accepted recipients a second copy.
    assert outcome.cls is OutcomeClass.SUCCESS
    assert "gone@example.com (550" in outcome.error
    assert mailbox.mails[0].rcpt_tos == ["sales@example.com"]


async def test_server_not_listening_is_transient(resources):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = make(Mailbox(port=port), resources)
    outcome = await sink.send(sink.render(LEAD, "k1"), "k1")
    assert outcome.cls is OutcomeClass.TRANSIENT and "cannot connect" in outcome.error


async def test_starttls_required_but_not_offered_pauses(mailbox, resources):
    sink = make(mailbox, resources, {"starttls": True})
    outcome = await sink.send(sink.render(LEAD, "k1"), "k1")
    assert outcome.cls is OutcomeClass.AUTH and "STARTTLS" in outcome.error.upper()
    assert mailbox.mails == []


def test_render_rejects_bad_addresses_and_flattens_the_subject(resources):
    sink = make(Mailbox(), resources, to=["{{ email }}"])
    with pytest.raises(RecordInvalid, match="not an email address"):
        sink.render({"email": "not-an-address"}, "k")
    with pytest.raises(RecordInvalid, match="line break"):
        sink.render({"email": "a@example.com\r\nBcc: victim@example.com"}, "k")
    with pytest.raises(RecordInvalid, match="no recipient"):
        sink.render({}, "k")
    req = sink.render({"email": "a@example.com, b@example.com"}, "k")
    assert req["to"] == ["a@example.com", "b@example.com"]
    assert (
        make(Mailbox(), resources, subject="Hi {{ name }}").render({**LEAD, "name": "x\r\nBcc: y"}, "k")[
            "subject"
        ]
        == "Hi x Bcc: y"
    )


def test_message_id_is_stable_and_valid():
    assert message_id("evt_01h.mail") == message_id("evt_01h.mail") == "<evt_01h.mail@patchbay>"
    assert message_id("a b<>..c") == "<a-b--.c@patchbay>"


@pytest.mark.parametrize(
    ("system", "message"),
    [
        ({"tls": True, "starttls": True}, "choose one of `tls`"),
        ({"username": "hub"}, "give both `username` and `password"),
        ({"from_address": "nobody"}, "not an email address"),
        ({"password": "inline"}, "never written inline"),
    ],
)
def test_system_mistakes_are_refused(system, message):
    with pytest.raises(ValueError, match=message):
        SmtpSystem(**{"host": "smtp.example.com", "from_address": "hub@example.com", **system})


def test_port_and_starttls_defaults():
    assert SmtpSystem(host="h", from_address="a@b.c").effective_port == 587
    assert SmtpSystem(host="h", from_address="a@b.c").use_starttls is True
    assert SmtpSystem(host="h", from_address="a@b.c", tls=True).effective_port == 465
    assert SmtpSystem(host="h", from_address="a@b.c", tls=True).use_starttls is False
    assert SmtpSystem(host="h", from_address="a@b.c", starttls=False).effective_port == 25


def test_missing_driver_is_a_config_error_with_the_install_hint(monkeypatch, resources):
    monkeypatch.setitem(sys.modules, "aiosmtplib", None)
    with pytest.raises(ConfigError, match=r"pip install 'patchbay\[email\]'"):
        make(Mailbox(), resources)


# ----------------------------------------------------------------------------- end to end
def mail_project(root: Path, port: int) -> Path:
    systems = {
        "website": {
            "owner": "web",
            "webhook": {"scheme": "standard_webhooks", "secrets": [{"secret": "website_whsec"}]},
        },
        "mail": {
            "kind": "smtp",
            "owner": "ops",
            "host": "127.0.0.1",
            "port": port,
            "starttls": False,
            "username": "hub",
            "password": {"secret": "crm_token"},
            "from_address": "Leads <leads@example.com>",
            "allow_private_network": True,
        },
    }
    flow = {
        "purpose": "sales gets an email per lead",
        "owner": "sales",
        "trigger": {"webhook": {"system": "website"}},
        "steps": [{"map": {"email": "lower(trim(email))", "name": "first_name"}}],
        "destinations": [
            {
                "name": "notify",
                "system": "mail",
                "to": ["sales@example.com"],
                "reply_to": "{{ email }}",
                "subject": "New lead: {{ name }}",
                "text": "{{ name }} <{{ email }}> signed up.",
                "html": "<p><b>{{ name }}</b> signed up.</p>",
                "delivery": {"retry": {"schedule": ["100ms"], "jitter": 0}},
            }
        ],
    }
    return write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": 0}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            "flows/lead-mail.yaml": yaml.safe_dump(flow, sort_keys=False),
        },
    )


async def test_webhook_to_email_end_to_end(tmp_path, mailbox, start_hub):
    mailbox.password = SECRET_TOKEN  # the hub logs in with the secret `crm_token`
    mailbox.data_replies = ["421 4.3.2 Service shutting down"]  # the first try fails; the retry delivers
    hub = await start_hub(mail_project(tmp_path, mailbox.port))
    status, body = await hub.post("/hooks/lead-mail", {"email": " Ada@Example.com ", "first_name": "Ada"})
    assert status in (200, 202), body

    async def delivered() -> bool:
        return bool((await hub.run(body["event_id"]))["status"] == "delivered")

    await eventually(delivered, what="email delivered")
    [mail] = mailbox.mails
    assert mail.login == b"hub"
    assert mail.msg["Message-ID"] == f"<{body['event_id']}.notify@patchbay>"
    assert mail.msg["Subject"] == "New lead: Ada" and mail.msg["Reply-To"] == "ada@example.com"
    text, html = mail.msg.iter_parts()
    assert text.get_content().strip() == "Ada <ada@example.com> signed up."
    assert html.get_content().strip() == "<p><b>Ada</b> signed up.</p>"
    run = await hub.run(body["event_id"])
    attempts = run["deliveries"][0]["attempts_log"]
    assert [a["outcome"] for a in attempts] == ["transient", "success"]
    assert "SMTP 421" in attempts[0]["error"]
    assert SECRET_TOKEN not in str(run)  # the password is never stored


def test_check_accepts_a_smtp_project_and_locates_unknown_settings(tmp_path):
    from click.testing import CliRunner

    from patchbay.cli import main

    root = mail_project(tmp_path, 2525)
    env = {"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8, "PATCHBAY_SECRET_CRM_TOKEN": "y" * 8}
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    assert res.exit_code == 0, res.output

    flow = root / "flows/lead-mail.yaml"
    flow.write_text(flow.read_text().replace("reply_to:", "replyto:"))
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    line = next(i for i, t in enumerate(flow.read_text().splitlines(), 1) if "replyto" in t)
    assert f"{flow}:{line}: unknown setting 'replyto'; did you mean 'reply_to'?" in res.output
