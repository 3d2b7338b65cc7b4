#!/usr/bin/env python3
"""A destination that refuses credentials (401) so Patchbay pauses it, until `POST /_allow`.

  deny_sink.py [--port 18081]     GET /_stats -> {"denied": N, "accepted": M, "allowed": bool}
                                  POST /_allow -> from now on every POST gets 201 (for the drain)

Stdlib asyncio, loopback only, HTTP/1.1 keep-alive.
"""

from __future__ import annotations

import argparse
import asyncio
import json

STATE = {"denied": 0, "accepted": 0, "allowed": False}


def _resp(status: int, reason: str, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (status, reason.encode(), len(body))
    ) + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            clen = 0
            for ln in lines[1:]:
                k, _, v = ln.partition(b":")
                if k.strip().lower() == b"content-length":
                    clen = int(v.strip())
            if clen:
                await reader.readexactly(clen)
            if path.startswith(b"/_stats"):
                writer.write(_resp(200, "OK", json.dumps(STATE).encode()))
            elif path.startswith(b"/_allow"):
                STATE["allowed"] = True
                writer.write(_resp(200, "OK", b'{"allowed":true}'))
            elif STATE["allowed"]:
                STATE["accepted"] += 1
                writer.write(_resp(201, "Created", b'{"ok":true}'))
            else:
                STATE["denied"] += 1
                writer.write(_resp(401, "Unauthorized", b'{"error":"invalid token"}'))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=18081)
    a = ap.parse_args()
    srv = await asyncio.start_server(handle, "127.0.0.1", a.port, backlog=1024)
    print(f"deny sink on 127.0.0.1:{a.port}", flush=True)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
