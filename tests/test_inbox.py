"""The inbox (arrival.inbox): external effects exactly once, in the user's own database.

Every behaviour runs on each connection kind the inbox takes: ``sqlite3`` (a file),
``psycopg`` against a real PostgreSQL server started for the session (tests/postgres.py),
and SQLAlchemy sessions over both. Each test gets an empty database (SQLite file) or
schema (PostgreSQL) of its own. What is *committed* is always read through a separate
connection, so "committed together" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, create_mock_engine, text
from sqlalchemy.orm import Session

import arrival
import arrival.aio
from arrival.errors import LeaseExpired, NotSupported, UsageError
from arrival.testing import FakeClock
from conftest import NO_BACKOFF, Stores
from postgres import PostgresServer

ACK_TIMEOUT_S = 30.0
LOCK_WAIT_TIMEOUT_S = 10.0  # how long a concurrency test waits to see the other session block
BACKENDS = ["sqlite3", "psycopg", "sqlalchemy-sqlite", "sqlalchemy-postgresql"]
PG_BACKENDS = ["psycopg", "sqlalchemy-postgresql"]
SA_BACKENDS = ["sqlalchemy-sqlite", "sqlalchemy-postgresql"]

_schemas = count(1)


class Backend:
    """One connection kind on an empty database: connections for the inbox, and a reader
    of committed state through a connection of its own."""

    name: str

    def connect(self) -> Any:
        """A new connection of this kind (closed at teardown)."""
        raise NotImplementedError

    def write(self, conn: Any, value: str) -> None:
        """The user's effect, through ``conn``, in its transaction."""
        raise NotImplementedError

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Committed rows, read through a separate connection."""
        raise NotImplementedError

    def run(self, sql: str) -> None:
        """Execute and commit at once, through a separate connection."""
        raise NotImplementedError

    def has_table(self, name: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # shared helpers

    def effects(self) -> list[str]:
        return [v for (v,) in self.query("SELECT v FROM effects ORDER BY v")]

    def ids(self, table: str = "arrival_inbox") -> list[tuple[str, str]]:
        """Committed (consumer, message id) pairs; [] while the table doesn't exist."""
        if not self.has_table(table):
            return []
        rows = self.query(f"SELECT consumer, message_id FROM {table} ORDER BY 1, 2")
        return [(c, m) for c, m in rows]


