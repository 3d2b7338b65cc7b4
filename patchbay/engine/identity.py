"""The identity map's rules, as pure functions over identities in memory: match, link, apply, plan writes.

A record from system S is read as entity values (its mapping), linked to an identity (by its link, or by
the match rules in order: one match links; several matches, a weak rule or a second record of S go to
the review queue), then each changed field is settled by its owner or rule against the last agreed
(golden) value, a three-way compare: S's last seen value is its base. What every system should then
receive is planned from the golden record and what the hub knows each system holds: the last value seen
from it, or the value the hub last wrote to it and has not read back yet. A value read back that equals
what the hub wrote is the echo of that write, whatever timestamps the system stamped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from patchbay.config.entities import EntitySpec, MatchRule
from patchbay.expressions import is_truthy
from patchbay.records import dig, new_id, put
from patchbay.store.base import Identity, IdentityChanges, IdentityLookup, NewConflict, NewReview

MISSING: Any = object()


def normalize(value: Any, how: str) -> str | None:
    """A match key: the value as compared by rule `how`; None when there is nothing to compare."""
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    if how == "email":
        text = text.lower()
    elif how == "lower":
        text = re.sub(r"\s+", " ", text.lower())
    elif how == "digits":
        text = re.sub(r"\D", "", text)
    return text or None


def rule_key(rule: MatchRule, values: dict[str, Any]) -> str | None:
    parts = [normalize(values.get(f), rule.normalize) for f in rule.names]
    if any(p is None for p in parts):
        return None
    return "\x1f".join(p for p in parts if p is not None)


def same(a: Any, b: Any) -> bool:
    """Values the hub takes for equal: 1 == 1.0, and a number equals its text (databases and JSON differ)."""
    if a is MISSING or b is MISSING:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if a == b:
        return True
    if isinstance(a, int | float | str) and isinstance(b, int | float | str):
        return str(a) == str(b)
    return False


@dataclass
class Incoming:
    """One record from one system, read as the entity."""

    system: str
    record_id: str | None
    values: dict[str, Any]
    deleted: bool = False
    clock: Any = None  # the record's own update time (systems[S].clock), for `clock: system`
    version: Any = None  # the record's version as the system gives it (systems[S].version)


def read_record(ent: EntitySpec, system: str, record: Any) -> Incoming:
    m = ent.systems[system]
    rid = dig(record, m.id)
    values = {f: dig(record, path) for f, path in m.fields.items()}
    expr = ent.deleted.get(system)
    deleted = bool(expr is not None and is_truthy(expr.search(record)))
    clock = dig(record, m.clock) if m.clock else None
    version = dig(record, m.version) if m.version else None
    return Incoming(system, None if rid is None else str(rid), values, deleted, clock, version)


@dataclass
class Applied:
    """What one record did to the identity map."""

    identity: Identity | None
    action: str  # created | linked | updated | unchanged | review | deleted | ignored
    reason: str = ""
    changed: list[str] = field(default_factory=list)  # fields whose agreed value changed
    conflicts: list[NewConflict] = field(default_factory=list)
    deleted: bool = False


@dataclass
class Op:
    """What one system should receive for one identity."""

    system: str
    op: str  # create | update | delete | archive
    id: str | None
    values: dict[str, Any]  # entity field -> value: what changes (never a field the system owns, unless a
    # person decided it); all fields for a create
    record: dict[
        str, Any
    ]  # entity field -> value: the whole record as agreed (its own fields as it gave them)
    # entity field -> the value the hub last knew the system held (last seen, or its own write not read
    # back yet; None when never held), for every field of `record`: a destination's compare-and-set, so
    # that writing the whole record never overwrites a field someone changed there meanwhile
    expected: dict[str, Any] = field(default_factory=dict)
    version: Any = None  # the system's version of the record as last read (systems[S].version)

    def as_record(self, ent: EntitySpec, identity: Identity) -> dict[str, Any]:
        """The record a destination renders: op, id, fields/record under the system's own names."""
        paths = ent.systems[self.system].fields
        fields: dict[str, Any] = {}
        for f, v in self.values.items():
            put(fields, paths[f], v)
        rec: dict[str, Any] = {}
        for f, v in self.record.items():
            put(rec, paths[f], v)
        expected: dict[str, Any] = {}
        for f, v in self.expected.items():
            put(expected, paths[f], v)
        return {
            "op": self.op,
            "entity": ent.name,
            "identity": identity.id,
            "system": self.system,
            "id": self.id,
            "fields": fields,
            "record": rec,
            "expected": expected,
            "version": self.version,
            "values": dict(self.values),
            # Fields this system owns that the operation changes: only a person's decision does that.
            "owned": sorted(f for f in self.values if ent.owner(f) == self.system),
        }


