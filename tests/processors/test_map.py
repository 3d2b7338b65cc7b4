"""map: field expressions, nesting, casts, defaults, keep/drop/flatten, tables, config errors."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from patchbay.errors import RecordInvalid
from patchbay.processors.map import MapConfig, MapStep
from patchbay.registry import STEPS

SEED = {
    "properties.email": "lower(trim(email || customer_email || properties.email))",
    "properties.firstname": "first_name",
    "properties.lead_source": "coalesce(utm_source, 'website')",
    "amount_cents": {"expr": "amount", "type": "int"},
    "country": {"expr": "country", "default": "US"},
    "tags": "split(tags, ',')",
}


def mapper(config: dict[str, Any] | str) -> MapStep:
    return MapStep(MapConfig.model_validate(config))


def errors(config: Any) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as info:
        MapConfig.model_validate(config)
    return [(e["loc"], e["msg"]) for e in info.value.errors()]


def test_registered() -> None:
    assert STEPS["map"].cls is MapStep
    assert STEPS["map"].config is MapConfig


@pytest.mark.parametrize(
    "lead",
    [
        {"email": " Ann@Example.com"},
        {"customer_email": "ANN@example.com "},
        {"properties": {"email": "Ann@EXAMPLE.com"}},
    ],
)
def test_seed_lead_emails_land_in_properties_email(lead: dict[str, Any]) -> None:
    out = mapper(SEED).apply({**lead, "first_name": "Ann", "amount": "1200", "tags": "a,b"})
    assert out == {
        "properties": {"email": "ann@example.com", "firstname": "Ann", "lead_source": "website"},
        "amount_cents": 1200,
        "country": "US",
        "tags": ["a", "b"],
    }


def test_short_and_long_forms_are_the_same() -> None:
    record = {"email": "a@b.co", "utm_source": "ads", "country": "FR"}
    assert mapper(SEED).apply(record) == mapper({"fields": SEED}).apply(record)


def test_missing_source_gives_null_or_is_omitted() -> None:
    assert mapper({"a": "x", "b.c": "y"}).apply({}) == {"a": None, "b": {"c": None}}
    assert mapper({"fields": {"a": "x", "b.c": "y"}, "omit_nulls": True}).apply({}) == {}


def test_constant_values_and_casts() -> None:
    m = mapper(
        {
            "source": {"value": "webform"},
            "version": {"value": "2", "type": "int"},
            "ok": {"expr": "flag", "type": "bool"},
            "price": {"expr": "price", "type": "float"},
            "zip": {"expr": "zip", "type": "str"},
        }
    )
    out = m.apply({"flag": "yes", "price": "9.5", "zip": 75001})
    assert out == {"source": "webform", "version": 2, "ok": True, "price": 9.5, "zip": "75001"}


def test_every_failing_field_is_reported() -> None:
    m = mapper({"a": {"expr": "a", "type": "int"}, "b": "to_bool(b)", "c": "c"})
    with pytest.raises(RecordInvalid) as info:
        m.apply({"a": "12x", "b": "maybe", "c": 1})
    assert info.value.step == "map"
    assert [(v.path, v.message) for v in info.value.violations] == [
        ("a", '"12x" is not an integer'),
        ("b", '"maybe" is not a boolean (use true/false, yes/no, 1/0 or on/off) (in `to_bool(b)`)'),
    ]


def test_keep_overlays_and_drops() -> None:
    record = {"id": 1, "internal_note": "x", "properties": {"email": "A@B.CO", "plan": "pro"}}
    m = mapper(
        {
            "keep": True,
            "drop": ["internal_note", "properties.plan"],
            "fields": {"properties.email": "lower(properties.email)"},
        }
    )
    assert m.apply(record) == {"id": 1, "properties": {"email": "a@b.co"}}
    assert record == {"id": 1, "internal_note": "x", "properties": {"email": "A@B.CO", "plan": "pro"}}


def test_parent_written_before_child_and_input_untouched() -> None:
    record = {"properties": {"email": "A@B.CO"}, "name": "Ann"}
    before = copy.deepcopy(record)
    m = mapper({"properties.firstname": "name", "properties": "properties"})
    assert m.apply(record) == {"properties": {"email": "A@B.CO", "firstname": "Ann"}}
    assert record == before


def test_flatten() -> None:
    m = mapper({"fields": {"a.b": "x", "a.c": "y", "d": "z"}, "flatten": True})
    assert m.apply({"x": 1, "y": [1], "z": None}) == {"a.b": 1, "a.c": [1], "d": None}


def test_lookup_tables() -> None:
    m = mapper(
        {
            "fields": {"country_name": "lookup('countries', upper(country), 'Unknown')"},
            "tables": {"countries": {"FR": "France", "DE": "Germany"}},
        }
    )
    assert m.apply({"country": "fr"}) == {"country_name": "France"}
    assert m.apply({"country": "xx"}) == {"country_name": "Unknown"}


def test_keep_needs_an_object() -> None:
    with pytest.raises(RecordInvalid, match="keep: true needs an object record"):
        mapper({"keep": True}).apply([1, 2])


# -- config errors -----------------------------------------------------------------------------------


def test_config_errors_are_located_as_written() -> None:
    assert errors({"a": {"expr": "x", "type": "integer"}}) == [
        (("a", "type"), "Input should be 'int', 'float', 'str' or 'bool'")
    ]
    assert errors({"fields": {"a": {"exp": "x"}}}) == [
        (("fields", "a", "exp"), "Extra inputs are not permitted")
    ]
    [(loc, msg)] = errors({"a": 5})
    assert loc == ("a",) and "for a constant write `{value: 5}`" in msg
    [(loc, msg)] = errors({"a": {"expr": "x", "value": 1}})
    assert loc == ("a",) and "exactly one of `expr`" in msg
    [(_, msg)] = errors({"a..b": "x"})
    assert "bad output path 'a..b'" in msg
    [(_, msg)] = errors({"drop": ["x"]})
    assert "`drop` only applies with `keep: true`" in msg
    [(loc, msg)] = errors({"fields": {"n": "lookup('c', x)"}, "tables": {"c": {False: "Norway"}}})
    assert loc == ("tables",) and "key False is not text; quote it in YAML" in msg


def test_check_reports_each_bad_expression_where_it_is() -> None:
    short = MapConfig.model_validate(
        {
            "a": "lowr(x)",
            "b": {"expr": "lookup('c', x)"},
            "c": {"expr": "x", "type": "int", "default": "zz"},
            "d": "x",
        }
    )
    issues = [(i.loc, i.message) for i in MapStep.check(short)]
    assert [loc for loc, _ in issues] == [("a",), ("b", "expr"), ("c", "default")]
    assert issues[0][1].startswith("unknown function 'lowr'; did you mean 'lower'?")
    assert "unknown table 'c'" in issues[1][1]
    assert issues[2][1] == 'default is not a valid int: "zz" is not an integer'
    long = MapConfig.model_validate({"fields": {"a": "lower(x"}})
    assert [i.loc for i in MapStep.check(long)] == [("fields", "a")]


def test_check_reports_an_empty_map() -> None:
    assert [i.message for i in MapStep.check(MapConfig.model_validate({}))] == [
        "map has no fields and keep is false: every record would come out empty"
    ]
    assert list(MapStep.check(MapConfig.model_validate(SEED))) == []


def test_bad_expression_fails_construction() -> None:
    from patchbay.expressions import ExprError

    with pytest.raises(ExprError, match="unknown function 'lowr'"):
        mapper({"a": "lowr(x)"})


# -- properties --------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=15,
)
_records = st.dictionaries(st.text(max_size=4), _json, max_size=5)


@settings(deadline=None)  # slow CI machines; these are about correctness
@given(record=_records)
def test_keep_without_fields_is_identity(record: dict[str, Any]) -> None:
    assert mapper({"keep": True}).apply(record) == record


@settings(deadline=None)  # slow CI machines; these are about correctness
@given(record=st.dictionaries(st.sampled_from(["a", "b", "properties"]), _json, max_size=3))
def test_map_never_modifies_its_input(record: dict[str, Any]) -> None:
    before = copy.deepcopy(record)
    m = mapper(
        {
            "keep": True,
            "drop": ["properties.secret", "a.b"],
            "fields": {"properties": "properties", "properties.email": "a", "a.b.c": "b", "b": "`1`"},
        }
    )
    with contextlib.suppress(RecordInvalid):  # refused when `properties` is not an object
        m.apply(record)
    assert record == before


def _large_map(n: int) -> dict[str, Any]:
    """n targets, children given before their parents, three levels deep, constants only (no compile)."""
    fields: dict[str, Any] = {}
    for i in range(n):
        group, sub = f"g{i % 97}", f"g{i % 97}.s{i % 7}"
        fields[f"{sub}.f{i}"] = {"value": i}
        fields.setdefault(sub, {"value": {}})
        fields.setdefault(group, {"value": {}})
    return fields


def test_a_large_map_orders_parents_first_in_linear_time() -> None:
    import time

    fields = _large_map(10_000)
    config = MapConfig.model_validate(fields)
    start = time.perf_counter()
    m = MapStep(config)
    issues = list(MapStep.check(config))
    elapsed = time.perf_counter() - start
    order = [f.target for f in m._fields]
    position = {t: i for i, t in enumerate(order)}
    assert sorted(order) == sorted(fields)
    for t in order:  # every parent comes before each of its children
        parts = t.split(".")
        assert all(position[".".join(parts[:k])] < position[t] for k in range(1, len(parts))), t
    leaves = [t for t in order if t.count(".") == 2]
    assert leaves == [t for t in fields if t.count(".") == 2]  # otherwise in the order given
    assert issues == []
    out = m.apply({})
    assert out["g5"]["s5"]["f5"] == 5 and len(out) == 97
    assert elapsed < 1.5, f"{elapsed:.2f}s"  # quadratic took minutes at this size


def test_a_child_inside_a_parent_that_is_not_an_object_is_refused() -> None:
    m = mapper({"customer.address.city": "city", "customer.id": "id", "customer": "customer"})
    record = {"id": 7, "city": "Lyon", "customer": {"name": "Ann"}}
    assert m.apply(record) == {"customer": {"name": "Ann", "address": {"city": "Lyon"}, "id": 7}}
    assert m.apply({"id": 7}) == {
        "customer": {"address": {"city": None}, "id": 7}
    }  # a null parent is filled in
    with pytest.raises(RecordInvalid) as exc:
        m.apply({"id": 7, "customer": "Ann"})
    assert [(v.path, v.message) for v in exc.value.violations] == [
        (
            "customer.address.city",
            "cannot write customer.address.city inside customer, which is text, not an object",
        ),
        ("customer.id", "cannot write customer.id inside customer, which is text, not an object"),
    ]


def test_check_reports_a_child_of_a_parent_that_can_never_be_an_object() -> None:
    config = MapConfig.model_validate(
        {
            "a": {"value": 1},
            "a.b": "x",
            "n": {"expr": "n", "type": "int"},
            "n.m": "x",
            "o": {"value": {"k": 1}},
            "o.p": "x",
            "q": "q",
            "q.r": "x",
        }
    )
    assert [(i.loc, i.message) for i in MapStep.check(config)] == [
        (
            ("a.b",),
            "a.b is written inside a, which is a constant that is not an object: the record would be"
            " refused; remove one of them or write a as an object",
        ),
        (
            ("n.m",),
            "n.m is written inside n, which is type: int: the record would be refused; remove one of"
            " them or write n as an object",
        ),
    ]
