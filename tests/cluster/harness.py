"""Real `patchbay serve` processes for the crash and cluster tests: start one and wait for its /readyz, kill
it with SIGKILL (no shutdown code runs) or pause it (SIGSTOP), stop the rest at the end (SIGTERM).

    async with Cluster(root, LEAD_SECRETS) as cluster:
        web = await cluster.start("web", roles="web")
        worker = await cluster.start("w1", roles="worker")
        await cluster.kill(worker)                      # kill -9
        again = await cluster.start("w1-2", roles="worker")

    async with Cluster(root, LEAD_SECRETS) as one:      # a single hub, as a user starts it
        hub = await one.serve(port=port)                # `patchbay serve ROOT --port PORT`: every role,
        await one.kill(hub)                             # the default node id (host:pid)
        hub = await one.serve(port=port)

Every process of `start` gets its own node id (`--node`), each its own port (kept across a restart with
`port=`) and its own log file under the project folder (`<name>.log`, `<name>-2.log` for the second
process of a name; `serve.log` for `serve`), which a failed wait prints. `start_serve` is the single hub
for tests that stop it themselves. `Sender` is a webhook sender that retries what got no answer, as a
real one does.
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

from patchbay.security.webhook_auth import sign_standard_webhooks
from tests.conftest import SECRET_TOKEN, SECRET_WHSEC

# The secrets of tests/conftest.py's lead project (its website's webhook secret, the CRM's token).
LEAD_SECRETS = {"PATCHBAY_SECRET_WEBSITE_WHSEC": SECRET_WHSEC, "PATCHBAY_SECRET_CRM_TOKEN": SECRET_TOKEN}
EVERY_ROLE = "web,worker,scheduler"
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
    paused: bool = False  # SIGSTOP sent, no SIGCONT yet
    readyz: dict[str, Any] = field(default_factory=dict)  # its /readyz answer, once ready

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
        self,
        name: str,
        *,
        roles: str,
        port: int | None = None,
        wait: bool = True,
        timeout: float = READY_TIMEOUT_S,
        args: tuple[str, ...] = (),
    ) -> NodeProcess:
        """Start `patchbay serve ROOT --role ROLES --node NAME --port PORT [ARGS]`; with `wait`, return once its
        /readyz answers 200 (a process that exits or does not get ready fails with its log's tail)."""
        return await self._spawn(name, roles, ["--role", roles, "--node", name, *args], port, wait, timeout)

    async def serve(
        self, name: str = "serve", *, port: int | None = None, timeout: float = READY_TIMEOUT_S
    ) -> NodeProcess:
        """Start a plain `patchbay serve ROOT --port PORT` (every role, the default node id host:pid), as a user
        starts the hub; return once its /readyz answers 200. Its log: ROOT/NAME.log."""
        return await self._spawn(name, EVERY_ROLE, [], port, True, timeout)

    async def _spawn(
        self, name: str, roles: str, args: list[str], port: int | None, wait: bool, timeout: float
    ) -> NodeProcess:
        port = port or free_port()
        again = sum(n.name == name for n in self.nodes)  # a second process of one name: a log of its own
        log_path = self.root / (f"{name}-{again + 1}.log" if again else f"{name}.log")
        log = open(log_path, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "patchbay", "serve", str(self.root), "--port", str(port), *args),
                env=self.env,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        node = NodeProcess(name, roles, port, proc, log_path)
        self.nodes.append(node)
        if wait:
            await self.wait_ready(node, timeout)
        return node

    async def wait_ready(self, node: NodeProcess, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(f"{node.url}/readyz") as r:
                        if r.status == 200:
                            node.readyz = await r.json()
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                if node.proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        if node.proc.returncode is None:
            node.proc.kill()
            await node.proc.wait()
        raise AssertionError(f"node {node.name} ({node.roles}) did not become ready:\n{node.log_tail()}")

    async def exited(self, node: NodeProcess, timeout: float = READY_TIMEOUT_S) -> int:
        """The exit code of a process that is to stop by itself (refused at its start, say)."""
        return await asyncio.wait_for(node.proc.wait(), timeout)

    async def kill(self, node: NodeProcess) -> float:
        """SIGKILL: no shutdown code runs, claims and leases stay behind in the store. The kill's time."""
        os.kill(node.proc.pid, signal.SIGKILL)
        node.killed_at = time.monotonic()
        await node.proc.wait()
        return node.killed_at

    def pause(self, node: NodeProcess) -> None:
        """SIGSTOP: the process holds what it holds (claims, leases) but does nothing, as a paused VM."""
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.paused = True

    def resume(self, node: NodeProcess) -> None:
        """SIGCONT: the paused process runs on where it was."""
        if node.paused and node.proc.returncode is None:
            os.kill(node.proc.pid, signal.SIGCONT)
        node.paused = False

    async def stop(self, node: NodeProcess) -> None:
        """SIGTERM and wait for the graceful stop (SIGKILL after STOP_TIMEOUT_S); a paused one is woken first."""
        if node.proc.returncode is not None:
            return
        self.resume(node)
        node.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(node.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            node.proc.kill()
            await node.proc.wait()

    async def view(self) -> dict[str, Any]:
        """The cluster view as an operator gets it: `patchbay cluster --json` (it exits 1 while a node is lost)."""
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "patchbay", "cluster", "--json", "-p", str(self.root)),
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode in (0, 1), f"patchbay cluster exited {proc.returncode}: {err.decode()}"
        return dict(orjson.loads(out))

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(n) for n in self.nodes), return_exceptions=True)


