"""A recorded run as a flow test: its event with sensitive fields and secrets replaced, and what the flow
does with that event now as the expectation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from patchbay.config.project import FlowSpec, Project
from patchbay.errors import PatchbayError
from patchbay.records import dig, has_path, put
from patchbay.security.redaction import SEALED_RE, sensitive_values
from patchbay.testing.harness import FlowRun, Response, simulate, simulate_batch

if TYPE_CHECKING:
    from patchbay.store.blocking import BlockingStore

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
SECRET_STAND_IN = "[secret]"


@dataclass
class Exported:
    flow: str
    name: str
    case: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def document(self, *, with_header: bool) -> str:
        body = yaml.safe_dump([self.case], sort_keys=False, allow_unicode=True, width=100)
        if not with_header:
            return body
        head = (
            f"# Tests of flow {self.flow}: `patchbay test` runs them (nothing is sent).\n"
            f"flow: {self.flow}\ntests:\n"
        )
        return head + body

    def write(self, path: Path) -> None:
        """Create the test file, or add this test at the end of its `tests:` list (comments kept)."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.document(with_header=True), encoding="utf-8")
            return
        text = path.read_text(encoding="utf-8")
        try:
            before = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise PatchbayError(f"cannot add to {path}: it is not valid YAML ({exc})") from exc
        tests = before.get("tests") if isinstance(before, dict) else None
        if not isinstance(tests, list):
            raise PatchbayError(f"cannot add to {path}: it has no `tests:` list; pass --to NEW_FILE")
        if any(isinstance(t, dict) and t.get("name") == self.name for t in tests):
            raise PatchbayError(f"{path} already has a test named {self.name!r}; pass --name")
        indent = _list_indent(text)
        block = "".join(indent + line + "\n" for line in self.document(with_header=False).splitlines())
        candidate = text + ("" if text.endswith("\n") else "\n") + block
        try:
            after = yaml.safe_load(candidate)
        except yaml.YAMLError:
            after = None
        if not (isinstance(after, dict) and after.get("tests") == [*tests, self.case]):
            raise PatchbayError(
                f"cannot add to {path} without rewriting it (`tests:` is not its last key); "
                "pass --to NEW_FILE or move `tests:` to the end"
            )
        path.write_text(candidate, encoding="utf-8")


def _list_indent(text: str) -> str:
    m = re.search(r"^tests:[ \t]*\n(?:[ \t]*(?:#.*)?\n)*([ \t]*)- ", text, re.M)
    return m.group(1) if m else ""


def load_event(store: BlockingStore, run_id: str) -> dict[str, Any] | None:
    """The stored event: flow, status, reason and payload as received (sealed values stay sealed)."""
    run = store.run(lambda s: s.get_run(run_id))
    if run is None:
        return None
    return {
        "id": run["id"],
        "flow": run["flow"],
        "status": run["status"],
        "reason": run["reason"],
        "payload": orjson.dumps(run["payload"]),  # values may be sealed (encrypt_sensitive): they stay so
        "destinations": [
            d["destination"] for d in run["deliveries"] if not d["destination"].startswith("call:")
        ],
        "calls": _recorded_answers(run),
        "meta": run.get("meta") or {},
    }


