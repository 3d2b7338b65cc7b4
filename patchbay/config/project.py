"""Load a project folder (patchbay.yaml, systems, flows) into specs, collecting every problem with file:line.

The parts load in their own modules: systems.py, flows.py (document, trigger, source, steps),
destinations.py, alerts.py (notify targets); problems.py turns errors into `file:line` problems;
specs.py holds what a loaded project is, re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchbay import registry
from patchbay.config.alerts import check_alerts
from patchbay.config.entities import check_sync_flows, load_entities
from patchbay.config.flows import load_flow
from patchbay.config.models import AlertRule, HubSettings, SecretRef
from patchbay.config.problems import validate
from patchbay.config.source import Located, load_yaml
from patchbay.config.specs import (
    DestinationSpec,
    FlowSpec,
    Project,
    SourceSpec,
    StepSpec,
    SystemSpec,
    system_secret_refs,
)
from patchbay.config.systems import load_system
from patchbay.contracts import contract_path, load_contract
from patchbay.errors import ConfigError, Problem

__all__ = [
    "DestinationSpec",
    "FlowSpec",
    "Project",
    "SecretExists",
    "SourceSpec",
    "StepSpec",
    "SystemSpec",
    "load_or_raise",
    "load_project",
    "system_secret_refs",
]

SecretExists = Callable[[SecretRef], bool]


def load_project(
    root: Path, secret_exists: SecretExists | None = None
) -> tuple[Project | None, list[Problem]]:
    """Load and check everything; a project is returned only when there are no problems."""
    registry.discover()
    root = Path(root)
    problems: list[Problem] = []
    if not root.is_dir():
        return None, [Problem(str(root), 0, "no such project folder; create one with `patchbay init DIR`")]

    def parse(p: Path) -> Located | None:
        try:
            return load_yaml(p, _rel(p))
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None

    settings = HubSettings()
    hub_src = parse(root / "patchbay.yaml") if (root / "patchbay.yaml").exists() else None
    if hub_src is not None:
        settings = validate(hub_src, hub_src.data or {}, HubSettings, (), problems) or settings
    systems, broken = _load_systems(root, parse, problems)
    flows, flow_srcs = _load_flows(root, parse, systems, settings, broken, problems)

    alert_docs: list[tuple[Located, list[AlertRule], FlowSpec | None]] = []
    if hub_src is not None:
        alert_docs.append((hub_src, settings.alerts, None))
    alert_docs += [(flow_srcs[n], f.alerts, f) for n, f in flows.items()]
    check_alerts(alert_docs, systems, broken, problems)
    entities, ent_srcs = load_entities(root, parse, systems, broken, problems)
    check_sync_flows(entities, flows, flow_srcs, problems, set(ent_srcs) - set(entities))

    if secret_exists is not None:
        _check_secrets(systems, secret_exists, problems)
    if problems:
        return None, problems
    return Project(root, settings, systems, flows, entities), []


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _load_systems(
    root: Path, parse: Callable[[Path], Located | None], problems: list[Problem]
) -> tuple[dict[str, SystemSpec], set[str]]:
    """The systems of systems.yaml and systems/*.yaml, and the names of those that have problems."""
    systems: dict[str, SystemSpec] = {}
    broken: set[str] = set()  # systems with problems of their own: references to them are not reported again
    sys_files = ([root / "systems.yaml"] if (root / "systems.yaml").exists() else []) + sorted(
        (root / "systems").glob("*.y*ml")
    )
    for f in sys_files:
        src = parse(f)
        if src is None:
            continue
        if not isinstance(src.data, dict):
            problems.append(src.problem((), "expected a mapping of system name -> settings"))
            continue
        for name, body in src.data.items():
            if name in systems or name in broken:
                problems.append(src.problem((name,), f"duplicate system name {name!r}; rename one"))
                continue
            if not load_system(src, name, body, systems, problems):
                broken.add(name)
    return systems, broken


def _load_flows(
    root: Path,
    parse: Callable[[Path], Located | None],
    systems: dict[str, SystemSpec],
    settings: HubSettings,
    broken: set[str],
    problems: list[Problem],
) -> tuple[dict[str, FlowSpec], dict[str, Located]]:
    """The flows of flows/*.yaml by name, with the document each came from; names and paths unique."""
    flows: dict[str, FlowSpec] = {}
    flow_srcs: dict[str, Located] = {}
    paths: dict[str, str] = {}
    flow_files = sorted((root / "flows").glob("*.y*ml")) if (root / "flows").is_dir() else []
    # Beside the flows, not flows: their tests and their pinned input contracts.
    flow_files = [f for f in flow_files if not f.name.endswith((".test.yaml", ".test.yml", ".contract.yaml"))]
    if not flow_files:
        problems.append(Problem(_rel(root), 0, "no flows: add a file under flows/ (see `patchbay init`)"))
    for f in flow_files:
        src = parse(f)
        if src is None:
            continue
        flow = load_flow(src, f.stem, systems, settings, problems, broken)
        if flow is None:
            continue
        if flow.name in flows:
            other = flows[flow.name]
            problems.append(
                src.problem(
                    ("name",),
                    f"duplicate flow name {flow.name!r} (also in {other.file}:{other.line}); rename one",
                )
            )
            continue
        wp = flow.webhook_path
        if wp is not None:
            if wp in paths:
                problems.append(
                    src.problem(
                        ("trigger", "webhook", "path"),
                        f"webhook path {wp} is already used by flow {paths[wp]!r}",
                    )
                )
            paths[wp] = flow.name
        flows[flow.name] = flow
        flow_srcs[flow.name] = src
        answers = [d.name for d in flow.destinations] + [s.name for s in flow.steps if s.name]
        flow.contract = _load_contract(root, flow.name, problems, answers)
    return flows, flow_srcs


def _load_contract(root: Path, flow: str, problems: list[Problem], answers: list[str]) -> Any:
    path = contract_path(root, flow)
    if not path.is_file():
        return None
    try:
        return load_contract(path, _rel(path), answers)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def _check_secrets(
    systems: dict[str, SystemSpec], secret_exists: SecretExists, problems: list[Problem]
) -> None:
    """Every secret a system references has a value, reported at the line that references it."""
    for s in systems.values():
        for ref in system_secret_refs(s):
            if not secret_exists(ref):
                hint = (
                    f"set it with `patchbay secrets set {ref.secret}`"
                    if ref.secret
                    else f"export the environment variable {ref.env}"
                )
                line = s.secret_lines.get(ref.label, s.line)
                problems.append(
                    Problem(s.file, line, f"system {s.name!r}: missing secret {ref.label}; {hint}")
                )


def load_or_raise(root: Path, secret_exists: SecretExists | None = None) -> Project:
    """The project at `root`; ConfigError with every problem when it has any."""
    project, problems = load_project(root, secret_exists)
    if project is None:
        raise ConfigError(problems)
    return project
