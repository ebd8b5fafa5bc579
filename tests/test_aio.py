"""arrival.aio: the same contracts with async/await (run with asyncio.run, no plugin)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

import arrival
import arrival.aio
from arrival.engine import Engine
from arrival.errors import ClosedError, LeaseExpired, NotSupported, UnknownQueue
from arrival.testing import FakeClock
from conftest import Stores, engine_of

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def with_broker(
    stores: Stores, clock: FakeClock, body: Callable[[arrival.aio.Broker], Awaitable[T]]
) -> T:
    """Open an async broker on the test's store, run ``body`` with it, close it."""

    async def main() -> T:
        broker = await stores.aopen()
        try:
            return await body(broker)
        finally:
            await broker.close()

    return run(main())


async def _drain(consumer: arrival.aio.Consumer) -> list[arrival.aio.Message]:
    out: list[arrival.aio.Message] = []
    while (msg := await consumer.receive(timeout=0)) is not None:
        out.append(msg)
        await msg.ack()
    return out


def test_roundtrip(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        spec = await b.create_queue("q", "at-least-once", max_deliveries=4)
        assert spec.dead_letter == "q.dlq"
        assert await b.queues() == ["q", "q.dlq"]
        d = await b.describe("q")
        assert d.guarantee is arrival.Guarantee.AT_LEAST_ONCE
        p = b.producer()
        assert await p.send("q", b"a", key="k", headers={"h": "v"}, id="m-1") == 0
        assert await p.send_batch("q", [b"b", arrival.aio.Envelope(b"c", key="kc")]) == 1
        c = b.consumer("q", "g")
        got = await c.receive_batch(10, timeout=0)
        assert [(m.body, m.key, m.headers, m.attempt) for m in got] == [
            (b"a", "k", {"h": "v"}, 1),
            (b"b", None, {}, 1),
            (b"c", "kc", {}, 1),
        ]
        assert got[0].id == "m-1"
        await c.ack_batch(got)
        assert await c.receive(timeout=0) is None
        st = await b.stats("q")
        assert (st.sent, st.groups[0].acked) == (3, 3)

    with_broker(stores, clock, body)


def test_send_awaits_durability(stores: Stores, clock: FakeClock) -> None:
    async def produce() -> arrival.aio.Broker:
        b = await stores.aopen()
        await b.create_queue("q", "at-least-once")
        offsets = [await b.producer().send("q", b"%d" % i) for i in range(5)]
        assert offsets == [0, 1, 2, 3, 4]
        if stores.kind == "server":
            engine = engine_of(b)
            await b.close()  # the client goes; the server below is killed
            engines.append(engine)
        else:
            engines.append(engine_of(b))
        return b

    engines: list[Engine] = []
    run(produce())
    engines[0].abandon()  # SIGKILL right after the sends returned
    b2 = stores.open()
    c = b2.consumer("q", "g")
    assert [m.body for m in c.receive_batch(10, timeout=0)] == [b"%d" % i for i in range(5)]


def test_async_context_managers(stores: Stores, clock: FakeClock) -> None:
    async def main() -> None:
        async with await stores.aopen() as b:
            await b.create_queue("q", "at-least-once")
            async with b.producer() as p:
                await p.send("q", b"x")
            with pytest.raises(ClosedError):
                await p.send("q", b"y")
            async with b.consumer("q", "g") as c:
                msg = await c.receive(timeout=0)
                assert msg is not None
                assert msg.body == b"x"
            with pytest.raises(ClosedError):
                await c.receive(timeout=0)
            # leaving the consumer released the unacked message, attempt not spent
            again = await b.consumer("q", "g").receive(timeout=0)
            assert again is not None
            assert again.attempt == 2
        assert b.closed

    run(main())


def test_receive_timeout_returns_none(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once")
        c = b.consumer("q", "g")
        assert await c.receive(timeout=0) is None
        t0 = time.monotonic()
        assert await c.receive(timeout=0.05) is None
        assert time.monotonic() - t0 >= 0.04
        assert await c.receive_batch(5, timeout=0) == []

    with_broker(stores, clock, body)


def test_unknown_queue(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        with pytest.raises(UnknownQueue, match="create_queue"):
            await b.producer().send("nope", b"x")
        with pytest.raises(UnknownQueue):  # at once in process; at the first receive remote
            await b.consumer("nope", "g").receive(timeout=0)
        await b.create_queue("q", "at-least-once")
        with pytest.raises(TypeError, match="encode"):
            await b.producer().send("q", "text")  # type: ignore[arg-type]

    with_broker(stores, clock, body)


def test_nack_reject_and_lease_expiry(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once", ack_timeout=10.0)
        await b.producer().send_batch("q", [b"retry", b"bad", b"slow"])
        c = b.consumer("q", "g")
        retry, bad, slow = await c.receive_batch(3, timeout=0)
        await retry.nack(delay=5)
        await bad.reject("malformed")
        clock.advance(4.0)
        assert await c.receive(timeout=0) is None
        await slow.extend(20.0)
        clock.advance(1.5)
        again = await c.receive(timeout=0)
        assert again is not None
        assert (again.body, again.attempt) == (b"retry", 2)
        await again.ack()
        await slow.ack()  # extended: still held
        (d,) = await b.dead_letters("q").list()
        assert (d.body, d.origin_group) == (b"bad", "g")
        assert d.reason is not None
        assert "malformed" in d.reason

        await b.producer().send("q", b"late")
        late = await c.receive(timeout=0)
        assert late is not None
        clock.advance(11.0)
        if not b.url.startswith("arrival://"):
            # over the network the async lease_lost is judged by the client's clock (it
            # can't ask without awaiting), which the fake clock behind the server doesn't
            # move; the ack below is what the server decides
            assert late.lease_lost
        with pytest.raises(LeaseExpired):
            await late.ack()

    with_broker(stores, clock, body)


def test_async_for_over_consumer(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once")
        c = b.consumer("q", "g")
        seen: list[bytes] = []
        got_three = asyncio.Event()

        async def consume() -> None:
            async for msg in c:
                seen.append(msg.body)
                await msg.ack()
                if len(seen) == 3:
                    got_three.set()

        task = asyncio.create_task(consume())
        for i in range(3):
            await b.producer().send("q", b"%d" % i)
        await asyncio.wait_for(got_three.wait(), 5)
        await c.close()
        await asyncio.wait_for(task, 5)  # the iteration ends once the consumer is closed
        assert seen == [b"0", b"1", b"2"]

    with_broker(stores, clock, body)


def test_async_for_break(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once")
        await b.producer().send_batch("q", [b"0", b"1", b"2"])
        c = b.consumer("q", "g")
        seen: list[bytes] = []
        async for msg in c:
            seen.append(msg.body)
            await msg.ack()
            if len(seen) == 2:
                break
        assert seen == [b"0", b"1"]
        rest = await c.receive(timeout=0)
        assert rest is not None
        assert rest.body == b"2"

    with_broker(stores, clock, body)


def test_concurrent_sends_all_land(stores: Stores, clock: FakeClock) -> None:
    n = 300

    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once")
        p = b.producer()
        syncs = engine_of(b).storage.syncs
        offsets = await asyncio.gather(*(p.send("q", b"%d" % i) for i in range(n)))
        assert sorted(o for o in offsets if o is not None) == list(range(n))
        if stores.kind == "sqlite":
            assert engine_of(b).storage.syncs - syncs < n  # group commit shared fsyncs
        got = await b.consumer("q", "g").receive_batch(n + 10, timeout=0)
        by_offset = {m.offset: m.body for m in got}
        assert len(got) == n
        for i, off in enumerate(offsets):
            assert off is not None
            assert by_offset[off] == b"%d" % i

    with_broker(stores, clock, body)


def test_waiting_receive_wakes_on_send(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once")
        c = b.consumer("q", "g")
        waiter = asyncio.create_task(c.receive(timeout=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        t0 = time.monotonic()
        await b.producer().send("q", b"wake")
        msg = await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - t0 < 2
        assert msg is not None
        assert msg.body == b"wake"
        await msg.ack()

    with_broker(stores, clock, body)


def test_waiting_receive_does_not_block_the_loop(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once")
        c = b.consumer("q", "g")
        waiter = asyncio.create_task(c.receive(timeout=0.3))
        ticks = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.15:
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks >= 5  # the loop kept running while receive waited
        assert await waiter is None

    with_broker(stores, clock, body)


def test_dead_letters_list_replay_purge(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once", max_deliveries=2)
        await b.producer().send_batch(
            "q", [arrival.aio.Envelope(b"%d" % i, id=f"m-{i}") for i in range(3)]
        )
        ok = b.consumer("q", "ok")
        assert len(await _drain(ok)) == 3
        c = b.consumer("q", "g")
        for _ in range(2):  # two failed attempts each
            for msg in await c.receive_batch(3, timeout=0):
                await msg.nack(delay=0, error="boom")
        assert await c.receive(timeout=0) is None
        dlq = b.dead_letters("q")
        dead = await dlq.list()
        assert [(d.id, d.attempts, d.last_error) for d in dead] == [
            ("m-0", 2, "boom"),
            ("m-1", 2, "boom"),
            ("m-2", 2, "boom"),
        ]
        assert len(await dlq.replay(dry_run=True)) == 3
        assert len(await dlq.list()) == 3
        chosen = await dlq.replay(where=lambda d: d.id == "m-1")
        assert [d.id for d in chosen] == ["m-1"]
        replayed = await c.receive(timeout=0)
        assert replayed is not None
        assert (replayed.id, replayed.attempt) == ("m-1", 1)
        assert replayed.headers["arrival-replays"] == "1"
        await replayed.ack()
        assert await ok.receive(timeout=0) is None  # only the origin group gets it
        assert await dlq.purge(where=lambda d: d.id == "m-0") == 1
        assert [d.id for d in await dlq.list()] == ["m-2"]
        assert await dlq.purge() == 1
        assert await dlq.list() == []

    with_broker(stores, clock, body)


def test_at_most_once(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-most-once", capacity=2)
        c1 = b.consumer("q", "g")
        c2 = b.consumer("q", "g")
        assert await b.producer().send("q", b"0") is None
        assert await b.producer().send_batch("q", [b"1", b"2"]) is None
        first = await c1.receive(timeout=0)
        second = await c2.receive(timeout=0)
        assert first is not None
        assert second is not None
        assert [first.body, second.body] == [b"1", b"2"]  # capacity 2 dropped the oldest
        assert await c1.receive(timeout=0) is None
        assert await c2.receive(timeout=0) is None
        await first.ack()
        with pytest.raises(NotSupported):
            await first.nack()
        with pytest.raises(NotSupported):
            await first.reject("x")
        assert (await b.stats("q")).dropped == 1

    with_broker(stores, clock, body)


def test_close_wakes_a_waiting_receive(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("q", "at-least-once")
        c = b.consumer("q", "g")
        waiter = asyncio.create_task(c.receive())
        await asyncio.sleep(0.05)
        await c.close()
        done, _ = await asyncio.wait({waiter}, timeout=1.0)
        if not done:
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert done
        exc = waiter.exception()
        assert exc is None or isinstance(exc, ClosedError)

    with_broker(stores, clock, body)


def test_a_closed_event_loop_does_not_break_the_engine(broker: arrival.Broker) -> None:
    """A send completing after the loop that awaited it closed must not raise in the
    writer thread, nor stop other users of the broker."""
    import asyncio as _asyncio

    from arrival._pending import wake_soon

    loop = _asyncio.new_event_loop()
    fut: _asyncio.Future[None] = loop.create_future()
    loop.close()
    wake_soon(loop, fut)  # would raise RuntimeError("Event loop is closed")
    assert not fut.done()
    broker.create_queue("q", "at-least-once")
    assert broker.producer().send("q", b"still fine") == 0


def test_a_wakeup_on_the_loops_own_thread_needs_no_cross_thread_call() -> None:
    from arrival._pending import wake_soon

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        threadsafe = loop.call_soon_threadsafe
        calls: list[object] = []

        def counting(*args: Any) -> Any:
            calls.append(args)
            return threadsafe(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        try:
            wake_soon(loop, fut)  # on the loop: call_soon, no write to its wakeup fd
            await asyncio.wait_for(fut, 5)
            assert calls == []
            other: asyncio.Future[None] = loop.create_future()
            threading.Thread(target=wake_soon, args=(loop, other)).start()
            await asyncio.wait_for(other, 5)  # from another thread: the thread-safe way
            assert len(calls) == 1
        finally:
            del loop.call_soon_threadsafe

    asyncio.run(main())
