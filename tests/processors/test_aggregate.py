"""aggregate and dedupe as steps: windows in a time zone, what a record adds, the window record, checks."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from patchbay.errors import RecordInvalid
from patchbay.processors.aggregate import AggregateConfig, AggregateStep
from patchbay.processors.base import GateContext
from patchbay.processors.dedupe import DedupeConfig, DedupeStep
from patchbay.registry import STEPS
from patchbay.store.base import ValueState, WindowState
from tests.config.test_check import FLOW, check, p, project

PARIS = ZoneInfo("Europe/Paris")


def agg(**config: Any) -> AggregateStep:
    config.setdefault("window", "1d")
    config.setdefault("values", {"orders": {"count": True}})
    return AggregateStep(AggregateConfig.model_validate(config))


def ctx(at: float = 0.0) -> GateContext:
    return GateContext("orders", "daily", "evt_1", at, 2)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_registered() -> None:
    assert STEPS["aggregate"].cls is AggregateStep and STEPS["dedupe"].cls is DedupeStep


def test_a_day_is_the_local_day_of_the_time_zone() -> None:
    step = agg(timezone="Europe/Paris")
    start, end = step.bounds(ts("2026-12-06T23:30:00+00:00"))  # 00:30 on the 7th in Paris
    assert datetime.fromtimestamp(start, PARIS).isoformat() == "2026-12-07T00:00:00+01:00"
    assert end - start == 86400
    assert step.label(start) == "2026-12-07"


def test_days_follow_daylight_saving_time() -> None:
    step = agg(timezone="Europe/Paris")
    start, end = step.bounds(ts("2026-03-29T12:00:00+02:00"))  # the spring-forward day has 23 hours
    assert end - start == 23 * 3600
    start, end = step.bounds(ts("2026-10-25T12:00:00+01:00"))  # the fall-back day has 25
    assert end - start == 25 * 3600


def test_weeks_start_on_monday_and_hours_follow_the_local_clock() -> None:
    week = agg(window="7d", timezone="Europe/Paris")
    start, _ = week.bounds(ts("2026-12-06T10:00:00+01:00"))  # a Sunday
    assert datetime.fromtimestamp(start, PARIS).isoformat() == "2026-11-30T00:00:00+01:00"
    assert week.label(start) == "week of 2026-11-30"
    india = agg(window="1h", timezone="Asia/Kolkata")
    start, end = india.bounds(ts("2026-12-06T10:45:00+05:30"))
    assert datetime.fromtimestamp(start, ZoneInfo("Asia/Kolkata")).strftime("%H:%M") == "10:00"
    assert end - start == 3600


def test_what_a_record_adds() -> None:
    step = agg(
        by="shop",
        time="at",
        values={
            "revenue": {"sum": "amount"},
            "orders": {"count": True},
            "with_coupon": {"count": "coupon"},
            "customers": {"distinct": "lower(email)"},
            "first": {"min": "at"},
        },
    )
    add, entry = step.gate(
        {"shop": "paris", "amount": 19.99, "email": "A@x.com", "at": "2026-12-06T10:00:00Z"}, ctx()
    )
    assert entry == {"window": "2026-12-06", "key": "paris"}
    assert (add.step, add.key, add.label, add.trace_at, add.keep_s) == (
        "daily",
        '"paris"',
        "2026-12-06",
        2,
        None,
    )
    v = add.values
    assert (v["revenue"].num, v["revenue"].scale, v["revenue"].is_float) == (19.99, 2, True)
    assert (v["orders"].n, v["with_coupon"].n, v["customers"].item) == (1, 0, '"a@x.com"')
    assert v["first"].extreme == "2026-12-06T10:00:00Z"


def test_arrival_time_is_used_without_a_time_expression() -> None:
    add, _ = agg().gate({}, ctx(ts("2026-12-06T10:00:00+00:00")))
    assert add.label == "2026-12-06" and add.key == "null"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"amount": "12.50", "at": "2026-12-06"}, r"not a number; convert text with to_float\(amount\)"),
        ({"amount": True, "at": "2026-12-06"}, "not a number"),
        ({"amount": 1, "at": "yesterday"}, "is not a date"),
        ({"amount": 1}, "the record has no time"),
    ],
)
def test_bad_values_quarantine_the_record(record: dict[str, Any], message: str) -> None:
    step = agg(time="at", values={"revenue": {"sum": "amount"}})
    with pytest.raises(RecordInvalid, match=message):
        step.gate(record, ctx())


def test_the_window_record() -> None:
    step = agg(
        timezone="Europe/Paris",
        values={
            "revenue": {"sum": "amount"},
            "units": {"sum": "qty"},
            "orders": {"count": True},
            "customers": {"distinct": "email"},
            "smallest": {"min": "amount"},
            "average": {"avg": "amount"},
            "none": {"max": "missing"},
        },
    )
    start, end = step.bounds(ts("2026-12-06T10:00:00+01:00"))
    values = {
        "revenue": ValueState(3, 25.000000000000004, 2, True, None, None, 0),
        "units": ValueState(3, 7.0, 0, False, None, None, 0),
        "orders": ValueState(3, 0, 0, False, None, None, 0),
        "customers": ValueState(3, 0, 0, False, None, None, 2),
        "smallest": ValueState(3, 0, 0, False, 0.01, 19.99, 0),
        "average": ValueState(3, 25.0, 2, True, None, None, 0),
        "none": ValueState(0, 0, 0, False, None, None, 0),
    }
    w = WindowState("orders", "daily", '"paris"', start, end, "2026-12-06", 1, 3, values)
    assert step.window_record(w) == {
        "key": "paris",
        "window": {
            "start": "2026-12-06T00:00:00+01:00",
            "end": "2026-12-07T00:00:00+01:00",
            "date": "2026-12-06",
            "label": "2026-12-06",
            "revision": 1,
            "records": 3,
        },
        "revenue": 25.0,
        "units": 7,
        "orders": 3,
        "customers": 2,
        "smallest": 0.01,
        "average": 8.333333,
        "none": None,
    }


def test_dedupe_claims_a_digest_of_the_key() -> None:
    step = DedupeStep(DedupeConfig.model_validate({"key": "lower(email)", "within": "24h"}))
    claim, entry = step.gate({"email": "A@x.com"}, ctx())
    assert claim is not None and claim.within_s == 86400 and claim.trace_at == 2 and claim.step == "daily"
    assert "a@x.com" not in claim.key and entry == {"key": "a@x.com"}
    same, _ = step.gate({"email": "a@X.com"}, ctx())
    assert same is not None and same.key == claim.key
    none, entry = step.gate({}, ctx())
    assert none is None and entry["note"] == "no key: not deduplicated"
    strict = DedupeStep(
        DedupeConfig.model_validate({"key": "email", "within": "1h", "on_missing": "quarantine"})
    )
    with pytest.raises(RecordInvalid, match="email is null"):
        strict.gate({}, ctx())


AGG_FLOW = FLOW.replace(
    "  - validate:",
    """  - name: daily
    aggregate:
      by: shop
      window: 1d
      time: at
      values:
        revenue: {sum: amount}
  - validate:""",
)

CHECKS = [
    (
        "unknown function",
        ("revenue: {sum: amount}", "revenue: {total: amount}"),
        14,
        "unknown aggregate function 'total'",
    ),
    ("window too short", ("window: 1d", "window: 500ms"), 11, "too short: the shortest is 1s"),
    ("window too long", ("window: 1d", "window: 30d"), 11, "too long: the longest is 7d"),
    ("window not dividing a day", ("window: 1d", "window: 7m"), 11, "divides a day"),
    ("by does not compile", ("by: shop", "by: lower(shop"), 10, "aggregate:"),
    ("time does not compile", ("time: at", "time: nope(at)"), 12, "unknown function 'nope'"),
    ("reserved name", ("revenue: {sum", "window: {sum"), 14, "'window' is taken"),
    ("count of nothing", ("revenue: {sum: amount}", "revenue: {sum: true}"), 14, "sum takes an expression"),
]


@pytest.mark.parametrize(("name", "change", "line", "message"), CHECKS, ids=[c[0] for c in CHECKS])
def test_check_reports_aggregate_problems_at_file_and_line(tmp_path, name, change, line, message) -> None:
    code, out = check(project(tmp_path, AGG_FLOW.replace(*change)))
    assert code == 2
    where = f"{p(tmp_path, 'flows/leads.yaml')}:{line}:"
    assert any(o.startswith(where) and message in o for o in out), out


def test_a_good_aggregate_passes_check(tmp_path) -> None:
    code, out = check(project(tmp_path, AGG_FLOW))
    assert code == 0, out


def test_check_reports_dedupe_problems_and_twin_names(tmp_path) -> None:
    flow = FLOW.replace("  - validate:", "  - dedupe: {key: lower(email, within: 24h}\n  - validate:")
    code, out = check(project(tmp_path, flow))
    assert code == 2 and any(o.startswith(p(tmp_path, "flows/leads.yaml") + ":8:") for o in out), out
    flow = FLOW.replace("  - validate:", "  - dedupe: {key: email, within: 400d}\n  - validate:")
    code, out = check(project(tmp_path, flow))
    assert code == 2 and any("out of range: from 1s to 366d" in o for o in out), out
    twice = "  - dedupe: {key: email, within: 1h}\n" * 2
    code, out = check(project(tmp_path, FLOW.replace("  - validate:", twice + "  - validate:")))
    assert code == 2 and any(":9:" in o and "two steps are named 'dedupe'" in o for o in out), out


def test_check_refuses_a_gate_step_after_a_call(tmp_path, monkeypatch) -> None:
    from patchbay import registry
    from patchbay.processors.base import StepConfig

    class WaitConfig(StepConfig):
        url: str

    class WaitStep:  # stands for a call step: its run waits for an answer, then resumes
        calls = True

        def __init__(self, config: WaitConfig) -> None:
            self.config = config

        @classmethod
        def check(cls, config: WaitConfig) -> Any:
            return iter(())

    registry.discover()
    monkeypatch.setitem(
        registry.STEPS, "wait_for", registry.Entry("wait_for", WaitStep, WaitConfig, ("step",))
    )
    flow = FLOW.replace(
        "  - validate:", "  - wait_for: {url: x}\n  - dedupe: {key: email, within: 1h}\n  - validate:"
    )
    code, out = check(project(tmp_path, flow))
    assert code == 2
    assert any(":9:" in o and "cannot come after a call step (step 2)" in o for o in out), out


def test_a_dry_run_says_which_window_a_record_counts_in(tmp_path) -> None:
    from click.testing import CliRunner

    from patchbay.cli.main import main
    from tests.conftest import lead_project

    steps = "- dedupe: {key: email, within: 1h}\n- name: daily\n  aggregate: {by: shop, window: 1d, time: at, values: {n: {count: true}}}\n"
    root = lead_project(tmp_path, "http://127.0.0.1:9", steps=steps)
    data = '{"email": "a@x.com", "shop": "paris", "at": "2026-12-06T10:00:00Z"}'
    res = CliRunner().invoke(main, ["run", "lead-capture", "-p", str(root), "--dry-run", "-d", data])
    assert res.exit_code == 0, res.output
    assert 'dedupe (dedupe): key "a@x.com" (a duplicate is decided when stored)' in res.output
    assert 'daily (aggregate): window 2026-12-06, key "paris"' in res.output
    assert "result: counted into its window" in res.output


def test_hopping_windows_count_a_record_in_each_window_that_holds_it() -> None:
    step = agg(window="1h", hop="15m", timezone="Europe/Paris")
    adds, entry = step.gate({}, ctx(ts("2026-12-06T10:20:00+01:00")))
    assert isinstance(adds, list) and len(adds) == 4
    starts = [datetime.fromtimestamp(a.start, PARIS).strftime("%H:%M") for a in adds]
    assert starts == ["10:15", "10:00", "09:45", "09:30"]
    assert all(a.end - a.start == 3600 and a.start <= ts("2026-12-06T10:20:00+01:00") < a.end for a in adds)
    assert entry["windows"] == [a.label for a in adds] and entry["window"] == adds[0].label
    later, _ = step.gate({}, ctx(ts("2026-12-06T10:31:00+01:00")))  # the next quarter: windows move on
    assert isinstance(later, list) and later[0].start == adds[0].start + 900


@pytest.mark.parametrize(
    ("window", "hop", "message"),
    [("1d", "1h", "shorter than a day"), ("1h", "7m", "whole parts"), ("1h", "1m", "at most 24")],
)
def test_bad_hops_are_refused(window: str, hop: str, message: str) -> None:
    config = AggregateConfig.model_validate({"window": window, "hop": hop, "values": {"n": {"count": True}}})
    assert any(message in i.message for i in AggregateStep.check(config))
