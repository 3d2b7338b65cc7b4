"""Batch requests of the http destination: combine rendered requests, map per-record outcomes back.

Which of a batch's records an answer's results and errors are about is data (`batch_format` in a preset
operation or a destination), never a vendor's name: a list in the answer, and for each element a
reference to the input (its index, its idempotency key, or a field of the item sent).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

import orjson
from pydantic import Field, field_validator, model_validator

from patchbay.config.models import Spec
from patchbay.connectors.base import Outcome, OutcomeClass, excerpt
from patchbay.expressions import Expr, compile_expr
from patchbay.records import dig


class PerRecord(Spec):
    """Where an answer lists per-record results (or errors), and how each points at the record sent."""

    path: str = Field(
        description="Expression over the answer `{status, headers, body}` giving the list, e.g. body.errors."
    )
    ref: str = Field(
        description="Expression over one element giving the record(s) it is about (a value or a list), "
        "e.g. context.objectWriteTraceId, failedElementNumber or email_address."
    )
    match: str = Field(
        "index",
        description="What `ref` is: index (0-based position of the item in the request), index_from_1, "
        "key (the delivery's idempotency key, sent in `item_key`) or item.<path> (a field of the item "
        "sent, e.g. item.email_address).",
    )
    status: str | None = Field(
        None,
        description="Errors: expression giving the record's HTTP status (a 429 or 5xx is retried, other "
        "codes dead-letter the record); without it an error dead-letters the record.",
    )
    message: str | None = Field(
        None, description="Errors: expression giving the error's text for the trace, e.g. message."
    )

    @field_validator("match")
    @classmethod
    def _match(cls, v: str) -> str:
        if v not in ("index", "index_from_1", "key") and not (v.startswith("item.") and len(v) > 5):
            raise ValueError(f"bad match {v!r}: write index, index_from_1, key or item.<path>")
        return v


class HttpBatchFormat(Spec):
    """How several records make one request and how the answer speaks about each (a batch API's shape)."""

    items: str = Field(
        "",
        description="Dotted path of the array in the rendered body that holds the records (e.g. inputs): "
        "the arrays of all records are joined into one, the rest of the body is the first record's. "
        "Empty: the request body is a JSON array of the records' bodies.",
    )
    max_records: int | None = Field(
        None, ge=1, description="The API's documented limit of records per request (`check` enforces it)."
    )
    item_key: str | None = Field(
        None,
        description="A field set in every item to its delivery's idempotency key (e.g. objectWriteTraceId), "
        "so the API (and the answer's references, with `match: key`) can tell the records apart.",
    )
    unique: str | None = Field(
        None,
        description="A field of each item (e.g. id) no two items of one request may share: a later record "
        "with the same value goes in the next request, so two changes of one record apply in arrival order "
        "as they would one by one.",
    )
    results: PerRecord | None = Field(
        None, description="Per-record results of a successful answer; `response: {id: result.id}` reads them."
    )
    errors: PerRecord | None = Field(
        None, description="Per-record errors, in a 2xx (multi-status) or a 4xx answer."
    )

    @model_validator(mode="after")
    def _keyed(self) -> HttpBatchFormat:
        for name in ("results", "errors"):
            spec = getattr(self, name)
            if spec is not None and spec.match == "key" and not self.item_key:
                raise ValueError(
                    f"{name}.match: key needs `item_key` (the field of each item that carries its key), "
                    "e.g. item_key: objectWriteTraceId"
                )
        return self


@dataclass
class _Compiled:
    spec: PerRecord
    path: Expr
    ref: Expr
    status: Expr | None
    message: Expr | None


def _compile(spec: PerRecord | None) -> _Compiled | None:
    if spec is None:
        return None
    return _Compiled(
        spec,
        compile_expr(spec.path),
        compile_expr(spec.ref),
        compile_expr(spec.status) if spec.status else None,
        compile_expr(spec.message) if spec.message else None,
    )


@dataclass
class Combined:
    """One request body made of several records' bodies; `owner[i]` is the member that item i came from."""

    body: Any
    items: list[Any] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)


