"""Handlers for dead letters: list, replay, discard."""

from __future__ import annotations

import logging
from typing import Any

from patchbay.engine.replay import event_ids, replay
from patchbay.server import api_models as m
from patchbay.server.api.common import Resource
from patchbay.server.api.http import Call

log = logging.getLogger("patchbay.api")


class DeadLetters(Resource):
    """Dead deliveries and quarantined events."""

    async def list_dead(self, c: Call) -> Any:
        q: m.DeadQuery = c.query
        return await self.store.dead_letters(q.flow, q.destination, q.reason, q.limit)

    async def replay(self, c: Call) -> Any:
        b: m.ReplayRuns | m.ReplayAll = c.body.root
        if b.run_ids is not None:
            ids = event_ids(b.run_ids)
        elif b.reason is None:
            ids = await self.store.replayable(b.flow, b.destination)
        else:
            ids = await self.store.dead_event_ids(b.flow, b.destination, b.reason)
        pipelines = {name: fr.pipeline for name, fr in self.hub.flows.items()}
        by = c.by(**({"all": True, "flow": b.flow, "reason": b.reason} if b.all else {}))
        rep = await replay(self.store, pipelines, ids, b.destination, by)
        if rep.requeued:
            self.hub.wake()  # here and in the other processes
            log.info("replayed %d run(s) via the API (%s)", len(rep.requeued), c.actor)
        return {
            "matched": len(ids),
            "requeued": rep.requeued,
            "still_invalid": [{"id": i, "reason": r} for i, r in rep.still_invalid],
            "skipped": [{"id": i, "reason": r} for i, r in rep.skipped],
        }

    async def discard(self, c: Call) -> Any:
        b: m.DiscardRequest = c.body
        rep = await self.store.discard(b.run_ids, b.destination, c.by())
        return {"discarded": rep.discarded, "skipped": [{"id": i, "reason": r} for i, r in rep.skipped]}
