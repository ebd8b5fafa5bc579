"""The inbox: exactly-once side effects in the user's own database.

A message may be delivered again after a crash before its ack. An effect outside the
broker (a row, a charge, an e-mail record) happens once if the message's id is recorded
in the same database transaction as the effect: a redelivered message finds its id, skips
the effect and is only acked.

```python
with arrival.inbox(conn).once(msg) as fresh:
    if fresh:
        conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, who))
# committed (effect + id together), then acked
```

Supported connections: ``sqlite3.Connection``, ``psycopg.Connection`` (PostgreSQL) and
SQLAlchemy ``Session`` or ``Connection`` (SQLite or PostgreSQL). The table
(``arrival_inbox`` by default) is created on first use; ``purge`` deletes old rows.

The key is (consumer, message id) where consumer is ``queue/group``: every consumer group
gets its own effect once.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
from collections.abc import Iterator
from typing import Any, Protocol

from arrival.errors import NotSupported, UsageError

__all__ = ["Inbox", "inbox"]

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class _Received(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def group(self) -> str: ...


class _Adapter:
    """One database API: parameters, how to create the table, begin, commit, roll back."""

    def __init__(self, conn: Any, table: str) -> None:
        self.conn = conn
        # a plain identifier (checked), quoted so that keywords work, and lowercased so
        # that it means what the same name unquoted means on PostgreSQL
        self.table = f'"{table.lower()}"'
        self.ready = False  # the table is known to exist in committed state

    def schema(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (consumer TEXT NOT NULL, "
            f"message_id TEXT NOT NULL, seen_at DOUBLE PRECISION NOT NULL, "
            f"PRIMARY KEY (consumer, message_id))"
        )

    def insert(self) -> str:
        values = f"({self.param(0)}, {self.param(1)}, {self.param(2)})"
        return f"INSERT INTO {self.table} (consumer, message_id, seen_at) VALUES {values} ON CONFLICT DO NOTHING"  # noqa: E501, S608

    def delete_before(self) -> str:
        return f"DELETE FROM {self.table} WHERE seen_at < {self.param(0)}"  # noqa: S608

    def param(self, i: int) -> str:
        return "?"

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        raise NotImplementedError

    def ensure_table(self) -> bool:
        """Create the table if needed; True if it is committed (not only in the caller's
        open transaction, which may still roll it back)."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse a connection whose statements cannot share one transaction."""

    def begin(self) -> None:
        """Make sure a transaction is open, so the record and the effect share it."""

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


class _Sqlite3(_Adapter):
    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return int(self.conn.execute(sql, params).rowcount)

    def ensure_table(self) -> bool:
        outside = not self.conn.in_transaction
        self.conn.execute(self.schema())  # DDL outside a transaction commits at once
        return outside

    def begin(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")


class _Psycopg(_Adapter):
    def param(self, i: int) -> str:
        return "%s"

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return int(self.conn.execute(sql, params).rowcount)

    def ensure_table(self) -> bool:
        import psycopg
        from psycopg.pq import TransactionStatus

        outside = bool(self.conn.info.transaction_status == TransactionStatus.IDLE)
        for attempt in range(2):
            try:
                # outside a transaction this commits; inside, it is a savepoint
                with self.conn.transaction():
                    self.conn.execute(self.schema())
                return outside
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                if attempt:  # two sessions created it at once; it exists now
                    raise
        return outside  # pragma: no cover - the loop returns or raises

    def check(self) -> None:
        if self.conn.autocommit:
            raise UsageError(
                "the psycopg connection is in autocommit mode, so the inbox record and the "
                "effect cannot share a transaction; use a connection with autocommit=False"
            )


class _SqlAlchemy(_Adapter):
    def __init__(self, conn: Any, table: str) -> None:
        super().__init__(conn, table)
        bind = conn.get_bind() if hasattr(conn, "get_bind") else conn.engine
        self.dialect = bind.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise NotSupported(
                f"the inbox supports SQLite and PostgreSQL through SQLAlchemy, not {self.dialect!r}"
            )

    def param(self, i: int) -> str:
        return f":p{i}"

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        from sqlalchemy import text

        result = self.conn.execute(text(sql), {f"p{i}": v for i, v in enumerate(params)})
        return int(getattr(result, "rowcount", 0) or 0)

    def ensure_table(self) -> bool:
        from sqlalchemy import text
        from sqlalchemy.exc import IntegrityError, ProgrammingError

        outside = not self.conn.in_transaction()
        if self.dialect != "postgresql":
            self.conn.execute(text(self.schema()))
        else:
            for attempt in range(2):
                try:
                    with self.conn.begin_nested():  # a savepoint: a race leaves no damage
                        self.conn.execute(text(self.schema()))
                    break
                except (IntegrityError, ProgrammingError):
                    if attempt:  # two sessions created it at once; it exists now
                        raise
        if outside:
            self.conn.commit()  # nothing of the caller's was pending: make the table stay
        return outside

    def check(self) -> None:
        conn = self.conn.connection() if hasattr(self.conn, "get_bind") else self.conn
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT" or (
            conn.get_isolation_level() == "AUTOCOMMIT"
        ):
            raise UsageError(
                "the SQLAlchemy connection is in AUTOCOMMIT mode, so the inbox record and "
                "the effect cannot share a transaction; use a transactional connection"
            )


