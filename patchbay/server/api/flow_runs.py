"""Handlers for starting a flow's run on demand and following it: a batch sync, or one manual event."""

from __future__ import annotations

from typing import Any

import orjson

from patchbay.engine.batch_runs import RunGoing
from patchbay.errors import StoreUnavailable
from patchbay.server import api_models as m
from patchbay.server.api.common import Resource
from patchbay.server.api.http import ApiError, Call


class FlowRuns(Resource):
    """POST /flows/{flow}/runs and GET /flows/{flow}/runs/{run_id}."""

    async def start_run(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        spec = fr.spec
        b: m.StartRun = c.body
        if not spec.enabled:
            raise ApiError(
                409, "flow_disabled", f"flow {spec.name} is disabled (`enabled: false` in {spec.file})"
            )
        trigger = "console" if c.request.headers.get("X-Patchbay-Console") else "api"
        if spec.batch is not None:
            if b.data is not None:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"flow {spec.name} is a batch flow: it reads its source; leave out `data`",
                )
            try:
                live = self.hub.start_batch(spec.name, trigger, accept_schema=b.accept_schema)
            except RunGoing as exc:
                raise ApiError(409, "run_in_progress", str(exc), run_id=exc.live.run_id) from None
            await self.store.audit("run", spec.name, c.by(run_id=live.run_id, accept_schema=b.accept_schema))
            return live.view()
        if not spec.trigger.manual:
            raise ApiError(
                409,
                "no_manual_trigger",
                f"flow {spec.name} has no manual trigger; add `manual: true` under its `trigger:` in {spec.file}"
                " to run it on demand",
            )
        if b.data is None:
            raise ApiError(422, "invalid_request", "give the event to run as `data` (any JSON value)")
        if b.accept_schema:
            raise ApiError(422, "invalid_request", "`accept_schema` is for batch flows")
        raw = orjson.dumps(b.data)
        try:
            accepted, status = await self.hub.ingest(
                spec.name, raw, b.data, meta={"trigger": "manual", "via": trigger, "by": c.actor}
            )
        except StoreUnavailable as exc:
            raise ApiError(503, "store_unavailable", f"the event was not stored: {exc}") from None
        await self.store.audit("run", spec.name, c.by(run_id=accepted.event_id))
        run = await self.store.get_run(accepted.event_id)
        return (
            self._event_view(run, trigger)
            if run is not None
            else {
                "run_id": accepted.event_id,
                "flow": spec.name,
                "kind": "event",
                "trigger": trigger,
                "started_at": 0.0,
                "status": status,
                "phase": None,
                "progress": None,
                "report": None,
            }
        )

    async def get_flow_run(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        name, run_id = fr.spec.name, c.path.run_id
        live = self.hub.batch.get(run_id) if self.hub.batch is not None else None
        if live is not None and live.flow == name:
            view = live.view()
            if view["report"] is not None:
                view["report"]["error"] = self._redact(view["report"]["error"])
            return view
        run = await self.store.get_run(run_id)
        if run is None or run["flow"] != name:
            raise ApiError(404, "not_found", f"flow {name} has no run {run_id!r}")
        if run["meta"].get("batch"):
            report = run["payload"] if isinstance(run["payload"], dict) else None
            if report is not None:
                report = {**report, "error": self._redact(report.get("error"))}
            return {
                "run_id": run["id"],
                "flow": name,
                "kind": "batch",
                "trigger": run["meta"].get("trigger", "?"),
                "started_at": run["received_at"],
                "status": (report or {}).get("status", "failed"),
                "phase": "done",
                "progress": None,
                "report": report,
            }
        return self._event_view(run, run["meta"].get("via") or run["meta"].get("trigger", "?"))

    @staticmethod
    def _event_view(run: dict[str, Any], trigger: str) -> dict[str, Any]:
        return {
            "run_id": run["id"],
            "flow": run["flow"],
            "kind": "event",
            "trigger": trigger,
            "started_at": run["received_at"],
            "status": run["status"],
            "phase": None,
            "progress": None,
            "report": None,
        }
