"""`patchbay test` with call steps: recorded answers (`calls:`) stand in for the system, the run goes on
with them bound as in the hub, nothing reaches the network, and a call left unanswered is named."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner

from patchbay.cli.main import main
from tests.conftest import lead_project, write_project

STEPS = """
- name: find_contact
  call: {system: crm, method: GET, path: "/search?email={{ email }}", as: contact, on_404: continue}
"""
DESTS: dict[str, Any] = {
    "dest": {"when": "contact.status == `404`", "body": {"email": "email"}},
    "extra_dests": [
        {
            "name": "crm_update",
            "system": "crm",
            "method": "PATCH",
            "path": "/contacts/{{ contact.body.id }}",
            "when": "contact.status == `200`",
        }
    ],
}


def _test(root: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["test", root])
    return res.exit_code, res.output


def test_recorded_answers_drive_find_or_create(tmp_path, sink):
    lead_project(tmp_path, sink.url, steps=STEPS, **DESTS)
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: not found, so created
                event: {email: new@example.com}
                calls: {find_contact: [{status: 404}]}
                expect:
                  deliveries:
                    crm: {method: POST, path: /contacts, body: {email: new@example.com}}
              - name: found, so updated
                event: {email: ada@example.com}
                calls: {find_contact: [503, {status: 200, body: {id: c-42}}]}
                expect:
                  record_includes: {contact: {status: 200, body: {id: c-42}}}
                  deliveries:
                    crm_update: {method: PATCH, path: /contacts/c-42}
              - name: the CRM refuses the credential
                event: {email: ada@example.com}
                calls: {find_contact: [401]}
                expect:
                  deliveries: {crm_update: {}}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert "PASS  not found, so created" in out, out
    assert "PASS  found, so updated" in out, out
    assert "FAIL  the CRM refuses the credential" in out  # paused at the call: the test says so
    assert "the run stopped at a call (paused): call find_contact: HTTP 401" in out
    assert code == 1
    assert sink.received == []  # recorded answers: no request left the process


def test_an_unanswered_call_and_an_unknown_call_name(tmp_path, sink):
    lead_project(tmp_path, sink.url, steps=STEPS, **DESTS)
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: no answer given
                event: {email: new@example.com}
                expect: {deliveries: {crm: {}}}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 1 and "the test gives no answer for it; add `calls: {find_contact: [...]}`" in out, out

    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: misnamed
                event: {email: new@example.com}
                calls: {find: [200]}
                expect: {deliveries: {crm: {}}}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 2, out
    assert "lead-capture.test.yaml:4" in out and "no call step 'find' (it has: find_contact)" in out


async def test_a_run_with_calls_exports_as_a_test_with_its_answers(tmp_path, sink, start_hub, monkeypatch):
    import yaml

    from tests.conftest import SECRET_TOKEN, SECRET_WHSEC, eventually

    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", SECRET_TOKEN)
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", SECRET_WHSEC)

    def answer(request, rec):
        if request.method == "GET":
            return (200, {"Content-Type": "application/json"}, f'{{"id": "c-9", "note": "{SECRET_TOKEN}"}}')
        return 201

    sink.default = answer
    root = lead_project(tmp_path, sink.url, steps=STEPS, **DESTS)
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})

    async def delivered() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "delivered"

    await eventually(delivered, what="the run delivered")
    res = CliRunner().invoke(main, ["runs", "export", body["event_id"], "--as-test", "-p", str(root)])
    assert res.exit_code == 0, res.output
    text = (root / "flows" / "lead-capture.test.yaml").read_text()
    assert SECRET_TOKEN not in text  # an answer that echoed a credential is scrubbed
    [case] = yaml.safe_load(text)["tests"]
    assert case["calls"] == {"find_contact": [{"status": 200, "body": {"id": "c-9", "note": "[secret]"}}]}
    assert list(case["expect"]["deliveries"]) == ["crm_update"]
    assert case["expect"]["deliveries"]["crm_update"]["path"] == "/contacts/c-9"
    code, out = _test(str(root))
    assert code == 0 and "1 passed, 0 failed" in out, out


def test_a_split_delivers_per_element_in_a_flow_test(tmp_path, sink):
    steps = """
- split: {path: items, with: {order: id}}
- validate: {sku: {required: true}}
"""
    lead_project(tmp_path, sink.url, steps=steps, dest={"body": {"order": "order", "sku": "sku"}})
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: two good lines and a bad one
                event: {id: o-1, items: [{sku: A}, {qty: 2}, {sku: C}]}
                expect:
                  deliveries:
                    crm[0]: {body: {order: o-1, sku: A}}
                    crm[2]: {body: {order: o-1, sku: C}}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 0 and "1 passed, 0 failed" in out, out


def test_a_dry_run_shows_the_call_it_would_ask_and_asks_nothing(tmp_path, sink):
    lead_project(tmp_path, sink.url, steps=STEPS, **DESTS)
    res = CliRunner().invoke(
        main, ["run", "lead-capture", "-p", str(tmp_path), "--dry-run", "-d", '{"email": "a@b.co"}']
    )
    assert res.exit_code == 0, res.output
    assert "1. find_contact (call): asks find_contact (below), then goes on with its answer" in res.output
    assert "would ask first (a dry run asks nothing" in res.output
    assert f"call:find_contact (call): GET {sink.url}/search?email=a%40b.co" in res.output
    assert sink.received == []


def test_recorded_answer_headers_are_bound(tmp_path, sink):
    steps = """
- name: create
  call: {system: crm, method: POST, path: /contacts, as: created, headers_kept: [location]}
"""
    lead_project(
        tmp_path,
        sink.url,
        steps=steps,
        dest={"path": "/notes", "body": {"contact": "created.headers.location"}},
    )
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: the created contact's location
                event: {email: a@b.co}
                calls: {create: [{status: 201, headers: {Location: /contacts/c-1}}]}
                expect:
                  deliveries:
                    crm: {path: /notes, body: {contact: /contacts/c-1}}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 0 and "1 passed, 0 failed" in out, out
