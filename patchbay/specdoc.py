"""Settings tables generated from config models: `patchbay connectors show`, docs/connectors/*.md and checks agree."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from patchbay import registry


def _type_name(ann: Any, top: bool = True) -> str:
    """A setting's type in words; None is `(optional)` for the setting itself, `or null` inside it."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a, False) for a in args if a is not type(None)]
        if type(None) in args:
            return " or ".join(parts) + (" (optional)" if top else " or null")
        return " or ".join(parts)
    if origin in (list, tuple, set):
        return f"list of {_type_name(args[0], False)}" if args else "list"
    if origin is dict:
        return (
            f"mapping of {_type_name(args[0], False)} to {_type_name(args[1], False)}" if args else "mapping"
        )
    if typing.get_origin(ann) is typing.Annotated:
        return _type_name(args[0], top)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann.__name__
    return getattr(ann, "__name__", str(ann))


def fields(model: type[BaseModel], prefix: str = "") -> list[dict[str, Any]]:
    """Every setting of a model, nested models flattened with dotted names."""
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        default: Any
        if f.default is not PydanticUndefined:
            default = f.default
        elif f.default_factory is not None:
            try:
                default = f.default_factory()  # type: ignore[call-arg]
            except TypeError:
                default = None
        else:
            default = PydanticUndefined
        nested = next(
            (a for a in (typing.get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        row = {
            "name": prefix + name,
            "type": _type_name(ann),
            "required": default is PydanticUndefined,
            "default": None if default is PydanticUndefined or isinstance(default, BaseModel) else default,
            "description": f.description or "",
        }
        out.append(row)
        if nested is not None and nested is not model and typing.get_origin(ann) not in (list, dict):
            out.extend(fields(nested, prefix + name + "."))
    return out


def _fmt_default(v: Any) -> str:
    if v is None or v == [] or v == {}:
        return ""
    return "`''`" if v == "" else f"`{v}`"


def table(model: type[BaseModel]) -> str:
    lines = ["| setting | type | default | description |", "|---|---|---|---|"]
    for r in fields(model):
        req = " **(required)**" if r["required"] else ""
        lines.append(
            f"| `{r['name']}` | {r['type']} | {_fmt_default(r['default'])} | {r['description']}{req} |"
        )
    return "\n".join(lines)


def connector_doc(kind: str) -> str:
    """The page of one connector kind, as docs/connectors/<kind>.md holds it."""
    registry.discover()
    entry = registry.CONNECTORS[kind]
    roles = registry._BY_ROLE.get(kind, {})
    parts = [
        f"# `{kind}`",
        "",
        entry.summary,
        "",
        f"Can be: {', '.join(sorted(roles))}. Status: {entry.status}.",
    ]
    if entry.extra:
        parts += ["", f"Needs its driver: `{registry.install_hint(entry.extra)}`."]
    assert entry.system_config is not None
    parts += [
        "",
        "## System settings",
        "",
        "In `systems.yaml`, beside `kind`, `owner`, `purpose`:",
        "",
        table(entry.system_config),
    ]
    if "destination" in roles:
        parts += [
            "",
            "## As a destination",
            "",
            "In a flow's `destinations:`, beside `name`, `system`, `when`, `delivery`:",
            "",
            table(roles["destination"][1]),
        ]
    if "source" in roles:
        cls, model = roles["source"]
        mode = getattr(cls, "mode", "poll")
        how = (
            "polled on the flow's `trigger.schedule`"
            if mode == "poll"
            else "consumed continuously; acknowledged upstream only after the event is committed"
        )
        parts += [
            "",
            "## As a source",
            "",
            f"In a flow's `trigger.source:`, beside `system` ({how}):",
            "",
            table(model),
        ]
    return "\n".join(parts) + "\n"


def missing_descriptions() -> list[str]:
    """Settings without a description: every one must say what it does."""
    registry.discover()
    out = []
    for kind in registry.CONNECTORS:
        models = [registry.CONNECTORS[kind].system_config, *(m for _, m in registry._BY_ROLE[kind].values())]
        for m in models:
            if m is None:
                continue
            for r in fields(m):
                if not r["description"]:
                    out.append(f"{kind}: {m.__name__}.{r['name']}")
    return out
