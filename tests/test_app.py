"""The worker runtime: arrival.App, @app.handler, typed messages, retry policies, the
circuit breaker, exactly-once handlers, concurrency and graceful shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import msgspec
import pytest

import arrival
from arrival import aio
from arrival.errors import GuaranteeMismatch, UnknownQueue, UsageError
from arrival.testing import FakeClock

IDLE = 0.15


class Order(msgspec.Struct):
    id: int
    amount: float = 0.0


class Payment(msgspec.Struct):
    __guarantee__ = "exactly-once"
    id: int


def send(broker: arrival.Broker, queue: str, obj: Any, **kw: Any) -> None:
    body, ct = arrival.encode(obj, kw.pop("content_type", None))
    headers = dict(kw.pop("headers", {}))
    if ct is not None:
        headers["content-type"] = ct
    broker.producer().send(queue, body, headers=headers or None, **kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broker(clock: FakeClock) -> Any:
    b = arrival.connect("memory:", clock=clock)
    b.create_queue("orders", "at-least-once", max_deliveries=3, dead_letter="orders.dlq")
    yield b
    b.close()


def dead(broker: arrival.Broker, queue: str) -> list[arrival.DeadMessage]:
    return broker.dead_letters(queue).list()


# -- typed messages --------------------------------------------------------------------


def test_a_struct_handler_gets_its_messages_decoded_from_json_and_msgpack(
    broker: arrival.Broker,
) -> None:
    got: list[Order] = []
    app = arrival.App(broker)

    @app.handler("orders")
    def handle(order: Order) -> None:
        got.append(order)

    send(broker, "orders", Order(1, 2.5))
    send(broker, "orders", Order(2, 3.0), content_type="application/msgpack")
    send(broker, "orders", Order(3), content_type="application/x-msgpack")
    broker.producer().send("orders", b'{"id": 4}')  # no content-type: JSON
    stats = app.run(until_idle=IDLE)
    assert sorted(got, key=lambda o: o.id) == [Order(1, 2.5), Order(2, 3.0), Order(3), Order(4)]
    assert stats[0].handled == 4
    assert broker.stats("orders").groups[0].backlog == 0  # all acked


def test_bytes_str_and_message_parameters(broker: arrival.Broker) -> None:
    seen: dict[str, Any] = {}
    broker.create_queue("raw", "at-least-once")
    app = arrival.App(broker)

    @app.handler("raw", group="bytes")
    def as_bytes(body: bytes) -> None:
        seen["bytes"] = body

    @app.handler("raw", group="text")
    async def as_text(body: str) -> None:
        seen["text"] = body

    @app.handler("raw", group="message")
    async def as_message(msg: aio.Message, ctx: arrival.Context) -> None:
        seen["message"] = (msg.body, msg.attempt, msg.key, ctx.attempt)

    @app.handler("raw", group="untyped")
    def untyped(body) -> None:  # type: ignore[no-untyped-def]
        seen["untyped"] = body

    broker.producer().send("raw", "héllo".encode(), key="k")
    app.run(until_idle=IDLE)
    assert seen == {
        "bytes": "héllo".encode(),
        "text": "héllo",
        "message": ("héllo".encode(), 1, "k", 1),
        "untyped": "héllo".encode(),
    }


def test_a_pydantic_model_is_decoded() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Signup(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        email: str
        age: int

    broker = arrival.connect("memory:")
    broker.create_queue("signups", "at-least-once", dead_letter="signups.dlq")
    got: list[Any] = []
    app = arrival.App(broker)

    def handle(s: Signup) -> None:
        got.append(s)

    handle.__annotations__["s"] = Signup  # a local class: annotate at run time
    app.handler("signups")(handle)
    send(broker, "signups", Signup(email="a@example.org", age=30))
    send(
        broker, "signups", Signup(email="b@example.org", age=31), content_type="application/msgpack"
    )
    broker.producer().send("signups", b'{"email": "c@example.org", "age": "old"}')
    app.run(until_idle=IDLE)
    assert [s.email for s in got] == ["a@example.org", "b@example.org"]
    (letter,) = dead(broker, "signups")
    assert letter.reason is not None
    assert "undecodable" in letter.reason
    broker.close()


def test_an_undecodable_body_is_dead_lettered_at_once_and_spares_the_breaker(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    app = arrival.App(broker, clock=clock.now)
    calls = []

    @app.handler("orders", breaker=arrival.CircuitBreaker(failure_threshold=1))
    def handle(order: Order) -> None:
        calls.append(order.id)

    broker.producer().send("orders", b"{not json", id="bad-json")
    broker.producer().send("orders", b'{"id": "seven"}', id="bad-type")
    broker.producer().send(
        "orders", b"\x00", id="bad-ct", headers={"content-type": "application/x-protobuf"}
    )
    send(broker, "orders", Order(8))
    (stats,) = app.run(until_idle=IDLE)
    letters = {d.id: d for d in dead(broker, "orders")}
    assert set(letters) == {"bad-json", "bad-type", "bad-ct"}
    assert all(d.attempts == 1 for d in letters.values())  # no retries: they cannot help
    assert "content-type" in (letters["bad-ct"].reason or "")
    assert calls == [8]
    assert stats.undecodable == 3
    assert stats.breaker_state == "closed"
    assert stats.failed == 0


# -- retries ---------------------------------------------------------------------------


def test_the_retry_policy_dead_letters_after_max_attempts(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    attempts: list[int] = []
    app = arrival.App(broker)

    @app.handler("orders", retry=arrival.RetryPolicy(max_attempts=2))
    async def handle(order: Order, ctx: arrival.Context) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("warehouse down")

    send(broker, "orders", Order(1), id="o-1")
    app.run(until_idle=IDLE)
    assert attempts == [1]
    assert dead(broker, "orders") == []  # waiting for its backoff
    clock.advance(3600)
    (stats,) = app.run(until_idle=IDLE)
    assert attempts == [1, 2]
    (letter,) = dead(broker, "orders")
    assert letter.id == "o-1"
    assert letter.attempts == 2
    assert "ConnectionError: warehouse down" in (letter.reason or "")
    assert (stats.failed, stats.retried, stats.dead_lettered) == (2, 1, 1)  # both runs


def test_dead_letter_on_skips_retries_and_retry_on_limits_them(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    app = arrival.App(broker)
    policy = arrival.RetryPolicy(retry_on=(ConnectionError,), dead_letter_on=(KeyError,))

    @app.handler("orders", retry=policy)
    def handle(order: Order) -> None:
        raise {1: KeyError("no such sku"), 2: ValueError("bad amount"), 3: ConnectionError()}[
            order.id
        ]

    for i in (1, 2, 3):
        send(broker, "orders", Order(i), id=f"o-{i}")
    (stats,) = app.run(until_idle=IDLE)
    assert sorted(d.id for d in dead(broker, "orders")) == ["o-1", "o-2"]  # not retryable
    assert stats.retried == 1  # o-3: a ConnectionError is retried
    assert broker.stats("orders").groups[0].waiting_retry == 1


def test_the_policys_backoff_delays_the_redelivery(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    attempts: list[int] = []
    app = arrival.App(broker)
    backoff = arrival.Backoff(initial_s=100.0, multiplier=1.0, max_s=100.0, jitter=0.0)

    @app.handler("orders", retry=arrival.RetryPolicy(backoff=backoff))
    def handle(msg: aio.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            raise TimeoutError

    send(broker, "orders", Order(1))
    app.run(until_idle=IDLE)
    clock.advance(99)  # the queue's own backoff (1 s) has passed, the policy's has not
    app.run(until_idle=IDLE)
    assert attempts == [1]
    clock.advance(2)
    app.run(until_idle=IDLE)
    assert attempts == [1, 2]


def test_retry_policy_arguments_are_checked() -> None:
    with pytest.raises(UsageError, match="max_attempts"):
        arrival.RetryPolicy(max_attempts=0)
    with pytest.raises(UsageError, match="retry_on"):
        arrival.RetryPolicy(retry_on=ValueError)  # type: ignore[arg-type]


# -- sends and exactly-once ------------------------------------------------------------


def test_sends_go_out_only_when_the_handler_succeeds_with_deterministic_ids(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    broker.create_queue("shipments", "at-least-once", dedup=True)
    app = arrival.App(broker)

    @app.handler("orders")
    def handle(order: Order, ctx: arrival.Context) -> None:
        ctx.send("shipments", {"order": order.id})
        ctx.send("shipments", b"raw", key="k", id="explicit")
        if ctx.attempt == 1:
            raise RuntimeError("after the sends")

    send(broker, "orders", Order(7), id="order-7")
    app.run(until_idle=IDLE)
    assert broker.peek("shipments") == []  # the failed attempt sent nothing
    clock.advance(3600)
    app.run(until_idle=IDLE)
    sent = broker.peek("shipments")
    assert [(m.id, m.body, m.headers.get("content-type")) for m in sent] == [
        ("order-7/0", b'{"order":7}', "application/json"),
        ("explicit", b"raw", None),
    ]


def test_an_exactly_once_handler_commits_its_sends_with_the_ack() -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("payments", "exactly-once", dead_letter="payments.dlq")
    broker.create_queue("ledger", "exactly-once")
    app = arrival.App(broker, name="billing")
    calls: list[int] = []

    @app.handler("payments", concurrency=2, batch=10, retry=arrival.RetryPolicy(max_attempts=1))
    async def pay(p: Payment, ctx: arrival.Context) -> None:
        calls.append(p.id)
        ctx.send("ledger", {"payment": p.id}, key=str(p.id))
        if p.id == 3:
            raise RuntimeError("card declined")

    for i in range(1, 6):
        send(broker, "payments", Payment(i), id=f"pay-{i}")
    (stats,) = app.run(until_idle=IDLE)
    ledger = broker.peek("ledger", 10)
    assert sorted(m.id for m in ledger) == ["pay-1/0", "pay-2/0", "pay-4/0", "pay-5/0"]
    (letter,) = dead(broker, "payments")
    assert letter.id == "pay-3"  # its output was discarded with it
    assert stats.handled == 4
    assert stats.dead_lettered == 1
    assert stats.guarantee == "exactly-once"
    assert broker.stats("payments").groups[0].backlog == 0
    broker.close()


def test_a_message_type_that_needs_a_stronger_queue_is_refused_at_start(
    broker: arrival.Broker,
) -> None:
    app = arrival.App(broker)

    @app.handler("orders")
    def handle(p: Payment) -> None:
        raise AssertionError("never runs")

    send(broker, "orders", Payment(1))
    with pytest.raises(GuaranteeMismatch, match="exactly-once"):
        app.run(until_idle=IDLE)
    assert broker.stats("orders").groups == () or broker.stats("orders").groups[0].acked == 0


def test_a_handler_can_declare_its_queue_and_an_unknown_one_is_refused() -> None:
    broker = arrival.connect("memory:")
    app = arrival.App(broker)

    @app.handler("events", guarantee="at-most-once", capacity=100, conflate=True)
    def on_event(body: bytes) -> None:
        pass

    app.run(until_idle=IDLE)
    assert broker.describe("events").spec.conflate is True

    other = arrival.App(broker)
    other.handler("missing")(on_event)
    with pytest.raises(UnknownQueue):
        other.run(until_idle=IDLE)
    broker.close()


def test_an_at_most_once_failure_is_counted_and_not_redelivered() -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("ticks", "at-most-once")
    app = arrival.App(broker)
    calls = []

    @app.handler("ticks")
    def tick(body: bytes) -> None:
        calls.append(body)
        raise RuntimeError("dropped")

    broker.producer().send("ticks", b"1")
    (stats,) = app.run(until_idle=IDLE)
    app.run(until_idle=IDLE)
    assert calls == [b"1"]
    assert stats.failed == 1
    assert stats.retried == 0
    broker.close()


# -- registration ----------------------------------------------------------------------


def test_handler_registration_errors(broker: arrival.Broker) -> None:
    app = arrival.App(broker)

    @app.handler("orders")
    def one(body: bytes) -> None:
        pass

    with pytest.raises(UsageError, match="another group"):
        app.handler("orders")(one)
    with pytest.raises(UsageError, match="concurrency"):
        app.handler("orders", group="x", concurrency=0)
    with pytest.raises(UsageError, match="required parameters"):
        app.handler("orders", group="y")(lambda: None)
    with pytest.raises(UsageError, match="need guarantee"):
        app.handler("orders", group="z", capacity=10)
    with pytest.raises(UsageError, match="no handlers"):
        arrival.App(broker).run(until_idle=IDLE)
    with pytest.raises(UsageError, match="failure_threshold"):
        arrival.CircuitBreaker(failure_threshold=0)


# -- concurrency -----------------------------------------------------------------------


def test_concurrency_runs_that_many_handlers_at_once(broker: arrival.Broker) -> None:
    app = arrival.App(broker)
    running = 0
    peak = 0

    @app.handler("orders", concurrency=4)
    async def handle(order: Order) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    for i in range(12):
        send(broker, "orders", Order(i))
    (stats,) = app.run(until_idle=IDLE)
    assert peak == 4
    assert stats.handled == 12


def test_sync_handlers_run_in_threads_up_to_their_concurrency(broker: arrival.Broker) -> None:
    app = arrival.App(broker)
    threads: set[str] = set()
    barrier = threading.Barrier(3, timeout=5)

    @app.handler("orders", concurrency=3)
    def handle(order: Order) -> None:
        threads.add(threading.current_thread().name)
        barrier.wait()  # fails unless three run at once

    for i in range(3):
        send(broker, "orders", Order(i))
    (stats,) = app.run(until_idle=IDLE)
    assert stats.handled == 3
    assert len(threads) == 3


# -- circuit breaker -------------------------------------------------------------------


def test_the_breaker_opens_releases_without_spending_attempts_and_recovers(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    healthy = False
    calls: list[int] = []
    app = arrival.App(broker, clock=clock.now)
    breaker = arrival.CircuitBreaker(failure_threshold=3, recovery_timeout=60)

    @app.handler("orders", breaker=breaker)
    def handle(order: Order) -> None:
        calls.append(order.id)
        if not healthy:
            raise ConnectionError("database down")

    for i in range(10):
        send(broker, "orders", Order(i), id=f"o-{i}")
    (stats,) = app.run(until_idle=IDLE)
    assert stats.breaker_state == "open"
    assert stats.breaker_opened == 1
    assert len(calls) == 3
    assert stats.failed == 3
    assert dead(broker, "orders") == []
    group = broker.stats("orders").groups[0]
    assert group.backlog == 10
    assert group.in_flight == 0

    clock.advance(59)  # still open: nothing runs, nothing is spent
    app.run(until_idle=IDLE)
    assert len(calls) == 3

    clock.advance(1)  # half-open: one trial; it fails, the breaker opens again
    (stats,) = app.run(until_idle=IDLE)
    assert len(calls) == 4
    assert stats.breaker_state == "open"
    assert stats.breaker_opened == 2

    healthy = True
    clock.advance(3600)  # half-open again; the trial succeeds and closes it
    (stats,) = app.run(until_idle=IDLE)
    assert stats.breaker_state == "closed"
    assert stats.consecutive_failures == 0
    assert stats.handled == 10
    # released deliveries did not count toward max_deliveries=3: nothing was dead-lettered
    assert dead(broker, "orders") == []
    assert broker.stats("orders").groups[0].backlog == 0


def test_the_breaker_of_an_exactly_once_handler(clock: FakeClock) -> None:
    broker = arrival.connect("memory:", clock=clock)
    broker.create_queue("payments", "exactly-once", max_deliveries=2, dead_letter="p.dlq")
    broker.create_queue("ledger", "exactly-once")
    healthy = False
    app = arrival.App(broker, clock=clock.now)

    @app.handler("payments", breaker=arrival.CircuitBreaker(2, 30), concurrency=2)
    def pay(p: Payment, ctx: arrival.Context) -> None:
        if not healthy:
            raise ConnectionError("bank down")
        ctx.send("ledger", {"p": p.id})

    for i in range(6):
        send(broker, "payments", Payment(i), id=f"p-{i}")
    (stats,) = app.run(until_idle=IDLE)
    assert stats.breaker_state == "open"
    assert stats.failed >= 2
    assert dead(broker, "payments") == []
    healthy = True
    clock.advance(3600)
    (stats,) = app.run(until_idle=IDLE)
    assert stats.breaker_state == "closed"
    assert sorted(m.id for m in broker.peek("ledger", 10)) == [f"p-{i}/0" for i in range(6)]
    assert dead(broker, "payments") == []
    broker.close()


# -- lifecycle -------------------------------------------------------------------------


def test_stop_finishes_messages_in_progress_and_takes_no_more(broker: arrival.Broker) -> None:
    started = threading.Event()
    app = arrival.App(broker, shutdown_timeout=10)
    done: list[int] = []

    @app.handler("orders")
    def handle(order: Order) -> None:
        started.set()
        time.sleep(0.3)
        done.append(order.id)

    for i in range(3):
        send(broker, "orders", Order(i))
    runner = threading.Thread(target=app.run)
    runner.start()
    assert started.wait(5)
    app.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert done == [0]  # the one in progress finished; no new ones were taken
    group = broker.stats("orders").groups[0]
    assert (group.acked, group.backlog, group.in_flight) == (1, 2, 0)


def test_a_handler_past_the_shutdown_deadline_gives_its_message_back(
    broker: arrival.Broker,
) -> None:
    started = asyncio.Event()
    app = arrival.App(broker, shutdown_timeout=0.2)

    @app.handler("orders")
    async def handle(order: Order) -> None:
        started.set()
        await asyncio.sleep(60)

    send(broker, "orders", Order(1), id="slow")

    async def main() -> None:
        task = asyncio.create_task(app.serve())
        await asyncio.wait_for(started.wait(), 5)
        app.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    (stats,) = app.stats()
    assert stats.released == 1
    assert stats.handled == 0
    group = broker.stats("orders").groups[0]
    assert (group.backlog, group.in_flight, group.dead_lettered) == (1, 0, 0)
    msg = broker.consumer("orders", "default").receive(timeout=1)
    assert msg is not None
    assert msg.id == "slow"


def test_a_runner_failure_stops_the_app_with_that_error(broker: arrival.Broker) -> None:
    app = arrival.App(broker)

    @app.handler("orders")
    def handle(order: Order) -> None:
        pass

    broker.close()  # the broker fails under the app
    with pytest.raises(arrival.errors.ClosedError):
        app.run(until_idle=IDLE)


def test_an_app_opens_and_closes_its_own_broker_from_a_url(tmp_path: Any) -> None:
    url = str(tmp_path / "data")
    with arrival.connect(url) as b:
        b.create_queue("orders", "at-least-once")
        send(b, "orders", Order(5))
    app = arrival.App(url)
    got: list[int] = []

    @app.handler("orders")
    def handle(order: Order) -> None:
        got.append(order.id)

    app.run(until_idle=IDLE)
    assert got == [5]
    with arrival.connect(url) as b:  # the app closed it: the directory is free again
        assert b.stats("orders").groups[0].backlog == 0


def test_the_lease_lost_flag_reaches_the_handler(broker: arrival.Broker, clock: FakeClock) -> None:
    seen: list[bool] = []
    app = arrival.App(broker)

    @app.handler("orders")
    def handle(order: Order, ctx: arrival.Context) -> None:
        seen.append(ctx.lease_lost)
        clock.advance(3600)  # the lease (30 s) runs out while the handler works
        seen.append(ctx.lease_lost)

    send(broker, "orders", Order(1))
    (stats,) = app.run(until_idle=IDLE)
    assert seen[:2] == [False, True]
    assert stats.lease_lost >= 1  # its ack was refused: the message comes back


def test_worker_metrics_expose_breaker_state(broker: arrival.Broker, clock: FakeClock) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from arrival.app.worker import handler_metrics

    app = arrival.App(broker, clock=clock.now)

    @app.handler("orders", breaker=arrival.CircuitBreaker(failure_threshold=1))
    def handle(order: Order) -> None:
        raise RuntimeError

    send(broker, "orders", Order(1))
    app.run(until_idle=IDLE)
    registry = CollectorRegistry()
    registry.register(handler_metrics(app))
    text = generate_latest(registry).decode()
    labels = 'group="default",handler="test_worker_metrics_expose_breaker_state.<locals>.handle"'
    assert f'arrival_handler_breaker_state{{{labels},queue="orders"}} 2.0' in text
    assert f'arrival_handler_failed_total{{{labels},queue="orders"}} 1.0' in text


def test_an_app_runs_against_a_server_over_the_network(clock: FakeClock) -> None:
    from arrival.storage.memory import MemoryStorage
    from inprocess_server import InProcessServer

    server = InProcessServer(MemoryStorage(), clock=clock)
    try:
        with arrival.connect(server.url) as b:
            b.create_queue("orders", "at-least-once", dead_letter="orders.dlq")
            b.create_queue("payments", "exactly-once")
            b.create_queue("ledger", "exactly-once")
            for i in range(3):
                send(b, "orders", Order(i), id=f"o-{i}")
            b.producer().send("orders", b"{", id="poison")
        app = arrival.App(server.url, name="remote")

        @app.handler("orders")
        async def order(o: Order, ctx: arrival.Context) -> None:
            ctx.send("payments", Payment(o.id))

        @app.handler("payments", concurrency=2)
        def pay(p: Payment, ctx: arrival.Context) -> None:
            ctx.send("ledger", {"p": p.id})

        stats = app.run(until_idle=0.3)
        assert [s.handled for s in stats] == [3, 3]
        with arrival.connect(server.url) as b:
            assert sorted(m.id for m in b.peek("ledger", 10)) == [
                "o-0/0/0",
                "o-1/0/0",
                "o-2/0/0",
            ]
            assert [d.id for d in b.dead_letters("orders").list()] == ["poison"]
    finally:
        server.stop()


def test_prefetch_holds_only_what_the_handler_gets_to_within_its_leases() -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("slow", "at-least-once", ack_timeout=0.4)
    app = arrival.App(broker)
    held: list[int] = []

    @app.handler("slow")
    def handle(body: bytes) -> None:
        held.append(broker.stats("slow").groups[0].in_flight)
        time.sleep(0.05)

    for i in range(8):
        broker.producer().send("slow", str(i).encode())
    (stats,) = app.run(until_idle=IDLE)
    assert stats.handled == 8
    assert held[0] == 1  # no pace measured yet: nothing held beyond the first
    # 0.05 s a message, a quarter of a 0.4 s lease: 2 more held at most
    assert max(held) <= 3
    assert stats.lease_lost == 0


def test_a_fast_handler_prefetches_and_prefetch_zero_does_not() -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("fast", "at-least-once")
    seen = {"adaptive": 0, "none": 0}
    app = arrival.App(broker)

    @app.handler("fast", group="adaptive")
    async def adaptive(body: bytes) -> None:
        seen["adaptive"] = max(seen["adaptive"], _in_flight(broker, "adaptive"))

    @app.handler("fast", group="none", prefetch=0)
    async def none(body: bytes) -> None:
        seen["none"] = max(seen["none"], _in_flight(broker, "none"))

    for i in range(600):
        broker.producer().send("fast", str(i).encode())
    app.run(until_idle=IDLE)
    assert seen["none"] == 1
    assert 1 < seen["adaptive"] <= 1 + 256
    with pytest.raises(UsageError, match="prefetch"):
        app.handler("fast", group="bad", prefetch=-1)


def _in_flight(broker: arrival.Broker, group: str) -> int:
    return next(g.in_flight for g in broker.stats("fast").groups if g.group == group)


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_max_total_deliveries_dead_letters_before_the_handler_runs(guarantee: str) -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("jobs", guarantee, dead_letter="jobs.dlq")
    broker.producer().send("jobs", b"x", id="crashy")
    c = broker.consumer("jobs", "default")
    for _ in range(2):  # two deliveries that ended without an outcome (as a crash would)
        msg = c.receive(timeout=1)
        assert msg is not None
        msg.release()
    c.close()
    app = arrival.App(broker)
    calls = []

    @app.handler("jobs", retry=arrival.RetryPolicy(max_total_deliveries=2))
    def handle(body: bytes) -> None:
        calls.append(body)

    (stats,) = app.run(until_idle=IDLE)
    assert calls == []
    (letter,) = broker.dead_letters("jobs").list()
    assert letter.id == "crashy"
    assert "delivered 3 times" in (letter.reason or "")
    assert stats.dead_lettered == 1
    with pytest.raises(UsageError, match="max_total_deliveries"):
        arrival.RetryPolicy(max_total_deliveries=0)
    broker.close()


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the chunks the app hands its sync handlers' threads."""
    sizes: list[int] = []
    real = arrival.App._run_chunk

    def counting(self: arrival.App, h: Any, ready: list[Any]) -> Any:
        sizes.append(len(ready))
        return real(self, h, ready)

    monkeypatch.setattr(arrival.App, "_run_chunk", counting)
    return sizes


