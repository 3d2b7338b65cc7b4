"""The HTTP/1.1 exchange of every request to a system's API (a destination's attempt, a poll's page, an
OAuth2 token request): the hub's one HTTP client.

Why not aiohttp's client here: a delivery is one request and an answer read to a small limit, on a
kept-alive connection, thousands of times a second. Through aiohttp's `ClientSession.request` a send
(`HttpSink.send`) cost 215 µs of CPU, through this exchange 106 (bench/sendpath.py); in one hub process
aiohttp's part was a third of all its CPU per event. This module writes the request itself and leaves the parsing of the
answer to httptools (llhttp, the parser Node.js uses). Only the hub's own server is aiohttp.

What it keeps of the house rules:
- **The address guard**: every new connection resolves the name and connects only to an address the
  system's policy allows (`resolve_allowed`), the address checked being the address connected to; a
  redirect's target is checked the same way.
- **TLS** verified by default, with the system's CA bundle if it names one; the name checked is the
  URL's host while the connection goes to the checked address.
- **Pools per address policy** (`HttpPools.pool`): a kept-alive connection opened for an internal
  system is never reused for a guarded one.
- **Bounded**: at most `limit` bytes of an answer are kept (decompressed); a longer answer, one that
  breaks off or stalls after its head gives what came (the status decided the outcome) and its
  connection is closed, never reused.
- **No header injection**: a header name or value that could end the line is refused before anything
  is sent.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple, cast
from urllib.parse import urljoin, urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from patchbay.security.ssrf import connect_first, resolve_allowed

KEEP_IDLE_S = 15.0  # a connection idle longer than this is closed rather than reused (aiohttp's default)
IDLE_PER_SERVER = 256  # kept-alive connections kept per server; more are closed when given back
MAX_REDIRECTS = 10
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: a method or a header name
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))
_DEFAULTS = (("Accept", "*/*"), ("Accept-Encoding", "gzip, deflate"))


Tls = Callable[[], Awaitable[ssl.SSLContext]]  # gives the context for an https URL (asked only for one)


class Answer(NamedTuple):
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes  # at most the exchange's limit, decompressed


class BadRequest(ValueError):
    """The request cannot be written as asked (a URL or header the protocol cannot carry): no retry helps."""


class BadAnswer(OSError):
    """The server's answer broke the protocol, or the connection ended before an answer."""


