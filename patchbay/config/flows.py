"""Loading one flow file: its document, webhook trigger, source, steps, then its destinations."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from patchbay import presets, registry
from patchbay.config.batch import BatchSpec
from patchbay.config.destinations import load_destinations
from patchbay.config.models import NAME_RE, AlertRule, History, HubSettings, Spec, Trigger
from patchbay.config.problems import compile_at, did_you_mean, validate
from patchbay.config.source import Loc, Located
from patchbay.config.specs import FlowSpec, SourceSpec, StepSpec, SystemSpec
from patchbay.errors import Problem
from patchbay.expressions import is_constant_false


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
    destinations: list[dict[str, Any]] = Field(
        default_factory=list, description="Where records go; at least one (a batch flow has none)."
    )
    batch: BatchSpec | None = Field(
        None,
        description="A batch sync instead of destinations: rows move in bulk from a table or query to a table.",
    )
    delivery: dict[str, Any] | None = Field(
        None, description="Delivery policy for every destination of this flow."
    )
    sync: str | None = Field(
        None,
        description="Make this a sync flow of an entity (entities/<name>.yaml): each record from the trigger's "
        "system is linked in the identity map, and each destination gets an operation (`op`: create, update, "
        "delete, archive; `id`: the record's id in that system; `fields`: what that system should receive).",
    )
    history: dict[str, Any] | None = Field(
        None,
        description="Retention of this flow's finished runs (keep, keep_failures, compress_after); default the hub's.",
    )
    alerts: list[AlertRule] = Field(
        default_factory=list,
        description="Alert rules for this flow only, e.g. "
        "`- {when: destination_paused, notify: [ops-chat]}`.",
    )


def load_flow(
    src: Located,
    stem: str,
    systems: dict[str, SystemSpec],
    settings: HubSettings,
    problems: list[Problem],
    broken: set[str],
) -> FlowSpec | None:
    """The flow in `src`, or None with its problems added to `problems`."""
    n0 = len(problems)
    if not isinstance(src.data, dict):
        problems.append(
            src.problem((), "a flow file is a mapping: purpose, owner, trigger, steps, destinations")
        )
        return None
    doc: FlowDoc | None = validate(src, with_trigger_defaults(src.data, systems), FlowDoc, (), problems)
    if doc is None:
        return None
    name = doc.name or stem
    if not re.match(NAME_RE, name):
        problems.append(
            src.problem(("name",), f"bad flow name {name!r}: use lower-case letters, digits, '-' and '_'")
        )
    _check_webhook(src, doc.trigger, systems, broken, problems)
    source = load_source(src, doc.trigger, systems, broken, problems)
    steps, stopped_at = _load_steps(src, doc.steps, problems)
    _check_calls(src, doc.steps, systems, broken, problems)
    _check_bindings(src, doc.steps, doc.destinations, problems)
    typed: list[tuple[str, dict[str, str], list[str]]] = []  # destinations whose operation lists its fields
    dests = load_destinations(
        src, doc.destinations, doc.delivery, settings, systems, broken, stopped_at, problems, typed
    )
    for at, message in presets.mapped_field_problems(doc.steps, typed, len(doc.destinations)):
        problems.append(src.problem(at, message))
    _check_batch(src, doc, systems, broken, problems)
    if doc.batch is not None:  # a batch sync moves rows in bulk, not events through the store
        for i, sp in enumerate(steps):
            if hasattr(sp.step, "gate"):
                problems.append(
                    src.problem(
                        ("steps", i, sp.kind),
                        f"a {sp.kind} step runs on events, not in a batch sync: deduplicate or aggregate"
                        " in the query, or use a flow with a trigger and destinations",
                    )
                )
    waits = next((i for i, sp in enumerate(steps) if getattr(sp.step, "calls", False)), None)
    for i, sp in enumerate(steps):  # a run resumed after a call's answer does not settle them again
        if waits is not None and i > waits and hasattr(sp.step, "gate"):
            problems.append(
                src.problem(
                    ("steps", i, sp.kind),
                    f"a {sp.kind} step cannot come after a call step (step {waits + 1}) yet: put it before the call",
                )
            )
    history = _history(src, settings, doc.history, problems)
    if len(problems) > n0 or history is None:
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
        batch=doc.batch,
        sync=doc.sync,
        history=history,
    )


def _history(
    src: Located, settings: HubSettings, override: dict[str, Any] | None, problems: list[Problem]
) -> History | None:
    """The flow's retention: the hub's, with the flow's own settings over it."""
    if not override:
        return settings.history
    merged: History | None = validate(
        src, {**settings.history.model_dump(), **override}, History, ("history",), problems
    )
    return merged


