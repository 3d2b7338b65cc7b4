"""filter: pass, drop, bad data, and the static check for filters that never pass."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from patchbay.errors import RecordInvalid
from patchbay.expressions import ExprError
from patchbay.processors.base import Dropped
from patchbay.processors.filter import FilterConfig, FilterStep
from patchbay.registry import STEPS


def filt(config: Any) -> FilterStep:
    return FilterStep(FilterConfig.model_validate(config))


def test_registered() -> None:
    assert STEPS["filter"].cls is FilterStep


def test_true_passes_the_record_unchanged() -> None:
    record = {"status": "paid", "amount": 5}
    assert filt({"when": "status == 'paid' && amount > `0`"}).apply(record) is record


@pytest.mark.parametrize("record", [{"status": "refunded"}, {}, {"status": None}])
def test_false_drops_with_the_reason(record: dict[str, Any]) -> None:
    with pytest.raises(Dropped, match=r"^filter: status == 'paid' was false$"):
        filt({"when": "status == 'paid'"}).apply(record)


@pytest.mark.parametrize(
    ("value", "passes"),
    [(0, True), ("x", True), ([1], True), ("", False), ([], False), ({}, False), (False, False)],
)
def test_jmespath_truthiness(value: Any, passes: bool) -> None:
    step = filt("v")
    if passes:
        assert step.apply({"v": value}) == {"v": value}
    else:
        with pytest.raises(Dropped):
            step.apply({"v": value})


def test_short_form() -> None:
    assert FilterConfig.model_validate("a").when == "a"
    assert filt("a").apply({"a": 1}) == {"a": 1}


def test_bad_data_is_record_invalid() -> None:
    with pytest.raises(RecordInvalid) as info:
        filt({"when": "to_int(n) > `3`"}).apply({"n": "many"})
    assert info.value.step == "filter"
    assert '"many" is not an integer' in str(info.value)


def test_config() -> None:
    with pytest.raises(ValidationError):
        FilterConfig.model_validate({"when": "a", "unless": "b"})
    with pytest.raises(ExprError, match="unknown function 'lowr'"):
        filt({"when": "lowr(a) == 'x'"})


@pytest.mark.parametrize("when", ["`false`", "`null`", "status == 'paid' && `false`"])
def test_check_reports_a_filter_that_never_passes(when: str) -> None:
    [issue] = FilterStep.check(FilterConfig.model_validate({"when": when}))
    assert issue.loc == ("when",)
    assert issue.message == "this filter never passes; the steps after it are unreachable"


def test_check_reports_bad_expressions() -> None:
    [issue] = FilterStep.check(FilterConfig.model_validate({"when": "status =="}))
    assert issue.loc == ("when",) and "incomplete expression" in issue.message
    [issue] = FilterStep.check(FilterConfig.model_validate("lowr(a)"))
    assert issue.loc == () and "did you mean 'lower'" in issue.message
    assert list(FilterStep.check(FilterConfig.model_validate({"when": "status == 'paid'"}))) == []