def test_a_fast_sync_handler_gets_several_messages_per_thread_hop(chunks: list[int]) -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("fast", "at-least-once", dead_letter="fast.dlq")
    broker.create_queue("out", "at-least-once")
    app = arrival.App(broker)
    calls: list[bytes] = []

    @app.handler("fast", retry=arrival.RetryPolicy(dead_letter_on=(ValueError,)))
    def handle(body: bytes, ctx: arrival.Context) -> None:
        calls.append(body)
        if body == b"250":
            raise ValueError("bad one")
        ctx.send("out", body)

    for i in range(600):
        broker.producer().send("fast", str(i).encode())
    (stats,) = app.run(until_idle=IDLE)
    assert chunks  # it did hand out chunks ...
    assert max(chunks) > 1
    assert max(chunks) <= 32
    assert sorted(calls, key=int) == [str(i).encode() for i in range(600)]  # ... once each
    assert (stats.handled, stats.failed, stats.dead_lettered) == (599, 1, 1)
    assert broker.stats("out").stored == 599
    assert broker.stats("fast").groups[0].backlog == 0
    broker.close()


def test_a_failure_in_a_chunk_stops_it_and_an_opened_breaker_releases_the_rest(
    clock: FakeClock,
) -> None:
    broker = arrival.connect("memory:", clock=clock)
    broker.create_queue("fast", "at-least-once", dead_letter="fast.dlq")
    app = arrival.App(broker, clock=clock.now)
    calls: list[int] = []

    @app.handler("fast", breaker=arrival.CircuitBreaker(failure_threshold=1))
    def handle(body: bytes) -> None:
        calls.append(int(body))
        if int(body) == 300:
            raise ConnectionError("down")

    for i in range(600):
        broker.producer().send("fast", str(i).encode())
    (stats,) = app.run(until_idle=IDLE)
    assert calls == list(range(301))  # nothing after the failure ran
    assert stats.breaker_state == "open"
    assert stats.handled == 300
    group = broker.stats("fast").groups[0]
    assert (group.in_flight, group.backlog, group.dead_lettered) == (0, 300, 0)
    broker.close()


def test_an_exactly_once_sync_handler_gets_chunks_and_a_failure_discards_only_its_outputs(
    chunks: list[int],
) -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("payments", "exactly-once", dead_letter="payments.dlq")
    broker.create_queue("ledger", "exactly-once")
    app = arrival.App(broker)
    calls: list[int] = []

    @app.handler("payments", batch=100, retry=arrival.RetryPolicy(dead_letter_on=(KeyError,)))
    def pay(p: Payment, ctx: arrival.Context) -> None:
        calls.append(p.id)
        ctx.send("ledger", {"p": p.id})
        if p.id == 150:
            raise KeyError("no such account")

    for i in range(300):
        send(broker, "payments", Payment(i), id=f"p-{i}")
    (stats,) = app.run(until_idle=IDLE)
    assert max(chunks) > 1
    assert sorted(calls) == list(range(300))
    ledger = broker.peek("ledger", 1000)
    assert sorted(m.id for m in ledger) == sorted(f"p-{i}/0" for i in range(300) if i != 150)
    (letter,) = broker.dead_letters("payments").list()
    assert letter.id == "p-150"
    assert (stats.handled, stats.failed, stats.dead_lettered) == (299, 1, 1)
    broker.close()
