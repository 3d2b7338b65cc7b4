"""`patchbay contract learn|check FLOW`: pin a flow's input shape from its traffic, and check traffic against it."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson

from patchbay.cli.main import (
    EXIT_CONFIG,
    EXIT_PROBLEMS,
    _echo_json,
    json_option,
    main,
    plural,
    project_option,
)
from patchbay.cli.test import load_offline, shown


def recent_events(project: Any, flow: str, limit: int) -> list[tuple[str, float, Any]]:
    """The flow's recent events as received: values stored encrypted (`encrypt_sensitive`) are opened
    with the project's field key, so that their types are the ones the sender sent."""
    from patchbay.cli.main import _store
    from patchbay.engine.pipeline import Pipeline
    from patchbay.security.fields import MARKER, FieldError

    rows = _store(project.root).run(lambda s: s.recent_payloads(flow, limit))
    pipeline = None
    out = []
    for event_id, at, raw in rows:
        if MARKER.encode() in raw:
            if pipeline is None:
                from patchbay.engine.hub import field_cipher

                pipeline = Pipeline(project.flows[flow], {}, field_cipher(project))
            try:
                out.append((event_id, at, pipeline.load_payload(raw)))
            except FieldError as exc:
                click.echo(f"skipped {event_id}: {exc}", err=True)
            continue
        out.append((event_id, at, orjson.loads(raw)))
    return out


@main.group()
def contract() -> None:
    """A flow's input contract (flows/<flow>.contract.yaml): the shape its events have, pinned in git;
    every event is checked against it, and drift is shown in the run, the log and the metrics."""


@contract.command("learn")
@click.argument("flow")
@project_option
@click.option(
    "--limit", type=int, default=1000, show_default=True, help="Learn from this many recent events."
)
@click.option("--force", is_flag=True, help="Replace an existing contract (to accept a change).")
def contract_learn(flow: str, project_dir: Path, limit: int, force: bool) -> None:
    """Write FLOW's contract from the shape of its recent events in the store."""
    from patchbay.contracts import contract_path, learn

    project = load_offline(project_dir)
    if flow not in project.flows:
        click.echo(f"contract: no flow {flow!r}; flows: {', '.join(sorted(project.flows))}", err=True)
        sys.exit(EXIT_CONFIG)
    path = contract_path(project.root, flow)
    if path.exists() and not force:
        click.echo(
            f"contract: {shown(path)} exists; pass --force to replace it with what traffic shows", err=True
        )
        sys.exit(EXIT_CONFIG)
    rows = recent_events(project, flow, limit)
    if not rows:
        click.echo(
            f"contract: flow {flow} has no events yet to learn from; write the contract by hand", err=True
        )
        sys.exit(EXIT_PROBLEMS)
    learned = learn(flow, [r[2] for r in rows])
    first, last = (
        datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M") for t in (rows[-1][1], rows[0][1])
    )
    note = f"Learned from {plural(len(rows), 'event')} received {first} to {last} UTC."
    path.write_text(learned.dump(note), encoding="utf-8")
    click.echo(
        f"wrote {shown(path)}: {plural(len(learned.fields), 'field')} from {plural(len(rows), 'event')}"
    )


@contract.command("check")
@click.argument("flow")
@project_option
@click.option("--limit", type=int, default=1000, show_default=True, help="Check this many recent events.")
@json_option
def contract_check(flow: str, project_dir: Path, limit: int, as_json: bool) -> None:
    """Check FLOW's recent events against its contract: each drift with how often and example runs.
    Exit 0 when they conform, 1 on drift."""
    project = load_offline(project_dir)
    spec = project.flows.get(flow)
    if spec is None or spec.contract is None:
        what = f"flow {flow!r} has no contract" if spec else f"no flow {flow!r}"
        click.echo(f"contract: {what}; pin one with `patchbay contract learn {flow}`", err=True)
        sys.exit(EXIT_CONFIG)
    rows = recent_events(project, flow, limit)
    found: dict[str, list[str]] = {}
    for event_id, _, payload in rows:
        for d in spec.contract.check(payload):
            found.setdefault(str(d), []).append(event_id)
    report: list[dict[str, Any]] = [
        {"drift": k, "events": len(v), "examples": v[:3]} for k, v in found.items()
    ]
    if as_json:
        _echo_json(report)
    elif not report:
        click.echo(f"ok: the last {plural(len(rows), 'event')} of {flow} conform to {spec.contract.file}")
    else:
        click.echo(
            f"drift in flow {flow} ({plural(len(rows), 'event')} checked against {spec.contract.file}):"
        )
        for r in report:
            click.echo(f"  {r['drift']}  in {plural(r['events'], 'event')}, e.g. {', '.join(r['examples'])}")
        click.echo(
            "See a run with `patchbay runs show ID`. If the change is expected, re-pin it with "
            f"`patchbay contract learn {flow} --force` (or edit the file)."
        )
    sys.exit(EXIT_PROBLEMS if report else 0)
