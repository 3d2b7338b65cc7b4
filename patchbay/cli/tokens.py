"""`patchbay tokens` (scoped API tokens) and `patchbay audit` (who changed or replayed what)."""

from __future__ import annotations

import getpass
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from patchbay.cli.main import (
    EXIT_CONFIG,
    EXIT_PROBLEMS,
    _echo_json,
    _parse_time,
    json_option,
    main,
    project_option,
)
from patchbay.security.tokens import SCOPES

if TYPE_CHECKING:
    from patchbay.store.base import Actor
    from patchbay.store.blocking import BlockingStore


def _open(root: Path) -> BlockingStore:
    """The project's store; created if the hub has never run (tokens come first)."""
    from patchbay.security.project import store_location_of
    from patchbay.store.blocking import BlockingStore

    if not Path(root).is_dir():
        click.echo(f"no project folder {root}; create one with `patchbay init DIR`", err=True)
        sys.exit(EXIT_CONFIG)
    return BlockingStore(store_location_of(root))


def _actor() -> Actor:
    from patchbay.store.base import Actor

    return Actor(_who(), "cli")


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return "cli"


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M") if t else "-"


@main.group()
def tokens() -> None:
    """API tokens for the REST API and the console: scoped, expiring, revocable; stored hashed."""


@tokens.command("create")
@click.argument("name")
@project_option
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(list(SCOPES)),
    help="What the token may do; repeat for several. admin implies all.",
)
@click.option("--expires", help="Lifetime, e.g. 30d, 12h (default: never).")
@json_option
def tokens_create(
    name: str, project_dir: Path, scopes: tuple[str, ...], expires: str | None, as_json: bool
) -> None:
    """Create a token and print it ONCE; only its hash is stored."""
    from patchbay.config.durations import parse_duration
    from patchbay.security.tokens import create_token

    expires_at = None
    if expires is not None:
        try:
            seconds = parse_duration(expires)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--expires") from None
        if seconds < 60:
            raise click.BadParameter("a token lives at least 60s", param_hint="--expires")
        expires_at = time.time() + seconds
    with _open(project_dir) as store:
        try:
            text, info = store.run(lambda s: create_token(s, name, scopes, expires_at, _actor()))
        except ValueError as exc:
            click.echo(f"tokens create: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    if as_json:
        _echo_json({**info.as_dict(), "token": text})
        return
    click.echo(text)
    click.echo(
        f"token {info.id} ({info.name}) with {', '.join(info.scopes)}"
        + (f", expires {_ts(expires_at)} UTC" if expires_at else ", never expires")
        + ". It is shown only now: store it safely. Send it as `Authorization: Bearer <token>`.",
        err=True,
    )


@tokens.command("list")
@project_option
@click.option("--all", "all_", is_flag=True, help="Include revoked and expired tokens.")
@json_option
def tokens_list(project_dir: Path, all_: bool, as_json: bool) -> None:
    """Tokens: id, name, scopes, created, expires, last used. Never the tokens themselves."""
    with _open(project_dir) as store:
        rows = [t.as_dict() for t in store.run(lambda s: s.tokens(all_))]
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no tokens; create one with `patchbay tokens create NAME --scope runs:read`")
        return
    click.echo(
        f"{'ID':<13} {'NAME':<20} {'STATUS':<8} {'CREATED':<17} {'EXPIRES':<17} {'LAST USED':<17} SCOPES"
    )
    for r in rows:
        click.echo(
            f"{r['id']:<13} {r['name'][:20]:<20} {r['status']:<8} {_ts(r['created_at']):<17} "
            f"{_ts(r['expires_at']):<17} {_ts(r['last_used_at']):<17} {' '.join(r['scopes'])}"
        )


@tokens.command("revoke")
@click.argument("token_id")
@project_option
def tokens_revoke(token_id: str, project_dir: Path) -> None:
    """Revoke a token at once (by its id, as `tokens list` shows it)."""
    from patchbay.security.tokens import revoke_token

    with _open(project_dir) as store:
        info = store.run(lambda s: revoke_token(s, token_id, _actor()))
    if info is None:
        click.echo(f"no token {token_id!r}; see `patchbay tokens list --all`", err=True)
        sys.exit(EXIT_PROBLEMS)
    click.echo(f"revoked {info.id} ({info.name}); requests with it are refused from now on")


@main.command()
@project_option
@click.option("--since", help="From this time (ISO) or age (15m, 2h, 1d).")
@click.option("--until", help="Before this time (ISO) or age.")
@click.option(
    "--action",
    help="Exact action (replay, discard, resume, paused, cursor.reset, ...) or a "
    "prefix ending in '.' (secret., token.).",
)
@click.option("--actor", help="Part of the actor: a token id, a token name or a user.")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@json_option
def audit(
    project_dir: Path,
    since: str | None,
    until: str | None,
    action: str | None,
    actor: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The audit log, newest first: who changed or replayed what, when and from where."""
    from patchbay.security.project import store_location_of
    from patchbay.store.base import AuditFilter
    from patchbay.store.blocking import BlockingStore

    path = store_location_of(project_dir)
    if isinstance(path, Path) and not path.exists():
        click.echo(f"no store at {path} yet: nothing has been audited", err=True)
        sys.exit(EXIT_PROBLEMS)
    f = AuditFilter(_parse_time(since), _parse_time(until), action, actor, None, limit)
    with BlockingStore(path) as store:
        rows = store.run(lambda s: s.audit_log(f))
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no audit entries match")
        return
    click.echo(f"{'AT (UTC)':<20} {'ACTOR':<34} {'FROM':<16} {'ACTION':<16} TARGET")
    for r in rows:
        at = datetime.fromtimestamp(r["at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        detail = {
            k: v
            for k, v in r["detail"].items()
            if k not in ("token_id", "token_name") and v not in (None, {})
        }
        extra = "  " + " ".join(f"{k}={v}" for k, v in detail.items()) if detail else ""
        click.echo(
            f"{at:<20} {r['actor'][:34]:<34} {(r['origin'] or '-')[:16]:<16} {r['action']:<16} "
            f"{r['target']}{extra}"
        )
