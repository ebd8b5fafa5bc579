"""The blocking API: ``arrival.connect()`` and what it returns. ``arrival.aio`` is its twin."""

from __future__ import annotations

import builtins
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from arrival._clock import Clock
from arrival._common import (
    MessageBase,
    MessageContext,
    batch_to_send,
    open_engine,
    queue_spec,
    to_send,
)
from arrival.engine import DeadMessage, Engine
from arrival.errors import ClosedError, UsageError
from arrival.model import (
    Backoff,
    BrokerStats,
    ConsumerStats,
    DropPolicy,
    QueueDescription,
    QueueSpec,
    QueueStats,
    StoredMessage,
)
from arrival.semantics.spec import UNSET
from arrival.storage.base import Storage

__all__ = ["Broker", "Consumer", "DeadLetters", "Message", "Producer", "connect"]

_WAKE_SLACK_S = 0.001  # sleep a little past a due time so the retry is due when we poll


def connect(
    url: str | os.PathLike[str] | Storage | None = None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> Broker:
    """Open a broker: a directory path (durable, embedded), ``"memory:"`` (for tests),
    or a Storage. Without ``url``, ``$ARRIVAL_URL`` or ``./data``.

    ``clock`` and ``rng`` replace the system clock and randomness (tests only).
    """
    engine, where = open_engine(url, clock=clock, rng=rng)
    return Broker(engine, where)


class Broker:
    """A connection to a broker. Close it (or use ``with``) to release leases and flush."""

    def __init__(self, engine: Engine, url: str) -> None:
        self._engine = engine
        self.url = url

    def __repr__(self) -> str:
        return f"<arrival.Broker {self.url!r} {'closed' if self._engine.closed else 'open'}>"

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        return self._engine

    def create_queue(
        self,
        name: str,
        guarantee: str,
        *,
        ack_timeout: float = UNSET,
        max_deliveries: int | None = UNSET,
        dead_letter: str | None = UNSET,
        backoff: Backoff = UNSET,
        retention: float = UNSET,
        capacity: int = UNSET,
        drop: DropPolicy | str = UNSET,
        conflate: bool = UNSET,
        max_message_bytes: int = UNSET,
    ) -> QueueSpec:
        """Declare a queue and its guarantee: ``"at-most-once"``, ``"at-least-once"`` or
        ``"exactly-once"``. Declaring it again with the same settings is a no-op; with
        other settings it raises QueueSpecConflict naming each difference.

        at-least-once: ``ack_timeout`` (s, lease length), ``max_deliveries`` (failed
        attempts before dead-lettering; None = unlimited), ``dead_letter`` (queue name,
        default ``NAME.dlq``), ``backoff`` (``arrival.Backoff``), ``retention`` (s to keep
        messages after every group acked them).
        at-most-once: ``capacity`` (messages), ``drop`` (``"oldest"``/``"newest"``),
        ``conflate`` (keep only the latest message per key).
        """
        options: dict[str, Any] = {
            "ack_timeout": ack_timeout,
            "max_deliveries": max_deliveries,
            "dead_letter": dead_letter,
            "backoff": backoff,
            "retention": retention,
            "capacity": capacity,
            "drop": drop,
            "conflate": conflate,
            "max_message_bytes": max_message_bytes,
        }
        return self._engine.create_queue(queue_spec(name, guarantee, options))

    def describe(self, queue: str) -> QueueDescription:
        """What ``queue`` promises, by which mechanism, and its limits right now."""
        return self._engine.describe(queue)

    def queues(self) -> list[str]:
        return self._engine.queue_names()

    def peek(self, queue: str, limit: int = 10, *, start: int | None = None) -> list[StoredMessage]:
        """Retained messages of ``queue`` from offset ``start`` (default: the oldest),
        read without consuming them."""
        return self._engine.peek(queue, limit, start)

    def info(self) -> BrokerStats:
        """The broker's own counters: commits and fsyncs since it opened."""
        return self._engine.info()

    def stats(self, queue: str) -> QueueStats:
        return self._engine.stats(queue)

    def producer(self) -> Producer:
        return Producer(self._engine)

    def consumer(self, queue: str, group: str = "default", *, start: str = "earliest") -> Consumer:
        """Join consumer ``group`` of ``queue``. A new group starts at the oldest retained
        message (``start="latest"``: only messages sent from now on)."""
        return Consumer(self._engine, queue, group, start)

    def dead_letters(self, queue: str) -> DeadLetters:
        """The dead-letter queue of ``queue``: list, replay and purge."""
        self._engine.spec(queue)
        return DeadLetters(self._engine, queue)

    def close(self) -> None:
        """Release every lease without spending attempts, flush, and close the store."""
        self._engine.close()


class Producer:
    """Sends messages. On durable queues ``send`` returns once the message is fsynced;
    on at-most-once queues it returns at once (fire and forget)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._closed = False

    def __repr__(self) -> str:
        return f"<arrival.Producer {'closed' if self._closed else 'open'}>"

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        queue: str,
        body: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
        timeout: float | None = None,
    ) -> int | None:
        """Send one message; returns its offset (None on at-most-once queues)."""
        if self._closed:
            raise ClosedError("the producer")
        ticket = self._engine.send(queue, [to_send(body, key, headers, id)])
        return None if ticket is None else ticket.wait(timeout)

    def send_batch(
        self, queue: str, messages: Iterable[bytes | Any], *, timeout: float | None = None
    ) -> int | None:
        """Send many messages (bytes or ``arrival.Envelope``) with one commit; returns the
        first offset. All are stored, in order, or none is."""
        if self._closed:
            raise ClosedError("the producer")
        items = list(messages)
        if all(type(m) is bytes for m in items):  # the fast path: bodies only
            ticket = self._engine.send_bodies(queue, items)
        else:
            ticket = self._engine.send(queue, batch_to_send(items))
        return None if ticket is None else ticket.wait(timeout)

    def close(self) -> None:
        self._closed = True


class Message(MessageBase):
    """A delivered message. Settle it once: ``ack()``, ``nack()`` or ``reject()``."""

    __slots__ = ()

    def ack(self) -> None:
        """Processed: the group will not get this message again. Raises LeaseExpired if the
        lease ran out first (the message is then redelivered)."""
        self._engine.ack(self._member, self._epoch, ((self.offset, self.attempt),))

    def nack(self, delay: float | None = None, *, error: str | None = None) -> None:
        """Failed: redeliver after ``delay`` seconds (default: the queue's backoff). After
        ``max_deliveries`` failures the message moves to the dead-letter queue."""
        self._engine.nack(self._member, self._epoch, self.offset, self.attempt, delay, error)

    def reject(self, reason: str) -> None:
        """Give up on this message now: it moves to the dead-letter queue with ``reason``."""
        self._engine.reject(self._member, self._epoch, self.offset, self.attempt, reason)

    def extend(self, seconds: float | None = None) -> None:
        """Hold the lease ``seconds`` longer from now (default: the queue's ack_timeout)."""
        self.lease_deadline = self._engine.extend(
            self._member, self._epoch, self.offset, self.attempt, seconds
        )

    def release(self) -> None:
        """Give the message back unprocessed, without spending an attempt."""
        self._engine.release(self._member, self._epoch, self.offset, self.attempt)


class Consumer:
    """A member of a consumer group. ``receive()`` one message, ``receive_batch()`` many,
    or iterate. Closing releases held messages without spending their attempts."""

    def __init__(self, engine: Engine, queue: str, group: str, start: str) -> None:
        if start not in ("earliest", "latest"):
            raise UsageError(f"start must be 'earliest' or 'latest', not {start!r}")
        self._engine = engine
        self.queue = queue
        self.group = group
        self._member = engine.join(queue, group, latest=start == "latest")
        self._ctx = MessageContext(engine, self._member, queue, group)
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<arrival.Consumer {self.queue}/{self.group} member={self._member} {state}>"

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> ConsumerStats:
        """This consumer's counters and how many messages it holds now."""
        return self._engine.member_stats(self._member)

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (None: forever); None if
        nothing arrived in time."""
        got = self.receive_batch(1, timeout)
        return got[0] if got else None

    def receive_batch(self, max_messages: int = 100, timeout: float | None = None) -> list[Message]:
        """Up to ``max_messages`` messages, as soon as at least one is there; [] on timeout."""
        if max_messages < 1:
            raise UsageError("max_messages must be at least 1")
        engine = self._engine
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise ClosedError("the consumer")
            got, version, due = engine.poll(self._member, max_messages)
            if got:
                ctx = self._ctx
                return [Message(ctx, off, att, dl, rec) for off, att, dl, rec in got]
            wait = None if end is None else end - time.monotonic()
            if wait is not None and wait <= 0:
                return []
            if due is not None:
                until_due = max(0.0, due - engine.clock.now()) + _WAKE_SLACK_S
                wait = until_due if wait is None else min(wait, until_due)
            engine.wait(version, wait)

    def __iter__(self) -> Iterator[Message]:
        """Messages as they arrive, until the consumer or broker is closed."""
        while not self._closed and not self._engine.closed:
            try:
                msg = self.receive(timeout=1.0)
            except ClosedError:
                return
            if msg is not None:
                yield msg

    def ack_batch(self, messages: Iterable[Message]) -> None:
        """Ack many messages of this consumer at once."""
        msgs = list(messages)
        if msgs:
            self._engine.ack(self._member, msgs[0]._epoch, [(m.offset, m.attempt) for m in msgs])

    def close(self) -> None:
        """Leave the group; messages still held go back to it without spending attempts."""
        if not self._closed:
            self._closed = True
            self._engine.leave(self._member)


class DeadLetters:
    """The dead-letter queue of one queue: each entry carries its provenance."""

    def __init__(self, engine: Engine, queue: str) -> None:
        self._engine = engine
        self.queue = queue

    def __repr__(self) -> str:
        return f"<arrival.DeadLetters of {self.queue!r}>"

    def list(self, limit: int | None = None) -> builtins.list[DeadMessage]:
        """The dead letters, oldest first, including those moved there just now."""
        self._engine.flush().wait()
        return self._engine.dead_letters(self.queue, limit)

    def replay(
        self,
        where: Callable[[DeadMessage], bool] | None = None,
        *,
        limit: int | None = None,
        dry_run: bool = False,
    ) -> builtins.list[DeadMessage]:
        """Send dead letters (all, or those ``where`` selects) back to the group that failed
        them, with a fresh attempt budget, and remove them from the dead-letter queue.
        ``dry_run`` only returns what would be replayed."""
        self._engine.flush().wait()
        chosen, ticket = self._engine.replay_dead_letters(
            self.queue, where, limit=limit, dry_run=dry_run
        )
        if ticket is not None:
            ticket.wait()
        return chosen

    def purge(self, where: Callable[[DeadMessage], bool] | None = None) -> int:
        """Delete dead letters (all, or those ``where`` selects); returns how many."""
        self._engine.flush().wait()
        return self._engine.purge_dead_letters(self.queue, where)
