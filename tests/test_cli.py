"""The CLI's words, in process: labels, plurals, settings tables and the exit codes the README documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from patchbay.cli.main import main
from tests.conftest import lead_project, write_project

README = Path(__file__).resolve().parent.parent / "README.md"


def _triggers_project(root: Path) -> Path:
    lead_project(root, "http://127.0.0.1:9")
    flows = {
        "nightly": {"trigger": {"schedule": {"cron": "0 2 * * *"}}},
        "ticker": {"trigger": {"schedule": {"every": "5m"}}},
        "orders": {
            "trigger": {
                "schedule": {"every": "30s"},
                "source": {"system": "crm", "path": "/orders", "items_path": "data"},
            }
        },
    }
    for name, flow in flows.items():
        flow.update(purpose="p", owner="ops", destinations=[{"name": "crm", "system": "crm", "path": "/x"}])
        write_project(root, {f"flows/{name}.yaml": yaml.safe_dump(flow)})
    return root


def test_check_labels_each_trigger_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", "t")
    res = CliRunner().invoke(main, ["check", str(_triggers_project(tmp_path))])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "ok: 2 systems, 4 flows"
    labels = dict(re.match(r"  (\S+): (.*?) -> ", line).groups() for line in lines[1:])  # type: ignore[union-attr]
    assert labels == {
        "lead-capture": "POST /hooks/lead-capture",
        "nightly": "cron 0 2 * * * (UTC)",
        "ticker": "every 5m",
        "orders": "every 30s: poll crm",
    }


def test_counts_are_worded_in_the_singular_for_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", "t")
    root = lead_project(tmp_path, "http://127.0.0.1:9")
    (root / "systems.yaml").write_text((root / "systems.yaml").read_text().replace("website:", "web site:"))
    res = CliRunner().invoke(main, ["check", str(root)])
    assert res.exit_code == 2 and re.search(r"^\d+ problems?$", res.output, re.M), res.output
    assert "1 problems" not in res.output
    root2 = tmp_path / "one"
    write_project(
        root2,
        {
            "patchbay.yaml": "port: 0\n",
            "systems.yaml": "crm: {kind: http, owner: o, url: 'http://127.0.0.1:9', allow_private_network: true}\n",
            "flows/f.yaml": "purpose: p\nowner: o\ntrigger: {schedule: {every: 1m}}\n"
            "destinations: [{name: crm, system: crm, path: /x}]\n",
        },
    )
    res = CliRunner().invoke(main, ["check", str(root2)])
    assert res.output.splitlines()[0] == "ok: 1 system, 1 flow", res.output


def test_connectors_show_says_optional_once_and_null_where_a_value_may_be_null():
    from patchbay import registry

    registry.discover()
    for kind in registry.CONNECTORS:
        res = CliRunner().invoke(main, ["connectors", "show", kind])
        assert res.exit_code == 0, res.output
        assert "(optional) (optional)" not in res.output, kind
        assert "(optional) or" not in res.output, kind
    res = CliRunner().invoke(main, ["connectors", "show", "postgres"])
    assert "mapping of str to str or int or float or bool or null (optional)" in res.output


def _readme_exit_codes() -> dict[str, set[int]]:
    """`patchbay runs` -> {0, 1, 3} from the README's commands table."""
    out: dict[str, set[int]] = {}
    for line in README.read_text().splitlines():
        cells = re.split(r"(?<!\\)\|", line)  # a table row; `\|` inside a cell is not a separator
        m = re.match(r" `patchbay ([a-z-]+(?: show)?)", cells[1]) if len(cells) == 5 else None
        if m:
            out[m.group(1)] = {int(c) for c in re.findall(r"\b(\d)\b", cells[3])}
    return out


@pytest.mark.parametrize(
    ("args", "command", "code"),
    [
        (["runs", "-p", "{empty}"], "runs", 3),
        (["runs", "show", "evt_x", "-p", "{empty}"], "runs show", 3),
        (["dead", "-p", "{empty}"], "dead", 3),
        (["resume", "f", "-p", "{empty}"], "resume", 3),
        (["state", "f", "-p", "{empty}"], "state", 3),
        (["send", "lead-capture", "-p", "{empty}"], "send", 2),
        (["send", "nope", "-p", "{lead}"], "send", 2),
        (["send", "lead-capture", "-p", "{lead}", "--url", "http://127.0.0.1:9"], "send", 3),
        (["replay", "-p", "{lead}"], "replay", 2),
        (["replay", "--all", "-p", "{empty}"], "replay", 2),
        (["check", "{empty}"], "check", 2),
        (["connectors", "show", "nope"], "connectors", 1),
        (["tokens", "list", "-p", "{empty}/missing"], "tokens", 2),
        (["runs", "--since", "soon", "-p", "{lead}"], "runs", 2),
    ],
)
def test_every_exit_code_is_in_the_commands_table(tmp_path, monkeypatch, args, command, code):
    monkeypatch.setenv("PATCHBAY_SECRET_WEBSITE_WHSEC", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    monkeypatch.setenv("PATCHBAY_SECRET_CRM_TOKEN", "t")
    empty = tmp_path / "empty"
    empty.mkdir()
    lead = lead_project(tmp_path / "lead", "http://127.0.0.1:9")
    args = [a.format(empty=empty, lead=lead) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == code, res.output
    documented = _readme_exit_codes()
    assert code in documented[command], (command, code, documented.get(command))


def test_the_readme_shows_the_banner_and_its_curl_as_serve_prints_them(tmp_path):
    from patchbay.config.project import load_or_raise
    from patchbay.scaffold import banner, create_project

    create_project(tmp_path / "demo")
    printed = banner(load_or_raise(tmp_path / "demo"), "127.0.0.1", 8787)
    [curl] = [line for line in printed.splitlines() if line.strip().startswith("curl ")]
    readme = README.read_text()
    [shown] = [line for line in readme.splitlines() if line.strip().startswith("curl ")]
    headers = re.findall(r"-H '([A-Za-z-]+):", curl)
    assert {"Content-Type", "webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
    assert re.findall(r"-H '([A-Za-z-]+):", shown) == headers, shown
    for line in printed.splitlines():  # every other line of the banner, as printed
        if line.strip() and not line.strip().startswith("curl ") and "running on" not in line:
            assert line.replace(str(tmp_path / "demo"), "demo") in readme, line


def test_the_readme_lists_every_token_scope():
    from patchbay.security.tokens import SCOPES

    readme = README.read_text()
    for scope, what in SCOPES.items():
        assert f"`{scope}`" in readme and what in readme, scope


def test_runs_outside_a_project_says_to_pass_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PATCHBAY_PROJECT", raising=False)
    res = CliRunner().invoke(main, ["runs"])
    assert res.exit_code == 3
    assert "no project in . (no patchbay.yaml): pass -p DIR or set PATCHBAY_PROJECT" in res.output
