"""aggregate: count, sum, min, max, avg and distinct values per key over tumbling time windows.

A record adds to its window in the transaction that accepts its event (the store adds the deltas, so
a crash never counts it twice). When the window closes (its end plus the `late` grace), the hub
emits one record per window and key into the steps after this one and the flow's destinations
(engine/windows.py). A record later than that is quarantined, or, with `too_late: revise`, counted
into a revision of its window: a new record with the corrected totals, revision 2, 3, ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import Field

from patchbay.config.durations import Duration
from patchbay.errors import RecordInvalid, Violation
from patchbay.expressions import DataError, Expr, ExprError, compile_expr, describe, parse_datetime
from patchbay.processors.base import CheckIssue, GateContext, StepConfig
from patchbay.registry import step
from patchbay.store.base import Contribution, ValueState, WindowAdd, WindowState

FUNCTIONS = ("sum", "count", "min", "max", "avg", "distinct")
RESERVED = ("key", "window")
MIN_WINDOW_S = 1.0
MAX_WINDOW_S = 7 * 86400.0
DAY = 86400.0
ARRIVAL_GRACE_S = 5.0


class AggregateConfig(StepConfig):
    """`aggregate: {by: <expr>, window: 1d, values: {revenue: {sum: amount}, orders: {count: true}}}`."""

    by: str | None = Field(
        None,
        description=(
            "JMESPath expression: the key records are grouped by (one window record per key); none: one"
            " group. A list groups by several values, e.g. `[store, currency]`."
        ),
        examples=["store_id", "[store, currency]"],
    )
    window: Duration = Field(
        description=(
            "Length of the tumbling window: 1d (local days), 7d (weeks from Monday), or a length that"
            " divides a day (1s to 12h: 1m, 15m, 1h, ...), aligned to the local clock of `timezone`."
        ),
        examples=["1d", "1h", "15m"],
    )
    time: str | None = Field(
        None,
        description=(
            "JMESPath expression for the record's time (ISO 8601 text, a date, or Unix seconds; text without"
            " an offset is read in `timezone`); none: the time the event arrived."
        ),
        examples=["created_at", "occurred_at"],
    )
    timezone: str = Field(
        "UTC", description="Time zone whose days and hours the windows follow, e.g. Europe/Paris."
    )
    values: dict[str, dict[str, Any]] = Field(
        description=(
            "The values of each window record, by name: `{sum: expr}`, `{avg: expr}`, `{min: expr}`,"
            " `{max: expr}` (numbers, or text such as ISO dates), `{distinct: expr}` (how many different"
            " values), `{count: true}` (records) or `{count: expr}` (records where it is not null)."
            " Null values are left out. `key` and `window` are taken: the record's key and its window."
        ),
        examples=[
            {"revenue": {"sum": "amount"}, "orders": {"count": True}, "customers": {"distinct": "email"}}
        ],
    )
    late: Duration = Field(
        0.0,
        description=(
            "Grace after a window's end: records up to this late are still counted, then the window's record"
            " is emitted (by arrival time, at least 5s, for events in flight at the end)."
        ),
        examples=["0s", "5m", "1h"],
    )
    too_late: Literal["quarantine", "revise"] = Field(
        "quarantine",
        description=(
            "A record later than that: `quarantine` it with the reason (the window's record stands), or"
            " `revise`: count it and emit the window's record again with the corrected totals and"
            " `window.revision` 2, 3, ... (a destination that upserts by window and key overwrites the row)."
        ),
    )
    keep: Duration = Field(
        7 * DAY,
        description="With `too_late: revise`: how long after it closed a window can be revised; later records are quarantined.",
        examples=["1d", "7d"],
    )
    hop: Duration | None = Field(
        None,
        description=(
            "Hopping windows (windows shorter than a day only): a window starts every `hop` and lasts"
            " `window`, so a record counts in window/hop of them (at most 24), e.g. `window: 1h, hop: 15m`:"
            " the last hour, every quarter hour. Default: tumbling windows, one per record."
        ),
        examples=["15m", "1m"],
    )
    pass_through: bool = Field(
        False,
        description=(
            "Records also go on to the next steps and the destinations (the window records follow them,"
            " told apart by their `window` field): count and deliver in one flow. Default: records stop here."
        ),
    )


class _Value:
    def __init__(self, name: str, fn: str, arg: Any) -> None:
        self.name, self.fn = name, fn
        self.expr: Expr | None = None if (fn == "count" and arg is True) else compile_expr(str(arg))


def _parse_values(values: dict[str, dict[str, Any]]) -> Iterator[tuple[tuple[str, ...], str, _Value | None]]:
    """Each value as (loc, problem or '', parsed)."""
    if not values:
        yield (), "give at least one value, e.g. `orders: {count: true}`", None
    for name, spec in values.items():
        if name in RESERVED:
            yield (name,), f"{name!r} is taken by the window record's own field; choose another name", None
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            yield (name,), f"a value is one function and its expression, e.g. `{name}: {{sum: amount}}`", None
            continue
        ((fn, arg),) = spec.items()
        if fn not in FUNCTIONS:
            yield (name, fn), f"unknown aggregate function {fn!r}; use one of {', '.join(FUNCTIONS)}", None
            continue
        if arg is None or arg is False or (arg is True and fn != "count") or isinstance(arg, dict | list):
            what = "an expression (or `true` for records)" if fn == "count" else "an expression"
            yield (name, fn), f"{fn} takes {what}, e.g. `{fn}: amount`", None
            continue
        try:
            yield (name, fn), "", _Value(name, fn, arg)
        except ExprError as exc:
            yield (name, fn), exc.message, None


def window_problem(seconds: float) -> str | None:
    if seconds < MIN_WINDOW_S:
        return f"a window of {seconds:g}s is too short: the shortest is 1s"
    if seconds > MAX_WINDOW_S:
        return (
            f"a window of {seconds:g}s is too long: the longest is 7d (for longer, query the reporting table)"
        )
    if seconds >= DAY:
        return None if seconds in (DAY, 7 * DAY) else "a window of a day or more is 1d or 7d"
    if (DAY / seconds) % 1 or seconds % 1:
        return f"a window shorter than a day divides a day in whole seconds (1m, 15m, 1h, 6h, ...), not {seconds:g}s"
    return None


def hop_problem(window: float, hop: float) -> str | None:
    if window >= DAY:
        return "hopping windows are shorter than a day; remove `hop` or shorten the window"
    if hop <= 0 or hop >= window or (window / hop) % 1:
        return f"hop divides the window into whole parts (window {window:g}s: e.g. {window / 4:g}s), not {hop:g}s"
    if window / hop > 24:
        return f"a record would count in {window / hop:g} windows; at most 24: make `hop` longer"
    return None


@step("aggregate", config=AggregateConfig)
class AggregateStep:
    """Count and sum records per key over time windows; one record per window and key when it closes."""

    def __init__(self, config: AggregateConfig) -> None:
        self.config = config
        problem = window_problem(config.window) or (
            hop_problem(config.window, config.hop) if config.hop is not None else None
        )
        if problem:
            raise ValueError(problem)
        self.tz = ZoneInfo(config.timezone)
        self._by = compile_expr(config.by) if config.by else None
        self._time = compile_expr(config.time) if config.time else None
        self._values = []
        for _, message, v in _parse_values(config.values):
            if v is None:
                raise ValueError(message)
            self._values.append(v)
        self.absorbs = not config.pass_through
        self._last: tuple[float, float] = (0.0, 0.0)  # the last window found, and its label
        self._label: tuple[float, str] = (-1.0, "")

    def apply(self, record: Any) -> Any:
        """Without the hub (a flow test): the record goes on unchanged; counting needs the store."""
        return record

    # -------------------------------------------------------------- at ingest
    def gate(self, record: Any, ctx: GateContext) -> tuple[WindowAdd | list[WindowAdd], dict[str, Any]]:
        """What `record` adds to its window (each of its windows, when they hop), and the trace entry."""
        key = self._by.search(record) if self._by else None
        t = self._when(record, ctx.received_at)
        start, end = self.bounds(t)
        contributions: dict[str, Contribution] = {}
        violations: list[Violation] = []
        for v in self._values:
            try:
                contributions[v.name] = self._contribute(v, record)
            except DataError as exc:
                violations.append(Violation(f"values.{v.name}", f"{v.fn}: {exc}"))
        if violations:
            raise RecordInvalid(violations, step=ctx.step)
        label = self.label(start)
        add = WindowAdd(
            step=ctx.step,
            key=_canon(key),
            start=start,
            end=end,
            # By arrival time, an event processed just before its window's end must not be found late
            # when its transaction commits just after: such windows wait at least ARRIVAL_GRACE_S.
            grace_s=self.config.late if self._time is not None else max(self.config.late, ARRIVAL_GRACE_S),
            keep_s=self.config.keep if self.config.too_late == "revise" else None,
            label=label,
            values=contributions,
            trace_at=ctx.trace_at,
        )
        if self.config.hop is None:
            return add, {"window": label, "key": key}
        adds = [add]  # the newest window holding t, then the earlier ones that still hold it
        for k in range(1, round(self.config.window / self.config.hop)):
            s0 = start - k * self.config.hop
            adds.append(replace(add, start=s0, end=s0 + self.config.window, label=self.label(s0)))
        return adds, {"window": label, "windows": [a.label for a in adds], "key": key}

    def _when(self, record: Any, arrival: float) -> float:
        if self._time is None:
            return arrival
        raw = self._time.search(record)
        try:
            value = parse_datetime(raw)
        except DataError as exc:
            raise RecordInvalid([Violation("time", f"{self._time.text}: {exc}")]) from exc
        if value is None:
            raise RecordInvalid([Violation("time", f"{self._time.text} is null: the record has no time")])
        if isinstance(value, datetime):
            return (value if value.tzinfo is not None else value.replace(tzinfo=self.tz)).timestamp()
        return datetime.combine(value, dtime(0), self.tz).timestamp()

    def _contribute(self, v: _Value, record: Any) -> Contribution:
        if v.expr is None:  # count: true
            return Contribution(1)
        value = v.expr.search(record)
        if value is None:
            return Contribution(0)
        if v.fn == "count":
            return Contribution(1)
        if v.fn == "distinct":
            return Contribution(1, item=_canon(value))
        if v.fn in ("min", "max"):
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise DataError(f"{v.expr.text} is {describe(value)}: min and max take numbers or text")
            return Contribution(1, extreme=value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataError(
                f"{v.expr.text} is {describe(value)}, not a number; convert text with to_float({v.expr.text})"
            )
        return Contribution(1, num=float(value), scale=_scale(value), is_float=isinstance(value, float))

    # -------------------------------------------------------------- windows
    def bounds(self, t: float) -> tuple[float, float]:
        """The window holding instant `t`: days and weeks from local midnight, shorter ones on the local clock."""
        last = self._last
        until = last[1] if self.config.hop is None else last[0] + self.config.hop
        if last[0] <= t < until:  # most records fall in the window of the one before
            return last
        self._last = last = self._bounds(t)
        return last

    def _bounds(self, t: float) -> tuple[float, float]:
        w = self.config.window
        local = datetime.fromtimestamp(t, self.tz)
        if w >= DAY:
            day = local.date()
            if w == 7 * DAY:
                day -= timedelta(days=day.weekday())
            nxt = day + timedelta(days=round(w / DAY))
            return _midnight(day, self.tz), _midnight(nxt, self.tz)
        offset = local.utcoffset() or timedelta(0)
        off = offset.total_seconds()
        step = self.config.hop or w  # hopping: windows start every `hop`
        start = math.floor((t + off) / step) * step - off
        return start, start + w

    def label(self, start: float) -> str:
        if start == self._label[0]:
            return self._label[1]
        self._label = (start, self._make_label(start))
        return self._label[1]

    def _make_label(self, start: float) -> str:
        local = datetime.fromtimestamp(start, self.tz)
        if self.config.window == DAY:
            return local.date().isoformat()
        if self.config.window == 7 * DAY:
            return f"week of {local.date().isoformat()}"
        return local.isoformat()

    # -------------------------------------------------------------- when the window closes
    def window_record(self, w: WindowState) -> dict[str, Any]:
        """The record a closed window emits: its key, where it lies in time, and its values."""
        start = datetime.fromtimestamp(w.start, self.tz)
        out: dict[str, Any] = {
            "key": orjson.loads(w.key),
            "window": {
                "start": start.isoformat(),
                "end": datetime.fromtimestamp(w.end, self.tz).isoformat(),
                "date": start.date().isoformat(),
                "label": w.label,
                "revision": w.revision,
                "records": w.adds,
            },
        }
        for v in self._values:
            out[v.name] = _finish(v.fn, w.values.get(v.name))
        return out

    @classmethod
    def check(cls, config: AggregateConfig) -> Iterator[CheckIssue]:
        """Expressions that do not compile, unknown functions, a window too short or long, a bad time zone."""
        for field in ("by", "time"):
            text = getattr(config, field)
            if text is not None:
                try:
                    compile_expr(text)
                except ExprError as exc:
                    yield CheckIssue((field,), exc.message)
        problem = window_problem(config.window)
        if problem:
            yield CheckIssue(("window",), problem)
        try:
            ZoneInfo(config.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            yield CheckIssue(
                ("timezone",), f"unknown time zone {config.timezone!r}; use a name such as Europe/Paris"
            )
        for loc, message, _ in _parse_values(config.values):
            if message:
                yield CheckIssue(("values", *loc), message)
        if config.hop is not None:
            problem = hop_problem(config.window, config.hop)
            if problem:
                yield CheckIssue(("hop",), problem)
        if config.too_late == "revise" and config.keep < config.late:
            yield CheckIssue(("keep",), "keep is shorter than the `late` grace: no revision could happen")


def _finish(fn: str, s: ValueState | None) -> Any:
    if s is None or (s.n == 0 and fn != "count"):
        return 0 if fn in ("count", "distinct", "sum") else None
    if fn == "count":
        return s.n
    if fn == "distinct":
        return s.distinct
    if fn in ("min", "max"):
        return s.lo if fn == "min" else s.hi
    if fn == "avg":
        return round(s.total / s.n, max(s.scale, 2) + 4)
    if not s.is_float:
        return int(round(s.total))
    return round(s.total, s.scale)


def _scale(value: int | float) -> int:
    if isinstance(value, int):
        return 0
    try:
        exp = Decimal(repr(value)).as_tuple().exponent
    except InvalidOperation:
        return 6
    return min(max(-int(exp), 0), 12) if isinstance(exp, int) else 6


def _canon(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _midnight(day: date, tz: ZoneInfo) -> float:
    return datetime.combine(day, dtime(0), tz).timestamp()
