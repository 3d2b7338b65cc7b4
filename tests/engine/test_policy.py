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


# ---------------------------------------------------------------- one vocabulary for sources
def test_a_source_error_is_read_in_the_deliveries_classes():
    from patchbay.engine.policy import outcome_of
    from patchbay.errors import (
        AuthError,
        ConfigError,
        SecretMissing,
        StoreUnavailable,
        TerminalError,
        TransientError,
    )
    from patchbay.security.ssrf import BlockedAddress

    busy = outcome_of(TransientError("polling x: HTTP 429", retry_after_s=7.0), "poll")
    assert (busy.cls, busy.retry_after_s, busy.error) == (
        OutcomeClass.TRANSIENT,
        7.0,
        "poll: polling x: HTTP 429",
    )
    assert outcome_of(AuthError("polling x: HTTP 401")).cls is OutcomeClass.AUTH
    assert outcome_of(SecretMissing("crm_token")).cls is OutcomeClass.AUTH
    assert outcome_of(TerminalError("polling x: no such table")).cls is OutcomeClass.TERMINAL
    assert outcome_of(ConfigError("bad query")).cls is OutcomeClass.TERMINAL
    assert outcome_of(BlockedAddress("10.0.0.1", "x", "private")).cls is OutcomeClass.TERMINAL
    # Unexpected: probably transient, and the error is kept.
    full = outcome_of(StoreUnavailable("recording: the disk is full"))
    assert (full.cls, full.error) == (OutcomeClass.TRANSIENT, "recording: the disk is full")
    odd = outcome_of(KeyError("items"))
    assert odd.cls is OutcomeClass.TRANSIENT and odd.error == "unexpected KeyError: 'items'"


def test_a_failing_source_backs_off_with_jitter_and_auth_or_terminal_wait():
    from patchbay.engine.policy import SOURCE_BACKOFF_MAX_S, decide_source

    rng = random.Random(1)
    transient = Outcome(OutcomeClass.TRANSIENT, error="HTTP 503")
    delays = [decide_source(transient, n, rng).retry_in for n in range(1, 12)]
    assert all(d is not None for d in delays)
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4 and 3.2 <= delays[2] <= 4.8
    assert max(d for d in delays if d is not None) <= SOURCE_BACKOFF_MAX_S * 1.2
    assert decide_source(transient, 1, rng).state == "failing"
    hinted = decide_source(Outcome(OutcomeClass.TRANSIENT, retry_after_s=30.0), 1, rng)
    assert hinted.retry_in == 30.0
    paused = decide_source(Outcome(OutcomeClass.AUTH, status_code=401), 1, rng)
    assert (paused.state, paused.retry_in, paused.reason) == ("paused", None, "HTTP 401")
    assert decide_source(Outcome(OutcomeClass.TERMINAL, error="gone"), 1, rng).state == "stopped"
