"""The conformance suite every broker sink passes (mqtt, nats, rabbitmq, redis): one test, each broker a
parameter. What differs between brokers is data on the Broker (tests/connectors/brokers.py)."""

from __future__ import annotations

import asyncio
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from patchbay import registry
from patchbay.connectors.base import MissingDriver, Outcome, OutcomeClass
from tests.conftest import eventually, require_service
from tests.connectors import TcpProxy, closed_port
from tests.connectors.brokers import BROKERS, HOST, Broker, Target, send


@pytest.fixture(params=BROKERS, ids=str)
def broker(request: pytest.FixtureRequest) -> Broker:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def target(broker: Broker) -> AsyncIterator[Target]:
    pytest.importorskip(broker.driver)
    require_service(broker.service, HOST, broker.port)
    async with broker.open() as t:
        yield t


@pytest.fixture
async def proxy(broker: Broker) -> AsyncIterator[TcpProxy]:
    p = await TcpProxy(HOST, broker.port).start()
    yield p
    await p.stop()


def test_missing_driver_names_the_extra(broker, monkeypatch):
    monkeypatch.setitem(sys.modules, broker.driver, None)  # what an install without the extra looks like
    registry.discover()
    hint = registry.install_hint(registry.CONNECTORS[broker.kind].extra or "?")
    with pytest.raises(MissingDriver, match=re.escape(hint)):
        broker.sink(closed_port(), broker.bare)


async def test_connection_refused_is_transient(broker):
    pytest.importorskip(broker.driver)
    s = broker.sink(closed_port(), broker.bare)
    try:
        outcome = await s.send(s.render({}, "k"), "k")
        assert outcome.cls is OutcomeClass.TRANSIENT and broker.refused in outcome.error, outcome
    finally:
        await s.close()


async def test_a_broker_that_stops_answering_times_out_as_transient(broker, target, proxy):
    s = target.sink(proxy.port, timeout_s=0.5)
    try:
        assert (await send(s, "k0", {})).cls is OutcomeClass.SUCCESS
        proxy.blackhole = True
        outcome = await send(s, "k1", {})
        assert outcome.cls is OutcomeClass.TRANSIENT and "timed out" in outcome.error, outcome
        proxy.blackhole = False
        if broker.cut_after_blackhole:
            proxy.cut()  # the connection that timed out is abandoned; the broker may still hold it
        outcome = await send(s, "k1", {})  # the retry
        assert outcome.cls is OutcomeClass.SUCCESS, outcome
        if broker.reopens:
            assert s._conn.opened == 2

        async def both() -> bool:
            return await target.count() >= 2

        await eventually(both, timeout=5, what="k0 and k1 at the broker")
        assert [c.key for c in await target.copies()] == ["k0", "k1"]
    finally:
        await s.close()


async def test_connection_cut_mid_run_loses_nothing_and_keeps_the_key_on_every_copy(broker, target, proxy):
    """The broker drops the client with publishes in flight: they reached it, their acknowledgements
    were lost. Each send is delivered or transient, and the engine's retry (the same request, the same
    key) gets every key through, with the key on every copy. Whether the broker holds a second copy of
    an in-flight key (MQTT, AMQP, Redis: at least once) or drops it (JetStream) is the broker's."""
    s = target.sink(proxy.port, timeout_s=10)
    acked_n, in_flight_n, connections = broker.sizes(s)
    attempts: Counter[str] = Counter()

    async def attempt(key: str) -> Outcome:
        attempts[key] += 1
        return await send(s, key)

    try:
        # As many sends at once as the sink keeps connections: each connection carries one and stays.
        acked = [f"evt_{i}.bus" for i in range(acked_n)]
        assert {o.cls for o in await asyncio.gather(*map(attempt, acked))} == {OutcomeClass.SUCCESS}

        in_flight = [f"evt_{i}.bus" for i in range(acked_n, acked_n + in_flight_n)]
        # The messages reach the broker, their acknowledgements do not come back.
        assert proxy.hold_replies() == connections
        sending = [asyncio.create_task(attempt(k)) for k in in_flight]

        async def all_arrived() -> bool:
            return await target.count() >= acked_n + in_flight_n

        await eventually(all_arrived, timeout=5, what="the in-flight messages at the broker")
        assert not any(t.done() for t in sending)  # mid-run: every one still waits for its ack
        assert proxy.cut() == connections
        # A send just after the cut may still find the dead connection (the client has not read the
        # reset yet): transient as well, like the ones whose acknowledgements were lost.
        nxt = await attempt("evt_next.bus")
        outcomes = dict(zip(in_flight, await asyncio.gather(*sending), strict=True))
        if broker.lost_is_transient:
            assert {o.cls for o in outcomes.values()} == {OutcomeClass.TRANSIENT}, outcomes
            assert all("connection lost" in (o.error or "") for o in outcomes.values()), outcomes
        else:
            assert {o.cls for o in outcomes.values()} <= {OutcomeClass.SUCCESS, OutcomeClass.TRANSIENT}
        assert nxt.cls in (OutcomeClass.SUCCESS, OutcomeClass.TRANSIENT), nxt
        outcomes["evt_next.bus"] = nxt

        # The delivery worker retries each transient outcome: the next send opens a new connection.
        retry = [k for k, o in outcomes.items() if o.cls is OutcomeClass.TRANSIENT]
        again = dict(zip(retry, await asyncio.gather(*map(attempt, retry)), strict=True))
        assert {o.cls for o in again.values()} <= {OutcomeClass.SUCCESS}, again
        if broker.retry_note is not None:
            assert all(broker.retry_note in again[k].excerpt for k in in_flight), again
        if broker.reopens:
            assert s._conn.opened == 2  # the lost connection was replaced once

        # Once a last message is there, every copy the sends above made is: they were acknowledged
        # (or, for MQTT, the broker passes one client's messages on in order).
        assert (await attempt("evt_last.bus")).cls is OutcomeClass.SUCCESS

        async def last_arrived() -> bool:
            return "evt_last.bus" in {c.key for c in await target.copies()}

        await eventually(last_arrived, timeout=5, what="the last message at the broker")
        copies = await target.copies()
        for c in copies:  # every copy is the same request under the same key
            assert c.body == {"key": c.key}, c
        count = Counter(c.key for c in copies)
        assert set(count) == set(attempts)  # every key
        assert all(count[k] == 1 for k in acked), count
        assert all(count[k] in broker.in_flight_copies(attempts[k]) for k in in_flight), (count, attempts)
        assert count["evt_next.bus"] in broker.next_copies(attempts["evt_next.bus"]), (count, attempts)
        assert count["evt_last.bus"] == 1
    finally:
        await s.close()
