"""The delivery's HTTP exchange (connectors/http_wire.py) against real servers on 127.0.0.1: kept-alive
connections and when they are not reused, answers of every framing, the bounds, and what is refused."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import ssl
import zlib

import pytest
from aiohttp import web

from patchbay.connectors import http_wire
from patchbay.connectors.base import OutcomeClass, Resources
from patchbay.connectors.http_wire import BadAnswer, BadRequest, WirePool
from patchbay.security.ssrf import BlockedAddress, HttpPools
from tests.conftest import _start
from tests.connectors.test_http import sink

BIG = b"x" * 300_000


@pytest.fixture
async def server():
    """An aiohttp app that notes each request's connection (its client port) and headers."""
    seen: list[tuple[int, dict[str, str]]] = []

    def note(request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen.append((peer[1] if peer else -1, dict(request.headers)))

    async def ok(request: web.Request) -> web.Response:
        note(request)
        return web.json_response({"id": len(seen), "got": (await request.read()).decode()}, status=201)

    async def close(request: web.Request) -> web.Response:
        note(request)
        return web.json_response({}, headers={"Connection": "close"})

    async def big(request: web.Request) -> web.Response:
        note(request)
        return web.Response(body=BIG)

    async def chunked(request: web.Request) -> web.StreamResponse:
        note(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"a":', b" 1", b"}"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def gzipped(request: web.Request) -> web.Response:
        note(request)
        return web.Response(body=gzip.compress(b'{"zipped": true}'), headers={"Content-Encoding": "gzip"})

    async def deflated(request: web.Request) -> web.Response:
        note(request)
        return web.Response(
            body=zlib.compress(b'{"deflated": true}'), headers={"Content-Encoding": "deflate"}
        )

    stopping = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        note(request)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 5)  # ends with the test, not 5 s after it
        return web.json_response({})

    app = web.Application()
    for path, handler in (
        ("/ok", ok),
        ("/close", close),
        ("/big", big),
        ("/chunked", chunked),
        ("/gzip", gzipped),
        ("/deflate", deflated),
        ("/slow", slow),
    ):
        app.router.add_route("*", path, handler)
    runner, url = await _start(app)
    yield url, seen
    stopping.set()
    await runner.cleanup()


async def _no_tls() -> ssl.SSLContext:
    raise AssertionError("no https URL here")


async def ask(pool: WirePool, url: str, *, limit: int = 65536, timeout_s: float = 2.0, **kw):
    return await pool.request(
        kw.pop("method", "POST"),
        url,
        kw.pop("headers", {"Content-Type": "application/json"}),
        kw.pop("body", b'{"n": 1}'),
        timeout_s=timeout_s,
        limit=limit,
        tls=_no_tls,
        **kw,
    )


async def test_one_kept_alive_connection_carries_request_after_request(server):
    url, seen = server
    pool = WirePool(True, ())
    try:
        answers = [await ask(pool, url + "/ok", body=f'{{"n": {i}}}'.encode()) for i in range(20)]
    finally:
        pool.close()
    assert [a.status for a in answers] == [201] * 20
    assert answers[3].body == b'{"id": 4, "got": "{\\"n\\": 3}"}'
    assert len({port for port, _ in seen}) == 1  # one connection for all twenty
    assert seen[0][1]["Content-Length"] == str(len(b'{"n": 0}'))
    assert seen[0][1]["Host"] == url.removeprefix("http://")
    # the defaults aiohttp sent: no answer comes in a coding the exchange cannot read (brotli, zstd)
    assert (seen[0][1]["Accept"], seen[0][1]["Accept-Encoding"]) == ("*/*", "gzip, deflate")


async def test_headers_given_win_over_the_defaults_and_the_body_length_is_ours(server):
    url, seen = server
    pool = WirePool(True, ())
    headers = {"accept": "application/json", "Content-Length": "999", "Host": "crm.example"}
    try:
        assert (await ask(pool, url + "/ok", headers=headers, body=b"{}")).status == 201
    finally:
        pool.close()
    got = seen[0][1]
    assert (got["Accept"], got["Content-Length"], got["Host"]) == ("application/json", "2", "crm.example")
    assert got["Accept-Encoding"] == "gzip, deflate"


def test_the_hubs_event_loop_uvloop_keeps_the_connection_alive_too():
    """The hub runs on uvloop, whose transports are not asyncio's classes: the same exchange there."""
    uvloop = pytest.importorskip("uvloop")
    ports: list[int] = []

    async def ok(request: web.Request) -> web.Response:
        ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        return web.json_response({"n": len(ports)}, status=201)

    async def main() -> list[int]:
        app = web.Application()
        app.router.add_post("/ok", ok)
        runner, url = await _start(app)
        pool = WirePool(True, ())
        try:
            return [(await ask(pool, url + "/ok")).status for _ in range(5)]
        finally:
            pool.close()
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == [201] * 5
    assert len(set(ports)) == 1


async def test_concurrent_requests_each_take_a_connection_and_leave_it_for_the_next(server):
    url, seen = server
    pool = WirePool(True, ())
    try:
        first = await asyncio.gather(*(ask(pool, url + "/ok") for _ in range(8)))
        second = await asyncio.gather(*(ask(pool, url + "/ok") for _ in range(8)))
    finally:
        pool.close()
    assert [a.status for a in first + second] == [201] * 16
    assert len({port for port, _ in seen}) == 8  # the second round reused the first round's eight


async def test_an_answer_that_closes_its_connection_is_not_reused(server):
    url, seen = server
    pool = WirePool(True, ())
    try:
        assert (await ask(pool, url + "/close")).status == 200
        assert (await ask(pool, url + "/ok")).status == 201
    finally:
        pool.close()
    assert seen[0][0] != seen[1][0]


async def test_a_connection_the_server_closed_while_idle_is_not_used_again():
    """The server's keep-alive ends after 0.1 s: the next request finds the connection gone and opens another,
    instead of failing an attempt on a dead one."""
    seen: list[int] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/ok", ok)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    pool = WirePool(True, ())
    try:
        assert (await ask(pool, url + "/ok")).status == 200
        await asyncio.sleep(0.5)
        assert (await ask(pool, url + "/ok")).status == 200
    finally:
        pool.close()
        await runner.cleanup()
    assert len(set(seen)) == 2


async def test_a_connection_left_idle_is_closed_though_no_request_comes(server, monkeypatch):
    """A destination that goes quiet: its kept-alive connection is closed after KEEP_IDLE_S by the pool,
    not kept until the server ends it (or for ever, for a server that never does)."""
    url, seen = server
    monkeypatch.setattr(http_wire, "KEEP_IDLE_S", 0.2)
    pool = WirePool(True, ())
    try:
        assert (await ask(pool, url + "/ok")).status == 201
        [[conn]] = pool._idle.values()
        assert conn.transport is not None and not conn.transport.is_closing()
        await asyncio.sleep(0.5)
        assert conn.transport.is_closing() and pool._idle == {} and pool._sweeper is None
        assert (await ask(pool, url + "/ok")).status == 201  # and the next request opens a new one
        assert pool._sweeper is not None
    finally:
        pool.close()
    assert pool._sweeper is None and seen[0][0] != seen[1][0]


@pytest.mark.parametrize(
    ("path", "body"),
    [("/chunked", b'{"a": 1}'), ("/gzip", b'{"zipped": true}'), ("/deflate", b'{"deflated": true}')],
)
async def test_chunked_and_compressed_answers_are_read_whole(server, path, body):
    url, seen = server
    pool = WirePool(True, ())
    try:
        answer = await ask(pool, url + path, method="GET", body=None)
        assert (await ask(pool, url + "/ok")).status == 201
    finally:
        pool.close()
    assert (answer.status, answer.body) == (200, body)
    assert "Content-Length" not in seen[0][1]  # a GET without a body says nothing of one
    assert seen[0][0] == seen[1][0]  # read to its end: the connection goes on


async def test_an_answer_is_kept_to_the_limit_and_its_connection_closed(server):
    url, seen = server
    pool = WirePool(True, ())
    try:
        answer = await ask(pool, url + "/big", limit=4096)
        assert (await ask(pool, url + "/ok")).status == 201
    finally:
        pool.close()
    assert (answer.status, answer.body) == (200, BIG[:4096])
    assert seen[0][0] != seen[1][0]  # the rest was never read: that connection is not reused


async def test_a_cancelled_exchange_closes_its_connection(server):
    url, seen = server
    pool = WirePool(True, ())
    task = asyncio.ensure_future(ask(pool, url + "/slow"))
    while not seen:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        assert not any(pool._idle.values())
        assert (await ask(pool, url + "/ok")).status == 201
    finally:
        pool.close()
    assert seen[0][0] != seen[1][0]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Note": "a\r\nX-Injected: 1"},
        {"X-Note": "a\nb"},
        {"Bad Name": "x"},
        {"X-Note": "caf\u00e9 \u2603"},
    ],
)
async def test_a_header_that_could_end_its_line_is_refused_before_connecting(headers):
    accepted = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    srv = await asyncio.start_server(count, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    pool = WirePool(True, ())
    try:
        with pytest.raises(BadRequest):
            await ask(pool, f"http://127.0.0.1:{port}/x", headers=headers)
    finally:
        pool.close()
        srv.close()
    assert accepted == 0


async def test_a_header_value_from_the_record_with_a_line_break_dead_letters(server):
    url, seen = server
    s = sink(url, path="/ok", headers={"X-Source": "{{ source }}"})
    try:
        out = await s.send(s.render({"source": "web\r\nX-Admin: yes"}, "k"), "k")
    finally:
        await s.resources.http.close()  # type: ignore[union-attr]
    assert out.cls is OutcomeClass.TERMINAL and "invalid request" in out.error, out
    assert seen == []


async def raw_server(answer: bytes):
    """A TCP server that reads a request's head and writes `answer` (then closes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"


async def answer_to(raw: bytes):
    """What one exchange makes of a server's `raw` answer, and whether its connection was kept."""
    srv, url = await raw_server(raw)
    pool = WirePool(True, ())
    try:
        answer = await ask(pool, url + "/x")
        return answer, any(pool._idle.values())
    finally:
        pool.close()
        srv.close()


async def test_an_interim_answer_is_skipped_for_the_final_one():
    answer, _ = await answer_to(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Id: 7\r\n\r\nok"
    )
    assert (answer.status, answer.body, answer.headers["x-id"]) == (201, b"ok", "7")
    assert "Link" not in answer.headers


async def test_a_second_answer_to_one_request_is_not_taken_for_the_next_ones():
    answer, kept = await answer_to(
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 500 Stray\r\nContent-Length: 3\r\nX-Stray: 1\r\n\r\nbad"
    )
    assert (answer.status, answer.body) == (201, b"ok") and "X-Stray" not in answer.headers
    assert not kept  # its next answer would be the stray one


async def test_a_body_that_breaks_the_protocol_after_the_head_gives_what_came(caplog):
    """The status decided: a 2xx whose body turns to garbage is still the 2xx (the remote acted on it), its
    connection is not kept, and nothing is left behind to be logged as an error never retrieved."""
    answer, kept = await answer_to(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\nZZ not a chunk size\r\n"
    )
    gc.collect()
    assert (answer.status, answer.body, kept) == (200, b"abcd", False)
    assert "never retrieved" not in caplog.text


@pytest.mark.parametrize(
    ("answer", "error"),
    [(b"", "closed the connection without answering"), (b"NOT HTTP AT ALL\r\n\r\n", "not valid HTTP")],
)
async def test_no_answer_or_a_broken_one_is_transient(answer, error):
    srv, url = await raw_server(answer)
    s = sink(url, path="/x")
    pool = WirePool(True, ())
    try:
        with pytest.raises(BadAnswer, match=error):
            await ask(pool, url + "/x")
        out = await s.send(s.render({"a": 1}, "k"), "k")
    finally:
        pool.close()
        srv.close()
        await s.resources.http.close()  # type: ignore[union-attr]
    assert out.cls is OutcomeClass.TRANSIENT and error in out.error, out


async def test_a_redirect_to_another_server_does_not_carry_the_credentials(server):
    url, seen = server

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(request.query["to"])

    app = web.Application()
    app.router.add_post("/moved", moved)
    runner, other = await _start(app)
    s = sink(other, auth={"scheme": "api_key", "header": "X-Key", "token": {"secret": "t"}}, path="/moved")
    s.policy = s.policy.model_copy(update={"follow_redirects": True})
    try:
        out = await s.send({**s.render({"a": 1}, "k"), "url": f"{other}/moved?to={url}/ok"}, "k")
    finally:
        await s.resources.http.close()  # type: ignore[union-attr]
        await runner.cleanup()
    assert (out.cls, out.status_code) == (OutcomeClass.SUCCESS, 201), out
    assert "X-Key" not in seen[0][1] and seen[0][1]["Idempotency-Key"] == "k"
    assert seen[0][1]["Content-Type"] == "application/json"  # a 307 keeps the method and body


async def test_a_url_with_credentials_in_it_is_refused():
    pool = WirePool(True, ())
    with pytest.raises(BadRequest, match="auth"):
        await ask(pool, "http://user:pass@127.0.0.1:9/x")


async def test_the_guarded_pool_refuses_loopback_before_connecting(server):
    url, seen = server
    pool = HttpPools().pool(False, (), WirePool)
    with pytest.raises(BlockedAddress):
        await ask(pool, url + "/ok")
    assert seen == []


def test_each_address_policy_has_pools_of_its_own():
    sessions = HttpPools()
    open_, guarded = sessions.pool(True, (), WirePool), sessions.pool(False, (), WirePool)
    allowed = sessions.pool(False, ["127.0.0.0/8"], WirePool)
    assert len({id(open_), id(guarded), id(allowed)}) == 3
    assert (open_.allow_private, guarded.allow_private, allowed.allow_networks) == (
        True,
        False,
        ("127.0.0.0/8",),
    )
    assert sessions.pool(False, ["127.0.0.1/8"], WirePool) is allowed  # the same network, written otherwise
    assert Resources(http=sessions, allow_private=True).wire() is open_
