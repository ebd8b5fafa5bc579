"""The NATS JetStream backend on a real nats-server, on real time: what the shared contract
suite (on a fake clock) cannot check there: lease expiry, extend, delayed nacks, dead
letters by expiry, replay, the fsync check, describe(), foreign streams, unreachable
servers, transactions and fencing, at-most-once limits, headers and the asyncio API.

Each test gets a namespace of its own on the session's server (``nats_session``), dropped
after it; tests that need another kind of server start their own in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import arrival
import arrival.aio
from arrival.errors import (
    BrokerUnreachable,
    GuaranteeUnavailable,
    LeaseExpired,
    NotSupported,
    ProducerFenced,
    TransactionTimedOut,
    UnknownQueue,
    UsageError,
)
from arrival.jetstream import mapping
from arrival.testing.nats import NatsServer, free_ports
from arrival.verify.proxy import FaultProxy

T = TypeVar("T")

ACK_S = 0.5  # the lease of the queues here: short, so that expiries happen within a test
STEADY = arrival.Backoff(initial_s=0.2, multiplier=1.0, max_s=0.2, jitter=0.0)
REDELIVERY_S = ACK_S + STEADY.initial_s  # when JetStream sends an expired message again
WAIT_S = 3.0  # longest wait for something that must happen (it takes well under 1 s)
QUIET_S = REDELIVERY_S + 0.3  # how long nothing must arrive: past the next redelivery
POLL_S = 0.05
CONNECT_LIMIT_S = 10.0  # an unreachable server must be reported within this


@dataclass(frozen=True)
class Space:
    """One test's namespace on the session's server."""

    namespace: str
    url: str  # for arrival.connect, with the monitoring URL
    server_url: str  # for a plain NATS client

    def stream(self, queue: str) -> str:
        return mapping.stream_name(self.namespace, queue)


@pytest.fixture
def space(nats_session: Any) -> Iterator[Space]:
    ns = nats_session.namespace()
    yield Space(ns, nats_session.url(ns), nats_session.server.url)
    nats_session.drop(ns)


@pytest.fixture
def jb(space: Space) -> Iterator[arrival.Broker]:
    """A broker on this test's namespace."""
    b = arrival.connect(space.url)
    yield b
    b.close()


def until(check: Callable[[], T | None], what: str, timeout: float = WAIT_S) -> T:
    """The first result of ``check()`` that is not None (nor False), polled until
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None and got is not False:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(POLL_S)


def raw(server_url: str, work: Callable[[NatsClient], Awaitable[T]]) -> T:
    """``work`` done with a plain nats-py connection (what arrival does not expose)."""

    async def main() -> T:
        nc = await nats.connect(server_url, connect_timeout=2, allow_reconnect=False)
        try:
            return await work(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


def stored_headers(space: Space, queue: str) -> list[dict[str, str]]:
    """The NATS headers of every message the queue's stream holds, as stored."""

    async def read(nc: NatsClient) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        seq = 1
        while True:
            reply = await nc.request(
                f"$JS.API.DIRECT.GET.{space.stream(queue)}",
                json.dumps({"seq": seq, "next_by_subj": ">"}).encode(),
                timeout=2,
            )
            h = reply.headers or {}
            if h.get("Status") == "404":
                return out
            out.append(h)
            seq = int(h["Nats-Sequence"]) + 1

    return raw(space.server_url, read)


def durable_queue(b: arrival.Broker, name: str = "q", **options: Any) -> None:
    options.setdefault("ack_timeout", ACK_S)
    options.setdefault("backoff", STEADY)
    b.create_queue(name, options.pop("guarantee", "at-least-once"), **options)


def receive(c: arrival.Consumer, timeout: float = WAIT_S) -> arrival.Message:
    msg = c.receive(timeout=timeout)
    assert msg is not None, f"nothing arrived within {timeout} s"
    return msg


def drain(c: arrival.Consumer, timeout: float = 0.3) -> list[arrival.Message]:
    """Everything that arrives until nothing has for ``timeout`` s, acked."""
    out = []
    while (msg := c.receive(timeout=timeout)) is not None:
        out.append(msg)
        msg.ack()
    return out


def past(deadline: float) -> None:
    """Let real time run past ``deadline`` (wall clock): what a slow handler does."""
    time.sleep(max(0.0, deadline - time.time()) + POLL_S)


# -- leases on real time --------------------------------------------------------------


def test_an_unacked_message_comes_back_with_attempt_2_after_its_lease(
    jb: arrival.Broker,
) -> None:
    durable_queue(jb, max_deliveries=5)
    jb.producer().send("q", b"work", key="k", id="m-1")
    c = jb.consumer("q", "g")
    first = receive(c)
    assert (first.attempt, first.id, first.key) == (1, "m-1", "k")
    assert first.lease_deadline == pytest.approx(time.time() + ACK_S, abs=0.2)
    assert not first.lease_lost
    started = time.monotonic()
    again = receive(c)
    assert time.monotonic() - started >= ACK_S - 0.1  # not before the lease ran out
    assert (again.attempt, again.id, again.body) == (2, "m-1", b"work")
    assert first.lease_lost
    with pytest.raises(LeaseExpired, match="lease ran out"):
        first.ack()
    again.ack()
    assert c.receive(timeout=QUIET_S) is None  # acked: no third delivery


def test_an_ack_after_the_lease_ran_out_raises_lease_expired(jb: arrival.Broker) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"slow", id="m-1")
    c = jb.consumer("q", "g")
    msg = receive(c)
    past(msg.lease_deadline)  # a handler slower than the lease
    assert msg.lease_lost
    with pytest.raises(LeaseExpired) as caught:
        msg.ack()
    assert (caught.value.queue, caught.value.offset, caught.value.attempt) == ("q", 0, 1)
    again = receive(c)  # the refused ack took nothing away: it comes back
    assert (again.id, again.attempt) == ("m-1", 2)
    again.ack()


