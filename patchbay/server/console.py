"""The web console: the static files in console/ under /console/, with strict security headers.

The console is plain HTML, CSS and ES modules that call /api/v1 with the token the user pastes in;
there is no build step and nothing is fetched from anywhere but the hub. The files are read once,
when the app is made, and only those files are served: no path from a request ever reaches the
file system, so `..`, encoded separators and symlinks cannot name anything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from patchbay.engine.hub import Hub

CONSOLE_DIR = Path(__file__).with_name("console")
PREFIX = "/console/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}
# Scripts, styles, images and API calls come from the hub itself; no inline code, no frames, no plugins.
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# The file names do not change between releases, so browsers revalidate every time (a 304 by ETag).
CACHE_CONTROL = "no-cache"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(folder: Path = CONSOLE_DIR) -> dict[str, Asset]:
    """The console's files by name: regular files directly in `folder` with a known type."""
    assets: dict[str, Asset] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        ctype = CONTENT_TYPES.get(path.suffix.lower())
        if ctype is None or not path.is_file() or path.is_symlink() or path.name.startswith("."):
            continue
        body = path.read_bytes()
        assets[path.name] = Asset(body, ctype, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return assets


def add_console(app: web.Application, hub: Hub) -> None:
    """Serve the console at /console/ and send / there."""
    assets = load_assets()

    def not_found() -> web.Response:
        raise web.HTTPNotFound(headers=SECURITY_HEADERS)  # answered as JSON by the app's error middleware

    async def root(_: web.Request) -> web.Response:
        raise web.HTTPFound(PREFIX, headers=SECURITY_HEADERS)

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        asset = assets.get(name)
        if asset is None:
            return not_found()
        headers = {**SECURITY_HEADERS, "Cache-Control": CACHE_CONTROL, "ETag": asset.etag}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})

    app.router.add_get("/", root)
    app.router.add_get("/console", root)
    app.router.add_get(PREFIX, serve)
    app.router.add_get(PREFIX + "{name}", serve)  # one segment: no sub-folders, no separators
