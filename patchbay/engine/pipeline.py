"""Run a flow's steps over one record and render one request per routed destination."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from patchbay.config.project import FlowSpec
from patchbay.config.specs import DestinationSpec
from patchbay.connectors.base import Sink
from patchbay.errors import RecordInvalid, Violation
from patchbay.expressions import is_truthy
from patchbay.processors.base import Dropped, GateContext
from patchbay.records import dig
from patchbay.security.fields import MARKER, FieldCipher, FieldError
from patchbay.security.redaction import Scrubber, redact_paths, sensitive_values
from patchbay.store.base import DedupeClaim, NewDelivery, WindowAdd


@dataclass
class Processed:
    status: str  # pending | quarantined | filtered
    trace: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    deliveries: list[NewDelivery] = field(default_factory=list)
    record_key: str | None = None
    record: Any = None  # after the steps, when there are deliveries
    # Asked of the accept's transaction by dedupe and aggregate steps (store/base.py, "windows and dedupe").
    claims: list[DedupeClaim] = field(default_factory=list)
    windows: list[WindowAdd] = field(default_factory=list)


CALL_PREFIX = "call:"  # a call step's deliveries: destination `call:<step name>`
QUARANTINE_PREFIX = "quarantine:"  # a split element's quarantine, kept as a dead row


@dataclass
class _Branch:
    """Where one record (the event's, or one element's after a split) got to."""

    status: str  # pending | quarantined | filtered | aggregated
    record: Any
    deliveries: list[NewDelivery] = field(default_factory=list)
    reason: str | None = None
    element: str | None = None  # "1", "0.2" after nested splits
    where: str | None = None  # the step that quarantined it
    suffix: str = ""


def order_key_of(dest: DestinationSpec, record: Any) -> str | None:
    """The record's key for a destination with `order_by` (text; null: not ordered), else None."""
    if dest.order_by is None:
        return None
    value = dest.order_by.search(record)
    if value is None:
        return None
    return value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


