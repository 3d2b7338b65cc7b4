"""What every resource's handlers share: the hub and its store, lookups, redaction, the live overview."""

from __future__ import annotations

import enum
import re
import time
from typing import Any

from pydantic import BaseModel

from patchbay.config.models import SecretRef
from patchbay.config.project import FlowSpec
from patchbay.engine.hub import Hub
from patchbay.engine.pipeline import CALL_PREFIX
from patchbay.server.api.http import ApiError
from patchbay.store.base import Store

SEVERITY = {"ok": 0, "retrying": 1, "late": 2, "paused": 3, "failing": 4}
_SENSITIVE_KEY = re.compile(
    r"passw|secret|token|authori[sz]ation|api[_-]?key|credential|private|cookie", re.I
)
_NOT_SENSITIVE = ("url", "header", "path", "name", "field", "_s")  # e.g. token_url, api_key_header
REDACTED = "[redacted]"


class _Ref(dict):  # type: ignore[type-arg]
    """A secret reference in dumped config: shown by name, never masked and never resolved."""


def worst(healths: list[str]) -> str:
    return max(healths, key=lambda h: SEVERITY[h], default="ok")


class Resource:
    """Base of one resource's handlers."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @property
    def store(self) -> Store:
        if self.hub.store is None:
            raise ApiError(503, "not_ready", "the hub is starting; try again in a moment")
        return self.hub.store

    # ================================================================== lookups
    def _flow(self, name: str) -> Any:
        fr = self.hub.flows.get(name)
        if fr is None:
            known = ", ".join(sorted(self.hub.flows)) or "none"
            raise ApiError(404, "not_found", f"no flow {name!r}; flows: {known}")
        return fr

    def _worker(self, flow: str, dest: str) -> Any:
        fr = self._flow(flow)
        w = fr.workers.get(dest)
        if w is None:
            raise ApiError(
                404,
                "not_found",
                f"flow {flow} has no destination {dest!r}; destinations: {', '.join(fr.workers)}",
            )
        return w

    def _redact(self, value: Any, key: str = "") -> Any:
        """Config or stored data as it may be shown: credential-like values and known secret values masked."""
        if isinstance(value, _Ref):  # a secret reference: its name is not a secret
            return dict(value)
        if isinstance(value, dict):
            return {k: self._redact(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redact(v, key) for v in value]
        if isinstance(value, str):
            if key and _SENSITIVE_KEY.search(key) and not key.lower().endswith(_NOT_SENSITIVE):
                return REDACTED
            redactor = self.hub.resolver.redactor if self.hub.resolver is not None else None
            return redactor(value) if redactor is not None else value
        return value

    @staticmethod
    def _dump(value: Any) -> Any:
        """A config model as plain JSON data; secret references stay recognisable as references."""
        if isinstance(value, SecretRef):
            return _Ref({k: v for k, v in (("secret", value.secret), ("env", value.env)) if v})
        if isinstance(value, BaseModel):
            out = {}
            for name in type(value).model_fields:
                v = getattr(value, name)
                if v is not None:
                    out[name] = Resource._dump(v)
            return out
        if isinstance(value, dict):
            return {str(k): Resource._dump(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [Resource._dump(v) for v in value]
        if isinstance(value, enum.Enum):
            return Resource._dump(value.value)
        if value is None or isinstance(value, str | int | float | bool):
            return value
        text = getattr(value, "text", None)  # a compiled expression
        return text if isinstance(text, str) else str(value)

    async def _overview(self) -> dict[str, Any]:
        """Shared by flows, destinations and the map: live states, backlogs, schedules, lateness."""
        store = self.store
        now = time.time()
        backlog = await store.destination_backlog(now)
        states = await store.destination_states()
        schedules = await store.schedules()
        late = {name: self._late_s(fr.spec, schedules.get(name), now) for name, fr in self.hub.flows.items()}
        dests: dict[tuple[str, str], dict[str, Any]] = {}
        for name, fr in self.hub.flows.items():
            for d in self._targets(fr):
                w = fr.workers[d.name]
                b = backlog.get(
                    (name, d.name),
                    {"pending": 0, "retrying": 0, "dead": 0, "dead_last_hour": 0, "next_due_at": None},
                )
                _, reason, since = states.get((name, d.name), (w.state, None, None))
                order_by = getattr(d, "order_by", None)
                if w.state != "active":
                    health = "paused"
                elif b["dead_last_hour"]:
                    health = "failing"
                elif late[name]:
                    health = "late"
                elif b["retrying"]:
                    health = "retrying"
                else:
                    health = "ok"
                dests[(name, d.name)] = {
                    "flow": name,
                    "name": d.name,
                    "system": d.system,
                    "kind": d.kind,
                    "state": w.state,
                    "reason": reason if w.state != "active" else None,
                    "since": since,
                    "health": health,
                    "in_flight": w.inflight,
                    "policy": d.policy,
                    "when": d.when.text if d.when is not None else None,
                    "order_by": order_by.text if order_by is not None else None,
                    # keys held back by a retrying or dead delivery, and why (store.held_keys)
                    "held_keys": await store.held_keys(name, d.name, 20) if order_by is not None else [],
                    "call": d.name.removeprefix(CALL_PREFIX) if d.name.startswith(CALL_PREFIX) else None,
                    **b,
                }
        return {"now": now, "dests": dests, "late": late, "schedules": schedules, "sources": self._sources()}

    def _targets(self, fr: Any) -> list[Any]:
        """What a flow sends to: its destinations, then a `call:<step>` per call or lookup step (each has a
        worker, a backlog, a state; a paused or failing call shows and colours the map like a destination)."""
        from patchbay.engine.calls import call_destinations

        calls = [d for d in call_destinations(fr.spec, self.hub.project) if d.name in fr.workers]
        return [*fr.spec.destinations, *calls]

    def _sources(self) -> dict[str, dict[str, Any]]:
        """Each source's (or schedule's) health, from the hub: ok, retrying, failing or paused."""
        from patchbay.engine.sources import health_of

        return {name: {**vars(s), "health": health_of(s)} for name, s in self.hub.source_states().items()}

    @staticmethod
    def _late_s(spec: FlowSpec, row: dict[str, Any] | None, now: float) -> float:
        from patchbay.engine.scheduler import late_by

        sched = spec.trigger.schedule
        if sched is None or not spec.enabled or not row:
            return 0.0
        return round(late_by(sched, row.get("next_due_at"), now), 3)

    @staticmethod
    def _trigger(spec: FlowSpec) -> str:
        if spec.trigger.webhook is not None:
            return "webhook"
        if spec.source is not None:
            return "source"
        if spec.trigger.schedule is not None:
            return "schedule"
        return "manual"

    @staticmethod
    def _source_system(spec: FlowSpec) -> str | None:
        if spec.trigger.webhook is not None:
            return spec.trigger.webhook.system
        if spec.batch is not None:
            return spec.batch.from_.system
        return spec.source.system if spec.source is not None else None

    def _schedule(self, name: str, row: dict[str, Any] | None, late: float) -> dict[str, Any] | None:
        fr = self.hub.flows[name]
        s = fr.spec.trigger.schedule
        if s is None:
            return None
        row = row or {}
        return {
            "flow": name,
            "cron": s.cron,
            "every_s": s.every,
            "timezone": s.timezone,
            "catch_up": s.catch_up,
            "last_started_at": row.get("last_started_at"),
            "last_finished_at": row.get("last_finished_at"),
            "last_status": row.get("last_status"),
            "last_error": row.get("last_error"),
            "next_due_at": row.get("next_due_at"),
            "runs": row.get("runs") or 0,
            "late_s": late,
            "running": bool(fr.schedule is not None and fr.schedule.running),
        }

    def _flow_summary(self, spec: FlowSpec, ov: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
        dests = [ov["dests"][(spec.name, d.name)] for d in self._targets(self.hub.flows[spec.name])]
        source = ov["sources"].get(spec.name)
        batch = self._batch(spec)
        health = worst(
            [d["health"] for d in dests]
            + (["late"] if ov["late"][spec.name] else [])
            + ([source["health"]] if source else [])
            + (["failing"] if batch and batch["last_run"] and batch["last_run"]["status"] != "ok" else [])
        )
        return {
            "name": spec.name,
            "purpose": spec.purpose,
            "owner": spec.owner,
            "enabled": spec.enabled,
            "trigger": self._trigger(spec),
            "webhook_path": spec.webhook_path,
            "source_system": self._source_system(spec),
            "destinations": dests,
            "source_health": source,
            "health": health,
            "stats": stats[spec.name],
            "batch": batch,
            "open_windows": self.hub.windows.open_windows(spec) if self.hub.windows is not None else None,
        }

    def _batch(self, spec: FlowSpec) -> dict[str, Any] | None:
        """A batch flow's run going now and its latest run (its error redacted)."""
        runs = self.hub.batch
        if spec.batch is None or runs is None:
            return None
        live = runs.running.get(spec.name)
        last = runs.last.get(spec.name)
        b = spec.batch
        reads = f"{b.from_.system} table {b.from_.table}" if b.from_.table else f"{b.from_.system} (a query)"
        return {
            "reads": reads,
            "writes": f"{b.to.system} table {b.to.table}",
            "running": live.view() if live is not None else None,
            "last_run": {
                "run_id": last.run_id,
                "status": last.status,
                "error": self._redact(last.error),
                "at": last.at,
            }
            if last is not None
            else None,
        }
