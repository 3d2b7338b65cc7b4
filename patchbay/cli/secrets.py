"""`patchbay secrets`: the encrypted vault. Values come from stdin or a hidden prompt, never from argv."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from patchbay.cli.main import EXIT_CONFIG, EXIT_PROBLEMS, _echo_json, json_option, main, project_option
from patchbay.errors import PatchbayError


def _usage(root: Path) -> dict[str, list[str]]:
    """Secret name -> flows that use it (through the systems they touch)."""
    from patchbay.config.project import load_project

    project, _ = load_project(root)
    used: dict[str, list[str]] = {}
    if project is None:
        return used
    for f in project.flows.values():
        for ref in f.secret_refs(project.systems):
            if ref.secret:
                used.setdefault(ref.secret, [])
                if f.name not in used[ref.secret]:
                    used[ref.secret].append(f.name)
    return used


def _read_value(name: str) -> str:
    if not sys.stdin.isatty():
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
    else:
        value = click.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True)
    if not value:
        raise click.UsageError("the value is empty; nothing was stored")
    return value


def _vault(root: Path, create: bool = False):  # type: ignore[no-untyped-def]
    from patchbay.security.project import require_vault

    try:
        return require_vault(root, create_key=create)
    except PatchbayError as exc:
        click.echo(f"secrets: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@main.group()
def secrets() -> None:
    """Credentials, encrypted at rest under the project's master key."""


@secrets.command("init")
@project_option
def secrets_init(project_dir: Path) -> None:
    """Create the master key (.patchbay/master.key, mode 0600) if there is none."""
    v = _vault(project_dir, create=True)
    click.echo(f"master key {v.keys[0].id} ready; keep .patchbay/ out of git and back the key up safely")


@secrets.command("set")
@click.argument("name")
@project_option
def secrets_set(name: str, project_dir: Path) -> None:
    """Store NAME; the value is read from stdin (or a hidden prompt)."""
    v = _vault(project_dir, create=True)
    existed = v.get(name) is not None
    try:
        v.set(name, _read_value(name))
    except ValueError as exc:
        click.echo(f"secrets set: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    _audit(project_dir, "secret.rotate" if existed else "secret.set", name)
    click.echo(
        f"{'rotated' if existed else 'stored'} {name}; restart the hub (or it picks it up at its next start)"
    )


@secrets.command("rotate")
@click.argument("name")
@project_option
def secrets_rotate(name: str, project_dir: Path) -> None:
    """Replace an existing secret's value (read from stdin or a hidden prompt)."""
    v = _vault(project_dir)
    if v.get(name) is None:
        click.echo(
            f"secrets rotate: no secret {name!r}; create it with `patchbay secrets set {name}`", err=True
        )
        sys.exit(EXIT_PROBLEMS)
    v.set(name, _read_value(name))
    _audit(project_dir, "secret.rotate", name)
    click.echo(f"rotated {name}")


@secrets.command("list")
@project_option
@json_option
def secrets_list(project_dir: Path, as_json: bool) -> None:
    """Names, the flows using them, created and rotated dates. Never values."""
    v = _vault(project_dir)
    used = _usage(project_dir)
    rows = [
        {**info.__dict__, "used_by": used.get(info.name, [])}
        if hasattr(info, "__dict__")
        else {
            "name": info.name,
            "created_at": info.created_at,
            "rotated_at": info.rotated_at,
            "version": info.version,
            "key_id": info.key_id,
            "used_by": used.get(info.name, []),
        }
        for info in v.list()
    ]
    missing = sorted(set(used) - {r["name"] for r in rows})
    if as_json:
        _echo_json({"secrets": rows, "missing": missing})
        return

    def ts(t: float | None) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M") if t else "-"

    click.echo(f"{'NAME':<28} {'CREATED':<17} {'ROTATED':<17} {'VER':<4} {'KEY':<9} USED BY")
    for r in rows:
        click.echo(
            f"{r['name']:<28} {ts(r['created_at']):<17} {ts(r['rotated_at']):<17} {r['version']:<4} "
            f"{r['key_id']:<9} {', '.join(r['used_by']) or '-'}"
        )
    for m in missing:
        click.echo(f"{m:<28} MISSING: used by {', '.join(used[m])}; set it with `patchbay secrets set {m}`")


@secrets.command("delete")
@click.argument("name")
@project_option
@click.option("--force", is_flag=True, help="Delete even though flows use it.")
def secrets_delete(name: str, project_dir: Path, force: bool) -> None:
    """Delete NAME; refused while a flow uses it, unless --force."""
    from patchbay.security.fields import KEY_SECRET

    v = _vault(project_dir)
    users = _usage(project_dir).get(name, [])
    if name == KEY_SECRET and not force:
        click.echo(
            f"secrets delete: {name} is the key of the sensitive fields encrypted at rest (encrypt_sensitive); "
            "without it every encrypted value in the store is lost. Pass --force only if none is left",
            err=True,
        )
        sys.exit(EXIT_PROBLEMS)
    if users and not force:
        click.echo(
            f"secrets delete: {name} is used by {', '.join(users)}; change those flows or pass --force",
            err=True,
        )
        sys.exit(EXIT_PROBLEMS)
    if not v.delete(name):
        click.echo(f"no secret {name!r}", err=True)
        sys.exit(EXIT_PROBLEMS)
    _audit(project_dir, "secret.delete", name)
    click.echo(f"deleted {name}")


@secrets.command("rotate-master-key")
@project_option
def secrets_rotate_master(project_dir: Path) -> None:
    """Re-encrypt every secret under a new master key; the old one is kept as master.key.old."""
    from patchbay.security.vault import MasterKey

    v = _vault(project_dir)
    try:
        old, new = MasterKey.rotate_files(project_dir / ".patchbay", v)
    except PatchbayError as exc:
        click.echo(f"secrets rotate-master-key: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    _audit(project_dir, "master_key.rotate", f"{old.id}->{new.id}")
    click.echo(
        f"master key rotated {old.id} -> {new.id}; restart running hubs, then delete .patchbay/master.key.old"
    )


def _audit(root: Path, action: str, target: str) -> None:
    from patchbay.security.project import store_location_of
    from patchbay.store.base import Actor
    from patchbay.store.blocking import BlockingStore

    with BlockingStore(store_location_of(root)) as store:
        store.run(lambda s: s.audit(action, target, Actor(os.environ.get("USER", "cli"), "cli")))
