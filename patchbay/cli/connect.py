"""`patchbay connect SYSTEM`: start an OAuth2 authorization-code grant; the hub's callback finishes it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from patchbay.cli.main import EXIT_CONFIG, EXIT_PROBLEMS, _echo_json, _load, json_option, main, project_option
from patchbay.errors import PatchbayError


@main.command("connect")
@click.argument("system")
@project_option
@json_option
def connect(system: str, project_dir: Path, as_json: bool) -> None:
    """Print the URL that grants Patchbay access to SYSTEM (an http system with
    `auth: {scheme: oauth2_authorization_code}`). Open it in a browser within 10 minutes; the provider
    sends you back to the hub's /oauth/callback (the hub must be running), which stores the tokens in
    the vault. Then resume destinations paused for lack of a grant."""
    from patchbay.security import oauth2
    from patchbay.security.project import require_vault

    project, _ = _load(project_dir, check_secrets=False)
    spec = project.systems.get(system)
    if spec is None:
        names = ", ".join(sorted(project.systems)) or "none"
        click.echo(f"connect: no system {system!r} in this project (systems: {names})", err=True)
        sys.exit(EXIT_PROBLEMS)
    auth = getattr(spec.config, "auth", None)
    if auth is None or getattr(auth, "scheme", None) != oauth2.AUTHORIZATION_CODE:
        click.echo(
            f"connect: system {system} ({spec.file}:{spec.line}) does not use "
            f"`auth: {{scheme: {oauth2.AUTHORIZATION_CODE}}}`; nothing to connect",
            err=True,
        )
        sys.exit(EXIT_PROBLEMS)
    try:
        vault = require_vault(project_dir)
        url = oauth2.begin(vault, system, auth)
    except PatchbayError as exc:
        click.echo(f"connect: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    minutes = f"{oauth2.PENDING_TTL_S / 60:g}"
    if as_json:
        _echo_json(
            {
                "system": system,
                "url": url,
                "redirect_uri": auth.redirect_uri,
                "expires_in_s": oauth2.PENDING_TTL_S,
            }
        )
        return
    click.echo(f"Open this URL within {minutes} minutes to grant Patchbay access to {system}:\n")
    click.echo(url)
    click.echo(
        f"\nThe provider then sends the browser to {auth.redirect_uri}; the hub must be running there."
    )
