"""Command definitions."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from patchbay.errors import ConfigError, PatchbayError, Problem, StoreUnusable

if TYPE_CHECKING:
    from patchbay.store.base import Actor
    from patchbay.store.blocking import BlockingStore

EXIT_PROBLEMS, EXIT_CONFIG, EXIT_STORE = 1, 2, 3

project_option = click.option(
    "-p",
    "--project",
    "project_dir",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("PATCHBAY_PROJECT", "."),
    show_default="PATCHBAY_PROJECT or .",
    help="Project folder.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def plural(n: int, word: str) -> str:
    """`1 flow`, `2 flows`, `0 flows`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _ts(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _parse_time(value: str | None) -> float | None:
    """`2026-11-23`, `2026-11-23T10:00`, or an age such as `15m`, `2h`, `1d` ago."""
    if value is None:
        return None
    from patchbay.config.durations import parse_duration

    try:
        return time.time() - parse_duration(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r}: write an ISO date/time (2026-11-23T10:00) or an age (15m, 2h, 1d)"
        ) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _load(project_dir: Path, check_secrets: bool = True) -> Any:
    from patchbay.config.project import load_project
    from patchbay.engine.hub import open_resolver_for

    resolver = open_resolver_for(project_dir)
    project, problems = load_project(project_dir, resolver.exists if check_secrets else None)
    if project is None:
        for p in problems:
            click.echo(str(p), err=True)
        click.echo(
            f"{plural(len(problems), 'problem')}; nothing was changed. Fix them and run "
            f"`patchbay check {project_dir}`.",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    return project, resolver


def _store(project_dir: Path) -> BlockingStore:
    """The project's store for this command (closed when the command ends)."""
    from patchbay.config.project import load_project
    from patchbay.store.blocking import BlockingStore

    project, problems = load_project(project_dir)
    if project is None:  # queries still work on a project whose config is broken right now
        from patchbay.config.models import HubSettings
        from patchbay.config.project import Project

        project = Project(project_dir, HubSettings())
    path = project.store_location
    if isinstance(path, Path) and not path.exists():
        if not (project_dir / "patchbay.yaml").is_file():
            click.echo(
                f"no project in {project_dir} (no patchbay.yaml): pass -p DIR or set PATCHBAY_PROJECT",
                err=True,
            )
        else:
            click.echo(
                f"no store at {path} yet: start the hub with `patchbay serve {project_dir}` first", err=True
            )
        sys.exit(EXIT_STORE)
    store = BlockingStore(path)
    click.get_current_context().call_on_close(store.close)
    return store


def _cli_actor(**detail: Any) -> Actor:
    from patchbay.store.base import Actor

    return Actor(os.environ.get("USER", "cli"), "cli", detail)


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreUnusable as exc:  # any command that meets an empty, foreign or damaged store file
            click.echo(str(exc), err=True)
            sys.exit(EXIT_STORE)
        except ConfigError as exc:  # e.g. a store setting the hub cannot use, met before the project loads
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            sys.exit(EXIT_CONFIG)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="patchbay")
def main() -> None:
    """Patchbay: integrations as code, delivered durably, every failure visible."""


