"""Loading one system of systems.yaml or systems/*.yaml: its preset, common settings and connector settings."""

from __future__ import annotations

import re
from typing import Any

from patchbay import presets, registry
from patchbay.config.models import NAME_RE, SystemCommon
from patchbay.config.problems import did_you_mean, validate
from patchbay.config.source import Loc, Located
from patchbay.config.specs import SystemSpec
from patchbay.errors import Problem


def load_system(
    src: Located, name: str, body: Any, systems: dict[str, SystemSpec], problems: list[Problem]
) -> bool:
    """Add system `name` to `systems`, its preset's settings under its own; False when it has problems."""
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
        try:
            preset = presets.load(str(body["preset"]))
        except KeyError:
            problems.append(
                src.problem(
                    (*loc, "preset"),
                    f"system {name!r}: unknown preset {body['preset']!r}"
                    + did_you_mean(str(body["preset"]), presets.available()),
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
    common = validate(src, {k: v for k, v in body.items() if k in common_keys}, SystemCommon, loc, problems)
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
                    + did_you_mean(common.kind, registry.CONNECTORS),
                )
            )
            return False
        assert entry.system_config is not None
        config = validate(src, rest, entry.system_config, loc, problems)
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
