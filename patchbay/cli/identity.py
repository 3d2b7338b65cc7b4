"""`patchbay identities` (the identity map, its review queue), `patchbay conflicts`, `patchbay sync`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from patchbay.cli.main import (
    EXIT_CONFIG,
    EXIT_PROBLEMS,
    EXIT_STORE,
    _cli_actor,
    _echo_json,
    _load,
    _store,
    _ts,
    json_option,
    main,
    project_option,
)
from patchbay.errors import PatchbayError


def _entity(project: Any, name: str) -> Any:
    ent = project.entities.get(name)
    if ent is None:
        click.echo(
            f"no entity {name!r} (known: {', '.join(sorted(project.entities)) or 'none; add entities/<name>.yaml'})",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    return ent


def _key_of(ent: Any, text: str) -> list[str]:
    """What to look `text` up as: itself, and its normalised form under each match rule."""
    from patchbay.engine.identity import normalize

    forms = [text]
    for rule in ent.doc.match:
        k = normalize(text, rule.normalize)
        if k is not None and k not in forms:
            forms.append(k)
    return forms


def _search(store: Any, entity: str, text: str) -> list[Any]:
    return list(store.run(lambda s: s.search_identities(entity, text)))


def _identity_lines(ent: Any, ident: Any) -> list[str]:
    lines = [f"identity {ident.id} ({ident.entity}, {ident.status}; updated {_ts(ident.updated_at)})"]
    for system, view in sorted(ident.systems.items()):
        pending = view.get("pending") or {}
        state = (
            "deleted there"
            if view.get("deleted_at")
            else f"created {_ts(pending.get('at') or 0)}, not linked yet: overdue, see the log"
            if pending.get("overdue")
            else "create in flight"
            if pending
            else ""
        )
        lines.append(f"  {system}: id {view.get('id') or '-'}" + (f"  ({state})" if state else ""))
    lines.append(
        "  field          agreed value            owner/rule      " + "  ".join(sorted(ident.systems))
    )
    for f, rule in ent.fields.items():
        g = ident.golden.get(f)
        agreed = "-" if g is None else json.dumps(g["value"], default=str)
        how = f"owner {rule.owner}" if rule.owner else f"rule {rule.rule}"
        per = []
        for system in sorted(ident.systems):
            s = ident.systems[system]["seen"].get(f)
            per.append("-" if s is None else f"{json.dumps(s['value'], default=str)} @{_ts(s['at'])}")
        held = " (held: conflict open)" if g and g.get("hold") else ""
        lines.append(f"  {f:<14} {agreed:<23} {how:<15} " + "  ".join(per) + held)
    return lines


# ------------------------------------------------------------------------- identities
@main.group()
def identities() -> None:
    """The identity map: which record in each system is the same entity, and what each system says."""


@identities.command("show")
@click.argument("entity")
@click.argument("key")
@project_option
@json_option
def identities_show(entity: str, key: str, project_dir: Path, as_json: bool) -> None:
    """An entity by KEY (a match value such as an email, a record id or an identity id): its id in every
    system and each field's value per system, its owner, when seen."""
    project, _ = _load(project_dir, check_secrets=False)
    ent = _entity(project, entity)
    store = _store(project_dir)
    found: dict[str, Any] = {}
    for form in _key_of(ent, key):
        for ident in _search(store, entity, form):
            found.setdefault(ident.id, ident)
    if as_json:
        _echo_json([i.as_dict() for i in found.values()])
    else:
        for ident in found.values():
            click.echo("\n".join(_identity_lines(ent, ident)))
        if not found:
            click.echo(f"no {entity} matches {key!r}")
    sys.exit(0 if found else EXIT_PROBLEMS)


@identities.command("search")
@click.argument("text")
@click.option("--entity", help="Only this entity.")
@project_option
@json_option
def identities_search(text: str, entity: str | None, project_dir: Path, as_json: bool) -> None:
    """Identities whose match key, record id or identity id is TEXT (an email is compared normalised)."""
    project, _ = _load(project_dir, check_secrets=False)
    store = _store(project_dir)
    found: dict[str, Any] = {}
    ents = [_entity(project, entity)] if entity else list(project.entities.values())
    for ent in ents:
        for form in _key_of(ent, text):
            for ident in _search(store, ent.name, form):
                found.setdefault(ident.id, ident)
    if as_json:
        _echo_json([i.as_dict() for i in found.values()])
    else:
        for ident in found.values():
            ids = ", ".join(f"{s}={v.get('id') or '-'}" for s, v in sorted(ident.systems.items()))
            click.echo(f"{ident.id}  {ident.entity}  {ids}")
        click.echo(f"{len(found)} found")
    sys.exit(0 if found else EXIT_PROBLEMS)