class Pipeline:
    """A flow, compiled: steps then routing, as one pure function of the record."""

    def __init__(self, flow: FlowSpec, sinks: dict[str, Sink], cipher: FieldCipher | None = None) -> None:
        self.flow = flow
        self.sinks = sinks
        self.cipher = cipher  # opens sealed rows; seals new ones only when the flow encrypts
        self.sealing = cipher is not None and flow.encrypt_sensitive and bool(flow.sensitive)
        # What each step is, decided once (not per record): a gate (dedupe, aggregate), a call, a split, or
        # a plain step whose `apply` changes the record. Flows without gates skip their bookkeeping.
        self._kinds = [_step_kind(s.step) for s in flow.steps]
        self._gated = "gate" in self._kinds

    def redact(self, record: Any) -> Any:
        """`record` as it may be shown: the flow's sensitive fields replaced by [redacted]."""
        return redact_paths(record, self.flow.sensitive)

    def process(
        self,
        record: Any,
        event_id: str,
        *,
        answers: Mapping[str, Any] | None = None,
        received_at: float | None = None,
        after: str | None = None,
        note: dict[str, Any] | None = None,
    ) -> Processed:
        """Steps, then routing. What is kept to be shown (trace, reason) never holds a sensitive value:
        a validation message quoting card.number is stored with the number replaced by [redacted].

        `after`: start with the step after the one so named (a window's record starts after its
        aggregate), with `note` as the first trace entry; `received_at`: the event's arrival time."""
        values = sensitive_values(record, self.flow.sensitive)  # before a step changes the record
        scrub = Scrubber(values)
        gates = None
        if self._gated:
            gates = _Gates(event_id, time.time() if received_at is None else received_at)
        out = self._process(record, event_id, answers or {}, gates, after, note)
        if gates is not None:
            out.claims, out.windows = gates.claims, gates.windows
        if scrub:
            out.trace, out.reason = scrub(out.trace), scrub(out.reason)
        if self.sealing:
            assert self.cipher is not None
            values |= sensitive_values(out.record, self.flow.sensitive)  # a step may have reshaped it
            for d in out.deliveries:
                d.request = self.cipher.seal(d.request, values)
            if out.record_key in values:
                out.record_key = None  # not stored in clear; such runs are not found by key
        return out

    def seal_payload(self, payload: bytes, record: Any) -> bytes:
        """The payload to store: as received, or, when the flow encrypts, the record with its sensitive
        values sealed (opened again by `load_payload` for a replay)."""
        values = sensitive_values(record, self.flow.sensitive) if self.sealing else None
        if not values:
            return payload
        assert self.cipher is not None
        return orjson.dumps(self.cipher.seal(record, values))

    def load_payload(self, payload: bytes) -> Any:
        """A stored payload as the record it was, sealed values opened."""
        record = orjson.loads(payload)
        if MARKER.encode() not in payload:
            return record
        if self.cipher is None:
            raise FieldError(
                f"an event of flow {self.flow.name} holds encrypted sensitive fields, and the project's "
                "vault has no field key: restore the vault (and master key) this store was written with"
            )
        return self.cipher.open(record)[0]

    def open_request(self, request: dict[str, Any]) -> tuple[dict[str, Any], Scrubber | None]:
        """A stored request ready to send, and a scrubber for the values it revealed (a remote may echo them)."""
        if self.cipher is None:
            return request, None
        opened, revealed = self.cipher.open(request)
        return opened, Scrubber(revealed) if revealed else None

    def _process(
        self,
        record: Any,
        event_id: str,
        answers: Mapping[str, Any],
        gates: _Gates | None,
        after: str | None,
        note: dict[str, Any] | None,
    ) -> Processed:
        trace: list[dict[str, Any]] = [note] if note else []
        key_source = record
        start = 0
        if after is not None:  # a window's record: the steps after its aggregate
            steps = self.flow.steps
            start = next((i + 1 for i, s in enumerate(steps) if s.name == after), len(steps))
        elif self.flow.contract is not None:  # the event as received, against its pinned shape
            drift = self.flow.contract.check(record)
            if drift:
                trace.append({"step": "contract", "kind": "contract", "drift": [str(d) for d in drift]})
        branches = self._run(record, start, "", event_id, answers, trace, None, gates)
        if gates is not None and any(b.element is not None for b in branches):
            # only an element that gets through claims its key
            gates.keep_claims({b.element for b in branches if b.status in ("pending", "aggregated")})
        if len(branches) == 1 and not branches[0].element:
            b = branches[0]  # no split: the event is the one record
            key = self._key(b.record, key_source)
            if b.status != "pending":
                return Processed(b.status, trace, b.reason, record_key=key)
            return Processed("pending", trace, None, b.deliveries, key, b.record)
        return self._combine(branches, trace, self._key(key_source, key_source), event_id)

    def _run(
        self,
        record: Any,
        start: int,
        suffix: str,
        event_id: str,
        answers: Mapping[str, Any],
        trace: list[dict[str, Any]],
        element: str | None,
        gates: _Gates | None,
    ) -> list[_Branch]:
        """The steps from `start` on, then routing, for one record (one element after a split: `suffix`
        ".<i>" is part of every key it makes). It stops at a call whose answer is not known yet."""
        tag = {"element": element} if element is not None else {}
        steps, kinds = self.flow.steps, self._kinds
        for i in range(start, len(steps)):
            spec, kind = steps[i], kinds[i]
            t0 = time.perf_counter()
            if spec.when is not None and not is_truthy(spec.when.search(record)):
                trace.append({"step": spec.name, "kind": spec.kind, **tag, "skipped": True})
                continue
            try:
                if kind is _APPLY:  # the common case first: map, validate, filter, ...
                    record = spec.step.apply(record)
                elif kind is _GATE:  # dedupe, aggregate: settled in the accept's transaction
                    assert gates is not None
                    entry = gates.add(spec, record, self.flow.name, len(trace), element)
                    trace.append({"step": spec.name, "kind": spec.kind, **tag, "ms": _ms(t0), **entry})
                    if spec.step.absorbs:  # counted into its window: the window's record goes on later
                        return [_Branch("aggregated", record, element=element)]
                    continue
                elif kind is _CALL:
                    key = f"{event_id}{suffix}.{spec.name}"
                    if key not in answers:  # ask first: the run goes on when the answer is recorded
                        try:
                            request = self.sinks[CALL_PREFIX + spec.name].render(record, key)
                        except (TypeError, ValueError) as exc:  # e.g. a body that is not JSON-able
                            raise invalid(spec.name, f"cannot render the call: {exc}") from exc
                        cache_key = spec.step.cache_key(record)
                        if cache_key is not None:
                            request["cache_key"] = cache_key
                        trace.append({"step": spec.name, "kind": spec.kind, **tag, "waiting": key})
                        return [
                            _Branch(
                                "pending",
                                record,
                                [NewDelivery(CALL_PREFIX + spec.name, request, key)],
                                element=element,
                            )
                        ]
                    answer = answers[key]
                    record = spec.step.bind(record, answer)
                    trace.append(
                        {
                            "step": spec.name,
                            "kind": spec.kind,
                            **tag,
                            "call": key,
                            "status": answer.get("status"),
                            "output": self.redact(record),
                        }
                    )
                    continue
                else:  # a split
                    elements = spec.step.elements(record)
                    trace.append(
                        {
                            "step": spec.name,
                            "kind": spec.kind,
                            **tag,
                            "ms": _ms(t0),
                            "elements": len(elements),
                        }
                    )
                    out: list[_Branch] = []
                    for j, el in enumerate(elements):
                        sub = f"{suffix}.{j}"
                        out += self._run(el, i + 1, sub, event_id, answers, trace, sub[1:], gates)
                    return out
            except RecordInvalid as exc:
                reasons = [str(v) for v in exc.violations]
                trace.append({"step": spec.name, "kind": spec.kind, **tag, "ms": _ms(t0), "error": reasons})
                reason = f"{spec.name}: " + "; ".join(reasons)
                return [
                    _Branch(
                        "quarantined", record, reason=reason, element=element, where=spec.name, suffix=suffix
                    )
                ]
            except Dropped as exc:
                trace.append(
                    {"step": spec.name, "kind": spec.kind, **tag, "ms": _ms(t0), "dropped": str(exc)}
                )
                return [_Branch("filtered", record, reason=str(exc), element=element)]
            trace.append(
                {"step": spec.name, "kind": spec.kind, **tag, "ms": _ms(t0), "output": self.redact(record)}
            )
        return [self._route(record, suffix, event_id, trace, element)]

    def _route(
        self, record: Any, suffix: str, event_id: str, trace: list[dict[str, Any]], element: str | None
    ) -> _Branch:
        tag = {"element": element} if element is not None else {}
        deliveries: list[NewDelivery] = []
        routes: list[dict[str, Any]] = []
        for dest in self.flow.destinations:
            if dest.when is not None and not is_truthy(dest.when.search(record)):
                routes.append({"destination": dest.name, "matched": False})
                continue
            key = f"{event_id}{suffix}.{dest.name}"
            try:
                request = self.sinks[dest.name].render(record, key)
            except RecordInvalid as exc:
                reasons = [f"destination {dest.name}: {v}" for v in exc.violations]
                trace.append({"step": "route", "kind": "route", **tag, "error": reasons})
                return _Branch(
                    "quarantined",
                    record,
                    reason="; ".join(reasons),
                    element=element,
                    where="route",
                    suffix=suffix,
                )
            except (TypeError, ValueError) as exc:  # e.g. a body that is not JSON-able
                reason = f"destination {dest.name}: cannot render the request: {exc}"
                trace.append({"step": "route", "kind": "route", **tag, "error": [reason]})
                return _Branch(
                    "quarantined", record, reason=reason, element=element, where="route", suffix=suffix
                )
            routes.append({"destination": dest.name, "matched": True})
            deliveries.append(NewDelivery(dest.name, request, key, order_key=order_key_of(dest, record)))
        trace.append({"step": "route", "kind": "route", **tag, "routes": routes})
        if not deliveries:
            return _Branch("filtered", record, reason="no destination matched", element=element)
        return _Branch("pending", record, deliveries, element=element)

    def _combine(
        self, branches: list[_Branch], trace: list[dict[str, Any]], key: str | None, event_id: str
    ) -> Processed:
        """A split's elements as one event. Elements go on independently: a quarantined element becomes a
        dead row of its own (`quarantine:<step>`, keyed by its index) while its siblings are delivered, so
        the event ends dead (listed, replayable) and no sibling is held back. When no element has anything
        to deliver, the event is quarantined (if any element was) or filtered."""
        pending = [b for b in branches if b.status == "pending"]
        bad = [b for b in branches if b.status == "quarantined"]
        reasons = [f"element {b.element}: {b.reason}" for b in bad]
        if not pending:
            if bad:  # its windows are not counted (the store skips a quarantined event's): replay counts all
                return Processed("quarantined", trace, "; ".join(reasons), record_key=key)
            if any(b.status == "aggregated" for b in branches):  # elements counted into their windows
                return Processed("aggregated", trace, None, record_key=key)
            return Processed(
                "filtered", trace, branches[0].reason if branches else "no elements", record_key=key
            )
        deliveries = [d for b in pending for d in b.deliveries]
        for b in bad:
            deliveries.append(
                NewDelivery(
                    QUARANTINE_PREFIX + (b.where or "step"),
                    {"element": b.element},
                    f"{event_id}{b.suffix}.{QUARANTINE_PREFIX}{b.where}",
                    status="dead",
                    error=b.reason,
                )
            )
        return Processed(
            "pending", trace, "; ".join(reasons) or None, deliveries, key, [b.record for b in pending]
        )

    def _key(self, record: Any, original: Any) -> str | None:
        path = self.flow.record_key
        if not path:
            return None
        v = dig(record, path)
        if v is None:
            v = dig(original, path)
        return None if v is None or isinstance(v, dict | list) else str(v)


