"""Load a project folder (patchbay.yaml, systems, flows) into specs, collecting every problem with file:line."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from patchbay import registry
from patchbay.config.models import (
    NAME_RE,
    AlertRule,
    DeliveryPolicy,
    HubSettings,
    SecretRef,
    Spec,
    SystemCommon,
    Trigger,
)
from patchbay.config.source import Loc, Located, load_yaml
from patchbay.errors import ConfigError, Problem

SecretExists = Callable[[SecretRef], bool]


# ---------------------------------------------------------------- specs the engine runs
@dataclass
class SystemSpec:
    name: str
    common: SystemCommon
    config: BaseModel | None
    file: str
    line: int
    secret_lines: dict[str, int] = field(default_factory=dict)  # "secret:NAME" -> line where it is referenced
    preset: dict[str, Any] | None = None  # the prebuilt definition it starts from (presets/<name>.yaml)
    src: Located | None = None  # the file it was loaded from, with the line of every setting

    @property
    def kind(self) -> str | None:
        return self.common.kind

    def line_of(self, *loc: str | int) -> int:
        """The line of a setting in the system's file (its own line when the file does not set it)."""
        return self.src.line((self.name, *loc)) if self.src is not None else self.line


@dataclass
class StepSpec:
    kind: str
    name: str
    config: BaseModel
    step: Any  # the Step instance
    when: Any | None = None  # compiled expression: apply the step only when truthy


@dataclass
class DestinationSpec:
    name: str
    system: str
    kind: str
    config: BaseModel
    policy: DeliveryPolicy
    when: Any | None = None


@dataclass
class SourceSpec:
    system: str
    kind: str
    mode: str  # poll | stream
    config: BaseModel


@dataclass
class FlowSpec:
    name: str
    purpose: str
    owner: str
    trigger: Trigger
    steps: list[StepSpec]
    destinations: list[DestinationSpec]
    record_key: str | None
    sensitive: list[str]
    enabled: bool
    file: str
    line: int
    source: SourceSpec | None = None
    alerts: list[AlertRule] = field(default_factory=list)
    encrypt_sensitive: bool = False  # the flow's setting, else the hub's
    contract: Any = None  # contracts.Contract pinned in flows/<name>.contract.yaml, if there is one

    @property
    def webhook_path(self) -> str | None:
        if self.trigger.webhook is None:
            return None
        return self.trigger.webhook.path or f"/hooks/{self.name}"

    def secret_refs(self, systems: dict[str, SystemSpec]) -> list[SecretRef]:
        """The credentials this flow declares: those of the systems it uses, nothing else."""
        names = {d.system for d in self.destinations}
        if self.trigger.webhook:
            names.add(self.trigger.webhook.system)
        if self.source:
            names.add(self.source.system)
        return [r for n in sorted(names) if n in systems for r in system_secret_refs(systems[n])]


@dataclass
class Project:
    root: Path
    settings: HubSettings
    systems: dict[str, SystemSpec] = field(default_factory=dict)
    flows: dict[str, FlowSpec] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / ".patchbay"

    @property
    def store_path(self) -> Path:
        p = Path(self.settings.store)
        return p if p.is_absolute() else self.root / p


def system_secret_refs(system: SystemSpec) -> list[SecretRef]:
    found: list[SecretRef] = []

    def walk(v: Any) -> None:
        if isinstance(v, SecretRef):
            found.append(v)
        elif isinstance(v, BaseModel):
            for name in type(v).model_fields:
                walk(getattr(v, name))
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(system.common)
    walk(system.config)
    return found


