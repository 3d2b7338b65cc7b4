"""Sync flows: records of an entity linked in the identity map and written to the other systems.

A flow with `sync: ENTITY` hands its records here instead of to its destinations' plain routing. One
step (a webhook's record, or a poll's batch) runs under the entity's lock: read the identity map,
apply each record (engine/identity.py), plan what every system should receive, render one operation per
destination of that system (`op`, `id`, `fields`, `record`), and commit the events, their deliveries,
the identity changes and the source cursor in ONE store transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from patchbay.config.entities import EntitySpec, flow_origin
from patchbay.config.specs import FlowSpec
from patchbay.connectors.base import Batch
from patchbay.engine.identity import MISSING, Applied, Incoming, Op, Session, read_record
from patchbay.engine.leader import current_fence
from patchbay.engine.pipeline import order_key_of
from patchbay.errors import RecordInvalid, TerminalError
from patchbay.expressions import is_truthy
from patchbay.processors.base import Dropped
from patchbay.records import new_id
from patchbay.store.base import (
    Accepted,
    Actor,
    Identity,
    IdentityLookup,
    NewConflict,
    NewDelivery,
    NewEvent,
    NewReview,
    Store,
)
from patchbay.store.identity import q_identities
from patchbay.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from patchbay.engine.pipeline import Pipeline

log = logging.getLogger("patchbay.sync")


@dataclass
class Item:
    payload: bytes
    record: Any
    dedupe_key: str | None


@dataclass
class Preview:
    """What a first run would do: link N records to identities found in another system, create M
    records, K conflicts, R records for review."""

    entity: str
    records: dict[str, int] = field(default_factory=dict)  # read per system
    identities: int = 0
    linked: int = 0  # records matched to an identity another system's record made
    creates: dict[str, int] = field(default_factory=dict)  # per system
    updates: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0
    reviews: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "records": self.records,
            "identities": self.identities,
            "link": self.linked,
            "create": self.creates,
            "update": self.updates,
            "conflicts": self.conflicts,
            "review": self.reviews,
        }

    def summary(self) -> str:
        return (
            f"{self.entity}: would link {self.linked}, create {sum(self.creates.values())}, "
            f"update {sum(self.updates.values())}, conflicts {self.conflicts}, review {self.reviews} "
            f"({self.identities} identities from {sum(self.records.values())} records)"
        )


class EntitySync:
    """One entity's sync: every sync flow of the entity goes through its lock, so that each step reads
    the identity map as the previous step left it: an asyncio lock in this process, and the store's
    `entity_lock` across the processes sharing the store (PostgreSQL)."""

    def __init__(self, ent: EntitySpec, store: Store) -> None:
        self.ent = ent
        self.store = store
        self.lock = asyncio.Lock()

    async def step(
        self,
        flow: FlowSpec,
        pipeline: Pipeline,
        items: list[Item],
        meta: dict[str, Any] | None = None,
        cursor: Any = None,
    ) -> tuple[list[NewEvent], list[Accepted]]:
        """Apply a trigger's records (a webhook's one, a poll's batch) and commit them with their writes."""
        origin = flow_origin(flow)
        assert origin is not None
        async with self.lock, self.store.entity_lock(self.ent.name):
            now = time.time()
            prepared = [(it, *self._steps(pipeline, it.record)) for it in items]
            incs = [read_record(self.ent, origin, rec) for _, rec, _, _ in prepared if rec is not None]
            if any(i.deleted for i in incs):  # the guard counts the entity only when there are deletes
                since = now - self.ent.doc.deletes.window
                self._guard_deletes(incs, await self.store.identity_stats(self.ent.name, since))
            session = await self._session(incs, now)
            events = []
            for it, rec, trace, refused in prepared:
                event_id = new_id()
                if refused is not None:
                    events.append(self._event(flow, it, event_id, now, *refused, trace, [], meta))
                    continue
                inc = read_record(self.ent, origin, rec)
                applied = session.apply(inc, event_id)
                deliveries, writes = self._render(flow, pipeline, session, applied, event_id)
                trace.append(_trace(applied, writes))
                status = "pending" if deliveries else "filtered"
                reason = None if deliveries else _why_nothing(applied)
                events.append(
                    self._event(flow, it, event_id, now, status, reason, trace, deliveries, meta, inc.values)
                )
            accepted = await self.store.accept_synced(  # a source's commit: fenced by its lease, if any
                events,
                session.finish(),
                {flow.name: cursor} if cursor is not None else None,
                fence=current_fence(),
            )
        return events, accepted

    # -------------------------------------------------------------- parts of a step
    def _steps(
        self, pipeline: Pipeline, record: Any
    ) -> tuple[Any, list[dict[str, Any]], tuple[str, str] | None]:
        """The flow's own steps (map, validate, filter) before the identity map."""
        trace: list[dict[str, Any]] = []
        for spec in pipeline.flow.steps:
            if spec.when is not None and not is_truthy(spec.when.search(record)):
                trace.append({"step": spec.name, "kind": spec.kind, "skipped": True})
                continue
            try:
                record = spec.step.apply(record)
            except RecordInvalid as exc:
                reasons = [str(v) for v in exc.violations]
                trace.append({"step": spec.name, "kind": spec.kind, "error": reasons})
                return None, trace, ("quarantined", f"{spec.name}: " + "; ".join(reasons))
            except Dropped as exc:
                trace.append({"step": spec.name, "kind": spec.kind, "dropped": str(exc)})
                return None, trace, ("filtered", str(exc))
            trace.append({"step": spec.name, "kind": spec.kind, "output": pipeline.redact(record)})
        return record, trace, None

    def _guard_deletes(self, incs: list[Incoming], stats: dict[str, Any]) -> None:
        """Refuse a batch that brings the deletes of the last `deletes.window` over `max_share` of the
        entity: a mass delete read in many batches stops once it passes the share, not batch by batch.
        (A batch's deletes of records already deleted count too: the guard errs on the side of stopping.)"""
        d = self.ent.doc.deletes
        deletes = sum(1 for i in incs if i.deleted)
        recent = int(stats.get("closed_since", 0))
        total = int(stats.get("status", {}).get("active", 0)) + recent  # as it was when the window began
        if deletes and total >= d.min_identities and deletes + recent > d.max_share * total:
            within = f", with {recent} deleted within the last {_span(d.window)}" if recent else ""
            raise TerminalError(
                f"syncing {self.ent.name}: this batch would delete {deletes} of {total} identities"
                f"{within} ({(deletes + recent) / total:.0%}, more than deletes.max_share "
                f"{d.max_share:.0%}); nothing of it was applied. Check the source, then raise max_share "
                "or resume the flow"
            )

    async def _session(self, incs: list[Incoming], now: float) -> Session:
        session_keys: list[tuple[str, str]] = []
        links = [(i.system, i.record_id) for i in incs if i.record_id is not None]
        probe = Session(self.ent, IdentityLookup(), now)
        for inc in incs:
            session_keys += probe.keys_of(inc)
        lookup = await self.store.identity_lookup(self.ent.name, links, session_keys)
        session = Session(self.ent, lookup, now)
        await self._collect_created_ids(session, list(lookup.identities.values()))
        return session

    async def _collect_created_ids(self, session: Session, identities: list[Identity]) -> None:
        """Creates that succeeded since: the id their destination kept (`response: {id: ...}`)."""
        for ident in identities:
            for system, view in list(ident.systems.items()):
                pending = view.get("pending")
                if view.get("id") is not None or not pending:
                    continue
                fields = await self.store.response_fields(pending["event"], pending["destination"])
                rid = (fields or {}).get("id")
                if rid is not None:
                    session.link_created(ident, system, str(rid))

    def _render(
        self,
        flow: FlowSpec,
        pipeline: Pipeline,
        session: Session,
        applied: Applied,
        event_id: str,
        include_owned: frozenset[str] = frozenset(),
        targets: set[str] | None = None,
    ) -> tuple[list[NewDelivery], list[dict[str, Any]]]:
        ident = applied.identity
        if ident is None or applied.action == "ignored":
            return [], []
        systems = {d.system for d in flow.destinations}
        if targets is not None:
            systems &= targets
        deliveries: list[NewDelivery] = []
        writes: list[dict[str, Any]] = []
        for op in session.plan(ident, systems, include_owned):
            rendered = self._deliveries(flow, pipeline, op, ident, event_id)
            if not rendered:
                continue
            session.wrote(ident, op, event_id, rendered[0].destination)
            deliveries += rendered
            writes.append({"system": op.system, "op": op.op, "id": op.id, "fields": sorted(op.values)})
        return deliveries, writes

    def _deliveries(
        self, flow: FlowSpec, pipeline: Pipeline, op: Op, ident: Identity, event_id: str
    ) -> list[NewDelivery]:
        record = op.as_record(self.ent, ident)
        out = []
        for dest in flow.destinations:
            if dest.system != op.system:
                continue
            if dest.when is not None and not is_truthy(dest.when.search(record)):
                continue
            key = f"{event_id}.{dest.name}"
            request = pipeline.sinks[dest.name].render(record, key)
            out.append(NewDelivery(dest.name, request, key, order_key=order_key_of(dest, record)))
        return out

    def _event(
        self,
        flow: FlowSpec,
        it: Item,
        event_id: str,
        now: float,
        status: str,
        reason: str | None,
        trace: list[dict[str, Any]],
        deliveries: list[NewDelivery],
        meta: dict[str, Any] | None,
        values: dict[str, Any] | None = None,
    ) -> NewEvent:
        key = None
        if values is not None and self.ent.doc.match:
            first = self.ent.doc.match[0]
            v = values.get(first.names[0])
            key = None if v is None else str(v)
        return NewEvent(
            id=event_id,
            flow=flow.name,
            received_at=now,
            payload=it.payload,
            body_hash=hashlib.sha256(it.payload).hexdigest(),
            dedupe_key=it.dedupe_key,
            status=status,
            record_key=key,
            meta=meta or {},
            trace=trace,
            reason=reason,
            deliveries=deliveries,
        )

    # -------------------------------------------------------------- creates not linked in time
    async def sweep_pending(self, now: float | None = None, limit: int = 500) -> dict[str, int]:
        """Creates still unlinked `read_back_within` after they were sent (or last checked): link those
        whose answer now holds the id; flag the others overdue (once, with a warning) and look again a
        period later. Never waits silently: the flag is in the identity, its stats and the log."""
        now = time.time() if now is None else now
        bound = self.ent.doc.read_back_within
        out = {"linked": 0, "overdue": 0}
        rows = await self.store.pending_creates(self.ent.name, now - bound, limit)
        if not rows:
            return out
        async with self.lock, self.store.entity_lock(self.ent.name):
            lookup = IdentityLookup()
            for r in rows:
                ident = await self.store.identity(r["identity_id"])
                if ident is not None:
                    lookup.identities[ident.id] = ident
            session = Session(self.ent, lookup, now)
            for r in rows:
                ident = lookup.identities.get(r["identity_id"])
                view = None if ident is None else ident.systems.get(r["system"])
                pending = None if view is None else view.get("pending")
                if ident is None or view is None or view.get("id") is not None or not pending:
                    continue
                fields = await self.store.response_fields(pending["event"], pending["destination"])
                rid = (fields or {}).get("id")
                if rid is not None:
                    session.link_created(ident, r["system"], str(rid))
                    out["linked"] += 1
                    continue
                pending["checked"] = now
                if not pending.get("overdue"):
                    pending["overdue"] = now
                    out["overdue"] += 1
                    log.warning(
                        "sync %s: identity %s was created in %s %.0fs ago (run %s) and is still not linked: "
                        "the answer had no id and the record was not read back. Check that %s's source "
                        "reads it (a SQL source needs `lookback` above its writers' longest transaction), "
                        "then `patchbay identities show %s %s`",
                        self.ent.name,
                        ident.id,
                        r["system"],
                        now - float(pending.get("at") or now),
                        pending["event"],
                        r["system"],
                        self.ent.name,
                        ident.id,
                    )
                session.touch(ident)
            await self.store.accept_synced([], session.finish())
        return out

    # -------------------------------------------------------------- a person's decisions
    async def resolve_conflict(
        self,
        conflict_id: int,
        flows: list[tuple[FlowSpec, Pipeline]],
        by: Actor,
        value: Any = MISSING,
        take: str | None = None,
    ) -> dict[str, Any]:
        """Settle a conflict with a value (given, or the one `take` system had); written to every system
        that differs, its owner too, through the entity's sync flows. LookupError/ValueError when it cannot."""
        async with self.lock, self.store.entity_lock(self.ent.name):
            c = await self.store.conflict(conflict_id)
            if c is None or c["entity"] != self.ent.name:
                raise LookupError(f"no conflict {conflict_id} of entity {self.ent.name}")
            if c["status"] == "resolved":
                raise ValueError(f"conflict {conflict_id} was already resolved: {c['resolution']}")
            if take is not None:
                found = [v for v in c["values"] if v["system"] == take]
                if not found:
                    systems = ", ".join(v["system"] for v in c["values"])
                    raise ValueError(f"conflict {conflict_id} has no value from {take!r} (it has: {systems})")
                value = found[-1]["value"]
            if value is MISSING:
                raise ValueError("give the value to keep (--value) or the system whose value wins (--take)")
            ident = await self.store.identity(c["identity_id"])
            if ident is None:
                raise LookupError(f"identity {c['identity_id']} is gone")
            now = time.time()
            session = Session(self.ent, IdentityLookup(identities={ident.id: ident}), now)
            session.resolve(ident, c["field"], value, by.name)
            how = {"field": c["field"], "value": value, "by": by.name}
            events = self._writes_everywhere(session, ident, flows, how, now, frozenset({c["field"]}))
            changes = session.finish()
            changes.resolve_conflicts.append((conflict_id, "resolved", how))
            changes.by = by
            await self.store.accept_synced(events, changes)
            return {
                "conflict": conflict_id,
                "identity": ident.id,
                "value": value,
                "runs": [e.id for e in events],
            }

    async def resolve_review(
        self,
        review_id: int,
        flows: list[tuple[FlowSpec, Pipeline]],
        by: Actor,
        link_to: str | None = None,
        new: bool = False,
        dismiss: bool = False,
    ) -> dict[str, Any]:
        """Decide a review: link the record to identity `link_to`, make it a new identity, or dismiss it."""
        async with self.lock, self.store.entity_lock(self.ent.name):
            r = await self.store.review(review_id)
            if r is None or r["entity"] != self.ent.name:
                raise LookupError(f"no review {review_id} of entity {self.ent.name}")
            if r["status"] != "open":
                raise ValueError(f"review {review_id} was already decided: {r['status']}")
            if sum([link_to is not None, new, dismiss]) != 1:
                raise ValueError("decide one way: --link IDENTITY, --new or --dismiss")
            now = time.time()
            session = Session(self.ent, IdentityLookup(), now)
            events: list[NewEvent] = []
            if dismiss:
                how: dict[str, Any] = {"decision": "dismissed", "by": by.name}
            else:
                into = None
                if link_to is not None:
                    into = await self.store.identity(link_to)
                    if into is None or into.entity != self.ent.name:
                        raise LookupError(f"no identity {link_to} of entity {self.ent.name}")
                    session.identities[into.id] = into
                inc = Incoming(r["system"], r["record_id"], r["values"])
                applied = session.apply(inc, None, into=into, new=new)
                assert applied.identity is not None
                how = {
                    "decision": "linked" if into else "new",
                    "identity": applied.identity.id,
                    "by": by.name,
                }
                events = self._writes_everywhere(session, applied.identity, flows, how, now, frozenset())
            changes = session.finish()
            changes.resolve_reviews.append((review_id, str(how["decision"]), how))
            changes.by = by
            await self.store.accept_synced(events, changes)
            return {"review": review_id, **how, "runs": [e.id for e in events]}

    def _writes_everywhere(
        self,
        session: Session,
        ident: Identity,
        flows: list[tuple[FlowSpec, Pipeline]],
        why: dict[str, Any],
        now: float,
        include_owned: frozenset[str],
    ) -> list[NewEvent]:
        """One event per sync flow that has something to write for `ident`, each system written once."""
        events = []
        done: set[str] = set()
        payload = orjson.dumps({"entity": self.ent.name, "identity": ident.id, **why}, default=str)
        for flow, pipeline in flows:
            targets = {d.system for d in flow.destinations} - done
            if not targets:
                continue
            event_id = new_id()
            applied = Applied(ident, "decided")
            deliveries, writes = self._render(
                flow, pipeline, session, applied, event_id, include_owned, targets
            )
            done |= targets
            if deliveries:
                trace = [{"step": "identity", "kind": "sync", "action": "decided", **why, "writes": writes}]
                events.append(
                    self._event(
                        flow,
                        Item(payload, None, None),
                        event_id,
                        now,
                        "pending",
                        None,
                        trace,
                        deliveries,
                        None,
                    )
                )
        return events

    # -------------------------------------------------------------- first run
    async def first_run(self, reads: list[FirstRead], *, dry_run: bool, chunk: int = 1000) -> Preview:
        """Link every system's existing records before anything is written, then write what is missing.

        Memory stays bounded whatever the systems hold: each system is read page by page (`reads`: its
        sync flow, pipeline and poll source); a page is linked against the identity map built so far,
        kept in a scratch store (a temporary file, in $TMPDIR) and looked up together with the real
        store, so a record is matched by its keys through a store, never held. Then the identities the
        run touched are read back in chunks of `chunk` and their writes planned; each chunk (identities,
        their conflicts, events with their deliveries) is one transaction of the real store, the last
        with the reviews, the sources' cursors and the mark that the first run is done (a run killed
        before it runs again at the next start: linking is idempotent and a create in flight is never
        sent twice). With `dry_run` nothing is written: the preview says what would happen, exactly as
        the run would do it."""
        async with self.lock, self.store.entity_lock(self.ent.name):
            now = time.time()
            prev = Preview(self.ent.name)
            with tempfile.TemporaryDirectory(prefix="patchbay-first-run-") as d:
                scratch = SqliteStore(Path(d) / "first_run.db", check=False)
                try:
                    layered = _Layered(scratch, self.store)
                    t0 = time.perf_counter()
                    touched, conflicts, reviews = await self._first_link(reads, layered, now, prev)
                    t1 = time.perf_counter()
                    await self._first_write(
                        reads, layered, touched, conflicts, reviews, now, prev, dry_run, chunk
                    )
                    log.info(
                        "first run of %s: %d records read and linked in %.1f s, %d identities %s in %.1f s",
                        self.ent.name,
                        sum(prev.records.values()),
                        t1 - t0,
                        len(touched),
                        "planned" if dry_run else "written",
                        time.perf_counter() - t1,
                    )
                finally:
                    await scratch.close()
            return prev

    async def _first_link(
        self, reads: list[FirstRead], layered: _Layered, now: float, prev: Preview
    ) -> tuple[dict[str, tuple[str, str | None]], list[NewConflict], list[NewReview]]:
        """Phase 1: link each page of each system into the scratch map. Returns the identities touched (id ->
        the system and record that first touched it: its event's origin), conflicts and reviews."""
        touched: dict[str, tuple[str, str | None]] = {}
        conflicts: list[NewConflict] = []
        reviews: list[NewReview] = []
        for read in reads:
            system = read.flow.source.system if read.flow.source is not None else read.flow.name
            prev.records.setdefault(system, 0)
            cursor = None
            batches: AsyncIterator[Batch] = read.source.poll(None)
            async for batch in batches:
                if batch.cursor is not None:
                    cursor = batch.cursor
                prev.records[system] += len(batch.records)
                incs = []
                for r in batch.records:
                    rec, _, refused = self._steps(read.pipeline, r.data)
                    if refused is None:
                        incs.append(read_record(self.ent, system, rec))
                if not incs:
                    continue
                session = await self._lookup(layered, incs, now)
                for inc in incs:
                    known = session.find(inc)[1] in ("link", "match")
                    applied = session.apply(inc, None)
                    if applied.identity is None:
                        prev.reviews += applied.action == "review"
                        continue
                    if known and applied.action in ("linked", "unchanged", "updated"):
                        prev.linked += 1
                    prev.conflicts += len(applied.conflicts)
                    touched.setdefault(applied.identity.id, (system, inc.record_id))
                changes = session.finish()
                conflicts += changes.conflicts
                reviews += changes.reviews
                changes.conflicts, changes.reviews = [], []
                await layered.scratch.accept_synced([], changes)
            read.cursor = cursor
        return touched, conflicts, reviews

    async def _first_write(
        self,
        reads: list[FirstRead],
        layered: _Layered,
        touched: dict[str, tuple[str, str | None]],
        conflicts: list[NewConflict],
        reviews: list[NewReview],
        now: float,
        prev: Preview,
        dry_run: bool,
        chunk: int,
    ) -> None:
        """Phase 2: the touched identities, a chunk at a time: plan their writes, commit them with the
        identities to the real store (unless `dry_run`)."""
        by_system = {r.flow.source.system: r for r in reads if r.flow.source is not None}
        ids = list(touched)
        prev.identities = len(ids)
        cursors = {r.flow.name: r.cursor for r in reads if r.cursor is not None}
        for start in range(0, max(len(ids), 1), chunk):
            part = ids[start : start + chunk]
            last = start + chunk >= len(ids)
            docs = await layered.identities(part)
            session = Session(self.ent, IdentityLookup(identities=docs), now)
            events: list[NewEvent] = []
            for iid in part:
                ident = docs.get(iid)
                if ident is None:
                    continue
                system, record_id = touched[iid]
                read = by_system[system]
                event_id = new_id()
                deliveries, writes = self._render(
                    read.flow, read.pipeline, session, Applied(ident, "first run"), event_id
                )
                for w in writes:
                    bucket = prev.creates if w["op"] == "create" else prev.updates
                    bucket[w["system"]] = bucket.get(w["system"], 0) + 1
                if dry_run:
                    continue
                payload = orjson.dumps(
                    {
                        "entity": self.ent.name,
                        "identity": iid,
                        "first_run": True,
                        "system": system,
                        "id": record_id,
                    }
                )
                events.append(
                    self._event(
                        read.flow,
                        Item(payload, None, None),
                        event_id,
                        now,
                        "pending" if deliveries else "filtered",
                        None if deliveries else "first run: nothing to write",
                        [{"step": "identity", "kind": "sync", "first_run": True, "writes": writes}],
                        deliveries,
                        None,
                        {f: g.get("value") for f, g in ident.golden.items()},
                    )
                )
            if dry_run:
                continue
            changes = session.finish()
            changes.identities = [docs[i] for i in part if i in docs]  # every one: the map moves over whole
            # Conflicts go with their identities (a run killed later finds no conflict again in what it
            # wrote); reviews, of records no identity holds, with the last chunk.
            mine = set(part)
            changes.conflicts = [c for c in conflicts if c.identity_id in mine]
            if last:
                changes.reviews = reviews
            marks = {first_run_mark(self.ent.name): {"state": "done" if last else "writing", "at": now}}
            await self.store.accept_synced(
                events, changes, {**marks, **(cursors if last else {})}, fence=current_fence()
            )

    async def _lookup(self, layered: _Layered, incs: list[Incoming], now: float) -> Session:
        links = [(i.system, i.record_id) for i in incs if i.record_id is not None]
        probe = Session(self.ent, IdentityLookup(), now)
        keys = [k for inc in incs for k in probe.keys_of(inc)]
        return Session(self.ent, await layered.lookup(self.ent.name, links, keys), now)


