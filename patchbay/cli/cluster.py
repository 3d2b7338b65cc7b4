"""`patchbay cluster`: the hub's processes on the project's store: roles, heartbeat, claims held."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from patchbay.cli.main import (
    EXIT_CONFIG,
    EXIT_PROBLEMS,
    EXIT_STORE,
    _echo_json,
    _store,
    json_option,
    main,
    plural,
    project_option,
)


@main.command()
@project_option
@json_option
@click.option(
    "--remote",
    is_flag=True,
    help="Ask a running hub (GET /api/v1/cluster, a token with flows:read in $PATCHBAY_TOKEN) instead of"
    " reading the store.",
)
@click.option("--url", help="With --remote: the hub's base URL (default from patchbay.yaml).")
def cluster(project_dir: Path, as_json: bool, remote: bool, url: str | None) -> None:
    """List the hub's processes (nodes): roles, last heartbeat, claims held; lost ones exit 1."""
    if remote:
        view = _remote_view(project_dir, url)
    else:
        from patchbay.engine.roles import cluster_view

        now = time.time()
        store = _store(project_dir)
        view = cluster_view(store.run(lambda s: s.nodes(now)), now, store.run(lambda s: s.leases()))
    if as_json:
        _echo_json(view)
    else:
        _print(view)
    if any(n["status"] == "lost" for n in view["nodes"]):
        sys.exit(EXIT_PROBLEMS)


def _remote_view(project_dir: Path, url: str | None) -> dict[str, Any]:
    from patchbay.cli.remote import _call, remote_hub

    base, token = remote_hub(project_dir, url, "cluster", ("flows:read",), "ops")
    status, view = _call(base, token, "GET", "/api/v1/cluster", command="cluster")
    if status != 200:
        click.echo(f"cluster: {view.get('message', view) if isinstance(view, dict) else view}", err=True)
        sys.exit(EXIT_STORE if status >= 500 else EXIT_CONFIG)
    return dict(view)


def _print(view: dict[str, Any]) -> None:
    nodes = view["nodes"]
    if not nodes:
        click.echo("no nodes yet: start the hub with `patchbay serve`")
        return
    rows = [
        (
            n["id"],
            ",".join(n["roles"]),
            n["status"],
            f"{n['heartbeat_age_s']:.0f}s ago",
            str(n["claims"]),
            ",".join(n["leases"]) or "-",
            f"{n['host']}:{n['port']}" if n["port"] else n["host"],
            n["version"],
        )
        for n in nodes
    ]
    head = ("NODE", "ROLES", "STATUS", "HEARTBEAT", "CLAIMS", "LEASES", "ADDRESS", "VERSION")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    up = sum(n["status"] == "up" for n in nodes)
    lost = [n["id"] for n in nodes if n["status"] == "lost"]
    line = f"{plural(up, 'node')} up"
    if lost:
        line += (
            f"; lost (no heartbeat for {view['lost_after_s']:.0f}s): {', '.join(lost)}: check that process and"
            " its machine; its claimed deliveries go to another worker once their lease runs out"
        )
    click.echo(line)
