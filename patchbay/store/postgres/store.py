"""`PostgresStore`: the `Store` protocol on PostgreSQL, and the vault's rows beside it.

Every operation is one transaction on a connection from a `psycopg_pool.ConnectionPool`, run on a
thread of the store's executor so the event loop never waits on the network. The operations are the
SQLite store's own functions (one set of semantics, proved by tests/store/test_conformance.py on both),
run through `dialect.PgConnection`. PostgreSQL commits each transaction durably itself
(synchronous_commit as the server has it); concurrent accepts, and concurrent attempt records, share
one statement and one COMMIT (`group.AsyncGroups`, on the hub's event loop), and each returns after the COMMIT of its group. Any number
of hubs share the store (engine/roles.py); a hub's accepted deliveries wake the workers of the others by
NOTIFY on the schema's channel, sent after the commit from a connection of its own (`announce`), and each
process LISTENs (`listen`): new deliveries on a channel of their own, which only processes that deliver hear.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from patchbay.errors import StoreUnavailable, StoreUnusable
from patchbay.store import cluster as cl
from patchbay.store import windows as wq
from patchbay.store.base import Accepted, AttemptResult, DueDelivery, Fence, NewEvent, WindowState
from patchbay.store.common import Heard, for_deliverers, intake_lines, is_redoable, poll_until, wake_lines
from patchbay.store.leases import TAKE_POSTGRES, check_fence
from patchbay.store.migrations import BASELINE, Migration, apply_postgres
from patchbay.store.postgres import ops as pg_ops
from patchbay.store.postgres.dialect import PgConnection, RawConnection
from patchbay.store.postgres.errors import GONE as _GONE
from patchbay.store.postgres.errors import RETRY as _RETRY
from patchbay.store.postgres.errors import reason as _reason
from patchbay.store.postgres.group import AsyncGroups
from patchbay.store.postgres.schema import SCHEMA_VERSION, ddl
from patchbay.store.secrets import SqliteSecretRows
from patchbay.store.sqlite import SqliteStore, StoreClosed
from patchbay.store.sqlite_monitor import q_snapshot
from patchbay.store.sqlite_ops import tx_accept, tx_accept_batch

T = TypeVar("T")
log = logging.getLogger("patchbay.store")
# psycopg prepares a statement on its fifth execution, and PostgreSQL may then keep a generic plan made for
# the tables as they were: on a new store, a plan made at a few hundred rows (a sequential scan is cheapest
# there) stayed while deliveries grew past 30,000, and each attempt record read the whole table (1.7 ms of
# server CPU per event instead of 0.3, bench/cluster.py). Planning each execution costs a fraction of a
# millisecond per statement, shared by the events of its group.
_PLANNING = "-c plan_cache_mode=force_custom_plan"
# A process stopped inside a transaction (SIGSTOP, a frozen VM, a long stall) would hold its locks forever:
# its leases and claims run out, a lock does not, and every other node waits on it (the sending slots', a
# lease row's). The server ends a transaction left idle this long, and the woken process's next statement
# fails like a lost connection. Less than a lease (engine/leader.py TTL_S), so a node that takes a stopped
# one's work over is not held by its locks for longer than the lease itself; our own transactions run
# their statements back to back.
IDLE_IN_TRANSACTION_S = 10.0


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _split_schema(url: str) -> tuple[str, str | None]:
    """`?schema=NAME` selects a schema (tests: one per test); the rest is psycopg's conninfo."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    if schema is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise StoreUnusable(f"opening the store {redacted(url)}: schema {schema!r} must be a lower-case name")
    return urlunsplit(parts._replace(query=rest)), schema


def connect_args(
    url: str, *, timeout_s: int = 10, autocommit: bool = False, options: str = ""
) -> tuple[str, dict[str, Any]]:
    """psycopg's conninfo and keyword arguments for a connection to the store: its schema on the search
    path, then `options` (more `-c name=value` settings)."""
    conninfo, schema = _split_schema(url)
    path = f"-c search_path={schema}" if schema else ""
    kwargs: dict[str, Any] = {"connect_timeout": timeout_s, "autocommit": autocommit}
    if path or options:
        kwargs["options"] = f"{path} {options}".strip()
    return conninfo, kwargs


