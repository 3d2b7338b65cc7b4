"""Token buckets per source system: the arithmetic, on a fake clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from patchbay.config.models import InboundAuth
from patchbay.security.ratelimit import InboundLimits, TokenBucket, limits_for, rate_limited


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def auth(**limits) -> InboundAuth:
    return InboundAuth(scheme="none", public=True, **limits)


def test_bucket_allows_a_burst_then_refills_at_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [None, None, None]
    assert bucket.take() == pytest.approx(0.5)
    clock.t += 0.25
    assert bucket.take() == pytest.approx(0.25)  # half a token saved up; the refused try took nothing
    clock.t += 0.25
    assert bucket.take() is None
    clock.t += 100  # never more than the capacity saved up
    assert [bucket.take() for _ in range(4)][-1] is not None


def test_limits_are_per_system_and_off_by_default():
    clock = Clock()
    limits = InboundLimits(clock)
    shop, crm = auth(rate_per_s=1, burst=1), auth()
    assert limits.check("shop", shop) is None
    assert limits.check("shop", shop) == pytest.approx(1.0)
    assert limits.check("other", auth(rate_per_s=1, burst=1)) is None  # its own bucket
    assert all(limits.check("crm", crm) is None for _ in range(1000))


def test_burst_defaults_to_one_second_of_rate():
    limits = InboundLimits(Clock())
    a = auth(rate_per_s=5)
    assert [limits.check("s", a) for _ in range(6)][:5] == [None] * 5
    assert limits.check("s", a) is not None


def test_reloaded_settings_get_a_new_bucket():
    limits = InboundLimits(Clock())
    assert limits.check("s", auth(rate_per_s=1, burst=1)) is None
    assert limits.check("s", auth(rate_per_s=1, burst=1)) is None  # a new InboundAuth object: new bucket


class Owner:
    pass


def test_limits_are_shared_per_owner():
    a, b = Owner(), Owner()
    assert limits_for(a) is limits_for(a)
    assert limits_for(a) is not limits_for(b)


def test_the_429():
    exc = rate_limited("shop", auth(rate_per_s=0.5), 1.2)
    assert (exc.status, exc.code, exc.headers) == (429, "rate_limited", {"Retry-After": "2"})
    assert str(exc) == "more than 0.5 requests/s from system shop; nothing was stored, retry in 2s"
    assert rate_limited("shop", auth(rate_per_s=50), 0.01).headers == {"Retry-After": "1"}


def test_settings_are_validated():
    with pytest.raises(ValidationError, match="`burst` needs `rate_per_s`"):
        auth(burst=5)
    with pytest.raises(ValidationError, match="greater than 0"):
        auth(rate_per_s=0)


async def test_the_one_bucket_also_paces_deliveries(monkeypatch):
    """Deliveries' rate_limit_per_s waits on the same TokenBucket the inbound limits use."""
    import asyncio

    from patchbay.engine import delivery

    assert not hasattr(delivery, "TokenBucket") or delivery.TokenBucket is TokenBucket
    clock = Clock()
    bucket = TokenBucket(rate=4.0, capacity=1.0, clock=clock)
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:  # the fake clock moves by what the bucket asks to wait
        clock.t += seconds
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    await asyncio.gather(*(bucket.wait() for _ in range(3)))
    assert clock.t == pytest.approx(1000.5)  # one at once, then one every 250 ms
