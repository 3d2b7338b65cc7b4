"""Handlers for runs and counts."""

from __future__ import annotations

from typing import Any

from patchbay.server import api_models as m
from patchbay.server.api.common import Resource
from patchbay.server.api.http import ApiError, Call
from patchbay.store import api_queries as aq
from patchbay.store.queries import RunFilter, counts, get_run, list_runs


class Runs(Resource):
    """Runs, one run's trace, counts."""

    async def list_runs(self, c: Call) -> Any:
        q: m.RunsQuery = c.query
        f = RunFilter(q.flow, q.status, m.as_unix(q.since), m.as_unix(q.until), q.key, q.limit)
        return {"runs": await self.store.read(list_runs, f)}

    async def get_run(self, c: Call) -> Any:
        run = await self.store.read(get_run, c.path.run_id)
        if run is None:
            raise ApiError(404, "not_found", f"no run {c.path.run_id!r}")
        fr = self.hub.flows.get(run["flow"])
        if fr is not None:
            run["payload"] = fr.pipeline.redact(run["payload"])
        for k in ("payload", "meta", "trace", "reason"):
            run[k] = self._redact(run[k])
        for d in run["deliveries"]:
            d["request"] = self._redact(d["request"])
            d["response"] = self._redact(d.get("response"))
            for a in d["attempts_log"]:
                a["excerpt"] = self._redact(a["excerpt"])
                a["error"] = self._redact(a["error"])
        return run

    async def counts(self, c: Call) -> Any:
        total = await self.store.read(counts)
        per_flow = await self.store.read(aq.counts_by_flow)
        paused = sum(1 for fr in self.hub.flows.values() for w in fr.workers.values() if w.state != "active")
        dead = total["deliveries"].get("dead", 0) + total["events"].get("quarantined", 0)
        return {**total, "flows": per_flow, "dead_letters": dead, "paused_destinations": paused}