class Sqlite3Backend(Backend):
    name = "sqlite3"

    def __init__(self, path: Path, **connect_kwargs: Any) -> None:
        self.path = path
        self._kwargs = connect_kwargs
        self._conns: list[sqlite3.Connection] = []
        self.run("CREATE TABLE effects (v TEXT NOT NULL)")

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=LOCK_WAIT_TIMEOUT_S, **self._kwargs)
        self._conns.append(conn)
        return conn

    def write(self, conn: Any, value: str) -> None:
        conn.execute("INSERT INTO effects (v) VALUES (?)", (value,))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, timeout=LOCK_WAIT_TIMEOUT_S)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def run(self, sql: str) -> None:
        conn = sqlite3.connect(self.path, timeout=LOCK_WAIT_TIMEOUT_S)
        try:
            conn.execute(sql)
            conn.commit()
        finally:
            conn.close()

    def has_table(self, name: str) -> bool:
        rows = self.query(f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{name}'")
        return bool(rows)

    def close(self) -> None:
        for c in self._conns:
            c.close()


class PsycopgBackend(Backend):
    """A schema of its own in the session's database, first on every connection's
    search_path, so the inbox's unqualified table lands there."""

    name = "psycopg"

    def __init__(self, server: PostgresServer, dbname: str) -> None:
        self.server = server
        self.dbname = dbname
        self.schema = f"s{next(_schemas)}"
        self.options = f"-c search_path={self.schema}"
        self._conns: list[psycopg.Connection[Any]] = []
        with server.connect(dbname, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {self.schema}")
        self._reader = self.connect(autocommit=True)
        self.run("CREATE TABLE effects (v TEXT NOT NULL)")

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        conn = self.server.connect(self.dbname, options=self.options, **kwargs)
        self._conns.append(conn)
        return conn

    def write(self, conn: Any, value: str) -> None:
        conn.execute("INSERT INTO effects (v) VALUES (%s)", (value,))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return self._reader.execute(sql.encode()).fetchall()

    def run(self, sql: str) -> None:
        self._reader.execute(sql.encode())

    def has_table(self, name: str) -> bool:
        return self.query(f"SELECT to_regclass('{name}')")[0][0] is not None

    def close(self) -> None:
        for c in self._conns:
            c.close()


class SqlAlchemyBackend(Backend):
    """SQLAlchemy Sessions over an engine; committed state is read through the raw
    backend of the same database."""

    def __init__(self, raw: Sqlite3Backend | PsycopgBackend) -> None:
        self.raw = raw
        if isinstance(raw, PsycopgBackend):
            self.name = "sqlalchemy-postgresql"
            url = raw.server.url(raw.dbname)
            self.engine: Engine = create_engine(url, connect_args={"options": raw.options})
        else:
            self.name = "sqlalchemy-sqlite"
            self.engine = create_engine(f"sqlite:///{raw.path}")
        self._sessions: list[Session] = []

    def connect(self) -> Session:
        s = Session(self.engine)
        self._sessions.append(s)
        return s

    def write(self, conn: Any, value: str) -> None:
        conn.execute(text("INSERT INTO effects (v) VALUES (:v)"), {"v": value})

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return self.raw.query(sql)

    def run(self, sql: str) -> None:
        self.raw.run(sql)

    def has_table(self, name: str) -> bool:
        return self.raw.has_table(name)

    def close(self) -> None:
        for s in self._sessions:
            s.close()
        self.engine.dispose()
        self.raw.close()


@pytest.fixture(scope="module")
def pg_database(request: pytest.FixtureRequest) -> tuple[PostgresServer, str]:
    """The session's server and a database for this module (one schema per test)."""
    server = cast(PostgresServer, request.getfixturevalue("postgres"))
    return server, server.create_database("inbox")


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind = request.param
    backend: Backend
    if kind.endswith("sqlite") or kind == "sqlite3":
        raw: Sqlite3Backend | PsycopgBackend = Sqlite3Backend(tmp_path / "app.db")
    else:  # the server starts only when a PostgreSQL test runs
        server, dbname = request.getfixturevalue("pg_database")
        raw = PsycopgBackend(server, dbname)
    backend = SqlAlchemyBackend(raw) if kind.startswith("sqlalchemy") else raw
    assert backend.name == kind
    yield backend
    backend.close()


@pytest.fixture
def broker(clock: FakeClock) -> Iterator[arrival.Broker]:
    """A memory broker with an exactly-once queue "pay" (lease 30 s, no retry backoff)."""
    b = arrival.connect("memory:", clock=clock)
    pay_queue(b)
    yield b
    b.close()


def pay_queue(b: arrival.Broker, name: str = "pay") -> None:
    b.create_queue(name, "exactly-once", ack_timeout=ACK_TIMEOUT_S, backoff=NO_BACKOFF)


def deliver(
    b: arrival.Broker, mid: str = "pay-1", group: str = "billing", queue: str = "pay"
) -> tuple[arrival.Consumer, arrival.Message]:
    """Send a message with id ``mid`` and receive it in ``group``."""
    b.producer().send(queue, b'{"amount": 5}', id=mid)
    consumer = b.consumer(queue, group)
    msg = consumer.receive(timeout=0)
    assert msg is not None
    assert msg.id == mid
    return consumer, msg


def redelivered(consumer: arrival.Consumer, clock: FakeClock) -> arrival.Message:
    """The next delivery once every lease has run out."""
    clock.advance(ACK_TIMEOUT_S + 1)
    msg = consumer.receive(timeout=0)
    assert msg is not None, "the message did not come back"
    return msg


def assert_settled(consumer: arrival.Consumer, clock: FakeClock) -> None:
    """Acked: not delivered again, even after every lease has run out."""
    clock.advance(ACK_TIMEOUT_S + 1)
    assert consumer.receive(timeout=0) is None


def warm(db: Backend, conn: Any) -> arrival.Inbox:
    """An inbox whose table exists and is committed, so a rollback can't take the table
    away (see test_table_creation_rolled_back_with_first_failed_block)."""
    inbox = arrival.inbox(conn)
    assert inbox.purge(older_than=0) == 0
    assert db.has_table("arrival_inbox")
    return inbox


class Boom(Exception):
    pass


class Handler:
    """A handler around ``inbox.once``: makes its effect ("charged ID") only if the message
    is fresh (or ``always``), then runs ``then`` and raises Boom if ``fail``. ``seen`` lists
    the freshness of every call, also of those that raised."""

    def __init__(self, db: Backend, conn: Any, inbox: arrival.Inbox | None = None) -> None:
        self.db = db
        self.conn = conn
        self.inbox = inbox or arrival.inbox(conn)
        self.seen: list[bool] = []

    def __call__(
        self,
        msg: Any,
        *,
        ack: bool = True,
        fail: bool = False,
        always: bool = False,
        then: Callable[[], object] | None = None,
    ) -> bool:
        with self.inbox.once(msg, ack=ack) as fresh:
            self.seen.append(fresh)
            if fresh or always:
                self.db.write(self.conn, f"charged {msg.id}")
            if then is not None:
                then()
            if fail:
                raise Boom
        return fresh


# --- once(): the effect and the id commit together, or neither does -------------------


def test_once_commits_effect_and_id_together_then_acks(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    conn = db.connect()
    inbox = arrival.inbox(conn)
    consumer, msg = deliver(broker)
    with inbox.once(msg) as fresh:
        assert fresh is True
        db.write(conn, "charged")
        assert db.effects() == []  # nothing is visible before the block ends
        assert db.ids() == []
    assert db.effects() == ["charged"]
    assert db.ids() == [("pay/billing", "pay-1")]
    assert_settled(consumer, clock)


def test_redelivery_is_not_fresh_and_is_acked(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    conn = db.connect()
    inbox = arrival.inbox(conn)
    consumer, msg = deliver(broker)
    with inbox.once(msg, ack=False) as fresh:
        assert fresh
        db.write(conn, "charged")
    again = redelivered(consumer, clock)
    assert again.attempt == 2
    ran = False
    with inbox.once(again) as fresh:
        assert fresh is False
        ran = True  # the block still runs (to ack); the caller skips the effect
    assert ran
    assert db.effects() == ["charged"]
    assert_settled(consumer, clock)


def test_exception_rolls_back_effect_and_id_and_leaves_message_unacked(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    conn = db.connect()
    handler = Handler(db, conn, warm(db, conn))
    consumer, msg = deliver(broker)
    with pytest.raises(Boom):
        handler(msg, fail=True)
    assert handler.seen == [True]
    assert db.effects() == []
    assert db.ids() == []
    again = redelivered(consumer, clock)  # not acked: it comes back
    assert again.attempt == 2
    assert handler(again) is True  # the id was rolled back with the effect
    assert db.effects() == ["charged pay-1"]
    assert db.ids() == [("pay/billing", "pay-1")]
    assert_settled(consumer, clock)


def test_table_creation_rolled_back_with_first_failed_block(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    # The caller has a transaction open when it first uses the inbox (a SQLAlchemy
    # Session on PostgreSQL always has), the first message fails, the redelivery must work.
    conn = db.connect()
    db.write(conn, "unrelated")
    handler = Handler(db, conn)
    consumer, msg = deliver(broker)
    with pytest.raises(Boom):
        handler(msg, fail=True)
    assert handler(redelivered(consumer, clock)) is True
    assert db.effects() == ["charged pay-1"]


def test_sqlite3_autocommit_connection_still_commits_atomically(
    tmp_path: Path, broker: arrival.Broker, clock: FakeClock
) -> None:
    # isolation_level=None: sqlite3 opens no transaction itself, so the inbox must
    db = Sqlite3Backend(tmp_path / "app.db", isolation_level=None)
    try:
        conn = db.connect()
        handler = Handler(db, conn, warm(db, conn))
        consumer, msg = deliver(broker)
        with pytest.raises(Boom):
            handler(msg, fail=True)
        assert db.effects() == []
        assert db.ids() == []
        assert handler(redelivered(consumer, clock)) is True
        assert db.effects() == ["charged pay-1"]
    finally:
        db.close()


@pytest.mark.parametrize("db", SA_BACKENDS, indirect=True)
def test_sqlalchemy_connection_commits_and_rolls_back(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    engine = cast(SqlAlchemyBackend, db).engine
    with engine.connect() as conn:
        handler = Handler(db, conn)
        assert "Connection" in repr(handler.inbox)
        consumer, msg = deliver(broker)
        assert handler(msg, ack=False) is True
        assert db.effects() == ["charged pay-1"]
        with pytest.raises(Boom):  # a mistaken second effect, rolled back
            handler(redelivered(consumer, clock), always=True, fail=True)
        assert handler.seen == [True, False]
        assert db.effects() == ["charged pay-1"]
        assert handler(redelivered(consumer, clock)) is False
        assert_settled(consumer, clock)


@pytest.mark.parametrize("db", SA_BACKENDS, indirect=True)
def test_sqlalchemy_autocommit_connection_cannot_lose_the_effect(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    engine = cast(SqlAlchemyBackend, db).engine
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        inbox = arrival.inbox(conn)
        consumer, msg = deliver(broker)
        try:
            with pytest.raises(Boom):
                fail_before_effect(inbox, msg)
        except UsageError:
            return  # refused up front: as good as psycopg's autocommit check
        with inbox.once(redelivered(consumer, clock)) as fresh:
            assert fresh, "the id outlived the failed block: the effect would never happen"


def fail_before_effect(inbox: arrival.Inbox, msg: arrival.Message) -> None:
    with inbox.once(msg):
        raise Boom


# --- the key scenario: a lost ack redelivers, the effect still happens once ------------


@pytest.mark.parametrize("loss", ["release", "lease-expiry", "broker-crash", "crash-in-ack"])
def test_lost_ack_redelivers_and_effect_happens_once(
    db: Backend,
    stores: Stores,
    clock: FakeClock,
    loss: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = stores.open()
    pay_queue(b)
    b.producer().send("pay", b'{"amount": 5}', id="pay-1")
    consumer = b.consumer("pay", "billing")
    first = consumer.receive(timeout=0)
    assert first is not None
    handler = Handler(db, db.connect())

    if loss == "crash-in-ack":
        # the process dies after the database commit, inside once()'s ack
        seen_at_ack: list[list[str]] = []

        def crash_instead_of_ack(msg: arrival.Message) -> None:
            seen_at_ack.append(db.effects())
            stores.crash(b)
            raise ConnectionResetError("the consumer died before its ack reached the broker")

        monkeypatch.setattr(arrival.Message, "ack", crash_instead_of_ack)
        with pytest.raises(ConnectionResetError):
            handler(first)
        monkeypatch.undo()
        assert handler.seen == [True]
        assert seen_at_ack == [["charged pay-1"]], "once() must commit before it acks"
    else:
        assert handler(first, ack=False) is True
    assert db.effects() == ["charged pay-1"]  # committed, and the ack never happened

    if loss == "release":
        first.release()
    elif loss == "lease-expiry":
        clock.advance(ACK_TIMEOUT_S + 1)
        with pytest.raises(LeaseExpired):
            first.ack()  # the late ack is refused: the message is redelivered
    elif loss == "broker-crash":
        stores.crash(b)
    if loss in ("broker-crash", "crash-in-ack"):
        # a restarted consumer process: new broker, new connection, new Inbox
        b = stores.open()
        consumer = b.consumer("pay", "billing")
        handler = Handler(db, db.connect())

    second = consumer.receive(timeout=0)
    assert second is not None, "the unacked message was not redelivered"
    assert second.id == "pay-1"
    if loss in ("broker-crash", "crash-in-ack"):
        # a delivery's attempt count is committed within the engine's ack linger: a crash
        # sooner than that (a loaded machine) forgets the first attempt, never the message
        assert second.attempt in (1, 2)
    else:
        assert second.attempt == 2
    assert handler(second, ack=False) is False
    second.ack()

    assert db.effects() == ["charged pay-1"]
    assert db.ids() == [("pay/billing", "pay-1")]
    stores.crash(b)  # the ack of an exactly-once queue is durable: it survives a crash
    b = stores.open()
    assert_settled(b.consumer("pay", "billing"), clock)


def test_ack_failing_after_commit_keeps_the_effect(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    handler = Handler(db, db.connect())
    consumer, msg = deliver(broker)
    with pytest.raises(LeaseExpired):  # the handler was too slow: its ack is refused
        handler(msg, then=lambda: clock.advance(ACK_TIMEOUT_S + 1))
    assert handler.seen == [True]
    assert db.effects() == ["charged pay-1"]
    again = consumer.receive(timeout=0)
    assert again is not None
    assert again.attempt == 2
    assert handler(again) is False
    assert db.effects() == ["charged pay-1"]
    assert_settled(consumer, clock)


# --- consumers: the key is (queue/group, message id) ----------------------------------


def test_each_group_and_queue_gets_its_own_effect(db: Backend, broker: arrival.Broker) -> None:
    pay_queue(broker, "refund")
    conn = db.connect()
    inbox = arrival.inbox(conn)
    msgs = [
        deliver(broker, "x-1", "billing")[1],
        deliver(broker, "x-1", "audit")[1],  # the same message, another group
        deliver(broker, "x-1", "billing", queue="refund")[1],  # the same id, another queue
    ]
    for m in msgs:
        with inbox.once(m) as fresh:
            assert fresh, m
            db.write(conn, f"{m.queue}/{m.group}")
    assert db.effects() == ["pay/audit", "pay/billing", "refund/billing"]
    assert db.ids() == [("pay/audit", "x-1"), ("pay/billing", "x-1"), ("refund/billing", "x-1")]
    assert [inbox.record(m) for m in msgs] == [False, False, False]
    conn.rollback()


# --- the table --------------------------------------------------------------------------


def test_table_created_on_first_use_and_shared_by_later_inboxes(
    db: Backend, broker: arrival.Broker
) -> None:
    conn = db.connect()
    first = arrival.inbox(conn)
    assert not db.has_table("arrival_inbox")  # nothing happens until it is used
    _, msg = deliver(broker)
    with first.once(msg, ack=False) as fresh:
        assert fresh
    assert db.has_table("arrival_inbox")
    # the table exists now: another Inbox, on this connection or another, uses it as is
    for other in (arrival.inbox(conn), arrival.inbox(db.connect()), arrival.inbox(db.connect())):
        with other.once(msg, ack=False) as fresh:
            assert fresh is False
    assert db.ids() == [("pay/billing", "pay-1")]


def test_table_created_by_someone_else_is_used(db: Backend, broker: arrival.Broker) -> None:
    db.run(
        "CREATE TABLE arrival_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, "
        "seen_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (consumer, message_id))"
    )
    db.run("INSERT INTO arrival_inbox VALUES ('pay/billing', 'pay-1', 0)")
    _, msg = deliver(broker)
    with arrival.inbox(db.connect()).once(msg) as fresh:
        assert fresh is False


def test_custom_table_name(db: Backend, broker: arrival.Broker) -> None:
    conn = db.connect()
    custom = arrival.inbox(conn, table="Processed_Payments_2")
    assert custom.table == "Processed_Payments_2"
    assert "Processed_Payments_2" in repr(custom)
    _, msg = deliver(broker)
    with custom.once(msg, ack=False) as fresh:
        assert fresh
    # stored lowercased: the name means what it means unquoted on PostgreSQL
    assert db.ids("processed_payments_2") == [("pay/billing", "pay-1")]
    assert not db.has_table("arrival_inbox")
    with arrival.inbox(conn).once(msg, ack=False) as fresh:  # another table: its own record
        assert fresh


@pytest.mark.parametrize(
    "table",
    ["", "1st", "a-b", "a b", "inbox; DROP TABLE effects", "public.inbox", '"q"', "x" * 64, "é"],
)
def test_invalid_table_name_is_refused(table: str) -> None:
    conn = sqlite3.connect(":memory:")
    try:
        with pytest.raises(UsageError, match="table name"):
            arrival.inbox(conn, table=table)
    finally:
        conn.close()


def test_longest_table_name_is_accepted(db: Backend, broker: arrival.Broker) -> None:
    table = "t" * 63  # PostgreSQL's limit
    conn = db.connect()
    _, msg = deliver(broker)
    with arrival.inbox(conn, table=table).once(msg, ack=False) as fresh:
        assert fresh
    assert db.ids(table) == [("pay/billing", "pay-1")]


def test_reserved_word_table_name_works_or_is_refused(db: Backend, broker: arrival.Broker) -> None:
    conn = db.connect()
    try:
        inbox = arrival.inbox(conn, table="order")
    except UsageError:
        return
    _, msg = deliver(broker)
    with inbox.once(msg, ack=False) as fresh:
        assert fresh


# --- what the inbox refuses -------------------------------------------------------------


@pytest.mark.parametrize(
    "conn",
    [
        object(),
        None,
        "sqlite:///app.db",
        {"dsn": "dbname=app"},
        create_mock_engine("mysql://", lambda *a, **k: None),  # a dialect it doesn't speak
    ],
    ids=["object", "None", "url", "dict", "sqlalchemy-mysql"],
)
def test_unsupported_connection_is_refused(conn: object) -> None:
    with pytest.raises(NotSupported) as e:
        arrival.inbox(conn)
    assert e.value.retriable is False


def test_sqlite3_cursor_is_refused() -> None:
    conn = sqlite3.connect(":memory:")
    try:
        with pytest.raises(NotSupported):
            arrival.inbox(conn.cursor())
    finally:
        conn.close()


@pytest.mark.parametrize("db", ["psycopg"], indirect=True)
def test_psycopg_async_connection_is_refused(db: Backend) -> None:
    pg = cast(PsycopgBackend, db)

    async def check() -> None:
        aconn = await psycopg.AsyncConnection.connect(pg.server.conninfo(pg.dbname))
        try:
            with pytest.raises(NotSupported):
                arrival.inbox(aconn)
        finally:
            await aconn.close()

    asyncio.run(check())


@pytest.mark.parametrize("db", ["psycopg"], indirect=True)
def test_psycopg_autocommit_is_refused(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    conn = cast(PsycopgBackend, db).connect(autocommit=True)
    inbox = arrival.inbox(conn)
    consumer, msg = deliver(broker)
    with pytest.raises(UsageError, match="autocommit"), inbox.once(msg):
        pytest.fail("the block must not run")
    with pytest.raises(UsageError, match="autocommit"):
        inbox.record(msg)
    with pytest.raises(UsageError, match="autocommit"):
        inbox.purge(older_than=60)
    assert db.ids() == []
    assert redelivered(consumer, clock).attempt == 2  # not acked


def test_async_message_needs_ack_false(db: Backend, clock: FakeClock) -> None:
    conn = db.connect()
    inbox = arrival.inbox(conn)

    async def main() -> None:
        b = await arrival.aio.connect("memory:", clock=clock)
        try:
            await b.create_queue("pay", "exactly-once", ack_timeout=ACK_TIMEOUT_S)
            await b.producer().send("pay", b"{}", id="pay-1")
            consumer = b.consumer("pay", "billing")
            msg = await consumer.receive(timeout=0)
            assert msg is not None
            with pytest.raises(UsageError, match="ack=False"), inbox.once(msg):
                pytest.fail("the block must not run")
            assert db.ids() == []  # refused before recording anything
            with inbox.once(msg, ack=False) as fresh:
                assert fresh
                db.write(conn, "charged")
            await msg.ack()
            clock.advance(ACK_TIMEOUT_S + 1)
            assert await consumer.receive(timeout=0) is None
        finally:
            await b.close()

    asyncio.run(main())
    assert db.effects() == ["charged"]
    assert db.ids() == [("pay/billing", "pay-1")]


# --- record(): inside the caller's own transaction --------------------------------------


def test_record_joins_the_callers_transaction(
    db: Backend, broker: arrival.Broker, clock: FakeClock
) -> None:
    conn = db.connect()
    inbox = arrival.inbox(conn)
    consumer, msg = deliver(broker)
    db.write(conn, "before")
    assert inbox.record(msg) is True
    db.write(conn, "after")
    assert db.effects() == []  # record() commits nothing
    assert db.ids() == []
    conn.commit()
    assert db.effects() == ["after", "before"]
    assert db.ids() == [("pay/billing", "pay-1")]
    assert inbox.record(msg) is False
    conn.commit()
    assert redelivered(consumer, clock).attempt == 2  # record() never acks


def test_record_is_forgotten_on_rollback(db: Backend, broker: arrival.Broker) -> None:
    conn = db.connect()
    inbox = warm(db, conn)
    _, msg = deliver(broker)
    assert inbox.record(msg) is True
    db.write(conn, "charged")
    conn.rollback()
    assert db.effects() == []
    assert db.ids() == []
    assert inbox.record(msg) is True  # forgotten: fresh again
    conn.commit()
    assert db.ids() == [("pay/billing", "pay-1")]


# --- purge() ----------------------------------------------------------------------------


def test_purge_deletes_only_old_records(db: Backend, broker: arrival.Broker) -> None:
    conn = db.connect()
    inbox = arrival.inbox(conn)
    assert inbox.purge(older_than=60) == 0  # creates the table, nothing to delete
    msgs = [deliver(broker, mid)[1] for mid in ("old-1", "old-2", "new-1")]
    for m in msgs:
        assert inbox.record(m)
    conn.commit()
    db.run("UPDATE arrival_inbox SET seen_at = seen_at - 3600 WHERE message_id LIKE 'old-%'")
    assert inbox.purge(older_than=1800) == 2
    assert db.ids() == [("pay/billing", "new-1")]  # committed by purge itself
    assert inbox.purge(older_than=1800) == 0
    assert inbox.purge(older_than=3.5 * 3600) == 0
    # a purged id is forgotten: purge only what can no longer be redelivered
    assert [inbox.record(m) for m in msgs] == [True, True, False]
    conn.rollback()


@pytest.mark.parametrize("older_than", [-1, -0.001, "60", None, [60], math.inf * -1])
def test_purge_refuses_bad_age(older_than: Any) -> None:
    conn = sqlite3.connect(":memory:")
    try:
        with pytest.raises(UsageError, match="older_than"):
            arrival.inbox(conn).purge(older_than)
    finally:
        conn.close()


def test_purge_refuses_nan() -> None:
    conn = sqlite3.connect(":memory:")
    try:
        with pytest.raises(UsageError, match="older_than"):
            arrival.inbox(conn).purge(math.nan)
    finally:
        conn.close()


# --- concurrency on PostgreSQL ----------------------------------------------------------


def wait_until_blocked(db: Backend, worker: threading.Thread) -> None:
    """Until a session of this test's database waits on a lock (the other transaction's)."""
    deadline = time.monotonic() + LOCK_WAIT_TIMEOUT_S
    waiting = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while time.monotonic() < deadline:
        if db.query(waiting)[0][0] > 0:
            return
        assert worker.is_alive(), "the second session finished without waiting for the first"
        time.sleep(0.005)
    pytest.fail(f"the second session did not block within {LOCK_WAIT_TIMEOUT_S} s")


@pytest.mark.parametrize(
    ("scenario", "db"),
    [
        ("first-commits", "psycopg"),
        ("first-rolls-back", "psycopg"),
        ("table-created-concurrently", "psycopg"),
        ("first-commits", "sqlalchemy-postgresql"),
        ("first-rolls-back", "sqlalchemy-postgresql"),
        ("table-created-concurrently", "sqlalchemy-postgresql"),
    ],
    indirect=["db"],
)
def test_concurrent_record_exactly_one_is_fresh(
    db: Backend, broker: arrival.Broker, scenario: str
) -> None:
    conn1, conn2 = db.connect(), db.connect()
    if scenario == "table-created-concurrently":
        db.write(conn1, "first")  # conn1's transaction is open: it creates the table in it
        inbox1, inbox2 = arrival.inbox(conn1), arrival.inbox(conn2)
    else:
        inbox1, inbox2 = warm(db, conn1), arrival.inbox(conn2)
    _, msg = deliver(broker)

    assert inbox1.record(msg) is True  # uncommitted: the row is locked, not yet visible
    results: list[object] = []

    def second() -> None:
        try:
            results.append(inbox2.record(msg))
            conn2.commit()
        except Exception as e:  # noqa: BLE001 - handed to the main thread
            results.append(e)

    worker = threading.Thread(target=second)
    worker.start()
    try:
        wait_until_blocked(db, worker)
        assert results == []  # still waiting for conn1's outcome
        if scenario == "first-rolls-back":
            conn1.rollback()
        else:
            conn1.commit()
    finally:
        worker.join(LOCK_WAIT_TIMEOUT_S)
    assert not worker.is_alive()
    assert results == [scenario == "first-rolls-back"]  # exactly one of the two is fresh
    assert db.ids() == [("pay/billing", "pay-1")]
