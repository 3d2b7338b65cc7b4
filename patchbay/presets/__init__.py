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
from collections.abc import Sequence
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


CATEGORIES = (
    "crm",
    "billing",
    "support",
    "marketing",
    "chat",
    "spreadsheets",
    "accounting",
    "ecommerce",
)


def problems(name: str) -> list[str]:
    """What is wrong with a preset file, for the meta-test and `connectors show`: empty when sound."""
    doc = load(name)
    out: list[str] = []
    for key in ("summary", "category", "docs", "auth", "rate_limits"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            out.append(f"{name}: `{key}` is missing")
    if doc.get("category") not in CATEGORIES:
        out.append(f"{name}: category {doc.get('category')!r} is not one of {', '.join(CATEGORIES)}")
    if not str(doc.get("docs", "")).startswith("https://"):
        out.append(f"{name}: `docs` is not an https:// URL")
    text = (HERE / f"{name}.yaml").read_text()
    if "# Sources" not in text or "https://" not in text.split("summary:", 1)[0]:
        out.append(f"{name}: the file does not start with the `# Sources` it was written from")
    unknown = set(doc) - {
        "summary", "category", "docs", "auth", "rate_limits", "system", "webhook",
        "trigger_defaults", "reads", "operations", "example_steps", "oauth2",
    }  # fmt: skip
    out += [f"{name}: unknown key {k!r}" for k in sorted(unknown)]
    for kind in ("reads", "operations"):
        for op_name, op in (doc.get(kind) or {}).items():
            if not isinstance(op, dict) or not str(op.get("description", "")).strip():
                out.append(f"{name}: {kind[:-1]} {op_name} has no description")
            elif kind == "operations" and "fields" in op:
                fields = op["fields"]
                if not isinstance(fields, dict) or not all(
                    isinstance(v, str) and v.strip() for v in fields.values()
                ):
                    out.append(f"{name}: operation {op_name}: every field needs a description")
    if not doc.get("operations") and not doc.get("reads") and not doc.get("webhook"):
        out.append(f"{name}: no operations, reads or webhook")
    return out


def operation_fields(op: dict[str, Any]) -> dict[str, str] | None:
    """The record fields an operation reads (dotted paths -> description), or None if it does not say."""
    fields = op.get("fields")
    return dict(fields) if isinstance(fields, dict) else None


def settings_of(op: dict[str, Any]) -> dict[str, Any]:
    """An operation or read without its documentation keys: what becomes destination or source settings."""
    return {k: v for k, v in op.items() if k not in ("description", "fields")}


def unknown_field(target: str, fields: dict[str, str], custom: Sequence[str] = ()) -> str | None:
    """None when `target` (a dotted path written by a map step) is a field the operation takes, else why not.

    A field is taken when it is listed, lies inside a listed field (`customer.addresses.0.city` under
    `customer.addresses`), or is one of the destination's `custom_fields`.
    """
    known = [*fields, *custom]
    for f in known:
        if target == f or target.startswith(f + ".") or f.startswith(target + "."):
            return None
    import difflib

    # Compare names under the same parent (`properties.fristname` with `properties.firstname`), so a
    # shared prefix does not make unrelated fields look alike.
    parent, _, leaf = target.rpartition(".")
    siblings = {f.rpartition(".")[2]: f for f in known if f.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.7)
    hint = f"; did you mean {siblings[close[0]]!r}?" if close else ""
    return f"the operation takes no field {target!r}{hint}"


_MAP_OPTIONS = frozenset({"fields", "keep", "drop", "flatten", "omit_nulls", "tables"})


def mapped_field_problems(
    steps: Sequence[Any], operations: Sequence[tuple[str, dict[str, str], Sequence[str]]], n_destinations: int
) -> list[tuple[tuple[str | int, ...], str]]:
    """Fields written by the flow's last `map` step that its preset operations do not take.

    `operations` holds (destination name, the operation's fields, the destination's custom_fields) for
    each destination that names an operation declaring its fields. Checked only when every destination
    of the flow is such an operation: a field the preset does not know may be meant for another one.
    Returns (location in the flow file, message) pairs.
    """
    if not operations or len(operations) != n_destinations:
        return []
    last = None
    for i, step in enumerate(steps):
        if isinstance(step, dict) and isinstance(step.get("map"), dict):
            last = i
    if last is None:
        return []
    body = steps[last]["map"]
    loc: tuple[str | int, ...] = ("steps", last, "map")
    if body.keys() & _MAP_OPTIONS:
        body, loc = body.get("fields") or {}, (*loc, "fields")
    out = []
    for target in body:
        whys = [unknown_field(str(target), fields, custom) for _, fields, custom in operations]
        if all(whys):
            dest = ", ".join(name for name, _, _ in operations)
            why = next(w for w in whys if w)
            out.append(
                (
                    (*loc, target),
                    f"map writes {target!r} but {why.replace('the operation', f'destination {dest}')} "
                    "(a custom field? list it in the destination's `custom_fields:`)",
                )
            )
    return out


def describe(name: str) -> str:
    """A preset as a page: what it is, auth, limits, webhook, reads and operations with their fields.

    `patchbay connectors show NAME` prints it; docs/presets/NAME.md is this text.
    """
    doc = load(name)
    system = doc.get("system") or {}
    lines = [f"# `{name}` (preset)", "", doc["summary"], ""]
    lines += [f"Category: {doc['category']}. Reference: {doc['docs']}", ""]
    lines += [
        f"Use it: `preset: {name}` in a system of `systems.yaml`; its settings are defaults you may override."
    ]
    lines += ["", "## System", ""]
    if system.get("kind"):
        lines.append(
            f"- kind: `{system['kind']}`" + (f", style `{system['style']}`" if system.get("style") else "")
        )
    if system.get("url"):
        lines.append(f"- base URL: `{system['url']}`")
    lines += [
        f"- auth: {' '.join(doc['auth'].split())}",
        f"- rate limits: {' '.join(doc['rate_limits'].split())}",
    ]
    oauth = doc.get("oauth2")
    if oauth:
        lines.append(
            f"- OAuth2 (with an `oauth2_*` auth scheme): authorize `{oauth.get('authorize_url')}`, "
            f"token `{oauth.get('token_url')}`, scopes {', '.join(f'`{s}`' for s in oauth.get('scopes', []))}"
        )
    if system.get("retry_after_header"):
        lines.append(
            f"- wait after a 429: header `{system['retry_after_header']}` ({system.get('retry_after_unit', 'seconds')})"
        )
    hook = doc.get("webhook")
    lines += ["", "## Webhooks", ""]
    if hook:
        parts = [f"scheme `{hook['scheme']}`"]
        for key in (
            "header",
            "algorithm",
            "encoding",
            "prefix",
            "timestamp_header",
            "timestamp_format",
            "signed",
        ):
            if key in hook:
                parts.append(f"{key} `{hook[key]}`")
        lines.append("Verified with " + ", ".join(parts) + ".")
        for key, value in (doc.get("trigger_defaults") or {}).items():
            lines.append(f"A repeated delivery is recognised by `{key}: {value}`.")
    else:
        lines.append("The vendor does not send webhooks this preset can verify.")
    reads = doc.get("reads") or {}
    if reads:
        lines += [
            "",
            "## Reads",
            "",
            "A polled trigger: `trigger: {source: {system: NAME, read: READ}, schedule: {every: 15m}}`.",
            "",
        ]
        for rname, read in reads.items():
            pg = (read.get("pagination") or {}).get("type", "none")
            lines.append(
                f"- `{rname}`: {read['description']} (GET `{read.get('path', '')}`, pagination {pg})"
            )
    ops = doc.get("operations") or {}
    if ops:
        lines += ["", "## Operations", "", "A destination: `{name: …, system: NAME, operation: OPERATION}`."]
        for oname, op in ops.items():
            where = f"{op['method']} `{op.get('path', '')}`" if "method" in op else "a message"
            lines += ["", f"### `{oname}`", "", f"{op['description']} ({where})"]
            fields = operation_fields(op)
            variables = sorted(set(_VAR.findall(str(settings_of(op)))))
            if variables:
                lines += ["", "Needs `vars:` " + ", ".join(f"`{v}`" for v in variables) + "."]
            fmt = op.get("batch_format")
            if isinstance(fmt, dict):
                limit = fmt.get("max_records")
                per = f"up to {limit} records" if limit else "many records"
                said = (
                    "per-record results and errors"
                    if fmt.get("errors")
                    else "no per-record detail (a refused request is split to find the record)"
                )
                lines += ["", f"Batches with the destination's `batch:`: {per} per request, {said}."]
            if fields:
                lines += ["", "| field | description |", "|---|---|"]
                lines += [f"| `{f}` | {d} |" for f, d in fields.items()]
    return "\n".join(lines) + "\n"
