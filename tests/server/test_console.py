"""The console's static files on a real socket: types, caching, security headers, and nothing else served."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from patchbay.server.console import CONSOLE_DIR, CONTENT_TYPES, add_console, load_assets

FILES = {
    "index.html": "text/html; charset=utf-8",
    **{
        f"{m}.js": "text/javascript; charset=utf-8"
        for m in ("app", "api", "dom", "map", "flows", "runs", "failures", "cluster")
    },
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


@dataclass
class Served:
    url: str


@pytest.fixture
async def hub() -> AsyncIterator[Served]:
    """The console alone on 127.0.0.1 (it needs nothing from the hub; the browser test covers make_app)."""
    app = web.Application()
    add_console(app, cast(Any, None))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield Served(f"http://{host}:{port}")
    await runner.cleanup()


async def raw_get(
    base: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET `target` exactly as written (no client-side normalisation of `..` or %-escapes)."""
    u = urlsplit(base)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {u.netloc}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), hdrs, body


def assert_secure(headers: dict[str, str]) -> None:
    csp = headers["content-security-policy"]
    assert csp.startswith("default-src 'self'")
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp
    assert "frame-ancestors 'none'" in csp
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


async def test_every_file_is_served_with_its_type_cache_policy_and_security_headers(hub):
    for name, ctype in FILES.items():
        status, headers, body = await raw_get(hub.url, f"/console/{name}")
        assert status == 200, name
        assert headers["content-type"] == ctype, name
        assert headers["cache-control"] == "no-cache", name
        assert body == (CONSOLE_DIR / name).read_bytes(), name
        assert_secure(headers)
    status, headers, body = await raw_get(hub.url, "/console/")
    assert (status, headers["content-type"]) == (200, FILES["index.html"])
    assert body == (CONSOLE_DIR / "index.html").read_bytes()
    assert_secure(headers)


async def test_root_redirects_to_the_console_and_etags_revalidate(hub):
    for path in ("/", "/console"):
        status, headers, _ = await raw_get(hub.url, path)
        assert (status, headers["location"]) == (302, "/console/"), path
    _, headers, _ = await raw_get(hub.url, "/console/app.js")
    status, again, body = await raw_get(hub.url, "/console/app.js", {"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")
    assert again["etag"] == headers["etag"]
    status, _, _ = await raw_get(hub.url, "/console/app.js", {"If-None-Match": '"stale"'})
    assert status == 200


@pytest.mark.parametrize(
    "target",
    [
        "/console/nope.js",
        "/console/../console.py",
        "/console/%2e%2e/console.py",
        "/console/..%2fconsole.py",
        "/console/..%2F..%2Fapp.py",
        "/console/%2e%2e%2f%2e%2e%2fapi.py",
        "/console/sub/app.js",
        "/console/app.js/",
        "/console//etc/passwd",
        "/console/app.js%00.html",
        "/console/.gitignore",
        "/console/APP.JS",
        "/console/__init__.py",
    ],
)
async def test_nothing_outside_the_console_folder_is_served(hub, target):
    status, headers, body = await raw_get(hub.url, target)
    assert status in (404, 400), (target, status)
    assert b"import" not in body and b"def " not in body
    if status == 404 and "content-security-policy" in headers:
        assert_secure(headers)


def test_only_known_regular_files_in_the_folder_are_assets(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("export {};")
    (tmp_path / "notes.txt").write_text("not served")
    (tmp_path / ".hidden.js").write_text("not served")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.js").write_text("not served")
    secret = tmp_path.parent / "secret.js"
    secret.write_text("not served")
    (tmp_path / "link.js").symlink_to(secret)
    assert sorted(load_assets(tmp_path)) == ["app.js", "index.html"]
    assert load_assets(tmp_path / "missing") == {}


def test_the_shipped_console_is_complete_and_self_contained():
    assets = load_assets()
    shipped = {p.name for p in CONSOLE_DIR.iterdir() if p.is_file()}
    assert set(assets) == shipped, "every file in console/ must have a type in CONTENT_TYPES"
    assert set(FILES) <= shipped
    assert {Path(n).suffix for n in shipped} <= set(CONTENT_TYPES)
    xml_namespaces = {"http://www.w3.org/2000/svg"}
    for name in shipped:
        text = (CONSOLE_DIR / name).read_text(encoding="utf-8")
        urls = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s'\"`)]*", text, re.I))
        assert urls <= xml_namespaces, f"{name} refers to {urls - xml_namespaces}: nothing may be fetched"
        if name.endswith(".js"):
            # Values from the API are shown as text, never parsed as markup or code.
            unsafe = r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function"
            assert not re.search(unsafe, text), name
        if name.endswith(".html"):
            # No inline script, style or event handler: the CSP would block them.
            assert "<script>" not in text and not re.search(r"\s(style|on[a-z]+)\s*=", text, re.I), name
    index = (CONSOLE_DIR / "index.html").read_text()
    referenced = set(re.findall(r'(?:src|href)="([^"#]+)"', index))
    assert referenced <= shipped, referenced - shipped
    imports = set()
    for js in CONSOLE_DIR.glob("*.js"):
        imports |= set(re.findall(r"from '\./([^']+)'", js.read_text()))
    assert imports <= shipped, imports - shipped
