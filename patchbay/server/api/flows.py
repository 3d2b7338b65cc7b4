"""Handlers for systems, flows and the map."""

from __future__ import annotations

from typing import Any

from patchbay.config.project import FlowSpec, SystemSpec, system_secret_refs
from patchbay.server.api.common import Resource, worst
from patchbay.server.api.http import Call
from patchbay.store.base import RunFilter


class Flows(Resource):
    """Systems, flows and the map."""

    async def list_systems(self, c: Call) -> Any:
        project = self.hub.project
        used: dict[str, list[str]] = {}
        for f in project.flows.values():
            source = self._source_system(f)
            called = {getattr(s.config, "system", "") for s in f.steps if getattr(s.step, "calls", False)}
            names = {d.system for d in f.destinations} | called | ({source} if source else set())
            if f.batch is not None:
                names.add(f.batch.to.system)
            for n in sorted(names):
                used.setdefault(n, []).append(f.name)
        return {"systems": [self._system(s, used.get(s.name, [])) for s in project.systems.values()]}

    def _system(self, s: SystemSpec, used_by: list[str]) -> dict[str, Any]:
        common = s.common
        return {
            "name": s.name,
            "kind": s.kind,
            "owner": common.owner,
            "purpose": common.purpose,
            "owns": common.owns,
            "webhook": self._redact(self._dump(common.webhook)) if common.webhook else None,
            "config": self._redact(self._dump(s.config)) if s.config is not None else None,
            "secrets": sorted({r.label for r in system_secret_refs(s)}),
            "used_by": used_by,
        }

    async def list_flows(self, c: Call) -> Any:
        ov = await self._overview()
        stats = await self.store.flow_stats(list(self.hub.flows), ov["now"])
        return {"flows": [self._flow_summary(fr.spec, ov, stats) for fr in self.hub.flows.values()]}

    async def get_flow(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        spec: FlowSpec = fr.spec
        ov = await self._overview()
        stats = await self.store.flow_stats([spec.name], ov["now"])
        recent = await self.store.list_runs(RunFilter(flow=spec.name, limit=20))
        definition = {
            "trigger": self._redact(self._dump(spec.trigger)),
            "source": {
                "system": spec.source.system,
                "kind": spec.source.kind,
                "mode": spec.source.mode,
                "config": self._redact(self._dump(spec.source.config)),
            }
            if spec.source
            else None,
            "record_key": spec.record_key,
            "sensitive": spec.sensitive,
            "steps": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "when": s.when.text if s.when is not None else None,
                    "config": self._redact(self._dump(s.config)),
                }
                for s in spec.steps
            ],
            "batch": self._redact(self._dump(spec.batch)) if spec.batch is not None else None,
            "destinations": [
                {
                    "name": d.name,
                    "system": d.system,
                    "kind": d.kind,
                    "when": d.when.text if d.when is not None else None,
                    "config": self._redact(self._dump(d.config)),
                    "delivery": self._dump(d.policy),
                }
                for d in spec.destinations
            ],
        }
        return {
            **self._flow_summary(spec, ov, stats),
            "file": spec.file,
            "line": spec.line,
            "record_key": spec.record_key,
            "sensitive": spec.sensitive,
            "definition": definition,
            "schedule": self._schedule(spec.name, ov["schedules"].get(spec.name), ov["late"][spec.name]),
            "recent_runs": recent,
        }

    async def get_map(self, c: Call) -> Any:
        ov = await self._overview()
        project = self.hub.project
        edges = []
        incoming: dict[str, list[str]] = {}
        outgoing: dict[str, list[str]] = {}
        outgoing_late: dict[str, bool] = {}
        for name, fr in self.hub.flows.items():
            src = self._source_system(fr.spec) or "hub"
            outgoing_late[src] = outgoing_late.get(src, False) or bool(ov["late"][name])
            source = ov["sources"].get(name)
            if source is not None and source["health"] != "ok":  # a failing source colours its node
                outgoing[src] = [*outgoing.get(src, []), source["health"]]
            if fr.spec.batch is not None:  # a batch flow: one edge, the table it reads -> the one it writes
                edges.append(self._batch_edge(fr.spec, src, source))
                incoming.setdefault(fr.spec.batch.to.system, []).append(edges[-1]["health"])
            for d in self._targets(fr):  # destinations, then call and lookup steps
                dd = ov["dests"][(name, d.name)]
                edges.append(
                    {
                        "id": f"{name}/{d.name}",
                        "flow": name,
                        "destination": d.name,
                        "call": dd["call"],
                        "source": src,
                        "target": d.system,
                        "trigger": self._trigger(fr.spec),
                        "state": dd["state"],
                        "health": worst([dd["health"]] + ([source["health"]] if source else [])),
                        "source_state": source["state"] if source else None,
                        "source_error": source["error"] if source and source["state"] != "active" else None,
                    }
                )
                incoming.setdefault(d.system, []).append(dd["health"])
        nodes = []
        for s in project.systems.values():
            h = worst(
                incoming.get(s.name, [])
                + outgoing.get(s.name, [])
                + (["late"] if outgoing_late.get(s.name) else [])
            )
            nodes.append(
                {
                    "id": s.name,
                    "kind": s.kind,
                    "owner": s.common.owner,
                    "purpose": s.common.purpose,
                    "health": h,
                }
            )
        if "hub" in outgoing_late and "hub" not in project.systems:
            nodes.append(
                {
                    "id": "hub",
                    "kind": "hub",
                    "owner": None,
                    "purpose": "schedules and manual runs",
                    "health": worst(outgoing.get("hub", []) + (["late"] if outgoing_late["hub"] else [])),
                }
            )
        return {"nodes": nodes, "edges": edges}

    def _batch_edge(self, spec: FlowSpec, src: str, source: dict[str, Any] | None) -> dict[str, Any]:
        assert spec.batch is not None
        batch = self._batch(spec) or {}
        last = batch.get("last_run")
        healths = (["failing"] if last and last["status"] != "ok" else []) + (
            [source["health"]] if source else []
        )
        return {
            "id": f"{spec.name}/batch",
            "flow": spec.name,
            "destination": spec.batch.to.table,
            "source": src,
            "target": spec.batch.to.system,
            "trigger": self._trigger(spec),
            "state": "active",
            "health": worst(healths),
            "source_state": source["state"] if source else None,
            "source_error": (last["error"] if last and last["status"] != "ok" else None)
            or (source["error"] if source and source["state"] != "active" else None),
        }