def test_a_stale_delivery_keeps_raising_lease_expired(jb: arrival.Broker) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"slow")
    msg = receive(jb.consumer("q", "g"))
    past(msg.lease_deadline)
    with pytest.raises(LeaseExpired):
        msg.ack()
    with pytest.raises(LeaseExpired):
        msg.nack()


def test_an_expired_delivery_is_no_longer_in_flight(jb: arrival.Broker) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"x")
    c = jb.consumer("q", "g")
    receive(c)
    again = receive(c)
    assert again.attempt == 2
    assert c.stats().in_flight == 1
    again.ack()
    assert c.stats().in_flight == 0


def test_extend_keeps_the_lease(jb: arrival.Broker) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"long job", id="m-1")
    worker = jb.consumer("q", "g")
    other = jb.consumer("q", "g")  # would get the message if its lease ran out
    msg = receive(worker)
    started = time.monotonic()
    while time.monotonic() - started < 3 * ACK_S:  # three leases long, extended as it goes
        msg.extend()
        assert msg.lease_deadline == pytest.approx(time.time() + ACK_S, abs=0.2)
        assert other.receive(timeout=ACK_S / 2) is None
    assert not msg.lease_lost
    msg.ack()
    assert other.receive(timeout=QUIET_S) is None
    assert worker.receive(timeout=0) is None


def test_extend_longer_than_the_ack_timeout_is_kept_alive(jb: arrival.Broker) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"long job", id="m-1")
    worker = jb.consumer("q", "g")
    other = jb.consumer("q", "g")
    msg = receive(worker)
    msg.extend(4 * ACK_S)  # past JetStream's ack wait: kept by in-progress pings
    assert msg.lease_deadline == pytest.approx(time.time() + 4 * ACK_S, abs=0.2)
    assert other.receive(timeout=3 * ACK_S) is None
    assert not msg.lease_lost
    msg.ack()
    assert other.receive(timeout=QUIET_S) is None


def test_an_extended_lease_that_runs_out_is_redelivered(jb: arrival.Broker) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"abandoned", id="m-1")
    worker = jb.consumer("q", "g")
    other = jb.consumer("q", "g")
    msg = receive(worker)
    msg.extend(3 * ACK_S)
    started = time.monotonic()
    again = receive(other)  # the pings stop with the extended lease
    assert time.monotonic() - started >= 3 * ACK_S - 0.1
    assert (again.id, again.attempt) == ("m-1", 2)
    assert msg.lease_lost
    again.ack()


# -- dead letters ---------------------------------------------------------------------


def the_dead_letter(b: arrival.Broker, c: arrival.Consumer) -> Any:
    """Queue "q"'s one dead letter, once it is there; ``c`` is never handed it again."""
    letters = b.dead_letters("q")

    def dead() -> list[Any] | None:
        assert c.receive(timeout=0.2) is None
        return letters.list() or None

    (d,) = until(dead, "the dead letter")
    return d


def test_expiry_past_max_deliveries_dead_letters_with_provenance(jb: arrival.Broker) -> None:
    durable_queue(jb, max_deliveries=2)
    jb.producer().send("q", b"poison", key="k7", headers={"type": "order"}, id="m-1")
    c = jb.consumer("q", "billing")
    first = receive(c)
    second = receive(c)  # the first lease ran out
    assert (first.attempt, second.attempt) == (1, 2)
    d = the_dead_letter(jb, c)  # never handed out a third time
    assert (d.id, d.key, d.body) == ("m-1", "k7", b"poison")
    assert (d.origin_queue, d.origin_group) == ("q", "billing")
    assert d.headers["arrival-origin-queue"] == "q"
    assert d.headers["arrival-origin-group"] == "billing"
    assert d.headers["arrival-origin-offset"] == str(first.offset)
    assert d.headers["arrival-failures"] == "2"
    assert int(d.headers["arrival-attempts"]) == d.attempts >= 2
    assert d.headers["type"] == "order"  # the producer's headers are kept
    assert d.reason is not None
    assert "max_deliveries=2" in d.reason
    assert d.last_error is not None
    assert "lease expired" in d.last_error
    assert d.last_failure is not None
    assert d.last_failure == pytest.approx(time.time(), abs=WAIT_S)
    assert (d.replays, d.quarantined) == (0, False)
    assert jb.stats("q.dlq").stored == 1
    with pytest.raises(LeaseExpired):
        second.ack()
    assert c.receive(timeout=0.2) is None


def test_a_message_dead_lettered_by_expiry_counts_the_attempts_handed_out(
    jb: arrival.Broker,
) -> None:
    durable_queue(jb, max_deliveries=2)
    jb.producer().send("q", b"poison")
    c = jb.consumer("q", "g")
    receive(c)
    receive(c)
    letters = jb.dead_letters("q")

    def dead() -> list[Any] | None:
        assert c.receive(timeout=0.2) is None
        return letters.list() or None

    (d,) = until(dead, "the dead letter")
    assert d.attempts == 2


def test_a_dead_letter_has_its_first_failure_time(jb: arrival.Broker) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"bad json", id="m-9")
    receive(jb.consumer("q", "g")).reject("invalid JSON")
    (d,) = jb.dead_letters("q").list()
    assert d.first_failure is not None
    assert d.first_failure == d.last_failure


def test_nack_with_a_delay_redelivers_after_the_delay(jb: arrival.Broker) -> None:
    durable_queue(jb, max_deliveries=5)
    jb.producer().send("q", b"later", id="m-1")
    c = jb.consumer("q", "g")
    delay_s = 1.0
    started = time.monotonic()
    receive(c).nack(delay=delay_s, error="not yet")
    assert c.receive(timeout=delay_s - 0.2) is None
    again = receive(c)
    assert time.monotonic() - started >= delay_s - 0.05
    assert (again.id, again.attempt) == ("m-1", 2)
    started = time.monotonic()
    again.nack()  # the queue's backoff: 0.2 s
    third = receive(c)
    assert time.monotonic() - started >= STEADY.initial_s - 0.05
    assert third.attempt == 3
    third.ack()
    assert c.receive(timeout=QUIET_S) is None


