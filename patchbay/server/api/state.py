"""Handlers for a flow's saved state: source cursors and schedules."""

from __future__ import annotations

from typing import Any

from patchbay.server.api.common import Resource
from patchbay.server.api.http import ApiError, Call


class State(Resource):
    """Source cursors and schedules."""

    async def get_cursor(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        row = await self.store.cursor_info(fr.spec.name)
        return {
            "flow": fr.spec.name,
            "has_source": fr.spec.source is not None,
            "cursor": self._redact(row["value"]) if row else None,
            "updated_at": row["updated_at"] if row else None,
        }

    async def reset_cursor(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        name = fr.spec.name
        return {"flow": name, "reset": await self.store.reset_cursor(name, c.by())}

    async def resume_source(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        name = fr.spec.name
        was = self.hub.source_states().get(name)  # on a node without the scheduler role: the store's
        if was is None:
            raise ApiError(409, "no_source", f"flow {name} has no source or schedule to resume")
        resumed = await self.hub.resume_source(name, c.by(was=was.state))
        now = self.hub.source_states().get(name, was)
        return {"flow": name, "resumed": resumed, "state": now.state}

    async def list_schedules(self, c: Call) -> Any:
        ov = await self._overview()
        out = [self._schedule(n, ov["schedules"].get(n), ov["late"][n]) for n in self.hub.flows]
        return {"schedules": [s for s in out if s is not None]}
