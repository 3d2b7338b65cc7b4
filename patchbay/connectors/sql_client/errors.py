"""What a database error means: one Outcome for every dialect, each dialect read by its own module.

Each `<dialect>_errors.py` has DRIVERS (the top-level modules whose exceptions are the database's
answer), classify(exc) -> (OutcomeClass, code) and message(exc) -> (line, full text) or None.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Literal

from patchbay.connectors.base import Outcome, OutcomeClass, excerpt
from patchbay.connectors.sql_client import mysql_errors, postgres_errors, sqlite_errors
from patchbay.connectors.sql_client.names import Dialect
from patchbay.errors import (
    AuthError,
    PatchbayError,
    SecretMissing,
    TerminalError,
    TransientError,
)
from patchbay.security.ssrf import blocked_cause


class DbRefused(Exception):
    """Raised by a connector itself (e.g. TLS required but not offered); carries its class."""

    def __init__(self, message: str, cls: OutcomeClass = OutcomeClass.AUTH) -> None:
        self.cls = cls
        super().__init__(message)


_NETWORK = (OSError, EOFError, ConnectionError, TimeoutError)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _message(exc: BaseException, dialect: Dialect) -> tuple[str, str]:
    """The database's message: one line for the error, the full text for the excerpt."""
    full = str(exc) or type(exc).__name__
    return _DIALECTS[dialect].message(exc) or (full, full)


_DIALECTS: dict[str, ModuleType] = {
    "postgres": postgres_errors,
    "mysql": mysql_errors,
    "sqlite": sqlite_errors,
}


def classify_db(
    exc: BaseException,
    dialect: Dialect,
    *,
    action: str = "",
    latency_ms: float = 0.0,
    redact: Callable[[str], str] = lambda s: s,
    role: Literal["destination", "source"] = "destination",
    system: str | None = None,
) -> Outcome:
    """What a database error means for the delivery.

    TRANSIENT: connection refused or lost, server shutting down, deadlock, serialization failure, lock
    timeout, too many connections: retried. TERMINAL: constraint violations, unknown column or table,
    bad values, syntax: dead-lettered with the database's message; also a host the address guard
    refuses (the same on every try). AUTH: credentials, permissions or a missing database: retries
    won't help and it is not the record's fault, so the destination pauses.
    """
    blocked = blocked_cause(exc)
    if blocked is not None:
        why = blocked.explain(system)
        return Outcome(
            OutcomeClass.TERMINAL, None, latency_ms, error=redact(f"{action}: {why}" if action else why)
        )
    module = type(exc).__module__.split(".")[0]
    if isinstance(exc, DbRefused):
        cls, code = exc.cls, ""
    elif isinstance(exc, SecretMissing):  # the password is gone from the vault: not the record's fault
        cls, code = OutcomeClass.AUTH, ""
    elif module in _DIALECTS[dialect].DRIVERS:
        cls, code = _DIALECTS[dialect].classify(exc)
    elif isinstance(exc, _NETWORK):
        cls, code = OutcomeClass.TRANSIENT, ""
    else:  # not the database's answer (a driver or connector bug): retry rather than lose the event
        cls, code = OutcomeClass.TRANSIENT, ""
    line, full = (redact(t) for t in _message(exc, dialect))
    if module not in _DIALECTS[dialect].DRIVERS and not isinstance(exc, DbRefused | SecretMissing):
        line = f"{type(exc).__name__}: {line}" if line != type(exc).__name__ else line
    label = f"[{code}] " if code else ""
    error = f"{action}: {label}{_one_line(line)}" if action else f"{label}{_one_line(line)}"
    if cls is OutcomeClass.AUTH and role == "destination":
        error += "; destination paused until `patchbay resume`"
    return Outcome(cls, None, latency_ms, excerpt(full), error=error)


def source_error(
    exc: BaseException, dialect: Dialect, action: str, redact: Callable[[str], str], system: str | None = None
) -> PatchbayError:
    """A database error raised from poll: TransientError, AuthError or TerminalError."""
    outcome = classify_db(exc, dialect, action=action, redact=redact, role="source", system=system)
    if outcome.cls is OutcomeClass.TRANSIENT:
        return TransientError(outcome.error)
    if outcome.cls is OutcomeClass.AUTH:
        return AuthError(outcome.error)
    return TerminalError(outcome.error)
