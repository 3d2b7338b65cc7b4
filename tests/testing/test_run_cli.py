"""`patchbay run FLOW`: a dry run sends nothing; a real run of a manual flow delivers through the engine."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from patchbay.cli.main import main
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, lead_project, write_project


def _manual_project(root: Path, url: str) -> Path:
    lead_project(root, url)
    flow = {
        "purpose": "ops re-send a lead by hand",
        "owner": "sales",
        "trigger": {"manual": True},
        "sensitive": ["phone"],
        "steps": [{"map": {"email": "lower(email)", "phone": "phone"}}],
        "destinations": [{"name": "crm", "system": "crm", "path": "/manual"}],
    }
    return write_project(root, {"flows/manual-lead.yaml": yaml.safe_dump(flow)})


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC,
        "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN,
    }


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "patchbay",
        *args,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_dry_run_shows_the_would_be_delivery_and_sends_nothing(tmp_path, sink):
    root = _manual_project(tmp_path, sink.url)
    data = json.dumps({"email": "Ann@Example.com", "phone": "+1 555 0100"})
    res = CliRunner().invoke(main, ["run", "manual-lead", "-p", str(root), "--dry-run", "--data", data])
    assert res.exit_code == 0, res.output
    assert "nothing is sent" in res.output
    assert f"crm (http): POST {sink.url}/manual" in res.output
    assert '"email": "ann@example.com"' in res.output
    assert "555 0100" not in res.output  # a sensitive field is never printed
    assert sink.received == []
    res = CliRunner().invoke(main, ["run", "manual-lead", "-p", str(root), "--dry-run", "-d", "{}", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["deliveries"][0]["request"]["path"] == "/manual"


async def test_dry_run_of_a_quarantined_event_says_why(tmp_path):
    root = lead_project(tmp_path, "http://127.0.0.1:9")
    res = CliRunner().invoke(
        main, ["run", "lead-capture", "-p", str(root), "--dry-run", "-d", '{"email": 3}']
    )
    assert res.exit_code == 0, res.output
    assert "result: quarantined:" in res.output


async def test_a_real_run_of_a_manual_flow_is_stored_and_delivered(tmp_path, sink):
    root = _manual_project(tmp_path, sink.url)
    code, out = await _cli("run", "manual-lead", "-p", str(root), "--data", '{"email": "Ann@Example.com"}')
    assert code == 0, out
    assert "status DELIVERED" in out
    [got] = sink.received
    assert got.path == "/manual" and got.body == {"email": "ann@example.com", "phone": None}
    assert got.headers["Authorization"] == f"Bearer {SECRET_TOKEN}"
    res = CliRunner().invoke(main, ["runs", "-p", str(root), "--flow", "manual-lead", "--json"])
    assert [r["status"] for r in json.loads(res.output)] == ["delivered"]


async def test_a_real_run_needs_a_manual_trigger(tmp_path, sink):
    root = _manual_project(tmp_path, sink.url)
    code, out = await _cli("run", "lead-capture", "-p", str(root), "--data", "{}")
    assert code == 2, out
    assert "has no manual trigger; add `manual: true`" in out
    assert sink.received == []


async def test_a_real_run_while_the_hub_serves_the_store_is_refused(tmp_path, sink):
    from patchbay.config.project import load_or_raise
    from patchbay.store.sqlite import SqliteStore

    root = _manual_project(tmp_path, sink.url)
    store = SqliteStore(load_or_raise(root).store_path)
    store.lock()  # what a running `patchbay serve` holds
    try:
        code, out = await _cli("run", "manual-lead", "-p", str(root), "--data", "{}")
    finally:
        await store.close()
    assert code == 3, out
    assert "stop `patchbay serve` and run again" in out
    assert sink.received == []
