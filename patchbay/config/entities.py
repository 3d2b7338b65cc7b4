"""Entities (entities/*.yaml): fields, match rules, who owns each field, how each system maps them.

An entity is what several systems hold a copy of (a customer in the CRM, the billing system and the
marketing tool). `check` proves its rules here: every field has one owner or a rule for a shared field,
each system that takes part maps the fields it reads and writes, and no flow writes an owned field into
its owner from elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from patchbay.config.durations import Duration
from patchbay.config.models import NAME_RE, Spec
from patchbay.config.problems import compile_at, did_you_mean, validate
from patchbay.config.source import Located
from patchbay.config.specs import FlowSpec, SystemSpec
from patchbay.errors import Problem
from patchbay.expressions import Expr

PURE_STEPS = frozenset({"map", "validate", "filter"})  # what a sync step runs before the identity map


class FieldRule(Spec):
    """Who decides a field's value: one owner system, or a rule for a field several systems edit."""

    owner: str | None = Field(
        None,
        description="The system that is the source of truth for this field. A change made anywhere else is "
        "recorded as a conflict and the owner's value is written back.",
    )
    rule: Literal["latest", "first", "manual"] | None = Field(
        None,
        description="For a shared field (no owner): `latest` (the newest change wins, by `clock`), `first` "
        "(the first value ever seen stays), `manual` (a person decides: concurrent changes wait in the "
        "conflict queue). Every concurrent change is recorded as a conflict, even when the rule settles it.",
    )
    clock: Literal["hub", "system"] = Field(
        "hub",
        description="latest: which clock says what is newest: `hub` (when the hub received the change) or "
        "`system` (the record's own time, read at the system's `clock` path).",
    )

    @model_validator(mode="after")
    def _one(self) -> FieldRule:
        if (self.owner is None) == (self.rule is None):
            raise ValueError(
                "give a field either `owner: SYSTEM` or `rule: latest|first|manual`, not both or neither"
            )
        if self.clock != "hub" and self.rule != "latest":
            raise ValueError("`clock` goes with `rule: latest`")
        return self


class MatchRule(Spec):
    """How a record from one system is recognised as an entity the hub already knows."""

    field: str | None = Field(None, description="One entity field whose value identifies the entity.")
    fields: list[str] | None = Field(
        None, description="Or several entity fields that identify it together (a composite key)."
    )
    normalize: Literal["none", "email", "lower", "digits"] = Field(
        "none",
        description="How values are compared: none (as they are, trimmed), email (trimmed, lower case), "
        "lower (trimmed, lower case, inner spaces collapsed), digits (digits only: phone numbers).",
    )
    weak: bool = Field(
        False,
        description="A weak rule never links by itself: its matches go to the review queue "
        "(`patchbay identities review`).",
    )

    @model_validator(mode="after")
    def _one(self) -> MatchRule:
        if (self.field is None) == (self.fields is None):
            raise ValueError("a match rule has either `field: NAME` or `fields: [NAME, ...]`")
        if self.fields is not None and len(self.fields) < 2:
            raise ValueError("`fields` is for a composite key of two or more fields; use `field:` for one")
        return self

    @property
    def names(self) -> list[str]:
        return [self.field] if self.field is not None else list(self.fields or [])

    @property
    def label(self) -> str:
        return "+".join(self.names)


class SystemMapping(Spec):
    """How one system's records hold the entity."""

    id: str = Field(description="Dotted path of the record's own id in this system's records (e.g. `id`).")
    fields: dict[str, str] = Field(
        description="Entity field -> dotted path in this system's records. The hub reads these fields from "
        "the system and writes them to it (under these names).",
        examples=[{"email": "email", "name": "full_name"}],
    )
    direction: Literal["both", "read", "write"] = Field(
        "both",
        description="both: the hub reads changes from this system and writes to it; read: only reads "
        "(one-way from it); write: only writes (one-way to it).",
    )
    deleted: str | None = Field(
        None,
        description="Expression over a record that is true when the record says it was deleted "
        "(e.g. `deleted_at != null`, or `type == 'contact.deleted'`).",
    )
    clock: str | None = Field(
        None,
        description="Dotted path of the record's own update time, or of a change sequence that grows with "
        "every change (e.g. `updated_at`, `seq`). It orders the reads of one record: a read older than one "
        "already applied (a webhook arriving out of order) is stale and ignored, never taken for a change. "
        "Fields with `rule: latest, clock: system` compare it across systems (then it must be a time).",
    )
    version: str | None = Field(
        None,
        description="Dotted path of the record's version as the system gives it (an ETag, a version "
        "number). The hub keeps the last one read and hands it to an update as `version`, for a "
        'compare-and-set the API offers, e.g. `headers: {If-Match: "{{ version }}"}`.',
    )


