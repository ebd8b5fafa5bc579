"""The dead-letter lifecycle: the loop guard (quarantine), paced replays, over every store
(memory, SQLite, a server) and both APIs. Pacing runs on a fake monotonic clock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

import arrival
import arrival.aio
from arrival import _replay
from arrival.errors import UsageError
from arrival.storage.memory import MemoryStorage
from arrival.testing import FakeClock
from conftest import Stores
from inprocess_server import InProcessServer


class FakeTimer:
    """The monotonic clock and the sleeps of a paced replay: sleeping moves time on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


@pytest.fixture
def timer(monkeypatch: pytest.MonkeyPatch) -> FakeTimer:
    t = FakeTimer()
    monkeypatch.setattr(_replay, "monotonic", t.monotonic)
    monkeypatch.setattr(_replay, "sleep", t.sleep)
    monkeypatch.setattr(_replay, "async_sleep", t.async_sleep)
    return t


def _dead(broker: arrival.Broker, n: int, queue: str = "q", group: str = "g") -> None:
    """Send ``n`` messages (ids m-0...) to ``queue`` and reject each: n dead letters."""
    broker.producer().send_batch(
        queue, [arrival.Envelope(b"%d" % i, key=f"k{i}", id=f"m-{i}") for i in range(n)]
    )
    c = broker.consumer(queue, group)
    msgs = c.receive_batch(n, timeout=0)
    assert len(msgs) == n
    for m in msgs:
        m.reject(f"bad {m.body.decode()}")
    c.close()


def _fail_all(c: arrival.Consumer) -> int:
    """The handler that always fails: nack whatever is there (max_deliveries=1: DLQ)."""
    n = 0
    while (m := c.receive(timeout=0)) is not None:
        m.nack(delay=0, error="still broken")
        n += 1
    return n


# -- the loop guard -------------------------------------------------------------------