class _Conn(asyncio.Protocol):
    """One connection and the answer it is reading (one request at a time: no pipelining)."""

    __slots__ = (
        "transport",
        "parser",
        "head",
        "done",
        "status",
        "headers",
        "chunks",
        "size",
        "limit",
        "inflate",
        "complete",
        "lost",
        "idle_at",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] | None = None
        self.done: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = 0
        self.inflate: Any = None
        self.complete = False
        self.lost = False
        self.idle_at = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of asyncio's

    def data_received(self, data: bytes) -> None:
        if self.done is None:  # nothing asked: a server must not speak first
            self._close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadAnswer(f"the server's answer is not valid HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(BadAnswer("the server closed the connection without answering"))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: the connection cannot be trusted any more
            raise BadAnswer("the server sent a second answer to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:  # an interim answer (100 Continue, 103): the real one follows
            return
        coding = self.headers.get("Content-Encoding", "").strip().lower()
        if coding in ("gzip", "x-gzip"):
            self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self.inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib-wrapped (what servers send)
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        room = self.limit - self.size
        if room <= 0:
            return
        if self.inflate is not None:
            try:
                body = self.inflate.decompress(body, room)
            except zlib.error:
                self._fail(BadAnswer("the answer's compressed body is corrupt"))
                return
        body = body[:room]
        self.chunks.append(body)
        self.size += len(body)
        if self.size >= self.limit:  # enough: the rest is not read, so the connection cannot be reused
            self.lost = True
            if self.done is not None and not self.done.done():
                self.done.set_result(None)
            self._close()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            self.headers = CIMultiDict()
            return
        self.complete = True
        if not self.parser.should_keep_alive():  # HTTP/1.0, or `Connection: close`
            self.lost = True
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # -- the exchange
    async def exchange(self, raw: bytes, limit: int, deadline: float) -> Answer:
        loop = asyncio.get_running_loop()
        self.head, self.done = loop.create_future(), loop.create_future()
        self.status, self.chunks, self.size, self.limit = 0, [], 0, limit
        self.inflate, self.complete = None, False
        assert self.transport is not None
        timer = loop.call_at(deadline, self._expire)  # one timer, not a timeout context per wait
        try:
            self.transport.write(raw)
            await self.head
            if not self.done.done():
                await self.done
        finally:
            timer.cancel()
        headers, self.headers = CIMultiDictProxy(self.headers), CIMultiDict()
        body = b"".join(self.chunks)
        self.chunks, self.head, self.done = [], None, None
        return Answer(self.status, headers, body)

    def _expire(self) -> None:
        self._end(TimeoutError())  # the deadline

    @property
    def reusable(self) -> bool:
        return (
            self.complete and not self.lost and self.transport is not None and not self.transport.is_closing()
        )

    def _end(self, exc: BaseException) -> None:
        """The answer ends here (lost, broken, out of time): before its head the exchange raises `exc`;
        after it, what came is the answer (the status decided the outcome, and a 2xx whose body never
        finishes must not become a retry: the remote acted on the request)."""
        self.lost = True
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
            if self.done is not None:
                self.done.cancel()  # never awaited now
        elif self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._end(exc)
        self._close()

    def _close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class WirePool:
    """Kept-alive connections of one address policy, per server (scheme, host, port, TLS context).

    A connection idle for KEEP_IDLE_S is closed: when its server is next asked for one, or by a timer
    while any are idle, so a destination that goes quiet does not keep its connections open."""

    def __init__(self, allow_private: bool, allow_networks: tuple[str, ...]) -> None:
        self.allow_private, self.allow_networks = allow_private, allow_networks
        self._idle: dict[tuple[Any, ...], list[_Conn]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        timeout_s: float,
        limit: int,
        tls: Tls,
        follow_redirects: bool = False,
        credentials: frozenset[str] = frozenset(),
    ) -> Answer:
        """One exchange (and its redirects when `follow_redirects`), all within `timeout_s`. `tls()` gives
        the context for an https URL (asked only for one); `credentials` names the headers that carry the system's credentials,
        which are not sent on to another server a redirect points at."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        start = url
        for _ in range(MAX_REDIRECTS + 1):
            answer = await self._once(method, url, headers, body, limit, tls, deadline)
            location = answer.headers.get("Location")
            if not follow_redirects or answer.status not in _REDIRECTS or not location:
                return answer
            target = urljoin(url, location)
            if urlsplit(target).scheme not in ("http", "https"):
                return answer  # not followed: classified as the redirect it is
            if answer.status == 303 or (answer.status in (301, 302) and method == "POST"):
                method, body = ("GET" if method != "HEAD" else method), None  # what browsers and aiohttp do
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            if not same_server(target, start):
                headers = {k: v for k, v in headers.items() if k.lower() not in credentials}
            url = target
        raise BadAnswer(f"more than {MAX_REDIRECTS} redirects")

    async def _once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        limit: int,
        tls: Tls,
        deadline: float,
    ) -> Answer:
        scheme, host, port, target, netloc = _parse(url)
        raw = _head(method, target, netloc, headers, body)
        context = await tls() if scheme == "https" else None
        key = (scheme, host, port, id(context))
        conn = self._take(key)
        if conn is None:
            async with asyncio.timeout_at(deadline):
                conn = await self._connect(host, port, context)
        ok = False
        try:
            answer = await conn.exchange(raw, limit, deadline)
            ok = True
            return answer
        finally:
            if ok and conn.reusable and not self.closed:
                self._give(key, conn)
            else:
                conn._close()

    async def _connect(self, host: str, port: int, context: ssl.SSLContext | None) -> _Conn:
        addresses = await resolve_allowed(
            host, port, allow_private=self.allow_private, allow_networks=self.allow_networks
        )
        loop = asyncio.get_running_loop()
        name = host if context is not None else None

        async def attempt(address: str) -> _Conn:
            _, conn = await loop.create_connection(_Conn, address, port, ssl=context, server_hostname=name)
            return conn

        return await connect_first(addresses, attempt)

    def _take(self, key: tuple[Any, ...]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.reusable and now - conn.idle_at < KEEP_IDLE_S:
                return conn
            conn._close()
        return None

    def _give(self, key: tuple[Any, ...], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        now = time.monotonic()
        while idle and now - idle[0].idle_at >= KEEP_IDLE_S:  # the longest idle go first (taken last)
            idle.pop(0)._close()
        if len(idle) >= IDLE_PER_SERVER:
            conn._close()
            return
        conn.idle_at = now
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(KEEP_IDLE_S, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for KEEP_IDLE_S; come back while any are left (the oldest first)."""
        self._sweeper = None
        now = time.monotonic()
        oldest = now
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_at >= KEEP_IDLE_S:
                idle.pop(0)._close()
            if idle:
                oldest = min(oldest, idle[0].idle_at)
            else:
                del self._idle[key]
        if self._idle and not self.closed:
            self._sweeper = asyncio.get_running_loop().call_later(oldest + KEEP_IDLE_S - now, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c._close()


@functools.lru_cache(maxsize=4096)  # a destination's URL is mostly the same one: parsed once
def _parse(url: str) -> tuple[str, str, int, str, str]:
    """scheme, host, port, request target and Host header of an absolute http(s) URL, or BadRequest."""
    parts = urlsplit(url)
    scheme, host = parts.scheme, parts.hostname
    if scheme not in ("http", "https") or not host:
        raise BadRequest(f"not an absolute http(s) URL: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise BadRequest("the URL holds credentials; give them as the system's auth instead")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise BadRequest(f"bad port in {url!r}: {exc}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if _BAD_TARGET.search(target):
        raise BadRequest("the URL's path holds a space or control character; quote it")
    return scheme, host, port, target, parts.netloc


_NAMES_OK: set[str] = set()  # header names already found to be tokens (a few per destination)


def _head(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
    if not _TOKEN.fullmatch(method):
        raise BadRequest(f"bad HTTP method {method!r}")
    lines = [f"{method} {target} HTTP/1.1"]
    given: set[str] = set()
    for name, value in headers.items():
        if name not in _NAMES_OK:
            if not _TOKEN.fullmatch(name):
                raise BadRequest(f"bad header name {name!r}: letters, digits and !#$%&'*+-.^_`|~ only")
            if len(_NAMES_OK) < 4096:
                _NAMES_OK.add(name)
        if "\r" in value or "\n" in value or "\x00" in value:
            raise BadRequest(f"header {name} holds a line break or NUL, which would end the header")
        low = name.lower()
        if low in _FRAMING:  # the body's length is ours to say
            continue
        given.add(low)
        lines.append(f"{name}: {value}")
    if "host" not in given:
        lines.insert(1, f"Host: {host}")
    for name, value in _DEFAULTS:  # what aiohttp sent: a server never answers in a coding we cannot read
        if name.lower() not in given:
            lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError as exc:
        raise BadRequest(
            f"a header holds {exc.object[exc.start : exc.end]!r}, which HTTP/1.1 cannot carry"
        ) from None
    return head + body if body else head


def same_server(url: str, base: str) -> bool:
    """`url` is on the server of `base` (scheme, host and port, as the pools tell servers apart), so the
    system's credentials may go to it. A URL no request could be made to is on no server."""
    try:
        return _parse(url)[:3] == _parse(base)[:3]
    except BadRequest:
        return False