def _check_batch(
    src: Located, doc: FlowDoc, systems: dict[str, SystemSpec], broken: set[str], problems: list[Problem]
) -> None:
    """A flow has destinations or a batch block; a batch block's systems can be read and written in bulk."""
    if doc.batch is None:
        if not doc.destinations:
            problems.append(
                src.problem(
                    ("destinations",), "no destinations: list where records go (or give a `batch:` block)"
                )
            )
        return
    if doc.destinations:
        problems.append(
            src.problem(("destinations",), "a batch flow writes to `batch.to`; remove `destinations`")
        )
    t = doc.trigger
    if t.webhook is not None or t.source is not None:
        problems.append(
            src.problem(
                ("trigger",),
                "a batch flow runs on a schedule or on demand: use `schedule:` and/or `manual: true`",
            )
        )
    for i, raw in enumerate(doc.steps):  # frames of rows, not events: nothing to wait on or fan out
        kind = next((k for k in (*CALLING_STEPS, "split") if isinstance(raw, dict) and k in raw), None)
        if kind is not None:
            problems.append(
                src.problem(
                    ("steps", i, kind),
                    f"{kind}: a batch sync's steps run over frames of rows; call, lookup and split are for "
                    "event flows (a SQL join in `batch.from.query` does a lookup's work here)",
                )
            )
    for side in ("from", "to"):
        name = getattr(doc.batch, "from_" if side == "from" else "to").system
        sysspec = systems.get(name)
        loc: Loc = ("batch", side, "system")
        if sysspec is None:
            if name not in broken:
                problems.append(
                    src.problem(loc, f"unknown system {name!r}" + did_you_mean(name, [*systems, *broken]))
                )
        elif registry.connector_for(sysspec.kind or "", "bulk") is None:
            kinds = sorted(k for k, e in registry.CONNECTORS.items() if "bulk" in e.roles)
            problems.append(
                src.problem(
                    loc,
                    f"system {name!r} ({sysspec.kind}) cannot take part in a batch sync;"
                    f" batch kinds: {', '.join(kinds)}",
                )
            )
        else:
            _check_bulk_side(src, doc.batch, side, sysspec, loc, problems)


def _check_bulk_side(
    src: Located, batch: Any, side: str, sysspec: SystemSpec, loc: Loc, problems: list[Problem]
) -> None:
    """What the system's bulk connector says of its side of the batch block (a missing driver, a bad setting)."""
    found = registry.connector_for(sysspec.kind or "", "bulk")
    check = getattr(found[0], "check_batch", None) if found is not None else None
    if check is not None:
        for message in check(sysspec.config, side, batch):
            problems.append(src.problem(("batch", side), message))
    elif side == "to" and batch.to.format is not None:
        problems.append(
            src.problem(
                ("batch", side, "format"),
                f"`format` is for a files destination; {sysspec.kind} writes a table",
            )
        )
    elif side == "from" and (batch.from_.files is not None or batch.from_.api is not None):
        problems.append(
            src.problem(
                ("batch", side),
                f"system {batch.from_.system!r} ({sysspec.kind}) is a database: read it with `table` or"
                " `query` (`files` is for a files system, `api` for an http system)",
            )
        )


def with_trigger_defaults(data: dict[str, Any], systems: dict[str, SystemSpec]) -> dict[str, Any]:
    """The flow document with its webhook system's preset `trigger_defaults` filled in where the flow
    gives none; applied before validation, so the defaults are checked like the flow's own settings."""
    trigger = data.get("trigger")
    webhook = trigger.get("webhook") if isinstance(trigger, dict) else None
    if not isinstance(trigger, dict) or not isinstance(webhook, dict):
        return data
    name = webhook.get("system")
    sysspec = systems.get(name) if isinstance(name, str) else None
    defaults = (sysspec.preset or {}).get("trigger_defaults") if sysspec is not None else None
    if not defaults:
        return data
    filled = dict(webhook)
    for k, v in defaults.items():
        if filled.get(k) is None and not (k == "id_path" and filled.get("id_header")):
            filled[k] = v
    return {**data, "trigger": {**trigger, "webhook": filled}}