def connect_once(url: str, *, timeout_s: int = 10, autocommit: bool = False) -> psycopg.Connection[Any]:
    """One connection to the store, for work outside the pool (opening, migrating, probing, copying);
    psycopg's error when there is none."""
    conninfo, kwargs = connect_args(url, timeout_s=timeout_s, autocommit=autocommit)
    return psycopg.connect(conninfo, **kwargs)


def unusable(url: str, exc: psycopg.Error) -> StoreUnusable:
    """The store cannot be opened: what the server said, and where to look."""
    return StoreUnusable(
        f"opening the store {redacted(url)}: {_reason(exc)}; check that the server runs and the"
        " `store:` URL in patchbay.yaml (its password comes from PGPASSWORD or ~/.pgpass)"
    )


def open_schema(conn: psycopg.Connection[Any], schema: str | None) -> list[Migration]:
    """Create the schema's tables and apply the migrations it lacks (one transaction, under a lock that
    serialises openers), or refuse a store newer than this code. The migrations applied."""
    with conn.transaction():
        # Two openers never create at once, the schema included (CREATE SCHEMA IF NOT EXISTS is not safe
        # against a concurrent one: several workers starting on a new schema).
        conn.execute("SELECT pg_advisory_xact_lock(7311999)")
        if schema:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')  # type: ignore[arg-type]
        found = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
        if found and found[0]:
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreUnusable(
                    f"the store's schema is version {version}, newer than this Patchbay's"
                    f" ({SCHEMA_VERSION}); upgrade Patchbay"
                )
        conn.execute(ddl().replace("%", "%%"))  # type: ignore[arg-type]
        conn.execute(
            "INSERT INTO meta(key, value) VALUES('schema_version', %s) ON CONFLICT DO NOTHING",
            (str(BASELINE),),
        )
        return apply_postgres(conn)


def probe(url: str) -> str | None:
    """Why the store at `url` cannot be used (unreachable, refused, newer schema), or None."""
    try:
        with connect_once(url, timeout_s=5) as conn:
            found = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
            if found and found[0]:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    return f"its schema is version {version}, newer than this Patchbay's ({SCHEMA_VERSION}); upgrade Patchbay"
    except StoreUnusable as exc:
        return str(exc)
    except psycopg.Error as exc:
        return f"cannot connect: {_reason(exc)}"
    return None


