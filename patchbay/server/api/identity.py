"""Handlers and models for entities: the identity map, its conflicts and its review queue."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from patchbay.engine.identity import normalize
from patchbay.engine.sync import EntitySync, sync_flows
from patchbay.server.api.common import Resource
from patchbay.server.api.http import ApiError, Call
from patchbay.server.api_models import NAME, In, Out, Timestamp

EntityName = Annotated[str, Field(pattern=NAME, description="An entity's name.", examples=["customer"])]
IdentityId = Annotated[str, Field(pattern=r"^idn_[A-Za-z0-9_\-]{1,64}$", description="An identity's id.")]


# ---------------------------------------------------------------------------- models
class EntityPath(In):
    entity: EntityName


class IdentityPath(In):
    identity_id: IdentityId


class ConflictPath(In):
    conflict_id: int = Field(ge=1, le=2**62)


class ReviewPath(In):
    review_id: int = Field(ge=1, le=2**62)


class SearchQuery(In):
    q: str = Field(
        min_length=1, max_length=320, description="A match value (an email), a record id or an identity id."
    )
    limit: int = Field(20, ge=1, le=200)


class ItemsQuery(In):
    entity: EntityName | None = None
    status: str | None = Field(None, pattern=r"^(open|settled|resolved|linked|new|dismissed)$")
    limit: int = Field(100, ge=1, le=1000)


class ConflictResolve(In):
    value: Any = Field(None, description="The value to keep (JSON); or give `take`.")
    take: str | None = Field(None, pattern=NAME, description="Keep the value this system had.")


class ReviewResolve(In):
    link: IdentityId | None = Field(None, description="The record is this identity.")
    new: bool = Field(False, description="The record is a new identity.")
    dismiss: bool = Field(False, description="Leave the record unlinked.")


class EntityOut(Out):
    name: str
    purpose: str
    systems: list[str]
    fields: dict[str, str] = Field(description="Field -> `owner SYSTEM` or `rule RULE`.")
    stats: dict[str, Any]


class EntitiesOut(Out):
    entities: list[EntityOut]


class IdentityOut(Out):
    id: str
    entity: str
    status: str
    created_at: Timestamp
    updated_at: Timestamp
    golden: dict[str, Any] = Field(description="Field -> the agreed value, the system it came from and when.")
    systems: dict[str, Any] = Field(
        description="System -> its record id and, per field, the last value seen from it and when."
    )
    keys: list[list[str]]


class IdentitiesOut(Out):
    identities: list[IdentityOut]


class ConflictOut(Out):
    id: int
    entity: str
    identity_id: str
    field: str
    kind: str
    values: list[dict[str, Any]]
    winner: str | None
    winner_value: Any
    rule: str
    reason: str
    status: str
    at: Timestamp
    resolved_at: Timestamp | None
    resolution: Any


class ConflictsOut(Out):
    conflicts: list[ConflictOut]


class ReviewOut(Out):
    id: int
    entity: str
    system: str
    record_id: str
    values: dict[str, Any]
    candidates: list[str]
    reason: str
    status: str
    at: Timestamp
    resolved_at: Timestamp | None
    resolution: Any


class ReviewsOut(Out):
    reviews: list[ReviewOut]


class DecisionOut(Out):
    result: dict[str, Any] = Field(description="What was decided and the runs that write it.")


# ---------------------------------------------------------------------------- handlers
class Identities(Resource):
    """The identity map: entities, identities, conflicts, reviews."""

    def _entity(self, name: str) -> Any:
        ent = self.hub.project.entities.get(name)
        if ent is None:
            known = ", ".join(sorted(self.hub.project.entities)) or "none"
            raise ApiError(404, "not_found", f"no entity {name!r}; entities: {known}")
        return ent

    async def list_entities(self, c: Call) -> Any:
        out = []
        for name, ent in sorted(self.hub.project.entities.items()):
            rules = {f: f"owner {r.owner}" if r.owner else f"rule {r.rule}" for f, r in ent.fields.items()}
            stats = await self.store.identity_stats(name)
            out.append(
                {
                    "name": name,
                    "purpose": ent.doc.purpose,
                    "systems": list(ent.systems),
                    "fields": rules,
                    "stats": stats,
                }
            )
        return {"entities": out}

    async def search(self, c: Call) -> Any:
        ent = self._entity(c.path.entity)
        forms = dict.fromkeys(
            [c.query.q, *(normalize(c.query.q, r.normalize) or c.query.q for r in ent.doc.match)]
        )
        found: dict[str, Any] = {}
        for form in forms:
            for ident in await self.store.search_identities(ent.name, form, c.query.limit):
                found.setdefault(ident.id, ident.as_dict())
        return {"identities": list(found.values())[: c.query.limit]}

    async def get_identity(self, c: Call) -> Any:
        ident = await self.store.identity(c.path.identity_id)
        if ident is None:
            raise ApiError(404, "not_found", f"no identity {c.path.identity_id}")
        return ident.as_dict()

    async def list_conflicts(self, c: Call) -> Any:
        return {"conflicts": await self.store.conflicts(c.query.entity, c.query.status, c.query.limit)}

    async def list_reviews(self, c: Call) -> Any:
        return {"reviews": await self.store.reviews(c.query.entity, c.query.status or "open", c.query.limit)}

    def _sync(self, entity: str) -> tuple[EntitySync, list[Any]]:
        ent = self._entity(entity)
        sync = self.hub.syncs.get(entity)
        if sync is None:
            assert self.hub.store is not None
            sync = self.hub.syncs[entity] = EntitySync(ent, self.hub.store)
        flows = [
            (f, self.hub.flows[f.name].pipeline)
            for f in sync_flows(self.hub.project.flows, entity)
            if f.name in self.hub.flows
        ]
        return sync, flows

    async def resolve_conflict(self, c: Call) -> Any:
        item = await self.store.conflict(c.path.conflict_id)
        if item is None:
            raise ApiError(404, "not_found", f"no conflict {c.path.conflict_id}")
        sync, flows = self._sync(item["entity"])
        kw: dict[str, Any] = {"take": c.body.take}
        if "value" in c.body.model_fields_set:
            kw["value"] = c.body.value
        try:
            result = await sync.resolve_conflict(item["id"], flows, c.by(), **kw)
        except (LookupError, ValueError) as exc:
            raise ApiError(409, "cannot_resolve", str(exc)) from exc
        self._wake(result)
        return {"result": result}

    async def resolve_review(self, c: Call) -> Any:
        item = await self.store.review(c.path.review_id)
        if item is None:
            raise ApiError(404, "not_found", f"no review {c.path.review_id}")
        sync, flows = self._sync(item["entity"])
        try:
            result = await sync.resolve_review(
                item["id"], flows, c.by(), link_to=c.body.link, new=c.body.new, dismiss=c.body.dismiss
            )
        except (LookupError, ValueError) as exc:
            raise ApiError(409, "cannot_resolve", str(exc)) from exc
        self._wake(result)
        return {"result": result}

    def _wake(self, result: dict[str, Any]) -> None:
        """The decision's deliveries are in the store: their workers look now, not at the next rescan."""
        self.hub.wake([name for name, fr in self.hub.flows.items() if fr.spec.sync is not None])
