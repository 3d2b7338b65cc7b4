"""Run one event through a flow without a hub, a store or the network: the steps and routing of the
live definition, each destination's rendered request captured instead of sent, and simulated answers
walked through the real delivery policy (engine/policy.py), so 503 then 201 shows the retry path."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from patchbay.config.project import FlowSpec, Project
from patchbay.connectors.base import Outcome, OutcomeClass, Sink
from patchbay.contracts import response_drift
from patchbay.engine.calls import policy_of
from patchbay.engine.pipeline import CALL_PREFIX, Pipeline
from patchbay.engine.policy import decide
from patchbay.security.secrets import SecretResolver

TEST_EVENT_TIME_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: templates that print the arrival are stable
MAX_ATTEMPTS = 60  # a simulated delivery gives up here even if the retry schedule is longer
OUTCOME_NAMES = {
    "ok": OutcomeClass.SUCCESS,
    "success": OutcomeClass.SUCCESS,
    "transient": OutcomeClass.TRANSIENT,
    "timeout": OutcomeClass.TRANSIENT,
    "terminal": OutcomeClass.TERMINAL,
    "auth": OutcomeClass.AUTH,
    "gone": OutcomeClass.GONE,
}


@dataclass
class Response:
    """A simulated answer: an HTTP status (classified by the HTTP rules) or an outcome class name."""

    status: int | None = None
    outcome: str | None = None  # ok | transient | timeout | terminal | auth | gone
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None

    def to_outcome(self) -> Outcome:
        from patchbay.connectors.http import classify_response

        raw = b"" if self.body is None else orjson.dumps(self.body)
        if self.status is not None:
            return classify_response(self.status, self.headers, raw, 0.0)
        cls = OUTCOME_NAMES[self.outcome or "ok"]
        error = "timed out (simulated)" if self.outcome == "timeout" else ""
        return Outcome(cls, None, 0.0, raw.decode(), error=error)


@dataclass
class Attempt:
    outcome: str  # the OutcomeClass value
    status_code: int | None
    decision: str  # delivered | pending | dead
    reason: str = ""
    wait_s: float | None = None  # before the next try, when the policy retries

    def describe(self) -> str:
        what = f"HTTP {self.status_code}" if self.status_code is not None else self.outcome
        if self.decision == "pending" and self.wait_s is not None:
            return f"{what} -> retry in {self.wait_s:g}s"
        return f"{what} -> {self.decision}" + (f" ({self.reason})" if self.reason else "")


@dataclass
class Captured:
    """One would-be delivery: the request as rendered, and what the simulated answers led to."""

    destination: str
    kind: str
    request: dict[str, Any]  # as stored: what `send` would be given
    view: dict[str, Any]  # the same, for people and expectations: body parsed, `path` added
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = "delivered"  # delivered | dead | paused | disabled
    drift: list[str] = field(default_factory=list)  # the simulated 2xx answer against the response contract


@dataclass
class FlowRun:
    status: str  # delivered | quarantined | filtered | dead | paused (the worst destination)
    reason: str | None
    trace: list[dict[str, Any]]
    captured: list[Captured]
    record: Any  # after the steps

    @property
    def deliveries(self) -> dict[str, Captured]:
        return {c.destination: c for c in self.captured if not c.destination.startswith(CALL_PREFIX)}

    @property
    def calls(self) -> dict[str, Captured]:
        """The calls asked, by `call:<step>` (the last one of a step after a split)."""
        return {c.destination: c for c in self.captured if c.destination.startswith(CALL_PREFIX)}


def event_id(ms: int = TEST_EVENT_TIME_MS) -> str:
    """A fixed event id in the hub's ULID layout (its time is `ms`, its random part zero)."""
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    n = ms << 80
    out = []
    for _ in range(26):
        out.append(alphabet[n & 31])
        n >>= 5
    return "evt_" + "".join(reversed(out))


class _EnvPlaceholders(dict[str, str]):
    def get(self, key: str, default: Any = None) -> str:  # type: ignore[override]
        return f"<env:{key}>"


def placeholder_resolver() -> SecretResolver:
    """A resolver whose every secret is a placeholder naming it: nothing reads the vault or the
    environment, and a test's output never holds a credential."""
    return SecretResolver(lambda name: f"<secret:{name}>", _EnvPlaceholders())


def offline_sinks(flow: FlowSpec, project: Project) -> dict[str, Sink]:
    """The flow's destinations built as the hub builds them (engine/hub.build_sinks), with no HTTP
    sessions and placeholder secrets: `render` works, and nothing here can reach a remote."""
    from patchbay.engine.hub import build_sinks

    return build_sinks(flow, project, placeholder_resolver(), None)


