"""A batch of rows in transit, and the one text encoding every bulk reader and writer speaks.

Rows travel as lists of fields in PostgreSQL's COPY text encoding (tab-separated, `\\N` for NULL,
backslash escapes), which MariaDB's LOAD DATA reads as it is. A column a step does not touch is
never decoded: its bytes go from reader to writer untouched. A column a step reads is decoded to the
same Python value the row-at-a-time path gives (`sql_client.jsonable`), so a flow's steps mean the
same thing in a webhook flow and in a batch sync.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

NULL = b"\\N"

# Canonical column types; each reader maps its database's types onto these.
TYPES = (
    "text",
    "int",
    "float",
    "numeric",
    "bool",
    "json",
    "timestamptz",
    "timestamp",
    "date",
    "time",
    "uuid",
    "bytes",
)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # one of TYPES
    db_type: str = ""  # the database's own type name, for messages and CREATE TABLE on the same kind
    nullable: bool = True


@dataclass
class Frame:
    """Up to `batch_rows` rows: `rows[i][j]` is column j of row i, COPY-text encoded."""

    columns: list[Column]
    rows: list[list[bytes]]
    # A pushed-down read's fast rows as one COPY-text block (`raw_rows` lines), never split into fields.
    # Keyword-only, so that frames of other readers (FileFrame) keep adding their own fields positionally.
    raw: bytes | None = field(default=None, kw_only=True)
    raw_rows: int = field(default=0, kw_only=True)
    part: str = field(
        default="", kw_only=True
    )  # pushed-down read: "pushed" (its SELECT's columns) or "python"

    def __len__(self) -> int:
        return self.raw_rows if self.raw is not None else len(self.rows)


_ESC_IN = re.compile(rb"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)")
_ESC_CHAR = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _unescape_one(m: re.Match[bytes]) -> bytes:
    s = m.group(1)
    if s in _ESC_CHAR:
        return _ESC_CHAR[s]
    if s[:1] == b"x" and len(s) > 1:
        return bytes([int(s[1:], 16)])
    if s[:1].isdigit():
        return bytes([int(s, 8) & 0xFF])
    return s


def unescape(field: bytes) -> str | None:
    """The text of one COPY field (None for NULL)."""
    if field == NULL:
        return None
    if b"\\" in field:
        field = _ESC_IN.sub(_unescape_one, field)
    return field.decode()


def escape(text: str) -> bytes:
    b = text.encode()
    if b"\\" in b or b"\t" in b or b"\n" in b or b"\r" in b:
        b = b.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return b


def _iso_datetime(text: str) -> str:
    return dt.datetime.fromisoformat(text).isoformat()


def _bytes(text: str) -> str:
    raw = bytes.fromhex(text[2:]) if text.startswith("\\x") else text.encode()
    return base64.b64encode(raw).decode()


def _bool(text: str) -> bool:
    return text in ("t", "true", "1")


def _float(text: str) -> float:
    return float(text)


# text -> the value the row path would give (jsonable of the driver's value)
DECODE: dict[str, Callable[[str], Any]] = {
    "text": str,
    "int": int,
    "float": _float,
    "numeric": str,  # Decimal -> str, exact
    "bool": _bool,
    "json": orjson.loads,
    "timestamptz": _iso_datetime,
    "timestamp": _iso_datetime,
    "date": str,
    "time": str,
    "uuid": str,
    "bytes": _bytes,
}


def decode(field: bytes, type_: str) -> Any:
    text = unescape(field)
    return None if text is None else DECODE[type_](text)


def decode_column(fields: list[bytes], type_: str) -> list[Any]:
    """`decode` over one column of a batch (the common no-escape case without a regex)."""
    conv = DECODE[type_]
    return [
        None if f == NULL else conv(f.decode() if b"\\" not in f else unescape(f))  # type: ignore[arg-type]
        for f in fields
    ]


def encode(value: Any) -> bytes:
    """A Python value (a step's output) as a COPY field; objects and arrays as JSON text."""
    if value is None:
        return NULL
    if value is True:
        return b"t"
    if value is False:
        return b"f"
    if isinstance(value, int | float):
        return str(value).encode()
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict | list):
        return escape(orjson.dumps(value).decode())
    return escape(str(value))


def infer_type(values: list[Any]) -> str:
    """The column type for values a step computed (the first non-null one decides; text when unsure).
    Whole numbers with a fraction among them are float: divide() gives 42 for 4200 cents, 19.99 for 1999."""
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, int):
            return "float" if any(isinstance(x, float) for x in values) else "int"
        if isinstance(v, float):
            return "float"
        if isinstance(v, dict | list):
            return "json"
        return "text"
    return "text"


def split_lines(buf: bytearray, chunk: bytes) -> list[list[bytes]]:
    """Append `chunk` to `buf` and take the complete lines out of it as rows of fields."""
    buf += chunk
    end = buf.rfind(b"\n")
    if end < 0:
        return []
    lines = bytes(buf[:end]).split(b"\n")
    del buf[: end + 1]
    return [line.split(b"\t") for line in lines]


def join_rows(rows: list[list[bytes]]) -> bytes:
    return b"".join(b"\t".join(r) + b"\n" for r in rows)
