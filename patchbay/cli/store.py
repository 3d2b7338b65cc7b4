"""`patchbay store check`: is the store file whole and readable; `patchbay store prune`: retention now."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from patchbay.cli.main import EXIT_PROBLEMS, EXIT_STORE, _echo_json, json_option, main, project_option


@main.group()
def store() -> None:
    """The store file: check it for damage, apply the history retention."""


@store.command("check")
@project_option
@click.option("--quick", is_flag=True, help="SQLite's quick_check (faster; skips index contents).")
@json_option
def store_check(project_dir: Path, quick: bool, as_json: bool) -> None:
    """Check the store for damage (SQLite integrity_check) and its schema version; changes nothing.

    Exit 0 when whole, 1 when damaged or not a Patchbay store, 3 when there is no store.
    """
    from patchbay.security.project import store_path_of
    from patchbay.store.sqlite import RESTORE, check_file

    path = store_path_of(project_dir)
    report = check_file(path, quick=quick)
    missing = not path.exists()
    if as_json:
        _echo_json(report)
    elif report["ok"]:
        click.echo(
            f"store {path}: ok (schema {report['schema_version']}, {report['runs']:,} runs,"
            f" {report['size_bytes'] / 1e6:.1f} MB; {report['check']} found no problem"
            f" in {report['seconds']:.2f} s)"
        )
    elif missing:
        click.echo(f"no store at {path}: the hub creates it on its first start", err=True)
    else:
        click.echo(f"store {path}: DAMAGED or not a Patchbay store ({report['check']}):")
        for p in report["problems"]:
            click.echo(f"  {p}")
        click.echo(f"Stop the hub, then {RESTORE}.")
    if not report["ok"]:
        sys.exit(EXIT_STORE if missing else EXIT_PROBLEMS)


@store.command("prune")
@project_option
@json_option
def store_prune(project_dir: Path, as_json: bool) -> None:
    """Apply each flow's `history` retention now: remove finished runs past `keep` (and failures past
    `keep_failures`), compress those past `compress_after`. The serving hub does this every 10 minutes."""
    from patchbay.cli.main import _load, _store
    from patchbay.engine.retention import Retention

    project, _ = _load(project_dir, check_secrets=False)
    blocking = _store(project_dir)

    async def sweep(store: Any) -> Any:
        return await Retention(store, lambda: project.flows.values(), pause_s=0.0).sweep()

    report = blocking.run(sweep)
    if as_json:
        _echo_json({"removed": report.removed, "compressed": report.compressed})
        return
    if not report.removed and not report.compressed:
        click.echo("history: nothing is due for removal or compression")
    for flow in sorted(set(report.removed) | set(report.compressed)):
        click.echo(
            f"  {flow}: removed {report.removed.get(flow, 0):,} runs, compressed {report.compressed.get(flow, 0):,}"
        )


@store.command("migrate")
@project_option
@json_option
def store_migrate(project_dir: Path, as_json: bool) -> None:
    """Apply the schema migrations the store lacks (the hub applies them on start too); changes nothing
    when it is up to date. Exit 1 when the store cannot be used (newer than this Patchbay, damaged)."""
    from patchbay.errors import PatchbayError
    from patchbay.security.project import store_location_of
    from patchbay.store.opening import migrate

    location = store_location_of(project_dir)
    try:
        before, after, applied = migrate(location)
    except PatchbayError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_PROBLEMS)
    shown = redact_location(location)
    if as_json:
        _echo_json({"store": shown, "from": before, "to": after, "applied": applied})
        return
    if not applied:
        click.echo(f"store {shown}: schema {after}, up to date")
        return
    click.echo(f"store {shown}: schema {before} -> {after}")
    for line in applied:
        click.echo(f"  applied {line}")


@store.command("copy")
@project_option
@click.option("--to", "target", required=True, help="The empty PostgreSQL store: postgresql://USER@HOST/DB.")
@json_option
def store_copy(project_dir: Path, target: str, as_json: bool) -> None:
    """Copy the project's SQLite store (every table: runs, deliveries, attempts, cursors, schedules,
    tokens, audit, vault rows…) into an empty PostgreSQL store, verified by row counts, all or nothing.
    Stop the hub first. Then set `store:` in patchbay.yaml to the URL."""
    from patchbay.config.models import store_location
    from patchbay.errors import PatchbayError
    from patchbay.security.project import store_path_of
    from patchbay.store.copy import copy_to_postgres

    try:
        url = store_location(target)
    except ValueError as exc:
        click.echo(f"--to: {exc}", err=True)
        sys.exit(EXIT_PROBLEMS)
    if not url.startswith(("postgresql://", "postgres://")):
        click.echo("--to: give a postgresql://USER@HOST/DATABASE URL", err=True)
        sys.exit(EXIT_PROBLEMS)
    src = store_path_of(project_dir)

    def progress(table: str, done: int, total: int) -> None:
        if not as_json:
            click.echo(f"\rcopying {table}: {done:,}/{total:,} rows", nl=done >= total, err=True)

    try:
        counts = copy_to_postgres(src, url, progress)
    except PatchbayError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_PROBLEMS)
    shown = redact_location(url)
    if as_json:
        _echo_json({"from": str(src), "to": shown, "rows": counts})
        return
    click.echo(
        f"copied {sum(counts.values()):,} rows in {len(counts)} tables from {src} to {shown}; verified by counts"
    )
    click.echo(f"now set `store: {shown}` in patchbay.yaml (its password from PGPASSWORD)")


def redact_location(location: str | Path) -> str:
    from patchbay.store.postgres.store import redacted

    return redacted(str(location))
