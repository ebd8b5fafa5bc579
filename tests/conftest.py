"""Shared fixtures: a fake clock, and brokers on every embedded store that can crash.

``reopen`` fixtures let a test "crash" a broker (drop it without closing: nothing pending
is committed, exactly like SIGKILL for what the store holds) and open it again.
"""

from __future__ import annotations

import random
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

STORES = ["memory", "sqlite", "server"]


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

    def __init__(self, kind: str, tmp_path: Path, clock: FakeClock) -> None:
        self.kind = kind
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
        if self.kind == "server":
            server = InProcessServer(self.storage(), self.clock, random.Random(seed))
            self.async_servers.append(server)
            b = await arrival.aio.connect(server.url)
            SERVERS[id(b)] = server
            return b
        return await arrival.aio.connect(self.storage(), clock=self.clock, rng=random.Random(seed))

    def crash(self, broker: arrival.Broker) -> None:
        """Stop ``broker`` as SIGKILL would: nothing pending is committed."""
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


@pytest.fixture(params=STORES)
def stores(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Stores]:
    s = Stores(request.param, tmp_path, clock)
    yield s
    s.close_all()


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