# ------------------------------------------------------------------------- init
@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default="demo")
@click.option("--force", is_flag=True, help="Write into a non-empty folder.")
@click.option("--template", default="lead-capture", show_default=True, help="Which example (see --list).")
@click.option("--list", "list_templates", is_flag=True, help="List the templates and exit.")
def init(directory: Path, force: bool, template: str, list_templates: bool) -> None:
    """Create an example project (lead capture: webhook -> map -> validate -> CRM + chat), or another
    template's, with tests beside its flows (`patchbay test`)."""
    from patchbay.scaffold import TEMPLATES, create_project

    if list_templates:
        for name, (_, about) in TEMPLATES.items():
            click.echo(f"{name:<22} {about}")
        return
    try:
        created = create_project(directory, force=force, template=template)
    except PatchbayError as exc:
        click.echo(f"init: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    for f in created:
        click.echo(f"  created {f}")
    click.echo(f"\nTry its flows first (nothing is sent): patchbay test {directory}")
    click.echo(f"Next: patchbay serve {directory}")


# ------------------------------------------------------------------------- check
@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=".")
@json_option
def check(directory: Path, as_json: bool) -> None:
    """Validate a project before it runs: every problem as file:line: what is wrong, how to fix."""
    from patchbay.config.project import load_project
    from patchbay.engine.hub import open_resolver_for
    from patchbay.security.secrets import SecretResolver
    from patchbay.security.ssrf import outbound_warnings

    unusable: StoreUnusable | None = None
    try:
        exists = open_resolver_for(directory).exists
    except ConfigError:  # reported by load_project, where it is written
        exists = SecretResolver(None).exists
    except StoreUnusable as exc:
        # The vault is in the store: its secrets cannot be judged, and the store is what is reported.
        unusable, exists = exc, lambda ref: True
    project, problems = load_project(directory, exists)
    why: str | None = None
    if project is not None and project.store_url:  # a server: connect now, so `serve` does not fail later
        from patchbay.store.opening import probe

        found = probe(project.store_url)
        if found:
            why = (
                f"the PostgreSQL store cannot be used: {found}; start the server, create the database,"
                " or set PGPASSWORD for its password"
            )
    elif unusable is not None:
        why = str(unusable)
    if why:
        text = (directory / "patchbay.yaml").read_text() if (directory / "patchbay.yaml").exists() else ""
        line = next((n for n, ln in enumerate(text.splitlines(), 1) if ln.startswith("store:")), 0)
        problems = [Problem(str(directory / "patchbay.yaml"), line, f"store: {why}"), *problems]
        project = None
    warnings = outbound_warnings(project) if project is not None else []  # reported, never failing
    if as_json:
        _echo_json(
            {
                "ok": project is not None,
                "problems": [p.__dict__ for p in problems],
                "warnings": [w.__dict__ for w in warnings],
                "flows": sorted(project.flows) if project else [],
                "systems": sorted(project.systems) if project else [],
            }
        )
    else:
        for p in problems:
            click.echo(str(p))
        for w in warnings:
            click.echo(f"{w.file}:{w.line}: warning: {w.message}")
        if project is not None:
            from patchbay.scaffold import describe_trigger

            click.echo(f"ok: {plural(len(project.systems), 'system')}, {plural(len(project.flows), 'flow')}")
            for f in project.flows.values():
                click.echo(
                    f"  {f.name}: {describe_trigger(f)}"
                    + (f" -> {', '.join(d.name for d in f.destinations)}" if f.destinations else "")
                    + _asks(f)
                    + f"  (owner {f.owner})"
                )
        else:
            click.echo(plural(len(problems), "problem"))
    sys.exit(0 if project is not None else EXIT_CONFIG)


def _asks(flow: Any) -> str:
    """`; asks hubspot (find_contact, create_contact)`: the systems a flow's call and lookup steps ask."""
    by_system: dict[str, list[str]] = {}
    for s in flow.steps:
        if getattr(s.step, "calls", False):
            by_system.setdefault(str(getattr(s.config, "system", "")), []).append(s.name)
    return "".join(f"; asks {sys_} ({', '.join(names)})" for sys_, names in by_system.items())


