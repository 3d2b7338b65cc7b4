"""`patchbay runs export RUN --as-test`: a real run from the store becomes a passing flow test, redacted."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from patchbay.cli.main import main
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, lead_project, write_project


def _project(root, url):
    lead_project(root, url)
    flow = root / "flows" / "lead-capture.yaml"
    doc = yaml.safe_load(flow.read_text())
    doc["sensitive"] = ["email", "card"]
    flow.write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


async def test_a_recorded_event_becomes_a_passing_test_without_its_secrets(
    tmp_path, sink, start_hub, monkeypatch
):
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", SECRET_TOKEN)
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)
    root = _project(tmp_path, sink.url)
    hub = await start_hub(root)
    lead = {
        "email": "  Real.Person@Corp.example ",
        "first_name": "Real",
        "card": {"number": "4111 1111 1111 1111"},
        "note": f"pasted by mistake: {SECRET_TOKEN}",
    }
    status, answer = await hub.post("/hooks/lead-capture", lead)
    assert status == 202, answer
    await sink.wait_for(1)
    run_id = answer["event_id"]

    res = CliRunner().invoke(main, ["runs", "export", run_id, "--as-test", "-p", str(root)])
    assert res.exit_code == 0, res.output
    path = root / "flows" / "lead-capture.test.yaml"
    text = path.read_text()
    for secret in ("Real.Person", "real.person", "4111", SECRET_TOKEN):
        assert secret not in text
    [case] = yaml.safe_load(text)["tests"]
    assert case["event"]["email"].strip().endswith("@example.com")
    assert case["event"]["card"] == {"number": "9999 9999 9999 9999"}
    assert case["event"]["note"] == "pasted by mistake: [secret]"
    crm = case["expect"]["deliveries"]["crm"]
    assert crm["path"] == "/contacts" and crm["body"]["properties"]["email"].endswith("@example.com")

    res = CliRunner().invoke(main, ["test", str(root)])
    assert res.exit_code == 0, res.output
    assert "1 passed, 0 failed" in res.output

    # A second export is added to the same file, its comments kept; the same name is refused.
    path.write_text("# hand-written comment\n" + text)
    res = CliRunner().invoke(
        main, ["runs", "export", run_id, "--as-test", "-p", str(root), "--name", "again"]
    )
    assert res.exit_code == 0, res.output
    assert path.read_text().startswith("# hand-written comment\n")
    assert [t["name"] for t in yaml.safe_load(path.read_text())["tests"]][1] == "again"
    res = CliRunner().invoke(
        main, ["runs", "export", run_id, "--as-test", "-p", str(root), "--name", "again"]
    )
    assert res.exit_code == 2 and "already has a test named 'again'" in res.output


async def test_a_run_the_flow_now_treats_differently_is_exported_with_a_note(tmp_path, sink, start_hub):
    root = _project(tmp_path, sink.url)
    hub = await start_hub(root)
    status, answer = await hub.post("/hooks/lead-capture", {"first_name": "no email"})
    assert status == 202 and answer["status"] == "quarantined", answer
    write_project(root, {})  # the flow is then relaxed: an email is no longer required
    flow = root / "flows" / "lead-capture.yaml"
    flow.write_text(flow.read_text().replace("required: true", "required: false"))
    res = CliRunner().invoke(
        main, ["runs", "export", answer["event_id"], "--as-test", "--to", "-", "-p", str(root)]
    )
    assert res.exit_code == 0, res.output
    assert "note: the recorded run was quarantined" in res.output
    assert "the test expects what the flow does now" in res.output
    assert "deliveries:" in res.output


def test_an_unknown_run_is_reported(tmp_path):
    root = lead_project(tmp_path, "http://127.0.0.1:9")
    (root / ".patchbay").mkdir()
    from patchbay.store.sqlite import SyncStore

    SyncStore(root / ".patchbay" / "patchbay.db")
    res = CliRunner().invoke(main, ["runs", "export", "evt_nope", "--as-test", "-p", str(root)])
    assert res.exit_code == 1
    assert "no run 'evt_nope'" in res.output


async def test_an_encrypted_run_is_opened_before_its_stand_ins_are_made(tmp_path):
    import orjson

    from patchbay.config.project import load_or_raise
    from patchbay.engine.hub import Hub
    from patchbay.security.project import open_project_secrets

    root = _project(tmp_path, "http://127.0.0.1:9")
    (root / "patchbay.yaml").write_text("port: 0\nencrypt_sensitive: true\n")
    vault, secrets = open_project_secrets(root, create_key=True)
    assert vault is not None
    vault.set("website_whsec", SECRET_WHSEC)
    vault.set("crm_token", SECRET_TOKEN)
    hub = Hub(load_or_raise(root), resolver=secrets)
    await hub.start()
    try:
        lead = {"email": "real@corp.example", "card": {"number": "4111 1111 1111 1111"}}
        accepted, _ = await hub.ingest("lead-capture", orjson.dumps(lead), lead)
    finally:
        await hub.stop()
    res = CliRunner().invoke(
        main, ["runs", "export", accepted.event_id, "--as-test", "--to", "-", "-p", str(root)]
    )
    assert res.exit_code == 0, res.output
    assert "note: replaced the sensitive fields email, card" in res.stderr
    case = yaml.safe_load(res.stdout)
    [test] = case["tests"]
    assert test["event"] == {"email": "person1@example.com", "card": {"number": "9999 9999 9999 9999"}}
