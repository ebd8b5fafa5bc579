"""What the public API drives: a broker's operations, each returning a ``Pending``.

``arrival.Broker`` (blocking) and ``arrival.aio.Broker`` are written once against this
interface; ``LocalBackend`` runs the operations on an embedded engine and
``arrival.client.RemoteBackend`` sends them to ``arrival serve``. Every operation
returns at once (it takes a lock or writes a frame) and its result is waited for
(``.wait()``) or awaited, so the same backend serves both APIs and cannot drift.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from arrival._codec import RecordTuple
from arrival._pending import Deferred, Pending, Ready, TicketResult, wake_soon
from arrival.engine import DeadMessage, Delivery, Engine, ProducerSeq, Send, TxnAcks
from arrival.model import (
    BrokerStats,
    ConsumerStats,
    QueueDescription,
    QueueSpec,
    QueueStats,
    StoredMessage,
)

__all__ = ["Backend", "LocalBackend", "Where"]

Where = Callable[[DeadMessage], bool] | None
_WAKE_SLACK_S = 0.001  # sleep a little past a due time so the retry is due when we poll


class Backend:
    """The operations of a broker. ``member`` is a consumer's id from ``join``; ``epoch``
    the broker epoch a delivery was made in; a receipt is (offset, attempt)."""

    url: str

    @property
    def epoch(self) -> int:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def now(self) -> float:
        """The clock a transaction's age is measured by."""
        raise NotImplementedError

    # -- queues -----------------------------------------------------------------------
    def create_queue(self, spec: QueueSpec) -> Pending[QueueSpec]:
        raise NotImplementedError

    def spec(self, queue: str) -> Pending[QueueSpec]:
        raise NotImplementedError

    def is_durable(self, queue: str) -> Pending[bool]:
        raise NotImplementedError

    def describe(self, queue: str) -> Pending[QueueDescription]:
        raise NotImplementedError

    def queue_names(self) -> Pending[list[str]]:
        raise NotImplementedError

    def peek(self, queue: str, limit: int, start: int | None) -> Pending[list[StoredMessage]]:
        raise NotImplementedError

    def info(self) -> Pending[BrokerStats]:
        raise NotImplementedError

    def stats(self, queue: str) -> Pending[QueueStats]:
        raise NotImplementedError

    # -- producing --------------------------------------------------------------------
    def register_producer(self, producer: str) -> Pending[int]:
        raise NotImplementedError

    def send(
        self,
        queue: str,
        messages: Sequence[Send] | None,
        bodies: Sequence[bytes] | None,
        producer: ProducerSeq | None,
    ) -> Pending[int | None]:
        """The first offset once durable; None at once on at-most-once queues."""
        raise NotImplementedError

    # -- transactions -----------------------------------------------------------------
    def begin_transaction(self, tid: str) -> Pending[tuple[int, int]]:
        raise NotImplementedError

    def end_transaction(self, tid: str, epoch: tuple[int, int]) -> Pending[None]:
        raise NotImplementedError

    def commit_transaction(
        self,
        tid: str,
        epoch: tuple[int, int],
        started: float,
        timeout: float,
        sends: Sequence[tuple[str, list[RecordTuple]]],
        acks: TxnAcks,
        keep: bool,
    ) -> Pending[None]:
        raise NotImplementedError

    # -- consuming --------------------------------------------------------------------
    def join(self, queue: str, group: str, latest: bool) -> Pending[int]:
        raise NotImplementedError

    def leave(self, member: int) -> Pending[None]:
        raise NotImplementedError

    def member_stats(self, member: int) -> Pending[ConsumerStats]:
        raise NotImplementedError

    def receive(self, member: int, limit: int, timeout: float | None) -> Pending[list[Delivery]]:
        """Up to ``limit`` deliveries as soon as one is there; [] after ``timeout``."""
        raise NotImplementedError

    def ack(self, member: int, epoch: int, receipts: Sequence[tuple[int, int]]) -> Pending[None]:
        """Returns once durable on exactly-once queues; elsewhere at once."""
        raise NotImplementedError

    def nack(
        self,
        member: int,
        epoch: int,
        off: int,
        attempt: int,
        delay: float | None,
        error: str | None,
    ) -> Pending[bool]:
        raise NotImplementedError

    def reject(self, member: int, epoch: int, off: int, attempt: int, reason: str) -> Pending[None]:
        raise NotImplementedError

    def extend(
        self, member: int, epoch: int, off: int, attempt: int, seconds: float | None
    ) -> Pending[float]:
        raise NotImplementedError

    def release(self, member: int, epoch: int, off: int, attempt: int) -> Pending[None]:
        raise NotImplementedError

    def is_leased(self, member: int, epoch: int, off: int, attempt: int, deadline: float) -> bool:
        """Whether the delivery's lease still holds, answered without waiting."""
        raise NotImplementedError

    # -- dead letters -----------------------------------------------------------------
    def dead_letters(self, queue: str, limit: int | None) -> Pending[list[DeadMessage]]:
        raise NotImplementedError

    def replay_dead_letters(
        self, queue: str, where: Where, limit: int | None, dry_run: bool, max_replays: int | None
    ) -> Pending[tuple[list[DeadMessage], list[DeadMessage]]]:
        """(replayed, held back by the loop guard): ``Engine.replay_dead_letters``."""
        raise NotImplementedError

    def purge_dead_letters(self, queue: str, where: Where) -> Pending[int]:
        raise NotImplementedError

    def close(self) -> Pending[None]:
        raise NotImplementedError

    def flush_sends(self) -> None:
        """Write the sends queued so far (a network client queues a numbered send under
        its producer's lock and writes it after)."""

    def send_window(self) -> int | None:
        """How many sends one idempotent producer may have unanswered (None: no limit).
        A backend that repeats sends bounds them by what the broker remembers."""
        return None

    def shared_producer(self) -> Any:
        """The idempotent producer anonymous producers send durable messages with, when
        the backend may repeat a send (the network client); None in process."""
        return None


