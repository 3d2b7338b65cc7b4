"""The expression language: Patchbay functions, compile-time errors, templates, constant detection."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import jmespath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchbay.errors import ConfigError, RecordInvalid
from patchbay.expressions import (
    FUNCTION_NAMES,
    DataError,
    ExprError,
    Functions,
    compile_expr,
    is_constant_false,
    render_template,
)


def ev(text: str, data: Any = None, **tables: dict[str, Any]) -> Any:
    return compile_expr(text, tables=tables or None).search(data)


# -- functions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "want"),
    [
        ({"email": "  Ann@Example.COM "}, "ann@example.com"),
        ({"customer_email": "Bob@X.io"}, "bob@x.io"),
        ({"properties": {"email": " C@D.org"}}, "c@d.org"),
        ({"email": "", "customer_email": "E@F.com"}, "e@f.com"),
        ({}, None),
    ],
)
def test_seed_email_mapping(data: dict[str, Any], want: str | None) -> None:
    assert ev("lower(trim(email || customer_email || properties.email))", data) == want


@pytest.mark.parametrize(
    ("text", "data", "want"),
    [
        ("upper(s)", {"s": "abc"}, "ABC"),
        ("lower(n)", {"n": 12}, "12"),
        ("trim(s)", {}, None),
        ("split(s, ',')", {"s": "a,b,,c"}, ["a", "b", "", "c"]),
        ("split(s, ',')", {"s": ""}, []),
        ("split(s, '')", {"s": "ab"}, ["a", "b"]),
        ("concat(a, ' ', b)", {"a": "x", "b": "y"}, "x y"),
        ("concat('order-', id, missing)", {"id": 7}, "order-7"),
        ("concat(a, b)", {}, None),
        ("replace(s, '-', '')", {"s": "a-b-c"}, "abc"),
        ("coalesce(a, b, 'website')", {"a": "", "b": None}, "website"),
        ("coalesce(a, 'website')", {"a": "ads"}, "ads"),
        ("default(a, 'x')", {"a": ""}, ""),
        ("default(a, 'x')", {}, "x"),
        ("to_int(a)", {"a": " 42 "}, 42),
        ("to_int(a)", {"a": "42.0"}, 42),
        ("to_int(a)", {"a": 3.0}, 3),
        ("to_float(a)", {"a": "1.5"}, 1.5),
        ("to_bool(a)", {"a": "Yes"}, True),
        ("to_bool(a)", {"a": "off"}, False),
        ("to_bool(a)", {"a": 1}, True),
        ("to_bool(a)", {"a": ""}, None),
        ("parse_date(d)", {"d": "2024-01-05T10:00:00+02:00"}, "2024-01-05T08:00:00Z"),
        ("parse_date(d)", {"d": "2024-01-05"}, "2024-01-05"),
        ("parse_date(d)", {"d": "2024-01-05T10:00:00"}, "2024-01-05T10:00:00"),
        ("parse_date(d)", {"d": "Fri, 05 Jan 2024 10:00:00 GMT"}, "2024-01-05T10:00:00Z"),
        ("parse_date(d)", {"d": 0}, "1970-01-01T00:00:00Z"),
        ("parse_date(d, '%d/%m/%Y')", {"d": "05/01/2024"}, "2024-01-05"),
        ("parse_date(d, '%d/%m/%Y %H:%M')", {"d": "05/01/2024 09:30"}, "2024-01-05T09:30:00"),
        ("parse_date(d)", {}, None),
        ("format_date(d, '%d.%m.%Y')", {"d": "2024-01-05T10:00:00Z"}, "05.01.2024"),
        ("lookup('countries', c)", {"c": "FR"}, "France"),
        ("lookup('countries', c, 'Unknown')", {"c": "XX"}, "Unknown"),
        ("lookup('countries', c)", {"c": "XX"}, None),
        ('lookup(`{"1": "one"}`, n)', {"n": 1}, "one"),
        ("regex_replace(p, '[^0-9+]', '')", {"p": "+33 (1) 23-45"}, "+3312345"),
        ("regex_replace(s, '(\\w+)@(\\w+)', '\\2')", {"s": "ann@corp"}, "corp"),
        ("substring(s, `1`, `3`)", {"s": "abcdef"}, "bcd"),
        ("substring(s, `-2`)", {"s": "abcdef"}, "ef"),
        ("substring(s, `10`)", {"s": "abc"}, ""),
        ("email_domain(e)", {"e": "Ann@Example.COM"}, "example.com"),
        ("email_domain(e)", {"e": "nope"}, None),
        ("hash_sha256(s)", {"s": "abc"}, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        # JMESPath built-ins still work alongside ours.
        ("join(', ', tags)", {"tags": ["a", "b"]}, "a, b"),
        ("length(tags)", {"tags": ["a", "b"]}, 2),
        ("map(&trim(@), split(t, ','))", {"t": "a, b"}, ["a", "b"]),
        ("not_null(a, b)", {"b": 1}, 1),
        ("contains(['FR', 'DE'], c)", {"c": "DE"}, True),
    ],
)
def test_functions(text: str, data: Any, want: Any) -> None:
    assert ev(text, data, countries={"FR": "France"}) == want


def test_now_is_iso_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", ev("now()"))


@pytest.mark.parametrize(
    ("text", "data", "message"),
    [
        ("to_int(a)", {"a": "abc"}, '"abc" is not an integer (in `to_int(a)`)'),
        ("to_int(a)", {"a": 1.5}, "1.5 is not a whole number"),
        ("to_float(a)", {"a": "x"}, '"x" is not a number'),
        ("to_bool(a)", {"a": "maybe"}, '"maybe" is not a boolean'),
        ("parse_date(d)", {"d": "yesterday"}, '"yesterday" is not a date'),
        ("parse_date(d, '%Y')", {"d": "x"}, "does not match the date format"),
        ("lower(a)", {"a": {"x": 1}}, "lower() expected string or number or null, got object"),
        ("length(a)", {"a": 5}, "length() expected string or array or object, got number 5"),
        ("concat(a)", {"a": [1]}, "concat() takes text, numbers and booleans, got array"),
        ("lookup(t, 'k')", {"t": "nope"}, 'no table named "nope"'),
        ("substring(s, `1.5`)", {"s": "abc"}, "start must be a whole number"),
    ],
)
def test_bad_data_is_record_invalid(text: str, data: Any, message: str) -> None:
    with pytest.raises(RecordInvalid) as info:
        ev(text, data)
    assert message in str(info.value)
    assert info.value.violations[0].path == ""


# -- compile errors ----------------------------------------------------------------------------------


def test_unknown_function_suggests_the_closest() -> None:
    with pytest.raises(ExprError) as info:
        compile_expr("trim(lowr(email))")
    assert str(info.value).startswith("unknown function 'lowr'; did you mean 'lower'? (functions: abs, ")
    assert info.value.position == 5
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("lower(email", "incomplete expression", 11),
        ("a.", "incomplete expression", 2),
        ("a b", "unexpected 'b' at column 2", 2),
        ("a $ b", "Unknown token $ at column 2", 2),
        ("  ", "empty expression", 0),
        ("coalesce(a, `website`)", "`website` between backticks must be JSON; for text write 'website'", 12),
        ("substring(a)", "substring() takes 2 to 3 argument(s), got 1", 0),
        ("upper(a, b)", "upper() takes 1 argument(s), got 2", 0),
        ("concat()", "concat() takes at least 1 argument(s), got 0", 0),
        ("x || lookup('countrys', c)", "unknown table 'countrys'; did you mean 'countries'?", 5),
        ("regex_replace(a, '(', '')", "regex_replace(): bad pattern '('", 0),
    ],
)
def test_compile_errors(text: str, message: str, position: int) -> None:
    with pytest.raises(ExprError) as info:
        compile_expr(text, tables={"countries": {}})
    assert message in str(info.value)
    assert info.value.position == position


def test_lookup_without_tables_says_where_to_add_them() -> None:
    with pytest.raises(ExprError, match="no tables are defined; add them under `tables:`"):
        compile_expr("lookup('countries', c)")


def test_every_documented_function_exists() -> None:
    ours = {"lower", "upper", "trim", "split", "concat", "replace", "coalesce", "default", "to_int"}
    ours |= {"to_float", "to_bool", "parse_date", "format_date", "now", "lookup", "regex_replace"}
    ours |= {"substring", "email_domain", "hash_sha256", "join", "length", "contains", "to_string"}
    assert ours <= set(FUNCTION_NAMES)


# -- constant detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("`false`", True),
        ("`null`", True),
        ("''", True),
        ("`[]`", True),
        ("!`true`", True),
        ("`1` == `2`", True),
        ("status == 'paid' && `false`", True),
        ("`false` || `null`", True),
        ("status == 'paid'", False),
        ("`true`", False),
        ("`0`", False),  # 0 is true in JMESPath
        ("a || `false`", False),
        ("status == 'paid' || `true`", False),
        ("length(@) == `-1`", False),  # depends on data as far as we can tell
    ],
)
def test_is_constant_false(text: str, want: bool) -> None:
    assert is_constant_false(compile_expr(text)) is want
    assert is_constant_false(text) is want


# -- templates ---------------------------------------------------------------------------------------


def test_template_renders_placeholders() -> None:
    t = render_template("https://crm/contacts/{{ properties.email }}?n={{n}}&x={{ missing }}")
    assert t.render({"properties": {"email": "a b@c.io"}, "n": 3}) == "https://crm/contacts/a b@c.io?n=3&x="
    assert [e.text for e in t.expressions] == ["properties.email", "n", "missing"]


def test_template_quote_escapes_each_value() -> None:
    t = render_template("/contacts/{{ email }}/")
    assert t.render({"email": "a/b c"}, quote=lambda s: quote(s, safe="")) == "/contacts/a%2Fb%20c/"


def test_template_renders_json_types() -> None:
    t = render_template("{{ b }} {{ o }} {{ f }}")
    assert t.render({"b": True, "o": {"k": [1]}, "f": 1.5}) == 'true {"k":[1]} 1.5'


def test_template_braces_inside_expression() -> None:
    t = render_template("x={{ {a: {b: c}} }}.")
    assert t.render({"c": 1}) == 'x={"a":{"b":1}}.'


def test_template_without_placeholders_is_static() -> None:
    t = render_template("plain text {not a placeholder}")
    assert t.is_static and t.expressions == []
    assert t.render(None) == "plain text {not a placeholder}"


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("hi {{ lowr(name) }}", "unknown function 'lowr'; did you mean 'lower'?", 6),
        ("hi {{ name. }}", "invalid expression `name.`: incomplete expression", 11),
        ("hi {{ name", "unclosed placeholder at column 3", 3),
        ("hi {{ }}", "empty placeholder at column 3", 3),
    ],
)
def test_template_errors_point_into_the_template(text: str, message: str, position: int) -> None:
    with pytest.raises(ExprError) as info:
        render_template(text)
    assert message in str(info.value)
    assert info.value.position == position


def test_template_bad_data_is_record_invalid() -> None:
    with pytest.raises(RecordInvalid, match="is not an integer"):
        render_template("n={{ to_int(n) }}").render({"n": "x"})


# -- the compiled fast path agrees with jmespath -----------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "a", "b", "0"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3)
    ),
    max_leaves=12,
)

_EXPRESSIONS = [
    "a",
    "a.b.c",
    "a || b",
    "a && b",
    "!a",
    "!a.b",
    'a.b || `"x"`',
    "@",
    "a | b",
    "a[0]",
    "a[*].b",
    "a == b",
    "length(a || `[]`)",
    "not_null(a, b, c)",
    "type(a)",
    "to_string(a.b)",
    "keys(a || `{}`)",
]


@settings(deadline=None)  # slow CI machines; these are about correctness
@given(
    data=st.dictionaries(st.sampled_from(["a", "b", "c"]), _json, max_size=3),
    text=st.sampled_from(_EXPRESSIONS),
)
def test_compiled_matches_jmespath(data: dict[str, Any], text: str) -> None:
    options = jmespath.Options(custom_functions=Functions())
    try:
        want = jmespath.search(text, data, options=options)
    except (jmespath.exceptions.JMESPathTypeError, DataError):
        with pytest.raises(RecordInvalid):
            compile_expr(text).search(data)
        return
    assert compile_expr(text).search(data) == want
