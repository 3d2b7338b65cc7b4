"""Loading a flow's destinations: preset operations, delivery policies, the connector's settings and `when`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from patchbay import presets, registry
from patchbay.config.models import NAME_RE, DeliveryPolicy, DestinationBatch, HubSettings, Spec
from patchbay.config.problems import compile_at, did_you_mean, pydantic_problems, validate
from patchbay.config.source import Loc, Located
from patchbay.config.specs import DestinationSpec, SystemSpec
from patchbay.errors import ConfigError, Problem
from patchbay.expressions import Expr, ExprError, compile_expr, is_constant, is_constant_false


class DestinationCommon(Spec):
    name: str = Field(pattern=NAME_RE, description="Destination name, unique in the flow.")
    system: str = Field(description="The system delivered to.")
    when: str | None = Field(
        None,
        description="Route: deliver only when this expression is true (false, null, '', [] and {} are "
        "false; every number, 0 included, is true).",
    )
    delivery: dict[str, Any] | None = Field(
        None, description="Delivery policy overrides for this destination."
    )
    order_by: str | None = Field(
        None,
        description="Per-key order: an expression over the record giving its key, e.g. `customer.id`. "
        "Deliveries of one key go to this destination one at a time in arrival order, across every "
        "worker: a retrying one holds the later ones of its key back (not other keys), a dead letter "
        "holds them until it is replayed or discarded. A record whose key is null is not ordered.",
    )
    batch: DestinationBatch | Literal[False] | None = Field(
        None,
        description="Send up to `max_records` due deliveries in one request (or what is due after "
        "`max_wait`), e.g. `{max_records: 100, max_wait: 2s}`; each record keeps its own outcome, "
        "retries and trace. Only for connectors that can batch (http); `false` turns off a preset "
        "operation's batching.",
    )


_COMMON_KEYS = frozenset(DestinationCommon.model_fields)


def load_destinations(
    src: Located,
    raws: list[dict[str, Any]],
    delivery: dict[str, Any] | None,
    settings: HubSettings,
    systems: dict[str, SystemSpec],
    broken: set[str],
    stopped_at: int | None,
    problems: list[Problem],
    typed: list[tuple[str, dict[str, str], list[str]]] | None = None,
) -> list[DestinationSpec]:
    """A flow's destinations; `delivery` is the flow's policy, `stopped_at` the step no record passes.

    Destinations naming a preset operation that lists its fields are added to `typed` as
    (name, fields, custom_fields), for the flow to check its mapping against.
    """
    flow_policy = settings.delivery
    if delivery:
        try:
            flow_policy = flow_policy.merged(delivery)
        except ValidationError as exc:
            problems.extend(pydantic_problems(src, exc, ("delivery",), DeliveryPolicy))
    dests: list[DestinationSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(raws):
        loc: Loc = ("destinations", i)
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
        dest = _load_destination(src, loc, raw, flow_policy, systems, broken, seen, problems, typed)
        if dest is not None:
            dests.append(dest)
    return dests


def _load_destination(
    src: Located,
    loc: Loc,
    raw: dict[str, Any],
    flow_policy: DeliveryPolicy,
    systems: dict[str, SystemSpec],
    broken: set[str],
    seen: set[str],
    problems: list[Problem],
    typed: list[tuple[str, dict[str, str], list[str]]] | None = None,
) -> DestinationSpec | None:
    if "operation" in raw or "vars" in raw or "custom_fields" in raw:
        applied = apply_operation(src, loc, raw, systems, problems, typed)
        if applied is None:
            return None
        raw = applied
    common = validate(
        src, {k: v for k, v in raw.items() if k in _COMMON_KEYS}, DestinationCommon, loc, problems
    )
    if common is None:
        return None
    if common.name in seen:
        problems.append(
            src.problem((*loc, "name"), f"duplicate destination name {common.name!r} in this flow")
        )
        return None
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
                    f"unknown system {common.system!r}" + did_you_mean(common.system, [*systems, *broken]),
                )
            )
        else:
            problems.append(
                src.problem(
                    (*loc, "system"), f"system {common.system!r} has problems (above); fix them first"
                )
            )
        return None
    if sysspec.kind is None:
        problems.append(
            src.problem(
                (*loc, "system"),
                f"system {common.system!r} has no `kind`, so nothing can be delivered to it",
            )
        )
        return None
    found = registry.connector_for(sysspec.kind, "destination")
    if found is None:
        problems.append(
            src.problem(
                (*loc, "system"),
                f"system {common.system!r} is a {sysspec.kind}, which cannot be a destination",
            )
        )
        return None
    cls, cfg_model = found
    cfg = validate(src, {k: v for k, v in raw.items() if k not in _COMMON_KEYS}, cfg_model, loc, problems)
    when = None
    if common.when is not None:
        when = compile_at(src, common.when, (*loc, "when"), problems)
        if when is not None and is_constant_false(when):
            problems.append(
                src.problem((*loc, "when"), "unreachable destination: its `when` is always false")
            )
    order_by = None
    if common.order_by is not None:
        order_by = _order_by(src, loc, common.order_by, problems)
    if cfg is None:
        return None
    try:  # building it compiles its templates and expressions: their errors belong to `check`
        built = registry.build_to_check(cls, sysspec.config, cfg, policy)
    except ExprError as exc:
        problems.append(src.problem(loc, f"destination {common.name}: {exc}"))
        return None
    except ConfigError as exc:  # e.g. a missing driver, with its install hint
        problems.append(src.problem(loc, f"destination {common.name}: {exc.problems[0].message}"))
        return None
    except ValueError as exc:
        problems.append(src.problem(loc, f"destination {common.name}: {exc}"))
        return None
    batch = common.batch or None
    if batch is not None and not _batch_ok(src, loc, batch, built, sysspec, problems):
        return None
    return DestinationSpec(common.name, common.system, sysspec.kind, cfg, policy, when, batch, order_by)


def _order_by(src: Located, loc: Loc, text: str, problems: list[Problem]) -> Expr | None:
    at = (*loc, "order_by")
    try:
        expr = compile_expr(text)
    except ExprError as exc:
        problems.append(
            src.problem(at, f"order_by: {exc}; write an expression over the record, e.g. customer.id")
        )
        return None
    if is_constant(expr):
        problems.append(
            src.problem(
                at,
                f"order_by: it gives the same key for every record ({text!r}), which sends one delivery at a"
                " time; name the record's field that keys the order, e.g. customer.id",
            )
        )
        return None
    return expr


def _batch_ok(
    src: Located,
    loc: Loc,
    batch: DestinationBatch,
    sink: Any,
    sysspec: SystemSpec,
    problems: list[Problem],
) -> bool:
    """A destination's `batch:` fits its connector: it can batch, this request shape can be combined, and
    `max_records` is within the API's documented limit."""
    at = (*loc, "batch")
    if not callable(getattr(sink, "send_batch", None)):  # connectors/base.BatchSink
        problems.append(
            src.problem(
                at,
                f"system {sysspec.name!r} is a {sysspec.kind}, whose connector sends one record per "
                "request; remove `batch`",
            )
        )
        return False
    why = sink.batch_problem()
    if why:
        problems.append(src.problem(at, f"cannot batch: {why}"))
        return False
    limit = sink.batch_limit
    if limit is not None and batch.max_records > limit:
        problems.append(
            src.problem(
                (*at, "max_records"),
                f"max_records {batch.max_records} is beyond this API's documented limit of {limit} "
                f"records per request; write max_records: {limit} or less",
            )
        )
        return False
    return True


def apply_operation(
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
            message = "`custom_fields` extend a preset operation's fields: add `operation`"
            at = (*loc, "custom_fields")
        problems.append(src.problem(at, message))
        return None
    if op_name not in ops:
        where = (
            f"preset of system {sysspec.name!r}" if preset else f"system {sysspec.name!r} (it has no preset)"
        )
        problems.append(
            src.problem(
                (*loc, "operation"),
                f"unknown operation {op_name!r} in the {where}" + did_you_mean(str(op_name), ops),
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
