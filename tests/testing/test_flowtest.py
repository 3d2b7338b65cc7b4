"""`patchbay test`: flow tests beside the flows, run through the real CLI on real projects on disk."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.scaffold import create_project
from tests.conftest import lead_project, write_project


def _test(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["test", *args])
    return res.exit_code, res.output


def _demo(tmp_path: Path) -> Path:
    root = tmp_path / "demo"
    create_project(root)
    return root


def test_the_example_projects_tests_pass_from_a_fresh_init(tmp_path):
    root = _demo(tmp_path)
    code, out = _test(str(root))
    assert code == 0, out
    assert "6 passed, 0 failed" in out
    assert "PASS  the CRM answers 503 once, the retry delivers it" in out


def test_no_vault_is_needed(tmp_path):
    root = _demo(tmp_path)
    shutil.rmtree(root / ".patchbay")  # no master key, no vault: secrets are placeholders
    code, out = _test(str(root))
    assert code == 0, out
    assert not (root / ".patchbay").exists()  # and no store was made: nothing on disk


def test_a_mapping_change_fails_with_a_readable_diff(tmp_path):
    root = _demo(tmp_path)
    flow = root / "flows" / "lead-capture.yaml"
    flow.write_text(flow.read_text().replace("lower(trim(", "trim(("))
    code, out = _test(str(root))
    assert code == 1, out
    assert "FAIL  a lead reaches the CRM and the sales chat  (" in out
    assert 'crm.body.properties.email: expected "ada@example.com", got "Ada@Example.com"' in out
    assert '-    "email": "ada@example.com",' in out  # the unified diff of the body
    assert '+    "email": "Ada@Example.com",' in out
    assert "5 passed, 1 failed" in out


def test_nothing_reaches_the_destination(tmp_path, sink):
    lead_project(tmp_path, sink.url)
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: captured, not sent
                event: {email: A@B.co, first_name: Ann}
                expect:
                  deliveries:
                    crm:
                      method: POST
                      url: SINK/contacts
                      path: /contacts
                      headers: {authorization: "Bearer <secret:crm_token>"}
                      body: {properties: {email: a@b.co, firstname: Ann, lead_source: website}}
            """.replace("SINK", sink.url)
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 0, out
    assert sink.received == []


def test_simulated_answers_walk_the_real_retry_policy(tmp_path):
    lead_project(tmp_path, "http://127.0.0.1:9", delivery={"retry": {"schedule": ["5s", "1m"]}})
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: 503 then 201
                event: {email: a@b.co}
                responses: {crm: [503, 201]}
                expect:
                  deliveries: {crm: {attempts: 2, outcome: delivered}}
              - name: always 503 is dead once the schedule is spent
                event: {email: a@b.co}
                responses: {crm: [503]}
                expect:
                  deliveries: {crm: {attempts: 3, outcome: dead}}
              - name: 401 pauses the destination
                event: {email: a@b.co}
                responses: {crm: [{status: 401}]}
                expect:
                  deliveries: {crm: {attempts: 1, outcome: paused}}
              - name: wrong on purpose
                event: {email: a@b.co}
                responses: {crm: [429, 500, 201]}
                expect:
                  deliveries: {crm: {attempts: 2}}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 1, out
    assert "3 passed, 1 failed" in out
    assert (
        "crm: expected 2 attempts, got 3: HTTP 429 -> retry in 5s, HTTP 500 -> retry in 60s, HTTP 201 -> delivered"
        in out
    )


def test_quarantine_and_filter_expectations(tmp_path):
    lead_project(
        tmp_path,
        "http://127.0.0.1:9",
        steps="""
        - filter: {when: "email != 'spam@example.com'"}
        - validate:
            email: {required: true, format: email}
        """,
    )
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: bad email
                event: {email: nope}
                expect: {quarantined: "email"}
              - name: spam
                event: {email: spam@example.com}
                expect: {filtered: true}
              - name: expects a quarantine but it is delivered
                event: {email: ok@example.com}
                expect: {quarantined: true}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 1, out
    assert "expected the event to be quarantined, but it was delivered" in out
    assert "2 passed, 1 failed" in out


def test_a_bad_test_file_exits_2_with_file_and_line(tmp_path):
    lead_project(tmp_path, "http://127.0.0.1:9")
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: fine
                event: {email: a@b.co}
                expect: {deliveries: {crm: {}}}
              - name: names a destination the flow does not have
                event: {email: a@b.co}
                expect:
                  deliveries:
                    crm: {}
                    erp: {}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 2, out
    assert "lead-capture.test.yaml:10: flow 'lead-capture' has no destination 'erp' (it has: crm)" in out
    (tmp_path / "flows" / "lead-capture.test.yaml").write_text(
        "tests:\n  - name: x\n    expect: {filtered: true}\n"
    )
    code, out = _test(str(tmp_path))
    assert code == 2, out
    assert "lead-capture.test.yaml:2: tests.0: give exactly one of `event` (inline) or `event_file`" in out


def test_event_file_flow_filter_and_junit(tmp_path):
    lead_project(tmp_path, "http://127.0.0.1:9")
    write_project(
        tmp_path,
        {
            "flows/fixtures/lead.json": '{"email": "a@b.co"}',
            "flows/lead-capture.test.yaml": """
            tests:
              - name: from a file
                event_file: fixtures/lead.json
                expect: {deliveries: {crm: {body_includes: {properties: {email: a@b.co}}}}}
              - name: fails
                event_file: fixtures/lead.json
                expect: {deliveries: {crm: {headers: {X-Team: sales}}}}
            """,
        },
    )
    junit = tmp_path / "junit.xml"
    code, out = _test(str(tmp_path), "lead-capture", "--junit", str(junit))
    assert code == 1, out
    assert 'crm.headers.X-Team: expected "sales", but there is no such field' in out
    suites = ET.parse(junit).getroot()
    assert suites.get("tests") == "2" and suites.get("failures") == "1"
    [case] = [c for c in suites.iter("testcase") if c.find("failure") is not None]
    assert case.get("name") == "fails" and case.get("line") == "5"
    code, out = _test(str(tmp_path), "no-such-flow")
    assert code == 2 and "no flow 'no-such-flow'" in out


def test_check_does_not_read_test_files_as_flows(tmp_path, monkeypatch):
    root = _demo(tmp_path)
    res = CliRunner().invoke(main, ["check", str(root)])
    assert res.exit_code == 0, res.output
    assert "1 flow" in res.output
    assert yaml.safe_load((root / "flows" / "lead-capture.test.yaml").read_text())["tests"]


def test_aggregated_expectation(tmp_path):
    lead_project(
        tmp_path,
        "http://127.0.0.1:9",
        steps="""
        - name: daily
          aggregate: {by: shop, window: 1d, time: at, values: {orders: {count: true}}}
        """,
    )
    write_project(
        tmp_path,
        {
            "flows/lead-capture.test.yaml": """
            tests:
              - name: counted on its day
                event: {shop: paris, at: "2026-12-06T10:00:00Z"}
                expect: {aggregated: "2026-12-06"}
              - name: wrong day on purpose
                event: {shop: paris, at: "2026-12-07T10:00:00Z"}
                expect: {aggregated: "2026-12-06"}
              - name: expects a delivery
                event: {shop: paris, at: "2026-12-06T10:00:00Z"}
                expect: {deliveries: {crm: {}}}
            """
        },
    )
    code, out = _test(str(tmp_path))
    assert code == 1, out
    assert "1 passed, 2 failed" in out
    assert "counted into window 2026-12-07, which does not contain '2026-12-06'" in out
    assert "expected deliveries, but it was counted into window 2026-12-06" in out
