"""`patchbay check` proves an entity's rules, each problem at its file:line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from patchbay.cli import main
from tests.conftest import write_project

SYSTEMS = {
    "crm": {"kind": "http", "owner": "sales", "url": "http://127.0.0.1:9", "allow_private_network": True},
    "billing": {
        "kind": "http",
        "owner": "finance",
        "url": "http://127.0.0.1:9",
        "allow_private_network": True,
    },
    "web": {"owner": "web", "webhook": {"scheme": "none", "public": True}},
}
GOOD: dict[str, Any] = {
    "fields": {
        "email": {"owner": "crm"},
        "name": {"owner": "crm"},
        "plan": {"owner": "billing"},
        "phone": {"rule": "latest"},
    },
    "match": [{"field": "email", "normalize": "email"}],
    "systems": {
        "crm": {"id": "id", "fields": {"email": "email", "name": "name", "phone": "phone", "plan": "plan"}},
        "billing": {"id": "cus", "fields": {"email": "mail", "plan": "plan", "phone": "tel"}},
    },
}


def sync_flow(system: str, dests: list[str]) -> dict[str, Any]:
    return {
        "purpose": "sync",
        "owner": "ops",
        "sync": "customer",
        "trigger": {"webhook": {"system": system}},
        "destinations": [{"name": f"to_{d}", "system": d, "path": "/x"} for d in dests],
    }


def project(
    tmp_path: Path, entity: Any, flows: dict[str, Any], systems: dict[str, Any] | None = None
) -> Path:
    s = dict(systems or SYSTEMS)
    s["crm"] = {**s["crm"], "webhook": {"scheme": "none", "public": True}}
    s["billing"] = {**s["billing"], "webhook": {"scheme": "none", "public": True}}
    files = {
        "patchbay.yaml": "port: 0\n",
        "systems.yaml": yaml.safe_dump(s, sort_keys=False),
        "entities/customer.yaml": entity
        if isinstance(entity, str)
        else yaml.safe_dump(entity, sort_keys=False),
    }
    files |= {f"flows/{n}.yaml": yaml.safe_dump(f, sort_keys=False) for n, f in flows.items()}
    return write_project(tmp_path, files)


def check(root: Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["check", str(root)])
    return res.exit_code, res.output


def line_of(root: Path, file: str, text: str) -> int:
    lines = (root / file).read_text().splitlines()
    return next(i for i, t in enumerate(lines, 1) if text in t)


def test_a_sound_entity_and_its_sync_flows_pass(tmp_path):
    root = project(
        tmp_path,
        GOOD,
        {
            "crm_sync": sync_flow("crm", ["crm", "billing"]),
            "billing_sync": sync_flow("billing", ["crm", "billing"]),
        },
    )
    code, out = check(root)
    assert code == 0, out


def test_every_field_needs_one_owner_or_a_rule_and_owners_map_their_fields(tmp_path):
    entity = """\
fields:
  email: {owner: crm}
  name: {}
  plan: {owner: billing, rule: latest}
  phone: {owner: crm}
  tier: {owner: nowhere}
match:
  - {field: email, normalize: email}
  - {field: mail}
systems:
  crm: {id: id, fields: {email: email, name: name, plan: plan}}
  billing: {id: cus, fields: {email: mail, plan: plan, colour: c}}
"""
    root = project(tmp_path, entity, {"crm_sync": sync_flow("crm", ["crm", "billing"])})
    code, out = check(root)
    assert code != 0
    assert "unknown entity" not in out  # a broken entity is reported once, in its own file
    f = "entities/customer.yaml"
    assert f"{f}:3: fields.name: give a field either `owner: SYSTEM` or `rule: latest|first|manual`" in out, (
        out
    )
    assert f"{f}:4: fields.plan: give a field either" in out
    # the model errors stop there; fix them and the cross-checks speak
    entity = entity.replace("name: {}", "name: {owner: crm}").replace(
        "{owner: billing, rule: latest}", "{owner: billing}"
    )
    (root / f).write_text(entity)
    code, out = check(root)
    assert (
        f"{f}:5: field 'phone' is owned by 'crm', which does not map it; add `phone: <path>` to systems.crm.fields"
        in out
    ), out
    assert f"{f}:6: field 'tier': owner 'nowhere' does not take part in entity 'customer'" in out
    assert f"{f}:9: match rule 2: unknown field 'mail'" in out
    assert f"{f}:12: system 'billing' maps 'colour', which is not a field of 'customer'" in out


def test_a_sync_flow_names_a_known_entity_and_writes_every_system_it_must(tmp_path):
    flows = {
        "crm_sync": sync_flow("crm", ["billing"]),
        "web_sync": {**sync_flow("web", ["crm", "billing"])},
        "typo": {**sync_flow("crm", ["crm", "billing"]), "sync": "customr"},
    }
    root = project(tmp_path, GOOD, flows)
    code, out = check(root)
    assert code != 0

    def at(flow: str, text: str) -> str:
        return f"flows/{flow}.yaml:{line_of(root, f'flows/{flow}.yaml', text)}: "

    assert at("crm_sync", "destinations:") + "sync flow 'crm_sync' has no destination for 'crm'" in out, out
    web = "a sync flow reads records of entity 'customer' from its trigger's system; 'web' does not take part"
    assert at("web_sync", "sync:") + web in out
    assert at("typo", "sync:") + "unknown entity 'customr'; did you mean 'customer'?" in out


def test_a_flow_that_writes_an_owned_field_into_its_owner_from_elsewhere_is_an_error(tmp_path):
    lead = {
        "purpose": "web leads to billing",
        "owner": "web",
        "trigger": {"webhook": {"system": "web"}},
        "destinations": [
            {"name": "fine", "system": "billing", "path": "/c", "body": {"mail": "email", "tel": "phone"}},
            {"name": "bad", "system": "billing", "path": "/c", "body": {"mail": "email", "plan": "'pro'"}},
        ],
    }
    root = project(tmp_path, GOOD, {"lead": lead, "crm_sync": sync_flow("crm", ["crm", "billing"])})
    code, out = check(root)
    assert code != 0
    line = line_of(root, "flows/lead.yaml", "name: bad")
    assert (
        f"flows/lead.yaml:{line}: destination 'bad' writes 'plan' into 'billing', which owns customer.plan; "
        "a flow from web must not overwrite it" in out
    ), out
    assert "'fine'" not in out