@identities.command("review")
@click.argument("review_id", type=int, required=False)
@click.option("--entity", help="Only this entity.")
@click.option("--link", "link_to", help="Decide: the record is this identity.")
@click.option("--new", is_flag=True, help="Decide: the record is a new identity.")
@click.option("--dismiss", is_flag=True, help="Decide: leave the record unlinked.")
@project_option
@json_option
def identities_review(
    review_id: int | None,
    entity: str | None,
    link_to: str | None,
    new: bool,
    dismiss: bool,
    project_dir: Path,
    as_json: bool,
) -> None:
    """The review queue: records the hub would not link by itself (several matches, a weak rule, a second
    record in one system). With REVIEW_ID and --link/--new/--dismiss, decide one."""
    if review_id is None:
        store = _store(project_dir)
        items = store.run(lambda s: s.reviews(entity, "open"))
        if as_json:
            _echo_json(items)
            return
        for r in items:
            click.echo(
                f"#{r['id']} {r['entity']} {r['system']} record {r['record_id']}: {r['reason']}; "
                f"candidates {', '.join(r['candidates'])}; values {json.dumps(r['values'], default=str)}"
            )
        click.echo(
            f"{len(items)} waiting; decide with `patchbay identities review ID --link IDENTITY|--new|--dismiss`"
        )
        return
    result = _decide(project_dir, "review", review_id, link_to=link_to, new=new, dismiss=dismiss)
    _echo_json(result) if as_json else click.echo(f"review #{review_id}: {result['decision']}")


# ------------------------------------------------------------------------- conflicts
@main.group()
def conflicts() -> None:
    """Conflicts: a non-owner changed an owned field, or two systems changed a shared field."""


@conflicts.command("list")
@click.option("--entity", help="Only this entity.")
@click.option("--status", type=click.Choice(["open", "settled", "resolved"]))
@click.option("--limit", type=int, default=100, show_default=True)
@project_option
@json_option
def conflicts_list(
    entity: str | None, status: str | None, limit: int, project_dir: Path, as_json: bool
) -> None:
    """Conflicts, newest first: both values, the winner and why."""
    store = _store(project_dir)
    items = store.run(lambda s: s.conflicts(entity, status, limit))
    if as_json:
        _echo_json(items)
        return
    for c in items:
        vals = "; ".join(f"{v['system']}={json.dumps(v['value'], default=str)}" for v in c["values"])
        won = f"winner {c['winner']}" if c["winner"] else "waits for a person"
        click.echo(
            f"#{c['id']} {_ts(c['at'])} {c['entity']} {c['identity_id']} {c['field']} [{c['status']}]: {vals}; {won}"
        )
    click.echo(f"{len(items)} conflicts")


@conflicts.command("show")
@click.argument("conflict_id", type=int)
@project_option
def conflicts_show(conflict_id: int, project_dir: Path) -> None:
    """One conflict in full."""
    store = _store(project_dir)
    c = store.run(lambda s: s.conflict(conflict_id))
    if c is None:
        click.echo(f"no conflict {conflict_id}", err=True)
        sys.exit(EXIT_PROBLEMS)
    _echo_json(c)


@conflicts.command("resolve")
@click.argument("conflict_id", type=int)
@click.option("--value", "value_json", help='The value to keep, as JSON ("Ada", 42, null).')
@click.option("--take", help="Keep the value this system had.")
@project_option
@json_option
def conflicts_resolve(
    conflict_id: int, value_json: str | None, take: str | None, project_dir: Path, as_json: bool
) -> None:
    """Settle a conflict: the value is written to every system that differs, its owner too (audited)."""
    kw: dict[str, Any] = {"take": take}
    if value_json is not None:
        try:
            kw["value"] = json.loads(value_json)
        except json.JSONDecodeError as exc:
            click.echo(f"--value: not JSON ({exc}); quote text: --value '\"Ada\"'", err=True)
            sys.exit(EXIT_CONFIG)
    result = _decide(project_dir, "conflict", conflict_id, **kw)
    if as_json:
        _echo_json(result)
    else:
        click.echo(
            f"conflict #{conflict_id} resolved: {json.dumps(result['value'], default=str)}; {len(result['runs'])} run(s) write it"
        )