def test_a_replayed_dead_letter_goes_back_to_its_origin_group_only(jb: arrival.Broker) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"fixed now", key="k", id="m-1")
    billing = jb.consumer("q", "billing")
    audit = jb.consumer("q", "audit")
    receive(audit).ack()
    receive(billing).reject("bug in the handler")
    letters = jb.dead_letters("q")
    (d,) = letters.list()
    assert (d.origin_group, d.replays) == ("billing", 0)
    assert letters.replay(dry_run=True) == [d]
    assert letters.list() == [d]  # a dry run changes nothing
    replayed = letters.replay()
    assert [r.id for r in replayed] == ["m-1"]
    assert letters.list() == []
    copy = receive(billing)
    assert (copy.id, copy.key, copy.body, copy.attempt) == ("m-1", "k", b"fixed now", 1)
    assert copy.headers["arrival-replays"] == "1"
    copy.ack()
    assert audit.receive(timeout=QUIET_S) is None  # audit acked it once already
    assert billing.receive(timeout=0.2) is None


def test_purge_removes_dead_letters(jb: arrival.Broker) -> None:
    durable_queue(jb)
    p = jb.producer()
    for mid in ("a", "b", "c"):
        p.send("q", mid.encode(), id=mid)
    c = jb.consumer("q", "g")
    for _ in range(3):
        receive(c).reject("bad")
    letters = jb.dead_letters("q")
    assert [d.id for d in letters.list()] == ["a", "b", "c"]
    assert letters.purge(lambda d: d.id == "b") == 1
    assert [d.id for d in letters.list()] == ["a", "c"]
    assert letters.purge() == 2
    assert letters.list() == []
    assert letters.purge() == 0
    assert c.receive(timeout=0.2) is None  # purged letters do not come back


# -- the fsync check ------------------------------------------------------------------


@pytest.fixture
def lazy_server(nats_session: Any, tmp_path: Path) -> Iterator[NatsServer]:
    """A server with JetStream's default fsync (every 2 minutes, after acknowledging).
    (``nats_session``: skipped, or failed under CI, as the others without a nats-server.)"""
    with NatsServer.start(tmp_path, sync_always=False) as server:
        yield server


def test_a_server_that_acks_before_fsync_cannot_hold_a_durable_queue(
    lazy_server: NatsServer,
) -> None:
    checked = f"{lazy_server.url}?namespace=f&monitor={lazy_server.monitor_url}"
    with arrival.connect(checked) as b:
        for guarantee in ("at-least-once", "exactly-once"):
            with pytest.raises(GuaranteeUnavailable, match="sync_interval: always") as caught:
                b.create_queue("orders", guarantee)
            assert isinstance(caught.value, NotSupported)
            assert caught.value.queue == "orders"
            assert "fsync only every" in caught.value.detail
            assert "after acknowledging" in caught.value.detail
        b.create_queue("ticks", "at-most-once")  # loses messages anyway: nothing to wait for
        assert b.queues() == ["ticks"]  # nothing left behind by the refusals


def test_the_fsync_policy_must_be_known_or_trusted(lazy_server: NatsServer) -> None:
    with arrival.connect(f"{lazy_server.url}?namespace=f") as b:
        with pytest.raises(GuaranteeUnavailable, match=r"no \?monitor= URL was given") as caught:
            b.create_queue("orders", "at-least-once")
        assert "sync_interval: always" in str(caught.value)
        b.create_queue("ticks", "at-most-once")
    (nowhere,) = free_ports(1)
    unread = f"{lazy_server.url}?namespace=f&monitor=http://127.0.0.1:{nowhere}"
    with (
        arrival.connect(unread) as b,
        pytest.raises(GuaranteeUnavailable, match=r"can't be read from http://127\.0\.0\.1"),
    ):
        b.create_queue("orders", "exactly-once")
    with arrival.connect(f"{lazy_server.url}?namespace=f&fsync=trust") as b:
        b.create_queue("orders", "at-least-once")
        b.create_queue("pay", "exactly-once")
        assert any("?fsync=trust" in m for m in b.describe("orders").mechanism)
        assert sorted(b.queues()) == ["orders", "orders.dlq", "pay", "pay.dlq", "ticks"]


# -- describe -------------------------------------------------------------------------


def test_describe_states_the_jetstream_mechanism_and_limits(
    space: Space, jb: arrival.Broker
) -> None:
    durable_queue(jb, name="orders")
    jb.create_queue("pay", "exactly-once", dedup_window=3600.0)
    jb.create_queue("ticks", "at-most-once", capacity=10)
    orders = jb.describe("orders")
    assert orders.limits["backend"] == "NATS JetStream"
    assert orders.limits["stream"] == space.stream("orders")
    assert orders.limits["storage"] == "file"
    assert orders.limits["replicas"] == "1"  # a single server
    assert orders.limits["per_key_order"].startswith("kept by arrival's gates")
    assert "releases" not in orders.limits  # counted: they spend no attempt
    assert orders.limits["duplicate_window"].startswith("120 s")
    mechanism = " ".join(orders.mechanism)
    assert "sync_interval: always, checked" in mechanism
    assert "AckExplicit" in mechanism
    assert f"{ACK_S:g} s" in mechanism  # the lease
    assert "one replica" in mechanism
    pay = jb.describe("pay")
    assert pay.limits["duplicate_window"].startswith("3600 s")
    assert "transactions" in pay.limits
    assert "double acks" in " ".join(pay.mechanism)
    assert "the newest delivery settles, once" in " ".join(pay.mechanism)
    assert pay.limits["settles"].startswith("a lease record per message, kept 7 days")
    ticks = jb.describe("ticks")
    assert ticks.limits["storage"] == "memory"
    assert "AckNone" in " ".join(ticks.mechanism)
    assert "per_key_order" not in ticks.limits
    assert "NATS JetStream" in str(orders)


# -- foreign streams, unknown queues, unreachable servers -----------------------------