class Session:
    """The identity map as one sync step sees it: what the store returned, plus this step's changes."""

    def __init__(self, ent: EntitySpec, lookup: IdentityLookup, now: float) -> None:
        self.ent = ent
        self.now = now
        self.by_link = dict(lookup.by_link)
        self.by_key: dict[tuple[str, str], list[str]] = {k: list(v) for k, v in lookup.by_key.items()}
        self.identities = dict(lookup.identities)
        self.open_reviews = dict(lookup.open_reviews)
        self.changes = IdentityChanges(ent.name)
        self._dirty: dict[str, Identity] = {}

    # -------------------------------------------------------------- linking
    def keys_of(self, inc: Incoming) -> list[tuple[str, str]]:
        out = []
        for rule in self.ent.doc.match:
            k = rule_key(rule, inc.values)
            if k is not None:
                out.append((rule.label, k))
        return out

    def find(self, inc: Incoming) -> tuple[Identity | None, str, list[str]]:
        """The identity a record belongs to: (identity, how, candidates). `how` is link, match, new or a
        reason for review (then identity is None and candidates are listed)."""
        if inc.record_id is not None:
            iid = self.by_link.get((inc.system, inc.record_id))
            if iid is not None and iid in self.identities:
                return self.identities[iid], "link", []
        for rule in self.ent.doc.match:
            k = rule_key(rule, inc.values)
            if k is None:
                continue
            ids = [
                i
                for i in self.by_key.get((rule.label, k), [])
                if i in self.identities and self.identities[i].status != "deleted"
            ]
            if not ids:
                continue
            if rule.weak:
                return None, f"only the weak rule {rule.label!r} matches; a person decides", ids
            if len(ids) > 1:
                return None, f"{len(ids)} identities match {rule.label!r}", ids
            ident = self.identities[ids[0]]
            view = ident.systems.get(inc.system)
            if view is not None and view.get("id") is not None and view["id"] != inc.record_id:
                return (
                    None,
                    f"duplicate inside {inc.system}: record {view['id']} is already linked to this identity "
                    f"by {rule.label!r}; proposal: merge record {inc.record_id} into {view['id']}",
                    ids,
                )
            return ident, "match", []
        return None, "new", []

    def _index(self, ident: Identity) -> None:
        for system, view in ident.systems.items():
            if view.get("id") is not None:
                self.by_link[(system, str(view["id"]))] = ident.id
        keys: set[tuple[str, str]] = set()
        sources = [{f: g["value"] for f, g in ident.golden.items()}] + [
            {f: s["value"] for f, s in v.get("seen", {}).items()} for v in ident.systems.values()
        ]
        for values in sources:
            for rule in self.ent.doc.match:
                rk = rule_key(rule, values)
                if rk is not None:
                    keys.add((rule.label, rk))
        ident.keys = sorted(keys)
        for key in ident.keys:
            ids = self.by_key.setdefault(key, [])
            if ident.id not in ids:
                ids.append(ident.id)

    def touch(self, ident: Identity) -> None:
        ident.updated_at = self.now
        self.identities[ident.id] = ident
        self._index(ident)
        self._dirty[ident.id] = ident

    # -------------------------------------------------------------- applying a record
    def apply(
        self, inc: Incoming, event_id: str | None, into: Identity | None = None, new: bool = False
    ) -> Applied:
        """Apply a record. `into` (or `new`): a person decided which identity it is (the review queue)."""
        candidates: list[str] = []
        if into is not None:
            ident, how = into, "link"
        elif new:
            ident, how = None, "new"
        else:
            ident, how, candidates = self.find(inc)
        if ident is None and how != "new":
            if inc.record_id is not None:
                self.changes.reviews.append(
                    NewReview(
                        self.ent.name,
                        inc.system,
                        inc.record_id,
                        inc.values,
                        candidates,
                        how,
                        self.now,
                        event_id,
                    )
                )
            return Applied(None, "review", how)
        if ident is not None and ident.status == "deleted":
            return Applied(ident, "ignored", f"identity {ident.id} was deleted")
        if ident is not None and _stale(ident.systems.get(inc.system), inc):
            return Applied(
                ident,
                "ignored",
                f"a read of {inc.system} record {inc.record_id} older than one already applied "
                "(it arrived out of order): stale",
            )
        if inc.deleted:
            if ident is None:
                return Applied(None, "ignored", "a delete of a record the hub never linked")
            return self._delete(ident, inc)
        created = ident is None
        if ident is None:
            ident = Identity(new_id("idn"), self.ent.name, self.now, self.now)
        view = ident.systems.setdefault(inc.system, _view())
        linked = view.get("id") != inc.record_id
        view["id"] = inc.record_id
        view["pending"] = None
        view["deleted_at"] = None
        moved = inc.version is not None and view.get("version") != inc.version
        if moved:
            view["version"] = inc.version  # kept even when no value changed: the next If-Match needs it
        out = Applied(ident, "created" if created else "linked" if linked else "unchanged")
        self._seen_changed = _advance(view, inc)
        for f, v in inc.values.items():
            self._field(ident, view, inc, f, v, event_id, out)
        if out.changed and out.action == "unchanged":
            out.action = "updated"
        if created or linked or moved or out.changed or out.conflicts or self._seen_changed:
            self.touch(ident)
        self.changes.conflicts.extend(out.conflicts)
        return out

    _seen_changed = False

    def _field(
        self,
        ident: Identity,
        view: dict[str, Any],
        inc: Incoming,
        f: str,
        v: Any,
        event_id: str | None,
        out: Applied,
    ) -> None:
        seen, written = view["seen"].get(f), view["written"].get(f)
        entry = {"value": v, "at": self.now, "event": event_id}
        if written is not None and same(v, written["value"]):
            view["seen"][f] = entry  # the echo of the hub's own write
            del view["written"][f]
            self._seen_changed = True
            return
        if seen is not None and same(v, seen["value"]):
            return  # unchanged (or read before the hub's write landed)
        base = seen["value"] if seen is not None else MISSING
        view["seen"][f] = entry
        view["written"].pop(f, None)  # what the system now says supersedes what the hub sent it
        self._seen_changed = True
        rule = self.ent.fields[f]
        g = ident.golden.get(f)
        mine = {"value": v, "system": inc.system, "at": self.now}
        if rule.rule == "latest" and rule.clock == "system":
            mine["clock"] = _clock(inc.clock)
        if g is None:
            ident.golden[f] = mine
            out.changed.append(f)
            return
        if same(g["value"], v):
            return
        if rule.owner is not None:
            if rule.owner == inc.system:
                ident.golden[f] = mine
                out.changed.append(f)
                return
            # The owner's side of it: the agreed value, which the owner holds (or is being sent), even
            # when it came from elsewhere first (a record created in another system, then in the owner).
            owned = g if g["system"] == rule.owner else {**g, "system": rule.owner}
            out.conflicts.append(
                self._conflict(
                    ident,
                    f,
                    "owned",
                    owned,
                    mine,
                    rule.owner,
                    g["value"],
                    "owner",
                    f"{inc.system} changed {f}, which {rule.owner} owns; {rule.owner}'s value stands and is "
                    f"written back to {inc.system}",
                    "settled",
                )
            )
            return
        if base is not MISSING and same(base, g["value"]) and not g.get("hold"):
            ident.golden[f] = mine  # a plain change of a shared field: nobody else changed it meanwhile
            out.changed.append(f)
            return
        # Both sides changed it since they last agreed (or a second system brings its own value): the rule
        # settles it, and the conflict is recorded either way.
        what = "changed" if base is not MISSING else "brings its own value for"
        if rule.rule == "latest":
            newer = (
                _clock(inc.clock) >= float(g.get("clock", 0.0))
                if rule.clock == "system"
                else True  # the hub's clock: this change arrived last
            )
            winner = mine if newer else g
            c = self._conflict(
                ident,
                f,
                "concurrent",
                g,
                mine,
                str(winner["system"]),
                winner["value"],
                "latest",
                f"{inc.system} {what} {f} while {g['system']} had set it; the latest by the "
                f"{rule.clock} clock wins ({winner['system']})",
                "settled",
            )
            if newer:
                ident.golden[f] = mine
                out.changed.append(f)
        elif rule.rule == "first":
            c = self._conflict(
                ident,
                f,
                "concurrent",
                g,
                mine,
                str(g["system"]),
                g["value"],
                "first",
                f"{inc.system} {what} {f}; the first value ({g['system']}) stays",
                "settled",
            )
        else:
            g["hold"] = True  # no system receives this field until a person decides
            c = self._conflict(
                ident,
                f,
                "concurrent",
                g,
                mine,
                None,
                None,
                "manual",
                f"{inc.system} {what} {f} while {g['system']} had set it; a person decides "
                "(`patchbay conflicts resolve`)",
                "open",
            )
        out.conflicts.append(c)

    def _conflict(
        self,
        ident: Identity,
        f: str,
        kind: str,
        agreed: dict[str, Any],
        mine: dict[str, Any],
        winner: str | None,
        winner_value: Any,
        rule: str,
        reason: str,
        status: str,
    ) -> NewConflict:
        values = [
            {"system": agreed["system"], "value": agreed["value"], "at": agreed["at"]},
            {"system": mine["system"], "value": mine["value"], "at": mine["at"]},
        ]
        return NewConflict(
            self.ent.name, ident.id, f, kind, values, winner, winner_value, rule, reason, status, self.now
        )

    def _delete(self, ident: Identity, inc: Incoming) -> Applied:
        view = ident.systems.setdefault(inc.system, _view())
        if view.get("deleted_at") is not None:
            return Applied(ident, "unchanged", "already deleted there")
        view["deleted_at"] = self.now
        policy = self.ent.doc.deletes.policy
        if policy == "propagate":
            ident.status = "deleted"
        elif policy == "archive":
            ident.status = "archived"
        self.touch(ident)
        return Applied(ident, "deleted", f"deleted in {inc.system}; policy {policy}", deleted=True)

    # -------------------------------------------------------------- planning writes
    def plan(
        self, ident: Identity, targets: set[str], include_owned: frozenset[str] = frozenset()
    ) -> list[Op]:
        """What each target system should receive now so that it holds what the rules say.

        `include_owned`: fields written even to their owner (a person's resolution of a conflict)."""
        ops: list[Op] = []
        for system in sorted(targets):
            if system not in self.ent.systems or not self.ent.writes(system):
                continue
            op = self._plan_one(ident, system, include_owned)
            if op is not None:
                ops.append(op)
        return ops

    def _plan_one(self, ident: Identity, system: str, include_owned: frozenset[str]) -> Op | None:
        view = ident.systems.get(system)
        if ident.status in ("deleted", "archived"):
            if view is None or view.get("id") is None or view.get("deleted_at") is not None:
                return None
            if view.get("closed"):
                return None
            return Op(system, "delete" if ident.status == "deleted" else "archive", str(view["id"]), {}, {})
        if view is not None and view.get("deleted_at") is not None:
            return None  # deleted there: never recreated by the hub
        mapped = self.ent.systems[system].fields
        agreed = {
            f: g["value"]
            for f, g in ident.golden.items()
            if f in mapped
            and not g.get("hold")
            and g["value"] is not None
            or f in mapped
            and not g.get("hold")
            and view is not None
            and f in view["seen"]
        }
        if view is None or (view.get("id") is None and view.get("pending") is None):
            if not agreed:
                return None
            return Op(system, "create", None, dict(agreed), dict(agreed))
        if view.get("id") is None:
            return None  # a create is in flight: its id comes back first (response or read back)
        writable = {f: v for f, v in agreed.items() if self.ent.owner(f) != system or f in include_owned}
        changed = {f: v for f, v in writable.items() if not _holds(view, f, v)}
        if not changed:
            return None
        record = {**agreed, **changed}
        expected = {f: (None if (k := _known(view, f)) is MISSING else k) for f in record}
        return Op(system, "update", str(view["id"]), changed, record, expected, view.get("version"))

    def wrote(self, ident: Identity, op: Op, event_id: str, destination: str) -> None:
        """Record that `op` is on its way (its deliveries are in this step's transaction)."""
        view = ident.systems.setdefault(op.system, _view())
        if op.op == "create":
            view["pending"] = {"event": event_id, "destination": destination, "at": self.now}
        if op.op in ("delete", "archive"):
            view["closed"] = op.op
        for f, v in op.values.items():
            view["written"][f] = {"value": v, "at": self.now, "event": event_id}
        self.touch(ident)

    def link_created(self, ident: Identity, system: str, record_id: str) -> None:
        """The id a create returned (its destination's `response: {id: ...}`)."""
        view = ident.systems.setdefault(system, _view())
        view["id"] = record_id
        view["pending"] = None
        self.touch(ident)

    def resolve(self, ident: Identity, f: str, value: Any, by: str) -> None:
        """A person's decision: the agreed value of `f`, written to every system (its owner too)."""
        ident.golden[f] = {"value": value, "system": "manual", "at": self.now, "by": by}
        self.touch(ident)

    def finish(self) -> IdentityChanges:
        self.changes.identities = list(self._dirty.values())
        return self.changes


