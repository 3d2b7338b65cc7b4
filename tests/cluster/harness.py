"""Real `patchbay serve --role …` processes for cluster tests: start one and wait for its /readyz, kill it
with SIGKILL (no shutdown code runs), stop the rest at the end.

    async with Cluster(root, env) as cluster:
        web = await cluster.start("web", roles="web")
        worker = await cluster.start("w1", roles="worker")
        await cluster.kill(worker)                      # kill -9
        again = await cluster.start("w1-2", roles="worker")

Every process gets its own node id (`--node`), its own port (the ports of web processes are kept across a
restart with `port=`) and its own log file under the project folder (`node-<name>.log`), which a failed
wait prints. The test that SIGKILLs a single hub, tests/test_crash_functional.py, is the pattern.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import orjson
import psycopg

READY_TIMEOUT_S = 60.0  # a process's start under a loaded 2-core machine (import, store open, migrations)
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProcess:
    """One `patchbay serve` process: its node id, roles, port and log."""

    name: str
    roles: str
    port: int
    proc: asyncio.subprocess.Process
    log: Path
    started_at: float = field(default_factory=time.monotonic)
    killed_at: float | None = None  # time.monotonic() of the SIGKILL

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and self.killed_at is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Cluster:
    """The processes of one project folder (whose patchbay.yaml names the shared PostgreSQL store)."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = {**os.environ, **(env or {})}
        self.nodes: list[NodeProcess] = []

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_all()

    def alive(self, role: str | None = None) -> list[NodeProcess]:
        return [n for n in self.nodes if n.alive and (role is None or role in n.roles.split(","))]

    async def start(
        self, name: str, *, roles: str, port: int | None = None, wait: bool = True
    ) -> NodeProcess:
        """Start `patchbay serve ROOT --role ROLES --node NAME --port PORT`; with `wait`, return once its
        /readyz answers 200 (a process that exits or does not get ready fails with its log's tail)."""
        port = port or free_port()
        log_path = self.root / f"node-{name}.log"
        log = open(log_path, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "patchbay",
                "serve",
                str(self.root),
                "--port",
                str(port),
                "--role",
                roles,
                "--node",
                name,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        node = NodeProcess(name, roles, port, proc, log_path)
        self.nodes.append(node)
        if wait:
            await self.wait_ready(node)
        return node

    async def wait_ready(self, node: NodeProcess, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(f"{node.url}/readyz") as r:
                        if r.status == 200:
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                if node.proc.returncode is not None:
                    break
                await asyncio.sleep(0.1)
        if node.proc.returncode is None:
            node.proc.kill()
            await node.proc.wait()
        raise AssertionError(f"node {node.name} ({node.roles}) did not become ready:\n{node.log_tail()}")

    async def kill(self, node: NodeProcess) -> float:
        """SIGKILL: no shutdown code runs, claims and leases stay behind in the store. The kill's time."""
        os.kill(node.proc.pid, signal.SIGKILL)
        node.killed_at = time.monotonic()
        await node.proc.wait()
        return node.killed_at

    async def stop(self, node: NodeProcess) -> None:
        """SIGTERM and wait for the graceful stop (SIGKILL after STOP_TIMEOUT_S)."""
        if node.proc.returncode is not None:
            return
        node.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(node.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            node.proc.kill()
            await node.proc.wait()

    async def view(self) -> dict[str, Any]:
        """The cluster view as an operator gets it: `patchbay cluster --json` (it exits 1 while a node is lost)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "patchbay",
            "cluster",
            "--json",
            "-p",
            str(self.root),
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode in (0, 1), f"patchbay cluster exited {proc.returncode}: {err.decode()}"
        return dict(orjson.loads(out))

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(n) for n in self.nodes), return_exceptions=True)


def store_query(store_url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Rows of one query on the PostgreSQL store of `store_url` (its `?schema=` as the search path), read
    beside the hubs, as an operator's psql would."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(store_url)
    query = parse_qsl(parts.query)
    schema = next((v for k, v in query if k == "schema"), None)
    conninfo = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])))
    options = {"options": f"-c search_path={schema}"} if schema else {}
    with psycopg.connect(conninfo, autocommit=True, **options) as conn:
        return list(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]


async def until(check: Any, timeout: float, what: str, every: float = 0.1) -> float:
    """Wait until `check()` (sync or async) is true; the seconds it took. Fails naming `what` on timeout."""
    start = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


__all__ = ["Cluster", "NodeProcess", "free_port", "store_query", "until"]
