"""The embedded store: one SQLite file in WAL mode, with group commit.

Writes go through one writer thread that takes every operation waiting in its queue, runs them
inside one transaction (each in its own savepoint only when one of them fails) and commits once; a
syncer thread then puts the WAL on disk (one fsync for every group committed before it, after the
write lock is let go) and only then resolves the callers' futures: an acknowledged event is on disk
(sqlite_writer.py). Reads use a second connection on a reader thread, so a slow query never blocks
the event loop or the writer; due deliveries are synced before they are handed out to be sent.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from patchbay.roles import ROLES, SCHEDULER, WORKER
from patchbay.store import api_queries as aq
from patchbay.store import calls as cq
from patchbay.store import cluster as cl
from patchbay.store import leases as lq
from patchbay.store import queries as rq
from patchbay.store import retention
from patchbay.store import tokens as tq
from patchbay.store import windows as wq
from patchbay.store.base import (
    SCHEDULE_FIELDS,
    Accepted,
    Actor,
    AlertChange,
    AttemptResult,
    AuditFilter,
    CachedAnswer,
    DestinationStates,
    DiscardReport,
    DueDelivery,
    Fence,
    Identity,
    IdentityChanges,
    IdentityLookup,
    Lease,
    NewEvent,
    NodeRow,
    ReplayReport,
    Reprocessor,
    RunFilter,
    Snapshot,
    SourceState,
    TokenInfo,
    WindowState,
)
from patchbay.store.common import Heard, grant_tokens, intake_lines, poll_until, tx_audit, wake_lines
from patchbay.store.identity import (
    q_all,
    q_conflict,
    q_conflicts,
    q_identity,
    q_lookup,
    q_pending_creates,
    q_review,
    q_reviews,
    q_search,
    q_stats,
)
from patchbay.store.leases import fenced
from patchbay.store.sqlite_monitor import (
    _MonitorReader,
    q_snapshot,
    q_source_states,
    tx_alert,
    tx_set_source_state,
)
from patchbay.store.sqlite_ops import (
    q_cursor,
    q_destination_states,
    q_due,
    q_held_keys,
    q_next_due,
    q_pending_of,
    q_response_fields,
    q_schedule,
    tx_accept,
    tx_accept_batch,
    tx_accept_synced,
    tx_record,
    tx_reset_cursor,
    tx_schedule,
    tx_set_cursor,
    tx_set_destination_state,
)
from patchbay.store.sqlite_schema import (
    RESTORE,
    SCHEMA_VERSION,
    StoreClosed,
    StoreLocked,
    check_file,
    connect,
    init_schema,
    open_store,
)
from patchbay.store.sqlite_wake import Wake
from patchbay.store.sqlite_writer import _STOP, WriteLock, _Checkpointer, _closed_error, _Writer

T = TypeVar("T")


def _holder(fd: int) -> str:
    """` (pid P, node N)` from a lock file its holder wrote, or nothing."""
    try:
        pid, _, node = os.pread(fd, 200, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return ""
    if not pid.isdigit():
        return ""
    return f" (pid {pid}" + (f", node {node}" if node and node != "-" else "") + ")"


class SqliteStore:
    """The default store. `await` its methods from the hub; the CLI uses `SqliteStore.sync()`."""

    def __init__(self, path: Path, *, check: bool = True) -> None:
        self.path = Path(path)
        # Refuses an empty, foreign or damaged file; `check` adds quick_check (the hub; not each CLI command).
        open_store(self.path, check=check).close()
        self._writer = _Writer(self.path)
        self._writer.start()
        self._checkpointer = _Checkpointer(self.path)
        self._checkpointer.start()
        self._reader_local = threading.local()
        self._rexec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchbay-store-reader")
        self._lock_fds: list[int] = []  # the flocks of `lock`
        self._wake: Wake | None = None  # the wake across processes, once `lock` names this node
        self._closed = False
        self._monitor: _MonitorReader | None = None  # created by the first snapshot()
        # One process serves a SQLite store: its claims, sending slots and token buckets live in memory.
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, at)

    # -------------------------------------------------------------- plumbing
    def lock(self, roles: Collection[str] = ROLES, node_id: str | None = None) -> None:
        """Claim what this process runs of the file; StoreLocked (nothing claimed) when another process has it.

        Several processes may serve one SQLite file on one machine: any number with the `web` role, and one
        each with `worker` and `scheduler`, whose claims, sending slots, buckets and leases live in their
        memory (an flock each: `<store>.worker.lock`, `<store>.scheduler.lock`). A process running every role
        (a plain `serve`, the CLI's in-process runs) also takes `<store>.lock`: a second one is refused as
        before. `node_id` (a serving hub): the process takes part in the wake across processes (`shared`).

        Every serving hub also holds `<store>.serving.lock` shared; a CLI command that must have the file to
        itself (`node_id` None: `sync init`, a decision taken beside no hub) takes it exclusively, so it is
        refused beside `--role web` processes too."""
        everything = set(roles) >= set(ROLES)
        wanted = (["serve"] if everything else []) + [r for r in (WORKER, SCHEDULER) if r in roles]
        taken: list[int] = []
        try:
            taken.append(self._take_serving(alone=node_id is None))
            for what in wanted:
                taken.append(self._take_lock(what, node_id, everything))
        except BaseException:
            for fd in taken:
                os.close(fd)
            raise
        self._lock_fds.extend(taken)
        if node_id is not None:
            self._wake = Wake(self.path, node_id)

    def _take_serving(self, alone: bool) -> int:
        fd = os.open(str(self.path) + ".serving.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if alone else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StoreLocked(
                f"opening the store {self.path}: "
                + (
                    "a `patchbay serve` process is using it (`--role web` ones too); stop those first"
                    if alone
                    else "a `patchbay` command that needs the file to itself is running; try again when it ends"
                )
            ) from exc
        return fd

    def _take_lock(self, what: str, node_id: str | None, everything: bool) -> int:
        path = str(self.path) + (".lock" if what == "serve" else f".{what}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = _holder(fd)
            os.close(fd)
            if what == "serve":
                raise StoreLocked(
                    f"opening the store {self.path}: another `patchbay serve` is using it{holder}; stop that"
                    " one first"
                ) from exc
            mine = "`patchbay serve` (every role)" if everything else f"`serve --role {what}`"
            raise StoreLocked(
                f"opening the store {self.path}: {mine} needs the {what} role of this SQLite file, and another"
                f" process runs it{holder}. On SQLite one process at a time runs the {what} role (any number"
                f" run `--role web`): run this one with `--role web`, stop that one first, or move the store"
                f" to PostgreSQL for more (`patchbay store copy --to postgresql://…`, then set `store:`)"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {node_id or '-'}\n".encode(), 0)
        return fd

    def _write(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._closed or not self._writer.submit((loop, fut, fn, args)):
            raise _closed_error(self.path)
        return fut

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._reader_local.conn = connect(self.path)
        return conn

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._rexec, lambda: fn(self._reader(), *args))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            await self._monitor.close()
        self._writer.q.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._checkpointer.stopping.set()
        await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.join)
        self._rexec.submit(
            lambda: getattr(self._reader_local, "conn", None) and self._reader_local.conn.close()
        )
        self._rexec.shutdown(wait=True)
        if self._wake is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._wake.close)
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []

    @property
    def writing(self) -> bool:
        """The writer thread is alive (every write, and so every acknowledgement, goes through it)."""
        return self._writer.is_alive() and not self._closed

    @property
    def problem(self) -> str | None:
        """Why writes fail right now (disk full, I/O error, damage), or None while they succeed."""
        return self._writer.problem

    @property
    def stats(self) -> dict[str, int]:
        w = self._writer
        return {"commits": w.commits, "relaxed_commits": w.relaxed_commits, "ops": w.ops}

    # -------------------------------------------------------------- hot path
    async def accept(self, event: NewEvent) -> Accepted:
        return await self._write(tx_accept, event)

    async def accept_batch(
        self, events: list[NewEvent], flow: str, cursor: Any, fence: Fence | None = None
    ) -> list[Accepted]:
        """Several events and the source cursor that covers them, committed together."""
        if fence is None:
            return await self._write(tx_accept_batch, events, flow, cursor)
        return await self._write(fenced(tx_accept_batch), fence, events, flow, cursor)

    async def due(
        self, flow: str, destination: str, now: float, limit: int, skip: set[int], after_id: int = 0
    ) -> list[DueDelivery]:
        return await self._read(self._due_on_disk, flow, destination, now, limit, frozenset(skip), after_id)

    def _due_on_disk(self, conn: sqlite3.Connection, *args: Any) -> list[DueDelivery]:
        """Due deliveries, on disk before they are sent: a commit is seen before its fsync (_Syncer), here
        or in another process, and an event sent but lost at a power cut would come again as another event."""
        due = q_due(conn, *args)
        if due:
            self._writer.syncer.on_disk("reading due deliveries from")
        return due

    async def next_due(self, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], float]:
        return await self._read(q_next_due, tuple(pairs)) if pairs else {}

    async def record(self, results: list[AttemptResult]) -> None:
        await self._write(tx_record, results)

    async def renew(self, flow: str, destination: str, ids: set[int]) -> set[int]:
        return await self._read(q_pending_of, frozenset(ids)) if ids else set()

    async def release(self, flow: str, destination: str, ids: set[int]) -> None:
        return None  # claims are the worker's memory

    async def take_slots(self, flow: str, destination: str, limit: int, want: int, busy: int = 0) -> int:
        return max(min(want, limit), min(busy, limit))  # the only holder

    async def take_tokens(
        self, flow: str, destination: str, rate: float, burst: float, want: int, now: float
    ) -> tuple[int, float]:
        tokens, at = self._buckets.get((flow, destination), (burst, now))
        left, granted, wait = grant_tokens(tokens, at, rate, burst, want, now)
        self._buckets[(flow, destination)] = (left, max(at, now))
        return granted, wait

    async def held_keys(self, flow: str, destination: str, limit: int = 100) -> list[dict[str, Any]]:
        return await self._read(q_held_keys, flow, destination, limit)

    # -------------------------------------------------------------- destinations, cursors, schedules
    async def destination_states(self) -> DestinationStates:
        return await self._read(q_destination_states)

    async def set_destination_state(
        self, flow: str, destination: str, state: str, reason: str | None, by: Actor | None = None
    ) -> None:
        await self._write(tx_set_destination_state, flow, destination, state, reason, by)

    async def cursor(self, flow: str) -> Any:
        return await self._read(q_cursor, flow)

    async def cursor_info(self, flow: str) -> dict[str, Any] | None:
        return await self._read(aq.q_cursor_row, flow)

    async def reset_cursor(self, flow: str, by: Actor | None = None) -> bool:
        return await self._write(tx_reset_cursor, flow, by)

    async def schedule(self, flow: str) -> dict[str, Any] | None:
        return await self._read(q_schedule, flow)

    async def schedules(self) -> dict[str, dict[str, Any]]:
        return await self._read(aq.q_schedules)

    async def update_schedule(
        self, flow: str, fields: Mapping[str, Any], count_run: bool = False, fence: Fence | None = None
    ) -> None:
        _check_schedule_fields(fields)
        await self._write(fenced(tx_schedule_fields), fence, flow, dict(fields), count_run)

    # -------------------------------------------------------------- runs, dead letters
    async def list_runs(self, f: RunFilter) -> list[dict[str, Any]]:
        return await self._read(rq.list_runs, f)

    async def get_run(self, event_id: str) -> dict[str, Any] | None:
        return await self._read(rq.get_run, event_id)

    async def recent_payloads(self, flow: str, limit: int) -> list[tuple[str, float, bytes]]:
        return await self._read(rq.q_recent_payloads, flow, limit)

    async def recent_answers(self, flow: str, limit: int) -> list[tuple[str, str, float, str]]:
        return await self._read(rq.q_recent_answers, flow, limit)

    async def counts(self) -> dict[str, Any]:
        return await self._read(rq.counts)

    async def counts_by_flow(self) -> dict[str, dict[str, dict[str, int]]]:
        return await self._read(aq.counts_by_flow)

    async def flow_stats(self, flows: list[str], now: float) -> dict[str, dict[str, Any]]:
        return await self._read(aq.flow_stats, flows, now)

    async def destination_backlog(self, now: float) -> dict[tuple[str, str], dict[str, Any]]:
        return await self._read(aq.destination_backlog, now)

    async def list_dead(self, flow: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return await self._read(rq.list_dead, flow, limit)

    async def dead_letters(
        self, flow: str | None, destination: str | None, reason: str | None, limit: int
    ) -> dict[str, Any]:
        return await self._read(aq.dead_letters, flow, destination, reason, limit)

    async def dead_event_ids(
        self, flow: str | None, destination: str | None, reason: str | None
    ) -> list[str]:
        return await self._read(aq.dead_event_ids, flow, destination, reason)

    async def replayable(self, flow: str | None, destination: str | None) -> list[str]:
        return await self._read(rq.q_replayable, flow, destination)

    async def replay(
        self,
        pipelines: Mapping[str, Reprocessor],
        event_ids: Sequence[str],
        destination: str | None,
        by: Actor,
    ) -> ReplayReport:
        return await self._write(rq.tx_replay, pipelines, list(event_ids), destination, by)

    async def discard(self, event_ids: Sequence[str], destination: str | None, by: Actor) -> DiscardReport:
        return await self._write(aq.tx_discard, list(event_ids), destination, by)

    # -------------------------------------------------------------- tokens, audit
    async def create_token(
        self,
        name: str,
        scopes: Sequence[str],
        expires_at: float | None,
        secret_sha256: str,
        by: Actor,
    ) -> TokenInfo:
        return await self._write(
            tq.tx_create_token, name, list(scopes), expires_at, secret_sha256, by, time.time()
        )

    async def tokens(self, include_inactive: bool = True) -> list[TokenInfo]:
        return await self._read(tq.q_tokens, include_inactive)

    async def token_secret(self, token_id: str) -> tuple[TokenInfo, str] | None:
        return await self._read(tq.q_token_secret, token_id)

    async def revoke_token(self, token_id: str, by: Actor | None = None) -> TokenInfo | None:
        return await self._write(tq.tx_revoke_token, token_id, by, time.time())

    async def touch_token(self, token_id: str, at: float) -> None:
        await self._write(tq.tx_touch, token_id, at)

    async def audit(self, action: str, target: str, by: Actor) -> None:
        await self._write(tx_audit, by.name, action, target, dict(by.detail), by.origin)

    async def audit_log(self, f: AuditFilter) -> list[dict[str, Any]]:
        return await self._read(tq.q_audit, f)

    # -------------------------------------------------------------- retention
    async def purge_runs(self, flow: str, statuses: Sequence[str], before: float, limit: int = 500) -> int:
        return await self._write(retention.tx_purge, flow, tuple(statuses), before, limit)

    async def compress_runs(
        self, flow: str, before: float, limit: int = 500, after: float | None = None
    ) -> tuple[int, float | None]:
        return await self._write(retention.tx_compress, flow, before, limit, after)

    # -------------------------------------------------------------- responses
    async def response_fields(self, event_id: str, destination: str) -> dict[str, Any] | None:
        """The fields `destination` mapped from its answer for `event_id` (None before a success)."""
        return await self._read(q_response_fields, event_id, destination)

    # -------------------------------------------------------------- identity map (store/identity.py)
    async def identity_lookup(
        self, entity: str, links: Sequence[tuple[str, str]], keys: Sequence[tuple[str, str]]
    ) -> IdentityLookup:
        return await self._read(q_lookup, entity, list(links), list(keys))

    async def identity(self, identity_id: str) -> Identity | None:
        return await self._read(q_identity, identity_id)

    async def search_identities(self, entity: str | None, text: str, limit: int = 20) -> list[Identity]:
        return await self._read(q_search, entity, text, limit)

    async def all_identities(self, entity: str, after: str = "", limit: int = 1000) -> list[Identity]:
        return await self._read(q_all, entity, after, limit)

    async def accept_synced(
        self,
        events: list[NewEvent],
        changes: IdentityChanges,
        cursors: Mapping[str, Any] | None = None,
        fence: Fence | None = None,
    ) -> list[Accepted]:
        return await self._write(fenced(tx_accept_synced), fence, events, changes, dict(cursors or {}))

    # -------------------------------------------------------------- leases (store/leases.py)
    async def take_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        return await self._write(lq.tx_take, name, holder, ttl_s)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._write(lq.tx_release, name, holder)

    async def leases(self) -> list[Lease]:
        return await self._read(lq.q_leases)

    async def conflicts(
        self, entity: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return await self._read(q_conflicts, entity, status, limit)

    async def conflict(self, conflict_id: int) -> dict[str, Any] | None:
        return await self._read(q_conflict, conflict_id)

    async def reviews(
        self, entity: str | None = None, status: str | None = "open", limit: int = 100
    ) -> list[dict[str, Any]]:
        return await self._read(q_reviews, entity, status, limit)

    async def review(self, review_id: int) -> dict[str, Any] | None:
        return await self._read(q_review, review_id)

    async def identity_stats(self, entity: str, closed_since: float | None = None) -> dict[str, Any]:
        return await self._read(q_stats, entity, closed_since)

    @asynccontextmanager
    async def entity_lock(self, entity: str) -> AsyncIterator[None]:
        """An flock per entity (`<store>.entity-<hash>.lock`), taken by polling (no thread ever blocks on it),
        so that web processes sharing the file run one entity's sync steps one at a time."""
        digest = hashlib.sha256(entity.encode()).hexdigest()[:16]
        fd = os.open(f"{self.path}.entity-{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)

        async def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        try:
            await poll_until(take)
            yield
        finally:
            os.close(fd)  # closing it releases the lock

    async def pending_creates(self, entity: str, older_than: float, limit: int = 500) -> list[dict[str, Any]]:
        return await self._read(q_pending_creates, entity, older_than, limit)

    # -------------------------------------------------------------- SQLite only
    # -- calls inside flows (store/calls.py)
    async def record_calls(
        self, results: list[AttemptResult], pipeline: Reprocessor, cache: Sequence[CachedAnswer] = ()
    ) -> list[tuple[str, list[str]]]:
        return await self._write(cq.tx_record_calls, results, pipeline, tx_record, list(cache))

    async def call_answers(self, event_id: str) -> dict[str, Any]:
        return await self._read(cq.q_answers, event_id)

    async def cached_answer(self, scope: str, key: str, now: float) -> dict[str, Any] | None:
        return await self._read(cq.q_cached_answer, scope, key, now)

    async def cache_answer(self, scope: str, key: str, answer: dict[str, Any], expires_at: float) -> None:
        await self._write(cq.tx_cache_answer, scope, key, answer, expires_at)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a query function `fn(conn, *args)` on the reader thread (SQLite only: the store's own
        tests and modules; everything else uses the protocol's methods)."""
        return await self._read(fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a transaction function `fn(conn, *args)` through the group-commit writer (SQLite only)."""
        return await self._write(fn, *args)

    # -------------------------------------------------------------- cluster: the processes on this store
    async def join_cluster(self, node: NodeRow, alive_within: float, force: bool = False) -> NodeRow | None:
        return await self._write(cl.tx_join, node, alive_within, force)

    async def heartbeat(
        self, node_id: str, started_at: float, now: float, port: int | None = None, claims: int = 0
    ) -> bool:
        return await self._write(cl.tx_heartbeat, node_id, started_at, now, port, claims)

    async def leave_cluster(self, node_id: str, started_at: float, now: float) -> None:
        await self._write(cl.tx_leave, node_id, started_at, now)

    async def nodes(self, now: float) -> list[NodeRow]:
        return await self._read(cl.q_nodes, now, self.leases_in_store)

    async def release_claims(self, node_ids: Collection[str]) -> int:
        return await self._write(cl.tx_release, list(node_ids)) if node_ids else 0

    @property
    def shared(self) -> bool:
        """A serving hub: other processes may serve the same file (web processes beside this one, or a
        worker beside this web process), so accepts are announced and workers listen (store/sqlite_wake.py)."""
        return self._wake is not None

    @property
    def leases_in_store(self) -> bool:
        """No (store/base.py `Leases.leases_in_store`): the singleton work (schedules, consumers, windows, alerts,
        retention) runs in the one process that holds the scheduler role's flock (`lock`), and deliveries are
        claimed in the memory of the one that holds the worker role's: every lease and claim is that process's."""
        return False

    async def announce(self, flows: Collection[str], rescan: bool = False) -> None:
        if self._wake is not None and not self._closed:
            self._wake.send(wake_lines(flows, rescan))

    async def announce_intake(self, node: str, behind: Collection[str], caught_up: Collection[str]) -> None:
        if self._wake is not None and not self._closed:
            self._wake.send(intake_lines(node, behind, caught_up))

    def listen(
        self,
        on_wake: Callable[[str, bool], None],
        on_intake: Callable[[str, bool], None] | None = None,
        deliveries: bool = True,
    ) -> None:
        self._listen_to(Heard(asyncio.get_running_loop(), on_wake, on_intake), deliveries)

    def _listen_to(self, heard: Heard, deliveries: bool) -> None:
        """`listen`'s transport: the wake sockets here, LISTEN on PostgreSQL."""
        if self._wake is not None:
            self._wake.listen(heard, deliveries)

    # -------------------------------------------------------------- monitoring: alerts, source health
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
    ) -> Snapshot:
        """The alert loop's read, on the monitor's own thread and connection (see `_MonitorReader`)."""
        if self._monitor is None:
            self._monitor = _MonitorReader(self.path)
        return await self._monitor.read(
            q_snapshot,
            now,
            after_id,
            seed_from,
            pairs,
            dead_windows,
            count_after,
            drift_since,
            timeout=timeout,
        )

    async def accept_alert(
        self, event: NewEvent, change: AlertChange, fence: Fence | None = None
    ) -> Accepted:
        return await self._write(fenced(tx_alert), fence, event, change)

    async def source_states(self) -> dict[str, SourceState]:
        return await self._read(q_source_states)

    # -------------------------------------------------------------- windows and dedupe keys (store/windows.py)
    async def closable_windows(
        self, now: float, limit: int, steps: Sequence[tuple[str, str]]
    ) -> list[WindowState]:
        # Read in the writer's order, not on the reader: a record accepted before `now` is then always seen
        # (even one still in a group about to commit), and every one after it is late (store/windows.py).
        return await self._write(wq.q_closable, now, limit, list(steps))

    async def emit_window(self, event: NewEvent, window: WindowState) -> Accepted:
        return await self._write(wq.tx_emit_window, event, window, tx_accept)

    async def tidy_windows(self, now: float) -> tuple[int, int]:
        return await self._write(wq.tx_tidy, now)

    async def open_windows(self) -> dict[str, int]:
        return await self._read(wq.q_open_windows)

    async def set_source_state(self, state: SourceState) -> None:
        await self._write(tx_set_source_state, state)


def tx_schedule_fields(conn: sqlite3.Connection, flow: str, fields: dict[str, Any], count_run: bool) -> None:
    tx_schedule(conn, flow, **fields, count_run=count_run)


def _check_schedule_fields(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - SCHEDULE_FIELDS)
    if unknown:
        raise ValueError(
            f"updating a schedule: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(SCHEDULE_FIELDS))}"
        )


class SyncStore:
    """Direct, synchronous access for the CLI (WAL lets it run beside a serving hub)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.conn = open_store(self.path)
        self._wlock = WriteLock(self.path)

    def read(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self.conn, *args)

    def write(self, fn: Callable[..., T], *args: Any) -> T:
        with self._wlock:  # in turn with the serving processes' writers (sqlite_writer.WriteLock)
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                res = fn(self.conn, *args)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            return res

    def close(self) -> None:
        self.conn.close()
        self._wlock.close()


__all__ = [
    "RESTORE",
    "SCHEMA_VERSION",
    "_STOP",
    "SqliteStore",
    "StoreClosed",
    "StoreLocked",
    "SyncStore",
    "check_file",
    "connect",
    "init_schema",
    "open_store",
    "q_schedule",
    "tx_accept",
    "tx_schedule",
    "tx_set_cursor",
]
