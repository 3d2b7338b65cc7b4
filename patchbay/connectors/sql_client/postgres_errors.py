"""PostgreSQL (psycopg) errors by SQLSTATE, or by libpq's message when there is none."""

from __future__ import annotations

from patchbay.connectors.base import OutcomeClass

DRIVERS = ("psycopg",)

_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")  # connection, rollback, resources, operator, system
_PG_TRANSIENT = {"55P03", "55006", "25006", "HV000"}  # lock not available, in use, read-only (failover)
_PG_AUTH_CLASSES = ("28",)  # invalid authorization
_PG_AUTH = {"42501", "3D000"}  # insufficient privilege, database does not exist
_PG_CONNECT_AUTH = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    'role "',
    "permission denied",
    "does not exist",
    "does not support ssl",
    "certificate",
    "sslmode value",
)


def classify(exc: BaseException) -> tuple[OutcomeClass, str]:
    code = getattr(exc, "sqlstate", None)
    if code:
        if code in _PG_TRANSIENT or code[:2] in _PG_TRANSIENT_CLASSES:
            return OutcomeClass.TRANSIENT, code
        if code in _PG_AUTH or code[:2] in _PG_AUTH_CLASSES:
            return OutcomeClass.AUTH, code
        return OutcomeClass.TERMINAL, code
    name = type(exc).__name__
    if name in ("OperationalError", "InterfaceError"):
        # No SQLSTATE: the connection failed or broke. libpq only gives us its message.
        msg = str(exc).lower()
        if "fatal:" in msg and any(s in msg for s in _PG_CONNECT_AUTH) and "too many" not in msg:
            return OutcomeClass.AUTH, ""
        if any(s in msg for s in ("does not support ssl", "certificate verify failed", "root certificate")):
            return OutcomeClass.AUTH, ""
        return OutcomeClass.TRANSIENT, ""
    # ProgrammingError, DataError... raised by the client itself: a retry won't help.
    return OutcomeClass.TERMINAL, ""


def message(exc: BaseException) -> tuple[str, str] | None:
    """The primary message without the LINE/caret lines, with DETAIL (e.g. which key already exists)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return None
    detail = getattr(diag, "message_detail", None)
    return primary + (f" ({detail.rstrip('.')})" if detail else ""), str(exc) or type(exc).__name__
