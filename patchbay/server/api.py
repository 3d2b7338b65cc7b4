"""The REST API under /api/v1: what the console shows and does, behind scoped tokens, every change audited.

Each endpoint is one row of `Api.endpoints()`: route, scope, models. One wrapper does the rest in a
fixed order: authenticate (401), check the scope (403), validate path, query and body (400/422),
run the handler, validate the answer against its model. Errors are JSON `{"error", "message"}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from patchbay.config.models import SecretRef
from patchbay.config.project import FlowSpec, SystemSpec, system_secret_refs
from patchbay.engine.hub import Hub
from patchbay.engine.replay import ReplayReport, find_replayable, tx_replay
from patchbay.security.tokens import (
    TokenError,
    TokenInfo,
    ensure_schema,
    parse_bearer,
    q_tokens,
    tx_create_token,
    tx_revoke_token,
    tx_touch,
    verify,
)
from patchbay.server import api_models as m
from patchbay.server.openapi import Endpoint, build_openapi
from patchbay.store import api_queries as aq
from patchbay.store.queries import RunFilter, counts, get_run, list_runs
from patchbay.store.sqlite import q_destination_states, tx_audit, tx_reset_cursor

log = logging.getLogger("patchbay.api")

PREFIX = "/api/v1"
MAX_BODY = 256 * 1024
TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per token
REPLAY_CHUNK = 200  # events replayed per store transaction
_OPENAPI: dict[str, Any] = {}
SEVERITY = {"ok": 0, "retrying": 1, "late": 2, "paused": 3, "failing": 4}
_SENSITIVE_KEY = re.compile(
    r"passw|secret|token|authori[sz]ation|api[_-]?key|credential|private|cookie", re.I
)
_NOT_SENSITIVE = ("url", "header", "path", "name", "field", "_s")  # e.g. token_url, api_key_header
REDACTED = "[redacted]"


class _Ref(dict):  # type: ignore[type-arg]
    """A secret reference in dumped config: shown by name, never masked and never resolved."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        super().__init__(message)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"error": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _json(status: int, data: Any) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@dataclass
class Call:
    """One authenticated request, its validated input, and who made it."""

    request: web.Request
    token: TokenInfo
    path: Any
    query: Any
    body: Any

    @property
    def origin(self) -> str:
        return self.request.remote or ""

    @property
    def actor(self) -> str:
        return self.token.actor

    @property
    def who(self) -> dict[str, str]:
        return {"token_id": self.token.id, "token_name": self.token.name}


def worst(healths: list[str]) -> str:
    return max(healths, key=lambda h: SEVERITY[h], default="ok")


