"""`encrypt_sensitive`: a flow's sensitive values never reach the store file in clear, yet delivery and
replay send them, also after the master key is rotated and the old key deleted."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from click.testing import CliRunner

from patchbay.cli import main
from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.errors import PatchbayError
from patchbay.security.fields import FieldCipher, FieldError, open_field_cipher
from patchbay.security.project import open_project_secrets
from patchbay.security.tokens import create_token
from patchbay.security.vault import OLD_KEY_FILE, MasterKey, Vault
from patchbay.server.app import make_app
from patchbay.store.base import Actor
from tests.conftest import (
    SECRET_TOKEN,
    SECRET_WHSEC,
    RunningHub,
    Sink,
    _start,
    eventually,
    lead_project,
    resolver,
)

CARD = "4111111111111111"
CODE = 918273  # a number: it must come back as a number
FAST = {"timeout_s": 2, "retry": {"schedule": ["100ms"], "jitter": 0}}
STEPS = """
  - map:
      properties.email: "lower(email)"
      card: card
      note: "join(' ', ['card', card.number])"
"""


def _project(root: Path, sink_url: str, *, hub_default: bool) -> Path:
    """The lead flow with `sensitive: [card]`, encrypting by the hub's default or by its own setting."""
    root = lead_project(
        root,
        sink_url,
        delivery=FAST,
        steps=STEPS,
        hub={"encrypt_sensitive": True} if hub_default else None,
        dest={"path": "/contacts/{{ card.number }}"},  # the value in the URL too
    )
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["sensitive"] = ["card"]
    if not hub_default:
        flow["encrypt_sensitive"] = True
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    vault, _ = open_project_secrets(root, create_key=True)
    assert vault is not None
    vault.set("website_whsec", SECRET_WHSEC)
    vault.set("crm_token", SECRET_TOKEN)
    return root


@pytest.fixture
async def hubs() -> AsyncIterator[Callable[[Path], Awaitable[RunningHub]]]:
    running: list[RunningHub] = []

    async def start(root: Path) -> RunningHub:
        _, resolver = open_project_secrets(root)
        hub = Hub(load_or_raise(root), resolver=resolver)
        await hub.start()
        runner, url = await _start(make_app(hub))
        running.append(RunningHub(hub, url, root, runner))
        return running[-1]

    yield start
    for rh in running:
        await rh.runner.cleanup()
        await rh.hub.stop()


def _echo(status: int) -> Any:
    def answer(request: Any, rec: Any) -> tuple[int, dict[str, str], str]:
        return status, {}, f"got {request.path} {json.dumps(rec.body)}"

    return answer


def _store_bytes(root: Path) -> bytes:
    # every file of the store (not `patchbay.db.wake/`, the processes' wake sockets)
    return b"".join(p.read_bytes() for p in sorted((root / ".patchbay").glob("patchbay.db*")) if p.is_file())


async def _stop(rh: RunningHub) -> None:
    await rh.runner.cleanup()
    await rh.hub.stop()


