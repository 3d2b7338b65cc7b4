"""Form posts as records: `application/x-www-form-urlencoded` and `multipart/form-data` bodies.

A field becomes a key of the record with its value as a string; a name sent more than once becomes a
list of its values in the order sent. Names are kept as they come: `properties[email]` and
`properties.email` stay flat keys, since the bracket forms (PHP, Rack, qs) disagree with each other
and no standard defines them; a `map` step reshapes them (`properties.email: '"properties[email]"'`).

A file part is refused unless the trigger keeps files; a kept file is an object with its name, type,
size and content in base64, all inside the endpoint's body limit.
"""

from __future__ import annotations

import base64
import codecs
import re
from typing import Any, Literal
from urllib.parse import parse_qsl

from patchbay.errors import RejectedRequest

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def media_type(ctype: str) -> str:
    return ctype.split(";")[0].strip().lower()


def parse_form(ctype: str, body: bytes, files: Literal["refuse", "keep"] = "refuse") -> dict[str, Any]:
    """The record a form body makes; RejectedRequest for a body that is not the form it says it is."""
    if media_type(ctype) == "application/x-www-form-urlencoded":
        return _urlencoded(ctype, body)
    return _multipart(ctype, body, files)


def _add(record: dict[str, Any], name: str, value: Any) -> None:
    if name not in record:
        record[name] = value
    elif isinstance(record[name], list):
        record[name].append(value)
    else:
        record[name] = [record[name], value]


def _urlencoded(ctype: str, body: bytes) -> dict[str, Any]:
    charset = _params(ctype)[1].get("charset") or "utf-8"
    try:
        codecs.lookup(charset)
        text = body.decode("ascii")  # a urlencoded body is ASCII: everything else is %-escaped
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=False, encoding=charset, errors="strict"
        )
    except LookupError as exc:
        raise RejectedRequest(
            415, "unsupported_charset", f"unknown charset {charset!r} in Content-Type; send UTF-8"
        ) from exc
    except UnicodeDecodeError as exc:
        raise RejectedRequest(
            400,
            "malformed_form",
            f"the form body is not valid {charset} (byte {exc.start}); send UTF-8, "
            'e.g. <form accept-charset="utf-8">',
        ) from exc
    record: dict[str, Any] = {}
    for name, value in pairs:
        _add(record, name, value)
    return record


_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _params(value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="a"; filename="b.pdf"` -> ("form-data", {"name": "a", "filename": "b.pdf"})."""
    kind, _, rest = value.partition(";")
    params = {}
    for key, raw in _PARAM.findall(";" + rest):
        v = raw.strip()
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params[key.lower()] = v
    return kind.strip().lower(), params


def _multipart(ctype: str, body: bytes, files: Literal["refuse", "keep"]) -> dict[str, Any]:
    """RFC 7578, read in one linear pass over the bytes (the stdlib's email parser took seconds of the
    event loop for a 1 MiB body of small fields)."""
    boundary = _params(ctype)[1].get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise RejectedRequest(
            400,
            "malformed_form",
            "multipart/form-data needs a boundary parameter (1-200 characters) in Content-Type",
        )
    delim = b"--" + boundary.encode("latin-1", "replace")
    if body.startswith(delim):
        body = b"\r\n" + body
    chunks = body.split(b"\r\n" + delim)
    # chunks[0] is the preamble; every later chunk is a part, up to the one that starts with "--" (the close).
    if len(chunks) < 2 or not any(c.startswith(b"--") for c in chunks[1:]):
        raise _bad(
            "the multipart body does not match its Content-Type (missing or wrong boundary, or cut short)"
        )
    record: dict[str, Any] = {}
    for n, chunk in enumerate(chunks[1:], start=1):
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise _bad(f"part {n} has no blank line between its headers and its content")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n")[1:]:  # [0]: the rest of the delimiter line
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip().lower()] = value.strip()
        kind, disp = _params(headers.get("content-disposition", ""))
        name = disp.get("name")
        if kind != "form-data" or name is None:
            raise _bad(f"part {n} has no `Content-Disposition: form-data; name=...`")
        part_type, type_params = _params(headers.get("content-type", "text/plain"))
        filename = disp.get("filename")
        if filename == "" and not data:  # a file input left empty: browsers send the part anyway
            _add(record, name, None)
            continue
        if filename is not None:
            if files != "keep":
                raise RejectedRequest(
                    415,
                    "file_not_accepted",
                    f"field {name!r} is a file ({filename!r}); this endpoint takes form fields only "
                    "(set `files: keep` on the flow's webhook trigger to accept files)",
                )
            _add(
                record,
                name,
                {
                    "filename": filename,
                    "content_type": part_type or "application/octet-stream",
                    "size": len(data),
                    "content_base64": base64.b64encode(data).decode("ascii"),
                },
            )
            continue
        charset = type_params.get("charset", "utf-8")
        try:
            _add(record, name, data.decode(charset))
        except (LookupError, UnicodeDecodeError) as exc:
            raise _bad(f"field {name!r} is not valid {charset}; send UTF-8") from exc
    return record


def _bad(message: str) -> RejectedRequest:
    return RejectedRequest(400, "malformed_form", message)
