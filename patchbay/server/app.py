"""The aiohttp application of a hub and the `serve` loop with graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from patchbay.engine.hub import Hub
from patchbay.server.api import add_api
from patchbay.server.console import add_console
from patchbay.server.inbox import add_inbox
from patchbay.server.webhooks import WebhookEndpoint

log = logging.getLogger("patchbay.server")
HUB_KEY: web.AppKey[Hub] = web.AppKey("hub", Hub)
# What a request's head may be before aiohttp answers 400 without calling a handler: the request
# line, one header field, and the number of header lines. Bodies are limited by max_body_bytes.
HEADER_LIMITS: dict[str, Any] = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 100}


def make_app(hub: Hub) -> web.Application:
    settings = hub.project.settings
    app = web.Application(client_max_size=settings.max_body_bytes + 1)
    for flow in hub.project.flows.values():
        path = flow.webhook_path
        if path is not None:
            app.router.add_post(path, WebhookEndpoint(hub, flow).handle)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            assert hub.store is not None
            await asyncio.wait_for(hub.store.destination_states(), 2.0)
        except Exception as exc:
            return web.json_response(
                {"status": "unavailable", "reason": f"store: {type(exc).__name__}"}, status=503
            )
        stopped = hub.not_running()
        if stopped:
            return web.json_response(
                {"status": "unavailable", "reason": "not running: " + ", ".join(stopped)}, status=503
            )
        return web.json_response({"status": "ready", "flows": len(hub.flows)})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=hub.metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if settings.demo_inbox:
        add_inbox(app, hub.project.root / "inbox")
    add_api(app, hub)  # /api/v1: REST API behind scoped tokens, and its OpenAPI document
    add_console(app, hub)  # /console/: the web console (static files calling /api/v1)
    app[HUB_KEY] = hub
    return app


async def run_hub(hub: Hub, *, host: str, port: int, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT: then stop accepting, let in-flight work finish, close the store."""
    await hub.start()
    app = make_app(hub)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **HEADER_LIMITS)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
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
        await stop.wait()
    finally:
        log.info(
            "stopping: no new requests; finishing in-flight deliveries (up to %gs)",
            hub.project.settings.shutdown_grace_s,
        )
        await site.stop()
        await hub.stop()
        await runner.cleanup()
        log.info("stopped; pending work stays in the store for the next start")