def _stale(view: dict[str, Any] | None, inc: Incoming) -> bool:
    """The record's clock (systems[S].clock) is older than that of a read of it already applied."""
    if view is None or view.get("clock") is None or view.get("id") != inc.record_id or inc.clock is None:
        return False
    t = _clock(inc.clock)
    return t > 0 and t < float(view["clock"])


def _advance(view: dict[str, Any], inc: Incoming) -> bool:
    """Keep the newest clock read from this system's record; True when it moved."""
    t = _clock(inc.clock) if inc.clock is not None else 0.0
    if t > float(view.get("clock") or 0.0):
        view["clock"] = t
        return True
    return False


def _view() -> dict[str, Any]:
    return {"id": None, "seen": {}, "written": {}, "pending": None, "deleted_at": None}


def _holds(view: dict[str, Any], f: str, v: Any) -> bool:
    """The system holds `v` for `f` as far as the hub knows (a field it never had counts as null)."""
    known = _known(view, f)
    return (v is None) if known is MISSING else same(known, v)


def _known(view: dict[str, Any], f: str) -> Any:
    if f in view["written"]:
        return view["written"][f]["value"]
    if f in view["seen"]:
        return view["seen"][f]["value"]
    return MISSING


def _clock(v: Any) -> float:
    """A record's own time as seconds: a number, or an ISO 8601 text; 0 when unreadable."""
    import datetime as dt

    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, dt.datetime):
        return (v if v.tzinfo else v.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(v, str):
        try:
            d = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return 0.0
        return (d if d.tzinfo else d.replace(tzinfo=dt.UTC)).timestamp()
    return 0.0
