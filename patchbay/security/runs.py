"""A stored run as it may be shown: its flow's sensitive fields redacted wherever they appear."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

from patchbay.security.redaction import Scrubber, redact_paths, sensitive_values

_SENSITIVE_CACHE: dict[str, tuple[tuple[tuple[str, int], ...], dict[str, list[str]]]] = {}


def redact_run(run: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """The run with the fields at `paths` redacted in the payload and request bodies, and their values
    redacted wherever else they appear (a response that echoed them, a reason quoting them)."""
    values = sensitive_values(run["payload"], paths)
    bodies: list[Any] = []
    for d in run["deliveries"]:
        body = d["request"].get("body") if isinstance(d["request"], dict) else None
        try:
            parsed = orjson.loads(body) if isinstance(body, str) else None
        except orjson.JSONDecodeError:
            parsed = None
        bodies.append(parsed)
        values |= sensitive_values(parsed, paths)
    # A call's answer is bound under its step's `as` name, which a sensitive path starts with
    # (`contact.body.phone`); the kept answer is `{status, body}`, so the path's rest applies to it.
    in_answers = [p.split(".", 1)[1] for p in paths if "." in p]
    for d in run["deliveries"]:
        if d["destination"].startswith("call:") and isinstance(d.get("response"), dict) and in_answers:
            values |= sensitive_values(d["response"], in_answers)
            d["response"] = redact_paths(d["response"], in_answers)
    scrub = Scrubber(values)
    run["payload"] = scrub(redact_paths(run["payload"], paths))
    for d, parsed in zip(run["deliveries"], bodies, strict=True):
        if isinstance(parsed, dict):
            d["request"]["body"] = orjson.dumps(redact_paths(parsed, paths)).decode()
        for k in ("request", "last_error", "response"):
            d[k] = scrub(d.get(k))
        for a in d["attempts_log"]:
            a["excerpt"], a["error"] = scrub(a["excerpt"]), scrub(a["error"])
    for k in ("trace", "reason", "meta", "record_key"):
        if k in run:
            run[k] = scrub(run[k])
    return run


def scrub_dead(row: dict[str, Any], payload: Any, paths: Sequence[str]) -> dict[str, Any]:
    """A dead letter as it may be shown: the values of its event's sensitive fields scrubbed from the
    reason, the destination's answer (which may echo them) and the record key."""
    scrub = Scrubber(sensitive_values(payload, paths) if payload is not None else set())
    return {**row, **{k: scrub(row[k]) for k in ("reason", "response", "record_key") if k in row}}


def sensitive_paths(root: Path) -> dict[str, list[str]]:
    """Each flow's `sensitive` paths, read from the project's flow files.

    The CLI shows runs even while a project's configuration has problems, so this reads only the
    `name` and `sensitive` keys of each file, not the whole project.
    """
    files = sorted((root / "flows").glob("*.y*ml"))
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files)
    cached = _SENSITIVE_CACHE.get(str(root))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    found: dict[str, list[str]] = {}
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("sensitive"), list):
            found[str(doc.get("name") or f.stem)] = [str(p) for p in doc["sensitive"]]
    _SENSITIVE_CACHE[str(root)] = (stamp, found)
    return found
