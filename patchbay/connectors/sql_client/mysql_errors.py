"""MySQL and MariaDB (aiomysql/pymysql) errors by server or client error number."""

from __future__ import annotations

from typing import Any

from patchbay.connectors.base import OutcomeClass

DRIVERS = ("pymysql", "aiomysql")

_MY_TRANSIENT = {
    1021,
    1037,
    1038,
    1040,
    1041,
    1053,
    1135,
    1152,
    1153,
    1154,
    1155,
    1156,
    1157,
    1158,
    1159,
    1160,
    1161,
    1180,
    1181,
    1203,
    1205,
    1213,
    1226,
    1290,
    1317,
    1614,
    1615,
    1792,
    1836,
    1927,
    1969,
    3024,
    3572,
    4031,
}
_MY_AUTH = {1044, 1045, 1049, 1129, 1130, 1142, 1143, 1227, 1251, 1698, 1820, 1862, 2026, 2059, 2061}


def classify(exc: BaseException) -> tuple[OutcomeClass, str]:
    args = getattr(exc, "args", ())
    code = args[0] if args and isinstance(args[0], int) else None
    if code is None or code == 0:
        return OutcomeClass.TRANSIENT, ""  # InterfaceError(0, 'Not connected') and the like
    if code in _MY_AUTH:
        return OutcomeClass.AUTH, str(code)
    if code in _MY_TRANSIENT or 2000 <= code < 3000:  # client-side errors, e.g. 2003 refused, 2013 lost
        return OutcomeClass.TRANSIENT, str(code)
    return OutcomeClass.TERMINAL, str(code)


def message(exc: BaseException) -> tuple[str, str] | None:
    """The server's text: pymysql errors are (code, message)."""
    args: tuple[Any, ...] = getattr(exc, "args", ())
    return (str(args[1]), str(args[1])) if len(args) >= 2 else None