class _NoJitter(random.Random):
    """Waits exactly as the schedule says, so a test's printed retry path is the same every run."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def simulate(
    flow: FlowSpec,
    project: Project,
    record: Any,
    responses: Mapping[str, Sequence[Response]] | None = None,
    sinks: dict[str, Sink] | None = None,
    calls: Mapping[str, Sequence[Response]] | None = None,
) -> FlowRun:
    """The flow's steps and routing over `record`, each routed request captured; then each delivery
    answered by `responses[destination]` in turn (the last answer repeats; none given: success). A call
    step is answered by `calls[step]` in turn, and the run goes on with the answer bound, as in the hub."""
    sinks = sinks if sinks is not None else offline_sinks(flow, project)
    pipeline, eid = Pipeline(flow, sinks), event_id()
    answers: dict[str, Any] = {}  # the calls' answers, by key, as the store keeps them
    turns = {name: list(given) for name, given in (calls or {}).items()}
    asked: list[Captured] = []
    for _ in range(MAX_ATTEMPTS):
        processed = pipeline.process(record, eid, answers=answers)
        waiting = [d for d in processed.deliveries if d.destination.startswith(CALL_PREFIX)]
        if not waiting:
            break
        for d in waiting:
            stopped = _answer_call(d, flow, project, sinks, turns, answers, asked)
            if stopped is not None:
                return FlowRun(stopped[0], stopped[1], processed.trace, asked, processed.record)
    if processed.status != "pending":
        return FlowRun(processed.status, processed.reason, processed.trace, asked, processed.record)
    captured = []
    for d in processed.deliveries:
        if d.status != "pending":  # a split element's quarantine: in the reason, nothing is sent
            continue
        spec = next(x for x in flow.destinations if x.name == d.destination)
        shown = view(d.request, project, spec.system, credentials(sinks[d.destination]))
        element = d.idempotency_key[
            len(eid) + 1 : -len(d.destination) - 1
        ]  # "<event>.<i>.<dest>" after a split
        c = Captured(f"{d.destination}[{element}]" if element else d.destination, spec.kind, d.request, shown)
        replies = list((responses or {}).get(d.destination, ()))
        _deliver(c, spec.policy, replies)
        if c.outcome == "delivered" and replies:
            body = replies[min(len(c.attempts), len(replies)) - 1].body
            c.drift = response_drift(flow.contract, d.destination, body) if body is not None else []
        captured.append(c)
    worst = "delivered"
    for rank in ("paused", "disabled", "dead"):
        if any(c.outcome == rank for c in captured):
            worst = "dead" if rank == "disabled" else rank
    reasons = [f"{c.destination}: {c.attempts[-1].reason}" for c in captured if c.outcome != "delivered"]
    if processed.reason:  # split elements quarantined while their siblings went on
        reasons.append(processed.reason)
    return FlowRun(worst, "; ".join(reasons) or None, processed.trace, asked + captured, processed.record)


def _answer_call(
    d: Any,
    flow: FlowSpec,
    project: Project,
    sinks: dict[str, Sink],
    turns: dict[str, list[Response]],
    answers: dict[str, Any],
    asked: list[Captured],
) -> tuple[str, str] | None:
    """A call answered from the test's `calls:` (each attempt takes the next answer of its step; the last
    repeats), through the delivery policy; (status, reason) when the run stops at it."""
    step = d.destination[len(CALL_PREFIX) :]
    spec = next(s for s in flow.steps if s.name == step)
    c = Captured(
        d.destination, spec.kind, d.request, view(d.request, project, str(getattr(spec.config, "system", "")))
    )
    asked.append(c)
    given = turns.get(step)
    if not given:  # what it would ask is captured; nothing answers it
        c.outcome = "unanswered"
        return "dead", f"call {step}: the test gives no answer for it; add `calls: {{{step}: [...]}}`"
    on_404 = getattr(spec.config, "on_404", "fail")
    rng, now, retries = _NoJitter(), 0.0, 0
    for _ in range(MAX_ATTEMPTS):
        answer = given.pop(0) if len(given) > 1 else given[0]
        outcome = answer.to_outcome()
        if answer.status == 404 and on_404 == "continue":
            outcome = Outcome(OutcomeClass.SUCCESS, 404)
        dec = decide(outcome, retries, policy_of(spec.config, project), now, rng)
        wait = None if dec.next_at is None else round(dec.next_at - now, 3)
        c.attempts.append(Attempt(outcome.cls.value, outcome.status_code, dec.status, dec.reason, wait))
        if dec.destination_state is not None or dec.status == "dead":
            c.outcome = dec.destination_state or "dead"
            status = "paused" if c.outcome == "paused" else "dead"
            return status, f"call {step}: {dec.reason}"
        if dec.status == "delivered":
            body = None if answer.status == 404 else answer.body
            answers[d.idempotency_key] = {"status": answer.status or 200, "body": body}
            kept = getattr(spec.config, "headers_kept", [])
            if kept:
                given_headers = {k.lower(): v for k, v in answer.headers.items()}
                answers[d.idempotency_key]["headers"] = {h: given_headers.get(h) for h in kept}
            return None
        retries += 1 if dec.consumed_retry else 0
        now = dec.next_at or now
    c.outcome = "dead"
    return "dead", f"call {step}: the simulation stopped after {MAX_ATTEMPTS} attempts"


def _deliver(c: Captured, policy: Any, answers: list[Response]) -> None:
    rng = _NoJitter()
    now, retries = 0.0, 0
    for n in range(MAX_ATTEMPTS):
        answer = answers[min(n, len(answers) - 1)] if answers else Response(outcome="ok")
        outcome = answer.to_outcome()
        d = decide(outcome, retries, policy, now, rng)
        wait = None if d.next_at is None else round(d.next_at - now, 3)
        c.attempts.append(Attempt(outcome.cls.value, outcome.status_code, d.status, d.reason, wait))
        if d.destination_state is not None:
            c.outcome = d.destination_state
            return
        if d.status != "pending":
            c.outcome = d.status
            return
        retries += 1 if d.consumed_retry else 0
        now = d.next_at or now
    c.outcome = "dead"
    c.attempts[-1].reason = f"the simulation stopped after {MAX_ATTEMPTS} attempts"


def credentials(sink: Sink) -> dict[str, str]:
    """The headers an HTTP-shaped sink adds at send time (its system's `auth`), with the placeholder
    secrets of an offline sink: a test can see which credential goes where, never its value."""
    auth_headers = getattr(getattr(sink, "client", None), "auth_headers", None)
    return dict(auth_headers()) if callable(auth_headers) else {}


def view(
    request: dict[str, Any], project: Project, system: str, auth: dict[str, str] | None = None
) -> dict[str, Any]:
    """A rendered request as tests and people read it: a JSON body parsed, for HTTP-shaped requests
    the `path` after the system's URL (what the destination's `path:` rendered to), and the
    credential headers that sending adds, as placeholders."""
    out = dict(request)
    if auth:
        out["headers"] = {**(out.get("headers") or {}), **auth}
    body = out.get("body")
    ctype = {k.lower(): v for k, v in (out.get("headers") or {}).items()}.get("content-type", "")
    if isinstance(body, str) and ctype.startswith("application/x-www-form-urlencoded"):
        # A form body (`body_format: form`) as its fields, names as sent: {"metadata[plan]": "pro"}.
        out["body"] = dict(parse_qsl(body, keep_blank_values=True))
    elif isinstance(body, str):
        try:
            out["body"] = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    url = out.get("url")
    if isinstance(url, str):
        base = getattr(project.systems[system].config, "url", None)
        if isinstance(base, str) and url.startswith(base.rstrip("/")):
            out["path"] = url[len(base.rstrip("/")) :] or "/"
        else:
            parts = urlsplit(url)
            out["path"] = parts.path + (f"?{parts.query}" if parts.query else "")
    return out


@dataclass
class BatchCaseRun:
    """What a batch flow's steps make of a test's source rows: the rows written (decoded, as the
    destination table gets them), the quarantined rows with their reasons, and how many were dropped."""

    rows: list[dict[str, Any]]
    quarantined: list[tuple[dict[str, Any], str]]
    filtered: int
    deleted: list[tuple[Any, ...]]  # soft-deleted rows' keys


def source_columns(rows: Sequence[Mapping[str, Any]], types: Mapping[str, str] | None = None) -> list[Any]:
    """The source table's columns as a reader would give them: the given types, else each column's from
    its first value that is not null (int, float, bool, json, text)."""
    from patchbay.batch.frame import Column, infer_type

    names = list(dict.fromkeys(k for r in rows for k in r))
    given = types or {}
    return [Column(n, given.get(n) or infer_type([r.get(n) for r in rows])) for n in names]


def simulate_batch(
    flow: FlowSpec, rows: Sequence[Mapping[str, Any]], types: Mapping[str, str] | None = None
) -> BatchCaseRun:
    """The batch flow's steps over `rows` through the transform a real run uses (batch/transform.py
    FrameTransform over one frame, COPY-text encoded as a reader gives it): no database, no store."""
    from patchbay.batch.frame import Frame, decode, encode
    from patchbay.batch.transform import FrameTransform

    assert flow.batch is not None, f"flow {flow.name} is not a batch flow"
    spec = flow.batch
    columns = source_columns(rows, types)
    frame = Frame(columns, [[encode(r.get(c.name)) for c in columns] for r in rows])
    soft = spec.deletes.column if spec.deletes.detect == "soft" else None
    transform = FrameTransform(flow.steps, columns, key=spec.key, soft_delete=soft)
    result = transform.apply(frame)
    out = transform.output_columns()
    written = [{c.name: decode(v, c.type) for c, v in zip(out, row, strict=True)} for row in result.rows]
    bad = [(i.row, i.reason) for i in result.invalid]
    return BatchCaseRun(written, bad, result.filtered, list(result.deleted_keys))
