"""Secrets never leak: drive a hub through every path that writes or prints, then scan everything written.

Credentials (the CRM bearer token, the website's signing secret, the master key) must appear
nowhere: not in the store file (the vault keeps them encrypted), not in CLI output, API answers,
logs or metrics, even when the remote echoes them back. The flow's sensitive field (card.number)
is kept in the raw payload and the rendered request (they are needed for replay and delivery),
but never shown: not in traces, dead letters, `runs`, `runs show`, API answers or logs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from click.testing import CliRunner

from patchbay import logs
from patchbay.cli import main
from patchbay.security.tokens import create_token
from patchbay.security.vault import KEY_FILE
from patchbay.store.base import Actor
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, eventually, lead_project, vault_hub

CARD = "4111111111111111"
BAD_CARD = "4000-0000-0000-0002"  # fails the flow's pattern: its value would be in the reason
FAST = {"timeout_s": 2, "retry": {"schedule": ["100ms"], "jitter": 0}}
STEPS = """
  - map:
      properties.email: "lower(email)"
      card.number: card.number
  - validate:
      properties.email: {required: true, format: email}
      card.number: {pattern: "^[0-9]{16}$"}
"""


def _echo(status: int) -> Any:
    """A remote that repeats back what it got: the credential, a secret it should not know, the card."""

    def answer(request: Any, rec: Any) -> tuple[int, dict[str, str], str]:
        return (
            status,
            {},
            (
                f"rejected: Authorization: {rec.headers.get('Authorization')}; signing={SECRET_WHSEC}; "
                f"token={SECRET_TOKEN}; you sent {json.dumps(rec.body)}"
            ),
        )

    return answer


@pytest.fixture
async def leaky(tmp_path, sink):
    """A hub whose secrets live in the project's vault, with a JSON log handler writing to a buffer."""
    root = lead_project(tmp_path / "proj", sink.url, delivery=FAST, steps=STEPS)
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["sensitive"] = ["card.number"]
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    async with vault_hub(root, {"website_whsec": SECRET_WHSEC, "crm_token": SECRET_TOKEN}) as got:
        yield got


def _files(root: Path) -> dict[str, bytes]:
    store = root / ".patchbay" / "patchbay.db"
    return {p.name: p.read_bytes() for p in (store, Path(f"{store}-wal"), Path(f"{store}-shm")) if p.exists()}


def _leaks(where: str, data: str | bytes, needles: dict[str, str]) -> list[str]:
    blob = data if isinstance(data, bytes) else data.encode()
    return [f"{name} in {where}" for name, value in needles.items() if value.encode() in blob]