# ---------------------------------------------------------------- flow documents
class FlowDoc(Spec):
    name: str | None = Field(None, description="Flow name; default the file name without .yaml.")
    purpose: str = Field(description="Why this flow exists, in one sentence.")
    owner: str = Field(description="Team or person answerable for this flow.")
    enabled: bool = Field(
        True, description="A disabled flow rejects its webhooks with 503 and delivers nothing."
    )
    trigger: Trigger
    record_key: str | None = Field(
        None, description="Dotted path of the field runs are searched by (e.g. properties.email)."
    )
    sensitive: list[str] = Field(
        default_factory=list,
        description="Dotted paths redacted in traces and dead letters (e.g. card.number).",
    )
    encrypt_sensitive: bool | None = Field(
        None,
        description="Store the values at `sensitive` paths encrypted (payload and requests); default: "
        "the hub's `encrypt_sensitive`. Needs the project's master key.",
    )
    steps: list[dict[str, Any]] = Field(default_factory=list, description="Steps, in order.")
    destinations: list[dict[str, Any]] = Field(min_length=1, description="Where records go; at least one.")
    delivery: dict[str, Any] | None = Field(
        None, description="Delivery policy for every destination of this flow."
    )
    alerts: list[AlertRule] = Field(
        default_factory=list,
        description="Alert rules for this flow only, e.g. "
        "`- {when: destination_paused, notify: [ops-chat]}`.",
    )


class DestinationCommon(Spec):
    name: str = Field(pattern=NAME_RE, description="Destination name, unique in the flow.")
    system: str = Field(description="The system delivered to.")
    when: str | None = Field(None, description="Route: deliver only when this expression is truthy.")
    delivery: dict[str, Any] | None = Field(
        None, description="Delivery policy overrides for this destination."
    )


# ---------------------------------------------------------------- loading
def _did_you_mean(word: str, options: Iterable[str]) -> str:
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known: {', '.join(options) or 'none'})"


def pydantic_problems(
    src: Located, exc: ValidationError, base: Loc = (), model: type[BaseModel] | None = None
) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = tuple(base) + tuple(
            x for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "tagged-")))
        )
        kind = err["type"]
        where = ".".join(str(x) for x in err["loc"]) or "document"
        if kind == "extra_forbidden":
            key = str(err["loc"][-1])
            known = _known_fields(model, err["loc"][:-1]) if model else []
            msg = f"unknown setting {key!r}" + (_did_you_mean(key, known) if known else "; remove it")
        elif kind == "missing":
            msg = f"missing required setting {where!r}; add it"
            loc = loc[:-1] if len(loc) > len(base) else loc
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = f"{where}: {text}" if err["loc"] else text
        out.append(src.problem(loc, msg))
    return out


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        f = cur.model_fields.get(part) if hasattr(cur, "model_fields") else None
        if f is None:
            return []
        ann = f.annotation
        cur = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), None)
        if cur is None:
            return []
    return list(cur.model_fields) if hasattr(cur, "model_fields") else []


