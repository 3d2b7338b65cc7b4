"""Handlers for destinations: list, pause, resume."""

from __future__ import annotations

import logging
from typing import Any

from patchbay.server.api.common import Resource
from patchbay.server.api.http import Call

log = logging.getLogger("patchbay.api")


class Destinations(Resource):
    """Destination states and backlogs."""

    async def list_destinations(self, c: Call) -> Any:
        ov = await self._overview()
        return {"destinations": list(ov["dests"].values())}

    async def _set_state(self, c: Call, target: str) -> Any:
        flow, dest = c.path.flow, c.path.destination
        w = self._worker(flow, dest)
        if (target == "active") == (w.state == "active"):
            return {"flow": flow, "destination": dest, "state": w.state, "changed": False}
        await self.hub.set_state(flow, dest, target, c.by(was=w.state))
        log.info(
            "destination %s/%s %s via the API (%s)",
            flow,
            dest,
            "resumed" if target == "active" else "paused",
            c.actor,
        )
        return {"flow": flow, "destination": dest, "state": w.state, "changed": True}

    async def pause(self, c: Call) -> Any:
        return await self._set_state(c, "paused")

    async def resume(self, c: Call) -> Any:
        return await self._set_state(c, "active")
