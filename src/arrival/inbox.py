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
    """One database API: qmark or format parameters, how to begin, commit and roll back."""

    def __init__(self, conn: Any, table: str) -> None:
        self.conn = conn
        self.table = table
        self.ready = False

    def schema(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (consumer TEXT NOT NULL, "
            f"message_id TEXT NOT NULL, seen_at DOUBLE PRECISION NOT NULL, "
            f"PRIMARY KEY (consumer, message_id))"
        )

    def insert(self) -> str:
        # the table name was checked to be a plain identifier
        values = f"({self.param(0)}, {self.param(1)}, {self.param(2)})"
        return f"INSERT INTO {self.table} (consumer, message_id, seen_at) VALUES {values} ON CONFLICT DO NOTHING"  # noqa: E501, S608

    def delete_before(self) -> str:
        return f"DELETE FROM {self.table} WHERE seen_at < {self.param(0)}"  # noqa: S608

    def param(self, i: int) -> str:
        return "?"

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        raise NotImplementedError

    def ensure_table(self) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        """Make sure a transaction is open, so the record and the effect share it."""

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


class _Sqlite3(_Adapter):
    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return int(self.conn.execute(sql, params).rowcount)

    def ensure_table(self) -> None:
        self.conn.execute(self.schema())

    def begin(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")


class _Psycopg(_Adapter):
    def param(self, i: int) -> str:
        return "%s"

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return int(self.conn.execute(sql, params).rowcount)

    def ensure_table(self) -> None:
        import psycopg

        for attempt in range(2):
            try:
                with self.conn.transaction():  # a savepoint inside the caller's transaction
                    self.conn.execute(self.schema())
                return
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                if attempt:  # two sessions created it at once; it exists now
                    raise

    def begin(self) -> None:
        if self.conn.autocommit:
            raise UsageError(
                "the psycopg connection is in autocommit mode, so the inbox record and the "
                "effect cannot share a transaction; use a connection with autocommit=False"
            )


class _SqlAlchemy(_Adapter):
    def param(self, i: int) -> str:
        return f":p{i}"

    def __init__(self, conn: Any, table: str) -> None:
        super().__init__(conn, table)
        bind = conn.get_bind() if hasattr(conn, "get_bind") else conn.engine
        dialect = bind.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise NotSupported(
                f"the inbox supports SQLite and PostgreSQL through SQLAlchemy, not {dialect!r}"
            )

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        from sqlalchemy import text

        result = self.conn.execute(text(sql), {f"p{i}": v for i, v in enumerate(params)})
        return int(getattr(result, "rowcount", 0) or 0)

    def ensure_table(self) -> None:
        from sqlalchemy import text

        self.conn.execute(text(self.schema()))


def _adapter(conn: Any, table: str) -> _Adapter:
    module = type(conn).__module__
    if module.startswith("sqlite3"):
        return _Sqlite3(conn, table)
    if module.startswith("psycopg"):
        return _Psycopg(conn, table)
    if module.startswith("sqlalchemy"):
        return _SqlAlchemy(conn, table)
    raise NotSupported(
        f"the inbox takes a sqlite3 connection, a psycopg connection or a SQLAlchemy "
        f"Session/Connection, not {type(conn).__module__}.{type(conn).__name__}"
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
            self._db.ensure_table()
            self._db.ready = True

    def record(self, msg: _Received) -> bool:
        """Record ``msg`` in the caller's open transaction; True if it is fresh (not
        recorded before for its queue and group). The caller commits or rolls back."""
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
        if ack:
            msg.ack()

    def purge(self, older_than: float) -> int:
        """Delete records older than ``older_than`` seconds, commit, return how many.

        Keep records longer than a message can be redelivered: the queue's dedup window
        (7 days by default) is a safe choice."""
        if not isinstance(older_than, (int, float)) or older_than < 0:
            raise UsageError(f"older_than must be a number of seconds >= 0, not {older_than!r}")
        self._ready()
        db = self._db
        db.begin()
        n = db.execute(db.delete_before(), (time.time() - older_than,))
        db.commit()
        return n


def inbox(conn: Any, *, table: str = "arrival_inbox") -> Inbox:
    """An inbox in ``conn``'s database (sqlite3, psycopg or SQLAlchemy)."""
    return Inbox(conn, table=table)