def test_a_letter_replayed_max_replays_times_is_quarantined(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    broker.producer().send("q", b"poison", id="p-1")
    c = broker.consumer("q", "g")
    dlq = broker.dead_letters("q")
    for replays in range(_replay.DEFAULT_MAX_REPLAYS):
        assert _fail_all(c) == 1
        (d,) = dlq.list()
        assert (d.replays, d.quarantined) == (replays, False)
        result = dlq.replay()
        assert [x.id for x in result] == ["p-1"]
        assert result.quarantined == []
    assert _fail_all(c) == 1
    result = dlq.replay()  # the default guard: replayed 3 times already
    assert result == []
    (held,) = result.quarantined
    assert (held.id, held.body, held.replays, held.quarantined) == ("p-1", b"poison", 3, True)
    assert (held.origin_queue, held.origin_group, held.last_error) == ("q", "g", "still broken")
    assert float(held.headers["arrival-quarantined"]) == clock.now()  # when it was held
    assert "arrival-replay-group" not in held.headers  # bookkeeping, not provenance
    (listed,) = dlq.list()
    assert listed == held  # it stays, marked, where the result says
    assert c.receive(timeout=0) is None  # not replayed
    # replayed again with the same guard: still held, not marked a second time
    again = dlq.replay()
    assert again == []
    assert again.quarantined == [held]
    assert dlq.list() == [held]


def test_replay_moves_the_others_and_quarantines_in_the_same_call(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    broker.producer().send("q", b"poison", id="p-1")
    c = broker.consumer("q", "g")
    for _ in range(2):
        _fail_all(c)
        broker.dead_letters("q").replay(max_replays=2)
    _fail_all(c)
    broker.producer().send("q", b"fine", id="f-1")
    _fail_all(c)  # f-1 fails once: a fresh letter, never replayed
    result = broker.dead_letters("q").replay(max_replays=2)
    assert [d.id for d in result] == ["f-1"]
    assert [(d.id, d.replays) for d in result.quarantined] == [("p-1", 2)]
    msg = c.receive(timeout=0)
    assert msg is not None
    assert (msg.id, msg.headers["arrival-replays"]) == ("f-1", "1")
    msg.ack()
    assert [(d.id, d.quarantined) for d in broker.dead_letters("q").list()] == [("p-1", True)]


def test_a_higher_max_replays_or_no_guard_replays_a_quarantined_letter(
    broker: arrival.Broker,
) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    broker.producer().send("q", b"poison", id="p-1")
    c = broker.consumer("q", "g")
    _fail_all(c)
    broker.dead_letters("q").replay(max_replays=1)
    _fail_all(c)
    assert broker.dead_letters("q").replay(max_replays=1).quarantined[0].quarantined
    assert [d.id for d in broker.dead_letters("q").replay(max_replays=2)] == ["p-1"]
    msg = c.receive(timeout=0)
    assert msg is not None
    assert msg.headers["arrival-replays"] == "2"
    assert "arrival-quarantined" not in msg.headers  # the copy starts clean
    msg.nack(delay=0, error="again")
    (d,) = broker.dead_letters("q").list()
    assert (d.replays, d.quarantined) == (2, False)  # back, not yet held by a replay
    assert [x.id for x in broker.dead_letters("q").replay(max_replays=None)] == ["p-1"]


def test_filters_limit_and_guard_compose(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    _dead(broker, 3)
    c = broker.consumer("q", "g")
    # m-0 and m-1 replayed once and back (after m-2): with max_replays=1 the guard holds them
    broker.dead_letters("q").replay(lambda d: d.id in ("m-0", "m-1"))
    assert _fail_all(c) == 2
    broker.producer().send_batch(
        "q", [arrival.Envelope(b"n", id="n-1"), arrival.Envelope(b"n", id="n-2")]
    )
    assert _fail_all(c) == 2  # two fresh letters after the held ones
    dlq = broker.dead_letters("q")
    assert [d.id for d in dlq.list()] == ["m-2", "m-0", "m-1", "n-1", "n-2"]
    result = dlq.replay(lambda d: d.id != "m-2", limit=1, max_replays=1)
    # the limit counts letters replayed only: the held ones met first don't count
    assert [d.id for d in result] == ["n-1"]
    assert [d.id for d in result.quarantined] == ["m-0", "m-1"]
    left = {d.id: d.quarantined for d in dlq.list()}
    assert left == {"m-2": False, "n-2": False, "m-0": True, "m-1": True}


def test_dry_run_reports_the_quarantine_and_changes_nothing(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    _dead(broker, 2)
    c = broker.consumer("q", "g")
    broker.dead_letters("q").replay(lambda d: d.id == "m-0")
    _fail_all(c)
    dlq = broker.dead_letters("q")
    before = dlq.list()
    ends = (broker.stats("q").end_offset, broker.stats("q.dlq").end_offset)
    would = dlq.replay(dry_run=True, max_replays=1)
    assert [d.id for d in would] == ["m-1"]
    assert [d.id for d in would.quarantined] == ["m-0"]
    assert not would.quarantined[0].quarantined  # as stored: not marked by a dry run
    assert dlq.list() == before
    assert (broker.stats("q").end_offset, broker.stats("q.dlq").end_offset) == ends
    assert c.receive(timeout=0) is None


def test_quarantine_survives_a_restart(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once", max_deliveries=1)
    b1.producer().send("q", b"poison", id="p-1")
    c = b1.consumer("q", "g")
    _fail_all(c)
    b1.dead_letters("q").replay(max_replays=1)
    _fail_all(c)
    (held,) = b1.dead_letters("q").replay(max_replays=1).quarantined
    b1.close()

    b2 = stores.open()
    assert b2.dead_letters("q").list() == [held]
    assert b2.consumer("q", "g").receive(timeout=0) is None
    assert b2.dead_letters("q").purge(lambda d: d.quarantined) == 1
    assert b2.dead_letters("q").list() == []
    b2.close()


def test_the_quarantined_copy_is_not_delivered_again_to_groups_of_the_dlq(
    broker: arrival.Broker,
) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    alerts = broker.consumer("q.dlq", "alerts")  # an application consuming the DLQ
    broker.producer().send("q", b"poison", id="p-1")
    c = broker.consumer("q", "g")
    _fail_all(c)
    broker.dead_letters("q").replay(max_replays=1)
    _fail_all(c)
    assert broker.dead_letters("q").replay(max_replays=1).quarantined
    got = []
    while (m := alerts.receive(timeout=0)) is not None:
        got.append(m.id)
        m.ack()
    assert got == ["p-1", "p-1"]  # each dead-lettering once; the marking is not one
    assert len(broker.dead_letters("q").list()) == 1


def test_a_producer_set_replays_header_that_is_not_a_number_counts_as_none(
    broker: arrival.Broker,
) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    broker.producer().send("q", b"x", headers={"arrival-replays": "lots"})
    _fail_all(broker.consumer("q", "g"))
    (d,) = broker.dead_letters("q").list()
    assert d.replays == 0
    assert len(broker.dead_letters("q").replay(max_replays=1)) == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_replays", 0),
        ("max_replays", -1),
        ("max_replays", True),
        ("max_replays", "3"),
        ("rate", 0),
        ("rate", -5.0),
        ("rate", float("nan")),
        ("rate", float("inf")),
        ("limit", -1),
        ("limit", 1.5),
    ],
)
def test_bad_replay_arguments_are_refused(option: str, value: object) -> None:
    with arrival.connect("memory:") as broker:
        broker.create_queue("q", "at-least-once", max_deliveries=1)
        _dead(broker, 1)
        with pytest.raises(UsageError, match=option):
            broker.dead_letters("q").replay(**{option: value})  # type: ignore[arg-type]
        assert len(broker.dead_letters("q").list()) == 1  # nothing happened


def test_the_server_refuses_a_bad_max_replays(clock: FakeClock) -> None:
    server = InProcessServer(MemoryStorage(), clock, random.Random(0))
    try:
        with arrival.connect(server.url) as broker:
            broker.create_queue("q", "at-least-once", max_deliveries=1)
            _dead(broker, 1)
            backend = broker._b  # a client that skips the API's own check
            for bad in (0, "3", 2.5):
                with pytest.raises(UsageError, match="max_replays"):
                    backend.replay_dead_letters("q", None, None, False, bad).wait()  # type: ignore[arg-type]
            assert len(broker.dead_letters("q").list()) == 1
    finally:
        server.stop()


def test_replayed_compares_as_a_list() -> None:
    r = _replay.Replayed([], quarantined=["x"])  # type: ignore[list-item]
    assert r == []
    assert isinstance(r, list)
    assert r.quarantined == ["x"]
    assert "quarantined=['x']" in repr(r)


# -- paced replays --------------------------------------------------------------------


def _paced(timer: FakeTimer, progress_log: list[tuple[float, int, int]]) -> _replay.Progress:
    def progress(done: arrival.Replayed, total: int) -> None:
        progress_log.append((timer.now, len(done), total))

    return progress


def test_chunk_size_follows_the_rate() -> None:
    assert _replay.chunk_size(0.5) == 1
    assert _replay.chunk_size(50) == 5
    assert _replay.chunk_size(1e9) == _replay.MAX_CHUNK


def test_a_paced_replay_keeps_to_the_rate(broker: arrival.Broker, timer: FakeTimer) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    n, rate = 23, 50.0
    _dead(broker, n)
    log: list[tuple[float, int, int]] = []
    result = broker.dead_letters("q").replay(rate=rate, progress=_paced(timer, log))
    assert sorted(d.id or "" for d in result) == sorted(f"m-{i}" for i in range(n))
    chunk = _replay.chunk_size(rate)
    assert len(log) == -(-n // chunk)  # one progress call per chunk
    previous = 0
    for now, done, total in log:
        assert total == n
        assert done - previous <= chunk
        assert done <= rate * now + chunk  # the average never runs above the rate
        previous = done
    # it waited exactly as long as the rate requires, no longer
    assert sum(timer.sleeps) == pytest.approx(log[-2][1] / rate)  # until the last chunk
    assert broker.dead_letters("q").list() == []
    assert len(broker.consumer("q", "g").receive_batch(n, timeout=0)) == n


def test_a_paced_replay_behind_schedule_does_not_sleep(
    broker: arrival.Broker, timer: FakeTimer
) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    _dead(broker, 6)

    def slow(done: arrival.Replayed, total: int) -> None:
        timer.now += 10.0  # each chunk took longer than the rate allows anyway

    assert len(broker.dead_letters("q").replay(rate=10.0, progress=slow)) == 6
    assert timer.sleeps == []


def test_a_paced_replay_with_limit_and_guard(broker: arrival.Broker, timer: FakeTimer) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    _dead(broker, 6)
    c = broker.consumer("q", "g")
    broker.dead_letters("q").replay(lambda d: d.id in ("m-1", "m-4"))
    assert _fail_all(c) == 2  # m-1 and m-4 are back with one replay each
    log: list[tuple[float, int, int]] = []
    result = broker.dead_letters("q").replay(
        limit=3, max_replays=1, rate=10.0, progress=_paced(timer, log)
    )
    # DLQ order: m-0 m-2 m-3 m-5 m-1 m-4; the first three replayable go, the held two
    # are met after them and not reached
    assert [d.id for d in result] == ["m-0", "m-2", "m-3"]
    assert result.quarantined == []
    assert log[-1][2] == 3
    result = broker.dead_letters("q").replay(max_replays=1, rate=10.0)
    assert [d.id for d in result] == ["m-5"]
    assert sorted(d.id or "" for d in result.quarantined) == ["m-1", "m-4"]
    assert all(d.quarantined for d in broker.dead_letters("q").list())


def test_a_paced_replay_ends_though_letters_keep_coming_back(
    broker: arrival.Broker, timer: FakeTimer
) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    _dead(broker, 4)
    c = broker.consumer("q", "g")
    calls = []

    def fail_meanwhile(done: arrival.Replayed, total: int) -> None:
        calls.append(len(done))
        _fail_all(c)  # what was just replayed fails at once and is dead again

    result = broker.dead_letters("q").replay(rate=10.0, progress=fail_meanwhile)
    assert len(result) == 4  # each replayed once, not again in the same replay
    assert calls == [1, 2, 3, 4]
    assert {d.replays for d in broker.dead_letters("q").list()} == {1}


def test_dry_run_with_a_rate_does_not_wait(broker: arrival.Broker, timer: FakeTimer) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    _dead(broker, 5)
    assert len(broker.dead_letters("q").replay(rate=1.0, dry_run=True)) == 5
    assert timer.sleeps == []
    assert len(broker.dead_letters("q").list()) == 5


def test_the_async_api_paces_and_guards_the_same(
    stores: Stores, clock: FakeClock, timer: FakeTimer
) -> None:
    async def main() -> None:
        b = await stores.aopen()
        try:
            await b.create_queue("q", "at-least-once", max_deliveries=1)
            await b.producer().send_batch(
                "q", [arrival.aio.Envelope(b"%d" % i, id=f"m-{i}") for i in range(5)]
            )
            c = b.consumer("q", "g")
            for m in await c.receive_batch(5, timeout=0):
                await m.nack(delay=0, error="boom")
            dlq = b.dead_letters("q")
            log: list[int] = []
            result = await dlq.replay(
                rate=20.0, max_replays=1, progress=lambda done, total: log.append(len(done))
            )
            assert len(result) == 5
            assert log == [2, 4, 5]  # chunks of chunk_size(20) = 2
            assert sum(timer.sleeps) == pytest.approx(4 / 20.0)
            for m in await c.receive_batch(5, timeout=0):
                await m.nack(delay=0, error="boom")
            again = await dlq.replay(max_replays=1)
            assert again == []
            assert len(again.quarantined) == 5
            assert all(d.quarantined for d in await dlq.list())
            await c.close()
        finally:
            await b.close()

    asyncio.run(main())


@pytest.fixture
def server(clock: FakeClock) -> Iterator[InProcessServer]:
    s = InProcessServer(MemoryStorage(), clock, random.Random(0))
    yield s
    s.stop()


def test_a_paced_replay_over_a_server_sends_offsets_without_listing_again(
    server: InProcessServer, timer: FakeTimer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with arrival.connect(server.url) as broker:
        broker.create_queue("q", "at-least-once", max_deliveries=1)
        _dead(broker, 5)
        backend = broker._b
        lists = []
        original = backend.dead_letters

        def counting(queue: str, limit: int | None) -> object:
            lists.append(queue)
            return original(queue, limit)

        monkeypatch.setattr(backend, "dead_letters", counting)
        result = broker.dead_letters("q").replay(lambda d: d.id != "m-0", rate=10.0)
        assert sorted(d.id or "" for d in result) == ["m-1", "m-2", "m-3", "m-4"]
        assert lists == ["q"]  # once, to choose; each chunk names its offsets
        assert [d.id for d in broker.dead_letters("q").list()] == ["m-0"]


def test_a_replay_keeps_the_messages_own_headers_and_drops_its_provenance() -> None:
    broker = arrival.connect("memory:")
    router = arrival.Router(broker)
    router.route("order", "orders", guarantee="at-least-once", dead_letter="orders.dlq")
    router.send("order", b"{}", headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    msg = broker.consumer("orders", "billing").receive(timeout=1)
    assert msg is not None
    msg.reject("bad")
    broker.dead_letters("orders").replay()
    again = broker.consumer("orders", "billing").receive(timeout=1)
    assert again is not None
    assert again.headers["arrival-type"] == "order"  # the router still knows its type
    assert again.headers["traceparent"].startswith("00-111")
    assert again.headers["arrival-replays"] == "1"
    assert not {"arrival-dead-letter-reason", "arrival-origin-group"} & set(again.headers)
    broker.close()