def _adapter(conn: Any, table: str) -> _Adapter:
    module = type(conn).__module__
    if module.startswith("sqlite3"):
        import sqlite3

        if isinstance(conn, sqlite3.Connection):
            return _Sqlite3(conn, table)
    elif module.startswith("psycopg"):
        import psycopg

        if isinstance(conn, psycopg.Connection):
            return _Psycopg(conn, table)
    elif module.startswith("sqlalchemy"):
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session

        if isinstance(conn, (Session, Connection)):
            return _SqlAlchemy(conn, table)
    raise NotSupported(
        f"the inbox takes a sqlite3 connection, a (synchronous) psycopg connection or a "
        f"SQLAlchemy Session/Connection, not {type(conn).__module__}.{type(conn).__name__}"
    )


class Inbox:
    """Records processed message ids in the user's database; see the module docstring."""

    def __init__(self, conn: Any, *, table: str = "arrival_inbox") -> None:
        if not _TABLE.fullmatch(table):
            raise UsageError(f"inbox table name must be a plain SQL identifier, not {table!r}")
        self._db = _adapter(conn, table)
        self.table = table

    def __repr__(self) -> str:
        return f"<arrival.Inbox table={self.table!r} {type(self._db.conn).__name__}>"

    def _ready(self) -> None:
        if not self._db.ready:
            # created inside the caller's transaction, the table is only known to stay
            # once that commits: until then every call makes sure again (cheap)
            self._db.ready = self._db.ensure_table()

    def record(self, msg: _Received) -> bool:
        """Record ``msg`` in the caller's open transaction; True if it is fresh (not
        recorded before for its queue and group). The caller commits or rolls back."""
        self._db.check()
        self._ready()
        self._db.begin()
        consumer = f"{msg.queue}/{msg.group}"
        return self._db.execute(self._db.insert(), (consumer, msg.id, time.time())) == 1

    @contextlib.contextmanager
    def once(self, msg: Any, *, ack: bool = True) -> Iterator[bool]:
        """``with inbox.once(msg) as fresh:`` make the effect only ``if fresh``.

        The id and whatever the block writes through this connection commit together;
        an exception rolls both back (and the message is not acked, so it comes back).
        After the commit the message is acked (``ack=False`` leaves that to you; async
        messages need ``ack=False`` and ``await msg.ack()``). If that ack fails, the
        effect stays committed and the redelivery finds the id: it is only acked.
        """
        if ack and inspect.iscoroutinefunction(getattr(msg, "ack", None)):
            raise UsageError(
                "inbox.once(msg) can't await an async message's ack: pass ack=False and "
                "`await msg.ack()` after the block"
            )
        fresh = self.record(msg)
        try:
            yield fresh
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()
        self._db.ready = True
        if ack:
            msg.ack()

    def purge(self, older_than: float) -> int:
        """Delete records older than ``older_than`` seconds, commit, return how many.

        Keep records longer than a message can be redelivered: the queue's dedup window
        (7 days by default) is a safe choice."""
        if (
            not isinstance(older_than, (int, float))
            or isinstance(older_than, bool)
            or not math.isfinite(older_than)
            or older_than < 0
        ):
            raise UsageError(f"older_than must be a number of seconds >= 0, not {older_than!r}")
        db = self._db
        db.check()
        self._ready()
        db.begin()
        n = db.execute(db.delete_before(), (time.time() - older_than,))
        db.commit()
        return n


def inbox(conn: Any, *, table: str = "arrival_inbox") -> Inbox:
    """An inbox in ``conn``'s database (sqlite3, psycopg or SQLAlchemy)."""
    return Inbox(conn, table=table)
