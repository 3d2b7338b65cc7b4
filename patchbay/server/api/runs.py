"""Handlers for runs and counts."""

from __future__ import annotations

from typing import Any

from patchbay.security.runs import redact_run
from patchbay.server import api_models as m
from patchbay.server.api.common import Resource
from patchbay.server.api.http import ApiError, Call
from patchbay.store.base import RunFilter


class Runs(Resource):
    """Runs, one run's trace, counts."""

    async def list_runs(self, c: Call) -> Any:
        q: m.RunsQuery = c.query
        f = RunFilter(q.flow, q.status, m.as_unix(q.since), m.as_unix(q.until), q.key, q.limit)
        return {"runs": await self.store.list_runs(f)}

    async def get_run(self, c: Call) -> Any:
        run = await self.store.get_run(c.path.run_id)
        if run is None:
            live = self.hub.batch.get(c.path.run_id) if self.hub.batch is not None else None
            if live is not None:  # a batch run is recorded when it ends
                raise ApiError(
                    404,
                    "not_found",
                    f"run {live.run_id} of flow {live.flow} is still going ({live.phase}); it is recorded when it "
                    f"ends. GET /api/v1/flows/{live.flow}/runs/{live.run_id} follows it",
                )
            raise ApiError(404, "not_found", f"no run {c.path.run_id!r}")
        fr = self.hub.flows.get(run["flow"])
        # Also with no paths: values sealed at rest show as [redacted].
        run = redact_run(run, fr.spec.sensitive if fr is not None else [])
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
        total = await self.store.counts()
        per_flow = await self.store.counts_by_flow()
        paused = sum(1 for fr in self.hub.flows.values() for w in fr.workers.values() if w.state != "active")
        dead = total["deliveries"].get("dead", 0) + total["events"].get("quarantined", 0)
        return {**total, "flows": per_flow, "dead_letters": dead, "paused_destinations": paused}