async def start_serve(root: Path, port: int) -> asyncio.subprocess.Process:
    """A plain `patchbay serve ROOT --port PORT` with the lead project's secrets, ready (Cluster.serve), for a
    test that kills and stops it itself (ROOT/serve.log)."""
    node = await Cluster(root, LEAD_SECRETS).serve(port=port)
    return node.proc


class Sender:
    """A real webhook sender to the lead project's flow: a post that gets no 2xx answer (refused, reset, timed
    out, 503) is sent again with the same message id, to the next of `urls` (a load balancer's next backend),
    until acknowledged. `accepted`: n -> the event id of the acknowledged post of message n."""

    def __init__(self, urls: list[str], *, concurrency: int = 32, pause_s: float = 0.02) -> None:
        self.urls = urls
        self.accepted: dict[int, str] = {}
        self.unanswered = 0  # posts that got no answer at all (refused, reset, timeout) and were sent again
        self.pause_s = pause_s
        self._sem = asyncio.Semaphore(concurrency)

    @staticmethod
    def headers(body: bytes, msg_id: str) -> dict[str, str]:
        """A JSON post signed by the lead project's website (Standard Webhooks, now)."""
        signed = sign_standard_webhooks(SECRET_WHSEC, msg_id, int(time.time()), body)
        return {"Content-Type": "application/json", **signed}

    async def post(self, session: aiohttp.ClientSession, n: int, body: bytes) -> None:
        i = n % len(self.urls)  # spread over the web processes
        async with self._sem:
            while True:
                try:
                    async with session.post(
                        self.urls[i], data=body, headers=self.headers(body, f"msg_{n}")
                    ) as r:
                        if 200 <= r.status < 300:
                            self.accepted[n] = (await r.json())["event_id"]
                            return
                        assert r.status == 503, f"web answered {r.status}: {await r.text()}"
                except (TimeoutError, aiohttp.ClientError):
                    self.unanswered += 1
                i = (i + 1) % len(self.urls)
                await asyncio.sleep(self.pause_s)

    async def send(self, bodies: dict[int, bytes], timeout: float = 180, client_timeout: float = 10) -> None:
        """Post every body (message n: `bodies[n]`) until each is acknowledged; fail after `timeout`."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=client_timeout)) as session:
            await asyncio.wait_for(
                asyncio.gather(*(self.post(session, n, b) for n, b in bodies.items())), timeout
            )


def lead(n: int) -> bytes:
    """Message n of the lead project's website: one lead, its own email."""
    return orjson.dumps({"email": f"lead-{n}@example.com", "first_name": "x"})


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


__all__ = [
    "EVERY_ROLE",
    "LEAD_SECRETS",
    "Cluster",
    "NodeProcess",
    "Sender",
    "free_port",
    "lead",
    "start_serve",
    "store_query",
    "until",
]
