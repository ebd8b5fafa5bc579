"""The asyncio API: the same names and semantics as ``arrival``, with ``await``.

It drives the same engine as the blocking API; only waiting differs: a durable send
awaits its commit through a future, and ``receive`` awaits the engine's change signal.
No thread runs an event loop, and no call blocks the loop for longer than a lock.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import msgspec

from arrival._clock import Clock
from arrival._common import (
    DEFAULT_TRANSACTION_TIMEOUT_S,
    Envelope,
    MessageBase,
    MessageContext,
    ProducerCore,
    TransactionCore,
    batch_to_send,
    open_engine,
    queue_spec,
    to_send,
)
from arrival._process import (
    Command,
    Handle,
    Nack,
    OutputsBase,
    ProcessResult,
    Receive,
    Release,
    Wait,
    check_arguments,
    steps,
)
from arrival.engine import DeadMessage, Engine, Ticket
from arrival.errors import (
    ClosedError,
    LeaseExpired,
    ReceiptError,
    UsageError,
)
from arrival.model import (
    Backoff,
    BrokerStats,
    ConsumerStats,
    DropPolicy,
    Guarantee,
    QueueDescription,
    QueueSpec,
    QueueStats,
    StoredMessage,
)
from arrival.router import Route, _Routes
from arrival.semantics.spec import UNSET
from arrival.storage.base import Storage

__all__ = [
    "Broker",
    "Consumer",
    "DeadLetters",
    "Envelope",
    "Message",
    "Outputs",
    "ProcessResult",
    "Producer",
    "Router",
    "Transaction",
    "connect",
]

_WAKE_SLACK_S = 0.001


async def connect(
    url: str | os.PathLike[str] | Storage | None = None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    producer_horizon: float | None = None,
) -> Broker:
    """Open a broker; see ``arrival.connect``."""
    engine, where = open_engine(url, clock=clock, rng=rng, producer_horizon=producer_horizon)
    return Broker(engine, where)


async def _committed(ticket: Ticket) -> int:
    if not ticket.done():
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            _call_soon(loop, fut)

        ticket.add_done_callback(done)
        await fut
    return ticket.outcome()


def _call_soon(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    """Wake ``fut`` from any thread; a loop that has closed meanwhile has no one to wake."""
    with contextlib.suppress(RuntimeError):  # closed: the awaiting task is gone with it
        loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Broker:
    """The async twin of ``arrival.Broker``."""

    def __init__(self, engine: Engine, url: str) -> None:
        self._engine = engine
        self.url = url

    def __repr__(self) -> str:
        return f"<arrival.aio.Broker {self.url!r} {'closed' if self._engine.closed else 'open'}>"

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def engine(self) -> Engine:
        return self._engine

    async def create_queue(
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
        dedup: bool = UNSET,
        dedup_window: float = UNSET,
    ) -> QueueSpec:
        """See ``arrival.Broker.create_queue``."""
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
            "dedup": dedup,
            "dedup_window": dedup_window,
        }
        spec = queue_spec(name, guarantee, options)
        return await asyncio.to_thread(self._engine.create_queue, spec)

    async def describe(self, queue: str) -> QueueDescription:
        return self._engine.describe(queue)

    async def queues(self) -> list[str]:
        return self._engine.queue_names()

    async def peek(
        self, queue: str, limit: int = 10, *, start: int | None = None
    ) -> list[StoredMessage]:
        """Retained messages of ``queue`` from offset ``start`` (default: the oldest),
        read without consuming them."""
        return self._engine.peek(queue, limit, start)

    async def info(self) -> BrokerStats:
        """The broker's own counters: commits and fsyncs since it opened."""
        return self._engine.info()

    async def stats(self, queue: str) -> QueueStats:
        return self._engine.stats(queue)

    def producer(self, id: str | None = None) -> Producer:  # noqa: A002 - like Envelope.id
        """See ``arrival.Broker.producer``."""
        return Producer(self._engine, id)

    def transaction(
        self, transactional_id: str, *, timeout: float = DEFAULT_TRANSACTION_TIMEOUT_S
    ) -> Transaction:
        """See ``arrival.Broker.transaction``; use it as ``async with``."""
        return Transaction(self._engine, transactional_id, timeout)

    def consumer(self, queue: str, group: str = "default", *, start: str = "earliest") -> Consumer:
        return Consumer(self._engine, queue, group, start)

    def dead_letters(self, queue: str) -> DeadLetters:
        self._engine.spec(queue)
        return DeadLetters(self._engine, queue)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.close)


