"""How long a 429 says to wait: Retry-After (seconds, decimals, an HTTP date) or a vendor's reset header."""

from __future__ import annotations

import pytest

from patchbay.connectors.base import OutcomeClass
from patchbay.connectors.http_client import classify_response, parse_retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "unit", "wait"),
    [
        ("120", "seconds", 120.0),
        ("2.0", "seconds", 2.0),  # Shopify
        ("0.5", "seconds", 0.5),
        ("Tue, 14 Nov 2023 22:14:20 GMT", "seconds", 60.0),
        (str(int(NOW) + 8), "unix_time", 8.0),  # Intercom's X-RateLimit-Reset
        (str(int(NOW) - 30), "unix_time", 0.0),  # already reset: no wait
        ("-5", "seconds", None),
        ("nan", "seconds", None),
        ("inf", "seconds", None),
        ("soon", "seconds", None),
        ("", "seconds", None),
    ],
)
def test_parse_retry_after(value: str, unit: str, wait: float | None) -> None:
    assert parse_retry_after(value, now=NOW, unit=unit) == wait


def test_the_vendor_header_is_read_only_when_named() -> None:
    headers = {"Retry-After": "3", "x-sib-ratelimit-reset": "7"}
    assert classify_response(429, headers, b"", 1.0).retry_after_s == 3.0
    brevo = classify_response(429, headers, b"", 1.0, retry_after=("x-sib-ratelimit-reset", "seconds"))
    assert brevo.cls is OutcomeClass.TRANSIENT and brevo.retry_after_s == 7.0
