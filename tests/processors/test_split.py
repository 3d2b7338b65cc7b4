"""split, as a pure step: one record per element, the parent's fields beside each, in order."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchbay.errors import RecordInvalid
from patchbay.processors.base import Dropped
from patchbay.processors.split import SplitConfig, SplitStep

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
items = st.lists(
    st.one_of(scalars, st.dictionaries(st.text("abc", min_size=1, max_size=3), scalars, max_size=3)),
    min_size=1,
    max_size=20,
)


@settings(deadline=None)  # slow CI machines; these are about correctness
@given(items, st.text(max_size=5))
def test_one_record_per_element_in_order_with_the_parent(lines: list[Any], order_id: str) -> None:
    step = SplitStep(SplitConfig.model_validate({"path": "order.lines", "with": {"order_id": "order.id"}}))
    out = step.elements({"order": {"id": order_id, "lines": lines}})
    assert len(out) == len(lines)
    for got, item in zip(out, lines, strict=True):
        assert got["order_id"] == order_id
        base = item if isinstance(item, dict) else {"value": item}
        assert {k: v for k, v in got.items() if k != "order_id"} == {
            k: v for k, v in base.items() if k != "order_id"
        }


@settings(deadline=None)
@given(items)
def test_without_with_each_element_has_the_parent_minus_the_array(lines: list[Any]) -> None:
    record = {"id": 1, "order": {"lines": lines, "currency": "EUR"}}
    out = SplitStep(SplitConfig.model_validate("order.lines")).elements(record)
    assert all(e["parent"] == {"id": 1, "order": {"currency": "EUR"}} for e in out)
    assert record["order"]["lines"] == lines  # the input record is not changed


def test_empty_missing_and_not_an_array() -> None:
    step = SplitStep(SplitConfig.model_validate("lines"))
    with pytest.raises(Dropped, match="lines is empty"):
        step.elements({"lines": []})
    with pytest.raises(RecordInvalid, match="the array is missing"):
        step.elements({})
    with pytest.raises(RecordInvalid, match="a str, not an array"):
        step.elements({"lines": "x"})
