"""Encoded secrets are scrubbed too: a destination on 127.0.0.1 echoes what it got, in every encoding.

The CRM takes HTTP Basic auth. It answers with the request's `Authorization` header (that is
base64(user:password)) and the password base64-, URL- and JSON-encoded. None of those forms may
reach the stored excerpts, `runs show`, the API, the store file or the logs.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
import yaml
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.security.secrets import Redactor
from patchbay.security.tokens import create_token
from patchbay.store.base import Actor
from tests.conftest import SECRET_WHSEC, RunningHub, Sink, eventually, lead_project, vault_hub

USER = "ada.lovelace"
PASSWORD = 'pä$$/w"rd+9 Engine'  # non-ASCII, a quote and a slash: every encoding differs from the text
FAST = {"timeout_s": 2, "retry": {"schedule": ["100ms"], "jitter": 0}}


def encoded_forms(user: str, password: str) -> dict[str, str]:
    pair = f"{user}:{password}".encode()
    raw = password.encode()
    return {
        "password": password,
        "Basic header (base64 of user:password)": base64.b64encode(pair).decode(),
        "Basic pair, URL-safe base64": base64.urlsafe_b64encode(pair).decode(),
        "Basic pair, base64 without padding": base64.b64encode(pair).decode().rstrip("="),
        "password, base64": base64.b64encode(raw).decode(),
        "password, URL-safe base64 without padding": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "password, percent-encoded": quote(password, safe=""),
        "password, form-encoded": quote_plus(password),
        "password, JSON-escaped": json.dumps(password)[1:-1],
        "password, JSON-escaped (not ASCII)": json.dumps(password, ensure_ascii=False)[1:-1],
    }


def _echo(status: int) -> Any:
    """A remote that repeats the Authorization header it got, and the password in every encoding."""

    def answer(request: Any, rec: Any) -> tuple[int, dict[str, str], str]:
        forms = encoded_forms(USER, PASSWORD)
        forms["Basic header (base64 of user:password)"] = rec.headers.get("Authorization", "")
        return status, {}, json.dumps({"error": "echo", "got": forms})

    return answer


@pytest.fixture
async def basic_hub(tmp_path: Any, sink: Sink) -> AsyncIterator[tuple[RunningHub, io.StringIO]]:
    root = lead_project(tmp_path / "proj", sink.url, delivery=FAST)
    systems = yaml.safe_load((root / "systems.yaml").read_text())
    systems["crm"]["auth"] = {"scheme": "basic", "username": USER, "password": {"secret": "crm_password"}}
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    async with vault_hub(root, {"website_whsec": SECRET_WHSEC, "crm_password": PASSWORD}) as got:
        yield got


async def test_an_echoed_basic_header_and_encoded_password_are_scrubbed_everywhere(basic_hub, sink):
    hub, log_buf = basic_hub
    sink.script = [_echo(500), _echo(400)]  # a retry (logged with the excerpt's summary), then dead
    status, body = await hub.post("/hooks/lead-capture", {"email": "Ada@Example.com"})
    assert status == 202
    run_id = body["event_id"]

    async def dead() -> bool:
        return (await hub.run(run_id))["status"] == "dead"

    await eventually(dead, what="dead letter")
    assert (
        sink.received[0].headers["Authorization"]
        == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    )

    cli = CliRunner()
    shown = {
        args: cli.invoke(main, [*args.split(), "-p", str(hub.root)]).output
        for args in (f"runs show {run_id}", f"runs show {run_id} --json", "dead", "dead --json")
    }
    token, _ = await create_token(hub.store, "scan", ["admin"], None, Actor("test"))
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s,
        s.get(f"{hub.url}/api/v1/runs/{run_id}") as r,
    ):
        api = await r.text()
        assert r.status == 200
    await hub.runner.cleanup()
    await hub.hub.stop()  # checkpointed: the store file alone holds everything

    # Not vacuous: the excerpts were stored, and they show the remote's echo with the secrets masked.
    excerpts = [
        a["excerpt"]
        for d in json.loads(shown[f"runs show {run_id} --json"])["deliveries"]
        for a in d["attempts_log"]
    ]
    assert len(excerpts) == 2 and all('"Basic [secret]"' in e for e in excerpts), excerpts
    assert "Basic [secret]" in shown[f"runs show {run_id}"]
    store = hub.root / ".patchbay" / "patchbay.db"
    places: dict[str, bytes] = {
        "store file": b"".join(p.read_bytes() for p in store.parent.glob("patchbay.db*") if p.is_file()),
        "API runs/ID": api.encode(),
        "JSON log": log_buf.getvalue().encode(),
        **{f"`patchbay {k}`": v.encode() for k, v in shown.items()},
    }
    assert log_buf.getvalue().count("\n") >= 2
    needles = encoded_forms(USER, PASSWORD)
    leaks = [
        f"{name} in {where}"
        for where, data in places.items()
        for name, v in needles.items()
        if v.encode() in data
    ]
    assert leaks == [], "\n".join(leaks)


@pytest.mark.parametrize("user", ["", "a", "ab", "abc", "a-much-longer-user-name"])
@pytest.mark.parametrize("password", ["pw12", "hunter22", "sk_live_0123456789abcdef", "päss wörd/+="])
def test_basic_pairs_are_scrubbed_at_every_alignment(user, password):
    """base64(user:password) changes with the length of the user name (3-byte groups): each is caught."""
    r = Redactor()
    r.add(password)
    pair = f"{user}:{password}".encode()
    for encoded in (
        base64.b64encode(pair).decode(),
        base64.urlsafe_b64encode(pair).decode(),
        base64.b64encode(pair).decode().rstrip("="),
    ):
        for text, expected in (
            (f"Authorization: Basic {encoded}", "Authorization: Basic [secret]"),
            (json.dumps({"authorization": f"Basic {encoded}"}), '{"authorization": "Basic [secret]"}'),
            (f"?auth={encoded}&x=1", "?auth=[secret]&x=1"),
        ):
            assert r(text) == expected, (user, password, text)


def test_encoded_forms_of_a_secret_are_scrubbed_and_other_text_is_kept():
    r = Redactor()
    r.add(PASSWORD)
    for name, form in encoded_forms(USER, PASSWORD).items():
        assert r(f"before {form} after") == "before [secret] after", name
    lower_hex = re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(PASSWORD, safe=""))
    assert r(f"https://api.example.com/v1?key={lower_hex}") == "https://api.example.com/v1?key=[secret]"
    kept = "status 500: upstream timed out after 30 s; request id 6f1d2c; see https://status.example.com"
    assert r(kept) == kept


def test_short_values_are_not_added():
    r = Redactor()
    r.add("abc")
    assert r("abc YWJj") == "abc YWJj"
