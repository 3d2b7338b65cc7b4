"""Per-destination delivery: a feeder reads due deliveries from the store, workers send them.

Backlog lives in the store; memory holds at most `4 x max_concurrency` deliveries per destination,
so RSS stays flat however large the backlog grows. A delivery is "leased" in memory while it is
queued or in flight, and released only after its result is committed. After a crash nothing is
leased, so whatever was in flight is simply due again (same idempotency key).

Across workers (several processes sharing a PostgreSQL store) three things hold per destination, kept in
the store: a claim on each delivery queued or in flight (`due` leases it to this node; renewed every third
of the lease while held, released when not sent, so a dead worker's are taken over once its lease runs
out); `max_concurrency` sending slots, of which this worker sends on as many as it holds (`take_slots`:
a fair share while others want some, claiming ahead only for its slots); and one token bucket for
`rate_limit_per_s` (`take_tokens`, in grants of a tenth of a second's worth). With `order_by`, the store
hands out only each key's oldest delivery, so a key goes one at a time in arrival order everywhere.

A feed that found nothing due waits idle (`idle`) until it is woken: new deliveries or a replay (`notify`),
a state change, its own next retry, or the hub's look, which asks the store once for every idle feed of the
process (Hub._watch_states, `Store.next_due`), so an idle destination costs no read of its own.

A destination with `batch:` (and a sink that can `send_batch`) sends up to `max_records` deliveries in one
request; each member keeps its own outcome, decision and attempt rows (see `_work_batches`). Memory then
holds at most `2 x max_records` queued plus `max_concurrency x max_records` in flight.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from patchbay.config.project import DestinationSpec
from patchbay.connectors.base import Outcome, OutcomeClass, Sink, batch_key, can_batch
from patchbay.engine.intake import LAGGING_S
from patchbay.engine.policy import Decision, decide, outcome_of
from patchbay.engine.waiting import wait_set
from patchbay.errors import PatchbayError, StoreUnavailable
from patchbay.store.base import AttemptResult, DueDelivery, Store

log = logging.getLogger("patchbay.delivery")

# A feed that is reading reads from the start of its pending deliveries (not past its cursor) this often: a
# delivery committed after one with a higher id (PostgreSQL's accept groups commit two at a time, ids taken
# before) is behind the cursor. It is what the state watcher's wake each half second made every feed do
# until idle feeds stopped being woken by it; at 1 s, PostgreSQL one node was behind the old code in 8 of 10
# repetitions, at 0.5 s ahead of 1 s in 3 of 4 (bench/RESULTS.md, stop 19).
RESCAN_S = 0.5

# An attempt: its delivery, the answer, what was decided and the row that records it.
AttemptRow = tuple[DueDelivery, Outcome, Decision, AttemptResult]


class DestinationWorker:
    def __init__(
        self,
        flow: str,
        spec: DestinationSpec,
        sink: Sink,
        store: Store,
        *,
        on_state: Callable[[str, str, str, str], Any] | None = None,
        on_attempt: Callable[[str, str, Outcome], None] | None = None,
        state: str = "active",
        open_request: Callable[[dict[str, Any]], tuple[dict[str, Any], Any]] | None = None,
        on_answer: Callable[[str, Outcome], list[str]] | None = None,
        renew_s: float = 10.0,
        on_behind: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.flow = flow
        self.spec = spec
        self.name = spec.name
        self.sink = sink
        self.store = store
        self.policy = spec.policy
        self.state = state
        self.state_since = 0.0  # when `state` last changed here; the store's newer changes win
        self.on_state = on_state
        self.on_attempt = on_attempt
        self.open_request = open_request  # sealed sensitive values -> the request to send, and their scrubber
        self.on_answer = on_answer  # (event id, a success) -> how its answer drifts from the flow's contract
        # ("flow/name", behind): the feed finds more due than it holds, and what it reads has waited longer than
        # LAGGING_S since it came due: a backlog that grows, not one that exists (engine/intake.py).
        self.on_behind = on_behind
        self.behind = False
        self.leased: set[int] = set()
        # Fresh deliveries only ever get higher ids: between full scans the feed reads past the last id it
        # took. A full scan (from id 0) runs every RESCAN_S while it reads, after a state change or a replay,
        # and when a retry this worker scheduled comes due (`_retry_at`, its earliest).
        self._after_id = 0
        self._rescan_at = 0.0
        self._retry_at = math.inf
        # The feed found nothing due and waits to be woken: new deliveries, a replay or a state change
        # (`notify`), its own next retry, or the hub's look for every idle feed at once (Hub._watch_states:
        # one read of the store for all of them, not one each per destination and process each second).
        self.idle = False
        self.batch = spec.batch if spec.batch is not None and can_batch(sink) else None
        size = 4 * self.policy.max_concurrency
        if self.batch is not None:  # room for one batch filling and the next one ready
            size = max(size, 2 * self.batch.max_records)
        self.queue: asyncio.Queue[DueDelivery] = asyncio.Queue(maxsize=size)
        self._assembling = asyncio.Lock()  # one batch fills at a time, so a backlog makes full batches
        self._low_water = self.queue.maxsize // 2
        self._more = True  # the feed's last read found as many due as it had room for
        self.wake = asyncio.Event()
        self.resumed = asyncio.Event()
        if state == "active":
            self.resumed.set()
        self.rng = random.Random()
        self._tasks: list[asyncio.Task[None]] = []
        self._releasing: set[asyncio.Future[None]] = set()
        self._stopping = False
        self._results: list[AttemptResult] = []  # attempt results of this loop tick, recorded together
        self._recorded: asyncio.Future[None] | None = None
        # Results the store could not record (disk full): their deliveries stay leased (never re-sent
        # before their result is recorded), nothing new is sent, and a retry records them in order.
        self._held: list[AttemptRow] = []
        self._recordable = asyncio.Event()
        self._recordable.set()
        self._rerecord: asyncio.Task[None] | None = None
        self.record_retry_s = 1.0
        rate = self.policy.rate_limit_per_s
        self.bucket = SharedBucket(store, flow, spec.name, rate) if rate else None
        # Claims across workers: sending slots held (a sender sends only while `sending` < `slots`), when
        # to renew them and the deliveries' leases, whether there is work to want slots for.
        self.ordered = spec.order_by is not None  # the store hands out each key's oldest: always a full scan
        self.renew_s = renew_s
        self.slots = 0
        self.sending = 0  # requests in flight (a batch is one)
        # Senders waiting for a slot, first come first served: a freed slot wakes one of them, not all (with
        # two senders a slot, waking every waiter at each answer cost the hub ~0.08 ms of CPU per event).
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._renew_at = 0.0
        self._slots_at = 0.0
        self._has_work = True
        self._in_flight: set[int] = set()

    # -------------------------------------------------------------- control
    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._feed(), name=f"feed {self.flow}/{self.name}"))
        # Two senders a slot: one sending while the other's record is written (_send_loop).
        for i in range(2 * self.policy.max_concurrency):
            name = f"send {self.flow}/{self.name} #{i}"
            self._tasks.append(asyncio.create_task(self._send_loop(), name=name))

    @property
    def running(self) -> bool:
        """The feeder and every sender are alive (none ended with an error)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def notify(self, rescan: bool = False) -> None:
        """New deliveries are waiting; `rescan` when older ones may have become pending again (a replay)."""
        if rescan:
            self._rescan_at = 0.0
        if not self._has_work:
            self._has_work, self._slots_at = True, 0.0  # ask for sending slots at once
        self.wake.set()

    def set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        self.state_since = time.time()
        self._rescan_at = 0.0
        if state == "active":
            self.resumed.set()
            self.notify(rescan=True)  # what waited while it was paused
        else:
            self.resumed.clear()
            self._drain()  # queued ones go back to the store, so the order of arrival holds after resume
            self._wake_senders(len(self._slot_waiters))  # and those waiting for a slot let theirs go

    def _drain(self) -> None:
        """Queued deliveries go back to the store: their claims are let go, for any worker to take."""
        ids = set()
        while not self.queue.empty():
            d = self.queue.get_nowait()
            self.leased.discard(d.id)
            ids.add(d.id)
        if ids:
            self._let_go(ids)

    def _let_go(self, ids: set[int]) -> None:
        task = asyncio.ensure_future(self._release(ids))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, ids: set[int]) -> None:
        try:
            await self.store.release(self.flow, self.name, ids)
        except Exception as exc:  # their leases run out instead
            log.warning("letting go of %d claims of %s/%s: %s", len(ids), self.flow, self.name, exc)

    async def stop(self, grace_s: float) -> None:
        """Stop taking work; let in-flight attempts finish for up to `grace_s`."""
        self._stopping = True
        self._report_behind(False)
        self.resumed.set()
        self.wake.set()
        feeder, workers = self._tasks[:1], self._tasks[1:]
        for t in feeder:
            t.cancel()
        self._drain()
        deadline = time.monotonic() + grace_s
        while (self.inflight or self._held) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for t in workers:
            t.cancel()
        if self._rerecord is not None:
            self._rerecord.cancel()
        if self._held:
            log.error(
                "stopping with %d attempt results of %s/%s not recorded (the store cannot write);"
                " those deliveries are sent again after the restart, with the same idempotency keys",
                len(self._held),
                self.flow,
                self.name,
            )
        await asyncio.gather(*self._tasks, *filter(None, [self._rerecord]), return_exceptions=True)
        await asyncio.gather(*self._releasing, return_exceptions=True)
        if self.slots:
            try:  # others may send on them at once
                self.slots = await self.store.take_slots(self.flow, self.name, self.policy.max_concurrency, 0)
            except Exception as exc:
                log.warning("letting go of the sending slots of %s/%s: %s", self.flow, self.name, exc)

    # -------------------------------------------------------------- loops
    async def _feed(self) -> None:
        while not self._stopping:
            try:
                if self.state != "active":
                    self._report_behind(False)  # paused: nothing of its is being sent
                    if self.slots and not self.sending:  # paused: others get the slots once it resumes
                        self.slots = await self.store.take_slots(
                            self.flow, self.name, self.policy.max_concurrency, 0
                        )
                    await self.resumed.wait()
                    continue
                await self._claims()
                if not self._has_work:
                    await self._idle()
                    continue
                if self.slots == 0:  # nothing may be sent here now: wait for a free slot
                    if time.time() < self._slots_at:
                        self.wake.clear()
                        await self._sleep(max(0.01, self._slots_at - time.time()))
                    continue
                cap = self._capacity()
                room = cap - self.queue.qsize()
                if self.queue.qsize() >= cap // 2 or room <= 0:
                    # Enough queued: refill in chunks once workers have taken the queue below half (they
                    # wake the feeder then), not one row at a time and not in a spin.
                    self.wake.clear()
                    await self._sleep(0.05)
                    continue
                self.wake.clear()
                now = time.time()
                full = now >= self._rescan_at or self.ordered
                if full:
                    self._rescan_at = now + RESCAN_S
                    if now >= self._retry_at:
                        self._retry_at = math.inf  # (a later retry of its is found by the hub's look)
                batch = await self.store.due(
                    self.flow, self.name, now, room, self.leased, 0 if full else self._after_id
                )
                for d in batch:
                    self.leased.add(d.id)
                    self.queue.put_nowait(d)
                    if d.id > self._after_id:
                        self._after_id = d.id
                full = len(batch) >= room
                self._more = full or self.ordered  # (ordered: a key's next comes due as its last is answered)
                self._report_behind(full and now - batch[0].due_at > LAGGING_S)
                if len(batch) < room:
                    if not batch and self.queue.empty() and not self.sending:
                        self._has_work = False  # idle: see `_idle`
                        continue
                    wait = max(
                        0.0, self._rescan_at - time.time()
                    )  # (a retry of its lowers it: `_recorded_one`)
                    if wait > 0 or not batch:
                        await self._sleep(wait if wait > 0 else 0.05)
                else:
                    self._has_work = True
            except asyncio.CancelledError:
                raise
            except Exception:  # a store hiccup must not kill delivery; try again shortly
                log.exception("reading due deliveries for %s/%s", self.flow, self.name)
                await asyncio.sleep(1.0)

    async def _idle(self) -> None:
        """Nothing due here: wait to be woken (`idle`), or for this worker's next retry; claims and slots still
        held are renewed, or given back, on time (`_claims`)."""
        until = self._retry_at
        if self.slots or self.leased:
            until = min(until, self._renew_at)
        self.wake.clear()
        self.idle = True
        try:
            if until == math.inf:
                await self.wake.wait()
            else:
                await self._sleep(until - time.time())
        finally:
            self.idle = False
        if time.time() >= self._retry_at:
            self.notify()

    @property
    def inflight(self) -> int:
        """Deliveries being sent now (a batch counts its members)."""
        return len(self._in_flight)

    def _report_behind(self, behind: bool) -> None:
        if behind != self.behind:
            self.behind = behind
            if self.on_behind is not None:
                self.on_behind(f"{self.flow}/{self.name}", behind)

    def _capacity(self) -> int:
        """Deliveries claimed ahead: four per sending slot held (a batch: room for two batches), at most the
        queue's size, so a worker claims only what its slots can send."""
        size = 4 * self.slots
        if self.batch is not None:
            size = max(size, 2 * self.batch.max_records)
        return min(self.queue.maxsize, size)

    async def _claims(self) -> None:
        """Renew the claims held (every `renew_s`), and hold as many sending slots as there is work for."""
        now = time.time()
        want = self.policy.max_concurrency if self._has_work else 0
        renew = now >= self._renew_at
        if not renew and not (want > self.slots and now >= self._slots_at):
            return
        if renew and self.leased:
            kept = await self.store.renew(self.flow, self.name, set(self.leased))
            lost = self.leased - kept - self._in_flight - {h[0].id for h in self._held}
            if lost:
                self._forget(lost)
        self.slots = await self.store.take_slots(
            self.flow, self.name, self.policy.max_concurrency, want, busy=self.sending
        )
        self._wake_senders(self.slots)
        self._slots_at = now + 1.0
        if renew:
            self._renew_at = now + self.renew_s

    def _forget(self, lost: set[int]) -> None:
        """Claims another worker took over (this one renewed too late): never send them."""
        log.warning(
            "%d claimed deliveries of %s/%s were taken over by another worker (their lease ran out before it"
            " was renewed); not sending them here",
            len(lost),
            self.flow,
            self.name,
        )
        keep = []
        while not self.queue.empty():
            d = self.queue.get_nowait()
            if d.id not in lost:
                keep.append(d)
        for d in keep:
            self.queue.put_nowait(d)
        self.leased -= lost

    async def _slot(self) -> None:
        """Wait for a sending slot of this worker's own; the caller counts itself in `sending` at once. A
        destination that stops being active ends the wait: the caller's `_ours` lets its claims go (a sender
        that kept them through a pause would send them first after the resume, ahead of older ones)."""
        while self.sending >= self.slots and self.state == "active":
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_senders(1)  # the slot it was woken for goes to the next one
                raise
            finally:
                if not waiter.done():
                    self._slot_waiters.remove(waiter)

    def _slot_done(self) -> None:
        self.sending -= 1
        self._wake_senders(1)

    def _wake_senders(self, n: int) -> None:
        """Wake up to `n` senders waiting for a slot, in the order they came."""
        while n > 0 and self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1

    async def _sleep(self, seconds: float) -> None:
        await wait_set(self.wake, seconds)

    async def _send_loop(self) -> None:
        """A sender: take work from the queue (one delivery, or a batch's members), send it on a sending slot,
        record its attempts. The slot is a request in flight (max_concurrency), so it is given back once the
        answer is in and the next request goes while this one's record is written: there are two senders
        per slot. An answer that pauses or disables the destination keeps its slot until that change is
        recorded, so that nothing more is sent meanwhile."""
        while True:
            members = self._ours(await self._take())
            if not members:
                continue
            await self._slot()
            members = self._ours(members)  # the destination may have paused while this waited for a slot
            if not members:
                continue
            self.sending += 1
            self._in_flight.update(d.id for d in members)
            holding = True
            try:
                rows = await self._send(members)
                if not any(decision.destination_state for _, _, decision, _ in rows):
                    holding = False
                    self._slot_done()
                await self._finish(rows)
            except asyncio.CancelledError:
                raise
            except Exception:
                what = members[0].event_id if self.batch is None else f"a batch of {len(members)}"
                log.exception("delivering %s to %s/%s", what, self.flow, self.name)
            finally:
                self._in_flight.difference_update(d.id for d in members)
                if holding:
                    self._slot_done()
                held = {h[0].id for h in self._held}
                for d in members:
                    if d.id not in held:
                        self.leased.discard(d.id)

    async def _take(self) -> list[DueDelivery]:
        """The next work from the queue: one delivery, or a batch's members."""
        if self.batch is not None:
            await self._recordable.wait()
            async with self._assembling:
                return await self._take_batch()
        d = await self.queue.get()
        await self._recordable.wait()  # sending what cannot be recorded would only send it again
        self._running_low()
        return [d]

    def _running_low(self) -> None:
        """A sender took from the queue: below half, the feeder refills it before it runs dry, if its last read
        left more due behind. After a short read the store had no more: new deliveries wake the feeder
        (`notify`), a retry's time its timer, so a take that woke it would only read nothing again."""
        if self._more and self.queue.qsize() < self._low_water:
            self.wake.set()

    def _ours(self, members: list[DueDelivery]) -> list[DueDelivery]:
        """Those of `members` still this sender's to send: not those taken over meanwhile, and none while the
        destination is not active (their claims are let go, so the order of arrival holds after resume)."""
        members = [d for d in members if d.id in self.leased]
        if self.state != "active" and members:
            for d in members:
                self.leased.discard(d.id)
            self._let_go({d.id for d in members})
            return []
        return members

    async def _send(self, members: list[DueDelivery]) -> list[AttemptRow]:
        """Send the members (one request each, or one batch) and decide each attempt's row."""
        rows: list[AttemptRow] = []
        if self.batch is not None:
            await self._send_members(members, rows)
            return rows
        d = members[0]
        if self.bucket is not None:
            await self.bucket.wait()
        started = time.time()
        t0 = time.perf_counter()
        try:
            request, scrub = self.open_request(d.request) if self.open_request else (d.request, None)
        except PatchbayError as exc:  # a sealed value that cannot be opened fails the same way every time
            request, outcome = None, Outcome(OutcomeClass.TERMINAL, error=str(exc))
        if request is not None:
            try:
                outcome = await self.sink.send(request, d.idempotency_key)
            except Exception as exc:  # read like a source's error: never a lost event
                outcome = outcome_of(exc, "connector error")
            if scrub is not None:  # what the remote echoed of the opened values is not stored
                outcome.excerpt, outcome.error = scrub(outcome.excerpt), scrub(outcome.error)
                outcome.fields = scrub(outcome.fields)
            self._check_answer(d, outcome)
        if not outcome.latency_ms:  # every attempt records how long it took, even one that raised
            outcome.latency_ms = round((time.perf_counter() - t0) * 1000, 2)
        self._row(rows, d, outcome, started, "")
        return rows

    async def _finish(self, rows: list[AttemptRow]) -> None:
        """Record the attempts' rows in one store operation (with this tick's other results), then what
        follows each; what the store cannot write is held, its deliveries still claimed."""
        try:
            await self._record_many([r[3] for r in rows])
        except StoreUnavailable as exc:
            for d, outcome, decision, result in rows:
                self._hold(d, outcome, decision, result, exc)
            return
        for d, outcome, decision, _ in rows:
            await self._recorded_one(d, outcome, decision)

    def _check_answer(self, d: DueDelivery, outcome: Outcome) -> None:
        """A success's answer against the flow's response contract; the drift goes into the attempt's note."""
        if self.on_answer is not None and outcome.cls is OutcomeClass.SUCCESS:
            try:
                outcome.drift = self.on_answer(d.event_id, outcome)
            except Exception:  # a contract check never fails a delivery
                log.exception("checking the answer of %s/%s against its contract", self.flow, self.name)
        outcome.body = None  # never kept past here

    async def _recorded_one(self, d: DueDelivery, outcome: Outcome, decision: Decision) -> None:
        """What follows an attempt once its result is on disk: logs, the retry's rescan, a pause."""
        if decision.status == "pending" and decision.next_at is not None:
            self._rescan_at = min(self._rescan_at, decision.next_at)  # the retry is behind the cursor
            self._retry_at = min(self._retry_at, decision.next_at)
        if decision.status == "dead":
            log.warning(
                "dead letter: %s -> %s/%s: %s",
                d.event_id,
                self.flow,
                self.name,
                decision.reason,
                extra={"event_id": d.event_id, "flow": self.flow, "destination": self.name},
            )
        elif decision.consumed_retry:
            log.info(
                "retry: %s -> %s/%s: %s; %s",
                d.event_id,
                self.flow,
                self.name,
                outcome.summary,
                decision.reason,
            )
        if decision.destination_state and self.state == "active":
            self.set_state(decision.destination_state)
            if self.on_state:
                await self.on_state(self.flow, self.name, decision.destination_state, outcome.summary)

    async def _record(self, result: AttemptResult) -> None:
        """Record an attempt durably; the results of one loop tick share one store operation."""
        self._results.append(result)
        if self._recorded is None:
            loop = asyncio.get_running_loop()
            self._recorded = loop.create_future()
            loop.call_soon(self._flush)
        await asyncio.shield(self._recorded)  # a cancelled worker must not cancel the others' wait

    def _flush(self) -> None:
        results, self._results = self._results, []
        done, self._recorded = self._recorded, None
        task = asyncio.ensure_future(self._store_record(results))

        def settle(t: asyncio.Future[None]) -> None:
            if done is None or done.done():
                return
            if t.cancelled():
                done.cancel()
            elif t.exception() is not None:
                done.set_exception(t.exception())  # type: ignore[arg-type]
            else:
                done.set_result(None)

        task.add_done_callback(settle)

    async def _store_record(self, results: list[AttemptResult]) -> None:
        """Where attempt results are written (a call's worker also continues its runs: engine/calls.py)."""
        await self.store.record(results)

    def _hold(
        self, d: DueDelivery, outcome: Outcome, decision: Decision, result: AttemptResult, exc: Exception
    ) -> None:
        if not self._held:
            log.warning(
                "delivery to %s/%s waits: the result of an attempt could not be recorded (%s);"
                " recording it again every %gs, nothing is sent meanwhile",
                self.flow,
                self.name,
                getattr(exc, "condition", exc),
                self.record_retry_s,
            )
        self._held.append((d, outcome, decision, result))
        self._recordable.clear()
        if self._rerecord is None or self._rerecord.done():
            self._rerecord = asyncio.create_task(self._record_held(), name=f"record {self.flow}/{self.name}")

    async def _record_held(self) -> None:
        """Record held results until the store takes them; then release their deliveries and send again."""
        while self._held:
            await asyncio.sleep(self.record_retry_s)
            held = list(self._held)
            try:
                await self._store_record([h[3] for h in held])
            except StoreUnavailable:
                continue
            except Exception:
                log.exception("recording held attempt results of %s/%s", self.flow, self.name)
                continue
            del self._held[: len(held)]
            for d, outcome, decision, _ in held:
                self.leased.discard(d.id)
                try:
                    await self._recorded_one(d, outcome, decision)
                except Exception:
                    log.exception("after recording %s to %s/%s", d.event_id, self.flow, self.name)
        log.info("delivery to %s/%s goes on: held results are recorded", self.flow, self.name)
        self._recordable.set()
        self.wake.set()

    # -------------------------------------------------------------- batches
    async def _take_batch(self) -> list[DueDelivery]:
        assert self.batch is not None
        members = [await self.queue.get()]
        deadline = time.monotonic() + self.batch.max_wait
        while len(members) < self.batch.max_records and not self._stopping:
            self._running_low()
            try:
                members.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                members.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return members

    async def _send_members(self, members: list[DueDelivery], rows: list[AttemptRow]) -> None:
        """A batch: send the members (splitting or re-sending as their outcomes ask), a row each in `rows`."""
        ready: list[tuple[DueDelivery, dict[str, Any], Any]] = []
        for d in members:
            try:
                request, scrub = self.open_request(d.request) if self.open_request else (d.request, None)
            except PatchbayError as exc:  # a sealed value that cannot be opened fails the same way every time
                self._row(rows, d, Outcome(OutcomeClass.TERMINAL, error=str(exc)), time.time(), "")
                continue
            ready.append((d, request, scrub))
        assert self.batch is not None
        depth = math.ceil(math.log2(max(2, self.batch.max_records))) + 2
        if ready:
            await self._send_batch(ready, rows, depth)

    async def _send_batch(
        self,
        group: list[tuple[DueDelivery, dict[str, Any], Any]],
        rows: list[AttemptRow],
        depth: int,
    ) -> None:
        """One request for `group`; members the answer refused as a whole are split into halves, members
        refused for others' sake are sent again without them, while `depth` lasts."""
        keys = [d.idempotency_key for d, _, _ in group]
        if self.bucket is not None:
            await self.bucket.wait()
        started = time.time()
        t0 = time.perf_counter()
        try:
            outcomes = await self.sink.send_batch([r for _, r, _ in group], keys)  # type: ignore[attr-defined]
        except Exception as exc:  # read like a source's error: never a lost event
            outcomes = [outcome_of(exc, "connector error") for _ in group]
        if len(outcomes) != len(group):
            error = f"connector error: {len(outcomes)} outcomes for a batch of {len(group)}"
            outcomes = [Outcome(OutcomeClass.TRANSIENT, error=error) for _ in group]
        ms = round((time.perf_counter() - t0) * 1000, 2)
        bid = batch_key(keys)[6:14]
        split: list[tuple[DueDelivery, dict[str, Any], Any]] = []
        again: list[tuple[DueDelivery, dict[str, Any], Any]] = []
        # One answer speaks of every member: what any of them revealed is scrubbed from all of them.
        scrubs = [scrub for _, _, scrub in group if scrub is not None]
        for i, ((d, request, scrub_one), outcome) in enumerate(zip(group, outcomes, strict=True)):
            for scrub in scrubs:
                outcome.excerpt, outcome.error = scrub(outcome.excerpt), scrub(outcome.error)
                outcome.fields = scrub(outcome.fields)
            if not outcome.latency_ms:
                outcome.latency_ms = ms
            self._check_answer(d, outcome)
            where = f"batch {bid} ({i + 1} of {len(group)})"
            if (outcome.split and len(group) > 1 or outcome.resend) and depth > 0:
                then = "split into halves to find the refused record" if outcome.split else "sent again"
                self._row(rows, d, outcome, started, where, Decision("pending", reason=then))
                (split if outcome.split else again).append((d, request, scrub_one))
                continue
            if outcome.resend:  # out of depth: a normal retry later
                outcome.cls = OutcomeClass.TRANSIENT
            self._row(rows, d, outcome, started, where)
        if split:
            half = len(split) // 2
            await self._send_batch(split[:half], rows, depth - 1)
            await self._send_batch(split[half:], rows, depth - 1)
        if again:
            await self._send_batch(again, rows, depth - 1)

    def _row(
        self,
        rows: list[AttemptRow],
        d: DueDelivery,
        outcome: Outcome,
        started: float,
        where: str,
        decision: Decision | None = None,
    ) -> None:
        """A member's attempt row: `decision` given for a step on the way (split, sent again), else decided."""
        if decision is None:
            decision = decide(outcome, d.retries, self.policy, time.time(), self.rng)
        if self.on_attempt:
            self.on_attempt(self.flow, self.name, outcome)
        note = attempt_note(outcome, decision)
        result = AttemptResult(
            d.id,
            d.event_id,
            started,
            outcome.latency_ms,
            outcome.status_code,
            outcome.cls.value,
            outcome.excerpt,
            f"{where}: {note}" if where and note else where or note,
            decision.status,
            decision.next_at,
            decision.consumed_retry,
            outcome.fields if outcome.cls is OutcomeClass.SUCCESS else None,
        )
        rows.append((d, outcome, decision, result))

    async def _record_many(self, results: list[AttemptResult]) -> None:
        """Record several attempt rows in the same store operation as this tick's other results."""
        if not results:
            return
        last = results.pop()
        self._results.extend(results)
        await self._record(last)


