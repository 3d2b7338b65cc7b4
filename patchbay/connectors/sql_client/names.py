"""SQL names and dialects: identifiers checked against one rule and quoted per dialect."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

Dialect = Literal["postgres", "mysql", "sqlite"]

IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # always fullmatch: `$` would allow "\n"
IDENT_RULE = "use letters, digits and '_', not starting with a digit, at most 63 characters"


def check_ident(name: str, what: str = "column") -> str:
    """`name` if it is a safe SQL identifier, else ValueError saying why."""
    if not isinstance(name, str) or not IDENT_RE.fullmatch(name):
        raise ValueError(f"bad {what} name {name!r}: {IDENT_RULE}")
    return name


def quote_ident(name: str, dialect: Dialect) -> str:
    check_ident(name)
    return f"`{name}`" if dialect == "mysql" else f'"{name}"'


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8, ::1 and Unix socket paths."""
    if host.startswith("/") or host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