def _validate(src: Located, data: Any, model: type[BaseModel], base: Loc, problems: list[Problem]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.extend(pydantic_problems(src, exc, base, model))
        return None


def load_project(
    root: Path, secret_exists: SecretExists | None = None
) -> tuple[Project | None, list[Problem]]:
    """Load and check everything; a project is returned only when there are no problems."""
    registry.discover()
    root = Path(root)
    problems: list[Problem] = []
    if not root.is_dir():
        return None, [Problem(str(root), 0, "no such project folder; create one with `patchbay init DIR`")]

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return str(p)

    def parse(p: Path) -> Located | None:
        try:
            return load_yaml(p, rel(p))
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None

    settings = HubSettings()
    hub_file = root / "patchbay.yaml"
    hub_src: Located | None = None
    if hub_file.exists():
        src = hub_src = parse(hub_file)
        if src is not None:
            settings = _validate(src, src.data or {}, HubSettings, (), problems) or settings

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
            if not _load_system(src, name, body, systems, problems):
                broken.add(name)

    flows: dict[str, FlowSpec] = {}
    flow_srcs: dict[str, Located] = {}
    paths: dict[str, str] = {}
    flow_files = sorted((root / "flows").glob("*.y*ml")) if (root / "flows").is_dir() else []
    # Beside the flows, not flows: their tests and their pinned input contracts.
    flow_files = [f for f in flow_files if not f.name.endswith((".test.yaml", ".test.yml", ".contract.yaml"))]
    if not flow_files:
        problems.append(Problem(rel(root), 0, "no flows: add a file under flows/ (see `patchbay init`)"))
    for f in flow_files:
        src = parse(f)
        if src is None:
            continue
        flow = _load_flow(src, f.stem, systems, settings, problems, broken)
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
        flow.contract = _load_contract(root, flow.name, rel, problems)

    alert_docs: list[tuple[Located, list[AlertRule], FlowSpec | None]] = []
    if hub_src is not None:
        alert_docs.append((hub_src, settings.alerts, None))
    alert_docs += [(flow_srcs[n], f.alerts, f) for n, f in flows.items()]
    _check_alerts(alert_docs, systems, broken, problems)

    if secret_exists is not None:
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
    if problems:
        return None, problems
    return Project(root, settings, systems, flows), []


def _check_alerts(
    docs: list[tuple[Located, list[AlertRule], FlowSpec | None]],
    systems: dict[str, SystemSpec],
    broken: set[str],
    problems: list[Problem],
) -> None:
    """Each system an alert rule notifies must exist and be able to take its messages as a destination."""
    from patchbay.connectors.base import Resources
    from patchbay.engine.alerts import notify_config, split_notify

    for src, rules, flow in docs:
        for i, rule in enumerate(rules):
            if rule.when == "schedule_late" and flow is not None and flow.trigger.schedule is None:
                why = f"flow {flow.name!r} has no schedule, so it is never late"
                problems.append(src.problem(("alerts", i, "when"), why))
            for j, entry in enumerate(rule.notify):
                loc: Loc = ("alerts", i, "notify", j)
                name, settings, delivery = split_notify(entry)
                sysspec = systems.get(name)
                if sysspec is None:
                    if name not in broken:
                        problems.append(
                            src.problem(
                                loc,
                                f"unknown system {name!r} to notify"
                                + _did_you_mean(name, [*systems, *broken]),
                            )
                        )
                    continue
                found = registry.connector_for(sysspec.kind or "", "destination")
                if found is None:
                    what = f"is a {sysspec.kind}, which" if sysspec.kind else "has no `kind`, so it"
                    why = f"system {name!r} {what} cannot be a destination: alerts cannot be sent through it"
                    problems.append(src.problem(loc, why + "; notify a chat, smtp or http system"))
                    continue
                if delivery is not None and not isinstance(delivery, dict):
                    problems.append(
                        src.problem((*loc, "delivery"), "`delivery` is a mapping, e.g. {timeout_s: 5}")
                    )
                    continue
                try:
                    policy = DeliveryPolicy.model_validate({}).merged(delivery)
                except ValidationError as exc:
                    problems.extend(pydantic_problems(src, exc, (*loc, "delivery"), DeliveryPolicy))
                    continue
                try:
                    found[0](sysspec.config, notify_config(found[1], settings), policy, Resources())
                except ValidationError as exc:
                    problems.extend(
                        Problem(p.file, p.line, f"notify {name}: {p.message}")
                        for p in pydantic_problems(src, exc, loc, found[1])
                    )
                except ValueError as exc:  # a template that does not compile
                    problems.append(src.problem(loc, f"notify {name}: {exc}"))


def _load_system(
    src: Located, name: str, body: Any, systems: dict[str, SystemSpec], problems: list[Problem]
) -> bool:
    loc: Loc = (name,)
    if not re.match(NAME_RE, name):
        problems.append(
            src.problem(loc, f"bad system name {name!r}: use lower-case letters, digits, '-' and '_'")
        )
        return False
    if not isinstance(body, dict):
        problems.append(src.problem(loc, f"system {name!r}: expected a mapping of settings"))
        return False
    preset = None
    if "preset" in body:
        from patchbay import presets

        try:
            preset = presets.load(str(body["preset"]))
        except KeyError:
            problems.append(
                src.problem(
                    (*loc, "preset"),
                    f"system {name!r}: unknown preset {body['preset']!r}"
                    + _did_you_mean(str(body["preset"]), presets.available()),
                )
            )
            return False
        own = {k: v for k, v in body.items() if k != "preset"}
        body = presets.merge(preset.get("system", {}), own)
        if "webhook" in own and preset.get("webhook"):
            body["webhook"] = presets.merge(preset["webhook"], own["webhook"])
        own_auth = own.get("auth")
        if (
            isinstance(own_auth, dict)
            and str(own_auth.get("scheme", "")).startswith("oauth2")
            and preset.get("oauth2")
        ):
            body["auth"] = presets.merge(preset["oauth2"], own_auth)  # the vendor's endpoints and scopes
    common_keys = set(SystemCommon.model_fields)
    common = _validate(src, {k: v for k, v in body.items() if k in common_keys}, SystemCommon, loc, problems)
    if common is None:
        return False
    rest = {k: v for k, v in body.items() if k not in common_keys}
    config = None
    if common.kind is not None:
        entry = registry.CONNECTORS.get(common.kind)
        if entry is None:
            problems.append(
                src.problem(
                    (*loc, "kind"),
                    f"system {name!r}: unknown kind {common.kind!r}"
                    + _did_you_mean(common.kind, registry.CONNECTORS),
                )
            )
            return False
        assert entry.system_config is not None
        config = _validate(src, rest, entry.system_config, loc, problems)
        if config is None:
            return False
    elif rest:
        key = next(iter(rest))
        problems.append(
            src.problem(
                (*loc, key),
                f"system {name!r}: unknown setting {key!r}; settings other than "
                f"{', '.join(sorted(common_keys))} need a `kind`",
            )
        )
        return False
    refs: dict[str, int] = {}

    def walk(v: Any, at: Loc) -> None:
        if isinstance(v, dict):
            for kind in ("secret", "env"):
                if isinstance(v.get(kind), str):
                    refs.setdefault(f"{kind}:{v[kind]}", src.line((*at, kind)))
            for k, x in v.items():
                walk(x, (*at, k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, (*at, i))

    walk(body, loc)
    systems[name] = SystemSpec(name, common, config, src.file, src.line(loc), refs, preset, src)
    return True


def _load_flow(
    src: Located,
    stem: str,
    systems: dict[str, SystemSpec],
    settings: HubSettings,
    problems: list[Problem],
    broken: set[str],
) -> FlowSpec | None:
    from patchbay.processors.base import CheckIssue
    from patchbay.processors.expressions import ExprError, compile_expr, is_constant_false

    n0 = len(problems)
    if not isinstance(src.data, dict):
        problems.append(
            src.problem((), "a flow file is a mapping: purpose, owner, trigger, steps, destinations")
        )
        return None
    doc: FlowDoc | None = _validate(src, src.data, FlowDoc, (), problems)
    if doc is None:
        return None
    name = doc.name or stem
    if not re.match(NAME_RE, name):
        problems.append(
            src.problem(("name",), f"bad flow name {name!r}: use lower-case letters, digits, '-' and '_'")
        )
    if doc.trigger.webhook is not None:
        sysname = doc.trigger.webhook.system
        sysspec = systems.get(sysname)
        if sysspec is None:
            if sysname not in broken:
                problems.append(
                    src.problem(
                        ("trigger", "webhook", "system"),
                        f"unknown system {sysname!r}" + _did_you_mean(sysname, [*systems, *broken]),
                    )
                )
        elif sysspec.preset and sysspec.preset.get("trigger_defaults"):
            wt = doc.trigger.webhook
            for k, v in sysspec.preset["trigger_defaults"].items():
                if getattr(wt, k) is None and not (k == "id_path" and wt.id_header):
                    setattr(wt, k, v)
        if sysspec is not None and sysspec.common.webhook is None:
            problems.append(
                src.problem(
                    ("trigger", "webhook", "system"),
                    f"system {sysname!r} has no `webhook:` settings; "
                    "add how it authenticates (e.g. scheme: standard_webhooks)",
                )
            )

    source = _load_source(src, doc.trigger, systems, broken, problems)

    def expr(text: str, loc: Loc) -> Any:
        try:
            return compile_expr(text)
        except ExprError as exc:
            problems.append(src.problem(loc, str(exc)))
            return None

    steps: list[StepSpec] = []
    stopped_at: int | None = None
    for i, raw in enumerate(doc.steps):
        loc: Loc = ("steps", i)
        if stopped_at is not None:
            problems.append(
                src.problem(
                    loc,
                    f"unreachable step: step {stopped_at + 1} never lets a record through; "
                    "remove this step or fix that condition",
                )
            )
            continue
        meta = {k: raw[k] for k in ("name", "when") if k in raw}
        kinds = [k for k in raw if k not in ("name", "when")]
        if len(kinds) != 1:
            problems.append(
                src.problem(
                    loc,
                    "a step is one of "
                    + ", ".join(sorted(registry.STEPS))
                    + " (with optional name/when), e.g. `- map: {...}`",
                )
            )
            continue
        kind = kinds[0]
        entry = registry.STEPS.get(kind)
        if entry is None:
            problems.append(
                src.problem((*loc, kind), f"unknown step {kind!r}" + _did_you_mean(kind, registry.STEPS))
            )
            continue
        cfg = _validate(src, raw[kind], entry.config, (*loc, kind), problems)
        if cfg is None:
            continue
        issues: list[CheckIssue] = list(entry.cls.check(cfg))
        for issue in issues:
            problems.append(src.problem((*loc, kind, *issue.loc), f"{kind}: {issue.message}"))
        when = None
        if "when" in meta:
            when = expr(str(meta["when"]), (*loc, "when"))
            if when is not None and is_constant_false(when):
                problems.append(
                    src.problem((*loc, "when"), "this step's `when` is always false: the step never runs")
                )
        if any("never passes" in i.message for i in issues):
            stopped_at = i
        if issues:
            continue
        try:
            instance = entry.cls(cfg)
        except Exception as exc:  # a step's own constructor may refuse a config its check missed
            problems.append(src.problem((*loc, kind), f"{kind}: {exc}"))
            continue
        steps.append(StepSpec(kind, str(meta.get("name", kind)), cfg, instance, when))

    flow_policy = settings.delivery
    if doc.delivery:
        try:
            flow_policy = flow_policy.merged(doc.delivery)
        except ValidationError as exc:
            problems.extend(pydantic_problems(src, exc, ("delivery",), DeliveryPolicy))

    dests: list[DestinationSpec] = []
    seen: set[str] = set()
    common_keys = set(DestinationCommon.model_fields)
    typed: list[tuple[str, dict[str, str], list[str]]] = []  # destinations whose operation lists its fields
    for i, raw in enumerate(doc.destinations):
        loc = ("destinations", i)
        if not isinstance(raw, dict):
            problems.append(src.problem(loc, "a destination is a mapping: name, system, and its settings"))
            continue
        if stopped_at is not None:
            problems.append(
                src.problem(
                    loc, f"unreachable destination: step {stopped_at + 1} never lets a record through"
                )
            )
            continue
        if "operation" in raw or "vars" in raw or "custom_fields" in raw:
            applied = _apply_operation(src, loc, raw, systems, problems, typed)
            if applied is None:
                continue
            raw = applied
        common = _validate(
            src, {k: v for k, v in raw.items() if k in common_keys}, DestinationCommon, loc, problems
        )
        if common is None:
            continue
        if common.name in seen:
            problems.append(
                src.problem((*loc, "name"), f"duplicate destination name {common.name!r} in this flow")
            )
            continue
        seen.add(common.name)
        policy = flow_policy
        if common.delivery:
            try:
                policy = flow_policy.merged(common.delivery)
            except ValidationError as exc:
                problems.extend(pydantic_problems(src, exc, (*loc, "delivery"), DeliveryPolicy))
        sysspec = systems.get(common.system)
        if sysspec is None:
            if common.system not in broken:
                problems.append(
                    src.problem(
                        (*loc, "system"),
                        f"unknown system {common.system!r}"
                        + _did_you_mean(common.system, [*systems, *broken]),
                    )
                )
            else:
                problems.append(
                    src.problem(
                        (*loc, "system"), f"system {common.system!r} has problems (above); fix them first"
                    )
                )
            continue
        if sysspec.kind is None:
            problems.append(
                src.problem(
                    (*loc, "system"),
                    f"system {common.system!r} has no `kind`, so nothing can be delivered to it",
                )
            )
            continue
        found = registry.connector_for(sysspec.kind, "destination")
        if found is None:
            problems.append(
                src.problem(
                    (*loc, "system"),
                    f"system {common.system!r} is a {sysspec.kind}, which cannot be a destination",
                )
            )
            continue
        _, cfg_model = found
        cfg = _validate(src, {k: v for k, v in raw.items() if k not in common_keys}, cfg_model, loc, problems)
        when = None
        if common.when is not None:
            when = expr(common.when, (*loc, "when"))
            if when is not None and is_constant_false(when):
                problems.append(
                    src.problem((*loc, "when"), "unreachable destination: its `when` is always false")
                )
        if cfg is None:
            continue
        try:  # building it compiles its templates and expressions: their errors belong to `check`
            from patchbay.connectors.base import Resources

            found[0](sysspec.config, cfg, policy, Resources())
        except ExprError as exc:
            problems.append(src.problem(loc, f"destination {common.name}: {exc}"))
            continue
        except ConfigError as exc:  # e.g. a missing driver, with its install hint
            problems.append(src.problem(loc, f"destination {common.name}: {exc.problems[0].message}"))
            continue
        except ValueError as exc:
            problems.append(src.problem(loc, f"destination {common.name}: {exc}"))
            continue
        dests.append(DestinationSpec(common.name, common.system, sysspec.kind, cfg, policy, when))
    from patchbay import presets

    for at, message in presets.mapped_field_problems(doc.steps, typed, len(doc.destinations)):
        problems.append(src.problem(at, message))
    if len(problems) > n0:
        return None
    return FlowSpec(
        name,
        doc.purpose,
        doc.owner,
        doc.trigger,
        steps,
        dests,
        doc.record_key,
        doc.sensitive,
        doc.enabled,
        src.file,
        src.line(()),
        source,
        doc.alerts,
        settings.encrypt_sensitive if doc.encrypt_sensitive is None else doc.encrypt_sensitive,
    )


def _apply_operation(
    src: Located,
    loc: Loc,
    raw: dict[str, Any],
    systems: dict[str, SystemSpec],
    problems: list[Problem],
    typed: list[tuple[str, dict[str, str], list[str]]] | None = None,
) -> dict[str, Any] | None:
    """A destination naming a preset's operation: the operation's settings under the destination's own.

    When the operation lists its `fields`, (name, fields, custom_fields) is added to `typed` so the
    flow's mapping can be checked against them.
    """
    from patchbay import presets

    raw = dict(raw)
    op_name, variables = raw.pop("operation", None), raw.pop("vars", None) or {}
    custom = raw.pop("custom_fields", None) or []
    if not isinstance(custom, list) or not all(isinstance(c, str) for c in custom):
        problems.append(
            src.problem(
                (*loc, "custom_fields"), "`custom_fields` is a list of field paths, e.g. [properties.plan]"
            )
        )
        return None
    sysspec = systems.get(str(raw.get("system")))
    if sysspec is None:
        return raw  # reported as an unknown system by the caller
    preset = sysspec.preset or {}
    ops = preset.get("operations", {})
    if op_name is None:
        if variables or not custom:
            message, at = "`vars` fill a preset operation's ${...}: add `operation`", (*loc, "vars")
        else:
            message, at = (
                "`custom_fields` extend a preset operation's fields: add `operation`",
                (
                    *loc,
                    "custom_fields",
                ),
            )
        problems.append(src.problem(at, message))
        return None
    if op_name not in ops:
        where = (
            f"preset of system {sysspec.name!r}" if preset else f"system {sysspec.name!r} (it has no preset)"
        )
        problems.append(
            src.problem(
                (*loc, "operation"),
                f"unknown operation {op_name!r} in the {where}" + _did_you_mean(str(op_name), ops),
            )
        )
        return None
    missing: set[str] = set()
    op = presets.fill(presets.settings_of(ops[op_name]), variables, missing)
    if missing:
        problems.append(
            src.problem(
                (*loc, "operation"), f"operation {op_name!r} needs `vars:` " + ", ".join(sorted(missing))
            )
        )
        return None
    fields = presets.operation_fields(ops[op_name])
    if fields is not None and typed is not None:
        typed.append((str(raw.get("name", op_name)), fields, custom))
    return presets.merge(op, raw)


def _load_source(
    src: Located, trigger: Trigger, systems: dict[str, SystemSpec], broken: set[str], problems: list[Problem]
) -> SourceSpec | None:
    if trigger.source is None:
        return None
    loc: Loc = ("trigger", "source")
    settings = dict(trigger.source)
    name = settings.pop("system")
    sysspec = systems.get(name)
    if sysspec is None:
        if name not in broken:
            problems.append(
                src.problem(
                    (*loc, "system"), f"unknown system {name!r}" + _did_you_mean(name, [*systems, *broken])
                )
            )
        return None
    found = registry.connector_for(sysspec.kind or "", "source")
    if found is None:
        kinds = sorted(k for k, e in registry.CONNECTORS.items() if "source" in e.roles)
        problems.append(
            src.problem(
                (*loc, "system"),
                f"system {name!r} ({sysspec.kind}) cannot be a source; source kinds: {', '.join(kinds)}",
            )
        )
        return None
    cls, model = found
    if "read" in settings:  # a preset's ready-made read: its settings under the source's own
        from patchbay import presets

        read_name, reads = settings.pop("read"), (sysspec.preset or {}).get("reads", {})
        if read_name not in reads:
            where = f"preset of system {name!r}" if sysspec.preset else f"system {name!r} (it has no preset)"
            problems.append(
                src.problem(
                    (*loc, "read"),
                    f"unknown read {read_name!r} in the {where}" + _did_you_mean(str(read_name), reads),
                )
            )
            return None
        settings = presets.merge(presets.settings_of(reads[read_name]), settings)
    cfg = _validate(src, settings, model, loc, problems)
    if cfg is None:
        return None
    mode = getattr(cls, "mode", "poll")
    if mode == "poll" and trigger.schedule is None:
        problems.append(
            src.problem(
                loc,
                f"a {sysspec.kind} source is polled: add `schedule: {{every: 5m}}` (or cron) to the trigger",
            )
        )
        return None
    if mode == "stream" and trigger.schedule is not None:
        problems.append(
            src.problem(
                ("trigger", "schedule"),
                f"a {sysspec.kind} source is consumed continuously; remove `schedule`",
            )
        )
        return None
    return SourceSpec(name, sysspec.kind or "", mode, cfg)


def _load_contract(root: Path, flow: str, rel: Callable[[Path], str], problems: list[Problem]) -> Any:
    from patchbay.contracts import contract_path, load_contract

    path = contract_path(root, flow)
    if not path.is_file():
        return None
    try:
        return load_contract(path, rel(path))
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def load_or_raise(root: Path, secret_exists: SecretExists | None = None) -> Project:
    project, problems = load_project(root, secret_exists)
    if project is None:
        raise ConfigError(problems)
    return project
