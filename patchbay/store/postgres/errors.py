"""How the PostgreSQL store reads the server's errors: which ones a second try settles, and a reason to show."""

from __future__ import annotations

import re

from psycopg import OperationalError
from psycopg import errors as pg_errors

# A concurrent writer won (the same dedupe key), or the server chose this transaction to fail: try again.
RETRY = (pg_errors.UniqueViolation, pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
# The connection is gone: the server cannot be reached, or it ended a transaction this process left idle too
# long (a stopped process, store.py IDLE_IN_TRANSACTION_S). Nothing of the transaction was committed.
GONE = (OperationalError, pg_errors.IdleInTransactionSessionTimeout)


def reason(exc: BaseException) -> str:
    """The first line of the server's or the driver's message, without a password."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"password=\S+", "password=***", text)