def _check_webhook(
    src: Located, trigger: Trigger, systems: dict[str, SystemSpec], broken: set[str], problems: list[Problem]
) -> None:
    """A webhook trigger's system exists and says how it authenticates."""
    if trigger.webhook is None:
        return
    sysname = trigger.webhook.system
    sysspec = systems.get(sysname)
    if sysspec is None:
        if sysname not in broken:
            problems.append(
                src.problem(
                    ("trigger", "webhook", "system"),
                    f"unknown system {sysname!r}" + did_you_mean(sysname, [*systems, *broken]),
                )
            )
    elif sysspec.common.webhook is None:
        problems.append(
            src.problem(
                ("trigger", "webhook", "system"),
                f"system {sysname!r} has no `webhook:` settings; "
                "add how it authenticates (e.g. scheme: standard_webhooks)",
            )
        )


CALLING_STEPS = ("call", "lookup")


def _check_calls(
    src: Located,
    raws: list[dict[str, Any]],
    systems: dict[str, SystemSpec],
    broken: set[str],
    problems: list[Problem],
) -> None:
    """Steps that ask a system: the system exists and can be asked; names and `as` names are unique (a
    call's idempotency key is `<event>.<step name>`)."""
    names: dict[str, int] = {}
    bound: dict[str, int] = {}
    for i, raw in enumerate(raws):
        kind = next((k for k in CALLING_STEPS if isinstance(raw, dict) and k in raw), None)
        if kind is None or not isinstance(raw[kind], dict):
            continue
        cfg, loc = raw[kind], ("steps", i, kind)
        sysname = cfg.get("system")
        if isinstance(sysname, str) and sysname not in broken:
            system = systems.get(sysname)
            if system is None:
                problems.append(
                    src.problem(
                        (*loc, "system"),
                        f"{kind}: unknown system {sysname!r}" + did_you_mean(sysname, [*systems, *broken]),
                    )
                )
            elif cfg.get("query") is not None and kind == "lookup":
                found = registry.connector_for(system.kind or "", "source")
                if found is None or getattr(found[0], "dialect", None) is None:
                    problems.append(
                        src.problem(
                            (*loc, "system"),
                            f"lookup: a query needs a SQL system (postgres, mysql, sqlite); {sysname!r} is "
                            f"{system.kind or 'not a connector system'}",
                        )
                    )
            elif system.kind != "http":
                problems.append(
                    src.problem(
                        (*loc, "system"),
                        f"{kind}: system {sysname!r} ({system.kind or 'no kind'}) cannot be called; "
                        "use an http system",
                    )
                )
        name = str(raw.get("name", kind))
        if name in names:
            problems.append(
                src.problem(
                    ("steps", i),
                    f"{kind}: another call step (step {names[name] + 1}) is named {name!r}; give each call "
                    "a unique `name:` (it is part of the call's idempotency key)",
                )
            )
        names.setdefault(name, i)
        as_ = cfg.get("as")
        if isinstance(as_, str):
            if as_ in bound:
                problems.append(
                    src.problem(
                        (*loc, "as"),
                        f"{kind}: step {bound[as_] + 1} already binds {as_!r}; choose another name",
                    )
                )
            bound.setdefault(as_, i)


_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)


def _answer_reads(value: Any) -> Iterator[str]:
    """The names read as a call's answer (`X.body…`, `X.status`) in the expressions and templates of
    a step's or destination's settings; text that is not an expression reads nothing."""
    from patchbay.expressions import ExprError, compile_expr

    if isinstance(value, dict):
        for v in value.values():
            yield from _answer_reads(v)
    elif isinstance(value, list):
        for v in value:
            yield from _answer_reads(v)
    elif isinstance(value, str):
        texts = _TEMPLATE.findall(value) if "{{" in value else [value]
        for text in texts:
            try:
                expr = compile_expr(text.strip())
            except ExprError:
                continue
            yield from _answer_names(expr.ast)