def _none(_offset: int) -> None:
    return None


def _offset(offset: int) -> int | None:
    return offset


class LocalBackend(Backend):
    """The operations on an embedded engine, in this process."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url

    @property
    def epoch(self) -> int:
        return self.engine.epoch

    @property
    def closed(self) -> bool:
        return self.engine.closed

    def now(self) -> float:
        return self.engine.clock.now()

    def create_queue(self, spec: QueueSpec) -> Pending[QueueSpec]:
        return Deferred(lambda: self.engine.create_queue(spec))  # fsyncs a new queue

    def spec(self, queue: str) -> Pending[QueueSpec]:
        return Ready(self.engine.spec(queue))

    def is_durable(self, queue: str) -> Pending[bool]:
        return Ready(self.engine.is_durable(queue))

    def describe(self, queue: str) -> Pending[QueueDescription]:
        return Ready(self.engine.describe(queue))

    def queue_names(self) -> Pending[list[str]]:
        return Ready(self.engine.queue_names())

    def peek(self, queue: str, limit: int, start: int | None) -> Pending[list[StoredMessage]]:
        return Ready(self.engine.peek(queue, limit, start))

    def info(self) -> Pending[BrokerStats]:
        return Ready(self.engine.info())

    def stats(self, queue: str) -> Pending[QueueStats]:
        return Ready(self.engine.stats(queue))

    def register_producer(self, producer: str) -> Pending[int]:
        return Deferred(lambda: self.engine.register_producer(producer))  # waits for fsync

    def send(
        self,
        queue: str,
        messages: Sequence[Send] | None,
        bodies: Sequence[bytes] | None,
        producer: ProducerSeq | None,
    ) -> Pending[int | None]:
        if bodies is not None:
            ticket = self.engine.send_bodies(queue, bodies, producer)
        else:
            assert messages is not None
            ticket = self.engine.send(queue, messages, producer)
        if ticket is None:
            return Ready(None)
        return TicketResult(ticket, _offset)

    def begin_transaction(self, tid: str) -> Pending[tuple[int, int]]:
        return Ready(self.engine.begin_transaction(tid))

    def end_transaction(self, tid: str, epoch: tuple[int, int]) -> Pending[None]:
        self.engine.end_transaction(tid, epoch)
        return Ready(None)

    def commit_transaction(
        self,
        tid: str,
        epoch: tuple[int, int],
        started: float,
        timeout: float,
        sends: Sequence[tuple[str, list[RecordTuple]]],
        acks: TxnAcks,
        keep: bool,
    ) -> Pending[None]:
        ticket = self.engine.commit_transaction(
            tid, epoch, started, timeout, sends, acks, keep=keep
        )
        return TicketResult(ticket, _none)

    def join(self, queue: str, group: str, latest: bool) -> Pending[int]:
        return Ready(self.engine.join(queue, group, latest=latest))

    def leave(self, member: int) -> Pending[None]:
        self.engine.leave(member)
        return Ready(None)

    def member_stats(self, member: int) -> Pending[ConsumerStats]:
        return Ready(self.engine.member_stats(member))

    def receive(self, member: int, limit: int, timeout: float | None) -> Pending[list[Delivery]]:
        return _Receive(self.engine, member, limit, timeout)

    def ack(self, member: int, epoch: int, receipts: Sequence[tuple[int, int]]) -> Pending[None]:
        ticket = self.engine.ack(member, epoch, receipts)
        return Ready(None) if ticket is None else TicketResult(ticket, _none)

    def nack(
        self,
        member: int,
        epoch: int,
        off: int,
        attempt: int,
        delay: float | None,
        error: str | None,
    ) -> Pending[bool]:
        return Ready(self.engine.nack(member, epoch, off, attempt, delay, error))

    def reject(self, member: int, epoch: int, off: int, attempt: int, reason: str) -> Pending[None]:
        self.engine.reject(member, epoch, off, attempt, reason)
        return Ready(None)

    def extend(
        self, member: int, epoch: int, off: int, attempt: int, seconds: float | None
    ) -> Pending[float]:
        return Ready(self.engine.extend(member, epoch, off, attempt, seconds))

    def release(self, member: int, epoch: int, off: int, attempt: int) -> Pending[None]:
        self.engine.release(member, epoch, off, attempt)
        return Ready(None)

    def is_leased(self, member: int, epoch: int, off: int, attempt: int, deadline: float) -> bool:
        return self.engine.is_leased(member, epoch, off, attempt)

    def dead_letters(self, queue: str, limit: int | None) -> Pending[list[DeadMessage]]:
        engine = self.engine

        def listed(_offset: int) -> list[DeadMessage]:
            return engine.dead_letters(queue, limit)

        return TicketResult(engine.flush(), listed)  # including those moved just now

    def replay_dead_letters(
        self, queue: str, where: Where, limit: int | None, dry_run: bool, max_replays: int | None
    ) -> Pending[tuple[list[DeadMessage], list[DeadMessage]]]:
        engine = self.engine

        def replay() -> tuple[list[DeadMessage], list[DeadMessage]]:
            engine.flush().wait()
            chosen, held, ticket = engine.replay_dead_letters(
                queue, where, limit=limit, dry_run=dry_run, max_replays=max_replays
            )
            if ticket is not None:
                ticket.wait()
            return chosen, held

        return Deferred(replay)

    def purge_dead_letters(self, queue: str, where: Where) -> Pending[int]:
        engine = self.engine

        def purge() -> int:
            engine.flush().wait()
            return engine.purge_dead_letters(queue, where)

        return Deferred(purge)

    def close(self) -> Pending[None]:
        return Deferred(self.engine.close)


class _Receive:
    """A receive on the embedded engine: poll, and wait for a change or a due time."""

    __slots__ = ("engine", "limit", "member", "timeout")

    def __init__(self, engine: Engine, member: int, limit: int, timeout: float | None) -> None:
        self.engine = engine
        self.member = member
        self.limit = limit
        self.timeout = timeout

    def done(self) -> bool:
        return False

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        raise TypeError("a receive runs when waited for; it has no callbacks")

    def _next_wait(self, end: float | None, due: float | None) -> float | None:
        wait = None if end is None else end - time.monotonic()
        if due is not None:
            until_due = max(0.0, due - self.engine.clock.now()) + _WAKE_SLACK_S
            wait = until_due if wait is None else min(wait, until_due)
        return wait

    def now(self) -> list[Delivery]:
        """What a poll hands out right now, without waiting ([] if nothing)."""
        return self.engine.poll(self.member, self.limit)[0]

    def wait(self, timeout: float | None = None) -> list[Delivery]:
        engine = self.engine
        end = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            got, version, due = engine.poll(self.member, self.limit)
            if got:
                return got
            if end is not None and end - time.monotonic() <= 0:
                return []
            engine.wait(version, self._next_wait(end, due))

    def __await__(self) -> Generator[Any, None, list[Delivery]]:
        return self._receive().__await__()

    async def _receive(self) -> list[Delivery]:
        engine = self.engine
        loop = asyncio.get_running_loop()
        end = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            got, version, due = engine.poll(self.member, self.limit)
            if got:
                return got
            if end is not None and end - time.monotonic() <= 0:
                return []
            fut: asyncio.Future[None] = loop.create_future()

            def wake(fut: asyncio.Future[None] = fut) -> None:
                wake_soon(loop, fut)

            unwatch = engine.watch(wake)
            try:
                if engine.version == version and not engine.closed:
                    await asyncio.wait_for(fut, self._next_wait(end, due))
            except TimeoutError:
                pass
            finally:
                unwatch()