class BatchShape:
    """A compiled `batch_format`: builds one body from many, reads the answer back per record."""

    def __init__(self, fmt: HttpBatchFormat) -> None:
        self.fmt = fmt
        self.results = _compile(fmt.results)
        self.errors = _compile(fmt.errors)

    def rounds(self, bodies: Sequence[Any]) -> list[list[int]]:
        """The members in requests sent one after the other: with `unique`, a member whose item repeats a
        value of an earlier member goes in a later request than it; else all in one."""
        if not self.fmt.unique:
            return [list(range(len(bodies)))]
        last: dict[str, int] = {}  # value -> the round of the latest member holding it
        out: list[list[int]] = []
        for i, body in enumerate(bodies):
            part = dig(body, self.fmt.items) if self.fmt.items else body
            values = [
                orjson.dumps(v).decode()
                for item in (part if isinstance(part, list) else [part])
                if (v := dig(item, self.fmt.unique)) is not None
            ]
            r = max((last[v] + 1 for v in values if v in last), default=0)
            while len(out) <= r:
                out.append([])
            out[r].append(i)
            for v in values:
                last[v] = r
        return out

    def combine(self, bodies: Sequence[Any], keys: Sequence[str]) -> Combined:
        """The bodies (parsed JSON) of several records as one body; each item gets `item_key` set."""
        path = self.fmt.items
        out = Combined(None)
        for i, (body, key) in enumerate(zip(bodies, keys, strict=True)):
            part = dig(body, path) if path else body
            items = part if isinstance(part, list) else [part]
            for item in items:
                if self.fmt.item_key and isinstance(item, dict):
                    item[self.fmt.item_key] = key
                out.items.append(item)
                out.owner.append(i)
        if not path:
            out.body = out.items
        else:
            envelope = bodies[0] if isinstance(bodies[0], dict) else {}
            out.body = _replaced(envelope, path.split("."), out.items)
        return out

    def members(
        self, combined: Combined, keys: Sequence[str], refs: Any, spec: PerRecord
    ) -> tuple[list[int], bool]:
        """Which members an element's `ref` points at, and whether it pointed at anything known."""
        values = refs if isinstance(refs, list) else [refs]
        found: list[int] = []
        for v in values:
            if v is None:
                continue
            if spec.match in ("index", "index_from_1"):
                try:
                    pos = int(v) - (1 if spec.match == "index_from_1" else 0)
                except (TypeError, ValueError):
                    continue
                if 0 <= pos < len(combined.items):
                    found.append(combined.owner[pos])
            elif spec.match == "key":
                found.extend(i for i, k in enumerate(keys) if k == str(v))
            else:
                sub = spec.match[5:]
                found.extend(
                    combined.owner[pos] for pos, item in enumerate(combined.items) if _same(dig(item, sub), v)
                )
        return sorted(set(found)), bool(found)

    def outcomes(
        self,
        whole: Outcome,
        answer: dict[str, Any],
        combined: Combined,
        keys: Sequence[str],
        redact: Callable[[str], str],
        pick: Callable[[dict[str, Any]], dict[str, Any] | None],
        classify: Callable[[int], OutcomeClass],
    ) -> list[Outcome]:
        """Each member's outcome from the whole request's outcome and the answer's per-record lists.

        2xx: a member named by an error failed; the others succeeded (their result, when listed, is
        mapped). Other 4xx: members named by errors failed, the others were not applied and are sent
        again without them; with no error naming one, the batch is split to find the bad record.
        429/5xx, 401/403, 410 and no answer apply to every member alike."""
        n = len(keys)
        cls = whole.cls
        if cls not in (OutcomeClass.SUCCESS, OutcomeClass.TERMINAL) or whole.status_code is None:
            return [_copy(whole) for _ in range(n)]
        failed: dict[int, Outcome] = {}
        unplaced: list[str] = []  # the texts of errors that name no record of the batch
        if self.errors is not None:
            for err in _listed(self.errors.path.search(answer)):
                text = self.errors.message.search(err) if self.errors.message else None
                text = redact(str(text)) if text else "refused by the API for this record"
                who, known = self.members(combined, keys, self.errors.ref.search(err), self.errors.spec)
                if not known:
                    unplaced.append(text)
                    continue
                status = _int(self.errors.status.search(err)) if self.errors.status else None
                rec_cls = classify(status) if status is not None else OutcomeClass.TERMINAL
                if rec_cls is OutcomeClass.SUCCESS:
                    continue
                for m in who:
                    failed.setdefault(
                        m,
                        Outcome(
                            rec_cls,
                            whole.status_code,
                            whole.latency_ms,
                            redact(excerpt(orjson.dumps(err))),
                            error=text,
                            retry_after_s=whole.retry_after_s,
                        ),
                    )
        if n == 1 and unplaced:  # alone in its request: the answer's error is about this record
            return [_copy(whole, cls=OutcomeClass.TERMINAL, error=unplaced[0])]
        if cls is OutcomeClass.TERMINAL and not failed or unplaced:
            # Refused (or partly refused) without saying which record: halves are sent to find out. A
            # record is never taken for delivered while an error in the answer may be its own.
            why = (
                f"HTTP {whole.status_code} for the whole batch of {n} without per-record detail"
                if not unplaced
                else f"{len(unplaced)} error(s) in the answer point at no record of the batch"
            )
            return [_copy(whole, cls=OutcomeClass.TERMINAL, split=True, error=why) for _ in range(n)]
        results: dict[int, Any] = {}
        if cls is OutcomeClass.SUCCESS and self.results is not None:
            for res in _listed(self.results.path.search(answer)):
                who, _ = self.members(combined, keys, self.results.ref.search(res), self.results.spec)
                for m in who:
                    results.setdefault(m, res)
        out: list[Outcome] = []
        for m in range(n):
            if m in failed:
                out.append(failed[m])
            elif cls is OutcomeClass.TERMINAL:
                out.append(
                    _copy(
                        whole, resend=True, error="not applied: the API refused the batch for other records"
                    )
                )
            else:
                res = results.get(m)
                one = _copy(whole)
                if res is not None:
                    one.excerpt = redact(excerpt(orjson.dumps(res)))
                one.fields = pick({**answer, "result": res})
                out.append(one)
        return out


