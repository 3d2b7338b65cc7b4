"""Prebuilt definitions of common SaaS systems, written as plain YAML on top of the generic connectors.

A system says `preset: NAME`; the preset's `system` settings are its defaults (the system's own
settings win), its `webhook` settings are the defaults of the system's `webhook:`, and each of its
`operations` is a ready destination: `{name: crm, system: crm, operation: upsert_contact}`.
`${var}` in an operation is filled from the destination's `vars:`. Nothing is hidden: read the file,
copy what you need into your own project, change it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load(name: str) -> dict[str, Any]:
    path = HERE / f"{name}.yaml"
    if not re.match(r"^[a-z0-9_]+$", name) or not path.exists():
        raise KeyError(name)
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def merge(base: Any, over: Any) -> Any:
    """`over` on top of `base`, mappings merged key by key."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out.get(k), v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def fill(value: Any, variables: dict[str, Any], missing: set[str]) -> Any:
    """Replace ${var} in every string of `value`; names with no value are added to `missing`."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in variables:
                missing.add(m.group(1))
                return m.group(0)
            return str(variables[m.group(1)])

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: fill(v, variables, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, variables, missing) for v in value]
    return value