class PostgresStore(SqliteStore):
    """The `Store` protocol on PostgreSQL (see the module's docstring).

    It inherits SqliteStore's methods, each `self._write(fn, …)` or `self._read(fn, …)` of a query
    function: here those run the function on a pooled PostgreSQL connection in one transaction."""

    def __init__(
        self,
        url: str,
        *,
        check: bool = True,
        max_connections: int = 8,
        holder: str | None = None,
        accept_writers: int = 2,
        lease_s: float = pg_ops.LEASE_S,
        idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S,
    ) -> None:
        self.url = url
        self.path = Path(redacted(url))  # what messages name
        self.schema = _split_schema(url)[1]
        try:
            with connect_once(url) as conn:
                open_schema(conn, self.schema)
        except psycopg.Error as exc:
            raise unusable(url, exc) from None
        # A transaction is opened explicitly where one is needed; every execution is planned for the tables
        # as they are now (`_PLANNING`); a transaction left idle is ended by the server (IDLE_IN_TRANSACTION_S).
        idle = f"-c idle_in_transaction_session_timeout={max(1, int(idle_in_transaction_s * 1000))}"
        conninfo, self._conn_kwargs = connect_args(url, autocommit=True, options=f"{_PLANNING} {idle}")
        self._pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_connections,
            kwargs=self._conn_kwargs,
            open=True,
            name="patchbay-store",
        )
        # Who holds a claimed delivery: the hub's node id (engine/roles.py), unique per process.
        self.holder = holder or os.environ.get("PATCHBAY_NODE_ID") or f"{socket.gethostname()}:{os.getpid()}"
        self.claims = pg_ops.Claims(self.holder, lease_s)
        self._exec = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="patchbay-store")
        self._closed = False
        self._conninfo = conninfo
        self._notify_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchbay-store-notify")
        self._notify_conn: psycopg.Connection[Any] | None = None
        self._notify_pid = 0  # the server process of `_notify_conn`: the sender of this process's NOTIFYs
        self._listener: threading.Thread | None = None
        self._entity_conn: psycopg.Connection[Any] | None = None  # holds the sync steps' advisory locks
        self._entity_guard = threading.Lock()
        self._problem: str | None = None
        self.counter = {"statements": 0, "round_trips": 0, "transactions": 0}
        self._count_lock = threading.Lock()
        # The hot path's group commits run on the hub's event loop, each writer on a connection of its own.
        self._accepts = AsyncGroups(
            self._aconnect_for(pg_ops.accept_many_async),
            pg_ops.accept_many_async,
            lambda items: self._submit(pg_ops.accept_many, items),
            self._closed_error,
            self._account,
            name="accept",
            where=str(self.path),
            writers=accept_writers,
        )
        self._records = AsyncGroups(
            self._aconnect_for(pg_ops.record_async),
            pg_ops.record_async,
            lambda items: self._submit(pg_ops.record, items),
            self._closed_error,
            self._account,
            name="record",
            where=str(self.path),
            writers=2,
            max_group=512,
        )

    @staticmethod
    def migrate_only(url: str) -> None:
        """Create the tables and apply pending migrations, without opening a pool."""
        try:
            with connect_once(url) as conn:
                open_schema(conn, _split_schema(url)[1])
        except psycopg.Error as exc:
            raise unusable(url, exc) from None

    # -------------------------------------------------------------- plumbing
    def lock(self, roles: Collection[str] = (), node_id: str | None = None) -> None:
        """Nothing to claim: any number of hubs share a PostgreSQL store (engine/roles.py). Two processes with
        the same node id are refused by `join_cluster`, and deliveries are claimed row by row (SKIP LOCKED)."""

    # -------------------------------------------------------------- cluster: the wake across processes
    @property
    def shared(self) -> bool:
        return True

    @property
    def leases_in_store(self) -> bool:
        return True  # any number of worker and scheduler processes: leases and claims are rows (engine/leader.py)

    @property
    def channel(self) -> str:
        """The NOTIFY channel of this store's schema (channels are per database, schemas share them)."""
        return "patchbay_" + hashlib.sha256((self.schema or "").encode()).hexdigest()[:24]

    @property
    def deliveries_channel(self) -> str:
        """The channel of the lines only a process that delivers hears (store/common.py `for_deliverers`)."""
        return self.channel + "_d"

    async def announce(self, flows: Collection[str], rescan: bool = False) -> None:
        if self._closed or not flows:
            return
        lines = wake_lines(flows, rescan)
        channel = self.deliveries_channel if for_deliverers(lines[0]) else self.channel
        await asyncio.get_running_loop().run_in_executor(self._notify_exec, self._notify, lines, channel)

    async def announce_intake(self, node: str, behind: Collection[str], caught_up: Collection[str]) -> None:
        if self._closed or not (behind or caught_up):
            return
        payloads = intake_lines(node, behind, caught_up)
        await asyncio.get_running_loop().run_in_executor(
            self._notify_exec, self._notify, payloads, self.channel
        )

    def _notify(self, payloads: list[str], channel: str) -> None:
        """One NOTIFY round trip on a connection of its own (never in the transaction that wrote the rows)."""
        for attempt in range(2):
            try:
                if self._notify_conn is None or self._notify_conn.closed:
                    self._notify_conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5)
                    self._notify_pid = self._notify_conn.info.backend_pid
                self._notify_conn.execute(
                    "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (channel, payloads)
                )
                return
            except psycopg.Error:
                if self._notify_conn is not None:
                    self._notify_conn.close()
                self._notify_conn = None
                if attempt == 1:
                    raise

    def _listen_to(self, heard: Heard, deliveries: bool) -> None:
        channels = [self.channel, self.deliveries_channel] if deliveries else [self.channel]
        self._listener = threading.Thread(
            target=self._listen,
            args=(heard, channels),
            name="patchbay-store-listen",
            daemon=True,
        )
        self._listener.start()

    def _listen(self, heard: Heard, channels: list[str]) -> None:
        while not self._closed and not heard.closed:
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    for channel in channels:
                        conn.execute(f'LISTEN "{channel}"')  # type: ignore[arg-type]
                    heard.wake(
                        "", True
                    )  # what was announced while not listening: a rescan of every flow finds it
                    while not self._closed and not heard.closed:
                        for n in conn.notifies(timeout=0.5):
                            if n.pid == self._notify_pid:  # our own: this process woke its workers itself
                                continue
                            heard.line(n.payload)
            except psycopg.Error as exc:
                if not self._closed:
                    log.warning(
                        "listening for other processes' deliveries on %s: %s; the workers rescan each second"
                        " meanwhile, and listening starts again in a second",
                        self.path,
                        _reason(exc),
                    )
                    time.sleep(1.0)

    @asynccontextmanager
    async def entity_lock(self, entity: str) -> AsyncIterator[None]:
        """A session advisory lock per entity on a connection of its own, taken by polling
        pg_try_advisory_lock (no thread ever blocks waiting), released after the step's commit. Hubs in
        several processes on one store therefore run one entity's sync steps one at a time."""
        key = int.from_bytes(
            hashlib.sha256(f"patchbay:entity:{self.schema or ''}:{entity}".encode()).digest()[:7], "big"
        )

        async def take() -> bool:
            # The try runs on a thread, which a cancel does not stop: a lock it takes after the cancel is let
            # go as soon as it answers, or the session would hold it (and other processes wait) until it closes.
            attempt = asyncio.ensure_future(
                asyncio.to_thread(self._entity_call, "SELECT pg_try_advisory_lock(%s)", key)
            )
            try:
                return await asyncio.shield(attempt)
            except asyncio.CancelledError:
                attempt.add_done_callback(lambda f: self._let_go_if_taken(f, key))
                raise

        await poll_until(take)
        try:
            yield
        finally:
            try:
                await asyncio.to_thread(self._entity_call, "SELECT pg_advisory_unlock(%s)", key)
            except StoreUnavailable:
                pass  # the session is gone, and its locks with it

    def _let_go_if_taken(self, attempt: asyncio.Future[bool], key: int) -> None:
        if attempt.cancelled() or attempt.exception() is not None or not attempt.result():
            return
        try:
            self._exec.submit(self._entity_call, "SELECT pg_advisory_unlock(%s)", key)
        except RuntimeError:  # the store is closing: its session ends, and the lock with it
            pass

    def _entity_call(self, sql: str, key: int) -> bool:
        with self._entity_guard:
            try:
                if self._entity_conn is None or self._entity_conn.closed:
                    self._entity_conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
                row = self._entity_conn.execute(sql, (key,)).fetchone()
            except psycopg.OperationalError as exc:
                if self._entity_conn is not None:
                    self._entity_conn.close()
                self._entity_conn = None
                raise StoreUnavailable(
                    f"the store {self.path} cannot be reached: {_reason(exc)}", "the store is unreachable"
                ) from None
            return bool(row and row[0])

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        for attempt in range(3):
            local = {"statements": 0, "round_trips": 0}
            try:
                with self._pool.connection() as conn:
                    if getattr(fn, "native", False):  # one statement: its own transaction (autocommit)
                        res = fn(RawConnection(conn, local), *args)
                    else:
                        with conn.transaction():
                            res = fn(PgConnection(conn, local), *args)
                        local["round_trips"] += 2  # BEGIN, COMMIT
            except _RETRY:
                if attempt == 2:
                    raise
                continue  # a concurrent writer won (same dedupe key): the next try sees its row
            except _GONE as exc:
                self._problem = _reason(exc)
                raise StoreUnavailable(
                    f"the store {self.path} cannot be reached: {self._problem}", "the store is unreachable"
                ) from None
            self._problem = None
            with self._count_lock:
                for k, v in local.items():
                    self.counter[k] += v
                self.counter["transactions"] += 1
            return res
        raise AssertionError("unreachable")

    def _aconnect_for(self, op: Any) -> Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]:
        """How a group writer of `op` connects: a redoable op's (store/common.py `redoable`: attempt
        records) commits without waiting for the WAL flush (`synchronous_commit=off`); a server crash loses
        at most its last records, whose deliveries are sent again under their idempotency keys."""
        kwargs = self._conn_kwargs
        if is_redoable(op):
            kwargs = {**kwargs, "options": f"{kwargs['options']} -c synchronous_commit=off"}

        async def connect() -> psycopg.AsyncConnection[Any]:
            return await psycopg.AsyncConnection.connect(self._conninfo, **kwargs)

        return connect

    def _account(self, counts: dict[str, int], problem: str | None) -> None:
        """An operation of the hot path done (its counters) or failed for want of the server (`problem`)."""
        self._problem = problem
        if problem is None:
            with self._count_lock:
                for k, v in counts.items():
                    self.counter[k] += v
                self.counter["transactions"] += 1

    def _closed_error(self) -> StoreClosed:
        return StoreClosed(
            f"writing to the store {self.path}: it is closed (the hub is stopping); try again once it runs",
            "the store is closed",
        )

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise self._closed_error()
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._run, fn, args)

    def _write(self, fn: Callable[..., T], *args: Any) -> Any:  # type: ignore[override]
        return self._submit(fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._submit(fn, *args)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for groups in (self._accepts, self._records):  # what is queued is written first
            await groups.stop()
        await loop.run_in_executor(None, self._exec.shutdown, True)
        await loop.run_in_executor(None, self._pool.close)
        await loop.run_in_executor(None, self._notify_exec.shutdown, True)
        if self._notify_conn is not None:
            self._notify_conn.close()
        if self._listener is not None:  # it looks at `_closed` every half second
            await loop.run_in_executor(None, self._listener.join, 2.0)
        with self._entity_guard:
            if self._entity_conn is not None:
                self._entity_conn.close()
                self._entity_conn = None

    @property
    def writing(self) -> bool:
        return not self._closed

    @property
    def problem(self) -> str | None:
        return self._problem

    @property
    def stats(self) -> dict[str, int]:
        # the calls that shared a group's COMMIT
        extra = sum(g.calls - g.groups for g in (self._accepts, self._records))
        return {"commits": self.counter["transactions"], "ops": self.counter["transactions"] + extra}

    # -------------------------------------------------------------- the hot path, PostgreSQL's own statements
    async def accept(self, event: NewEvent) -> Accepted:
        if event.claims or event.windows:  # dedupe keys and windows: the shared operation, one transaction
            return await self._write(_gated(tx_accept), event)
        return (await self._accepts.call([event]))[0]  # type: ignore[no-any-return]

    async def accept_batch(
        self, events: list[NewEvent], flow: str, cursor: Any, fence: Fence | None = None
    ) -> list[Accepted]:
        return await self._write(_gated_batch, events, flow, cursor, fence)

    # -------------------------------------------------------------- leases: the server's clock
    async def take_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        return await self._write(_take_lease, name, holder, ttl_s)

    async def closable_windows(
        self, now: float, limit: int, steps: Sequence[tuple[str, str]]
    ) -> list[WindowState]:
        # SQLite reads them in the writer's order; here the lock waits for the accepts adding to windows
        # that are in flight, so a record accepted before `now` is seen and every later one is late.
        return await self._write(_windows_closing, now, limit, list(steps))

    async def due(
        self, flow: str, destination: str, now: float, limit: int, skip: set[int], after_id: int = 0
    ) -> list[DueDelivery]:
        return await self._read(self.claims.due, flow, destination, now, limit, frozenset(skip), after_id)

    async def next_due(self, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], float]:
        return await self._read(self.claims.next_due, tuple(pairs)) if pairs else {}

    async def record(self, results: list[AttemptResult]) -> None:
        if results:
            await self._records.call(results)

    async def renew(self, flow: str, destination: str, ids: set[int]) -> set[int]:
        return await self._write(self.claims.renew, frozenset(ids)) if ids else set()

    async def release(self, flow: str, destination: str, ids: set[int]) -> None:
        if ids:
            await self._write(self.claims.release, frozenset(ids))

    async def take_slots(self, flow: str, destination: str, limit: int, want: int, busy: int = 0) -> int:
        return await self._write(self.claims.take_slots, flow, destination, limit, want, busy, time.time())

    async def release_claims(self, node_ids: Collection[str]) -> int:
        return await self._write(_release_claims, list(node_ids)) if node_ids else 0

    async def take_tokens(
        self, flow: str, destination: str, rate: float, burst: float, want: int, now: float
    ) -> tuple[int, float]:
        return await self._write(pg_ops.take_tokens, flow, destination, rate, burst, want, now)

    async def compress_runs(
        self, flow: str, before: float, limit: int = 500, after: float | None = None
    ) -> tuple[int, float | None]:
        return await self._write(pg_ops.tx_compress, flow, before, limit, after)

    async def snapshot(
        self,
        now: float,
        after_id: int | None,
        seed_from: float,
        pairs: list[tuple[str, str]],
        dead_windows: set[float | None],
        count_after: int | None,
        drift_since: float | None = None,
        *,
        timeout: float,
    ) -> Any:
        """The alert loop's read: one transaction on a pooled connection, cancelled past `timeout`."""
        return await asyncio.wait_for(
            self._submit(
                _with_timeout(q_snapshot, timeout),
                now,
                after_id,
                seed_from,
                pairs,
                dead_windows,
                count_after,
                drift_since,
            ),
            timeout + 1.0,
        )