def _replaced(body: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    out = dict(body)
    if len(parts) == 1:
        out[parts[0]] = value
    else:
        inner = out.get(parts[0])
        out[parts[0]] = _replaced(inner if isinstance(inner, dict) else {}, parts[1:], value)
    return out


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _same(a: Any, b: Any) -> bool:
    return a is not None and (a == b or str(a) == str(b))


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _copy(
    o: Outcome,
    *,
    cls: OutcomeClass | None = None,
    split: bool = False,
    resend: bool = False,
    error: str | None = None,
) -> Outcome:
    return Outcome(  # by keyword: Outcome may gain fields
        o.cls if cls is None else cls,
        status_code=o.status_code,
        latency_ms=o.latency_ms,
        excerpt=o.excerpt,
        error=o.error if error is None else error,
        retry_after_s=o.retry_after_s,
        split=split,
        resend=resend,
    )


# ----------------------------------------------------------------------------- form bodies
BodyFormat = Literal["json", "form"]


def form_encode(value: Any) -> str:
    """application/x-www-form-urlencoded in the bracket style (Stripe's): nested mappings as
    `metadata[key]=v`, lists as `items[0][price]=p`, booleans as true/false. A null (a field the record
    lacks) is not sent: an empty string is what unsets a field at such APIs, and it is sent as given."""
    if not isinstance(value, Mapping):
        raise ValueError(f"a form body is a mapping of fields, not a {type(value).__name__}")
    pairs: list[tuple[str, str]] = []

    def walk(name: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{name}[{k}]" if name else str(k), x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(f"{name}[{i}]", x)
        elif v is None:
            return
        elif isinstance(v, bool):
            pairs.append((name, "true" if v else "false"))
        else:
            pairs.append((name, str(v)))

    walk("", value)
    return urlencode(pairs)
