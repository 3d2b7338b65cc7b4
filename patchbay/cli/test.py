"""`patchbay test`: run the flow tests beside the flows; `patchbay runs export RUN --as-test`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from patchbay.cli.main import EXIT_CONFIG, EXIT_PROBLEMS, main, plural, runs


def _split_args(args: tuple[str, ...]) -> tuple[Path, list[str]]:
    """`[DIR] [FLOW...]`: the first argument is the project when it is a folder."""
    if args and Path(args[0]).is_dir():
        return Path(args[0]), list(args[1:])
    return Path(os.environ.get("PATCHBAY_PROJECT", ".")), list(args)


def load_offline(root: Path) -> Any:
    """The project as `check` sees it, without its secrets: tests and dry runs never read the vault."""
    from patchbay.config.project import load_project

    project, problems = load_project(root)
    if project is None:
        for p in problems:
            click.echo(str(p), err=True)
        click.echo(f"{plural(len(problems), 'problem')} in the project; fix them first.", err=True)
        sys.exit(EXIT_CONFIG)
    return project


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@main.command("test")
@click.argument("args", nargs=-1, metavar="[DIR] [FLOW]...")
@click.option("--junit", "junit", type=click.Path(path_type=Path), help="Also write JUnit XML here (for CI).")
def test_command(args: tuple[str, ...], junit: Path | None) -> None:
    """Run the flow tests (flows/<flow>.test.yaml): each event through the flow's steps and routing,
    every destination captured (nothing is sent, no secret is read), simulated answers through the real
    retry policy. Exit 0 all passed, 1 a test failed, 2 a test file (or the project) has a problem."""
    from patchbay.testing.runner import junit_xml, run_project

    root, flows = _split_args(args)
    project = load_offline(root)
    report = run_project(project, flows, display=shown)
    current = None
    for r in report.results:
        if r.case.file != current:
            current = r.case.file
            click.echo(f"{current} (flow {r.flow})")
        if r.passed:
            click.echo(f"  PASS  {r.case.name}")
            continue
        click.echo(f"  FAIL  {r.case.name}  ({r.case.file}:{r.case.line})")
        for line in [r.error] if r.error else r.failures:
            click.echo(f"        {line}")
    for p in report.problems:
        click.echo(str(p), err=True)
    if report.untested:
        click.echo(
            f"no tests for: {', '.join(report.untested)} "
            "(add flows/<flow>.test.yaml; `patchbay runs export RUN --as-test` writes one from a real run)"
        )
    if junit is not None:
        junit.write_bytes(junit_xml(report))
    failed = len(report.failed)
    summary = f"{len(report.results) - failed} passed, {failed} failed in {report.seconds:.2f}s"
    if report.problems:
        summary += f"; {plural(len(report.problems), 'problem')} in test files"
    click.echo(summary)
    sys.exit(report.exit_code)


@runs.command("export")
@click.argument("run_id")
@click.option("-p", "--project", "project_dir", type=click.Path(path_type=Path), default=None)
@click.option("--as-test", "as_test", is_flag=True, required=True, help="Write the run as a flow test.")
@click.option(
    "--to",
    "target",
    type=click.Path(path_type=Path),
    help="Test file to write or add to (default flows/<flow>.test.yaml; `-` prints it).",
)
@click.option("--name", help="The test's name (default: the run id and what happened).")
@click.pass_obj
def runs_export(
    obj: Any, run_id: str, project_dir: Path | None, as_test: bool, target: Path | None, name: str | None
) -> None:
    """A real event from history as a flow test: the `sensitive:` fields replaced by stand-ins of the
    same shape, secrets scrubbed, and expectations of what the flow does with it now."""
    from patchbay.cli.main import _store
    from patchbay.errors import PatchbayError
    from patchbay.testing.export import export_run
    from patchbay.testing.runner import flow_test_path

    root = project_dir or obj or Path(os.environ.get("PATCHBAY_PROJECT", "."))
    store = _store(root)
    project = load_offline(root)
    try:
        exported = export_run(store, project, run_id, name)
    except PatchbayError as exc:
        click.echo(f"runs export: {exc}", err=True)
        sys.exit(EXIT_PROBLEMS)
    for note in exported.notes:
        click.echo(f"note: {note}", err=True)
    if target is not None and str(target) == "-":
        click.echo(exported.document(with_header=True), nl=False)
        return
    path = target or flow_test_path(root, exported.flow)
    try:
        exported.write(path)
    except PatchbayError as exc:
        click.echo(f"runs export: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(
        f"wrote test {exported.name!r} to {shown(path)}; run it with `patchbay test {root} {exported.flow}`"
    )
