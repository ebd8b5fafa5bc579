"""Consumer.process: exactly-once consume-transform-produce, sync and async.

Each input's outputs and its ack commit in one transaction (per message, or per batch);
a failing handler only loses its own message's outputs; a refused commit (lost lease,
timeout) leaves nothing behind and its inputs are processed again; a newer holder of the
transactional id stops the older loop. Real time is used only for ``interval``/``idle``
(kept to fractions of a second); leases run on the FakeClock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

import arrival
import arrival.aio
from arrival.errors import MessageTooLarge, ProducerFenced, UnknownQueue, UsageError
from arrival.testing import FakeClock
from conftest import NO_BACKOFF, Stores, bodies, drain

T = TypeVar("T")

ACK_TIMEOUT_S = 10.0
FAST_S = 5.0  # "this returned promptly": generous for a loaded CI box, far below a hang


def setup_queues(broker: arrival.Broker, *, max_deliveries: int = 5) -> None:
    broker.create_queue(
        "in",
        "exactly-once",
        ack_timeout=ACK_TIMEOUT_S,
        backoff=NO_BACKOFF,
        max_deliveries=max_deliveries,
    )
    broker.create_queue("out", "exactly-once")
    broker.create_queue("log", "at-least-once")


def feed(broker: arrival.Broker, n: int, queue: str = "in") -> None:
    p = broker.producer()
    for i in range(n):
        p.send(queue, f"m{i}".encode(), id=f"m{i}")


def transform(msg: arrival.Message, out: arrival.Outputs) -> None:
    """Two outputs per input, in two queues: ids ``<input>/0`` and ``<input>/1``."""
    out.send("out", msg.body.upper())
    out.send("log", msg.body + b" seen")


def ids(broker: arrival.Broker, queue: str) -> list[str | None]:
    return [m.id for m in broker.peek(queue, 1000)]


def group_stats(broker: arrival.Broker, queue: str = "in", group: str = "g") -> Any:
    (g,) = [g for g in broker.stats(queue).groups if g.group == group]
    return g


def result_tuple(r: arrival.ProcessResult) -> tuple[int, int, int]:
    return (r.committed, r.failed, r.aborted)


# -- the happy path -----------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "sizes"), [(1, [1] * 7), (3, [3, 3, 1]), (50, [7])])
def test_every_input_gets_its_outputs_exactly_once(
    broker: arrival.Broker, batch: int, sizes: list[int]
) -> None:
    setup_queues(broker)
    feed(broker, 7)
    c = broker.consumer("in", "g")
    commits: list[list[str]] = []
    r = c.process(
        transform,
        transactional_id="t",
        batch=batch,
        interval=FAST_S,  # only the batch size (and the limit) ends a batch
        limit=7,
        on_commit=lambda msgs: commits.append([m.id for m in msgs]),
    )
    assert result_tuple(r) == (7, 0, 0)
    assert [len(b) for b in commits] == sizes
    assert [i for b in commits for i in b] == [f"m{i}" for i in range(7)]
    assert ids(broker, "out") == [f"m{i}/0" for i in range(7)]
    assert ids(broker, "log") == [f"m{i}/1" for i in range(7)]
    assert bodies(drain(broker.consumer("out", "reader"))) == [f"M{i}".encode() for i in range(7)]
    g = group_stats(broker)
    assert (g.acked, g.in_flight, g.backlog) == (7, 0, 0)
    assert broker.consumer("in", "g").receive(timeout=0) is None


def test_outputs_are_not_visible_before_their_batch_commits(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, 6)
    c = broker.consumer("in", "g")
    seen: dict[str, set[str | None]] = {}

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        seen[msg.id] = set(ids(broker, "out"))
        out.send("out", msg.body)

    r = c.process(handler, transactional_id="t", batch=2, interval=FAST_S, limit=6)
    assert result_tuple(r) == (6, 0, 0)
    batches = [["m0", "m1"], ["m2", "m3"], ["m4", "m5"]]
    for i, batch in enumerate(batches):
        own = {f"{m}/0" for m in batch}
        earlier = {f"{m}/0" for b in batches[:i] for m in b}
        for m in batch:
            # nothing of its own batch, nor of a later one; an earlier batch's commit
            # may still be in flight (commits are pipelined), so it may or may not show
            assert not seen[m] & own, (m, seen[m])
            assert seen[m] <= earlier, (m, seen[m])
    assert ids(broker, "out") == [f"m{i}/0" for i in range(6)]


def test_explicit_output_ids_are_kept(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, 2)

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        out.send("out", msg.body, id=f"explicit-{msg.id}")
        out.send("out", msg.body + b"!", key="k", headers={"h": "v"})

    broker.consumer("in", "g").process(handler, transactional_id="t", batch=2, limit=2)
    got = [(m.id, m.key, m.headers) for m in broker.peek("out", 10)]
    assert got == [
        ("explicit-m0", None, {}),
        ("m0/0", "k", {"h": "v"}),
        ("explicit-m1", None, {}),
        ("m1/0", "k", {"h": "v"}),
    ]


# -- failing handlers ---------------------------------------------------------------------


def test_a_failing_message_is_retried_and_the_rest_of_the_batch_commits(
    broker: arrival.Broker,
) -> None:
    setup_queues(broker)
    feed(broker, 5)
    c = broker.consumer("in", "g")
    attempts: list[tuple[str, int]] = []
    commits: list[list[str]] = []

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        attempts.append((msg.id, msg.attempt))
        out.send("out", b"%s@%d" % (msg.body, msg.attempt))  # discarded when it raises
        if msg.id == "m2" and msg.attempt < 3:
            raise ValueError(f"flaky on attempt {msg.attempt}")

    r = c.process(
        handler,
        transactional_id="t",
        batch=5,
        interval=FAST_S,
        limit=7,  # 5 successes and 2 failures
        on_commit=lambda msgs: commits.append([m.id for m in msgs]),
    )
    assert result_tuple(r) == (5, 2, 0)
    # NO_BACKOFF: the nacked message came straight back; the rest of its batch had
    # committed already, since no more input was waiting
    assert [a for a in attempts if a[0] == "m2"] == [("m2", 1), ("m2", 2), ("m2", 3)]
    assert commits == [["m0", "m1", "m3", "m4"], ["m2"]]
    assert ids(broker, "out") == ["m0/0", "m1/0", "m3/0", "m4/0", "m2/0"]
    out = bodies(drain(broker.consumer("out", "reader")))
    assert [b for b in out if b.startswith(b"m2")] == [b"m2@3"]
    g = group_stats(broker)
    assert (g.acked, g.nacked, g.in_flight, g.dead_lettered) == (5, 2, 0, 0)


def test_a_message_that_keeps_failing_is_dead_lettered_without_outputs(
    broker: arrival.Broker,
) -> None:
    setup_queues(broker, max_deliveries=3)
    feed(broker, 5)
    c = broker.consumer("in", "g")

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        out.send("out", msg.body)
        if msg.id == "m2":
            raise RuntimeError("poison")

    r = c.process(handler, transactional_id="t", batch=5, interval=FAST_S, limit=7)
    assert result_tuple(r) == (4, 3, 0)
    assert ids(broker, "out") == ["m0/0", "m1/0", "m3/0", "m4/0"]
    (dead,) = broker.dead_letters("in").list()
    assert (dead.id, dead.body, dead.attempts) == ("m2", b"m2", 3)
    assert dead.last_error is not None
    assert "RuntimeError: poison" in dead.last_error
    assert broker.consumer("in", "g").receive(timeout=0) is None


def test_a_failure_on_the_only_message_of_a_batch_commits_nothing(
    broker: arrival.Broker,
) -> None:
    setup_queues(broker, max_deliveries=1)
    feed(broker, 1)

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        out.send("out", msg.body)
        raise KeyError("nope")

    r = broker.consumer("in", "g").process(handler, transactional_id="t", limit=1)
    assert result_tuple(r) == (0, 1, 0)
    assert broker.peek("out") == []
    assert [d.id for d in broker.dead_letters("in").list()] == ["m0"]


@pytest.mark.parametrize("bad", ["unknown-queue", "too-large"])
def test_a_refused_output_discards_all_outputs_of_its_message(
    broker: arrival.Broker, bad: str
) -> None:
    setup_queues(broker)
    broker.create_queue("small", "exactly-once", max_message_bytes=1024)
    feed(broker, 2)

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        out.send("out", msg.body)
        if msg.id == "m1":
            if bad == "unknown-queue":
                out.send("nope", msg.body)
            else:
                out.send("small", b"x" * 2048)

    with contextlib.suppress(UnknownQueue, MessageTooLarge):
        broker.consumer("in", "g").process(handler, transactional_id="t", batch=5, limit=2)
    # m1 was not acked, so none of its outputs may exist (else its retry duplicates
    # them downstream of any queue without dedup)
    assert "m1/0" not in ids(broker, "out")


# -- when batches commit, and when the loop ends ------------------------------------------


def test_a_partial_batch_commits_as_soon_as_the_input_runs_dry(broker: arrival.Broker) -> None:
    # no waiting for more: a quiet queue's messages get no added latency, while a busy
    # one fills its batches (the next receive returns a full batch)
    setup_queues(broker)
    feed(broker, 3)
    interval = 30.0
    commits: list[tuple[float, list[str], int]] = []
    handled: list[float] = []

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        handled.append(time.monotonic())
        transform(msg, out)

    def on_commit(msgs: list[arrival.Message]) -> None:
        commits.append((time.monotonic(), [m.id for m in msgs], len(broker.peek("out", 100))))

    deadline = time.monotonic() + FAST_S
    r = broker.consumer("in", "g").process(
        handler,
        transactional_id="t",
        batch=100,
        interval=interval,
        stop=lambda: bool(commits) or time.monotonic() > deadline,
        on_commit=on_commit,
    )
    assert result_tuple(r) == (3, 0, 0)
    ((at, batch_ids, visible),) = commits  # committed inside the loop, before the deadline
    assert batch_ids == ["m0", "m1", "m2"]
    assert visible == 3  # durable and visible when on_commit runs
    assert at - handled[0] < FAST_S < interval  # it did not wait for the interval


def test_limit_ends_the_loop_without_taking_more(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, 10)
    c = broker.consumer("in", "g")
    r = c.process(transform, transactional_id="t", batch=3, interval=FAST_S, limit=4)
    assert result_tuple(r) == (4, 0, 0)
    assert ids(broker, "out") == [f"m{i}/0" for i in range(4)]
    assert c.stats().in_flight == 0  # it did not take (and sit on) more than the limit
    rest = drain(broker.consumer("in", "g"))
    assert [m.id for m in rest] == [f"m{i}" for i in range(4, 10)]


def test_idle_ends_the_loop(broker: arrival.Broker) -> None:
    setup_queues(broker)
    c = broker.consumer("in", "g")
    start = time.monotonic()
    r = c.process(transform, transactional_id="t", idle=0.05)
    assert result_tuple(r) == (0, 0, 0)
    assert time.monotonic() - start < FAST_S
    feed(broker, 3)
    r = c.process(transform, transactional_id="t", batch=2, interval=0.05, idle=0.1)
    assert result_tuple(r) == (3, 0, 0)
    assert ids(broker, "out") == ["m0/0", "m1/0", "m2/0"]


def test_stop_ends_the_loop(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, 10)
    handled: list[str] = []

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        handled.append(msg.id)
        transform(msg, out)

    r = broker.consumer("in", "g").process(
        handler, transactional_id="t", stop=lambda: len(handled) >= 3
    )
    assert result_tuple(r) == (3, 0, 0)
    assert handled == ["m0", "m1", "m2"]
    assert len(ids(broker, "out")) == 3


def test_stop_is_checked_while_waiting_for_messages(broker: arrival.Broker) -> None:
    setup_queues(broker)
    flag = threading.Event()
    threading.Timer(0.1, flag.set).start()
    start = time.monotonic()
    r = broker.consumer("in", "g").process(transform, transactional_id="t", stop=flag.is_set)
    assert result_tuple(r) == (0, 0, 0)
    assert time.monotonic() - start < FAST_S


def test_closing_the_consumer_from_another_thread_ends_the_loop(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, 2)
    c = broker.consumer("in", "g")
    closer = threading.Timer(0.1, c.close)
    closer.start()
    start = time.monotonic()
    r = c.process(transform, transactional_id="t", batch=1)  # no limit, idle or stop
    closer.join()
    assert result_tuple(r) == (2, 0, 0)
    assert time.monotonic() - start < FAST_S
    assert ids(broker, "out") == ["m0/0", "m1/0"]


def test_closing_mid_batch_commits_nothing_and_gives_the_inputs_back(
    broker: arrival.Broker,
) -> None:
    setup_queues(broker)
    feed(broker, 2)
    c = broker.consumer("in", "g")
    closer = threading.Timer(0.1, c.close)

    def slow(msg: arrival.Message, out: arrival.Outputs) -> None:
        closer.join()  # the consumer closes while its batch is being handled
        transform(msg, out)

    closer.start()
    start = time.monotonic()
    r = c.process(slow, transactional_id="t", batch=10, interval=FAST_S)
    closer.join()
    assert time.monotonic() - start < FAST_S
    # closing released the held leases, so the batch's commit was refused
    assert result_tuple(r) == (0, 0, 1)
    assert broker.peek("out") == []
    back = drain(broker.consumer("in", "g"))
    assert [m.id for m in back] == ["m0", "m1"]


def test_what_process_committed_survives_a_crash(stores: Stores, clock: FakeClock) -> None:
    """Commits are pipelined inside the loop, but when process() returns, everything it
    counted as committed is durable: a crash right after loses none of it, and a restart
    processes only the rest."""
    b = stores.open()
    setup_queues(b)
    feed(b, 10)
    r = b.consumer("in", "g").process(transform, transactional_id="t", batch=2, limit=5)
    assert result_tuple(r) == (5, 0, 0)
    stores.crash(b)
    b = stores.open()
    setup_queues(b)
    assert ids(b, "out") == [f"m{i}/0" for i in range(5)]
    clock.advance(ACK_TIMEOUT_S + 1)  # leases of the crashed broker are over
    r = b.consumer("in", "g").process(transform, transactional_id="t", batch=4, limit=5)
    assert result_tuple(r) == (5, 0, 0)
    assert ids(b, "out") == [f"m{i}/0" for i in range(10)]
    assert ids(b, "log") == [f"m{i}/1" for i in range(10)]
    assert b.consumer("in", "g").receive(timeout=0) is None


# -- refused commits ----------------------------------------------------------------------


def test_a_commit_refused_for_a_lost_lease_is_redone_exactly_once(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, 3)
    seen: list[tuple[str, int, int]] = []  # (input, attempt, outputs visible then)

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        seen.append((msg.id, msg.attempt, len(broker.peek("out", 100))))
        if (msg.id, msg.attempt) == ("m0", 1):
            clock.advance(ACK_TIMEOUT_S + 1)  # a long pause: every lease of the batch ends
        transform(msg, out)

    r = broker.consumer("in", "g").process(
        handler, transactional_id="t", batch=3, interval=FAST_S, limit=3
    )
    assert result_tuple(r) == (3, 0, 1)
    assert [(i, a) for i, a, _ in seen] == [
        ("m0", 1),
        ("m1", 1),
        ("m2", 1),
        ("m0", 2),
        ("m1", 2),
        ("m2", 2),
    ]
    assert [v for *_, v in seen] == [0] * 6  # nothing of the refused batch ever showed
    assert ids(broker, "out") == ["m0/0", "m1/0", "m2/0"]
    assert ids(broker, "log") == ["m0/1", "m1/1", "m2/1"]
    g = group_stats(broker)
    assert (g.acked, g.in_flight, g.expired) == (3, 0, 3)


def test_a_commit_refused_for_the_transaction_timeout_is_redone(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    if broker.url.startswith("arrival://"):
        pytest.skip(
            "over the network a processing loop's transaction age is measured by the "
            "client's clock, which the fake clock behind the server does not drive"
        )
    broker.create_queue("in", "exactly-once", ack_timeout=100.0, backoff=NO_BACKOFF)
    broker.create_queue("out", "exactly-once")
    broker.create_queue("log", "at-least-once")
    feed(broker, 2)
    c = broker.consumer("in", "g")

    def slow(msg: arrival.Message, out: arrival.Outputs) -> None:
        clock.advance(4)  # past the transaction's 3 s, within the 100 s lease
        transform(msg, out)

    r = c.process(slow, transactional_id="t", batch=2, interval=FAST_S, timeout=3, idle=0.1)
    assert result_tuple(r) == (0, 0, 1)
    assert broker.peek("out") == []
    clock.advance(100)  # the leases of the refused batch end: the inputs come back
    r = c.process(transform, transactional_id="t", batch=2, interval=FAST_S, limit=2)
    assert result_tuple(r) == (2, 0, 0)
    assert ids(broker, "out") == ["m0/0", "m1/0"]


def test_a_zombie_whose_message_was_finished_elsewhere_keeps_running(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, 1)
    zombie, live = broker.consumer("in", "g"), broker.consumer("in", "g")
    took_over: list[arrival.ProcessResult] = []

    def stalls(msg: arrival.Message, out: arrival.Outputs) -> None:
        clock.advance(ACK_TIMEOUT_S + 1)  # the zombie pauses; its lease ends
        took_over.append(live.process(transform, transactional_id="live", limit=1))
        transform(msg, out)

    r = zombie.process(stalls, transactional_id="zombie", limit=1, idle=0.1)
    assert result_tuple(took_over[0]) == (1, 0, 0)
    assert r.aborted == 1
    assert r.committed == 0
    assert ids(broker, "out") == ["m0/0"]


# -- fencing ------------------------------------------------------------------------------


def test_a_newer_processor_with_the_same_id_fences_the_older(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, 1)
    older, newer = broker.consumer("in", "g"), broker.consumer("in", "g")
    newer_results: list[arrival.ProcessResult] = []

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        if not newer_results:  # while the older holds m0, m1 arrives and a newer starts
            broker.producer().send("in", b"m1", id="m1")
            newer_results.append(newer.process(transform, transactional_id="t", limit=1))
        transform(msg, out)

    with pytest.raises(ProducerFenced, match="'t'"):
        older.process(handler, transactional_id="t", limit=2)
    assert result_tuple(newer_results[0]) == (1, 0, 0)
    assert ids(broker, "out") == ["m1/0"]  # the fenced batch left nothing
    # m0 was not acked by the fenced processor: it comes back and is processed once
    clock.advance(ACK_TIMEOUT_S + 1)
    r = newer.process(transform, transactional_id="t", limit=1)
    assert result_tuple(r) == (1, 0, 0)
    assert ids(broker, "out") == ["m1/0", "m0/0"]


def test_a_newer_processor_is_never_fenced_by_an_older_one_that_keeps_running(
    broker: arrival.Broker,
) -> None:
    # The loop holds one epoch for all its transactions. An older loop that carries on
    # after a newer one started must not fence the newer one with its next transaction:
    # it is the older one that is fenced, and it hands back what it held.
    setup_queues(broker)
    feed(broker, 1)
    older, newer = broker.consumer("in", "g"), broker.consumer("in", "g")
    stop_older = threading.Event()
    outcome: dict[str, object] = {}

    def run_older() -> None:
        try:
            outcome["older"] = older.process(
                transform, transactional_id="t", stop=stop_older.is_set
            )
        except ProducerFenced as e:
            outcome["older"] = e

    t = threading.Thread(target=run_older)
    t.start()
    deadline = time.monotonic() + 10
    while ids(broker, "out") != ["m0/0"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ids(broker, "out") == ["m0/0"]  # the older loop is running, between batches

    def more() -> None:
        time.sleep(0.2)  # the newer loop has begun its epoch by now
        for i in range(1, 7):
            broker.producer().send("in", f"m{i}".encode(), id=f"m{i}")
            time.sleep(0.02)

    feeder = threading.Thread(target=more)
    feeder.start()
    r = newer.process(transform, transactional_id="t", idle=1.5)  # never ProducerFenced
    feeder.join()
    stop_older.set()
    t.join(10)
    assert sorted(i or "" for i in ids(broker, "out")) == [f"m{i}/0" for i in range(7)]
    older_result = outcome["older"]
    if isinstance(older_result, ProducerFenced):  # it got a message after the fence
        assert r.committed >= 1
    else:  # it never got one: nothing to fence
        assert isinstance(older_result, arrival.ProcessResult)
        assert older_result.committed == 1
        assert r.committed == 6


def test_one_transaction_per_message_keeps_handling_while_commits_are_in_flight(
    clock: FakeClock,
) -> None:
    # batch=1: while the first commit's write is held, the loop goes on handling the next
    # messages and submitting their transactions; the writer then commits them together
    from arrival._process import MAX_IN_FLIGHT
    from arrival.storage.memory import MemoryStorage
    from test_idempotence import Gate

    gate = Gate(MemoryStorage())
    broker = arrival.connect(gate, clock=clock)
    try:
        setup_queues(broker)
        feed(broker, 6)
        handled_while_held: list[str] = []
        safety = threading.Timer(5.0, gate.release)  # a loop that waits can't hang

        def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
            if msg.id == "m0":
                gate.hold()  # the next commit (m0's transaction) waits in the store
                safety.start()
            elif gate.entered.wait(2.0) and not gate._open.is_set():
                handled_while_held.append(msg.id)
                if len(handled_while_held) == 5:
                    gate.release()
            transform(msg, out)

        r = broker.consumer("in", "g").process(handler, transactional_id="t", limit=6)
        assert result_tuple(r) == (6, 0, 0)
        assert handled_while_held == ["m1", "m2", "m3", "m4", "m5"]
        assert MAX_IN_FLIGHT > 5
        assert ids(broker, "out") == [f"m{i}/0" for i in range(6)]
    finally:
        safety.cancel()
        gate.release()
        broker.close()


# -- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": 0}, "batch"),
        ({"batch": -1}, "batch"),
        ({"interval": 0}, "interval"),
        ({"interval": -0.5}, "interval"),
    ],
)
def test_bad_arguments_are_refused(
    broker: arrival.Broker, kwargs: dict[str, Any], match: str
) -> None:
    setup_queues(broker)
    feed(broker, 1)
    c = broker.consumer("in", "g")
    with pytest.raises(UsageError, match=match):
        c.process(transform, transactional_id="t", **kwargs)
    assert c.stats().received == 0  # refused before taking anything


def test_a_bad_transaction_timeout_is_refused(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, 1)
    c = broker.consumer("in", "g")
    with pytest.raises(UsageError, match="timeout"):
        c.process(transform, transactional_id="t", timeout=0, limit=1)
    assert broker.peek("out") == []


def test_nan_interval_is_refused(broker: arrival.Broker) -> None:
    setup_queues(broker)
    c = broker.consumer("in", "g")
    with pytest.raises(UsageError, match="interval"):
        c.process(transform, transactional_id="t", interval=math.nan, limit=0)


# =========================================================================================
# arrival.aio Consumer.process (run with asyncio.run, as tests/test_aio.py does)
# =========================================================================================


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def with_broker(
    stores: Stores,
    clock: FakeClock,
    body: Callable[[arrival.aio.Broker], Awaitable[T]],
    *,
    max_deliveries: int = 5,
    feed_n: int = 0,
) -> T:
    async def main() -> T:
        b = await stores.aopen()
        try:
            await b.create_queue(
                "in",
                "exactly-once",
                ack_timeout=ACK_TIMEOUT_S,
                backoff=NO_BACKOFF,
                max_deliveries=max_deliveries,
            )
            await b.create_queue("out", "exactly-once")
            await b.create_queue("log", "at-least-once")
            p = b.producer()
            for i in range(feed_n):
                await p.send("in", f"m{i}".encode(), id=f"m{i}")
            return await body(b)
        finally:
            await b.close()

    return run(main())


async def _aids(b: arrival.aio.Broker, queue: str) -> list[str | None]:
    return [m.id for m in await b.peek(queue, 1000)]


async def atransform(msg: arrival.aio.Message, out: arrival.aio.Outputs) -> None:
    await out.send("out", msg.body.upper())
    await out.send("log", msg.body + b" seen")


@pytest.mark.parametrize("batch", [1, 3, 50])
@pytest.mark.parametrize("kind", ["async-handler", "sync-handler"])
def test_aio_every_input_gets_its_outputs_exactly_once(
    stores: Stores, clock: FakeClock, batch: int, kind: str
) -> None:
    def sync_handler(msg: arrival.aio.Message, out: arrival.aio.Outputs) -> Any:
        return out.send("out", msg.body.upper())  # a sync handler may return an awaitable

    async def async_handler(msg: arrival.aio.Message, out: arrival.aio.Outputs) -> None:
        await out.send("out", msg.body.upper())

    handler = async_handler if kind == "async-handler" else sync_handler

    async def body(b: arrival.aio.Broker) -> None:
        c = b.consumer("in", "g")
        commits: list[int] = []
        r = await c.process(
            handler,
            transactional_id="t",
            batch=batch,
            interval=FAST_S,
            limit=7,
            on_commit=lambda msgs: commits.append(len(msgs)),
        )
        assert result_tuple(r) == (7, 0, 0)
        assert sum(commits) == 7
        assert max(commits) <= batch
        assert await _aids(b, "out") == [f"m{i}/0" for i in range(7)]
        assert await c.receive(timeout=0) is None
        (g,) = (await b.stats("in")).groups
        assert (g.acked, g.in_flight) == (7, 0)

    with_broker(stores, clock, body, feed_n=7)


def test_aio_failures_are_retried_then_dead_lettered(stores: Stores, clock: FakeClock) -> None:
    async def handler(msg: arrival.aio.Message, out: arrival.aio.Outputs) -> None:
        await out.send("out", b"%s@%d" % (msg.body, msg.attempt))
        if msg.id == "m1" and msg.attempt < 2:
            raise ValueError("flaky")
        if msg.id == "m3":
            raise ValueError("poison")

    async def body(b: arrival.aio.Broker) -> None:
        r = await b.consumer("in", "g").process(
            handler, transactional_id="t", batch=4, interval=FAST_S, limit=3 + 1 + 3
        )
        assert result_tuple(r) == (3, 4, 0)
        assert await _aids(b, "out") == ["m0/0", "m2/0", "m1/0"]
        got = [m.body for m in await b.peek("out", 10)]
        assert got == [b"m0@1", b"m2@1", b"m1@2"]
        dead = await b.dead_letters("in").list()
        assert [(d.id, d.attempts) for d in dead] == [("m3", 3)]

    with_broker(stores, clock, body, max_deliveries=3, feed_n=4)


def test_aio_lost_lease_is_counted_and_redone(stores: Stores, clock: FakeClock) -> None:
    async def handler(msg: arrival.aio.Message, out: arrival.aio.Outputs) -> None:
        if (msg.id, msg.attempt) == ("m1", 1):
            clock.advance(ACK_TIMEOUT_S + 1)
        await atransform(msg, out)

    async def body(b: arrival.aio.Broker) -> None:
        r = await b.consumer("in", "g").process(
            handler, transactional_id="t", batch=2, interval=FAST_S, limit=2
        )
        assert result_tuple(r) == (2, 0, 1)
        assert await _aids(b, "out") == ["m0/0", "m1/0"]
        assert await _aids(b, "log") == ["m0/1", "m1/1"]

    with_broker(stores, clock, body, feed_n=2)


def test_aio_fenced_processor_stops(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        older, newer = b.consumer("in", "g"), b.consumer("in", "g")
        newer_results: list[arrival.ProcessResult] = []

        async def handler(msg: arrival.aio.Message, out: arrival.aio.Outputs) -> None:
            if not newer_results:  # while the older holds m0, m1 arrives and a newer starts
                await b.producer().send("in", b"m1", id="m1")
                newer_results.append(await newer.process(atransform, transactional_id="t", limit=1))
            await atransform(msg, out)

        with pytest.raises(ProducerFenced):
            await older.process(handler, transactional_id="t", limit=2)
        assert result_tuple(newer_results[0]) == (1, 0, 0)
        assert await _aids(b, "out") == ["m1/0"]

    with_broker(stores, clock, body, feed_n=1)


def test_aio_closing_from_another_task_ends_the_loop(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        c = b.consumer("in", "g")

        async def close_soon() -> None:
            await asyncio.sleep(0.1)
            await c.close()

        closer = asyncio.create_task(close_soon())
        start = time.monotonic()
        r = await asyncio.wait_for(c.process(atransform, transactional_id="t"), FAST_S)
        await closer
        assert result_tuple(r) == (2, 0, 0)
        assert time.monotonic() - start < FAST_S
        assert await _aids(b, "out") == ["m0/0", "m1/0"]

    with_broker(stores, clock, body, feed_n=2)


def test_aio_interval_idle_and_stop(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        c = b.consumer("in", "g")
        commits: list[int] = []
        r = await c.process(
            atransform,
            transactional_id="t",
            batch=100,
            interval=0.1,
            stop=lambda: bool(commits),
            on_commit=lambda msgs: commits.append(len(msgs)),
        )
        assert result_tuple(r) == (3, 0, 0)
        assert commits == [3]  # by the interval, inside the loop
        start = time.monotonic()
        r = await c.process(atransform, transactional_id="t", idle=0.05)
        assert result_tuple(r) == (0, 0, 0)
        assert time.monotonic() - start < FAST_S

    with_broker(stores, clock, body, feed_n=3)


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"interval": 0}, {"timeout": -1}])
def test_aio_bad_arguments_are_refused(
    stores: Stores, clock: FakeClock, kwargs: dict[str, Any]
) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        with pytest.raises(UsageError):
            await b.consumer("in", "g").process(atransform, transactional_id="t", **kwargs)
        assert await b.peek("out") == []

    with_broker(stores, clock, body, feed_n=1)


def test_a_bad_transaction_timeout_is_refused_before_taking_messages(
    broker: arrival.Broker,
) -> None:
    setup_queues(broker)
    feed(broker, 1)
    c = broker.consumer("in", "g")
    with pytest.raises(UsageError, match="timeout"):
        c.process(transform, transactional_id="t", timeout=0, limit=1)
    assert c.stats().in_flight == 0


def test_small_transactions_share_one_receive(
    broker: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one transaction per message, but not a receive per message: a round trip for each
    # would double the requests of a transaction against a server
    setup_queues(broker)
    feed(broker, 10)
    c = broker.consumer("in", "g")
    asked: list[int] = []
    receive_batch = c.receive_batch

    def counting(max_messages: int = 100, timeout: float | None = None) -> list[arrival.Message]:
        asked.append(max_messages)
        return receive_batch(max_messages, timeout=timeout)

    monkeypatch.setattr(c, "receive_batch", counting)
    commits: list[list[str]] = []
    r = c.process(
        transform,
        transactional_id="t",
        batch=1,
        limit=10,
        on_commit=lambda msgs: commits.append([m.id for m in msgs]),
    )
    assert result_tuple(r) == (10, 0, 0)
    assert commits == [[f"m{i}"] for i in range(10)]  # still one transaction each
    assert asked[0] == 10  # all ten (up to the limit) in the first receive
    assert len(asked) == 1


def test_a_fenced_loop_gives_back_what_it_received_for_later_transactions(
    broker: arrival.Broker,
) -> None:
    setup_queues(broker)
    feed(broker, 3)
    fenced = False

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        nonlocal fenced
        if not fenced:  # a newer holder of the id: the loop's first commit is fenced
            fenced = True
            with broker.transaction("t"):
                pass
        transform(msg, out)

    with pytest.raises(ProducerFenced):
        broker.consumer("in", "g").process(handler, transactional_id="t", batch=1)
    # m1 and m2 were received with m0 and never handled: they are back at once (no
    # waiting out a lease), with no attempt spent
    back = broker.consumer("in", "g").receive_batch(10, timeout=0)
    assert sorted(m.id for m in back) == ["m0", "m1", "m2"]
    g = group_stats(broker)
    assert (g.nacked, g.expired, g.waiting_retry) == (0, 0, 0)  # released, not failed
    assert ids(broker, "out") == []
