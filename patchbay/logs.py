"""Logging: text or JSON lines, with secret values and signature headers scrubbed from every record."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable

import orjson

_SENSITIVE_KV = re.compile(
    r"(?i)((?:authorization|webhook-signature|x-signature|x-hub-signature(?:-256)?|api[-_]?key|password|token|secret)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s,\"'}]+)"
)
_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class RedactFilter(logging.Filter):
    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = self.clean(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        # A traceback and `extra` fields are written too: an exception's text may hold a credential
        # (a URL with a token in it, a driver's error quoting its DSN).
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.clean(record.exc_text)
        for k, v in list(record.__dict__.items()):
            if k not in _STD and isinstance(v, str):
                record.__dict__[k] = self.clean(v)
        return True

    def clean(self, text: str) -> str:
        return _SENSITIVE_KV.sub(r"\1[secret]", self.redact(text))


def _exc(fmt: logging.Formatter, record: logging.LogRecord) -> str:
    """The traceback to write: the one RedactFilter cleaned (exc_text) when it ran."""
    if record.exc_text:
        return record.exc_text
    return fmt.formatException(record.exc_info) if record.exc_info else ""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                doc[k] = v
        exc = _exc(self, record)
        if exc:
            doc["exc"] = exc
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{t} {record.levelname:<7} {record.getMessage()}"
        exc = _exc(self, record)
        if exc:
            line += "\n" + exc
        return line


def setup(fmt: str, redact: Callable[[str], str], level: int = logging.INFO) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_patchbay", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._patchbay = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactFilter(redact))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
