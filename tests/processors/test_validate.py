"""validate: every rule, every violation reported at once, config errors with their location."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from patchbay.errors import RecordInvalid
from patchbay.processors.validate import ValidateConfig, ValidateStep
from patchbay.registry import STEPS

LEAD_RULES = {
    "properties.email": {"required": True, "format": "email"},
    "amount": {"type": "number", "minimum": 0},
    "properties.lead_source": {"one_of": ["ads", "organic", "referral"]},
}


def validator(rules: dict[str, Any]) -> ValidateStep:
    return ValidateStep(ValidateConfig.model_validate(rules))


def violations(rules: dict[str, Any], record: Any) -> list[str]:
    with pytest.raises(RecordInvalid) as info:
        validator(rules).apply(record)
    assert info.value.step == "validate"
    return [str(v) for v in info.value.violations]


def test_registered() -> None:
    assert STEPS["validate"].cls is ValidateStep


def test_valid_record_is_returned_unchanged() -> None:
    record = {"properties": {"email": "ann@example.com", "lead_source": "ads"}, "amount": 12.5}
    assert validator(LEAD_RULES).apply(record) is record


def test_every_violation_is_reported() -> None:
    record = {"properties": {"email": "not-an-email", "lead_source": "tv"}, "amount": "12x"}
    assert violations(LEAD_RULES, record) == [
        'properties.email: "not-an-email" is not a valid email address',
        'amount: expected number, got string "12x"',
        'properties.lead_source: "tv" is not one of ads, organic, referral',
    ]


def test_missing_and_null() -> None:
    rules = {
        "a": {"required": True},
        "b": {"required": True},
        "c": {"type": "string"},
        "d": {"not_empty": True},
    }
    assert violations(rules, {"b": None, "c": None}) == [
        "a: required but missing",
        "b: required but null",
        "d: required but missing",
    ]


@pytest.mark.parametrize(
    ("rule", "good", "bad", "message"),
    [
        ({"type": "string"}, "x", 1, "expected string, got number 1"),
        ({"type": "integer"}, 3.0, 3.5, "expected integer, got number 3.5"),
        ({"type": "integer"}, 3, True, "expected integer, got boolean true"),
        ({"type": "number"}, 0, "0", 'expected number, got string "0"'),
        ({"type": "boolean"}, False, 0, "expected boolean, got number 0"),
        ({"type": "object"}, {}, [], "expected object, got array"),
        ({"type": "array"}, [], {}, "expected array, got object"),
        ({"format": "email"}, "a.b+c@mail.example.org", "a@b", '"a@b" is not a valid email address'),
        ({"format": "email"}, "x@y.io", "a b@c.io", "is not a valid email address"),
        ({"format": "url"}, "https://x.io/a?b=1", "javascript:alert(1)", "is not a valid http(s) URL"),
        ({"format": "date"}, "2024-02-29", "2023-02-29", '"2023-02-29" is not a valid date (YYYY-MM-DD)'),
        ({"format": "datetime"}, "2024-01-31T09:30:00Z", "2024-01-31", "is not a valid date-time"),
        ({"format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123", '"123" is not a valid UUID'),
        ({"format": "phone"}, "+33 (0)1 23-45-67-89", "call me", "is not a valid phone number"),
        ({"format": "email"}, "a@b.co", 5, "expected string, got number 5"),
        ({"pattern": "^[A-Z]{2}$"}, "FR", "fra", '"fra" does not match the pattern ^[A-Z]{2}$'),
        ({"min_length": 2}, "ab", "a", '"a" is shorter than 2 characters'),
        ({"max_length": 2}, ["a"], ["a", "b", "c"], "array of 3 is longer than 2 items"),
        ({"min_length": 1}, "a", 5, "expected string or array, got number 5"),
        ({"minimum": 0}, 0, -1, "-1 is less than the minimum 0"),
        ({"maximum": 10.5}, 10.5, 11, "11 is more than the maximum 10.5"),
        ({"maximum": 1}, 1, "1", 'expected number, got string "1"'),
        ({"one_of": [1, 2]}, 1.0, True, "true is not one of 1, 2"),
        ({"not_empty": True}, " x ", "  ", "must not be empty"),
        ({"not_empty": True}, [0], [], "must not be empty"),
    ],
)
def test_rules(rule: dict[str, Any], good: Any, bad: Any, message: str) -> None:
    assert validator({"f": rule}).apply({"f": good}) == {"f": good}
    [got] = violations({"f": rule}, {"f": bad})
    assert message in got


def test_long_values_are_shortened_in_messages() -> None:
    [got] = violations({"f": {"format": "email"}}, {"f": "x" * 500})
    assert len(got) < 100 and "…" in got


def test_list_index_paths() -> None:
    assert violations({"items.0.sku": {"required": True}}, {"items": [{}]}) == [
        "items.0.sku: required but missing"
    ]


# -- config ------------------------------------------------------------------------------------------


def errors(config: Any) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as info:
        ValidateConfig.model_validate(config)
    return [(e["loc"], e["msg"]) for e in info.value.errors()]


def test_bad_regex_is_a_config_error_with_its_location() -> None:
    [(loc, msg)] = errors({"properties.code": {"pattern": "(["}})
    assert loc == ("properties.code", "pattern")
    assert "bad regular expression '(['" in msg


def test_config_errors() -> None:
    assert errors({"a": {"typo": 1}}) == [(("a", "typo"), "Extra inputs are not permitted")]
    assert errors({"a": {"format": "mail"}})[0][0] == ("a", "format")
    assert errors({"a": {"min_length": -1}})[0][0] == ("a", "min_length")
    assert "bad field path" in errors({"a..b": {}})[0][1]


def test_check_reports_rules_nothing_can_pass() -> None:
    config = ValidateConfig.model_validate(
        {
            "a": {"type": "integer", "format": "email", "one_of": ["x"]},
            "b": {"minimum": 5, "maximum": 1},
            "c": {"one_of": []},
        }
    )
    assert [(i.loc, i.message) for i in ValidateStep.check(config)] == [
        (("a", "format"), "format applies to text but type is integer"),
        (("a", "one_of"), "none of the accepted values is of type integer"),
        (("b", "minimum"), "minimum is greater than maximum"),
        (("c", "one_of"), "one_of is empty: no value can pass"),
    ]
    assert list(ValidateStep.check(ValidateConfig.model_validate(LEAD_RULES))) == []
    assert [i.message for i in ValidateStep.check(ValidateConfig.model_validate({}))] == [
        "validate has no rules: list field paths with their rules"
    ]


# -- properties --------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "0", "x"]), inner, max_size=4)
    ),
    max_leaves=20,
)

EVERY_RULE = {
    "a": {"required": True, "type": "string", "format": "email", "pattern": "^a", "min_length": 3},
    "a.b": {"not_empty": True, "max_length": 2, "minimum": 0, "maximum": 9, "one_of": [1, "x", None, True]},
    "b.0": {"format": "url"},
    "x": {"format": "datetime"},
    "0.x": {"format": "phone"},
    "b": {"format": "date"},
    "x.a": {"type": "integer", "format": "uuid", "minimum": 1},
}


@settings(deadline=None)  # slow CI machines; these are about correctness
@given(record=_json)
def test_validate_only_ever_raises_record_invalid(record: Any) -> None:
    step = validator(EVERY_RULE)
    try:
        assert step.apply(record) is record
    except RecordInvalid as exc:
        assert exc.violations and all(v.path in EVERY_RULE and v.message for v in exc.violations)
