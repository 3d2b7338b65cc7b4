"""`patchbay check` on broken projects: each problem reported as file:line: what is wrong, how to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from patchbay.cli import main
from tests.conftest import write_project

SYSTEMS = """
website:
  owner: web
  webhook:
    scheme: standard_webhooks
    secrets: [{secret: website_whsec}]
crm:
  kind: http
  owner: sales
  url: https://crm.example.com/api
  auth: {scheme: bearer, token: {secret: crm_token}}
"""

FLOW = """
purpose: leads reach the CRM
owner: sales
trigger:
  webhook: {system: website}
steps:
  - map:
      properties.email: "lower(email)"
  - validate:
      properties.email: {required: true, format: email}
destinations:
  - name: crm
    system: crm
    path: /contacts
    delivery:
      timeout_s: 5
      retry: {schedule: [5s, 1m]}
"""


def check(root: Path, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    env = (
        {"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8, "PATCHBAY_SECRET_CRM_TOKEN": "y" * 8}
        if env is None
        else env
    )
    res = CliRunner().invoke(main, ["check", str(root)], env=env)
    return res.exit_code, res.output.strip().splitlines()


def project(
    tmp_path: Path, flow: str = FLOW, systems: str = SYSTEMS, extra: dict[str, str] | None = None
) -> Path:
    return write_project(tmp_path, {"systems.yaml": systems, "flows/leads.yaml": flow, **(extra or {})})


def p(tmp_path: Path, rel: str) -> str:
    return str(tmp_path / rel)


def test_a_good_project_passes(tmp_path):
    code, out = check(project(tmp_path))
    assert code == 0
    assert out[0] == "ok: 2 systems, 1 flow"


CASES = [
    (
        "unknown system",
        lambda f, s: (f.replace("system: crm", "system: crn"), s),
        "flows/leads.yaml:12: unknown system 'crn'; did you mean 'crm'? (known: crm, website)",
    ),
    (
        "unknown field function",
        lambda f, s: (f.replace("lower(email)", "lowr(email)"), s),
        "flows/leads.yaml:7: map: unknown function 'lowr'; did you mean 'lower'?",
    ),
    (
        "bad URL",
        lambda f, s: (f, s.replace("https://crm.example.com/api", "crm.example.com/api")),
        "systems.yaml:9: url: bad URL 'crm.example.com/api': write an absolute http:// or https:// URL",
    ),
    (
        "bad duration",
        lambda f, s: (f.replace("5s, 1m", "5s, 1 minute"), s),
        "flows/leads.yaml:16: retry.schedule.1: bad duration '1 minute': write a number with a unit, such as 500ms, 30s",
    ),
    (
        "unreachable step",
        lambda f, s: (f.replace("  - validate:", "  - filter: {when: '`false`'}\n  - validate:"), s),
        "flows/leads.yaml:9: unreachable step: step 2 never lets a record through; remove this step or fix that condition",
    ),
    (
        "unknown setting",
        lambda f, s: (f.replace("path: /contacts", "pth: /contacts"), s),
        "flows/leads.yaml:13: unknown setting 'pth'; did you mean 'path'?",
    ),
    (
        "inline secret",
        lambda f, s: (f, s.replace("token: {secret: crm_token}", "token: abc123")),
        "systems.yaml:10: auth.token: secrets are referenced, never written inline: store the value with "
        "`patchbay secrets set NAME` and write {secret: NAME} (or {env: VARIABLE})",
    ),
    (
        "public endpoint not marked",
        lambda f, s: (f, s.replace("scheme: standard_webhooks", "scheme: none")),
        "systems.yaml:3: webhook: an endpoint with no authentication must be marked `public: true`",
    ),
    (
        "unknown step",
        lambda f, s: (f.replace("  - validate:", "  - validator:"), s),
        "flows/leads.yaml:8: unknown step 'validator'; did you mean 'validate'?",
    ),
    (
        "YAML syntax",
        lambda f, s: (f.replace("owner: sales\n", "owner: [sales\n", 1), s),
        "flows/leads.yaml:3: YAML syntax:",
    ),
    (
        "bad expression",
        lambda f, s: (f.replace("lower(email)", "lower(email"), s),
        "flows/leads.yaml:7: map:",
    ),
    (
        "bad order_by",
        lambda f, s: (
            f.replace("    path: /contacts", "    path: /contacts\n    order_by: 'properties.email ||'"),
            s,
        ),
        "flows/leads.yaml:14: order_by: ",
    ),
    (
        "constant order_by",
        lambda f, s: (f.replace("    path: /contacts", "    path: /contacts\n    order_by: \"'all'\""), s),
        "flows/leads.yaml:14: order_by: it gives the same key for every record",
    ),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_broken_project_reports_file_and_line(tmp_path, name, mutate, expected):
    flow, systems = mutate(FLOW, SYSTEMS)
    code, out = check(project(tmp_path, flow, systems))
    assert code == 2
    assert any(
        line.startswith(p(tmp_path, expected.split(":", 1)[0]) + ":" + expected.split(":", 1)[1])
        for line in out
    ), out


def test_missing_secret_points_at_the_reference(tmp_path):
    code, out = check(project(tmp_path), env={"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8})
    assert code == 2
    assert out[0] == (
        f"{p(tmp_path, 'systems.yaml')}:10: system 'crm': missing secret secret:crm_token; "
        "set it with `patchbay secrets set crm_token`"
    )


def test_duplicate_flow_name(tmp_path):
    root = project(tmp_path, extra={"flows/leads2.yaml": "name: leads\n" + FLOW})
    code, out = check(root)
    assert code == 2
    assert out[0] == (
        f"{p(tmp_path, 'flows/leads2.yaml')}:1: duplicate flow name 'leads' "
        f"(also in {p(tmp_path, 'flows/leads.yaml')}:1); rename one"
    )


def test_every_problem_is_reported_not_only_the_first(tmp_path):
    flow = FLOW.replace("lower(email)", "lowr(email)").replace("5s, 1m", "5s, 1 minute")
    code, out = check(project(tmp_path, flow))
    assert code == 2
    assert len([line for line in out if "leads.yaml" in line]) == 2


def test_json_output(tmp_path):
    import json

    res = CliRunner().invoke(
        main,
        ["check", str(project(tmp_path, FLOW.replace("system: crm", "system: x"))), "--json"],
        env={"PATCHBAY_SECRET_WEBSITE_WHSEC": "x" * 8, "PATCHBAY_SECRET_CRM_TOKEN": "y" * 8},
    )
    doc = json.loads(res.output)
    assert doc["ok"] is False and doc["problems"][0]["line"] == 12


def test_a_message_quoting_never_passes_does_not_make_later_steps_unreachable(tmp_path):
    """Which step blocks every record is the step's own signal, not a phrase found in a message."""
    flow = FLOW.replace("lower(email)", "'never passes' ||")
    code, out = check(project(tmp_path, flow))
    assert code == 2
    assert out[0].startswith(f"{p(tmp_path, 'flows/leads.yaml')}:7: map: ")
    assert "never passes" in out[0]
    assert not [line for line in out if "unreachable" in line], out


