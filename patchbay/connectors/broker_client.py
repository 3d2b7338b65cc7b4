"""What the message-broker connectors share: TLS, message bodies, names, one lazy connection,
and for their sources: body decoding, content ids and an inbox that batches pushed messages."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar

import orjson

from patchbay.connectors.base import Outcome, OutcomeClass, Stopwatch
from patchbay.connectors.tls_client import TlsSettings, tls_context
from patchbay.errors import RecordInvalid, Violation
from patchbay.expressions import Expr, Template, compile_expr, render_template
from patchbay.records import put

log = logging.getLogger("patchbay.connectors")

C = TypeVar("C")
T = TypeVar("T")

BODY_DESCRIPTION = (
    "The JSON message body: omitted = the record as it is after the steps; a string = one expression; "
    "a mapping = target path -> expression, like map."
)


async def ssl_context(
    tls: bool, verify_tls: bool = True, ca_bundle: str | None = None, server_name: str | None = None
) -> ssl.SSLContext | None:
    """The TLS settings of a system as its shared SSLContext (None: plain TCP), built once per system.

    `server_name`: the configured host name, for drivers that connect to the checked IP address and
    cannot be told another name for TLS; the context then checks the certificate against this name.
    """
    if not tls:
        return None
    return await tls_context(
        TlsSettings(
            verify=verify_tls, check_hostname=verify_tls, ca_bundle=ca_bundle, server_name=server_name
        )
    )


# ------------------------------------------------------------------ config checks (run by `patchbay check`)
def check_template(v: str) -> str:
    """A config validator: the `{{ expressions }}` of a name compile."""
    render_template(v)
    return v


def check_body(v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(v, str):
        compile_expr(v)
    elif isinstance(v, dict):
        for target, expr in v.items():
            if not target or any(not p for p in target.split(".")):
                raise ValueError(f"bad target path {target!r}: write dotted names such as order.id")
            if isinstance(expr, str):
                compile_expr(expr)
    return v


def check_key_field(v: str | None) -> str | None:
    if v is not None and (not v or any(not p for p in v.split("."))):
        raise ValueError(f"bad key_field {v!r}: write a dotted path such as meta.idempotency_key")
    return v


# ------------------------------------------------------------------ rendering (pure, at ingest)
class BodyRenderer:
    """Turns a record into the message body as JSON text, optionally carrying the idempotency key."""

    def __init__(self, body: str | dict[str, Any] | None, key_field: str | None = None) -> None:
        self._expr = compile_expr(body) if isinstance(body, str) else None
        self._map: dict[str, Expr | Any] | None = (
            {k: compile_expr(v) if isinstance(v, str) else v for k, v in body.items()}
            if isinstance(body, dict)
            else None
        )
        self._key_field = key_field

    def value(self, record: Any, key: str) -> Any:
        if self._expr is not None:
            body = self._expr.search(record)
        elif self._map is not None:
            body = {}
            for target, expr in self._map.items():
                put(body, target, expr.search(record) if isinstance(expr, Expr) else expr)
        else:
            body = record
        if self._key_field is not None:
            if not isinstance(body, dict):
                raise RecordInvalid(
                    [
                        Violation(
                            self._key_field,
                            f"cannot add the idempotency key: the body is not an object "
                            f"but {type(body).__name__}",
                        )
                    ],
                    step="render",
                )
            body = copy.deepcopy(body)  # the record is shared with the flow's other destinations
            put(body, self._key_field, key)
        return body

    def json(self, record: Any, key: str) -> str:
        return orjson.dumps(self.value(record, key)).decode()


def render_name(template: Template, record: Any, field: str, check: Callable[[str], str | None]) -> str:
    """Fill a templated topic/subject/routing key; `check` returns why a value is unusable, or None."""
    value = template.render(record)
    problem = check(value)
    if problem:
        shown = value if len(value) <= 80 else value[:79] + "…"
        raise RecordInvalid(
            [Violation(field, f"{field} {shown!r} {problem} (from `{template.text}`)")], step="render"
        )
    return value


# ------------------------------------------------------------------ outcomes
def failure(cls: OutcomeClass, sw: Stopwatch, error: str, redact: Callable[[str], str]) -> Outcome:
    return Outcome(cls, None, sw.ms, error=redact(error))


def timed_out(sw: Stopwatch, timeout_s: float) -> Outcome:
    return Outcome(OutcomeClass.TRANSIENT, None, sw.ms, error=f"timed out after {timeout_s:g}s")


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------ one connection per destination
class Lazy(Generic[C]):
    """One connection, opened on first use, shared by concurrent sends, and opened anew after a loss.

    Sends that arrive while a connection is being opened wait for that one attempt; a send that
    times out stops waiting but does not cancel the attempt, so the next send may find it ready.
    """

    def __init__(
        self,
        open_: Callable[[], Awaitable[C]],
        is_open: Callable[[C], bool],
        close: Callable[[C], Awaitable[None]],
        *,
        open_timeout_s: float,
        what: str,
    ) -> None:
        self._open = open_
        self._is_open = is_open
        self._close = close
        self._open_timeout_s = open_timeout_s
        self._what = what
        self._current: C | None = None
        self._opening: asyncio.Task[C] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False
        self.opened = 0  # connections opened so far (reconnects show here)

    @property
    def current(self) -> C | None:
        return self._current

    async def get(self) -> C:
        if self.closed:
            raise ConnectionError(f"{self._what}: the destination is closed")
        cur = self._current
        if cur is not None:
            if self._is_open(cur):
                return cur
            self.discard(cur)
        if self._opening is None:
            self._opening = asyncio.create_task(self._connect(), name=f"connect {self._what}")
            self._opening.add_done_callback(_retrieve)
        return await asyncio.shield(self._opening)

    async def _connect(self) -> C:
        try:
            conn = await asyncio.wait_for(self._open(), self._open_timeout_s)
        finally:
            self._opening = None
        if self.closed:  # closed while connecting: do not leak it
            await self._quietly_close(conn)
            raise ConnectionError(f"{self._what}: the destination is closed")
        self._current = conn
        self.opened += 1
        return conn

    def discard(self, conn: C | None) -> None:
        """Forget a connection that failed (if it is still the current one) and close it in the background."""
        if conn is None or conn is not self._current:
            return
        self._current = None
        task = asyncio.create_task(self._quietly_close(conn), name=f"close {self._what}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quietly_close(self, conn: C) -> None:
        try:
            await asyncio.wait_for(self._close(conn), 5.0)
        except Exception as exc:  # a dead connection often fails to close politely; it is gone either way
            log.debug("closing %s: %s", self._what, describe(exc))

    async def aclose(self) -> None:
        self.closed = True
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        cur, self._current = self._current, None
        if cur is not None:
            await self._quietly_close(cur)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every waiter may have timed out: read the result so asyncio never reports it as lost.
    if not task.cancelled():
        task.exception()


# ------------------------------------------------------------------ sources
BATCH_SIZE_DESCRIPTION = "Most messages committed together in one transaction (then acknowledged together)."
MAX_WAIT_DESCRIPTION = (
    "Once a message has arrived, how long to wait for more to fill the batch, in milliseconds; "
    "a larger value means fewer, bigger commits and a little more latency."
)
TIMEOUT_DESCRIPTION = "Seconds allowed to connect and to set up the subscription before the source retries."


def decode_body(raw: bytes) -> tuple[Any, bytes | None]:
    """A message body as a record: its JSON value when it is JSON, else `{"body": text}`.

    The second value is `raw` when the record is that JSON (stored as the event's payload, so a replay
    parses the bytes that arrived), None otherwise.
    """
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError:
        return {"body": raw.decode("utf-8", "replace")}, None


def content_id(*parts: bytes | str) -> str:
    """A record id from content alone (for messages that carry no id): the same bytes, the same id."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))  # length-prefixed: ("ab", "c") and ("a", "bc") differ
        h.update(data)
    return "sha256:" + h.hexdigest()


