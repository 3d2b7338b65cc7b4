"""A local receiver for demos and first runs: POST /_inbox/<name> appends the request to inbox/<name>.jsonl."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import orjson
from aiohttp import web

log = logging.getLogger("patchbay.inbox")


def add_inbox(app: web.Application, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)

    async def receive(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not re.match(r"^[a-z0-9_\-]{1,64}$", name):
            return web.json_response({"error": "bad_name"}, status=404)
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        line = {
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": request.method,
            "idempotency_key": request.headers.get("Idempotency-Key"),
            "body": body,
        }
        with (folder / f"{name}.jsonl").open("ab") as f:
            f.write(orjson.dumps(line) + b"\n")
        log.info("inbox %s received %s", name, orjson.dumps(body).decode()[:200])
        return web.json_response({"ok": True, "id": line["idempotency_key"]}, status=201)

    async def show(request: web.Request) -> web.Response:
        path = folder / f"{request.match_info['name']}.jsonl"
        text = path.read_text() if path.exists() else ""
        return web.Response(text=text, content_type="application/x-ndjson")

    app.router.add_route("*", "/_inbox/{name}", receive)
    app.router.add_get("/_inbox/{name}.jsonl", show)
