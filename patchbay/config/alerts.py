"""Alert rules' `notify` targets: how an entry names a system, and the destination config that carries messages.

The loader checks every target with these at load time; the engine's alerts build their internal
flow's destinations with the same two functions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from patchbay import registry
from patchbay.config.models import AlertRule, DeliveryPolicy
from patchbay.config.problems import did_you_mean, pydantic_problems
from patchbay.config.source import Loc, Located
from patchbay.config.specs import FlowSpec, SystemSpec
from patchbay.errors import Problem

# A message's title and text fill these settings of a notify destination, when it has them.
MESSAGE_FIELDS = {
    "title": "{{ title }}",
    "subject": "{{ title }}",
    "text": "{{ text }}",
    "message": "{{ text }}",
}


def split_notify(entry: str | dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """A notify entry as (system, destination settings, delivery policy overrides)."""
    if isinstance(entry, str):
        return entry, {}, None
    settings = {k: v for k, v in entry.items() if k not in ("system", "delivery")}
    return str(entry["system"]), settings, entry.get("delivery")


def notify_config(model: type[BaseModel], settings: dict[str, Any]) -> BaseModel:
    """The destination config that carries alert messages: `settings`, plus the message fields it has."""
    filled = {k: v for k, v in MESSAGE_FIELDS.items() if k in model.model_fields}
    return model.model_validate({**filled, **settings})


def check_alerts(
    docs: list[tuple[Located, list[AlertRule], FlowSpec | None]],
    systems: dict[str, SystemSpec],
    broken: set[str],
    problems: list[Problem],
) -> None:
    """Each system an alert rule notifies must exist and be able to take its messages as a destination."""
    for src, rules, flow in docs:
        for i, rule in enumerate(rules):
            if rule.when == "schedule_late" and flow is not None and flow.trigger.schedule is None:
                why = f"flow {flow.name!r} has no schedule, so it is never late"
                problems.append(src.problem(("alerts", i, "when"), why))
            if (
                rule.when == "source_failing"
                and flow is not None
                and not (flow.trigger.schedule or flow.source)
            ):
                why = f"flow {flow.name!r} has no source or schedule that could fail"
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
                                + did_you_mean(name, [*systems, *broken]),
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
                    registry.build_to_check(
                        found[0], sysspec.config, notify_config(found[1], settings), policy
                    )
                except ValidationError as exc:
                    problems.extend(
                        Problem(p.file, p.line, f"notify {name}: {p.message}")
                        for p in pydantic_problems(src, exc, loc, found[1])
                    )
                except ValueError as exc:  # a template that does not compile
                    problems.append(src.problem(loc, f"notify {name}: {exc}"))
