"""`check` knows the fields a preset operation takes; `connectors show` and docs/presets list them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from patchbay import presets
from patchbay.cli.main import main
from tests.conftest import write_project

DOCS = Path(__file__).parents[2] / "docs" / "presets"

FLOW = """\
purpose: leads into the CRM
owner: sales
trigger:
  webhook: {system: website}
steps:
  - map:
      properties.email: lower(email)
      properties.fristname: first_name
      properties.plan: plan
destinations:
  - name: crm
    system: crm
    operation: upsert_contact
"""


def project(root: Path, flow: str = FLOW) -> Path:
    systems = {
        "website": {"owner": "web", "webhook": {"scheme": "bearer", "secrets": [{"env": "CHK_HOOK"}]}},
        "crm": {
            "preset": "hubspot",
            "owner": "sales",
            "auth": {"scheme": "bearer", "token": {"env": "CHK_TOKEN"}},
        },
    }
    return write_project(
        root, {"patchbay.yaml": "port: 0\n", "systems.yaml": yaml.safe_dump(systems), "flows/f.yaml": flow}
    )


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHK_HOOK", "h")
    monkeypatch.setenv("CHK_TOKEN", "t")


def test_check_flags_a_field_the_operation_does_not_take(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["check", str(project(tmp_path))])
    assert res.exit_code == 2, res.output
    out = res.output
    # file:line of the mapped field, and the nearest real field.
    assert "flows/f.yaml:8:" in out and "'properties.fristname'" in out
    assert "did you mean 'properties.firstname'?" in out
    assert "flows/f.yaml:9:" in out and "'properties.plan'" in out and "custom_fields" in out
    assert "properties.email" not in out.replace("'properties.email'", "") or "f.yaml:7:" not in out


def test_custom_fields_admit_the_accounts_own_properties(tmp_path: Path) -> None:
    flow = (
        FLOW.replace("properties.fristname", "properties.firstname")
        + "    custom_fields: [properties.plan]\n"
    )
    res = CliRunner().invoke(main, ["check", str(project(tmp_path, flow))])
    assert res.exit_code == 0, res.output


def test_long_form_map_is_checked_too(tmp_path: Path) -> None:
    flow = FLOW.replace(
        "  - map:\n      properties.email: lower(email)\n      properties.fristname: first_name\n      properties.plan: plan\n",
        "  - map:\n      keep: false\n      fields:\n        properties.email: lower(email)\n        properties.lastnme: last_name\n",
    )
    res = CliRunner().invoke(main, ["check", str(project(tmp_path, flow))])
    assert res.exit_code == 2 and "did you mean 'properties.lastname'?" in res.output, res.output


def test_not_checked_when_another_destination_may_take_the_field(tmp_path: Path) -> None:
    flow = FLOW + "  - name: archive\n    system: crm\n    path: /archive\n"
    res = CliRunner().invoke(main, ["check", str(project(tmp_path, flow))])
    assert res.exit_code == 0, res.output


def test_custom_fields_without_an_operation_is_explained(tmp_path: Path) -> None:
    flow = FLOW.replace(
        "    operation: upsert_contact\n", "    path: /x\n    custom_fields: [properties.plan]\n"
    )
    res = CliRunner().invoke(main, ["check", str(project(tmp_path, flow))])
    assert (
        res.exit_code == 2
        and "`custom_fields` extend a preset operation's fields: add `operation`" in res.output
    )


def test_unknown_read_is_named_with_a_suggestion(tmp_path: Path) -> None:
    flow = """\
purpose: p
owner: o
trigger:
  source: {system: crm, read: list_contacs}
  schedule: {every: 15m}
destinations:
  - {name: crm, system: crm, operation: upsert_contact}
"""
    res = CliRunner().invoke(main, ["check", str(project(tmp_path, flow))])
    assert res.exit_code == 2 and "unknown read 'list_contacs'" in res.output
    assert "did you mean 'list_contacts'" in res.output


def test_connectors_show_lists_a_presets_operations_and_fields() -> None:
    res = CliRunner().invoke(main, ["connectors", "show", "hubspot"])
    assert res.exit_code == 0, res.output
    for text in (
        "### `upsert_contact`",
        "### `create_deal`",
        "`properties.firstname`",
        "X-HubSpot-Signature-v3",
    ):
        assert text in res.output
    res = CliRunner().invoke(main, ["connectors", "show", "hubspt"])
    assert res.exit_code != 0 and "did you mean 'hubspot'?" in res.output


@pytest.mark.parametrize("name", presets.available())
def test_preset_docs_are_current(name: str) -> None:
    page = DOCS / f"{name}.md"
    assert page.exists() and page.read_text() == presets.describe(name), f"run scripts/gen-docs: {page}"


OAUTH2 = {
    "google_sheets": ("https://accounts.google.com/o/oauth2/v2/auth", "https://oauth2.googleapis.com/token"),
    "quickbooks": (
        "https://appcenter.intuit.com/connect/oauth2",
        "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer",
    ),
    "xero": ("https://login.xero.com/identity/connect/authorize", "https://identity.xero.com/connect/token"),
    "hubspot": ("https://app.hubspot.com/oauth/authorize", "https://api.hubapi.com/oauth/v1/token"),
}


@pytest.mark.parametrize("name", sorted(OAUTH2))
def test_an_oauth2_system_gets_the_vendors_endpoints_and_scopes(name: str, tmp_path: Path) -> None:
    from urllib.parse import parse_qs, urlsplit

    from patchbay.config.project import load_project
    from patchbay.connectors import oauth2_client as oauth2
    from patchbay.security.vault import MasterKey, Vault
    from patchbay.store.secrets import SqliteSecretRows

    own = {
        "preset": name,
        "owner": "ops",
        "auth": {
            "scheme": "oauth2_authorization_code",
            "client_id": "app-123",
            "client_secret": {"env": "CHK_TOKEN"},
            "redirect_uri": "https://hub.example.com/oauth/callback",
        },
    }
    flow = "purpose: p\nowner: o\ntrigger: {schedule: {every: 1h}}\ndestinations: [{name: d, system: vendor, path: /x}]\n"
    write_project(
        tmp_path,
        {"patchbay.yaml": "port: 0\n", "systems.yaml": yaml.safe_dump({"vendor": own}), "flows/f.yaml": flow},
    )
    project, problems = load_project(tmp_path)
    assert project is not None, [str(p) for p in problems]
    auth = project.systems["vendor"].config.auth  # type: ignore[union-attr]
    assert (auth.authorize_url, auth.token_url) == OAUTH2[name]
    assert auth.scopes == presets.load(name)["oauth2"]["scopes"]
    vault = Vault(SqliteSecretRows(tmp_path / "vault.db"), [MasterKey.generate()])
    vault.ensure_schema()
    url = oauth2.begin(vault, "vendor", auth)
    assert url.startswith(OAUTH2[name][0] + "?")
    query = parse_qs(urlsplit(url).query)
    assert query["scope"] == [" ".join(auth.scopes)] and query["client_id"] == ["app-123"]
    if name == "google_sheets":  # without these Google gives no refresh token
        assert query["access_type"] == ["offline"] and query["prompt"] == ["consent"]