def _recorded_answers(run: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The answers the run's calls got, by step, in the order they were asked: the test's `calls:`."""
    out: dict[str, list[dict[str, Any]]] = {}
    for d in run["deliveries"]:
        if d["destination"].startswith("call:") and d.get("response") is not None:
            answer = d["response"]
            out.setdefault(d["destination"][5:], []).append(
                {"status": answer.get("status"), "body": answer.get("body")}
            )
    return out


def export_run(store: BlockingStore, project: Project, run_id: str, name: str | None = None) -> Exported:
    event = load_event(store, run_id)
    if event is None:
        raise PatchbayError(f"no run {run_id!r}; list them with `patchbay runs`")
    flow = project.flows.get(event["flow"])
    if flow is None:
        raise PatchbayError(
            f"run {event['id']} is of flow {event['flow']!r}, which this project no longer has"
        )
    notes: list[str] = []
    record = stand_ins(_opened(event["payload"], flow, project), flow, notes)
    record = _scrub_secrets(record, project_redactor(project), notes)
    if flow.batch is not None:
        return _export_batch_row(event, flow, record, name, notes)
    calls = _scrub_secrets(event["calls"], project_redactor(project), notes)
    answers = {k: [Response(status=a["status"], body=a["body"]) for a in v] for k, v in calls.items()}
    now = simulate(flow, project, record, calls=answers)
    recorded = {"pending": "delivered", "delivered": "delivered", "dead": "delivered"}.get(
        event["status"], event["status"]
    )
    if recorded != now.status:
        notes.append(
            f"the recorded run was {event['status']}"
            + (f" ({event['reason']})" if event["reason"] else "")
            + f"; the flow as it is now makes it {now.status}: the test expects what the flow does now"
        )
    elif now.status == "delivered" and sorted(event["destinations"]) != sorted(now.deliveries):
        notes.append(
            f"the recorded run went to {', '.join(sorted(event['destinations'])) or 'no destination'}; "
            f"now it goes to {', '.join(sorted(now.deliveries))}: the test expects what the flow does now"
        )
    title = name or f"run {event['id']} ({now.status})"
    case = {"name": title, "event": record, **({"calls": calls} if calls else {}), "expect": expectation(now)}
    return Exported(flow.name, title, case, notes)


def _export_batch_row(
    event: dict[str, Any], flow: FlowSpec, row: Any, name: str | None, notes: list[str]
) -> Exported:
    """A quarantined row of a batch run as a batch test: the row, and what the steps make of it now."""
    if event["meta"].get("batch") or not isinstance(row, dict):
        raise PatchbayError(
            f"run {event['id']} is a run of batch flow {flow.name} (its report), not a row; export one of "
            "its quarantined rows instead (`patchbay dead` lists them)"
        )
    now = simulate_batch(flow, [row])
    expect: dict[str, Any] = {"rows": now.rows}
    if now.quarantined:
        expect["quarantined"] = [reason for _, reason in now.quarantined]
    if now.filtered:
        expect["filtered"] = now.filtered
    if event["status"] == "quarantined" and not now.quarantined:
        notes.append(
            f"the recorded row was quarantined ({event['reason']}); the flow as it is now "
            + ("writes it" if now.rows else "drops it")
            + ": the test expects what the flow does now"
        )
    status = "quarantined" if now.quarantined else "written" if now.rows else "filtered"
    title = name or f"row {event['id']} ({status})"
    return Exported(flow.name, title, {"name": title, "rows": [row], "expect": expect}, notes)


def _opened(payload: bytes, flow: FlowSpec, project: Project) -> Any:
    """The event as received: values stored encrypted are opened (with the project's field key), so
    that their stand-ins have the shape of the real values."""
    from patchbay.engine.hub import field_cipher
    from patchbay.engine.pipeline import Pipeline
    from patchbay.security.fields import MARKER

    if MARKER.encode() not in payload:
        return orjson.loads(payload)
    return Pipeline(flow, {}, field_cipher(project)).load_payload(payload)


def expectation(run: FlowRun) -> dict[str, Any]:
    if run.status == "quarantined":
        return {"quarantined": run.reason or True}
    if run.status == "filtered":
        return {"filtered": run.reason or True}
    if run.status == "aggregated":
        window = next((s.get("window") for s in run.trace if s.get("kind") == "aggregate"), None)
        return {"aggregated": window or True}
    out: dict[str, Any] = {}
    for c in run.deliveries.values():
        view = {k: v for k, v in c.view.items() if not (k == "url" and "path" in c.view)}
        first = [k for k in ("method", "path") if k in view]
        out[c.destination] = {k: view[k] for k in [*first, *(k for k in view if k not in first)]}
    return {"deliveries": out}


def stand_ins(payload: Any, flow: FlowSpec, notes: list[str]) -> Any:
    """`payload` with each sensitive value replaced by a stand-in of the same shape (an email stays an
    email), everywhere it appears: a test file goes into git."""
    record = orjson.loads(orjson.dumps(payload))
    values = sensitive_values(record, flow.sensitive)
    mapping: dict[str, Any] = {}
    replaced = []
    for path in flow.sensitive:
        if has_path(record, path):
            put(record, path, _fake(dig(record, path), mapping))
            replaced.append(path)
    record = _replace_values(record, {v: mapping.get(v, _fake(v, mapping)) for v in values})
    if replaced:
        notes.append(f"replaced the sensitive fields {', '.join(replaced)} with stand-ins of the same shape")
    return record


def _fake(v: Any, mapping: dict[str, Any]) -> Any:
    if isinstance(v, dict):
        return {k: _fake(x, mapping) for k, x in v.items()}
    if isinstance(v, list):
        return [_fake(x, mapping) for x in v]
    if isinstance(v, bool) or v is None:
        return v
    key = str(v)
    if key in mapping:
        return mapping[key]
    n = len(mapping) + 1
    if isinstance(v, int):
        out: Any = int("9" * min(len(str(abs(v))), 18))
    elif isinstance(v, float):
        out = 0.0
    elif SEALED_RE.search(key):
        out = f"redacted-{n}"
    elif EMAIL_RE.match(key.strip()):
        out = f"person{n}@example.com"
    else:
        out = "".join(
            "9" if c.isdigit() else ("X" if c.isupper() else "x") if c.isalpha() else c for c in key
        )
    mapping[key] = out
    return out


def _replace_values(v: Any, mapping: dict[str, Any]) -> Any:
    if isinstance(v, dict):
        return {k: _replace_values(x, mapping) for k, x in v.items()}
    if isinstance(v, list):
        return [_replace_values(x, mapping) for x in v]
    if isinstance(v, str | int | float) and not isinstance(v, bool) and str(v) in mapping:
        return mapping[str(v)]
    if isinstance(v, str):
        for old, new in mapping.items():
            if old in v:
                v = v.replace(old, str(new))
    return v


def project_redactor(project: Project) -> Any:
    """A redactor that knows every secret the project's systems reference (those that have a value)."""
    from patchbay.config.project import system_secret_refs
    from patchbay.engine.hub import open_resolver_for

    resolver = open_resolver_for(project.root)
    for system in project.systems.values():
        for ref in system_secret_refs(system):
            if resolver.exists(ref):
                resolver.resolve(ref)
    return resolver.redactor


def _scrub_secrets(v: Any, redact: Any, notes: list[str]) -> Any:
    found: list[str] = []

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(y) for k, y in x.items()}
        if isinstance(x, list):
            return [walk(y) for y in x]
        if isinstance(x, str):
            clean = redact(x)
            if clean != x:
                found.append(clean)
            return clean
        return x

    out = walk(v)
    if found:
        notes.append(
            f"replaced {len(found)} value(s) holding a secret of this project with {SECRET_STAND_IN}"
        )
    return out
