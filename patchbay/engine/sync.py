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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
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
from patchbay.store.base import Accepted, Actor, Identity, IdentityLookup, NewDelivery, NewEvent, Store

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
                self._guard_deletes(incs, await self.store.identity_stats(self.ent.name))
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
        d = self.ent.doc.deletes
        deletes = sum(1 for i in incs if i.deleted)
        total = int(stats.get("status", {}).get("active", 0))
        if deletes and total >= d.min_identities and deletes > d.max_share * total:
            raise TerminalError(
                f"syncing {self.ent.name}: this batch would delete {deletes} of {total} identities "
                f"({deletes / total:.0%}, more than deletes.max_share {d.max_share:.0%}); nothing was "
                "applied. Check the source, then raise max_share or resume the flow"
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
    async def first_run(
        self, reads: dict[str, tuple[FlowSpec, Pipeline, list[Item], Any]], *, dry_run: bool
    ) -> Preview:
        """Link every system's existing records before anything is written, then write what is missing.

        `reads`: system -> (its sync flow, that flow's pipeline, every record it holds, the cursor after
        them). With `dry_run`, nothing is written: the preview says what would happen."""
        async with self.lock, self.store.entity_lock(self.ent.name):
            now = time.time()
            prev = Preview(self.ent.name)
            incs: dict[str, list[tuple[Item, Incoming]]] = {}
            for system, (_, pipeline, items, _) in reads.items():
                for it in items:
                    rec, _, refused = self._steps(pipeline, it.record)
                    if refused is None:
                        incs.setdefault(system, []).append((it, read_record(self.ent, system, rec)))
                prev.records[system] = len(items)
            every = [i for pairs in incs.values() for _, i in pairs]
            session = await self._session(every, now)
            origin: dict[str, tuple[str, Item, str]] = {}  # identity -> (system, item, event id) it came from
            for system, pairs in incs.items():
                for it, inc in pairs:
                    event_id = new_id()
                    known = session.find(inc)[1] in ("link", "match")
                    applied = session.apply(inc, event_id)
                    if applied.identity is None:
                        prev.reviews += applied.action == "review"
                        continue
                    if known and applied.action in ("linked", "unchanged", "updated"):
                        prev.linked += 1
                    prev.conflicts += len(applied.conflicts)
                    origin.setdefault(applied.identity.id, (system, it, event_id))
            events: list[NewEvent] = []
            for iid, (system, it, event_id) in origin.items():
                flow, pipeline, _, _ = reads[system]
                ident = session.identities[iid]
                applied = Applied(ident, "first run")
                deliveries, writes = self._render(flow, pipeline, session, applied, event_id)
                for w in writes:
                    bucket = prev.creates if w["op"] == "create" else prev.updates
                    bucket[w["system"]] = bucket.get(w["system"], 0) + 1
                if not dry_run:
                    events.append(
                        self._event(
                            flow,
                            it,
                            event_id,
                            now,
                            "pending" if deliveries else "filtered",
                            None if deliveries else "first run: nothing to write",
                            [{"step": "identity", "kind": "sync", "first_run": True, "writes": writes}],
                            deliveries,
                            None,
                        )
                    )
            changes = session.finish()
            prev.identities = len({i.id for i in changes.identities})
            if not dry_run:
                cursors = {flow.name: cursor for flow, _, _, cursor in reads.values() if cursor is not None}
                await self.store.accept_synced(events, changes, cursors, fence=current_fence())
            return prev


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
    """Read every record of each polled system of the entity (from the start), then link them all before
    anything is written (`EntitySync.first_run`). Systems fed only by webhooks or brokers are not read."""
    reads: dict[str, tuple[FlowSpec, Pipeline, list[Item], Any]] = {}
    for flow in flows:
        if flow.source is None or flow.source.mode != "poll":
            continue
        source = source_of(flow)
        try:
            items, cursor = await read_all(source)
        finally:
            await source.close()
        reads[flow.source.system] = (flow, pipeline_of(flow), items, cursor)
    return await sync.first_run(reads, dry_run=dry_run)


async def read_all(source: Any, cursor: Any = None) -> tuple[list[Item], Any]:
    """Every record a poll source holds (from `cursor`), and the cursor after them."""
    items: list[Item] = []
    last = cursor
    batches: AsyncIterator[Batch] = source.poll(cursor)
    async for batch in batches:
        for r in batch.records:
            items.append(Item(r.raw if r.raw is not None else orjson.dumps(r.data), r.data, r.id))
        if batch.cursor is not None:
            last = batch.cursor
    return items, last


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