def test_a_stream_not_made_by_arrival_is_not_taken_for_a_queue(
    space: Space, jb: arrival.Broker
) -> None:
    async def add(nc: NatsClient) -> None:
        await nc.jetstream().add_stream(name=space.stream("foo"), subjects=["foreign.foo"])

    raw(space.server_url, add)
    not_ours = f"stream '{space.stream('foo')}' exists but was not made by arrival"
    for use in (
        lambda: jb.create_queue("foo", "at-least-once"),
        lambda: jb.producer().send("foo", b"x"),
        lambda: jb.consumer("foo", "g").receive(timeout=0),
        lambda: jb.describe("foo"),
        lambda: jb.dead_letters("foo"),
    ):
        with pytest.raises(UsageError, match=not_ours) as caught:
            use()
        assert "use another queue name or namespace" in str(caught.value)


def test_unknown_queues_are_named(jb: arrival.Broker) -> None:
    for use in (
        lambda: jb.producer().send("nope", b"x"),
        lambda: jb.consumer("nope", "g").receive(timeout=0),
        lambda: jb.describe("nope"),
        lambda: jb.stats("nope"),
        lambda: jb.dead_letters("nope"),
    ):
        with pytest.raises(UnknownQueue, match="queue 'nope' does not exist"):
            use()


def test_an_unreachable_server_is_reported_quickly() -> None:
    (port,) = free_ports(1)  # nothing listens there
    url = f"nats://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match=f"can't connect to '{url}'") as caught:
        arrival.connect(url, reconnect=1.0)
    assert time.monotonic() - started < CONNECT_LIMIT_S
    assert caught.value.retriable

    async def main() -> None:
        with pytest.raises(BrokerUnreachable):
            await arrival.aio.connect(url, reconnect=1.0)

    asyncio.run(main())


UNREACHABLE_SCRIPT = """
import sys, arrival
from arrival.errors import BrokerUnreachable
try:
    arrival.connect(sys.argv[1], reconnect=0)
except BrokerUnreachable:
    print("BrokerUnreachable")
"""