class _Gates:
    """What the gate steps of one run ask of the store."""

    def __init__(self, event_id: str, received_at: float) -> None:
        self.event_id, self.received_at = event_id, received_at
        self.claims: list[DedupeClaim] = []
        self.windows: list[WindowAdd] = []

    def keep_claims(self, through: set[str | None]) -> None:
        """Drop the dedupe claims of split elements that did not get through (quarantined, filtered): as for a
        whole event, a corrected resend of such an element must pass."""

        def passed(element: str | None) -> bool:
            return element is None or any(t == element or str(t).startswith(element + ".") for t in through)

        self.claims = [c for c in self.claims if passed(c.element)]

    def add(
        self, spec: Any, record: Any, flow: str, trace_at: int, element: str | None = None
    ) -> dict[str, Any]:
        ctx = GateContext(flow, spec.name, self.event_id, self.received_at, trace_at)
        asked, entry = spec.step.gate(record, ctx)
        for a in asked if isinstance(asked, list) else [asked]:  # a hopping aggregate: several windows
            if isinstance(a, DedupeClaim | WindowAdd):
                a.element = element  # after a split the element claims and counts, not the whole event
            if isinstance(a, DedupeClaim):
                self.claims.append(a)
            elif isinstance(a, WindowAdd):
                self.windows.append(a)
        return dict(entry)


_APPLY, _GATE, _CALL, _SPLIT = "apply", "gate", "call", "split"


def _step_kind(step: Any) -> str:
    """How `_run` treats a step (the checks it made per record before, made once per flow)."""
    if hasattr(step, "gate"):
        return _GATE
    if getattr(step, "calls", False):
        return _CALL
    if getattr(step, "splits", False):
        return _SPLIT
    return _APPLY


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def invalid(path: str, message: str) -> RecordInvalid:
    return RecordInvalid([Violation(path, message)])