@dataclass
class FirstRead:
    """One polled system of an entity, for its first run: its sync flow, that flow's pipeline, its source."""

    flow: FlowSpec
    pipeline: Pipeline
    source: Any
    cursor: Any = None  # after the run: the cursor after every record read


def first_run_mark(entity: str) -> str:
    """The cursor row that says how far an entity's first run got: `writing` (run it again), `done`."""
    return f"_first_run:{entity}"


class _Layered:
    """The identity map a first run builds: its own scratch store over the real one (read only)."""

    def __init__(self, scratch: SqliteStore, real: Store) -> None:
        self.scratch = scratch
        self.real = real

    async def lookup(
        self, entity: str, links: list[tuple[str, str]], keys: list[tuple[str, str]]
    ) -> IdentityLookup:
        a = await self.scratch.identity_lookup(entity, links, keys)
        b = await self.real.identity_lookup(entity, links, keys)
        out = IdentityLookup(
            by_link={**b.by_link, **a.by_link},
            identities={**b.identities, **a.identities},
            open_reviews={**b.open_reviews, **a.open_reviews},
        )
        for k in set(a.by_key) | set(b.by_key):
            out.by_key[k] = list(dict.fromkeys(b.by_key.get(k, []) + a.by_key.get(k, [])))
        return out

    async def identities(self, ids: list[str]) -> dict[str, Identity]:
        found = await self.scratch.read(q_identities, ids)
        for iid in ids:
            if iid not in found:
                ident = await self.real.identity(iid)
                if ident is not None:
                    found[iid] = ident
        return found


