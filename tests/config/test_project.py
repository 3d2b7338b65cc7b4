"""load_project: preset trigger defaults, applied to the flow as written and validated with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchbay import presets
from patchbay.config.project import load_project
from tests.conftest import write_project

SYSTEMS = """
acme:
  preset: acme
  owner: payments
  webhook: {secrets: [{secret: acme_whsec}]}
"""

FLOW = """
purpose: payments arrive
owner: payments
trigger:
  webhook: {{system: acme{extra}}}
destinations:
  - {{name: inbox, system: inbox, file: x.jsonl}}
"""

INBOX = """
inbox:
  kind: files
  owner: ops
"""


@pytest.fixture
def preset_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of presets in place of patchbay/presets/, holding `acme`."""
    folder = tmp_path / "presets"
    folder.mkdir()
    monkeypatch.setattr(presets, "HERE", folder)
    return folder


def load(root: Path, defaults: str, extra: str = "") -> tuple[object, list[str]]:
    (root.parent / "presets" / "acme.yaml").write_text(
        "webhook: {scheme: hmac}\ntrigger_defaults:\n" + defaults
    )
    write_project(
        root,
        {
            "systems.yaml": SYSTEMS + INBOX.replace("ops", f"ops\n  folder: {root / 'out'}"),
            "flows/pay.yaml": FLOW.format(extra=extra),
        },
    )
    project, problems = load_project(root)
    return project, [str(p) for p in problems]


def test_a_preset_default_fills_what_the_flow_leaves_out(tmp_path, preset_dir):
    project, problems = load(tmp_path / "p", "  id_path: id\n")
    assert problems == []
    webhook = project.flows["pay"].trigger.webhook  # type: ignore[attr-defined]
    assert webhook.id_path == "id"


def test_the_flows_own_setting_wins_and_an_id_header_replaces_the_default_id_path(tmp_path, preset_dir):
    project, problems = load(tmp_path / "p", "  id_path: id\n", ", id_header: X-Id")
    assert problems == []
    webhook = project.flows["pay"].trigger.webhook  # type: ignore[attr-defined]
    assert (webhook.id_header, webhook.id_path) == ("X-Id", None)
    project, problems = load(tmp_path / "q", "  id_path: id\n", ", id_path: data.id")
    assert project.flows["pay"].trigger.webhook.id_path == "data.id"  # type: ignore[attr-defined]


def test_a_preset_default_is_validated_like_the_flows_own_settings(tmp_path, preset_dir):
    _, problems = load(tmp_path / "p", "  path: hooks/acme\n")
    flow = str(tmp_path / "p" / "flows" / "pay.yaml")
    assert problems == [
        f"{flow}:4: trigger.webhook.path: bad path 'hooks/acme': start with / and use letters, digits, "
        "'-', '_', '.', '/'"
    ]


def test_an_unknown_preset_default_is_a_problem_not_a_crash(tmp_path, preset_dir):
    _, problems = load(tmp_path / "p", "  id_pth: id\n")
    flow = str(tmp_path / "p" / "flows" / "pay.yaml")
    assert problems == [
        f"{flow}:4: unknown setting 'id_pth'; did you mean 'id_path'? "
        "(known: accept_status, batch, files, handshakes, id_header, id_path, path, system)"
    ]