@pytest.mark.parametrize("hub_default", [False, True], ids=["flow-setting", "hub-setting"])
async def test_sensitive_values_are_encrypted_at_rest_and_still_delivered_and_replayed(
    tmp_path, sink: Sink, hubs, hub_default
):
    root = _project(tmp_path / "proj", sink.url, hub_default=hub_default)
    hub = await hubs(root)
    sink.script = [_echo(400)]  # dead at once, the remote echoing the request: URL and body
    status, body = await hub.post(
        "/hooks/lead-capture", {"email": "Ada@Example.com", "card": {"number": CARD, "code": CODE}}
    )
    assert status == 202
    run_id = body["event_id"]

    async def dead() -> bool:
        return (await hub.run(run_id))["status"] == "dead"

    await eventually(dead, what="dead letter")
    first = sink.received[0]
    assert first.path == f"/contacts/{CARD}"
    assert first.body["card"] == {"number": CARD, "code": CODE} and first.body["note"] == f"card {CARD}"

    # Shown redacted: the API (what the console shows) and `runs show`.
    token, _ = await create_token(hub.store, "scan", ["admin"], None, Actor("test"))
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s,
        s.get(f"{hub.url}/api/v1/runs/{run_id}") as r,
    ):
        api = await r.json()
    assert api["payload"]["card"] == "[redacted]"
    [delivery] = api["deliveries"]
    assert "[[pb-sealed" not in json.dumps(api) and CARD not in json.dumps(api)
    assert delivery["request"]["url"].endswith("/contacts/[redacted]")
    shown = CliRunner().invoke(main, ["runs", "show", run_id, "-p", str(root)]).output
    assert "[redacted]" in shown and CARD not in shown and "pb-sealed" not in shown
    await _stop(hub)

    # The store file holds neither value, in any form, and does hold the sealed tokens.
    data = _store_bytes(root)
    assert CARD.encode() not in data and str(CODE).encode() not in data
    conn = sqlite3.connect(root / ".patchbay" / "patchbay.db")
    payload, request = conn.execute(
        "SELECT e.payload, d.request FROM events e JOIN deliveries d ON d.event_id = e.id"
    ).fetchone()
    conn.close()
    assert orjson.loads(payload)["email"] == "Ada@Example.com"  # the rest stays readable
    assert orjson.loads(payload)["card"]["number"].startswith("[[pb-sealed:")
    assert "[[pb-sealed:" in orjson.loads(request)["url"]

    # Rotate the master key and delete the old one: old rows stay readable (the field key is a vault secret).
    cli = CliRunner()
    res = cli.invoke(main, ["secrets", "rotate-master-key", "-p", str(root)])
    assert res.exit_code == 0, res.output
    (root / ".patchbay" / OLD_KEY_FILE).unlink()
    res = cli.invoke(main, ["replay", run_id, "-p", str(root)])
    assert "requeued" in res.output, res.output

    sink.default = 201
    hub = await hubs(root)
    await sink.wait_for(1)
    replayed = sink.received[-1]
    assert replayed.path == f"/contacts/{CARD}"
    assert replayed.body["card"] == {"number": CARD, "code": CODE}

    async def delivered() -> bool:
        return (await hub.run(run_id))["status"] == "delivered"

    await eventually(delivered, what="replayed run delivered")
    await _stop(hub)
    data = _store_bytes(root)
    assert CARD.encode() not in data and str(CODE).encode() not in data


async def test_without_the_setting_nothing_changes(tmp_path, sink: Sink, hubs):
    root = lead_project(tmp_path / "proj", sink.url, steps=STEPS)
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["sensitive"] = ["card"]
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    vault, _ = open_project_secrets(root, create_key=True)
    assert vault is not None
    vault.set("website_whsec", SECRET_WHSEC)
    vault.set("crm_token", SECRET_TOKEN)
    hub = await hubs(root)
    raw = orjson.dumps({"email": "ada@example.com", "card": {"number": CARD}})
    status, _ = await hub.post("/hooks/lead-capture", raw)
    assert status == 202
    await sink.wait_for(1)
    stored = await hub.store.read(lambda c: c.execute("SELECT payload FROM events").fetchone()[0])
    assert stored == raw  # kept as received
    assert [v.name for v in vault.list()] == ["crm_token", "website_whsec"]  # no field key made


async def test_a_flow_that_encrypts_needs_a_master_key(tmp_path):
    root = lead_project(tmp_path / "proj", "http://127.0.0.1:9", hub={"encrypt_sensitive": True})
    hub = Hub(load_or_raise(root), resolver=resolver())
    await hub.start()  # the hub's default alone asks nothing of a flow with no sensitive paths
    await hub.stop()
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["sensitive"] = ["email"]
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    hub = Hub(load_or_raise(root), resolver=resolver())
    with pytest.raises(
        PatchbayError, match="flow lead-capture sets encrypt_sensitive.*patchbay secrets init"
    ):
        await hub.start()
    assert hub.store is None  # refused before the store or any session was opened
    assert open_field_cipher(None, needed_by=[]) is None


def test_sealing_is_exact_and_tampering_is_refused(tmp_path):
    vault = Vault.at(tmp_path / "v.db", [MasterKey.generate()])
    vault.ensure_schema()
    assert FieldCipher.from_vault(vault, create=False) is None
    cipher = FieldCipher.from_vault(vault, create=True)
    assert cipher is not None and FieldCipher.from_vault(vault, create=False).id == cipher.id  # type: ignore[union-attr]
    secret = 'a "quoted" pässword/1'
    request = {
        "url": "https://api.example.com/x/" + "a%20%22quoted%22%20p%C3%A4ssword%2F1",
        "body": json.dumps({"p": secret, "n": 12345, "t": f"say {secret}!"}),
        "params": [secret, 12345, 12.5, True, None],
    }
    sealed = cipher.seal(request, {secret, "12345"})
    text = json.dumps(sealed)
    assert "quoted" not in text and "12345" not in text and "a%20" not in text
    assert sealed["params"][2:] == [12.5, True, None]
    opened, revealed = cipher.open(sealed)
    assert opened == request  # byte for byte, numbers as numbers
    assert secret in revealed and "12345" in revealed
    token = sealed["params"][0]
    i = len(token) // 2 + 10  # inside the ciphertext
    tampered = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    with pytest.raises(FieldError, match="altered"):
        cipher.open({"x": tampered})
    other = FieldCipher(b"k" * 32)
    with pytest.raises(FieldError, match=f"sealed with field key {cipher.id}"):
        other.open(sealed)