def test_a_filter_that_never_passes_makes_later_steps_and_destinations_unreachable(tmp_path):
    flow = FLOW.replace("  - validate:", "  - filter: '`false`'\n  - validate:")
    code, out = check(project(tmp_path, flow))
    assert code == 2
    leads = p(tmp_path, "flows/leads.yaml")
    assert out[:-1] == [  # the last line counts the problems
        f"{leads}:8: filter: this filter never passes; the steps after it are unreachable",
        f"{leads}:9: unreachable step: step 2 never lets a record through; remove this step or fix that condition",
        f"{leads}:12: unreachable destination: step 2 never lets a record through",
    ]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret-pw@db.internal:5432/patchbay",
        "mysql://root@localhost/x",
        "redis://cache:6379/0",
    ],
)
def test_a_store_url_the_hub_cannot_use_is_a_check_error_never_a_file(tmp_path, url):
    root = project(tmp_path, extra={"patchbay.yaml": f"store: {url}\n"})
    code, out = check(root)
    assert code == 2
    scheme = url.split("://")[0]
    assert any(
        line.startswith(p(tmp_path, "patchbay.yaml") + ":1: store:") and f"{scheme}://" in line
        for line in out
    ), out
    assert not any("s3cret-pw" in line for line in out), "the URL's password is never echoed"
    for args in (
        ["secrets", "init", "-p", str(root)],
        ["secrets", "list", "-p", str(root)],
        ["serve", str(root)],
    ):
        res = CliRunner().invoke(main, args)
        assert (
            res.exit_code == 2 and "patchbay.yaml:1: store: " in res.output and "s3cret" not in res.output
        ), (
            args,
            res.output,
        )
    made = [
        f
        for f in tmp_path.rglob("*")
        if f.name not in ("patchbay.yaml", "systems.yaml", "leads.yaml", "flows")
    ]
    assert [f for f in made if f.name != "master.key" and f.name != ".patchbay"] == [], made


def test_a_sqlite_url_names_the_store_file(tmp_path):
    store = tmp_path / "state" / "hub.db"
    root = project(tmp_path, extra={"patchbay.yaml": f"store: sqlite:///{store}\n"})
    code, out = check(root)
    assert code == 0, out
    from patchbay.config.project import load_project

    loaded, problems = load_project(root, secret_exists=lambda _ref: True)
    assert problems == [] and loaded is not None
    assert loaded.store_path == store


def test_a_claim_lease_too_short_to_renew_is_a_check_error(tmp_path):
    root = project(tmp_path, extra={"patchbay.yaml": "claim_lease: 1s\n"})
    code, out = check(root)
    assert code == 2
    assert any("patchbay.yaml:1: claim_lease:" in line and "at least 5s" in line for line in out), out
