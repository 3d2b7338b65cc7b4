"""`patchbay check` on call, lookup and split steps: each problem as file:line, what is wrong, how to fix."""

from __future__ import annotations

from pathlib import Path

from tests.config.test_check import SYSTEMS, check, project

DB = """
billing_db:
  kind: sqlite
  owner: finance
  path: billing.db
"""


def flow(steps: str) -> str:
    return f"""
purpose: leads reach the CRM
owner: sales
trigger:
  webhook: {{system: website}}
steps:
{steps}
destinations:
  - name: crm
    system: crm
    path: /contacts
"""


def problems(tmp_path: Path, steps: str) -> list[str]:
    root = project(tmp_path, flow(steps), SYSTEMS + DB)
    (root / "billing.db").touch()
    code, lines = check(root)
    assert code != 0, lines
    return lines


def test_a_call_to_a_system_that_does_not_exist(tmp_path):
    lines = problems(tmp_path, "  - call: {system: crn, path: /x, as: contact}")
    assert any(
        "flows/leads.yaml:6" in ln and "call: unknown system 'crn'" in ln and "crm" in ln for ln in lines
    ), lines


def test_a_call_to_a_system_that_cannot_be_called(tmp_path):
    lines = problems(tmp_path, "  - call: {system: billing_db, path: /x, as: contact}")
    assert any(
        ":6" in ln and "'billing_db' (sqlite) cannot be called; use an http system" in ln for ln in lines
    ), lines


def test_two_calls_with_one_name_and_one_binding(tmp_path):
    steps = """  - call: {system: crm, path: /a, as: contact}
  - call: {system: crm, path: /b, as: contact}"""
    lines = problems(tmp_path, steps)
    assert any(":7" in ln and "is named 'call'; give each call a unique `name:`" in ln for ln in lines), lines
    assert any(":7" in ln and "step 1 already binds 'contact'" in ln for ln in lines), lines


def test_lookup_sql_must_be_one_select_with_bound_parameters(tmp_path):
    cases = {
        "DELETE FROM accounts WHERE email = :email": "a lookup's query is one SELECT",
        "SELECT * FROM accounts WHERE email = :email; DROP TABLE accounts": "one SELECT statement, without `;`",
        "SELECT * FROM accounts WHERE email = '{{ email }}'": "never as {{ }} in the text",
        "SELECT * FROM accounts WHERE email = :email AND tier = :tier": "the query uses :tier; bind it in `params`",
    }
    for i, (query, message) in enumerate(cases.items()):
        steps = f'  - lookup: {{system: billing_db, query: "{query}", params: {{email: email}}, as: account}}'
        lines = problems(tmp_path / str(i), steps)
        assert any("flows/leads.yaml:6" in ln and message in ln for ln in lines), (query, lines)


def test_a_lookup_query_on_an_http_system(tmp_path):
    steps = '  - lookup: {system: crm, query: "SELECT 1 WHERE :a = 1", params: {a: email}, as: x}'
    lines = problems(tmp_path, steps)
    assert any(":6" in ln and "a query needs a SQL system" in ln for ln in lines), lines


def test_split_and_call_expressions_are_checked(tmp_path):
    steps = """  - split: {path: items, with: {order: "nope("}}
  - call: {system: crm, path: "/c/{{ id( }}", as: contact, select: {id: "body.[["}}"""
    lines = problems(tmp_path, steps)
    assert any(":6" in ln and "split:" in ln for ln in lines), lines
    assert any(":7" in ln and "call:" in ln for ln in lines), lines


def test_a_good_project_with_calls_checks_clean(tmp_path):
    steps = """  - split: {path: items, with: {email: email}}
  - name: account
    lookup:
      system: billing_db
      query: "SELECT owner FROM accounts WHERE email = :email"
      params: {email: lower(email)}
      as: account
      cache: {key: email, ttl: 10m}
  - name: find_contact
    call: {system: crm, path: "/search?email={{ email }}", as: contact, on_404: continue}"""
    root = project(tmp_path, flow(steps), SYSTEMS + DB)
    (root / "billing.db").touch()
    code, lines = check(root)
    assert code == 0, lines
    assert (
        "  leads: POST /hooks/leads -> crm; asks billing_db (account); asks crm (find_contact)  (owner sales)"
        in lines
    )


def test_an_answer_read_before_its_call_or_under_a_misspelt_name(tmp_path):
    steps = """  - map: {id: contact.body.id, email: email}
  - name: find_contact
    call: {system: crm, path: "/search?email={{ email }}", as: contact}"""
    lines = problems(tmp_path / "early", steps)
    assert any(":6" in ln and "reads contact's answer, which step 2 binds later" in ln for ln in lines), lines

    steps = """  - name: find_contact
    call: {system: crm, path: "/search?email={{ email }}", as: contact}
  - map: {id: contcat.body.id}"""
    lines = problems(tmp_path / "typo", steps)
    assert any(
        ":8" in ln and "no call or lookup binds 'contcat'; did you mean 'contact'?" in ln for ln in lines
    ), lines


def test_a_batch_sync_refuses_call_lookup_and_split(tmp_path):
    from tests.config.test_check import check as run_check
    from tests.conftest import write_project

    flow_text = """
purpose: Orders copied into the reporting file.
owner: data
trigger: {manual: true}
steps:
  - split: items
  - call: {system: shop, path: /x, as: y}
batch:
  from: {system: shop, table: orders}
  to: {system: report, table: orders}
  mode: merge
  key: [id]
"""
    systems = "shop: {kind: sqlite, owner: ops, path: shop.db}\nreport: {kind: sqlite, owner: data, path: report.db}\n"
    root = write_project(tmp_path, {"systems.yaml": systems, "flows/orders.yaml": flow_text})
    (root / "shop.db").touch()
    (root / "report.db").touch()
    code, lines = run_check(root, env={})
    assert code != 0
    assert any(
        "orders.yaml:5" in ln and "split: a batch sync's steps run over frames" in ln for ln in lines
    ), lines
    assert any("orders.yaml:6" in ln and "call: a batch sync's steps" in ln for ln in lines), lines


def test_a_call_or_lookup_path_must_start_with_a_slash(tmp_path):
    for i, step in enumerate(
        [
            '  - call: {system: crm, path: "@evil.example/x", as: contact}',
            '  - lookup: {system: crm, path: ".evil.example/x", as: account}',
        ]
    ):
        lines = problems(tmp_path / str(i), step)
        assert any(":6" in ln and "must start with / (or ?)" in ln for ln in lines), lines
