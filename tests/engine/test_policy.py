"""The delivery policy as a pure function: classes, the retry schedule, Retry-After bounds."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Outcome, OutcomeClass
from patchbay.connectors.http_client import classify_response, parse_retry_after
from patchbay.engine.policy import decide, retry_delay

RNG = random.Random(7)


def test_default_schedule_spans_more_than_a_day():
    p = DeliveryPolicy()
    assert sum(p.retry.schedule) >= 24 * 3600
    assert p.retry.schedule[:2] == [5.0, 300.0]


@given(st.integers(min_value=0, max_value=6), st.floats(min_value=0, max_value=1))
def test_jitter_stays_within_bounds(n, jitter):
    p = DeliveryPolicy.model_validate({"retry": {"jitter": jitter}})
    base = p.retry.schedule[n]
    d = retry_delay(p, n, None, RNG)
    assert d is not None and base * (1 - jitter) - 1e-9 <= d <= base * (1 + jitter) + 1e-9


def test_retry_after_is_honoured_and_bounded():
    p = DeliveryPolicy.model_validate({"retry": {"max_retry_after": "10m"}})
    assert retry_delay(p, 0, 1.0, RNG) == 1.0
    assert retry_delay(p, 0, 86400.0, RNG) == 600.0


def test_schedule_spent_means_dead():
    p = DeliveryPolicy.model_validate({"retry": {"schedule": ["1s"]}})
    d = decide(Outcome(OutcomeClass.TRANSIENT, 503), 1, p, 0.0, RNG)
    assert d.status == "dead" and "gave up after 2 attempts" in d.reason


def test_classes():
    p = DeliveryPolicy()
    assert decide(Outcome(OutcomeClass.SUCCESS, 201), 0, p, 0, RNG).status == "delivered"
    auth = decide(Outcome(OutcomeClass.AUTH, 401), 0, p, 100.0, RNG)
    assert (auth.status, auth.destination_state, auth.next_at, auth.consumed_retry) == (
        "pending",
        "paused",
        100.0,
        False,
    )
    gone = decide(Outcome(OutcomeClass.GONE, 410), 0, p, 0, RNG)
    assert (gone.status, gone.destination_state) == ("dead", "disabled")


def test_response_classification():
    def cls(code: int, headers=None) -> OutcomeClass:
        return classify_response(code, headers or {}, b"", 1.0).cls

    assert [cls(c) for c in (200, 201, 204)] == [OutcomeClass.SUCCESS] * 3
    assert [cls(c) for c in (408, 425, 429, 500, 502, 503, 504)] == [OutcomeClass.TRANSIENT] * 7
    assert [cls(c) for c in (400, 404, 409, 413, 422)] == [OutcomeClass.TERMINAL] * 5
    assert [cls(c) for c in (401, 403)] == [OutcomeClass.AUTH] * 2
    assert cls(410) is OutcomeClass.GONE
    assert cls(302, {"Location": "x"}) is OutcomeClass.TERMINAL


def test_retry_after_forms():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 60) == 60.0
    assert parse_retry_after("soon") is None
