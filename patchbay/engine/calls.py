"""Calls inside flows: a call step's request is sent by a delivery worker of its own, and its answer
continues the run in the store transaction that records it (store `record_calls`).

A call to `call:<step>` is a delivery like any other: fed from the store in arrival order, sent with
its idempotency key (`<event>.<step>`, `<event>.<i>.<step>` after a split), classified by the same
policy (retry with backoff, dead letter, pause on 401/403). What differs is what its success does:
the flow runs again from the stored payload with every recorded answer bound, and the deliveries it
now makes are written with the answer. Nothing waits in memory: a restart finds the pending call,
or the continued run, on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from patchbay import registry
from patchbay.config.models import DeliveryPolicy
from patchbay.config.project import DestinationSpec, FlowSpec, Project
from patchbay.connectors.base import Outcome, OutcomeClass, Resources, Sink
from patchbay.connectors.sql_client.lookup import SqlLookup, is_sql_source
from patchbay.engine.delivery import DestinationWorker
from patchbay.engine.pipeline import CALL_PREFIX
from patchbay.security.secrets import SecretResolver
from patchbay.store.base import AttemptResult, CachedAnswer, Reprocessor, Store

log = logging.getLogger("patchbay.calls")
ANSWER = {
    "status": "status",
    "body": "body",
}  # what is kept of an answer: bound as `<as>.status`, `<as>.body`


def call_steps(flow: FlowSpec) -> list[Any]:
    """The flow's steps that ask a system (call, lookup)."""
    return [s for s in flow.steps if getattr(s.step, "calls", False)]


class CallSink:
    """The connector that sends a call, read as a call: `on_404: continue` makes a 404 an answer, and
    a cached answer (`cache:`) is used instead of sending."""

    def __init__(self, inner: Sink, step: Any, scope: str) -> None:
        self.inner = inner
        self.step = step
        self.scope = scope  # the cache's scope: flow and step
        self.store: Store | None = None  # set by the hub for the cache
        self.to_cache: list[CachedAnswer] = []  # answers the worker writes with its next results
        self.policy = getattr(inner, "policy", None)

    def render(self, record: Any, key: str) -> dict[str, Any]:
        return self.inner.render(record, key)

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        cache_key = request.get("cache_key")
        cache = self.step.config.cache
        if cache_key is not None and cache is not None and self.store is not None:
            hit = await self.store.cached_answer(self.scope, str(cache_key), time.time())
            if hit is not None:
                return Outcome(OutcomeClass.SUCCESS, hit.get("status"), 0.0, "(cached answer)", fields=hit)
        outcome = await self.inner.send({k: v for k, v in request.items() if k != "cache_key"}, key)
        if (
            outcome.cls is OutcomeClass.TERMINAL
            and outcome.status_code == 404
            and self.step.config.on_404 == "continue"
        ):
            outcome = Outcome(
                OutcomeClass.SUCCESS,
                404,
                outcome.latency_ms,
                outcome.excerpt,
                fields={"status": 404, "body": None},
            )
        if outcome.cls is OutcomeClass.SUCCESS and outcome.fields is None:
            outcome.fields = {"status": outcome.status_code, "body": None}
        if outcome.fields is not None and any(k.startswith(HEADER) for k in outcome.fields):
            fields = dict(outcome.fields)
            kept = {k[len(HEADER) :]: fields.pop(k) for k in list(fields) if k.startswith(HEADER)}
            outcome.fields = {**fields, "headers": kept}
        if (
            outcome.cls is OutcomeClass.SUCCESS
            and cache_key is not None
            and cache is not None
            and self.store is not None
        ):
            # Kept with the next recorded attempts of this call (one write); a crash before forgets it,
            # which only costs asking again.
            self.to_cache.append(
                CachedAnswer(self.scope, str(cache_key), outcome.fields or {}, time.time() + cache.ttl)
            )
        return outcome

    async def close(self) -> None:
        await self.inner.close()


def build_call_sinks(
    flow: FlowSpec,
    project: Project,
    resolver: SecretResolver,
    resources: Resources | None,
    system_resources: Callable[..., Resources],
) -> dict[str, Sink]:
    """One sender per call step (`call:<step>`), built by its system's connector."""
    out: dict[str, Sink] = {}
    for spec in call_steps(flow):
        cfg = spec.config
        system = project.systems[cfg.system]
        res = system_resources(project, resolver, system, flow.name, resources)
        inner: Any
        if getattr(cfg, "query", None) is not None:  # a lookup's SELECT, on the system's read connection
            found = registry.connector_for(system.kind or "", "source")
            assert found is not None and is_sql_source(found[0])
            inner = SqlLookup(found[0], system.config, spec.step, policy_of(cfg, project), res)
        else:
            found = registry.connector_for(system.kind or "", "destination")
            assert found is not None
            cls, config_model = found
            sink_config = config_model.model_validate(call_request(cfg))
            inner = cls(system.config, sink_config, policy_of(cfg, project), res)
        out[CALL_PREFIX + spec.name] = CallSink(inner, spec.step, f"{flow.name}/{spec.name}")  # type: ignore[assignment]
    return out


HEADER = "header:"  # a kept answer header among the connector's response fields


def call_request(cfg: Any) -> dict[str, Any]:
    """A call step's settings as its connector's destination settings, keeping status, body and headers."""
    kept = {f"{HEADER}{h}": f"headers.{h}" for h in getattr(cfg, "headers_kept", [])}
    out: dict[str, Any] = {
        "method": cfg.method,
        "path": cfg.path,
        "headers": cfg.headers,
        "response": {**ANSWER, **kept},
    }
    if cfg.body is not None:
        out["body"] = cfg.body
    return out


def policy_of(cfg: Any, project: Project) -> DeliveryPolicy:
    """A call's delivery policy: the hub's, with the step's `delivery:` overrides."""
    return project.settings.delivery.merged(getattr(cfg, "delivery", None))


def call_destinations(flow: FlowSpec, project: Project) -> list[DestinationSpec]:
    """A destination spec per call step, for its worker: the hub's delivery policy."""
    return [
        DestinationSpec(
            CALL_PREFIX + s.name,
            s.config.system,
            project.systems[s.config.system].kind or "",
            s.config,
            policy_of(s.config, project),
        )
        for s in call_steps(flow)
    ]


class CallWorker(DestinationWorker):
    """A destination worker whose successes continue their runs (store `record_calls`)."""

    def __init__(
        self, *args: Any, pipeline: Reprocessor, on_continued: Callable[[list[str]], None], **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.pipeline = pipeline
        self.on_continued = on_continued

    async def _store_record(self, results: list[AttemptResult]) -> None:
        cache: list[CachedAnswer] = []
        if isinstance(self.sink, CallSink):
            cache, self.sink.to_cache = self.sink.to_cache, []
        try:
            continued = await self.store.record_calls(results, self.pipeline, cache)
        except BaseException:
            if isinstance(self.sink, CallSink):
                self.sink.to_cache[:0] = cache  # written with the results that are recorded again
            raise
        added = sorted({d for _, ds in continued for d in ds})
        if added:
            self.on_continued(added)
