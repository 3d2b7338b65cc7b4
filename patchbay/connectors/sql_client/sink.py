"""The send half every SQL sink shares: one statement per record over a small pool; with a destination's
`batch:`, the statements of many records in one transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import BaseSink, Outcome, OutcomeClass, Resources, Stopwatch, excerpt
from patchbay.connectors.sql_client.config import SqlSinkConfig
from patchbay.connectors.sql_client.errors import classify_db
from patchbay.connectors.sql_client.names import Dialect
from patchbay.connectors.sql_client.pool import Pool
from patchbay.connectors.sql_client.statements import RowRenderer, Statement, build_statement

C = TypeVar("C")
_BEGIN = {"postgres": "BEGIN", "mysql": "START TRANSACTION", "sqlite": "BEGIN IMMEDIATE"}
SystemT = TypeVar("SystemT", bound=BaseModel)


class SqlSink(BaseSink[SystemT, SqlSinkConfig], Generic[SystemT, C]):
    """The send half every SQL sink shares; subclasses connect and execute."""

    dialect: ClassVar[Dialect]

    def __init__(
        self,
        system: SystemT,
        config: SqlSinkConfig,
        policy: DeliveryPolicy,
        resources: Resources,
        pool_size: int,
    ) -> None:
        super().__init__(system, config, policy, resources)
        self._renderer = RowRenderer(config)
        self._pool: Pool[C] = Pool(self._connect, self._disconnect, pool_size)

    # -- ingest half: pure -------------------------------------------------
    def render(self, record: Any, key: str) -> dict[str, Any]:
        return self._renderer.render(record)

    # -- delivery half -----------------------------------------------------
    async def _connect(self) -> C:
        raise NotImplementedError

    async def _disconnect(self, conn: C) -> None:
        raise NotImplementedError

    async def _execute(self, conn: C, stmt: Statement) -> tuple[int, list[str]]:
        """Run one statement in autocommit; the affected (for update: matched) row count and notes."""
        raise NotImplementedError

    def _healthy(self, conn: C) -> bool:
        return True

    def _adapt(self, value: Any) -> Any:
        """A JSON value as the driver should bind it."""
        return value

    def _deadline(self) -> float | None:
        return self.policy.timeout_s

    def _build(self, request: Mapping[str, Any]) -> Statement:
        return build_statement(request, self.dialect, self._adapt)

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        sw = Stopwatch()
        try:
            stmt = self._build(request)
        except (KeyError, TypeError, ValueError) as exc:
            return Outcome(
                OutcomeClass.TERMINAL,
                None,
                sw.ms,
                error=f"cannot build a statement from the stored request: {exc}",
            )
        async with self._pool.slot():
            sw = Stopwatch()  # waiting for a free connection is not the database's latency
            conn: C | None = None
            reuse = False
            deadline = asyncio.timeout(self._deadline())
            try:
                async with deadline:
                    conn = await self._pool.take()
                    count, notes = await self._execute(conn, stmt)
                reuse = True
            except Exception as exc:
                if isinstance(exc, TimeoutError) and deadline.expired():
                    # Mid-statement: the connection's state is unknown, so it is not reused.
                    outcome = Outcome(
                        OutcomeClass.TRANSIENT,
                        None,
                        sw.ms,
                        error=f"{stmt.action}: timed out after {self.policy.timeout_s:g}s",
                    )
                else:
                    outcome = self._failed(exc, stmt, sw.ms)
                    reuse = conn is not None and outcome.cls is OutcomeClass.TERMINAL and self._healthy(conn)
                if conn is not None and not self._healthy(conn):
                    await self._pool.clear()  # the server went away: the idle ones are dead too
                return outcome
            finally:
                if conn is not None:
                    await self._pool.give_back(conn, reuse)
        return self._result(stmt, count, notes, sw.ms)

    def _result(self, stmt: Statement, count: int, notes: list[str], ms: float) -> Outcome:
        """A statement that ran: written, or (an update that matched no row) dead-lettered if so asked."""
        if stmt.op == "update" and count == 0 and self.config.if_missing == "dead_letter":
            where = ", ".join(f"{k}={v!r}" for k, v in stmt.key.items())
            return Outcome(
                OutcomeClass.TERMINAL,
                None,
                ms,
                error=self.resources.redact(
                    f"{stmt.action}: no row has the key ({where}); "
                    "set if_missing: ignore to skip such records"
                ),
            )
        done = "written" if stmt.op == "upsert" else f"{count} row{'s' if count != 1 else ''}"
        text = f"{stmt.action}: {done}" + ("; " + "; ".join(notes) if notes else "")
        return Outcome(OutcomeClass.SUCCESS, None, ms, excerpt(self.resources.redact(text)))

    # -- batches (connectors/base.BatchSink) -------------------------------
    @property
    def batch_limit(self) -> int | None:
        return None

    def batch_problem(self) -> str | None:
        return None

    async def send_batch(self, requests: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[Outcome]:
        """Every record's statement in one transaction, in order. A statement the database refuses is that
        record's failure; the others were rolled back and are sent again without it (`resend`)."""
        out: list[Outcome | None] = [None] * len(requests)
        built: list[tuple[int, Statement]] = []
        for i, request in enumerate(requests):
            try:
                built.append((i, self._build(request)))
            except (KeyError, TypeError, ValueError) as exc:
                error = f"cannot build a statement from the stored request: {exc}"
                out[i] = Outcome(OutcomeClass.TERMINAL, None, 0.0, error=error)
        if built:
            for (i, _), outcome in zip(built, await self._run_batch([s for _, s in built]), strict=True):
                out[i] = outcome
        return [o for o in out if o is not None]

    async def _tx(self, conn: C, sql: str) -> None:
        await self._execute(conn, Statement("tx", "", sql, [], {}))

    async def _run_batch(self, stmts: list[Statement]) -> list[Outcome]:
        async with self._pool.slot():
            sw = Stopwatch()
            conn: C | None = None
            reuse = False
            at: int | None = None  # the statement running when something failed
            ran: list[tuple[int, list[str]]] = []
            deadline = asyncio.timeout(self._deadline())
            try:
                async with deadline:
                    conn = await self._pool.take()
                    await self._tx(conn, _BEGIN[self.dialect])
                    try:
                        for at, stmt in enumerate(stmts):  # noqa: B007 - `at` names the failing one
                            ran.append(await self._execute(conn, stmt))
                        at = None
                        await self._tx(conn, "COMMIT")
                    except Exception:
                        try:
                            await self._tx(conn, "ROLLBACK")
                        except Exception:  # the connection is gone: the server rolls back
                            pass
                        raise
                reuse = True
            except Exception as exc:
                if isinstance(exc, TimeoutError) and deadline.expired():
                    error = f"{stmts[0].action}: a batch of {len(stmts)} timed out after {self.policy.timeout_s:g}s"
                    return [Outcome(OutcomeClass.TRANSIENT, None, sw.ms, error=error) for _ in stmts]
                failed = self._failed(exc, stmts[at if at is not None else 0], sw.ms)
                reuse = conn is not None and failed.cls is OutcomeClass.TERMINAL and self._healthy(conn)
                if conn is not None and not self._healthy(conn):
                    await self._pool.clear()
                if at is None or failed.cls is not OutcomeClass.TERMINAL:
                    return [_same(failed) for _ in stmts]  # the whole transaction: retried or refused alike
                rolled_back = (
                    f"not applied: the transaction was rolled back for record {at + 1} of {len(stmts)}"
                )
                return [
                    failed
                    if j == at
                    else Outcome(OutcomeClass.TERMINAL, None, sw.ms, error=rolled_back, resend=True)
                    for j in range(len(stmts))
                ]
            finally:
                if conn is not None:
                    await self._pool.give_back(conn, reuse)
        ms = sw.ms
        return [self._result(stmt, count, notes, ms) for stmt, (count, notes) in zip(stmts, ran, strict=True)]

    def _failed(self, exc: BaseException, stmt: Statement, ms: float) -> Outcome:
        return classify_db(
            exc,
            self.dialect,
            action=stmt.action,
            latency_ms=ms,
            redact=self.resources.redact,
            system=self.resources.system or None,
        )

    async def close(self) -> None:
        await self._pool.close()


def _same(o: Outcome) -> Outcome:
    return Outcome(
        o.cls, o.status_code, o.latency_ms, o.excerpt, error=o.error, retry_after_s=o.retry_after_s
    )