def _answer_names(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        kids = node.get("children") or []
        if node.get("type") == "subexpression" and len(kids) >= 2:
            head, tail = kids[0], kids[1]
            if (
                head.get("type") == "field"
                and tail.get("type") == "field"
                and tail.get("value") in ("body", "status")
            ):
                yield str(head.get("value"))
        for k in kids:
            yield from _answer_names(k)


def _check_bindings(
    src: Located, raws: list[dict[str, Any]], dests: list[dict[str, Any]], problems: list[Problem]
) -> None:
    """An answer read before the step that binds it, or under a name close to a bound one (a typo)."""
    bound: dict[str, int] = {}
    for i, raw in enumerate(raws):
        kind = next((k for k in CALLING_STEPS if isinstance(raw, dict) and k in raw), None)
        if kind is not None and isinstance(raw[kind], dict) and isinstance(raw[kind].get("as"), str):
            bound.setdefault(raw[kind]["as"], i)
    if not bound:
        return
    users = [(("steps", i), i, raw) for i, raw in enumerate(raws)]
    users += [(("destinations", j), len(raws), d) for j, d in enumerate(dests)]
    for loc, at, raw in users:
        for name in dict.fromkeys(_answer_reads(raw)):
            if name in bound and bound[name] >= at:
                problems.append(
                    src.problem(
                        loc,
                        f"reads {name}'s answer, which step {bound[name] + 1} binds later; "
                        "move this after that step",
                    )
                )
            elif name not in bound and difflib.get_close_matches(name, list(bound), n=1):
                problems.append(
                    src.problem(loc, f"no call or lookup binds {name!r}" + did_you_mean(name, list(bound)))
                )


def _load_steps(
    src: Located, raws: list[dict[str, Any]], problems: list[Problem]
) -> tuple[list[StepSpec], int | None]:
    """The steps, and the index of the first step no record gets through (None: every step may pass)."""
    steps: list[StepSpec] = []
    stopped_at: int | None = None
    for i, raw in enumerate(raws):
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
                src.problem((*loc, kind), f"unknown step {kind!r}" + did_you_mean(kind, registry.STEPS))
            )
            continue
        cfg = validate(src, raw[kind], entry.config, (*loc, kind), problems)
        if cfg is None:
            continue
        issues: list[registry.CheckIssue] = list(entry.cls.check(cfg))
        for issue in issues:
            problems.append(src.problem((*loc, kind, *issue.loc), f"{kind}: {issue.message}"))
        when = None
        if "when" in meta:
            when = compile_at(src, str(meta["when"]), (*loc, "when"), problems)
            if when is not None and is_constant_false(when):
                problems.append(
                    src.problem((*loc, "when"), "this step's `when` is always false: the step never runs")
                )
        if any(issue.never_passes for issue in issues):
            stopped_at = i
        if issues:
            continue
        try:
            instance = entry.cls(cfg)
        except Exception as exc:  # a step's own constructor may refuse a config its check missed
            problems.append(src.problem((*loc, kind), f"{kind}: {exc}"))
            continue
        name = str(meta.get("name", kind))
        if hasattr(instance, "gate") and any(
            s.name == name for s in steps
        ):  # its state is kept under its name
            problems.append(
                src.problem(
                    loc,
                    f"two steps are named {name!r}; a {kind} step keeps its state under its name:"
                    " give each a `name:` of its own",
                )
            )
            continue
        steps.append(StepSpec(kind, name, cfg, instance, when))
    return steps, stopped_at


def load_source(
    src: Located, trigger: Trigger, systems: dict[str, SystemSpec], broken: set[str], problems: list[Problem]
) -> SourceSpec | None:
    """The trigger's `source:`: a system whose connector can be a source, polled or consumed as it says."""
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
                    (*loc, "system"), f"unknown system {name!r}" + did_you_mean(name, [*systems, *broken])
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
        read_name, reads = settings.pop("read"), (sysspec.preset or {}).get("reads", {})
        if read_name not in reads:
            where = f"preset of system {name!r}" if sysspec.preset else f"system {name!r} (it has no preset)"
            problems.append(
                src.problem(
                    (*loc, "read"),
                    f"unknown read {read_name!r} in the {where}" + did_you_mean(str(read_name), reads),
                )
            )
            return None
        settings = presets.merge(presets.settings_of(reads[read_name]), settings)
    cfg = validate(src, settings, model, loc, problems)
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
