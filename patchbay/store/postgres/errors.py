"""How the PostgreSQL store reads the server's errors: which ones a second try settles, and a reason to show."""

from __future__ import annotations

import re

from psycopg import errors as pg_errors

# A concurrent writer won (the same dedupe key), or the server chose this transaction to fail: try again.
RETRY = (pg_errors.UniqueViolation, pg_errors.SerializationFailure, pg_errors.DeadlockDetected)


def reason(exc: BaseException) -> str:
    """The first line of the server's or the driver's message, without a password."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"password=\S+", "password=***", text)