class SharedBucket:
    """A destination's `rate_limit_per_s` for every worker at once: tokens come from the store's one bucket
    for the destination (bursts up to one second's worth, at least 1), taken in grants of a tenth of a
    second's worth; a grant unspent after GRANT_S is dropped, so the bucket's bound holds within GRANT_S."""

    GRANT_S = 0.2

    def __init__(self, store: Store, flow: str, destination: str, rate: float) -> None:
        self.store, self.flow, self.destination = store, flow, destination
        self.rate = rate
        self.burst = max(1.0, rate)
        self.grant = max(1, int(rate * 0.1))
        self.tokens = 0
        self.expires = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        """Take a token, waiting until the destination's bucket has one (senders take them in turn)."""
        async with self._lock:
            while True:
                if self.tokens > 0 and time.monotonic() < self.expires:
                    self.tokens -= 1
                    return
                granted, wait = await self.store.take_tokens(
                    self.flow, self.destination, self.rate, self.burst, self.grant, time.time()
                )
                if granted:
                    self.tokens, self.expires = granted, time.monotonic() + self.GRANT_S
                else:
                    await asyncio.sleep(min(1.0, max(0.002, wait)))


def attempt_note(outcome: Outcome, decision: Decision) -> str:
    """An attempt row's note: what went wrong and what follows ("timed out after 10s; retry in 4.7s").
    The decision's reason alone when it already says what went wrong ("gave up after 5 attempts: …")."""
    what, then = outcome.error, decision.reason
    if outcome.drift:  # a success whose answer differs from the flow's response contract
        shown = outcome.drift[:5] + ([f"and {len(outcome.drift) - 5} more"] if len(outcome.drift) > 5 else [])
        what = "; ".join(x for x in (what, "DRIFT " + "; ".join(shown)) if x)
    if not what or (then and what in then):
        return then or what
    return f"{what}; {then}" if then else what