def test_an_unreachable_server_without_reconnect_is_reported_at_once() -> None:
    (port,) = free_ports(1)
    # in a process of its own: a connect that hangs can be killed
    try:
        done = subprocess.run(
            [sys.executable, "-c", UNREACHABLE_SCRIPT, f"nats://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=5.0,
            check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("arrival.connect(url, reconnect=0) did not return within 5 s")
    assert done.stdout.strip() == "BrokerUnreachable"


def test_a_server_without_jetstream_is_refused(nats_session: Any, tmp_path: Path) -> None:
    with (
        NatsServer.start(tmp_path, jetstream=False) as plain,
        pytest.raises(NotSupported, match="runs without JetStream; start it with -js"),
    ):
        arrival.connect(plain.url)


# -- exactly-once ---------------------------------------------------------------------


def test_a_transaction_commits_its_outputs_and_its_ack_once(jb: arrival.Broker) -> None:
    durable_queue(jb, name="in", guarantee="exactly-once")
    jb.create_queue("out", "exactly-once")
    jb.producer().send("in", b"order", id="i1")
    inputs = jb.consumer("in", "g")
    msg = receive(inputs)
    with jb.transaction("t1") as tx:
        tx.send("out", b"o1")
        tx.send("out", b"o2")
        tx.ack(msg)
    assert tx.state == "committed"
    outs = drain(jb.consumer("out", "g"))
    assert [(m.body, m.id) for m in outs] == [(b"o1", "i1/0"), (b"o2", "i1/1")]
    assert inputs.receive(timeout=QUIET_S) is None  # acked with the outputs, never again
    assert jb.stats("in").groups[0].in_flight == 0


def test_a_redelivered_input_repeats_its_output_ids_which_are_stored_once(
    jb: arrival.Broker,
) -> None:
    durable_queue(jb, name="in", guarantee="exactly-once")
    jb.create_queue("out", "exactly-once")
    jb.producer().send("in", b"order", id="i1")
    inputs = jb.consumer("in", "g")
    msg = receive(inputs)
    with jb.transaction("t1") as tx:  # outputs committed, then the input's ack is lost
        tx.send("out", b"o1", source=msg)
        tx.send("out", b"o2", source=msg)
    again = receive(inputs)
    assert again.attempt == 2
    with jb.transaction("t1") as tx:
        tx.send("out", b"o1")
        tx.send("out", b"o2")
        tx.ack(again)
    assert jb.stats("out").stored == 2
    outs = drain(jb.consumer("out", "g"))
    assert [(m.body, m.id) for m in outs] == [(b"o1", "i1/0"), (b"o2", "i1/1")]


def test_reopening_a_transactional_id_fences_the_earlier_holder(
    space: Space, jb: arrival.Broker
) -> None:
    durable_queue(jb, name="in", guarantee="exactly-once", ack_timeout=5.0)
    jb.create_queue("out", "exactly-once")
    jb.producer().send("in", b"order", id="i1")
    msg = receive(jb.consumer("in", "g"))
    zombie = jb.transaction("t1")
    zombie.send("out", b"from the zombie")
    zombie.ack(msg)
    with arrival.connect(space.url) as restarted:  # the same id, from a new process
        with restarted.transaction("t1") as tx:
            tx.send("out", b"from the new holder", id="n-1")
        with pytest.raises(ProducerFenced, match="transactional id 't1' was fenced"):
            zombie.commit()
    assert zombie.state == "aborted"
    outs = drain(jb.consumer("out", "g"))
    assert [m.body for m in outs] == [b"from the new holder"]
    assert not msg.lease_lost  # the zombie's ack did not happen: the input is still held
    msg.ack()


# -- per-key order: the key gates ------------------------------------------------------


def keyed(b: arrival.Broker, sends: list[tuple[str, str]], queue: str = "q") -> None:
    b.producer().send_batch(
        queue, [arrival.Envelope(body.encode(), key=key, id=body) for key, body in sends]
    )


def test_two_clients_never_hold_two_messages_of_one_key_and_keep_its_order(
    space: Space, jb: arrival.Broker
) -> None:
    durable_queue(jb)
    sends = [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2"), ("a", "a3"), ("c", "c1")]
    keyed(jb, sends)
    with arrival.connect(space.url) as other:
        consumers = [jb.consumer("q", "g"), other.consumer("q", "g")]
        done: dict[str, list[str]] = {"a": [], "b": [], "c": []}
        nacked = False
        deadline = time.monotonic() + 4 * WAIT_S
        while sum(map(len, done.values())) < len(sends):
            assert time.monotonic() < deadline, done
            held = [m for c in consumers for m in c.receive_batch(10, timeout=0.1)]
            keys = [m.key for m in held]
            assert len(keys) == len(set(keys)), f"two of one key in flight: {keys}"
            for m in held:
                assert m.key is not None
                if m.id == "a2" and not nacked:  # its retry still comes before a3
                    m.nack(delay=0.3)
                    nacked = True
                    continue
                done[m.key].append(m.id)
                m.ack()
    assert nacked
    assert done == {"a": ["a1", "a2", "a3"], "b": ["b1", "b2"], "c": ["c1"]}


def test_a_waiting_delivery_spends_no_attempt_while_its_key_is_held(jb: arrival.Broker) -> None:
    durable_queue(jb, max_deliveries=1, dead_letter="q.dlq")
    keyed(jb, [("a", "a1"), ("a", "a2"), ("b", "b1")])
    c = jb.consumer("q", "g")
    head = receive(c)
    assert head.id == "a1"
    head.extend(4 * ACK_S)  # held far past the lease a2 would have had
    other = receive(c)
    assert other.id == "b1"  # other keys go on
    other.ack()
    assert c.receive(timeout=3 * ACK_S) is None  # a2 waits for a1
    head.ack()
    nxt = receive(c)
    assert (nxt.id, nxt.attempt) == ("a2", 1)  # its wait was not an attempt
    nxt.ack()
    assert jb.dead_letters("q").list() == []


def test_a_crashed_holder_keeps_its_key_until_its_message_comes_back(
    space: Space, jb: arrival.Broker
) -> None:
    durable_queue(jb)
    keyed(jb, [("a", "a1"), ("a", "a2")])
    crashing = arrival.connect(space.url)
    head = receive(crashing.consumer("q", "g"))
    assert head.id == "a1"
    crashing._b.abandon()  # a crash: a1 stays leased to nobody until its lease ends
    c = jb.consumer("q", "g")
    again = receive(c)
    assert (again.id, again.attempt) == ("a1", 2)  # a1 again, not a2 before it
    assert c.receive(timeout=0.2) is None  # a2 still waits
    again.ack()
    assert receive(c).id == "a2"


def test_a_message_whose_ack_was_lost_is_not_handed_out_again(
    jb: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate opens before the ack: if the ack is then lost, the redelivery finds its
    message settled and acks it quietly, and the key moves on."""
    durable_queue(jb)
    keyed(jb, [("a", "a1"), ("a", "a2")])
    c = jb.consumer("q", "g")
    head = receive(c)

    async def lost(self: Msg) -> None:  # sent, never arrived
        self._ackd = True

    with monkeypatch.context() as patch:
        patch.setattr(Msg, "ack", lost)
        head.ack()  # the gate opened: a keyed message's ack needs no confirmation
    got = [(m.id, m.attempt) for m in drain(c, timeout=REDELIVERY_S + 0.5)]
    assert got == [("a2", 1)]  # a1 was not handed out again, and did not hold a2 back
    assert c.receive(timeout=QUIET_S) is None  # nor will it: the redelivery was acked


def test_an_unconfirmed_ack_is_reported_and_the_message_comes_back(
    jb: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyless at-least-once message has nothing but JetStream's ack to record its
    settle: ack() waits for the server to confirm it, and says so when it does not."""
    durable_queue(jb)
    jb.producer().send("q", b"m", id="m1")
    c = jb.consumer("q", "g")
    msg = receive(c)

    async def unanswered(self: Msg, timeout: float = 1.0) -> Msg:
        raise nats.errors.TimeoutError

    with monkeypatch.context() as patch:
        patch.setattr(Msg, "ack_sync", unanswered)
        with pytest.raises(BrokerUnreachable, match="may be delivered again"):
            msg.ack()
    again = receive(c)
    assert (again.id, again.attempt) == ("m1", 2)
    again.ack()


def test_a_group_that_joins_later_is_not_held_by_messages_it_never_gets(
    jb: arrival.Broker,
) -> None:
    durable_queue(jb)
    keyed(jb, [("a", "old")])
    late = jb.consumer("q", "late", start="latest")
    keyed(jb, [("a", "new")])
    assert receive(late).id == "new"


def test_a_replay_for_another_group_does_not_hold_the_key(jb: arrival.Broker) -> None:
    durable_queue(jb, max_deliveries=1, dead_letter="q.dlq")
    keyed(jb, [("a", "a1")])
    ok, failing = jb.consumer("q", "ok"), jb.consumer("q", "failing")
    receive(ok).ack()
    receive(failing).reject("bad")
    assert len(jb.dead_letters("q").replay()) == 1  # for "failing" only
    keyed(jb, [("a", "a2")])
    assert receive(ok).id == "a2"  # the replay passed "ok" by without holding key a
    replayed = receive(failing)
    assert (replayed.id, replayed.attempt) == ("a1", 1)


def test_releases_spend_no_attempt_and_expiries_still_do(jb: arrival.Broker) -> None:
    durable_queue(jb, max_deliveries=2)
    jb.producer().send("q", b"work", id="m-1")
    c = jb.consumer("q", "g")
    for _ in range(3):  # a stopping worker, an open circuit: given back, not failed
        receive(c).release()
    first = receive(c)
    second = receive(c)  # the first lease ran out: 1 failure of 2
    assert (first.attempt, second.attempt) == (4, 5)
    d = the_dead_letter(jb, c)  # the second expiry spent the budget
    assert d.headers["arrival-failures"] == "2"


def test_a_closing_consumer_gives_back_what_it_holds_without_spending_it(
    space: Space, jb: arrival.Broker
) -> None:
    durable_queue(jb, max_deliveries=1)
    keyed(jb, [("a", "a1"), ("a", "a2"), ("b", "b1")])
    with arrival.connect(space.url) as other:
        leaving = other.consumer("q", "g")
        held = leaving.receive_batch(10, timeout=WAIT_S)
        assert [m.id for m in held] == ["a1", "b1"]  # a2 waits for a1, in this client
        leaving.close()  # gives back a1, b1 and the waiting a2
    c = jb.consumer("q", "g")
    got = sorted((m.id, m.attempt) for m in drain(c, timeout=1.0))
    assert got == [("a1", 2), ("a2", 2), ("b1", 2)]  # none dead-lettered
    assert jb.dead_letters("q").list() == []


# -- settling a superseded delivery (exactly-once) ------------------------------------


@pytest.fixture
def slow_link(space: Space, nats_session: Any) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of the session's server, and this namespace's URL through
    it: a client whose deliveries can be held in the network."""
    port = nats_session.server.client_port
    proxy = FaultProxy(("127.0.0.1", port))
    url = space.url.replace(f":{port}?", f":{proxy.port}?", 1)
    assert url != space.url
    yield proxy, url
    proxy.close()


def superseded(
    jb: arrival.Broker, proxy: FaultProxy, stale: arrival.Broker
) -> tuple[arrival.Message, arrival.Message]:
    """Message "m1" of queue "q", handed out by ``stale`` (through ``proxy``) and extended,
    but its pings held in the network, so that JetStream delivers it again to a consumer
    of ``jb``. Returns (the superseded delivery, whose lease looks fine to its holder;
    the redelivery), neither settled."""
    first = receive(stale.consumer("q", "g"))
    first.extend(20 * ACK_S)
    proxy.hold(up=True, down=True)
    again = receive(jb.consumer("q", "g"))
    proxy.heal()
    assert (first.attempt, again.attempt, first.lease_lost) == (1, 2, False)
    return first, again


def test_a_superseded_delivery_cannot_ack_after_the_redelivery_did(
    jb: arrival.Broker, slow_link: tuple[FaultProxy, str]
) -> None:
    durable_queue(jb, guarantee="exactly-once")
    jb.producer().send("q", b"m", id="m1")
    with arrival.connect(slow_link[1]) as stale:
        first, again = superseded(jb, slow_link[0], stale)
        again.ack()
        with pytest.raises(LeaseExpired, match="settled by another delivery"):
            first.ack()


def test_a_superseded_delivery_cannot_ack_even_before_the_redelivery(
    jb: arrival.Broker, slow_link: tuple[FaultProxy, str]
) -> None:
    durable_queue(jb, guarantee="exactly-once")
    jb.producer().send("q", b"m", id="m1")
    with arrival.connect(slow_link[1]) as stale:
        first, again = superseded(jb, slow_link[0], stale)
        with pytest.raises(LeaseExpired, match="delivered again"):
            first.ack()  # the newest delivery holds the lease, as on the engine
        again.ack()
    assert jb.consumer("q", "g").receive(timeout=QUIET_S) is None


def test_a_superseded_delivery_cannot_commit_a_transaction(
    jb: arrival.Broker, slow_link: tuple[FaultProxy, str]
) -> None:
    durable_queue(jb, guarantee="exactly-once")
    jb.create_queue("out", "exactly-once")
    jb.producer().send("q", b"m", id="m1")
    with arrival.connect(slow_link[1]) as stale:
        first, again = superseded(jb, slow_link[0], stale)
        with jb.transaction("current") as tx:
            tx.send("out", b"effect")
            tx.ack(again)
        zombie = stale.transaction("stale")
        zombie.send("out", b"effect")
        zombie.ack(first)
        with pytest.raises(LeaseExpired, match="settled by another delivery"):
            zombie.commit()
    outs = drain(jb.consumer("out", "g"))
    assert [(m.body, m.id) for m in outs] == [(b"effect", "m1/0")]  # stored once
    assert jb.consumer("q", "g").receive(timeout=QUIET_S) is None


def test_a_delivery_held_in_the_network_past_its_lease_is_never_handed_out(
    jb: arrival.Broker, slow_link: tuple[FaultProxy, str]
) -> None:
    """A consumer paused (or cut off) while a delivery sat in its socket finds it there
    on waking, its lease clock fresh; JetStream has delivered it again meanwhile."""
    durable_queue(jb, guarantee="exactly-once")
    jb.producer().send("q", b"m", id="m1")
    proxy = slow_link[0]
    with arrival.connect(slow_link[1]) as stale:
        slow = stale.consumer("q", "g")
        proxy.hold(down=True)
        assert slow.receive(timeout=0.2) is None  # the pull went out; its answer is held
        again = receive(jb.consumer("q", "g"))
        assert again.attempt == 2
        again.extend(10 * ACK_S)
        proxy.heal()
        assert slow.receive(timeout=0.5) is None  # the late copy is dropped
        again.ack()
        assert slow.receive(timeout=QUIET_S) is None


def test_a_batch_of_first_deliveries_takes_its_lease_records_at_once_and_settles_them(
    space: Space, jb: arrival.Broker
) -> None:
    durable_queue(jb, guarantee="exactly-once", ack_timeout=5.0)
    jb.producer().send_batch("q", [arrival.Envelope(b"m", id=f"m{i}") for i in range(5)])
    c = jb.consumer("q", "g")
    got = c.receive_batch(5, timeout=WAIT_S)
    assert [m.id for m in got] == [f"m{i}" for i in range(5)]
    c.ack_batch(got)  # each settle is a compare-and-set from the revision taken
    assert c.receive(timeout=QUIET_S) is None

    async def records(nc: NatsClient) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for m in got:
            subject = f"{space.namespace}.settled.{space.stream('q')}.g.{m.offset + 1}"
            reply = await nc.request(
                f"$JS.API.DIRECT.GET.{space.namespace}__settled.{subject}", b"", timeout=2
            )
            out.append((int(reply.headers["Nats-Sequence"]), json.loads(reply.data)))
        return out

    stored = raw(space.server_url, records)
    assert all(r["d"] == 1 and r["settled"] for _seq, r in stored)
    # the settles went as one atomic batch too: consecutive revisions
    seqs = [seq for seq, _r in stored]
    assert seqs == list(range(seqs[0], seqs[0] + 5))


def test_a_settle_whose_answer_was_lost_succeeds_when_repeated(
    jb: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settle marker stored but its answer lost: the repeat finds its own marker."""
    durable_queue(jb, guarantee="exactly-once", ack_timeout=5.0)
    jb.producer().send("q", b"m", id="m1")
    msg = receive(jb.consumer("q", "g"))
    backend = jb._b
    real = backend._publish_one
    markers: list[str] = []

    async def answer_lost(subj: str, h: dict[str, str], body: bytes) -> int:
        await real(subj, h, body)
        markers.append(subj)
        return await real(subj, h, body)  # repeated, as after a lost answer

    monkeypatch.setattr(backend, "_publish_one", answer_lost)
    msg.ack()
    assert len(markers) == 1
    assert ".settled." in markers[0]
    assert jb.consumer("q", "g").receive(timeout=QUIET_S) is None


def test_a_transaction_past_its_timeout_is_refused(jb: arrival.Broker) -> None:
    durable_queue(jb, name="in", guarantee="exactly-once")
    jb.create_queue("out", "exactly-once")
    jb.producer().send("in", b"order", id="i1")
    inputs = jb.consumer("in", "g")
    msg = receive(inputs)
    tx = jb.transaction("t1", timeout=0.2)
    tx.send("out", b"too late")
    tx.ack(msg)
    time.sleep(0.3)  # the transaction outlives its timeout
    with pytest.raises(TransactionTimedOut):
        tx.commit()
    assert drain(jb.consumer("out", "g")) == []
    assert receive(inputs).attempt == 2  # not acked: it comes back


@pytest.mark.parametrize("out_guarantee", ["at-least-once", "exactly-once"])
def test_transaction_outputs_to_a_queue_are_one_atomic_batch(
    space: Space, jb: arrival.Broker, out_guarantee: str
) -> None:
    durable_queue(jb, name="in", guarantee="exactly-once")
    jb.create_queue("out", out_guarantee)
    jb.producer().send("in", b"order", id="i1")
    msg = receive(jb.consumer("in", "g"))
    with jb.transaction("t1") as tx:
        tx.send("out", b"o1")
        tx.send("out", b"o2")
        tx.ack(msg)
    stored = stored_headers(space, "out")
    assert len(stored) == 2
    assert stored[0].get("Nats-Batch-Id") is not None
    assert stored[0]["Nats-Batch-Id"] == stored[1].get("Nats-Batch-Id")


# -- at-most-once on JetStream --------------------------------------------------------


def sent(b: arrival.Broker, queue: str, n: int) -> None:
    """Wait until ``n`` fire-and-forget sends to ``queue`` reached the stream."""
    until(lambda: b.stats(queue).sent >= n or None, f"{n} messages stored in {queue!r}")


def test_capacity_with_drop_oldest_keeps_the_newest(jb: arrival.Broker) -> None:
    jb.create_queue("ticks", "at-most-once", capacity=3)
    p = jb.producer()
    for i in range(10):
        p.send("ticks", str(i).encode())
    sent(jb, "ticks", 10)
    assert jb.stats("ticks").stored == 3
    c = jb.consumer("ticks", "screen")
    assert [m.body for m in drain(c)] == [b"7", b"8", b"9"]


def test_capacity_with_drop_newest_keeps_the_oldest(jb: arrival.Broker) -> None:
    jb.create_queue("ticks", "at-most-once", capacity=3, drop="newest")
    p = jb.producer()
    for i in range(10):
        p.send("ticks", str(i).encode())
    until(lambda: jb.stats("ticks").stored == 3 or None, "3 messages stored")
    c = jb.consumer("ticks", "screen")
    assert [m.body for m in drain(c)] == [b"0", b"1", b"2"]
    assert jb.stats("ticks").stored == 3


def test_conflation_keeps_the_latest_message_per_key(jb: arrival.Broker) -> None:
    jb.create_queue("prices", "at-most-once", conflate=True)
    p = jb.producer()
    for i in range(5):
        p.send("prices", f"a{i}".encode(), key="a")
        p.send("prices", f"b{i}".encode(), key="b.with dots *")
    sent(jb, "prices", 10)
    c = jb.consumer("prices", "screen")
    got = [(m.key, m.body) for m in drain(c)]
    assert got == [("a", b"a4"), ("b.with dots *", b"b4")]
    p.send("prices", b"a5", key="a")
    latest = receive(c)
    assert (latest.key, latest.body, latest.attempt) == ("a", b"a5", 1)
    assert c.receive(timeout=0.2) is None


def test_conflation_keeps_every_keyless_message(jb: arrival.Broker) -> None:
    jb.create_queue("prices", "at-most-once", conflate=True)
    p = jb.producer()
    for i in range(3):
        p.send("prices", f"n{i}".encode())
    sent(jb, "prices", 3)
    assert [m.body for m in drain(jb.consumer("prices", "g"))] == [b"n0", b"n1", b"n2"]


def test_conflation_delivers_a_message_with_the_empty_key(jb: arrival.Broker) -> None:
    jb.create_queue("prices", "at-most-once", conflate=True)
    p = jb.producer()
    p.send("prices", b"empty", key="")
    p.send("prices", b"after", key="k")
    until(lambda: jb.stats("prices").stored >= 1 or None, "the second message stored")
    got = [(m.key, m.body) for m in drain(jb.consumer("prices", "g"))]
    assert got == [("", b"empty"), ("k", b"after")]


# -- headers on the wire --------------------------------------------------------------


def test_headers_keys_and_ids_round_trip_through_the_server(jb: arrival.Broker) -> None:
    durable_queue(jb)
    headers = {
        "lower": "1",
        "MiXeD-Case": "2",
        "unicode": "h\u00e9llo \u2713",
        "colon": "a:b; c=d",
        "empty": "",
    }
    jb.producer().send("q", b"body", key="cl\u00e9 7", id="id \u00e9", headers=headers)
    msg = receive(jb.consumer("q", "g"))
    assert (msg.id, msg.key, msg.headers) == ("id \u00e9", "cl\u00e9 7", headers)
    msg.ack()
    with pytest.raises(UsageError, match="reserved on JetStream"):
        jb.producer().send("q", b"x", headers={"Nats-Msg-Id": "forged"})


def test_header_values_with_outer_blanks_are_refused(jb: arrival.Broker) -> None:
    """NATS drops the blanks around a header value: refused rather than changed."""
    durable_queue(jb)
    with pytest.raises(UsageError, match="blanks"):
        jb.producer().send("q", b"body", headers={"pad": "  padded  "})
    assert jb.consumer("q", "g").receive(timeout=QUIET_S) is None  # nothing was sent


def test_an_at_most_once_send_refuses_what_nats_cant_carry_to_the_caller(
    jb: arrival.Broker,
) -> None:
    """At-most-once sends are published later, on the backend's loop: what they can't
    carry is refused at once, in the caller, and nothing is published."""
    jb.create_queue("fast", "at-most-once")
    c = jb.consumer("fast", "g")
    p = jb.producer()
    p.send("fast", b"known spec")  # the spec is cached from here on
    assert receive(c).body == b"known spec"
    with pytest.raises(UsageError, match="reserved"):
        p.send("fast", b"x", headers={"Nats-Msg-Id": "forged"})
    with pytest.raises(UsageError, match="line break"):
        p.send("fast", b"x", headers={"h": "a\nb"})
    assert c.receive(timeout=QUIET_S) is None


def test_a_message_with_a_status_header_and_an_empty_body_is_delivered(
    jb: arrival.Broker,
) -> None:
    durable_queue(jb)
    jb.producer().send("q", b"", headers={"Status": "404"}, id="s-1")
    msg = jb.consumer("q", "g").receive(timeout=QUIET_S)
    assert msg is not None
    assert (msg.id, msg.body) == ("s-1", b"")
    msg.ack()


# -- the asyncio API ------------------------------------------------------------------


def test_the_asyncio_api(space: Space) -> None:
    async def main() -> None:
        b = await arrival.aio.connect(space.url)
        try:
            await b.create_queue("aq", "at-least-once", ack_timeout=ACK_S, backoff=STEADY)
            await b.create_queue("aout", "exactly-once")
            await b.producer().send("aq", b"hello", key="k", id="a-1")
            c = b.consumer("aq", "g")
            msg = await c.receive(timeout=WAIT_S)
            assert msg is not None
            assert (msg.body, msg.key, msg.id, msg.attempt) == (b"hello", "k", "a-1", 1)
            await msg.nack(delay=0.3)
            again = await c.receive(timeout=WAIT_S)
            assert again is not None
            assert again.attempt == 2
            async with b.transaction("at1") as tx:
                await tx.send("aout", b"out")
                await tx.ack(again)
            assert await c.receive(timeout=QUIET_S) is None
            out = await b.consumer("aout", "g").receive(timeout=WAIT_S)
            assert out is not None
            assert (out.body, out.id) == (b"out", "a-1/0")
            await out.ack()
            assert (await b.describe("aq")).limits["backend"] == "NATS JetStream"
        finally:
            await b.close()
        assert b.closed

    asyncio.run(main())


# -- retention: the clients' trimming ------------------------------------------------------


def _trim(b: arrival.Broker, queue: str) -> int:
    """Run one trimming pass now (the backend runs it every TRIM_EVERY_S on its own)."""
    backend: Any = b._b
    purged: int = backend._call(backend._trim(queue)).wait()
    return purged


def test_trimming_deletes_what_every_group_acked_and_nothing_else(jb: arrival.Broker) -> None:
    durable_queue(jb, dead_letter="q.dlq", max_deliveries=1)
    jb.producer().send_batch("q", [b"0", b"1", b"2", b"3"])
    assert _trim(jb, "q") == 0  # no group consumes it yet: everything waits for one
    fast, slow = jb.consumer("q", "fast"), jb.consumer("q", "slow")
    for m in (receive(fast), receive(fast)):
        m.ack()
    assert _trim(jb, "q") == 0  # the slow group acked nothing: its messages stay
    for m in (receive(slow), receive(slow), receive(slow)):
        m.ack()
    assert _trim(jb, "q") == 2  # both groups acked 0 and 1
    st = jb.stats("q")
    assert (st.first_offset, st.stored) == (2, 2)
    assert [p.body for p in jb.peek("q", 10)] == [b"2", b"3"]
    # what is left is still delivered, to both groups
    assert receive(fast).body == b"2"
    assert receive(slow).body == b"3"


def test_retention_keeps_acked_messages_for_its_seconds(jb: arrival.Broker) -> None:
    durable_queue(jb, retention=60.0)
    jb.producer().send_batch("q", [b"0", b"1"])
    c = jb.consumer("q", "g")
    for m in (receive(c), receive(c)):
        m.ack()
    assert _trim(jb, "q") == 0  # acked, but stored less than 60 s ago
    assert jb.stats("q").stored == 2


def test_a_dead_letter_queue_is_never_trimmed(jb: arrival.Broker) -> None:
    durable_queue(jb, dead_letter="q.dlq", max_deliveries=1)
    jb.producer().send("q", b"poison")
    receive(jb.consumer("q", "g")).reject("bad")
    reader = jb.consumer("q.dlq", "readers")
    receive(reader).ack()  # a group of the DLQ acked the letter
    assert _trim(jb, "q.dlq") == 0
    assert [d.body for d in jb.dead_letters("q").list()] == [b"poison"]