# Transaction locks that give the SQLite writer's order where it matters: one accept at a time per dedupe key
# (two records with one key: exactly one passes) and per window; closing windows waits for adds in flight.
_WINDOWS_LOCK = 7311998


def _lock_gates(conn: Any, events: Sequence[NewEvent]) -> None:
    keys = sorted(
        {f"claim\x1f{e.flow}\x1f{c.step}\x1f{c.key}" for e in events for c in e.claims}
        | {f"window\x1f{e.flow}\x1f{w.step}\x1f{w.start}\x1f{w.key}" for e in events for w in e.windows}
    )
    if any(e.windows for e in events):
        conn.execute("SELECT pg_advisory_xact_lock_shared(?)", (_WINDOWS_LOCK,))
    for key in keys:  # in one order: two accepts never wait on each other crosswise
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))


def _gated(fn: Callable[..., T]) -> Callable[..., T]:
    def run(conn: Any, event: NewEvent) -> T:
        _lock_gates(conn, [event])
        return fn(conn, event)

    return run


def _gated_batch(
    conn: Any, events: list[NewEvent], flow: str, cursor: Any, fence: Fence | None = None
) -> list[Accepted]:
    if fence is not None:  # first: a source whose lease went to another node writes nothing
        check_fence(conn, fence)
    _lock_gates(conn, events)
    return tx_accept_batch(conn, events, flow, cursor)


