"""Handlers for dead letters: list, replay, discard."""

from __future__ import annotations

import logging
from typing import Any

from patchbay.engine.replay import ReplayReport, find_replayable, tx_replay
from patchbay.server import api_models as m
from patchbay.server.api.common import Resource
from patchbay.server.api.http import Call
from patchbay.store import api_queries as aq

log = logging.getLogger("patchbay.api")
REPLAY_CHUNK = 200  # events replayed per store transaction


class DeadLetters(Resource):
    """Dead deliveries and quarantined events."""

    async def list_dead(self, c: Call) -> Any:
        q: m.DeadQuery = c.query
        return await self.store.read(aq.dead_letters, q.flow, q.destination, q.reason, q.limit)

    async def replay(self, c: Call) -> Any:
        b: m.ReplayRuns | m.ReplayAll = c.body.root
        if b.run_ids is not None:
            ids = find_replayable(None, event_ids=b.run_ids, flow=None, destination=None)
        elif b.reason is None:
            ids = await self.store.read(
                lambda conn: find_replayable(conn, event_ids=None, flow=b.flow, destination=b.destination)
            )
        else:
            ids = await self.store.read(aq.dead_event_ids, b.flow, b.destination, b.reason)
        pipelines = {name: fr.pipeline for name, fr in self.hub.flows.items()}
        detail = {**c.who, **({"all": True, "flow": b.flow, "reason": b.reason} if b.all else {})}

        def tx(conn: Any, chunk: list[str]) -> ReplayReport:
            before = aq.q_last_audit_id(conn)
            rep = tx_replay(conn, pipelines, chunk, b.destination, c.actor)
            aq.tx_set_audit_origin(conn, before, c.actor, c.origin, detail)
            return rep

        rep = ReplayReport()
        for i in range(0, len(ids), REPLAY_CHUNK):  # short transactions: webhooks keep being acknowledged
            part: ReplayReport = await self.store.write(tx, ids[i : i + REPLAY_CHUNK])
            rep.requeued += part.requeued
            rep.still_invalid += part.still_invalid
            rep.skipped += part.skipped
        if rep.requeued:
            for fr in self.hub.flows.values():
                for w in fr.workers.values():
                    w.notify(rescan=True)
            log.info("replayed %d run(s) via the API (%s)", len(rep.requeued), c.actor)
        return {
            "matched": len(ids),
            "requeued": rep.requeued,
            "still_invalid": [{"id": i, "reason": r} for i, r in rep.still_invalid],
            "skipped": [{"id": i, "reason": r} for i, r in rep.skipped],
        }

    async def discard(self, c: Call) -> Any:
        b: m.DiscardRequest = c.body
        rep = await self.store.write(aq.tx_discard, b.run_ids, b.destination, c.actor, c.origin, c.who)
        return {"discarded": rep.discarded, "skipped": [{"id": i, "reason": r} for i, r in rep.skipped]}
