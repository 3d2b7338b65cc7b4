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
import email.parser
import email.policy
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


def _charset(ctype: str) -> str:
    for param in ctype.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"') or "utf-8"
    return "utf-8"


def _urlencoded(ctype: str, body: bytes) -> dict[str, Any]:
    charset = _charset(ctype)
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


def _multipart(ctype: str, body: bytes, files: Literal["refuse", "keep"]) -> dict[str, Any]:
    if "boundary=" not in ctype.lower():
        raise RejectedRequest(
            400, "malformed_form", "multipart/form-data without a boundary parameter in Content-Type"
        )
    head = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode("utf-8", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or message.defects:
        raise RejectedRequest(
            400,
            "malformed_form",
            "the multipart body does not match its Content-Type (missing or wrong boundary, or cut short)",
        )
    record: dict[str, Any] = {}
    for n, part in enumerate(message.iter_parts()):
        if (
            part.get_content_disposition() != "form-data"
            or part.get_param("name", header="content-disposition") is None
        ):
            raise RejectedRequest(
                400, "malformed_form", f"part {n + 1} has no `Content-Disposition: form-data; name=...`"
            )
        name = str(part.get_param("name", header="content-disposition"))
        data = part.get_payload(decode=True) or b""
        assert isinstance(data, bytes)
        filename = part.get_filename()
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
                    "content_type": part.get_content_type(),
                    "size": len(data),
                    "content_base64": base64.b64encode(data).decode("ascii"),
                },
            )
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            _add(record, name, data.decode(charset))
        except (LookupError, UnicodeDecodeError) as exc:
            raise RejectedRequest(
                400, "malformed_form", f"field {name!r} is not valid {charset}; send UTF-8"
            ) from exc
    return record