def _decide(project_dir: Path, what: str, item_id: int, **kw: Any) -> dict[str, Any]:
    """Run a decision through the entity's sync (the hub's running workers deliver its writes)."""
    from patchbay.engine.hub import build_sinks
    from patchbay.engine.pipeline import Pipeline
    from patchbay.engine.sync import EntitySync, sync_flows
    from patchbay.store.sqlite import StoreLocked

    project, resolver = _load(project_dir)
    store = _store(project_dir)
    try:  # the hub applies records under the entity's lock: a decision beside it could be overwritten
        store.store.lock()
    except StoreLocked:
        click.echo(
            f"the hub is running: decide through it instead, with the console's Identities page or "
            f"`POST /api/v1/{what}s/{item_id}/resolve` (scope identities:write)",
            err=True,
        )
        sys.exit(EXIT_STORE)
    item = store.run(lambda s: s.conflict(item_id) if what == "conflict" else s.review(item_id))
    if item is None:
        click.echo(f"no {what} {item_id}", err=True)
        sys.exit(EXIT_PROBLEMS)
    ent = _entity(project, item["entity"])
    flows = [
        (f, Pipeline(f, build_sinks(f, project, resolver, None))) for f in sync_flows(project.flows, ent.name)
    ]
    sync = EntitySync(ent, store.store)
    try:
        if what == "conflict":
            return store.run(lambda s: sync.resolve_conflict(item_id, flows, _cli_actor(), **kw))
        return store.run(lambda s: sync.resolve_review(item_id, flows, _cli_actor(), **kw))
    except (LookupError, ValueError) as exc:
        click.echo(f"{what} {item_id}: {exc}", err=True)
        sys.exit(EXIT_PROBLEMS)


# ------------------------------------------------------------------------- sync
@main.group("sync")
def sync_group() -> None:
    """An entity's sync between systems: preview the first run, run it."""


@sync_group.command("preview")
@click.argument("entity")
@project_option
@json_option
def sync_preview(entity: str, project_dir: Path, as_json: bool) -> None:
    """Read every polled system of ENTITY and say what a first run would do (nothing is written):
    would link N, create M, conflicts K."""
    preview = _first_run(project_dir, entity, dry_run=True)
    _echo_json(preview.as_dict()) if as_json else click.echo(preview.summary())


@sync_group.command("init")
@click.argument("entity")
@project_option
@json_option
def sync_init(entity: str, project_dir: Path, as_json: bool) -> None:
    """Run the first run now (the hub does it at start for an entity with an empty identity map): link
    what exists on several sides, then queue the creates. The hub must be stopped."""
    preview = _first_run(project_dir, entity, dry_run=False)
    _echo_json(preview.as_dict()) if as_json else click.echo(preview.summary().replace("would ", ""))


def _first_run(project_dir: Path, entity: str, *, dry_run: bool) -> Any:
    from patchbay import registry
    from patchbay.engine.hub import build_sinks, system_resources
    from patchbay.engine.pipeline import Pipeline
    from patchbay.engine.sync import EntitySync, first_run, sync_flows
    from patchbay.store.blocking import BlockingStore
    from patchbay.store.sqlite import StoreLocked

    project, resolver = _load(project_dir)
    ent = _entity(project, entity)
    store = BlockingStore(project.store_path)  # a preview may come before the hub ever ran
    click.get_current_context().call_on_close(store.close)
    if not dry_run:
        try:
            store.store.lock()
        except StoreLocked as exc:
            click.echo(f"sync init: {exc}", err=True)
            sys.exit(EXIT_STORE)

    def source_of(f: Any) -> Any:
        found = registry.connector_for(f.source.kind, "source")
        assert found is not None
        system = project.systems[f.source.system]
        return found[0](system.config, f.source.config, system_resources(project, resolver, system, f.name))

    def pipeline_of(f: Any) -> Pipeline:
        return Pipeline(f, build_sinks(f, project, resolver, None))

    flows = sync_flows(project.flows, entity)
    sync = EntitySync(ent, store.store)
    try:
        return store.run(lambda s: first_run(sync, flows, pipeline_of, source_of, dry_run=dry_run))
    except PatchbayError as exc:
        click.echo(f"sync {'preview' if dry_run else 'init'} {entity}: {exc}", err=True)
        sys.exit(EXIT_PROBLEMS)