# ------------------------------------------------------------------------- serve
@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=".")
@click.option("--host", default=None, help="Listen address (default from patchbay.yaml: 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Listen port (default from patchbay.yaml: 8787).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None)
@click.option(
    "--role",
    "roles",
    default=None,
    metavar="ROLES",
    help="Run only these parts, comma-separated: web, worker, scheduler (default: all). Processes with"
    " roles share one PostgreSQL store; see docs/cluster.md.",
)
@click.option(
    "--node",
    "node_id",
    default=None,
    help="This process's name among the hub's processes (default: PATCHBAY_NODE_ID, else host:pid).",
)
@click.option(
    "--cpus",
    default=None,
    metavar="CPUS",
    help="Run this process's threads on these CPUs only, e.g. 0, 0-1 or 0,2 (Linux; default: any). Processes"
    " split by role on one machine run faster each on a core of its own; see docs/cluster.md.",
)
def serve(
    directory: Path,
    host: str | None,
    port: int | None,
    log_format: str | None,
    roles: str | None,
    node_id: str | None,
    cpus: str | None,
) -> None:
    """Run the hub: webhook endpoints, delivery workers, schedules, health and metrics (or some of them:
    --role)."""
    import asyncio
    import sqlite3

    from patchbay import logs
    from patchbay.engine.hub import Hub
    from patchbay.engine.roles import ALL_ROLES, Node, cpu_list, default_node_id, parse_cpus, parse_roles, pin
    from patchbay.server.app import run_hub
    from patchbay.store.sqlite import StoreLocked

    try:
        node = Node(node_id or default_node_id(), parse_roles(roles) if roles is not None else ALL_ROLES)
        on_cpus = parse_cpus(cpus) if cpus is not None else None
    except ValueError as exc:
        click.echo(f"serve: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if node_id is not None and not node_id.strip():
        click.echo("serve: --node is empty; give a name, or leave it out (host:pid)", err=True)
        sys.exit(EXIT_CONFIG)
    if on_cpus is not None:  # before the hub starts its threads: each of them keeps to these CPUs too
        pin(on_cpus)
    project, resolver = _load(directory)
    logs.setup(log_format or project.settings.log_format, resolver.redactor)
    hub = Hub(project, resolver=resolver, node=node)
    h = host or project.settings.host
    p = project.settings.port if port is None else port

    def ready(bound: int) -> None:
        from patchbay.scaffold import banner

        if node.everything:
            click.echo(banner(project, h, bound), err=True)
        else:  # one part of a cluster: what it runs; `patchbay cluster` shows the others
            click.echo(
                f"Patchbay node {node.id} ({', '.join(node.role_names)}) is running on http://{h}:{bound}"
                f"; `patchbay cluster` lists every node",
                err=True,
            )
        if on_cpus is not None:
            click.echo(f"(on CPU {cpu_list(on_cpus)} only: --cpus)", err=True)

    try:
        import uvloop

        uvloop.install() if sys.version_info < (3, 12) else None
    except ImportError:
        pass
    try:
        asyncio.run(run_hub(hub, host=h, port=p, on_ready=ready))
    except (StoreLocked, StoreUnusable) as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_STORE)
    except sqlite3.DatabaseError as exc:  # damage that only a later read meets
        click.echo(
            f"serve: reading the store {project.store_path}: {exc}; run `patchbay store check -p {directory}`",
            err=True,
        )
        sys.exit(EXIT_STORE)
    except OSError as exc:
        click.echo(f"serve: cannot listen on {h}:{p}: {exc.strerror}; pick another --port", err=True)
        sys.exit(EXIT_STORE)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_CONFIG)
    except PatchbayError as exc:
        click.echo(f"serve: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


# ------------------------------------------------------------------------- send
@main.command()
@click.argument("flow")
@project_option
@click.option("--data", "-d", help="JSON body (default: an example lead). Use @file.json to read a file.")
@click.option("--url", help="Hub base URL (default from patchbay.yaml).")
@click.option("--id", "event_id", help="Sender event id (default: a new one).")
def send(flow: str, project_dir: Path, data: str | None, url: str | None, event_id: str | None) -> None:
    """POST a correctly signed test event to FLOW's webhook on the running hub."""
    import urllib.error
    import urllib.request

    from patchbay.scaffold import EXAMPLE_LEAD, signed_headers

    project, resolver = _load(project_dir)
    spec = project.flows.get(flow)
    if spec is None or spec.webhook_path is None:
        click.echo(f"send: no webhook flow {flow!r}; flows: {', '.join(sorted(project.flows))}", err=True)
        sys.exit(EXIT_CONFIG)
    if data is None:
        body = json.dumps(EXAMPLE_LEAD).encode()
    elif data.startswith("@"):
        body = Path(data[1:]).read_bytes()
    else:
        body = data.encode()
    headers = signed_headers(project, spec, resolver, body, event_id)
    base = url or f"http://{project.settings.host}:{project.settings.port}"
    req = urllib.request.Request(base + spec.webhook_path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = resp.read().decode()
            click.echo(f"{resp.status} {answer}")
    except urllib.error.HTTPError as exc:
        click.echo(f"{exc.code} {exc.read().decode()}", err=True)
        sys.exit(EXIT_PROBLEMS)
    except urllib.error.URLError as exc:
        click.echo(
            f"send: cannot reach the hub at {base}: {exc.reason}; is `patchbay serve` running?", err=True
        )
        sys.exit(EXIT_STORE)
    _explain_quarantine(project, answer)


def _explain_quarantine(project: Any, answer: str) -> None:
    """The hub accepted the event but a step refused it: say why, from the store's run."""
    try:
        reply = json.loads(answer)
    except ValueError:
        return
    if not isinstance(reply, dict) or reply.get("status") != "quarantined":
        return
    run_id = reply.get("event_id")
    reason = None
    if project.store_path.exists() and isinstance(run_id, str):
        from patchbay.store.blocking import BlockingStore

        with BlockingStore(project.store_path) as store:
            run = store.run(lambda s: s.get_run(run_id))
        reason = run and _shown(run, project.root).get("reason")
    if reason:
        click.echo(f"quarantined: {reason}")
    click.echo(
        f"see `patchbay runs show {run_id}`; fix the data (or the flow), then `patchbay replay {run_id}`"
    )


# ------------------------------------------------------------------------- runs
@main.group(invoke_without_command=True)
@project_option
@click.option("--flow", help="Only this flow.")
@click.option(
    "--status", type=click.Choice(["pending", "delivered", "dead", "quarantined", "filtered", "aggregated"])
)
@click.option("--since", help="From this time (ISO) or age (15m, 2h, 1d).")
@click.option("--until", help="Before this time (ISO) or age.")
@click.option("--key", help="Record key, e.g. an email address.")
@click.option("--limit", type=int, default=50, show_default=True)
@json_option
@click.pass_context
def runs(
    ctx: click.Context,
    project_dir: Path,
    flow: str | None,
    status: str | None,
    since: str | None,
    until: str | None,
    key: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List runs (newest first); `runs show ID` prints one trace."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = project_dir
        return
    from patchbay.store.base import RunFilter

    window = _parse_time(since), _parse_time(until)  # bad input first, before the store
    store = _store(project_dir)
    f = RunFilter(flow, status, *window, key, limit)
    rows = store.run(lambda s: s.list_runs(f))
    if as_json:
        _echo_json(rows)
        return
    for name, late in late_schedules(store, project_dir):
        click.echo(f"LATE: schedule of flow {name} should have run {late:.0f}s ago; is the hub running?")
    if not rows:
        click.echo("no runs match")
        sys.exit(EXIT_PROBLEMS)
    click.echo(f"{'RUN':<31} {'FLOW':<18} {'STATUS':<12} {'RECEIVED (UTC)':<20} {'KEY':<28} REASON")
    for r in rows:
        click.echo(
            f"{r['id']:<31} {r['flow']:<18} {_status(r['status']):<12} {_ts(r['received_at']):<20} "
            f"{(r['record_key'] or '-')[:28]:<28} {(r['reason'] or '')[:80]}"
        )


def _shown(run: dict[str, Any], project_dir: Path) -> dict[str, Any]:
    """A stored run as the CLI may print it: its flow's sensitive fields (and values sealed at rest) redacted."""
    from patchbay.security.runs import redact_run, sensitive_paths

    return redact_run(run, sensitive_paths(project_dir).get(run["flow"], []))


def _scrubbed_dead(
    store: BlockingStore, rows: list[dict[str, Any]], project_dir: Path
) -> list[dict[str, Any]]:
    """Dead letters as the CLI may print them: a destination's answer may echo a sensitive field."""
    from patchbay.security.runs import scrub_dead, sensitive_paths

    paths = sensitive_paths(project_dir) if rows else {}
    out = []
    for r in rows:
        if paths.get(r["flow"]):
            run = _run_of(store, r["event_id"])
            r = scrub_dead(r, run["payload"] if run else None, paths[r["flow"]])
        out.append(r)
    return out


def _run_of(store: BlockingStore, event_id: str) -> dict[str, Any] | None:
    return store.run(lambda s: s.get_run(event_id))


def _status(s: str) -> str:
    return s


@runs.command("show")
@click.argument("run_id")
@project_option
@json_option
def runs_show(run_id: str, project_dir: Path, as_json: bool) -> None:
    """Print a run's trace: trigger, each step's output, each destination's attempts."""
    store = _store(project_dir)
    run = store.run(lambda s: s.get_run(run_id))
    if run is None:
        click.echo(f"no run {run_id!r}; list them with `patchbay runs`", err=True)
        sys.exit(EXIT_PROBLEMS)
    run = _shown(run, project_dir)
    if as_json:
        _echo_json(run)
        return
    from patchbay.cli.trace import render_trace

    click.echo(render_trace(run))


# ------------------------------------------------------------------------- dead
DEAD_RESPONSE_CHARS = 200  # of a dead letter's last response in the listing (`runs show` has 300)


@main.command()
@project_option
@click.option("--flow", help="Only this flow.")
@click.option("--limit", type=int, default=100, show_default=True)
@json_option
def dead(project_dir: Path, flow: str | None, limit: int, as_json: bool) -> None:
    """List dead letters and quarantined events with their reasons."""
    store = _store(project_dir)
    rows = _scrubbed_dead(store, store.run(lambda s: s.list_dead(flow, limit)), project_dir)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no dead letters, nothing quarantined")
        return
    click.echo(f"{'KIND':<11} {'RUN':<31} {'FLOW/DESTINATION':<28} {'KEY':<26} REASON")
    for r in rows:
        target = r["flow"] + (f"/{r['destination']}" if r["destination"] else "")
        reason = (r["reason"] or "")[:100]
        if r["response"]:  # what the destination answered, on one line and bounded
            reason += "  response: " + " ".join(r["response"].split())[:DEAD_RESPONSE_CHARS]
        click.echo(
            f"{r['kind']:<11} {r['event_id']:<31} {target[:28]:<28} {(r['record_key'] or '-')[:26]:<26} "
            f"{reason}"
        )
    click.echo(f"\n{len(rows)} listed. Fix the cause, then `patchbay replay RUN` (or --all).")


# ------------------------------------------------------------------------- replay
@main.command()
@click.argument("run_ids", nargs=-1)
@project_option
@click.option(
    "--all", "all_", is_flag=True, help="Every dead letter and quarantined event (narrow with --flow)."
)
@click.option("--flow", help="Only this flow.")
@click.option("--destination", help="Only deliveries to this destination.")
@json_option
def replay(
    run_ids: tuple[str, ...],
    project_dir: Path,
    all_: bool,
    flow: str | None,
    destination: str | None,
    as_json: bool,
) -> None:
    """Run dead or quarantined events again through the flow as configured now."""
    from patchbay.engine.hub import build_sinks, field_cipher
    from patchbay.engine.pipeline import Pipeline
    from patchbay.engine.replay import event_ids
    from patchbay.engine.replay import replay as replay_events

    if not run_ids and not all_:
        click.echo("replay: name run ids, or pass --all (with --flow/--destination to narrow)", err=True)
        sys.exit(EXIT_CONFIG)
    project, resolver = _load(project_dir)
    try:
        cipher = field_cipher(project)
    except PatchbayError as exc:
        click.echo(f"replay: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    pipelines = {
        n: Pipeline(f, build_sinks(f, project, resolver, None), cipher) for n, f in project.flows.items()
    }
    store = _store(project_dir)
    ids = event_ids(run_ids) if run_ids else store.run(lambda s: s.replayable(flow, destination))
    report = store.run(lambda s: replay_events(s, pipelines, ids, destination, _cli_actor()))
    if as_json:
        _echo_json(report.__dict__)
    else:
        for eid in report.requeued:
            click.echo(f"requeued {eid}")
        for eid, why in report.still_invalid:
            click.echo(f"still failing {eid}: {why}")
        for eid, why in report.skipped:
            click.echo(f"skipped {eid}: {why}")
        click.echo(f"{len(report.requeued)} requeued; the running hub delivers them within a second.")
    sys.exit(0 if report.requeued or not ids else EXIT_PROBLEMS)


# ------------------------------------------------------------------------- resume
@main.command()
@click.argument("flow")
@click.argument("destination", required=False)
@project_option
def resume(flow: str, destination: str | None, project_dir: Path) -> None:
    """Resume a paused (or disabled) destination; its waiting deliveries go out in order of arrival.

    Without a destination, a paused or stopped source (or schedule) of the flow is tried again too."""
    from patchbay.store.base import SourceState

    store = _store(project_dir)
    states = store.run(lambda s: s.destination_states())
    targets = [
        (d, state, reason)
        for (f, d), (state, reason, _) in sorted(states.items())
        if f == flow and state != "active" and destination in (None, d)
    ]
    source = store.run(lambda s: s.source_states()).get(flow) if destination is None else None
    if source is not None and source.state in ("paused", "stopped"):
        now = time.time()
        resumed = SourceState(flow, "active", 0, None, now, now)
        store.run(lambda s: s.set_source_state(resumed))
        store.run(lambda s: s.audit("resume", f"{flow}/source", _cli_actor(was=source.state)))
        click.echo(
            f"resumed the source of {flow} (was {source.state}: {source.error}); the hub tries it again"
        )
    elif not targets:
        click.echo(
            f"nothing to resume: no paused destination{' ' + destination if destination else ''}"
            f"{'' if destination else ' or source'} in flow {flow}"
        )
        sys.exit(EXIT_PROBLEMS)
    for dest, was, reason in targets:
        _resume_one(store, flow, dest, _cli_actor(was=was))
        click.echo(f"resumed {flow}/{dest} (was {was}: {reason})")


def _resume_one(store: BlockingStore, flow: str, dest: str, by: Actor) -> None:
    store.run(lambda s: s.set_destination_state(flow, dest, "active", None, by))


# ------------------------------------------------------------------------- state
@main.command()
@click.argument("flow")
@project_option
@click.option("--reset", is_flag=True, help="Forget the source cursor: the next poll reads from the start.")
@json_option
def state(flow: str, project_dir: Path, reset: bool, as_json: bool) -> None:
    """Show a flow's source cursor and schedule; --reset forgets the cursor."""
    store = _store(project_dir)
    if reset:
        done = store.run(lambda s: s.reset_cursor(flow, _cli_actor()))
        click.echo(
            f"cursor of {flow} reset; the next poll reads from the start (seen records are not repeated)"
            if done
            else f"{flow} had no cursor"
        )
        return
    cursor = store.run(lambda s: s.cursor(flow))
    sched = store.run(lambda s: s.schedule(flow))
    spec = _schedule_spec(project_dir, flow)
    source = store.run(lambda s: s.source_states()).get(flow)
    if as_json:
        health = None if source is None else vars(source)
        _echo_json(
            {"flow": flow, "cursor": cursor, "schedule": sched, "late": _late(sched, spec), "source": health}
        )
        return
    click.echo(f"flow {flow}")
    click.echo(
        f"  cursor: {json.dumps(cursor) if cursor is not None else '(none: the next poll reads from the start)'}"
    )
    if spec is not None:
        click.echo(
            f"  schedule: {'cron ' + spec.cron + ' ' + spec.timezone if spec.cron else f'every {spec.every:g}s'}"
        )
    if sched:
        click.echo(
            f"  last run: {_ts(sched['last_started_at'])} -> {sched['last_status'] or '-'}"
            + (f" ({sched['last_error']})" if sched["last_error"] else "")
        )
        click.echo(f"  next run: {_ts(sched['next_due_at'])}   runs so far: {sched['runs']}")
        late = _late(sched, spec)
        if late:
            click.echo(f"  LATE by {late:.0f}s: is the hub running?")
    if source is not None and (source.state != "active" or source.failures):
        click.echo(
            f"  source: {source.state} since {_ts(source.since)}, {source.failures} failures in a row: {source.error}"
            + (
                "; `patchbay resume " + flow + "` tries it again"
                if source.state in ("paused", "stopped")
                else ""
            )
        )


def _schedule_spec(project_dir: Path, flow: str) -> Any:
    from patchbay.config.project import load_project

    project, _ = load_project(project_dir)
    f = project.flows.get(flow) if project else None
    return f.trigger.schedule if f else None


def _late(sched: dict[str, Any] | None, spec: Any) -> float:
    """Seconds a schedule is overdue beyond its tolerance, or 0."""
    from patchbay.engine.scheduler import late_by

    if not sched or spec is None:  # no longer scheduled (the flow changed): nothing is due
        return 0.0
    return late_by(spec, sched.get("next_due_at"), time.time())


def late_schedules(store: BlockingStore, project_dir: Path) -> list[tuple[str, float]]:
    rows = store.run(lambda s: s.schedules())
    out = []
    for r in rows.values():
        late = _late(r, _schedule_spec(project_dir, r["flow"]))
        if late:
            out.append((r["flow"], late))
    return out


# ------------------------------------------------------------------------- connectors
@main.group(invoke_without_command=True)
@json_option
@click.pass_context
def connectors(ctx: click.Context, as_json: bool) -> None:
    """List installed connectors and what each can be (source, destination)."""
    if ctx.invoked_subcommand is not None:
        return
    import importlib.util

    from patchbay import registry

    registry.discover()
    rows: list[dict[str, Any]] = []
    for kind, e in sorted(registry.CONNECTORS.items()):
        roles = sorted(registry._BY_ROLE.get(kind, {}))
        driver = DRIVERS.get(e.extra or "", None)
        ready = driver is None or importlib.util.find_spec(driver) is not None
        rows.append(
            {
                "kind": kind,
                "roles": roles,
                "status": e.status,
                "summary": e.summary,
                "extra": e.extra,
                "driver_installed": ready,
            }
        )
    if as_json:
        _echo_json(rows)
        return
    click.echo(f"{'KIND':<12} {'SOURCE':<7} {'DEST':<5} {'STATUS':<7} SUMMARY")
    for r in rows:
        hint = "" if r["driver_installed"] else f"  ({registry.install_hint(r['extra'])})"
        click.echo(
            f"{r['kind']:<12} {'yes' if 'source' in r['roles'] else '-':<7} "
            f"{'yes' if 'destination' in r['roles'] else '-':<5} {r['status']:<7} {r['summary']}{hint}"
        )
    from patchbay import presets

    click.echo(f"\nPresets: {', '.join(presets.available())}")
    click.echo(
        "`patchbay connectors show KIND` lists a connector's settings, or a preset's operations and fields."
    )


DRIVERS = {
    "postgres": "psycopg",
    "mysql": "aiomysql",
    "amqp": "aio_pika",
    "mqtt": "paho",
    "nats": "nats",
    "redis": "redis",
    "email": "aiosmtplib",
    "duckdb": "duckdb",
    "parquet": "pyarrow",
}


@connectors.command("show")
@click.argument("kind")
def connectors_show(kind: str) -> None:
    """Every setting of KIND with its type, default and description (the same schema `check` uses);
    for a preset (e.g. hubspot), its auth, limits, webhook scheme, reads, and operations with their fields."""
    from patchbay import presets, registry
    from patchbay.specdoc import connector_doc

    registry.discover()
    if kind not in registry.CONNECTORS and kind in presets.available():  # a vendor: its operations and fields
        click.echo(presets.describe(kind))
        return
    if kind not in registry.CONNECTORS:
        import difflib

        close = difflib.get_close_matches(kind, [*registry.CONNECTORS, *presets.available()], n=1)
        click.echo(
            f"no connector or preset {kind!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (installed: {', '.join(sorted(registry.CONNECTORS))}; presets: {', '.join(presets.available())})",
            err=True,
        )
        sys.exit(EXIT_PROBLEMS)
    click.echo(connector_doc(kind))