class Api:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._schema_ready = False
        self._touched: dict[str, float] = {}
        if not _OPENAPI:  # the same for every hub; building it takes a few hundred ms
            from importlib.metadata import PackageNotFoundError, version

            try:
                v = version("patchbay")
            except PackageNotFoundError:
                v = "0"
            doc = build_openapi(self.endpoints(), version=v)
            _OPENAPI.update(doc=doc, body=orjson.dumps(doc))
        self.openapi: dict[str, Any] = _OPENAPI["doc"]
        self._openapi_body: bytes = _OPENAPI["body"]

    # ================================================================== plumbing
    @property
    def store(self) -> Any:
        if self.hub.store is None:
            raise ApiError(503, "not_ready", "the hub is starting; try again in a moment")
        return self.hub.store

    async def authenticate(self, request: web.Request) -> TokenInfo:
        presented = parse_bearer(request.headers.get("Authorization"))
        store = self.store
        if not self._schema_ready:
            await store.write(ensure_schema)
            self._schema_ready = True
        info: TokenInfo = await store.read(verify, presented)
        now = time.time()
        if now - self._touched.get(info.id, 0.0) >= TOUCH_EVERY_S:
            self._touched[info.id] = now
            await store.write(tx_touch, info.id, now)
            info = dataclasses.replace(info, last_used_at=now)
        return info

    def wrap(self, ep: Endpoint) -> Any:
        async def handle(request: web.Request) -> web.Response:
            try:
                try:
                    token = await self.authenticate(request)
                except TokenError as exc:
                    challenge = 'Bearer realm="patchbay", error="invalid_token"'
                    return error_response(401, exc.code, str(exc), {"WWW-Authenticate": challenge})
                if not token.allows(ep.scope):
                    return error_response(
                        403,
                        "insufficient_scope",
                        f"this endpoint needs a token with scope {ep.scope}"
                        f"{'' if ep.scope == 'admin' else ' (or admin)'}; token {token.id} "
                        f"({token.name}) has {', '.join(token.scopes)}",
                        {
                            "WWW-Authenticate": f'Bearer realm="patchbay", error="insufficient_scope", '
                            f'scope="{ep.scope}"'
                        },
                        scope=ep.scope,
                    )
                path = _validate(ep.path_params, dict(request.match_info), "path")
                query = _validate(ep.query, _query_dict(request), "query") if ep.query is not None else None
                body = _validate(ep.body, await _read_json(request), "body") if ep.body is not None else None
                result = await ep.handler(Call(request, token, path, query, body))
                if ep.response is not None:
                    data = ep.response.model_validate(result).model_dump(mode="json")
                else:
                    data = result
                return _json(ep.status, data)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message, **exc.extra)
            except (asyncio.CancelledError, web.HTTPException):
                raise
            except Exception:
                log.exception("API %s %s failed", request.method, request.path)
                return error_response(
                    500, "internal_error", "the hub failed to answer this request; see its log"
                )

        handle.__name__ = ep.operation_id
        return handle

    def mount(self, app: web.Application) -> None:
        for ep in self.endpoints():
            app.router.add_route(ep.method, ep.path, self.wrap(ep))

        async def openapi(_: web.Request) -> web.Response:
            return web.Response(body=self._openapi_body, content_type="application/json")

        app.router.add_get(PREFIX + "/openapi.json", openapi)

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
                    out[name] = Api._dump(v)
            return out
        if isinstance(value, dict):
            return {str(k): Api._dump(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [Api._dump(v) for v in value]
        if isinstance(value, enum.Enum):
            return Api._dump(value.value)
        if value is None or isinstance(value, str | int | float | bool):
            return value
        text = getattr(value, "text", None)  # a compiled expression
        return text if isinstance(text, str) else str(value)

    async def _overview(self) -> dict[str, Any]:
        """Shared by flows, destinations and the map: live states, backlogs, schedules, lateness."""
        store = self.store
        now = time.time()
        backlog = await store.read(aq.destination_backlog, now)
        states = await store.read(q_destination_states)
        schedules = await store.read(aq.q_schedules)
        late = {name: self._late_s(fr.spec, schedules.get(name), now) for name, fr in self.hub.flows.items()}
        dests: dict[tuple[str, str], dict[str, Any]] = {}
        for name, fr in self.hub.flows.items():
            for d in fr.spec.destinations:
                w = fr.workers[d.name]
                b = backlog.get(
                    (name, d.name),
                    {"pending": 0, "retrying": 0, "dead": 0, "dead_last_hour": 0, "next_due_at": None},
                )
                _, reason, since = states.get((name, d.name), (w.state, None, None))
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
                    **b,
                }
        return {"now": now, "dests": dests, "late": late, "schedules": schedules}

    @staticmethod
    def _late_s(spec: FlowSpec, row: dict[str, Any] | None, now: float) -> float:
        from patchbay.engine.scheduler import late_after

        sched = spec.trigger.schedule
        if sched is None or not spec.enabled or not row or not row.get("next_due_at"):
            return 0.0
        over = now - row["next_due_at"]
        tolerance = max(60.0, late_after(sched))
        return round(over, 3) if over > tolerance else 0.0

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
        dests = [ov["dests"][(spec.name, d.name)] for d in spec.destinations]
        health = worst([d["health"] for d in dests] + (["late"] if ov["late"][spec.name] else []))
        return {
            "name": spec.name,
            "purpose": spec.purpose,
            "owner": spec.owner,
            "enabled": spec.enabled,
            "trigger": self._trigger(spec),
            "webhook_path": spec.webhook_path,
            "source_system": self._source_system(spec),
            "destinations": dests,
            "health": health,
            "stats": stats[spec.name],
        }

    # ================================================================== handlers: meta
    async def whoami(self, c: Call) -> Any:
        return {"token": c.token.as_dict()}

    # ================================================================== systems, flows, map
    async def list_systems(self, c: Call) -> Any:
        project = self.hub.project
        used: dict[str, list[str]] = {}
        for f in project.flows.values():
            source = self._source_system(f)
            names = {d.system for d in f.destinations} | ({source} if source else set())
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
        stats = await self.store.read(aq.flow_stats, list(self.hub.flows), ov["now"])
        return {"flows": [self._flow_summary(fr.spec, ov, stats) for fr in self.hub.flows.values()]}

    async def get_flow(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        spec: FlowSpec = fr.spec
        ov = await self._overview()
        stats = await self.store.read(aq.flow_stats, [spec.name], ov["now"])
        recent = await self.store.read(list_runs, RunFilter(flow=spec.name, limit=20))
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
        outgoing_late: dict[str, bool] = {}
        for name, fr in self.hub.flows.items():
            src = self._source_system(fr.spec) or "hub"
            outgoing_late[src] = outgoing_late.get(src, False) or bool(ov["late"][name])
            for d in fr.spec.destinations:
                dd = ov["dests"][(name, d.name)]
                edges.append(
                    {
                        "id": f"{name}/{d.name}",
                        "flow": name,
                        "destination": d.name,
                        "source": src,
                        "target": d.system,
                        "trigger": self._trigger(fr.spec),
                        "state": dd["state"],
                        "health": dd["health"],
                    }
                )
                incoming.setdefault(d.system, []).append(dd["health"])
        nodes = []
        for s in project.systems.values():
            h = worst(incoming.get(s.name, []) + (["late"] if outgoing_late.get(s.name) else []))
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
                    "health": "late" if outgoing_late["hub"] else "ok",
                }
            )
        return {"nodes": nodes, "edges": edges}

    # ================================================================== runs
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

    # ================================================================== dead letters
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

    # ================================================================== destinations, cursors, schedules
    async def list_destinations(self, c: Call) -> Any:
        ov = await self._overview()
        return {"destinations": list(ov["dests"].values())}

    async def _set_state(self, c: Call, target: str) -> Any:
        flow, dest = c.path.flow, c.path.destination
        w = self._worker(flow, dest)
        if (target == "active") == (w.state == "active"):
            return {"flow": flow, "destination": dest, "state": w.state, "changed": False}
        before = await self.store.read(aq.q_last_audit_id)
        was = w.state
        await self.hub.set_state(flow, dest, target, c.actor)
        # hub.set_state writes the audit row; add where the request came from and what the state was.
        await self.store.write(aq.tx_set_audit_origin, before, c.actor, c.origin, {**c.who, "was": was})
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

    async def get_cursor(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        row = await self.store.read(aq.q_cursor_row, fr.spec.name)
        return {
            "flow": fr.spec.name,
            "has_source": fr.spec.source is not None,
            "cursor": self._redact(row["value"]) if row else None,
            "updated_at": row["updated_at"] if row else None,
        }

    async def reset_cursor(self, c: Call) -> Any:
        fr = self._flow(c.path.flow)
        name = fr.spec.name

        def tx(conn: Any) -> bool:
            done = tx_reset_cursor(conn, name)
            tx_audit(conn, c.actor, "cursor.reset", name, {**c.who, "had_cursor": done}, c.origin)
            return done

        return {"flow": name, "reset": await self.store.write(tx)}

    async def list_schedules(self, c: Call) -> Any:
        ov = await self._overview()
        out = [self._schedule(n, ov["schedules"].get(n), ov["late"][n]) for n in self.hub.flows]
        return {"schedules": [s for s in out if s is not None]}

    # ================================================================== secrets
    def _usage(self) -> dict[str, list[str]]:
        project = self.hub.project
        used: dict[str, list[str]] = {}
        for f in project.flows.values():
            for ref in f.secret_refs(project.systems):
                if ref.secret and f.name not in used.setdefault(ref.secret, []):
                    used[ref.secret].append(f.name)
        return used

    async def _vault(self, required: bool) -> Any:
        from patchbay.security.project import open_project_secrets

        vault, _ = await asyncio.to_thread(open_project_secrets, self.hub.project.root)
        if vault is None and required:
            raise ApiError(
                409,
                "no_vault",
                "this project has no master key yet: run "
                f"`patchbay secrets init -p {self.hub.project.root}` on the hub's machine",
            )
        return vault

    async def list_secrets(self, c: Call) -> Any:
        vault = await self._vault(required=False)
        used = self._usage()
        infos = await asyncio.to_thread(vault.list) if vault is not None else []
        rows = [
            {
                "name": i.name,
                "stored": True,
                "created_at": i.created_at,
                "rotated_at": i.rotated_at,
                "version": i.version,
                "key_id": i.key_id,
                "used_by": used.get(i.name, []),
            }
            for i in infos
        ]
        stored = {i.name for i in infos}
        rows += [
            {
                "name": n,
                "stored": False,
                "created_at": None,
                "rotated_at": None,
                "version": None,
                "key_id": None,
                "used_by": used[n],
            }
            for n in sorted(set(used) - stored)
        ]
        return {"vault": vault is not None, "secrets": rows}

    async def put_secret(self, c: Call) -> Any:
        name = c.path.name
        vault = await self._vault(required=True)
        value = c.body.value

        def write() -> tuple[bool, int]:
            existed = any(i.name == name for i in vault.list())
            vault.set(name, value)
            version = next(i.version for i in vault.list() if i.name == name)
            return existed, version

        try:
            existed, version = await asyncio.to_thread(write)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        if self.hub.resolver is not None:
            self.hub.resolver.redactor.add(value)  # scrubbed from logs and excerpts from now on
        action = "secret.rotate" if existed else "secret.set"
        await self.store.write(tx_audit, c.actor, action, name, {**c.who, "version": version}, c.origin)
        log.info("%s %s via the API (%s)", action, name, c.actor)
        return {"name": name, "action": "rotated" if existed else "created", "version": version}

    async def delete_secret(self, c: Call) -> Any:
        name = c.path.name
        vault = await self._vault(required=True)
        users = self._usage().get(name, [])
        if users and not c.query.force:
            raise ApiError(
                409,
                "secret_in_use",
                f"{name} is used by {', '.join(users)}; change those flows or pass force=true",
            )
        if not await asyncio.to_thread(vault.delete, name):
            raise ApiError(404, "not_found", f"no secret {name!r}")
        detail = {**c.who, "used_by": users}
        await self.store.write(tx_audit, c.actor, "secret.delete", name, detail, c.origin)
        return {"name": name, "deleted": True}

    # ================================================================== audit, tokens
    async def list_audit(self, c: Call) -> Any:
        q: m.AuditQuery = c.query
        rows = await self.store.read(
            aq.q_audit, m.as_unix(q.since), m.as_unix(q.until), q.action, q.actor, q.target, q.limit
        )
        return {"entries": rows}

    async def list_tokens(self, c: Call) -> Any:
        return {"tokens": [t.as_dict() for t in await self.store.read(q_tokens)]}

    async def create_token(self, c: Call) -> Any:
        b: m.TokenCreate = c.body
        expires = time.time() + b.expires_in_s if b.expires_in_s is not None else None

        def tx(conn: Any) -> tuple[str, TokenInfo]:
            text, info = tx_create_token(conn, b.name, b.scopes, expires, c.actor)
            detail = {**c.who, "name": info.name, "scopes": list(info.scopes), "expires_at": expires}
            tx_audit(conn, c.actor, "token.create", info.id, detail, c.origin)
            return text, info

        try:
            text, info = await self.store.write(tx)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        return {**info.as_dict(), "token": text}

    async def revoke_token(self, c: Call) -> Any:
        tid = c.path.token_id

        def tx(conn: Any) -> TokenInfo | None:
            info = tx_revoke_token(conn, tid)
            if info is not None:
                tx_audit(conn, c.actor, "token.revoke", info.id, {**c.who, "name": info.name}, c.origin)
            return info

        info = await self.store.write(tx)
        if info is None:
            raise ApiError(404, "not_found", f"no token {tid!r}")
        return info.as_dict()

    # ================================================================== the table
    def endpoints(self) -> list[Endpoint]:
        E, P = Endpoint, PREFIX
        flow, dest = f"{P}/flows/{{flow}}", f"{P}/flows/{{flow}}/destinations/{{destination}}"
        return [
            E("GET", f"{P}/whoami", self.whoami, None, "The token making this call.", "meta", m.WhoAmI),
            E(
                "GET",
                f"{P}/systems",
                self.list_systems,
                "flows:read",
                "Systems: kind, owner, purpose, what they own.",
                "flows",
                m.SystemsOut,
            ),
            E(
                "GET",
                f"{P}/flows",
                self.list_flows,
                "flows:read",
                "Flows: trigger, owner, purpose, destinations, health, last run, success rate and p95 latency.",
                "flows",
                m.FlowsOut,
            ),
            E(
                "GET",
                flow,
                self.get_flow,
                "flows:read",
                "One flow: its definition (read-only, credentials redacted), delivery policies, recent runs.",
                "flows",
                m.FlowDetail,
                path_params=m.FlowPath,
            ),
            E(
                "GET",
                f"{P}/map",
                self.get_map,
                "flows:read",
                "The map: systems as nodes, flows as edges from source to destination, each with a health.",
                "flows",
                m.MapOut,
            ),
            E(
                "GET",
                f"{P}/runs",
                self.list_runs,
                "runs:read",
                "Runs, newest first, filtered.",
                "runs",
                m.RunsOut,
                query=m.RunsQuery,
            ),
            E(
                "GET",
                f"{P}/runs/{{run_id}}",
                self.get_run,
                "runs:read",
                "One run's trace: payload, each step, each destination's attempts.",
                "runs",
                m.RunDetail,
                path_params=m.RunPath,
            ),
            E(
                "GET",
                f"{P}/counts",
                self.counts,
                "runs:read",
                "Events and deliveries by status, overall and per flow.",
                "runs",
                m.CountsOut,
            ),
            E(
                "GET",
                f"{P}/dead-letters",
                self.list_dead,
                "runs:read",
                "Dead deliveries and quarantined events, grouped by flow, destination and reason.",
                "dead-letters",
                m.DeadLettersOut,
                query=m.DeadQuery,
            ),
            E(
                "POST",
                f"{P}/dead-letters/replay",
                self.replay,
                "runs:replay",
                "Replay selected runs, or all matching, through the flow as configured now.",
                "dead-letters",
                m.ReplayOut,
                body=m.ReplayRequest,
            ),
            E(
                "POST",
                f"{P}/dead-letters/discard",
                self.discard,
                "runs:replay",
                "Discard selected dead letters (status `discarded`); audited.",
                "dead-letters",
                m.DiscardOut,
                body=m.DiscardRequest,
            ),
            E(
                "GET",
                f"{P}/destinations",
                self.list_destinations,
                "flows:read",
                "Every destination: state, backlog, health, delivery policy.",
                "destinations",
                m.DestinationsOut,
            ),
            E(
                "POST",
                f"{dest}/pause",
                self.pause,
                "destinations:write",
                "Pause a destination: its deliveries wait in the store.",
                "destinations",
                m.DestinationStateOut,
                path_params=m.DestinationPath,
            ),
            E(
                "POST",
                f"{dest}/resume",
                self.resume,
                "destinations:write",
                "Resume a paused or disabled destination; waiting deliveries go in order of arrival.",
                "destinations",
                m.DestinationStateOut,
                path_params=m.DestinationPath,
            ),
            E(
                "GET",
                f"{flow}/cursor",
                self.get_cursor,
                "flows:read",
                "A flow's saved source cursor.",
                "state",
                m.CursorOut,
                path_params=m.FlowPath,
            ),
            E(
                "DELETE",
                f"{flow}/cursor",
                self.reset_cursor,
                "runs:replay",
                "Forget the source cursor: the next poll reads from the start (seen records are not repeated).",
                "state",
                m.CursorResetOut,
                path_params=m.FlowPath,
            ),
            E(
                "GET",
                f"{P}/schedules",
                self.list_schedules,
                "flows:read",
                "Scheduled flows: last and next run, lateness.",
                "state",
                m.SchedulesOut,
            ),
            E(
                "GET",
                f"{P}/secrets",
                self.list_secrets,
                "secrets:read",
                "Secret names, versions and the flows using them. Never values.",
                "secrets",
                m.SecretsOut,
            ),
            E(
                "PUT",
                f"{P}/secrets/{{name}}",
                self.put_secret,
                "secrets:write",
                "Set or rotate a secret. The value is never logged or echoed.",
                "secrets",
                m.SecretWriteOut,
                path_params=m.SecretPath,
                body=m.SecretWrite,
            ),
            E(
                "DELETE",
                f"{P}/secrets/{{name}}",
                self.delete_secret,
                "secrets:write",
                "Delete a secret; refused while flows use it unless force=true.",
                "secrets",
                m.SecretDeleteOut,
                path_params=m.SecretPath,
                query=m.SecretDeleteQuery,
            ),
            E(
                "GET",
                f"{P}/audit",
                self.list_audit,
                "admin",
                "The audit log, newest first. Read-only: there is no API to change it.",
                "admin",
                m.AuditOut,
                query=m.AuditQuery,
            ),
            E(
                "GET",
                f"{P}/tokens",
                self.list_tokens,
                "admin",
                "API tokens (never their secrets).",
                "admin",
                m.TokensOut,
            ),
            E(
                "POST",
                f"{P}/tokens",
                self.create_token,
                "admin",
                "Create a token; the answer shows it once.",
                "admin",
                m.TokenCreated,
                status=201,
                body=m.TokenCreate,
            ),
            E(
                "DELETE",
                f"{P}/tokens/{{token_id}}",
                self.revoke_token,
                "admin",
                "Revoke a token.",
                "admin",
                m.TokenOut,
                path_params=m.TokenPath,
            ),
        ]


# ====================================================================== input
def _validate(model: type[BaseModel] | None, data: Any, where: str) -> Any:
    if model is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {"loc": [where, *exc_loc], "msg": e["msg"]}
            for e in exc.errors()
            for exc_loc in [[x for x in e["loc"]]]
        ]
        first = details[0]
        at = ".".join(str(x) for x in first["loc"][1:]) or where
        raise ApiError(
            422,
            "invalid_request",
            f"{where} {at}: {first['msg']}" + (f" (and {len(details) - 1} more)" if len(details) > 1 else ""),
            details=details,
        ) from None


def _query_dict(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.query.items():
        if k in out:
            raise ApiError(
                422,
                "invalid_request",
                f"query parameter {k!r} is given more than once",
                details=[{"loc": ["query", k], "msg": "given more than once"}],
            )
        out[k] = v
    return out


async def _read_json(request: web.Request) -> Any:
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"body of {length} bytes is over the API limit of {MAX_BODY}")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, "body_too_large", f"body is over the API limit of {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    ctype = request.headers.get("Content-Type", "")
    if ctype and "json" not in ctype.split(";")[0].lower():
        raise ApiError(415, "unsupported_media_type", f"expected Content-Type application/json, got {ctype}")
    if not raw.strip():
        raise ApiError(400, "empty_body", "the body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def add_api(app: web.Application, hub: Hub) -> Api:
    """Mount the REST API (and its OpenAPI document) on the hub's aiohttp app."""
    api = Api(hub)
    api.mount(app)
    return api