class DeletePolicy(Spec):
    policy: Literal["ignore", "archive", "propagate"] = Field(
        "ignore",
        description="What a delete in one system does elsewhere: ignore (unlink only), archive (an `archive` "
        "operation to the other systems), propagate (a `delete` operation to the other systems).",
    )
    max_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Guard: a batch that would bring the deletes within `window` above this share of the "
        "entity's identities is refused whole; the source stops and alerts.",
    )
    min_identities: int = Field(
        10, ge=0, description="The guard applies once the entity has at least this many identities."
    )
    window: Duration = Field(
        3600,
        ge=1,
        description="Guard: the deletes of this last period count with the batch's, so a mass delete read "
        "in many batches (or polls) stops once the share passes max_share, not batch by batch.",
    )


class EntityDoc(Spec):
    entity: str | None = Field(None, description="Entity name; default the file name without .yaml.")
    purpose: str = Field("", description="What this entity is, in one sentence.")
    fields: dict[str, FieldRule] = Field(
        description="Each field of the entity and who decides its value.",
        examples=[{"email": {"owner": "crm"}, "phone": {"rule": "latest"}}],
    )
    match: list[MatchRule] = Field(
        description="How records are matched across systems, in order; the first rule that finds an entity "
        "decides. One match links; several matches, or a weak rule, go to the review queue.",
    )
    systems: dict[str, SystemMapping] = Field(
        description="Each system that takes part, and how it maps fields."
    )
    deletes: DeletePolicy = Field(default_factory=DeletePolicy, description="What deletes do.")
    read_back_within: Duration = Field(
        300.0,
        description="A record the hub created is linked when its id comes back: in the destination's answer "
        "(`response: {id: ...}`) or when the system's own change feed reads the new record back. A create "
        "still unlinked after this long is checked again (its answer is read for the id) and, if still "
        "unlinked, flagged overdue: a warning in the log, `pending.overdue` in the entity's stats, and "
        "`identities show`. Checked again every such period until linked.",
        examples=["5m"],
    )


@dataclass
class EntitySpec:
    name: str
    doc: EntityDoc
    file: str
    line: int
    deleted: dict[str, Expr] = field(default_factory=dict)  # system -> compiled `deleted` expression

    @property
    def fields(self) -> dict[str, FieldRule]:
        return self.doc.fields

    @property
    def systems(self) -> dict[str, SystemMapping]:
        return self.doc.systems

    def owner(self, f: str) -> str | None:
        return self.doc.fields[f].owner

    def reads(self, system: str) -> bool:
        return self.doc.systems[system].direction in ("both", "read")

    def writes(self, system: str) -> bool:
        return self.doc.systems[system].direction in ("both", "write")


def load_entities(
    root: Path,
    parse: Any,
    systems: dict[str, SystemSpec],
    broken: set[str],
    problems: list[Problem],
) -> tuple[dict[str, EntitySpec], dict[str, Located]]:
    """The entities of entities/*.yaml by name, with the document each came from."""
    out: dict[str, EntitySpec] = {}
    srcs: dict[str, Located] = {}
    folder = root / "entities"
    for f in sorted(folder.glob("*.y*ml")) if folder.is_dir() else []:
        src = parse(f)
        if src is None:
            continue
        if not isinstance(src.data, dict):
            problems.append(src.problem((), "an entity file is a mapping: fields, match, systems"))
            continue
        ent = _load_entity(src, f.stem, systems, broken, problems)
        if ent is None:
            name = src.data.get("entity") or f.stem
            srcs[str(name)] = src  # known, but broken: flows that name it are not reported again
            continue
        if ent.name in out:
            problems.append(src.problem(("entity",), f"duplicate entity name {ent.name!r}; rename one"))
            continue
        out[ent.name] = ent
        srcs[ent.name] = src
    return out, srcs


