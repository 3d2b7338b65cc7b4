"""TLS contexts for connectors: built once per setting, in a worker thread, shared by every connection.

Loading CAs takes 50-150 ms of CPU. Built on every connect, on the event loop, that stalled every
other task of the hub (and made a connect miss its deadline on a busy machine). A context is safe to
share between connections, so one is built per distinct setting (a system's TLS fields) and kept; a
changed `ca_bundle` file (its size or modification time) gets a new one.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass

from patchbay.security.ssrf import ServerNameContext, tls_client_context

_MAX_KEPT = 64  # distinct settings kept; a hub has a few systems, each with one or two


@dataclass(frozen=True)
class TlsSettings:
    """How a connection checks the server.

    verify:        check the certificate chain against `ca_bundle`, the PEM file of the CAs to trust
                   instead of the system's (one rule for every connector), or the system's CAs.
    check_hostname: and that it was issued for the host name (needs verify).
    server_name:   the configured host name, for drivers that connect to the checked IP address and
                   pass that IP on as the TLS name: the context sends and checks this name instead.
    """

    verify: bool = True
    check_hostname: bool = True
    ca_bundle: str | None = None
    server_name: str | None = None


_kept: OrderedDict[tuple[TlsSettings, tuple[int, int] | None], ssl.SSLContext] = OrderedDict()
_lock = threading.Lock()


def _ca_stamp(settings: TlsSettings) -> tuple[int, int] | None:
    if not (settings.verify and settings.ca_bundle):
        return None
    try:
        st = os.stat(settings.ca_bundle)
    except OSError:
        return None  # the build reports the missing file
    return (st.st_size, st.st_mtime_ns)


def build(settings: TlsSettings) -> ssl.SSLContext:
    """A new context for `settings` (blocking: loads CAs when it verifies)."""
    if settings.verify:
        ctx = tls_client_context(settings.ca_bundle, settings.server_name)
        if not settings.check_hostname:
            ctx.check_hostname = False
        return ctx
    # Not verifying: no CAs to load. A ServerNameContext still sends the configured name (SNI).
    ctx = ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.server_name = settings.server_name.strip("[]") if settings.server_name else None
    return ctx


def _kept_or_build(key: tuple[TlsSettings, tuple[int, int] | None]) -> ssl.SSLContext:
    with _lock:  # concurrent first connects of one system build its context once
        ctx = _kept.get(key)
        if ctx is None:
            ctx = build(key[0])
            _kept[key] = ctx
            while len(_kept) > _MAX_KEPT:
                _kept.popitem(last=False)
        else:
            _kept.move_to_end(key)
        return ctx


async def tls_context(settings: TlsSettings) -> ssl.SSLContext:
    """The shared context for `settings`, built in a worker thread the first time."""
    key = (settings, _ca_stamp(settings))
    ctx = _kept.get(key)
    if ctx is not None:
        return ctx
    return await asyncio.to_thread(_kept_or_build, key)


async def machine_tls() -> ssl.SSLContext:
    """The machine's CAs, verified (where no system's own TLS settings apply)."""
    return await tls_context(TlsSettings())


def forget() -> None:
    """Drop every kept context (tests; a rotated CA file is noticed without this)."""
    with _lock:
        _kept.clear()
