"""`patchbay run FLOW --data …`: one event through a flow, as a dry run (nothing sent) or for real.

A real run goes through an engine started in this process (the hub's own code: store, pipeline,
delivery workers and retry policy) for the one flow, because the REST API has no endpoint that starts
a run yet; the store's lock makes that safe (a running `patchbay serve` holds it, and the run then
says to stop the hub or use the webhook). Batch flows will get their own branch in `run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
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
    _load,
    json_option,
    main,
    project_option,
)
from patchbay.cli.test import load_offline


def read_data(data: str) -> tuple[bytes, Any]:
    """`--data`: inline JSON or @file; the bytes as given and the parsed record."""
    if data.startswith("@"):
        try:
            raw = Path(data[1:]).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {data[1:]}: {exc.strerror}", param_hint="--data") from exc
    else:
        raw = data.encode()
    try:
        return raw, json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from exc


@main.command("run")
@click.argument("flow")
@project_option
@click.option("--data", "-d", help="The event as JSON, or @file.json (not for a batch flow).")
@click.option(
    "--accept-schema",
    is_flag=True,
    help="Batch flow: accept the source's changed columns for this run (new ones are added at the destination).",
)
@click.option("--dry-run", is_flag=True, help="Show the steps and the would-be deliveries; send nothing.")
@click.option(
    "--explain",
    is_flag=True,
    help="Batch flow: show which steps the source's SELECT computes (pushdown) and why others run in Python; "
    "reads only the source's columns.",
)
@click.option(
    "--wait-s",
    type=float,
    default=15.0,
    show_default=True,
    help="Real run: how long to wait for the first attempt of every delivery.",
)
@click.option(
    "--remote",
    is_flag=True,
    help="Ask the running hub to run it (POST /api/v1/flows/FLOW/runs) with the token in $PATCHBAY_TOKEN "
    "(scope runs:start and runs:read), and follow it.",
)
@click.option("--url", help="With --remote: the hub's address (default: host and port of patchbay.yaml).")
@json_option
def run(
    flow: str,
    project_dir: Path,
    data: str | None,
    accept_schema: bool,
    dry_run: bool,
    remote: bool,
    url: str | None,
    wait_s: float,
    as_json: bool,
    explain: bool = False,
) -> None:
    """Run one event through FLOW, or one sync of a batch FLOW. With --dry-run: the live definition's
    steps and routing, each destination's request as it would be sent, nothing sent and no secret read.
    Without: the flow must have `trigger: {manual: true}`; the event is stored and delivered like any
    other run. A batch flow reads its source's window and writes it in one transaction, with a progress
    line, and prints the run's report (exit 1 when it failed or stopped). With --remote the running hub
    does it (the hub holds the store while it runs)."""
    if remote:
        from patchbay.cli.remote import run_remote

        if dry_run:
            raise click.UsageError("--remote runs for real; leave out --dry-run")
        run_remote(project_dir, flow, read_data(data)[1] if data else None, accept_schema, url, as_json)
        return
    if data is None:
        project, resolver = _load(project_dir)
        spec = _flow(project, flow)
        if spec.batch is None:
            raise click.UsageError("give the event with --data JSON (or @file.json)")
        if explain:
            _explain_batch(project, resolver, spec, as_json)
            return
        if dry_run:
            raise click.UsageError("--dry-run takes one event (--data); a batch flow has no dry run yet")
        _run_batch(project, resolver, spec, accept_schema, as_json)
        return
    raw, record = read_data(data)
    if dry_run:
        project = load_offline(project_dir)
        spec = _flow(project, flow)
        dry_run_event(project, spec, record, as_json)
        return
    project, resolver = _load(project_dir)
    spec = _flow(project, flow)
    if not spec.trigger.manual:
        click.echo(
            f"run: flow {flow!r} has no manual trigger; add `manual: true` under its `trigger:` to run it "
            "by hand, or try it with --dry-run (sends nothing)",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    if spec.batch is not None:
        raise click.UsageError(f"flow {flow!r} is a batch flow: run it without --data")
    result = _run_event(project, resolver, spec, raw, record, wait_s)
    if as_json:
        _echo_json(result)
        return
    from patchbay.cli.trace import render_trace

    click.echo(render_trace(result))
    if result["status"] in ("quarantined", "dead"):
        sys.exit(EXIT_PROBLEMS)


def _explain_batch(project: Any, resolver: Any, spec: Any, as_json: bool) -> None:
    from patchbay.engine.batch import explain

    try:
        notes = asyncio.run(explain(project, resolver, spec))
    except Exception as exc:
        click.echo(f"run --explain: {resolver.redactor(str(exc))}", err=True)
        sys.exit(EXIT_PROBLEMS)
    if as_json:
        _echo_json({"flow": spec.name, "pushdown": notes})
        return
    click.echo(
        f"flow {spec.name}: what the source computes in its SELECT (pushdown), and what runs in Python"
    )
    for line in notes:
        click.echo(f"  {line}")


def _flow(project: Any, name: str) -> Any:
    spec = project.flows.get(name)
    if spec is None:
        click.echo(f"run: no flow {name!r}; flows: {', '.join(sorted(project.flows))}", err=True)
        sys.exit(EXIT_CONFIG)
    return spec


def dry_run_event(project: Any, spec: Any, record: Any, as_json: bool) -> None:
    from patchbay.security.redaction import Scrubber, redact_paths, sensitive_values
    from patchbay.testing.harness import simulate

    if spec.batch is not None:
        dry_run_batch_row(spec, record, as_json)
        return
    result = simulate(spec, project, record)
    scrub = Scrubber(
        sensitive_values(record, spec.sensitive) | sensitive_values(result.record, spec.sensitive)
    )

    def shown(v: Any) -> Any:  # a dry run's output lands in terminals and CI logs: no sensitive value
        return scrub(redact_paths(v, spec.sensitive)) if spec.sensitive else v

    deliveries = [
        {"destination": c.destination, "kind": c.kind, "request": shown(c.view)} for c in result.captured
    ]
    if as_json:
        _echo_json(
            {
                "flow": spec.name,
                "status": "would deliver" if deliveries else result.status,
                "reason": scrub(result.reason),
                "trace": result.trace,
                "deliveries": deliveries,
            }
        )
        return
    click.echo(f"dry run of flow {spec.name} ({spec.file}): nothing is sent")
    for n, step in enumerate(result.trace, 1):
        click.echo(f"{n}. {_step_line(step)}")
    if result.status in ("quarantined", "filtered"):
        click.echo(f"result: {result.status}: {scrub(result.reason)}")
        return
    if result.status == "aggregated":
        click.echo("result: counted into its window; the window's record goes on when the window closes")
        return
    waiting = [d for d in deliveries if d["destination"].startswith("call:")]
    if any(c.outcome == "unanswered" for c in result.captured):
        click.echo("would ask first (a dry run asks nothing; the steps after a call wait on its answer):")
    else:
        click.echo("would deliver:")
    for d in deliveries if not waiting else waiting:
        req = d["request"]
        head = " ".join(str(req[k]) for k in ("method", "url") if k in req)
        click.echo(f"  {d['destination']} ({d['kind']}){': ' + head if head else ''}")
        for k, v in req.items():
            if k in ("method", "url", "path"):
                continue
            click.echo(f"    {k}: {json.dumps(v, ensure_ascii=False, sort_keys=True)}")


def dry_run_batch_row(spec: Any, record: Any, as_json: bool) -> None:
    """A batch flow's dry run: the given row of its source table through the transform a real run
    uses, and the row it would write (or why it would not)."""
    from patchbay.testing.harness import simulate_batch

    if not isinstance(record, dict):
        raise click.UsageError("a batch flow's dry run takes one row of its source table: a JSON object")
    from patchbay.security.redaction import Scrubber, redact_paths, sensitive_values

    run = simulate_batch(spec, [record])
    if spec.sensitive:  # a dry run's output lands in terminals and CI logs: no sensitive value
        scrub = Scrubber(sensitive_values(record, spec.sensitive))
        run.rows = [scrub(redact_paths(r, spec.sensitive)) for r in run.rows]
        run.quarantined = [(row, scrub(reason)) for row, reason in run.quarantined]
    table = f"{spec.batch.to.system}.{spec.batch.to.table}"
    if run.quarantined:
        status, detail = "quarantined", run.quarantined[0][1]
    elif run.filtered:
        status, detail = "filtered", "a step dropped the row"
    else:
        status, detail = "would write", ""
    if as_json:
        _echo_json(
            {"flow": spec.name, "status": status, "reason": detail or None, "rows": run.rows, "to": table}
        )
        return
    click.echo(f"dry run of batch flow {spec.name} ({spec.file}): one source row, nothing is written")
    if run.rows:
        click.echo(f"would write to {table}: {json.dumps(run.rows[0], ensure_ascii=False, sort_keys=True)}")
    else:
        click.echo(f"result: {status}: {detail}")


def _step_line(step: dict[str, Any]) -> str:
    head = f"{step['step']} ({step['kind']})"
    if step.get("skipped"):
        return f"{head}: skipped (when was false)"
    if "waiting" in step:
        return f"{head}: asks {step['step']} (below), then goes on with its answer"
    if "error" in step:
        return f"{head}: STOPPED: " + "; ".join(step["error"])
    if "drift" in step:
        return f"{head}: DRIFT: " + "; ".join(step["drift"])
    if "dropped" in step:
        return f"{head}: filtered out: {step['dropped']}"
    if "window" in step:  # aggregate
        return f"{head}: window {step['window']}, key {json.dumps(step.get('key'), ensure_ascii=False)}"
    if step.get("kind") == "dedupe" and "key" in step:
        return f"{head}: key {json.dumps(step['key'], ensure_ascii=False)}" + (
            f" ({step['note']})" if step.get("note") else " (a duplicate is decided when stored)"
        )
    if "routes" in step:
        return (
            head
            + ": "
            + ", ".join(
                f"{r['destination']}{'' if r['matched'] else ' (not matched)'}" for r in step["routes"]
            )
        )
    return f"{head}: {json.dumps(step.get('output'), ensure_ascii=False, sort_keys=True)}"


def _run_event(project: Any, resolver: Any, spec: Any, raw: bytes, record: Any, wait_s: float) -> Any:
    from patchbay.store.sqlite import StoreLocked

    try:
        return asyncio.run(run_in_process(project, resolver, spec, raw, record, wait_s))
    except StoreLocked as exc:
        click.echo(
            f"run: {exc}. The hub is running: ask it to run the event with `patchbay run {spec.name} --remote -d …`"
            " (a token in $PATCHBAY_TOKEN), or stop `patchbay serve` and run again",
            err=True,
        )
        sys.exit(EXIT_STORE)


async def run_in_process(
    project: Any, resolver: Any, spec: Any, raw: bytes, record: Any, wait_s: float
) -> dict[str, Any]:
    """Store and deliver one event of `spec` with the hub's engine for this flow alone, waiting until
    every delivery has had its first attempt (a retry is left scheduled in the store for the hub)."""
    from patchbay.config.models import Trigger
    from patchbay.engine.hub import Hub
    from patchbay.security.runs import redact_run

    # Only this flow, and only its manual trigger: no schedule, source or other flow's backlog starts.
    one = dataclasses.replace(spec, trigger=Trigger(manual=True), source=None)
    hub = Hub(dataclasses.replace(project, flows={spec.name: one}), resolver=resolver)
    await hub.start()
    try:
        accepted, _ = await hub.ingest(spec.name, raw, record, meta={"trigger": "manual", "remote": "cli"})
        assert hub.store is not None
        deadline = time.monotonic() + wait_s
        while True:
            run = await hub.store.get_run(accepted.event_id)
            assert run is not None
            workers = hub.flows[spec.name].workers
            if all(_settled(d, workers[d["destination"]].state) for d in run["deliveries"]):
                return redact_run(run, spec.sensitive)  # shown: as `runs show` would
            if time.monotonic() > deadline:
                return redact_run(run, spec.sensitive)
            await asyncio.sleep(0.05)
    finally:
        await hub.stop()


def _run_batch(project: Any, resolver: Any, spec: Any, accept_schema: bool, as_json: bool) -> None:
    from patchbay.cli.progress import ProgressLine
    from patchbay.store.sqlite import StoreLocked

    line = ProgressLine()
    try:
        report = asyncio.run(run_batch_in_process(project, resolver, spec, line, accept_schema))
    except StoreLocked as exc:
        click.echo(
            f"run: {exc}. The hub is running: ask it to run the flow with `patchbay run {spec.name} --remote`"
            " (a token in $PATCHBAY_TOKEN), or stop `patchbay serve` and run again",
            err=True,
        )
        sys.exit(EXIT_STORE)
    finally:
        line.done()
    if as_json:
        _echo_json(report.as_dict())
    else:
        click.echo(f"{spec.name}: {report.summary}")
        if report.cursor_to:
            click.echo(f"  cursor: {report.cursor_from or '(start)'} -> {report.cursor_to}")
        for s in report.samples[:5]:
            click.echo(f"  quarantined: {s['reason']}")
        if report.quarantined > 5:
            click.echo(f"  ... {report.quarantined - 5} more: `patchbay dead -p DIR --flow {spec.name}`")
        if report.error:
            click.echo(f"  {report.error}", err=True)
    if report.status != "ok":
        sys.exit(EXIT_PROBLEMS)


async def run_batch_in_process(
    project: Any, resolver: Any, spec: Any, progress: Any, accept_schema: bool = False
) -> Any:
    """One sync of the batch flow `spec`, its report and its quarantined rows kept in the store.

    The quarantined rows are stored before the destination commits (a crash in between leaves them
    listed, and the next run reads the same window again); the run itself is stored after."""
    from patchbay.engine.batch import record_run, run_flow, store_quarantined
    from patchbay.engine.hub import Hub

    hub = Hub(dataclasses.replace(project, flows={}), resolver=resolver)
    await hub.start()
    try:
        assert hub.store is not None
        store = hub.store

        async def keep(report: Any) -> None:
            await store_quarantined(store, spec, report)

        report = await run_flow(
            project, resolver, spec, progress=progress, before_commit=keep, accept_schema=accept_schema
        )
        if report.status != "ok":
            await keep(report)
        await record_run(store, spec, report, trigger="manual")
        return report
    finally:
        await hub.stop()


def _settled(d: dict[str, Any], state: str) -> bool:
    if state != "active":
        return True  # paused or disabled: nothing more happens until someone resumes it
    return d["attempts"] >= 1 and (d["status"] != "pending" or d["next_at"] > time.time())