class Producer:
    """The async twin of ``arrival.Producer``: concurrent sends share one fsync."""

    def __init__(self, engine: Engine, producer_id: str | None = None) -> None:
        self._core = ProducerCore(engine, producer_id)
        self._closed = False

    def __repr__(self) -> str:
        return f"<arrival.aio.Producer {self.id!r} {'closed' if self._closed else 'open'}>"

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def id(self) -> str | None:
        return self._core.id

    async def send(
        self,
        queue: str,
        body: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
    ) -> int | None:
        if self._closed:
            raise ClosedError("the producer")
        ticket = self._core.submit(queue, [to_send(body, key, headers, id)])
        return None if ticket is None else await _committed(ticket)

    async def send_batch(self, queue: str, messages: Iterable[bytes | Any]) -> int | None:
        if self._closed:
            raise ClosedError("the producer")
        items = list(messages)
        if all(type(m) is bytes for m in items):  # the fast path: bodies only
            ticket = self._core.submit(queue, None, items)
        else:
            ticket = self._core.submit(queue, batch_to_send(items))
        return None if ticket is None else await _committed(ticket)

    async def close(self) -> None:
        self._closed = True


class Transaction:
    """The async twin of ``arrival.Transaction``; use it as ``async with``."""

    def __init__(self, engine: Engine, tid: str, timeout: float) -> None:
        self._core = TransactionCore(engine, tid, timeout)

    def __repr__(self) -> str:
        return repr(self._core)

    @property
    def id(self) -> str:
        return self._core.id

    @property
    def state(self) -> str:
        return self._core.state

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: object
    ) -> None:
        if t is None:
            if self._core.state == "open":
                await self.commit()
        else:
            await self.abort()

    async def send(
        self,
        queue: str,
        body: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
        source: MessageBase | None = None,
    ) -> None:
        self._core.add(queue, [to_send(body, key, headers, id)], source)

    async def send_batch(
        self, queue: str, messages: Iterable[bytes | Any], *, source: MessageBase | None = None
    ) -> None:
        self._core.add(queue, batch_to_send(list(messages)), source)

    async def ack(self, msg: MessageBase) -> None:
        self._core.ack(msg)

    async def commit(self) -> None:
        ticket = self._core.submit()
        try:
            await _committed(ticket)
        except BaseException:
            self._core.finished(False)
            raise
        self._core.finished(True)

    async def abort(self) -> None:
        self._core.abort()


class Outputs(OutputsBase):
    """The async twin of ``arrival.Outputs``."""

    __slots__ = ()

    async def send(
        self,
        queue: str,
        body: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
    ) -> None:
        self._items.append((queue, to_send(body, key, headers, id)))


class Message(MessageBase):
    """The async twin of ``arrival.Message``."""

    __slots__ = ()

    async def ack(self) -> None:
        ticket = self._engine.ack(self._member, self._epoch, ((self.offset, self.attempt),))
        if ticket is not None:
            await _committed(ticket)

    async def nack(self, delay: float | None = None, *, error: str | None = None) -> None:
        self._engine.nack(self._member, self._epoch, self.offset, self.attempt, delay, error)

    async def reject(self, reason: str) -> None:
        self._engine.reject(self._member, self._epoch, self.offset, self.attempt, reason)

    async def extend(self, seconds: float | None = None) -> None:
        self.lease_deadline = self._engine.extend(
            self._member, self._epoch, self.offset, self.attempt, seconds
        )

    async def release(self) -> None:
        self._engine.release(self._member, self._epoch, self.offset, self.attempt)