def _load_entity(
    src: Located, stem: str, systems: dict[str, SystemSpec], broken: set[str], problems: list[Problem]
) -> EntitySpec | None:
    n0 = len(problems)
    doc: EntityDoc | None = validate(src, src.data, EntityDoc, (), problems)
    if doc is None:
        return None
    name = doc.entity or stem
    if not re.match(NAME_RE, name):
        problems.append(
            src.problem(("entity",), f"bad entity name {name!r}: use lower-case letters, digits, '-' and '_'")
        )
    known = set(doc.fields)
    for fname, rule in doc.fields.items():
        if rule.owner is not None:
            if rule.owner not in doc.systems:
                problems.append(
                    src.problem(
                        ("fields", fname, "owner"),
                        f"field {fname!r}: owner {rule.owner!r} does not take part in entity {name!r}; "
                        f"add it under `systems:`" + did_you_mean(rule.owner, doc.systems),
                    )
                )
            elif fname not in doc.systems[rule.owner].fields:
                problems.append(
                    src.problem(
                        ("fields", fname, "owner"),
                        f"field {fname!r} is owned by {rule.owner!r}, which does not map it; add "
                        f"`{fname}: <path>` to systems.{rule.owner}.fields",
                    )
                )
            elif doc.systems[rule.owner].direction not in ("both", "read"):
                problems.append(
                    src.problem(
                        ("fields", fname, "owner"),
                        f"field {fname!r} is owned by {rule.owner!r}, which the hub never reads "
                        "(direction: write); the owner must be read",
                    )
                )
        if rule.clock == "system":
            for sname, m in doc.systems.items():
                if fname in m.fields and m.direction != "write" and m.clock is None:
                    problems.append(
                        src.problem(
                            ("systems", sname),
                            f"field {fname!r} trusts the systems' clock: give systems.{sname}.clock "
                            "(the path of its records' update time)",
                        )
                    )
    for i, rule_ in enumerate(doc.match):
        for fname in rule_.names:
            if fname not in known:
                problems.append(
                    src.problem(
                        ("match", i),
                        f"match rule {i + 1}: unknown field {fname!r}" + did_you_mean(fname, known),
                    )
                )
    if doc.match and all(m.weak for m in doc.match):
        problems.append(
            src.problem(("match",), "every match rule is weak: nothing would ever link; make one rule strong")
        )
    deleted: dict[str, Expr] = {}
    for sname, m in doc.systems.items():
        if sname not in systems:
            if sname not in broken:
                problems.append(
                    src.problem(
                        ("systems", sname), f"unknown system {sname!r}" + did_you_mean(sname, systems)
                    )
                )
            continue
        for fname in m.fields:
            if fname not in known:
                problems.append(
                    src.problem(
                        ("systems", sname, "fields", fname),
                        f"system {sname!r} maps {fname!r}, which is not a field of {name!r}"
                        + did_you_mean(fname, known),
                    )
                )
        if m.direction != "write":
            for j, mr in enumerate(doc.match):
                if not mr.weak and not all(f in m.fields for f in mr.names):
                    problems.append(
                        src.problem(
                            ("systems", sname, "fields"),
                            f"system {sname!r} does not map {mr.label!r}, which match rule "
                            f"{j + 1} needs to recognise its records; map it",
                        )
                    )
                    break
        if m.deleted is not None:
            expr = compile_at(src, m.deleted, ("systems", sname, "deleted"), problems)
            if expr is not None:
                deleted[sname] = expr
    if len(doc.systems) < 2:
        problems.append(
            src.problem(("systems",), f"entity {name!r} needs two or more systems to sync between")
        )
    if len(problems) > n0:
        return None
    return EntitySpec(name, doc, src.file, src.line(()), deleted)