async def test_nothing_secret_is_written_or_shown(leaky, sink, caplog):
    hub, log_buf = leaky
    caplog.set_level(logging.DEBUG)
    root = hub.root
    master_key = (root / ".patchbay" / KEY_FILE).read_text().strip()
    secrets = {
        "bearer token": SECRET_TOKEN,
        "bearer token (base64)": base64.b64encode(SECRET_TOKEN.encode()).decode().rstrip("="),
        "signing secret": SECRET_WHSEC,
        "signing key": SECRET_WHSEC.removeprefix("whsec_"),
        "master key": master_key,
    }
    cards = {"card number": CARD, "bad card number": BAD_CARD}

    # 1. A lead whose delivery fails twice with the remote echoing everything: 500 (retried), then 400 (dead).
    sink.script = [_echo(500), _echo(400)]
    sink.default = _echo(201)
    status, body = await hub.post(
        "/hooks/lead-capture", {"email": "Ada@Example.com", "card": {"number": CARD}}
    )
    assert status == 202
    run_id = body["event_id"]

    async def dead() -> bool:
        return (await hub.run(run_id))["status"] == "dead"

    await eventually(dead, what="dead letter")
    # 2. A lead quarantined by a rule on the sensitive field itself.
    status, bad = await hub.post(
        "/hooks/lead-capture", {"email": "eve@example.com", "card": {"number": BAD_CARD}}
    )
    assert (status, bad["status"]) == (202, "quarantined")
    # 3. An inbound request with a wrong bearer-looking header and a forged signature: rejected, logged.
    status, _ = await hub.post(
        "/hooks/lead-capture",
        {"email": "x@example.com"},
        sign=False,
        headers={"Authorization": f"Bearer {SECRET_TOKEN}", "webhook-signature": "v1,AAAA"},
    )
    assert status == 401

    cli = CliRunner()
    outputs: dict[str, str] = {}

    def run_cli(*args: str) -> str:
        res = cli.invoke(main, list(args))
        outputs[" ".join(a for a in args if not a.startswith("/"))] = res.output
        return res.output

    p = ["-p", str(root)]
    run_cli("dead", *p)
    run_cli("dead", "--json", *p)
    # 4. Replay: the remote now answers 201 (still echoing); the run is delivered.
    assert "requeued" in run_cli("replay", run_id, *p)
    await sink.wait_for(1)

    async def delivered() -> bool:
        return (await hub.run(run_id))["status"] == "delivered"

    await eventually(delivered, what="replayed run delivered")
    for rid in (run_id, bad["event_id"]):
        run_cli("runs", "show", rid, *p)
        run_cli("runs", "show", rid, "--json", *p)
    run_cli("runs", *p)
    run_cli("runs", "--json", *p)
    run_cli("check", str(root))

    # The API, as a console or script sees it.
    token, _ = await create_token(hub.store, "scan", ["admin"], None, Actor("test"))
    api: dict[str, str] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        for path in (
            f"runs/{run_id}",
            f"runs/{bad['event_id']}",
            "runs",
            "dead-letters",
            "systems",
            "flows",
            "flows/lead-capture",
            "secrets",
            "audit",
        ):
            async with s.get(f"{hub.url}/api/v1/{path}") as r:
                api[path] = await r.text()
                assert r.status == 200, (path, api[path])
        async with s.get(f"{hub.url}/metrics") as r:
            api["metrics"] = await r.text()

    # The stored run kept what the remote echoed (redacted): the scan below is not vacuous.
    run = await hub.run(run_id)
    excerpts = [a["excerpt"] for d in run["deliveries"] for a in d["attempts_log"]]
    assert len(excerpts) == 3 and all("[secret]" in e for e in excerpts)
    shown = outputs[f"runs show {run_id} -p"]
    assert "[redacted]" in shown and "rejected: Authorization: Bearer [secret]" in shown
    assert any(
        "card.number" in line and "[redacted]" in line
        for line in outputs[f"runs show {bad['event_id']} -p"].splitlines()
    )
    assert log_buf.getvalue().count("\n") >= 3

    found: list[str] = []
    for name, data in _files(root).items():
        found += _leaks(f"store file {name}", data, secrets)
    for cmd, out in outputs.items():
        found += _leaks(f"`patchbay {cmd}`", out, {**secrets, **cards})
    for path, text in api.items():
        found += _leaks(f"API {path}", text, {**secrets, **cards})
    found += _leaks("JSON log", log_buf.getvalue(), {**secrets, **cards})
    found += _leaks("log records", "\n".join(r.getMessage() for r in caplog.records), {**secrets, **cards})
    assert found == [], "\n".join(found)

    await hub.runner.cleanup()
    await hub.hub.stop()  # after the final checkpoint, the store file alone
    found = [
        leak for name, data in _files(root).items() for leak in _leaks(f"store file {name}", data, secrets)
    ]
    assert found == [], "\n".join(found)


def test_log_tracebacks_and_extra_fields_are_redacted():
    """A connector bug's traceback quoting a credential, and `extra` fields, go through the redactor too."""
    from patchbay.security.secrets import Redactor

    redactor = Redactor()
    redactor.add(SECRET_TOKEN)
    root_logger = logging.getLogger()
    level = root_logger.level
    for fmt in ("json", "text"):
        buf = io.StringIO()
        logs.setup(fmt, redactor, logging.DEBUG)
        handler = next(h for h in root_logger.handlers if getattr(h, "_patchbay", False))
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buf)
        try:
            try:
                raise RuntimeError(f"POST https://hooks.example.com/services/{SECRET_TOKEN} failed")
            except RuntimeError:
                logging.getLogger("patchbay.delivery").exception(
                    "delivering %s", "evt_1", extra={"detail": f"url ends in {SECRET_TOKEN}"}
                )
        finally:
            root_logger.removeHandler(handler)
            root_logger.setLevel(level)
        out = buf.getvalue()
        assert "RuntimeError: POST https://hooks.example.com/services/[secret] failed" in out
        assert SECRET_TOKEN not in out
        if fmt == "json":
            assert json.loads(out)["detail"] == "url ends in [secret]"
