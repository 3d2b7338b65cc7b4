"""SQLite errors by extended result code name, or by message on old Pythons."""

from __future__ import annotations

from patchbay.connectors.base import OutcomeClass

DRIVERS = ("sqlite3",)

_SQLITE_TRANSIENT = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_PROTOCOL",
    "SQLITE_NOMEM",
    "SQLITE_INTERRUPT",
)
_SQLITE_AUTH = ("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_CORRUPT", "SQLITE_NOTADB")


def classify(exc: BaseException) -> tuple[OutcomeClass, str]:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if not name:
        msg = str(exc).lower()
        if "locked" in msg or "unable to open" in msg or "disk i/o" in msg:
            return OutcomeClass.TRANSIENT, ""
        if "readonly" in msg:
            return OutcomeClass.AUTH, ""
        return OutcomeClass.TERMINAL, ""
    if name.startswith(_SQLITE_TRANSIENT):
        return OutcomeClass.TRANSIENT, name
    if name.startswith(_SQLITE_AUTH):
        return OutcomeClass.AUTH, name
    return OutcomeClass.TERMINAL, name


def message(exc: BaseException) -> tuple[str, str] | None:
    """sqlite3's message is already one line: nothing to pick out."""
    return None