def text(value: Any) -> str | None:
    """A header or property value as text (drivers hand out bytes or str); None when absent or empty."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if value is None or value == "":
        return None
    return str(value)


def check_cancelled() -> None:
    """Raise CancelledError if the current task was cancelled but a driver swallowed it.

    On Python 3.11, asyncio.wait_for returns the result instead of raising when the cancellation
    arrives just as its inner await completes (redis-py and nats-py use it around socket writes and
    reads). The task stays marked as cancelling, so a source's loop checks this after each step;
    otherwise a stopping hub would wait for a consumer that never stops.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Stop:
    pass


_STOP: Final = _Stop()


class Inbox(Generic[T]):
    """Messages a driver pushes (from its callbacks), taken in batches by a source's stream loop.

    `fail(exc)` ends it: the next `take` raises `exc`, even with messages still buffered, because
    a lost connection can no longer acknowledge them and the broker hands them out again.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[T | _Stop] = asyncio.Queue()
        self.failure: BaseException | None = None

    def put(self, item: T) -> None:
        if self.failure is None:
            self._queue.put_nowait(item)

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            self._queue.put_nowait(_STOP)

    def _next(self, item: T | _Stop) -> T:
        if isinstance(item, _Stop) or self.failure is not None:
            assert self.failure is not None
            raise self.failure
        return item

    async def take(self, max_items: int, max_wait_s: float) -> list[T]:
        """Wait for one message, then up to `max_wait_s` for more; at most `max_items`."""
        batch = [self._next(await self._queue.get())]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        while len(batch) < max_items:
            if not self._queue.empty():
                batch.append(self._next(self._queue.get_nowait()))
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    item = await self._queue.get()
            except TimeoutError:
                break
            batch.append(self._next(item))
        if self.failure is not None:
            raise self.failure
        return batch