class Consumer:
    """The async twin of ``arrival.Consumer``; iterate it with ``async for``."""

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
        return f"<arrival.aio.Consumer {self.queue}/{self.group} member={self._member} {state}>"

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stats(self) -> ConsumerStats:
        """This consumer's counters and how many messages it holds now."""
        return self._engine.member_stats(self._member)

    async def receive(self, timeout: float | None = None) -> Message | None:
        got = await self.receive_batch(1, timeout)
        return got[0] if got else None

    async def receive_batch(
        self, max_messages: int = 100, timeout: float | None = None
    ) -> list[Message]:
        if max_messages < 1:
            raise UsageError("max_messages must be at least 1")
        engine = self._engine
        loop = asyncio.get_running_loop()
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
            fut: asyncio.Future[None] = loop.create_future()

            def wake(fut: asyncio.Future[None] = fut) -> None:
                _call_soon(loop, fut)

            unwatch = engine.watch(wake)
            try:
                if engine.version == version and not engine.closed:
                    await asyncio.wait_for(fut, wait)
            except TimeoutError:
                pass
            finally:
                unwatch()

    async def __aiter__(self) -> AsyncIterator[Message]:
        while not self._closed and not self._engine.closed:
            try:
                msg = await self.receive(timeout=1.0)
            except ClosedError:
                return
            if msg is not None:
                yield msg

    async def ack_batch(self, messages: Iterable[Message]) -> None:
        msgs = list(messages)
        if msgs:
            receipts = [(m.offset, m.attempt) for m in msgs]
            ticket = self._engine.ack(self._member, msgs[0]._epoch, receipts)
            if ticket is not None:
                await _committed(ticket)

    async def process(
        self,
        handler: Callable[[Message, Outputs], Any],
        *,
        transactional_id: str,
        batch: int = 1,
        interval: float = 0.1,
        timeout: float = DEFAULT_TRANSACTION_TIMEOUT_S,
        limit: int | None = None,
        idle: float | None = None,
        stop: Callable[[], bool] | None = None,
        on_commit: Callable[[list[Message]], None] | None = None,
    ) -> ProcessResult:
        """See ``arrival.Consumer.process``; ``handler`` may be sync or async."""
        check_arguments(batch, interval, timeout)
        gen = steps(
            self._engine,
            Outputs,
            transactional_id=transactional_id,
            batch=batch,
            interval=interval,
            timeout=timeout,
            limit=limit,
            idle=idle,
            stop=stop,
            on_commit=on_commit,
        )

        async def execute(cmd: Command) -> Any:
            if type(cmd) is Receive:
                try:
                    return await self.receive_batch(cmd.want, timeout=cmd.wait)
                except ClosedError:
                    return None
            if type(cmd) is Handle:
                try:
                    r = handler(cmd.msg, cmd.out)
                    if asyncio.iscoroutine(r):
                        await r
                    cmd.out._flush()  # all of its outputs, or (refused) none
                except Exception as exc:  # noqa: BLE001 - the handler's failure is data
                    return exc
            elif type(cmd) is Nack:
                with contextlib.suppress(LeaseExpired):  # it is redelivered anyway
                    await cmd.msg.nack(error=cmd.error)
            elif type(cmd) is Release:
                with contextlib.suppress(ReceiptError):
                    await cmd.msg.release()
            elif type(cmd) is Wait:
                await _committed(cmd.ticket)
            return None

        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                cmd = gen.send(reply) if error is None else gen.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            reply, error = None, None
            try:
                reply = await execute(cmd)
            except BaseException as exc:  # noqa: BLE001 - thrown into the loop, which decides
                error = exc

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.leave(self._member)


class DeadLetters:
    """The async twin of ``arrival.DeadLetters``."""

    def __init__(self, engine: Engine, queue: str) -> None:
        self._engine = engine
        self.queue = queue

    async def list(self, limit: int | None = None) -> builtins.list[DeadMessage]:
        await _committed(self._engine.flush())
        return self._engine.dead_letters(self.queue, limit)

    async def replay(
        self,
        where: Callable[[DeadMessage], bool] | None = None,
        *,
        limit: int | None = None,
        dry_run: bool = False,
    ) -> builtins.list[DeadMessage]:
        await _committed(self._engine.flush())
        chosen, ticket = self._engine.replay_dead_letters(
            self.queue, where, limit=limit, dry_run=dry_run
        )
        if ticket is not None:
            await _committed(ticket)
        return chosen

    async def purge(self, where: Callable[[DeadMessage], bool] | None = None) -> int:
        await _committed(self._engine.flush())
        return await asyncio.to_thread(self._engine.purge_dead_letters, self.queue, where)


class Router:
    """The async twin of ``arrival.Router``: ``route`` and ``consumer`` are awaited too,
    since they may declare the queue."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._r = _Routes()
        self._producer = broker.producer()

    def __repr__(self) -> str:
        return f"<arrival.aio.Router {len(self._r.routes)} routes>"

    @property
    def routes(self) -> dict[str, Route]:
        return dict(self._r.routes)

    async def route(
        self,
        message_type: str | type,
        queue: str,
        guarantee: str | Guarantee | None = None,
        *,
        requires: str | Guarantee | None = None,
        **queue_options: Any,
    ) -> Route:
        exists = queue in await self._broker.queues()
        existing = self._broker.engine.spec(queue).guarantee if exists else None
        r = self._r.declare(message_type, queue, guarantee, requires, queue_options, existing)
        if exists:
            await self._broker.create_queue(queue, r.guarantee.value, **queue_options)
            self._r.created.add(queue)
        self._r.routes[r.type_name] = r
        return r

    def route_for(self, message_type: str | type) -> Route:
        return self._r.route_for(message_type)

    async def _queue(self, r: Route) -> str:
        if r.queue not in self._r.created:
            await self._broker.create_queue(r.queue, r.guarantee.value, **r.options)
            self._r.created.add(r.queue)
        return r.queue

    async def send(
        self,
        message: str | type | msgspec.Struct,
        body: bytes | None = None,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
    ) -> int | None:
        r, data, h = self._r.encode(message, body, headers)
        return await self._producer.send(await self._queue(r), data, key=key, headers=h, id=id)

    async def consumer(
        self,
        message_type: str | type,
        group: str = "default",
        *,
        requires: str | Guarantee | None = None,
        start: str = "earliest",
    ) -> Consumer:
        r = self.route_for(message_type)
        self._r.check_consumer(r, requires)
        return self._broker.consumer(await self._queue(r), group, start=start)