async def test_replay_without_the_field_key_says_why_and_changes_nothing(tmp_path, sink: Sink, hubs):
    root = _project(tmp_path / "proj", sink.url, hub_default=False)
    hub = await hubs(root)
    sink.default = 400
    status, body = await hub.post("/hooks/lead-capture", {"email": "a@example.com", "card": {"number": CARD}})
    assert status == 202

    async def dead() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "dead"

    await eventually(dead, what="dead letter")
    await _stop(hub)
    refused = CliRunner().invoke(main, ["secrets", "delete", "patchbay.fields-key", "-p", str(root)])
    assert refused.exit_code == 1 and "every encrypted value in the store is lost" in refused.output
    forced = CliRunner().invoke(
        main, ["secrets", "delete", "patchbay.fields-key", "--force", "-p", str(root)]
    )
    assert forced.exit_code == 0, forced.output
    res = CliRunner().invoke(main, ["replay", body["event_id"], "-p", str(root)])
    assert res.exit_code == 1
    assert (
        f"skipped {body['event_id']}: opening an encrypted sensitive field: it was sealed with field key"
        in (res.output)
    )
    conn = sqlite3.connect(root / ".patchbay" / "patchbay.db")
    assert conn.execute("SELECT status FROM deliveries").fetchall() == [("dead",)]
    conn.close()


async def test_a_quarantined_event_and_a_sensitive_record_key_are_not_stored_in_clear(
    tmp_path, sink: Sink, hubs
):
    bad = "4000-0000-0000-0002"
    root = _project(tmp_path / "proj", sink.url, hub_default=False)
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["record_key"] = "card.number"
    flow["steps"].append({"validate": {"card.number": {"pattern": "^[0-9]{16}$"}}})
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    hub = await hubs(root)
    status, body = await hub.post("/hooks/lead-capture", {"email": "e@example.com", "card": {"number": bad}})
    assert (status, body["status"]) == (202, "quarantined")
    status, body = await hub.post("/hooks/lead-capture", {"email": "a@example.com", "card": {"number": CARD}})
    assert status == 202
    await sink.wait_for(1)
    assert sink.received[0].body["card"]["number"] == CARD
    await _stop(hub)
    data = _store_bytes(root)
    assert bad.encode() not in data and CARD.encode() not in data
    conn = sqlite3.connect(root / ".patchbay" / "patchbay.db")
    assert conn.execute("SELECT record_key FROM events").fetchall() == [(None,), (None,)]
    conn.close()


async def test_a_call_of_an_encrypting_flow_sends_sealed_values_and_keeps_none(tmp_path, sink: Sink, hubs):
    root = _project(tmp_path / "proj", sink.url, hub_default=False)
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["steps"].append(
        {
            "name": "owner",
            "call": {"system": "crm", "method": "GET", "path": "/cards/{{ card.number }}", "as": "owner"},
        }
    )
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))

    def answer(request: Any, rec: Any) -> Any:
        if request.method == "GET":  # the remote echoes the card it was asked about
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps({"owner": "grace", "card": request.path[7:]}),
            )
        return 201

    sink.default = answer
    hub = await hubs(root)
    _, body = await hub.post(
        "/hooks/lead-capture", {"email": "a@example.com", "card": {"number": CARD, "code": CODE}}
    )

    async def delivered() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "delivered"

    await eventually(delivered, what="delivered after the call")
    call, contact = sink.received
    assert call.path == f"/cards/{CARD}" and contact.path == f"/contacts/{CARD}"  # opened to be sent
    assert contact.body["owner"]["body"]["owner"] == "grace"
    assert CARD not in json.dumps(contact.body["owner"])  # the echo was scrubbed before it was kept
    await _stop(hub)
    assert CARD.encode() not in _store_bytes(root)  # the call's request, its answer, the rest of the run
