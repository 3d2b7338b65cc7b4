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


def recent_answers(project: Any, flow: str, limit: int) -> tuple[dict[str, list[tuple[str, Any]]], int]:
    """The flow's recent successful answers by destination, as (event id, JSON body); and how many were
    skipped because their stored excerpt is not whole JSON (the store keeps the first 500 characters)."""
    from patchbay.cli.main import _store
    from patchbay.contracts import parse_answer

    rows = _store(project.root).run(lambda s: s.recent_answers(flow, limit))
    out: dict[str, list[tuple[str, Any]]] = {}
    skipped = 0
    for dest, event_id, _, text in rows:
        body = parse_answer(text)
        if body is None:
            skipped += 1 if text else 0
            continue
        out.setdefault(dest, []).append((event_id, body))
    return out, skipped


def _not_batch(project: Any, flow: str) -> None:
    spec = project.flows.get(flow)
    if spec is not None and spec.batch is not None:
        click.echo(
            f"contract: {flow} is a batch flow: its source's shape is its columns, compared with the last "
            "run's on every run (`batch.on_drift`); a change is drift in the run and the contract_drift alert",
            err=True,
        )
        sys.exit(EXIT_CONFIG)


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
    """Write FLOW's contract from the shape of its recent events in the store, and `responses:` from
    the recent successful answers of its destinations."""
    from patchbay.contracts import contract_path, learn

    project = load_offline(project_dir)
    if flow not in project.flows:
        click.echo(f"contract: no flow {flow!r}; flows: {', '.join(sorted(project.flows))}", err=True)
        sys.exit(EXIT_CONFIG)
    _not_batch(project, flow)
    path = contract_path(project.root, flow)
    if path.exists() and not force:
        click.echo(
            f"contract: {shown(path)} exists; pass --force to replace it with what traffic shows", err=True
        )
        sys.exit(EXIT_CONFIG)
    rows = recent_events(project, flow, limit)
    answers, skipped = recent_answers(project, flow, limit)
    if not rows and not answers:
        click.echo(
            f"contract: flow {flow} has no events yet to learn from; write the contract by hand", err=True
        )
        sys.exit(EXIT_PROBLEMS)
    learned = learn(flow, [r[2] for r in rows])
    learned.input_pinned = bool(rows)
    learned.responses = {d: learn(flow, [b for _, b in got]) for d, got in sorted(answers.items())}
    note = ""
    if rows:
        first, last = (
            datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M") for t in (rows[-1][1], rows[0][1])
        )
        note = f"Learned from {plural(len(rows), 'event')} received {first} to {last} UTC"
    if answers:
        n = sum(len(v) for v in answers.values())
        note += ("; " if note else "Learned ") + f"responses from {plural(n, 'answer')}"
    path.write_text(learned.dump(note + "."), encoding="utf-8")
    parts = [f"{plural(len(learned.fields), 'field')} from {plural(len(rows), 'event')}"] if rows else []
    parts += [
        f"{d}'s answers: {plural(len(c.fields), 'field')} from {plural(len(answers[d]), 'answer')}"
        for d, c in learned.responses.items()
    ]
    click.echo(f"wrote {shown(path)}: " + "; ".join(parts))
    if skipped:
        click.echo(
            f"note: {plural(skipped, 'answer')} skipped: stored cut short (over 500 characters) or not JSON;"
            " pin those destinations' `responses:` by hand",
            err=True,
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
    _not_batch(project, flow)
    spec = project.flows.get(flow)
    if spec is None or spec.contract is None:
        what = f"flow {flow!r} has no contract" if spec else f"no flow {flow!r}"
        click.echo(f"contract: {what}; pin one with `patchbay contract learn {flow}`", err=True)
        sys.exit(EXIT_CONFIG)
    from patchbay.contracts import response_drift

    rows = recent_events(project, flow, limit)
    found: dict[str, list[str]] = {}
    for event_id, _, payload in rows:
        for d in spec.contract.check(payload):
            found.setdefault(str(d), []).append(event_id)
    answers = recent_answers(project, flow, limit)[0] if spec.contract.responses else {}
    for dest, got in answers.items():
        for event_id, body in got:
            for line in response_drift(spec.contract, dest, body):
                found.setdefault(line, []).append(event_id)
    report: list[dict[str, Any]] = [
        {"drift": k, "events": len(v), "examples": v[:3]} for k, v in found.items()
    ]
    if as_json:
        _echo_json(report)
    elif not report:
        n = sum(len(v) for v in answers.values())
        more = f" and {plural(n, 'answer')}" if n else ""
        click.echo(
            f"ok: the last {plural(len(rows), 'event')}{more} of {flow} conform to {spec.contract.file}"
        )
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
