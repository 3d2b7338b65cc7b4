"""The aiohttp application of a hub and the `serve` loop with graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from patchbay.engine.batch_runs import LastRun
from patchbay.engine.hub import Hub
from patchbay.engine.roles import SCHEDULER, WEB, WORKER
from patchbay.engine.waiting import wait_set
from patchbay.server.api import add_api
from patchbay.server.console import add_console
from patchbay.server.inbox import add_inbox
from patchbay.server.oauth import add_oauth
from patchbay.server.webhooks import WebhookEndpoint
from patchbay.store.base import SourceState
from patchbay.store.sqlite import StoreLocked

log = logging.getLogger("patchbay.server")
HUB_KEY: web.AppKey[Hub] = web.AppKey("hub", Hub)
# What a request's head may be before aiohttp answers 400 without calling a handler: the request
# line, one header field, and the number of header lines. Bodies are limited by max_body_bytes.
HEADER_LIMITS: dict[str, Any] = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 100}
# After the in-flight requests and deliveries are done, how long a connection may take to close.
CLOSE_TIMEOUT_S = 1.0
HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    431: "headers_too_large",
}


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The error shape of every answer the hub gives: `{"error": code, "message": ...}`."""
    body = orjson.dumps({"error": code, "message": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class Gate:
    """Admits requests while the hub serves. Once closed, every new request is refused at once with 503
    (before it can reach the store), and the requests already admitted can be waited for."""

    def __init__(self) -> None:
        self.closed = False
        self.inflight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        self.closed = True

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for the admitted requests; cancel the ones left and return how many."""
        await wait_set(self._idle, timeout)
        left = [t for t in self.inflight if not t.done()]
        for t in left:
            t.cancel()
        return len(left)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.closed:
            resp = json_error(
                503,
                "shutting_down",
                "the hub is stopping and takes no new requests; nothing was stored; send it again later",
                {"Retry-After": "30"},
            )
            resp.force_close()
            return resp
        task = asyncio.current_task()
        assert task is not None
        self.inflight.add(task)
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.inflight.discard(task)
            if not self.inflight:
                self._idle.set()


GATE_KEY: web.AppKey[Gate] = web.AppKey("gate", Gate)


@web.middleware
async def json_http_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (no such path, method not allowed, body too large) in the hub's JSON shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Keep what the raiser set (Allow, security headers); the body and its type are ours.
        drop = ("content-type", "content-length")
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in drop}
        if exc.status == 404:
            msg = f"no endpoint {request.path}"
            if request.path.startswith("/api/"):
                msg += "; see /api/v1/openapi.json"
        elif exc.status == 405:
            msg = (
                f"{request.method} is not allowed on {request.path}; allowed: {exc.headers.get('Allow', '')}"
            )
        else:
            msg = exc.reason
        return json_error(exc.status, HTTP_ERROR_CODES.get(exc.status, "http_error"), msg, headers)


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse in the JSON error shape."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # a failure of the hub: logged with its traceback by aiohttp
            super().handle_error(request, status, exc, message)
            resp = json_error(500, "internal_error", "the hub failed to answer this request; see its log")
        else:  # the client's fault (a NUL byte in a header, a bad request line): one line, no traceback
            # The parser's message ends with the offending bytes, which may hold a credential: keep its first
            # line, up to the colon before the data.
            what = (message or str(exc) or "malformed request").splitlines()[0].split(":")[0][:200]
            log.info("refused a malformed request from %s: %d %s", request.remote, status, what)
            if request.writer.output_size > 0:
                raise ConnectionError("the response was started; cannot send the error")
            code = HTTP_ERROR_CODES.get(status, "bad_request")
            resp = json_error(status, code, f"the request could not be parsed: {what}; nothing was stored")
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class HubRunner(web.AppRunner):
    """The app's runner: its connections answer unparsable requests as JSON (see `_RequestHandler`)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server; only the connection handler it creates differs
        return server


def make_runner(app: web.Application) -> HubRunner:
    return HubRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=CLOSE_TIMEOUT_S, **HEADER_LIMITS
    )


def make_app(hub: Hub) -> web.Application:
    """The hub's app. A process without the web role (`serve --role worker,...`) answers /healthz, /readyz
    and /metrics only, so it can be probed; webhooks, the API and the console are the web role's."""
    settings = hub.project.settings
    gate = Gate()
    app = web.Application(
        client_max_size=settings.max_body_bytes + 1, middlewares=[gate.middleware, json_http_errors]
    )
    app[GATE_KEY] = gate
    web_role = hub.node.runs(WEB)
    for flow in hub.project.flows.values() if web_role else ():
        path = flow.webhook_path
        if path is not None:
            app.router.add_post(path, WebhookEndpoint(hub, flow).handle)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def answer(body: dict[str, Any], parts: dict[str, str], status: int = 200) -> web.Response:
        """Every answer names this node, its roles and the state of each part it runs."""
        node = {"node": hub.node.id, "roles": list(hub.node.role_names), "parts": parts}
        return web.json_response({**body, **node}, status=status)

    async def readyz(_: web.Request) -> web.Response:
        parts = {"store": "ok", **dict.fromkeys(hub.node.role_names, "ok")}
        try:
            assert hub.store is not None
            await asyncio.wait_for(hub.store.destination_states(), 2.0)
        except Exception as exc:
            parts["store"] = f"unreachable: {type(exc).__name__}"
            return answer({"status": "unavailable", "reason": f"store: {type(exc).__name__}"}, parts, 503)
        problem = hub.store.problem if hub.store is not None else None
        if problem:  # writes fail (disk full, I/O error): nothing new can be accepted or recorded
            parts["store"] = f"writes fail: {problem}"
            return answer({"status": "unavailable", "reason": f"store: writes fail: {problem}"}, parts, 503)
        stopped = hub.not_running()
        for what in stopped:
            part = (
                "store" if what == "store writer" else WORKER if what.startswith("delivery ") else SCHEDULER
            )
            parts[part] = ("not running: " if parts.get(part, "ok") == "ok" else parts[part] + ", ") + what
        if stopped:
            return answer(
                {"status": "unavailable", "reason": "not running: " + ", ".join(stopped)}, parts, 503
            )
        sources = hub.unhealthy_sources()
        batches = hub.failing_batches()
        if sources or batches:
            # Webhooks are still taken (a 503 would stop every flow behind a load balancer), but what is
            # broken says so: a failing source is never silently "ready". The upstream's own error text
            # stays behind the API's tokens (this endpoint is public).
            problems = {flow: _source_problem(s) for flow, s in sorted(sources.items())}
            for flow, last in batches.items():
                waits = flow in sources and sources[flow].state in ("paused", "stopped")
                problems[flow] = _batch_problem(flow, last) + (
                    f"; its schedule waits for `patchbay resume {flow}` or a good run" if waits else ""
                )
            return answer(
                {"status": "degraded", "flows": len(hub.flows), "problems": dict(sorted(problems.items()))},
                parts,
            )
        return answer({"status": "ready", "flows": len(hub.flows)}, parts)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=hub.metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app[HUB_KEY] = hub
    if not web_role:
        return app
    if settings.demo_inbox:
        add_inbox(app, hub.project.root / "inbox")
    add_api(app, hub)  # /api/v1: REST API behind scoped tokens, and its OpenAPI document
    add_console(app, hub)  # /console/: the web console (static files calling /api/v1)
    add_oauth(app, hub)  # /oauth/callback: finishes `patchbay connect SYSTEM`
    return app


def _batch_problem(flow: str, last: LastRun) -> str:
    return (
        f"batch run {last.run_id} {last.status} (nothing written); `patchbay runs show {last.run_id}` says why,"
        " a good run clears it"
    )


def _source_problem(s: SourceState) -> str:
    runs = f"{s.failures} failed run{'s' if s.failures != 1 else ''} in a row"
    if s.state == "paused":
        return (
            f"source paused after an authentication error ({runs}); fix it, then `patchbay resume {s.flow}`"
        )
    if s.state == "stopped":
        return f"source stopped after an error that retrying will not fix ({runs}); fix it, then `patchbay resume {s.flow}`"
    return f"source failing: {runs}, retried with backoff; `patchbay state {s.flow}` shows why"


async def run_hub(hub: Hub, *, host: str, port: int, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT: then stop accepting, let in-flight work finish, close the store."""
    await hub.start()
    app = make_app(hub)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    hub.serving_on(bound)
    # Everything loaded so far (config models, connectors, the app) lives as long as the process: keep it
    # out of the collector's generations, so a full collection under load does not stall acknowledgements.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready:
        on_ready(bound)
    try:
        # A SIGTERM, or another process took this node id while this one was paused (hub.displaced).
        stopping = [asyncio.ensure_future(e.wait()) for e in (stop, hub.displaced)]
        try:
            await asyncio.wait(stopping, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in stopping:
                f.cancel()
    finally:
        # The order matters: refuse new requests (503) while still listening, so no client that reaches us
        # goes unanswered; let the admitted requests finish while the store still writes; stop the engine
        # and close the store; only then stop listening and close the kept-alive connections.
        grace = hub.project.settings.shutdown_grace_s
        gate = app[GATE_KEY]
        gate.close()
        log.info(
            "stopping: new requests are refused with 503; finishing in-flight requests and deliveries "
            "(up to %gs)",
            grace,
        )
        cancelled = await gate.drain(grace)
        if cancelled:
            what = "1 request" if cancelled == 1 else f"{cancelled} requests"
            log.warning("cancelled %s still unfinished after %gs", what, grace)
        await hub.stop()
        await runner.cleanup()
        log.info("stopped; pending work stays in the store for the next start")
    if hub.displaced.is_set():
        assert hub.row is not None
        raise StoreLocked(
            f"node {hub.row.id}: another process took this node id while this one was not heard from; stopped."
            " Give every process its own --node (or PATCHBAY_NODE_ID)"
        )
