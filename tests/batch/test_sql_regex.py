"""Pushed-down patterns: a PostgreSQL match always means a Python match (on ASCII text), and what cannot be
translated is refused."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchbay.batch.sql_regex import NotPushable, translate_regex
from tests.conftest import require_service
from tests.connectors.bulk_harness import HOST, PORT

psycopg = pytest.importorskip("psycopg")

PATTERNS = [
    r"^[A-Z]{2}$",
    r"^\d{3}-\d{4}$",
    r"^\w+@\w+\.\w{2,}$",
    r"a.c",
    r"^a.*z$",
    r"^(?:ab|cd)+$",
    r"^[^\s@]+$",
    r"\s",
    r"^[a-z0-9._%+-]+$",
    r"^x?y*z+$",
    r"[\]\-^]",
    r"^.{2,4}$",
    r"^\.\*$",
    r"end$",
]
ASCII_TEXT = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=10) | st.sampled_from(
    ["AB", "123-4567", "a@b.cd", "abc", "a\nc", "a\nz", "abab", "end\n", "end", ".*", "x yz", "-", "ab\x1c"]
)


@pytest.fixture(scope="module")
def pg() -> Any:
    require_service("PostgreSQL", HOST, PORT)
    with psycopg.connect(host=HOST, port=PORT, dbname="test", user="postgres", autocommit=True) as conn:
        yield conn


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ASCII_TEXT)
def test_a_postgres_match_is_a_python_match(pg: Any, text: str) -> None:
    for pattern in PATTERNS:
        are = translate_regex(pattern)
        (matched,) = pg.execute("SELECT %s ~ %s", (text, are)).fetchone()
        python = re.search(pattern, text) is not None
        assert not matched or python, (pattern, are, text)


def test_the_common_patterns_agree_exactly_on_plain_text(pg: Any) -> None:
    for pattern, text in [
        (r"^[A-Z]{2}$", "DE"),
        (r"^\d{3}-\d{4}$", "555-1234"),
        (r"^\w+@\w+\.\w{2,}$", "a@b.io"),
    ]:
        (matched,) = pg.execute("SELECT %s ~ %s", (text, translate_regex(pattern))).fetchone()
        assert matched


@pytest.mark.parametrize(
    "pattern", [r"(?i)abc", r"(?P<x>a)", r"(a)\1", r"\bword", r"\D", r"a++", "é", r"[[:alpha:]]", r"a{,3}"]
)
def test_what_cannot_be_translated_is_refused(pattern: str) -> None:
    with pytest.raises(NotPushable):
        translate_regex(pattern)
