"""Shared fixtures: a fake clock, and brokers on every embedded store that can crash.

``reopen`` fixtures let a test "crash" a broker (drop it without closing: nothing pending
is committed, exactly like SIGKILL for what the store holds) and open it again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import arrival
import arrival.aio
from arrival.engine import Engine
from arrival.storage.base import Storage
from arrival.storage.memory import MemoryStorage
from arrival.storage.sqlite import SqliteStorage
from arrival.testing import FakeClock
from inprocess_server import InProcessServer

STORES = ["memory", "sqlite", "server", "nats"]
FAKE_CLOCK_MAX_SLEEP_S = 2.5  # on JetStream a test's clock.advance() up to this sleeps


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


SERVERS: dict[int, InProcessServer] = {}  # by id(client broker), while it is open


def engine_of(broker: arrival.Broker | arrival.aio.Broker) -> Engine:
    """The engine behind ``broker``: its own, or its in-process server's (to inspect
    storage, the clock, or to crash it)."""
    server = SERVERS.get(id(broker))
    return server.engine if server is not None else broker.engine


class Stores:
    """Opens brokers on one store again and again, as a process restarting would."""

    def __init__(
        self, kind: str, tmp_path: Path, clock: FakeClock, nats: NatsSession | None = None
    ) -> None:
        self.kind = kind
        self.nats = nats
        self.namespace = nats.namespace() if nats is not None else ""
        self.path = tmp_path / "data"
        self.clock = clock
        self._memory = MemoryStorage()
        self.open_brokers: list[arrival.Broker] = []
        self.servers: dict[int, InProcessServer] = {}  # by id(broker), for "server"
        self.async_servers: list[InProcessServer] = []

    def storage(self) -> Storage:
        self._reap()
        return SqliteStorage(self.path) if self.kind == "sqlite" else self._memory

    def _reap(self) -> None:
        """A server whose client closed closes too, as the embedded broker would."""
        for b in self.open_brokers:
            server = self.servers.get(id(b))
            if server is not None and b.closed:
                server.stop()
        for server in self.async_servers:  # the store is opened again: its broker closed
            server.stop()

    def open(self, seed: int = 0) -> arrival.Broker:
        if self.nats is not None:
            b = arrival.connect(self.nats.url(self.namespace))
            self.open_brokers.append(b)
            return b
        if self.kind == "server":
            server = InProcessServer(self.storage(), self.clock, random.Random(seed))
            b = arrival.connect(server.url)
            self.servers[id(b)] = SERVERS[id(b)] = server
        else:
            b = arrival.connect(self.storage(), clock=self.clock, rng=random.Random(seed))
        self.open_brokers.append(b)
        return b

    async def aopen(self, seed: int = 0) -> arrival.aio.Broker:
        """``open`` for the asyncio API: the same store, in process or behind a server."""
        if self.nats is not None:
            return await arrival.aio.connect(self.nats.url(self.namespace))
        if self.kind == "server":
            server = InProcessServer(self.storage(), self.clock, random.Random(seed))
            self.async_servers.append(server)
            b = await arrival.aio.connect(server.url)
            SERVERS[id(b)] = server
            return b
        return await arrival.aio.connect(self.storage(), clock=self.clock, rng=random.Random(seed))

    def crash(self, broker: arrival.Broker) -> None:
        """Stop ``broker`` as SIGKILL would: nothing pending is committed."""
        if self.nats is not None:  # the client dies; JetStream keeps what it acknowledged
            broker._b.abandon()  # type: ignore[attr-defined]
            return
        server = self.servers.get(id(broker))
        if server is not None:
            server.crash()
            broker.close()
        else:
            broker.engine.abandon()

    def close_all(self) -> None:
        for b in self.open_brokers:
            b.close()  # a no-op for brokers already closed or crashed
        for key, server in self.servers.items():
            server.stop()
            SERVERS.pop(key, None)
        for server in self.async_servers:
            server.stop()


class NatsSession:
    """One nats-server (JetStream, fsync always) for the whole test session; each test
    gets a namespace of its own, deleted after it."""

    def __init__(self, directory: Path) -> None:
        from arrival.testing.nats import NatsServer

        self.server = NatsServer.start(directory)
        self._n = 0

    def namespace(self) -> str:
        self._n += 1
        return f"t{self._n}"

    def url(self, namespace: str) -> str:
        return f"{self.server.url}?namespace={namespace}&monitor={self.server.monitor_url}"

    def drop(self, namespace: str) -> None:
        """Delete the namespace's streams, so the server does not fill up."""
        import asyncio
        import json

        import nats

        async def drop() -> None:
            nc = await nats.connect(self.server.url)
            try:
                reply = await nc.request("$JS.API.STREAM.NAMES", b"{}", timeout=5)
                for name in json.loads(reply.data).get("streams") or []:
                    if name.startswith(f"{namespace}_") or name == f"KV_{namespace}_txn":
                        await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=5)
            finally:
                await nc.close()

        asyncio.run(drop())


@pytest.fixture(scope="session")
def nats_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsSession]:
    """A real nats-server for the session. Without its binary: skipped locally, failed
    under CI (``$CI`` set)."""
    import os

    from arrival.testing.nats import NatsUnavailable

    try:
        session = NatsSession(tmp_path_factory.mktemp("nats"))
    except NatsUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI is set: the JetStream tests must run there)", pytrace=False)
        pytest.skip(str(e))
    try:
        yield session
    finally:
        session.server.stop()


def _real_time(clock: FakeClock) -> None:
    """On JetStream time is the servers': a test's small clock.advance() sleeps that
    long; a test that needs a large jump cannot run there."""

    def advance(seconds: float) -> None:
        if seconds > FAKE_CLOCK_MAX_SLEEP_S:
            pytest.skip(
                f"advances a fake clock by {seconds:g} s: JetStream's timers (ack wait, "
                f"backoff) run on the servers' real clock"
            )
        time.sleep(seconds)

    clock.advance = advance  # type: ignore[method-assign]


@pytest.fixture(params=STORES)
def stores(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Stores]:
    nats = None
    if request.param == "nats":
        nats = request.getfixturevalue("nats_session")
        _real_time(clock)
    s = Stores(request.param, tmp_path, clock, nats)
    yield s
    s.close_all()
    if nats is not None:
        nats.drop(s.namespace)


@pytest.fixture
def broker(stores: Stores) -> arrival.Broker:
    """A broker on each embedded store (memory, SQLite), on the fake clock."""
    return stores.open()


BrokerFactory = Callable[[], arrival.Broker]

NO_BACKOFF = arrival.Backoff(initial_s=0.0, multiplier=1.0, max_s=0.0, jitter=0.0)
"""Redeliver at once after a nack: for tests that count attempts, not time."""


def drain(consumer: arrival.Consumer, ack: bool = True) -> list[arrival.Message]:
    """Everything the consumer can get right now, acked unless told otherwise."""
    out: list[arrival.Message] = []
    while (msg := consumer.receive(timeout=0)) is not None:
        out.append(msg)
        if ack:
            msg.ack()
    return out


def bodies(msgs: list[arrival.Message]) -> list[bytes]:
    return [m.body for m in msgs]


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A real PostgreSQL server (tests/postgres.py) for the session, stopped at its end.
    Without server binaries: skipped locally, failed under CI (``$CI`` set)."""
    import os

    from postgres import PostgresServer, Unavailable

    try:
        server = PostgresServer.start()
    except Unavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI is set: the PostgreSQL tests must run there)", pytrace=False)
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()
