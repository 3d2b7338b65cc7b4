"""What the store modules share: SQL helpers (JSON as text, an event's status, an audit row, an attempt's
row), a token bucket's grant, `poll_until` (the wait of both stores' entity locks), `redoable` (writes
that need not wait for the disk) and the wake between processes: `wake_lines` and `intake_lines` sent,
`Heard` received."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

import orjson

from patchbay.store.base import no_nul

F = TypeVar("F", bound=Callable[..., Any])

# The lines of the store's wake to other processes (NOTIFY, SQLite's wake sockets), each one kind and its
# subject: a flow has new deliveries (`n:<flow>`) or ones to look for again (`r:<flow>`); a destination of the
# sender is behind (`b:<flow>/<name> on <node>`) or has caught up (`k:...`, engine/intake.py).
NEW, RESCAN, BEHIND, CAUGHT_UP = "n", "r", "b", "k"


def wake_lines(flows: Collection[str], rescan: bool) -> list[str]:
    kind = RESCAN if rescan else NEW
    return [f"{kind}:{flow}" for flow in flows]


def for_deliverers(line: str) -> bool:
    """A line only a process that delivers acts on (new deliveries, the most frequent): a process that does
    not (`--role web`) is not sent it, so web processes do not wake each other at every accepted group."""
    return line.startswith(NEW + ":")


def intake_lines(node: str, behind: Collection[str], caught_up: Collection[str]) -> list[str]:
    return [f"{BEHIND}:{who} on {node}" for who in behind] + [
        f"{CAUGHT_UP}:{who} on {node}" for who in caught_up
    ]


class Heard:
    """What a store's listener thread hears from the other processes, handed to the hub's event loop: `wake`
    for an announcement of deliveries, `line` for a line as sent (`announce`'s `n:`/`r:` or `announce_intake`'s
    `b:`/`k:`). `closed` once the loop has closed (the hub is gone): the listener stops."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_wake: Callable[[str, bool], None],
        on_intake: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.loop, self.on_wake, self.on_intake = loop, on_wake, on_intake
        self.closed = False

    def wake(self, flow: str, rescan: bool) -> None:
        self._call(self.on_wake, flow, rescan)

    def line(self, line: str) -> None:
        kind, _, what = line.partition(":")
        if kind not in (BEHIND, CAUGHT_UP):
            self.wake(what, kind == RESCAN)
        elif self.on_intake is not None:
            self._call(self.on_intake, what, kind == BEHIND)

    def _call(self, fn: Callable[[str, bool], None], what: str, flag: bool) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, what, flag)
        except RuntimeError:  # the loop has closed
            self.closed = True


def redoable(fn: F) -> F:
    """Mark a write whose loss in a power cut (never in a crash) breaks no promise: an attempt's record,
    whose delivery is then sent again under its idempotency key, as at-least-once delivery allows. A group
    of such writes alone commits without waiting for the disk (SQLite `synchronous=NORMAL`, PostgreSQL
    `synchronous_commit=off`); its rows reach the disk with the next commit that waits, or the checkpoint.
    Anything acknowledged to a sender, and anything a user decided, waits for the disk (docs/delivery.md)."""
    fn.redoable = True  # type: ignore[attr-defined]
    return fn


def delivery_row(e: Any, d: Any) -> tuple[Any, ...]:
    """A new delivery's values (of NewEvent `e`, NewDelivery `d`) in the order both stores' accepts write
    them: event_id, flow, destination, status, request, idempotency_key, last_error, order_key."""
    return (e.id, e.flow, d.destination, d.status, _j(d.request), d.idempotency_key, d.error, d.order_key)


def attempt_row(r: Any) -> list[Any]:
    """An attempt record's values (an AttemptResult's), in the order both stores' set-based records read them:
    the delivery's (id, new status, retry consumed, next_at, last error), then the attempt's (started, latency,
    status code, outcome, excerpt, error). A destination's words may hold a NUL byte: shown as U+FFFD
    (`base.no_nul`)."""
    error = no_nul(r.error)
    last_error = None if r.outcome == "success" else (error or f"HTTP {r.status_code}")
    retry = 1 if r.consumed_retry else 0
    return [
        r.delivery_id,
        r.new_status,
        retry,
        r.next_at,
        last_error,
        r.started_at,
        r.latency_ms,
        r.status_code,
        r.outcome,
        no_nul(r.excerpt),
        error,
    ]


def is_redoable(fn: Callable[..., Any]) -> bool:
    return getattr(fn, "redoable", False) is True


def _j(value: Any) -> str:
    return orjson.dumps(value).decode()


def refresh_event_status(conn: sqlite3.Connection, event_id: str, now: float | None = None) -> str:
    """An event's status follows its deliveries: pending while any is, dead if any died, else delivered."""
    row = conn.execute(
        "SELECT SUM(status='pending'), SUM(status='dead'), SUM(status='delivered'), COUNT(*)"
        " FROM deliveries WHERE event_id=?",
        (event_id,),
    ).fetchone()
    pending, dead, delivered, total = (x or 0 for x in row)
    if total == 0:
        return ""
    status = "pending" if pending else "dead" if dead else "delivered" if delivered else "discarded"
    conn.execute(
        "UPDATE events SET status=?, updated_at=? WHERE id=? AND status NOT IN ('quarantined','filtered')",
        (status, now or time.time(), event_id),
    )
    return status


def tx_audit(
    conn: sqlite3.Connection, actor: str, action: str, target: str, detail: dict[str, Any], origin: str = ""
) -> None:
    conn.execute(
        "INSERT INTO audit(at, actor, action, target, detail, origin) VALUES(?,?,?,?,?,?)",
        (time.time(), actor, action, target, _j(detail), origin),
    )


def grant_tokens(
    tokens: float, at: float, rate: float, burst: float, want: int, now: float
) -> tuple[float, int, float]:
    """A token bucket's grant: (tokens left, whole tokens granted (up to `want`), seconds until the next
    token when none could be granted). It refills at `rate` per second since `at`, up to `burst`."""
    tokens = min(burst, tokens + max(0.0, now - at) * rate)
    granted = min(want, int(tokens + 1e-9))
    if granted > 0:
        return tokens - granted, granted, 0.0
    return tokens, 0, (1.0 - tokens) / rate


async def poll_until(
    try_once: Callable[[], Awaitable[bool]], first_s: float = 0.002, most_s: float = 0.05
) -> None:
    """Await `try_once()` until it returns True, sleeping `first_s` after the first refusal and twice as long
    after each next one, at most `most_s` (2, 4, 8, 16, 32, 50, 50… ms). The entity locks (SQLite: an flock
    with LOCK_NB; PostgreSQL: pg_try_advisory_lock) are taken so, and no thread ever blocks waiting for one.
    A cancel is raised from the sleep or from `try_once`; the caller releases what it took, after this returned."""
    wait = first_s
    while not await try_once():
        await asyncio.sleep(wait)
        wait = min(wait * 2, most_s)