@pg_ops.native
def _take_lease(conn: RawConnection, name: str, holder: str, ttl_s: float) -> int | None:
    row = conn.execute(TAKE_POSTGRES, (name, holder, ttl_s)).fetchone()
    return None if row is None else int(row[0])


def _release_claims(conn: Any, node_ids: list[str]) -> int:
    """The gone nodes' claimed deliveries, and their destinations' sending slots and wants: a node that starts
    after a kill -9 on the same host sends at once, not after the dead one's slots ran out (`claim_lease`)."""
    marks = ",".join("?" * len(node_ids))
    conn.execute(f"UPDATE delivery_slots SET holder=NULL, until=0 WHERE holder IN ({marks})", tuple(node_ids))
    conn.execute(f"DELETE FROM delivery_wants WHERE holder IN ({marks})", tuple(node_ids))
    return cl.tx_release(conn, node_ids)


def _windows_closing(conn: Any, now: float, limit: int, steps: list[tuple[str, str]]) -> list[WindowState]:
    conn.execute("SELECT pg_advisory_xact_lock(?)", (_WINDOWS_LOCK,))
    return wq.q_closable(conn, now, limit, steps)


def _with_timeout(fn: Callable[..., T], timeout: float) -> Callable[..., T]:
    def run(conn: PgConnection, *args: Any) -> T:
        conn.conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")  # type: ignore[arg-type]
        try:
            return fn(conn, *args)
        except pg_errors.QueryCanceled as exc:
            raise TimeoutError("the store's snapshot took too long") from exc

    return run


class PostgresSecretRows(SqliteSecretRows):
    """The vault's rows in the PostgreSQL store: SqliteSecretRows' statements, each operation one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conninfo, self.schema = _split_schema(url)
        self.kwargs: dict[str, Any] = {"connect_timeout": 10}
        if self.schema:
            self.kwargs["options"] = f"-c search_path={self.schema}"

    def ensure_schema(self) -> None:
        with self._connect() as conn:
            open_schema(conn, self.schema)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.conninfo, **self.kwargs)
        except psycopg.OperationalError as exc:
            raise StoreUnusable(f"opening the store {redacted(self.url)}: {_reason(exc)}") from None

    @contextmanager
    def _read(self) -> Iterator[Any]:  # type: ignore[override]
        with self._connect() as conn:
            yield PgConnection(conn)

    _write = _read  # type: ignore[assignment]


__all__ = ["PostgresSecretRows", "PostgresStore", "is_postgres_url", "redacted"]
