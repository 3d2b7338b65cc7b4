"""`GET /oauth/callback`: where an OAuth2 provider sends the browser after `patchbay connect SYSTEM`.

The route needs no API token (a browser follows a redirect to it); what authorizes it is the `state`
that `patchbay connect` kept in the vault: unguessable, bound to one system, good once, for
`oauth2.PENDING_TTL_S`. The answer names the system and what to do next, never a code or a token.
"""

from __future__ import annotations

import asyncio
import html
import logging

from aiohttp import web

from patchbay.config.project import system_secret_refs
from patchbay.connectors import oauth2_client as oauth2
from patchbay.connectors.base import Resources
from patchbay.engine.hub import Hub

log = logging.getLogger("patchbay.oauth2")
CALLBACK_PATH = "/oauth/callback"


def _page(status: int, title: str, text: str) -> web.Response:
    body = "<!doctype html><meta charset=utf-8><title>Patchbay: {t}</title><h1>{t}</h1><p>{x}</p>".format(
        t=html.escape(title), x=html.escape(text)
    )
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


def add_oauth(app: web.Application, hub: Hub) -> None:
    async def callback(request: web.Request) -> web.Response:
        from patchbay.security.project import open_project_secrets

        q = request.query
        vault, _ = await asyncio.to_thread(open_project_secrets, hub.project.root)
        if vault is None:
            return _page(400, "Not connected", "this project has no vault; run `patchbay secrets init`")
        try:
            pending = await asyncio.to_thread(oauth2.take_pending, vault, q.get("state", ""))
        except oauth2.OAuth2Error as exc:
            return _page(400, "Not connected", str(exc))
        system = hub.project.systems.get(pending.system)
        auth = getattr(system.config, "auth", None) if system is not None else None
        if system is None or auth is None or auth.scheme != oauth2.AUTHORIZATION_CODE:
            return _page(
                400, "Not connected", f"system {pending.system} no longer uses OAuth2 authorization code"
            )
        if "error" in q:  # the user said no, or the provider refused (RFC 6749 §4.1.2.1)
            what = hub.resources.redact(q.get("error", "")[:100])
            log.warning("connecting system %s: the provider answered %s", pending.system, what)
            return _page(
                400, "Not connected", f"{pending.system}: the provider answered {what}; nothing was stored"
            )
        code = q.get("code", "")
        if not code:
            return _page(400, "Not connected", "the callback has no `code`; nothing was stored")
        assert hub.resolver is not None
        res = Resources(
            http=hub.resources.http,
            secret=hub.resolver.scoped(system_secret_refs(system)),
            redact=hub.resolver.redactor,
            extra={"root": hub.project.root},
            system=system.name,
            allow_private=system.common.allow_private_network,
            allow_networks=tuple(system.common.allow_networks),
        )
        from patchbay.connectors.http_client import HttpClient

        client = HttpClient(
            res,
            auth=auth,
            verify_tls=getattr(system.config, "verify_tls", True),
            ca_bundle=getattr(system.config, "ca_bundle", None),
        )
        try:
            await oauth2.finish(res, auth, pending, code, tls=client.tls)
        except oauth2.OAuth2Error as exc:
            log.warning("connecting system %s failed: %s", pending.system, exc)
            return _page(502 if not exc.refused else 400, "Not connected", str(exc))
        log.info("system %s connected: its OAuth2 tokens are in the vault", pending.system)
        return _page(
            200,
            f"{pending.system} connected",
            f"Patchbay can now call {pending.system}. You may close this window. Destinations that were "
            "paused for lack of a grant resume with `patchbay resume FLOW DESTINATION`.",
        )

    app.router.add_get(CALLBACK_PATH, callback)