def check_sync_flows(
    entities: dict[str, EntitySpec],
    flows: dict[str, FlowSpec],
    flow_srcs: dict[str, Located],
    problems: list[Problem],
    broken: frozenset[str] | set[str] = frozenset(),
) -> None:
    """A sync flow feeds a known entity from a system that takes part; no flow writes an owned field into
    its owner from elsewhere."""
    for flow in flows.values():
        src = flow_srcs.get(flow.name)
        if src is None:
            continue
        origin = flow_origin(flow)
        if flow.sync is not None:
            ent = entities.get(flow.sync)
            if ent is None and flow.sync in broken:
                continue
            if ent is None:
                problems.append(
                    src.problem(
                        ("sync",), f"unknown entity {flow.sync!r}" + did_you_mean(flow.sync, entities)
                    )
                )
                continue
            if origin is None or origin not in ent.systems:
                problems.append(
                    src.problem(
                        ("sync",),
                        f"a sync flow reads records of entity {ent.name!r} from its trigger's system; "
                        f"{origin!r} does not take part in it (known: {', '.join(ent.systems)})",
                    )
                )
            elif not ent.reads(origin):
                problems.append(
                    src.problem(
                        ("sync",),
                        f"entity {ent.name!r} says the hub never reads {origin!r} (direction: write)",
                    )
                )
            for i, st in enumerate(flow.steps):
                if st.kind not in PURE_STEPS:
                    problems.append(
                        src.problem(
                            ("steps", i),
                            f"step {st.name!r} ({st.kind}): a sync flow runs only {', '.join(sorted(PURE_STEPS))} "
                            "before the identity map; move it to a flow of its own",
                        )
                    )
            missing = [
                s for s in ent.systems if ent.writes(s) and s not in {d.system for d in flow.destinations}
            ]
            for s in missing:
                problems.append(
                    src.problem(
                        ("destinations",),
                        f"sync flow {flow.name!r} has no destination for {s!r}, which entity {ent.name!r} "
                        f"writes (its operations: create, update{', delete' if ent.doc.deletes.policy == 'propagate' else ''}"
                        f"{', archive' if ent.doc.deletes.policy == 'archive' else ''}); add one, or set "
                        f"systems.{s}.direction: read in {ent.file}",
                    )
                )
            for i, d in enumerate(flow.destinations):
                if d.system not in ent.systems:
                    problems.append(
                        src.problem(
                            ("destinations", i, "system"),
                            f"destination {d.name!r} of sync flow {flow.name!r}: system {d.system!r} does not "
                            f"take part in entity {ent.name!r}",
                        )
                    )
                elif not ent.writes(d.system):
                    problems.append(
                        src.problem(
                            ("destinations", i, "system"),
                            f"destination {d.name!r}: entity {ent.name!r} says the hub never writes to "
                            f"{d.system!r} (direction: read)",
                        )
                    )
            continue
        for i, d in enumerate(flow.destinations):
            for ent in entities.values():
                m = ent.systems.get(d.system)
                if m is None or origin == d.system:
                    continue
                written = _written_names(d.config)
                for fname, path in m.fields.items():
                    if ent.owner(fname) == d.system and path in written:
                        problems.append(
                            src.problem(
                                ("destinations", i),
                                f"destination {d.name!r} writes {path!r} into {d.system!r}, which owns "
                                f"{ent.name}.{fname}; a flow from {origin or 'elsewhere'!s} must not "
                                f"overwrite it: drop the field, or make this a `sync: {ent.name}` flow",
                            )
                        )


def flow_origin(flow: FlowSpec) -> str | None:
    """The system a flow's records come from (its webhook's or its source's), if it names one."""
    if flow.source is not None:
        return flow.source.system
    if flow.trigger.webhook is not None:
        return flow.trigger.webhook.system
    return None


def _written_names(config: Any) -> set[str]:
    """The top-level field or column names a destination writes, when its settings list them."""
    out: set[str] = set()
    for attr in ("columns", "body", "fields"):
        v = getattr(config, attr, None)
        if isinstance(v, dict):
            out |= {str(k).split(".", 1)[0] for k in v}
            out |= {str(k) for k in v}
    return out
