"""`patchbay run FLOW --remote`: the running hub runs it (POST /api/v1/flows/FLOW/runs); follow it to the end."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from patchbay.cli.main import EXIT_CONFIG, EXIT_PROBLEMS, EXIT_STORE, _echo_json
from patchbay.cli.progress import ProgressLine
from patchbay.engine.batch import Progress

TOKEN_ENV = "PATCHBAY_TOKEN"


def remote_hub(
    project_dir: Path, url: str | None, command: str, scopes: tuple[str, ...], token_name: str
) -> tuple[str, str]:
    """The running hub's base URL and the API token (`$PATCHBAY_TOKEN`) a `--remote` command asks it with;
    without a token: what to create, and exit."""
    from patchbay.cli.main import _load

    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        flags = " ".join(f"--scope {s}" for s in scopes)
        click.echo(
            f"{command}: --remote needs an API token in ${TOKEN_ENV} (scope{'s' if len(scopes) > 1 else ''}"
            f" {' and '.join(scopes)}): `patchbay tokens create {token_name} {flags}`",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    project, _ = _load(project_dir)
    return (url or f"http://{project.settings.host}:{project.settings.port}").rstrip("/"), token


def _call(
    base: str, token: str, method: str, path: str, body: Any = None, *, command: str = "run"
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, {"error": "http_error", "message": f"HTTP {exc.code}"}
    except urllib.error.URLError as exc:
        click.echo(
            f"{command}: the hub at {base} did not answer ({exc.reason}); is `patchbay serve` running?",
            err=True,
        )
        sys.exit(EXIT_STORE)


def run_remote(
    project_dir: Path, flow: str, data: Any, accept_schema: bool, url: str | None, as_json: bool
) -> None:
    """`data`: the event (parsed JSON) for an event flow, None for a batch flow."""
    base, token = remote_hub(project_dir, url, "run", ("runs:start", "runs:read"), "runner")
    body: dict[str, Any] = {"accept_schema": True} if accept_schema else {}
    if data is not None:
        body["data"] = data
    status, started = _call(base, token, "POST", f"/api/v1/flows/{flow}/runs", body)
    if status != 202:
        click.echo(f"run: {started.get('message', started)}", err=True)
        sys.exit(EXIT_PROBLEMS if status == 409 else EXIT_CONFIG)
    run_id = started["run_id"]
    view = started
    if started["kind"] == "batch":
        line = ProgressLine()
        try:
            while view["status"] == "running":
                p = view.get("progress")
                if p:
                    line(Progress(p["read"], p["total"], p["written"], p["elapsed_s"]))
                time.sleep(0.5)
                status, view = _call(base, token, "GET", f"/api/v1/flows/{flow}/runs/{run_id}")
                if status != 200:
                    click.echo(f"run: following run {run_id}: {view.get('message', view)}", err=True)
                    sys.exit(EXIT_PROBLEMS)
        finally:
            line.done()
    if as_json:
        _echo_json(view)
    elif view["kind"] == "batch":
        rep = view["report"] or {}
        click.echo(
            f"{flow}: run {run_id} {view['status']}: read {rep.get('read', 0)}, inserted {rep.get('inserted', 0)},"
            f" updated {rep.get('updated', 0)}, deleted {rep.get('deleted', 0)},"
            f" quarantined {rep.get('quarantined', 0)} in {rep.get('duration_s', 0):.1f}s"
        )
        if rep.get("error"):
            click.echo(f"  {rep['error']}", err=True)
    else:
        click.echo(
            f"{flow}: event {run_id} stored ({view['status']}); `patchbay runs show {run_id}` follows it"
        )
    if view["kind"] == "batch" and view["status"] != "ok":
        sys.exit(EXIT_PROBLEMS)