def sync_flows(flows: dict[str, FlowSpec], entity: str) -> list[FlowSpec]:
    """The enabled sync flows of `entity`, by name."""
    return [f for _, f in sorted(flows.items()) if f.sync == entity and f.enabled]


async def first_run(
    sync: EntitySync,
    flows: list[FlowSpec],
    pipeline_of: Callable[[FlowSpec], Pipeline],
    source_of: Callable[[FlowSpec], Any],
    *,
    dry_run: bool,
) -> Preview:
    """Read every record of each polled system of the entity (from the start), page by page, and link them
    all before anything is written (`EntitySync.first_run`). Systems fed only by webhooks or brokers are
    not read."""
    reads: list[FirstRead] = []
    try:
        for flow in flows:
            if flow.source is None or flow.source.mode != "poll":
                continue
            reads.append(FirstRead(flow, pipeline_of(flow), source_of(flow)))
        return await sync.first_run(reads, dry_run=dry_run)
    finally:
        for r in reads:
            await r.source.close()


async def first_run_needed(store: Store, entity: str) -> bool:
    """An entity whose identity map is empty, or whose first run was killed while writing."""
    mark = await store.cursor(first_run_mark(entity))
    if isinstance(mark, dict) and mark.get("state") == "writing":
        return True
    return not (await store.identity_stats(entity))["identities"]


def _span(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


def _trace(applied: Applied, writes: list[dict[str, Any]]) -> dict[str, Any]:
    step: dict[str, Any] = {"step": "identity", "kind": "sync", "action": applied.action}
    if applied.identity is not None:
        step["identity"] = applied.identity.id
    if applied.reason:
        step["reason"] = applied.reason
    if applied.changed:
        step["changed"] = applied.changed
    if applied.conflicts:
        step["conflicts"] = [
            {"field": c.field, "kind": c.kind, "winner": c.winner, "rule": c.rule} for c in applied.conflicts
        ]
    step["writes"] = writes
    return step


def _why_nothing(applied: Applied) -> str:
    if applied.action == "review":
        return f"in the review queue: {applied.reason}"
    if applied.action == "ignored":
        return applied.reason
    if applied.action == "unchanged":
        return "no change: every system already holds these values (an echo of the hub's own write, or a re-read)"
    return f"{applied.action}: nothing to write"
