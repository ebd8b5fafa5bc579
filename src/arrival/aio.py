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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import msgspec

from arrival._backend import Backend, LocalBackend
from arrival._clock import Clock
from arrival._common import (
    DEFAULT_TRANSACTION_TIMEOUT_S,
    Envelope,
    MessageBase,
    MessageContext,
    ProducerCore,
    TransactionCore,
    batch_to_send,
    local_backend,
    nats_backend,
    nats_url,
    queue_spec,
    remote_url,
    to_send,
)
from arrival._pending import Pending, adrive
from arrival._process import (
    Command,
    Failure,
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
from arrival._replay import DEFAULT_MAX_REPLAYS, Progress, Replayed, replay_steps
from arrival.engine import DeadMessage, Engine
from arrival.errors import (
    BrokerUnreachable,
    ClosedError,
    LeaseExpired,
    NotSupported,
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


async def connect(
    url: str | os.PathLike[str] | Storage | None = None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    producer_horizon: float | None = None,
    token: str | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    reconnect: float = 30.0,
) -> Broker:
    """Open a broker; see ``arrival.connect``."""
    nats = nats_url(url)
    if nats is not None:
        extra = clock is not None or rng is not None or producer_horizon is not None
        return Broker(
            await asyncio.to_thread(
                nats_backend, nats, reconnect=reconnect, token=token, extra=extra
            )
        )
    remote = remote_url(url)
    if remote is not None:
        from arrival.client import AsyncClient

        if clock is not None or rng is not None or producer_horizon is not None:
            raise UsageError("clock, rng and producer_horizon are set on the server")
        return Broker(
            await AsyncClient.open(remote, token=token, tls_ca=tls_ca, reconnect=reconnect)
        )
    return Broker(local_backend(url, clock=clock, rng=rng, producer_horizon=producer_horizon))


def _now_or_later(p: Pending[Any]) -> Any:
    """The result if it is there already (raising its error); else None, for later."""
    return p.wait() if p.done() else None


class Broker:
    """The async twin of ``arrival.Broker``."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self.url = backend.url

    def __repr__(self) -> str:
        return f"<arrival.aio.Broker {self.url!r} {'closed' if self._b.closed else 'open'}>"

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once closed (or, over the network, once the connection is lost)."""
        return self._b.closed

    @property
    def engine(self) -> Engine:
        """The embedded engine (for tests and tools); NotSupported over the network."""
        if not isinstance(self._b, LocalBackend):
            where = "NATS JetStream" if self.url.startswith("nats://") else "a server"
            raise NotSupported(f"{self.url!r} is {where}: its engine runs in its process")
        return self._b.engine

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
        return await self._b.create_queue(queue_spec(name, guarantee, options))

    async def describe(self, queue: str) -> QueueDescription:
        return await self._b.describe(queue)

    async def queues(self) -> list[str]:
        return await self._b.queue_names()

    async def peek(
        self, queue: str, limit: int = 10, *, start: int | None = None
    ) -> list[StoredMessage]:
        """Retained messages of ``queue`` from offset ``start`` (default: the oldest),
        read without consuming them."""
        return await self._b.peek(queue, limit, start)

    async def info(self) -> BrokerStats:
        """The broker's own counters: commits and fsyncs since it opened."""
        return await self._b.info()

    async def stats(self, queue: str) -> QueueStats:
        return await self._b.stats(queue)

    def producer(self, id: str | None = None) -> Producer:  # noqa: A002 - like Envelope.id
        """See ``arrival.Broker.producer``. A named producer's registration (which fences
        an older holder) starts now and completes before its first send."""
        return Producer(self._b, id)

    def transaction(
        self, transactional_id: str, *, timeout: float = DEFAULT_TRANSACTION_TIMEOUT_S
    ) -> Transaction:
        """See ``arrival.Broker.transaction``; use it as ``async with``."""
        return Transaction(self._b, transactional_id, timeout)

    def consumer(self, queue: str, group: str = "default", *, start: str = "earliest") -> Consumer:
        return Consumer(self._b, queue, group, start)

    def dead_letters(self, queue: str) -> DeadLetters:
        _now_or_later(self._b.spec(queue))  # an unknown queue raises now when it can
        return DeadLetters(self._b, queue)

    async def close(self) -> None:
        await self._b.close()
        await asyncio.sleep(0)  # a network client's transport closes its socket


class Producer:
    """The async twin of ``arrival.Producer``: concurrent sends share one fsync."""

    def __init__(self, backend: Backend, producer_id: str | None = None) -> None:
        self._core = ProducerCore(backend, producer_id)
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
        return await adrive(self._core.send(queue, [to_send(body, key, headers, id)]))

    async def send_batch(self, queue: str, messages: Iterable[bytes | Any]) -> int | None:
        if self._closed:
            raise ClosedError("the producer")
        items = list(messages)
        if all(type(m) is bytes for m in items):  # the fast path: bodies only
            return await adrive(self._core.send(queue, None, items))
        return await adrive(self._core.send(queue, batch_to_send(items)))

    async def close(self) -> None:
        self._closed = True


class Transaction:
    """The async twin of ``arrival.Transaction``; use it as ``async with``."""

    def __init__(self, backend: Backend, tid: str, timeout: float) -> None:
        self._core = TransactionCore(backend, tid, timeout)
        if self._core.beginning is not None and self._core.beginning.done():
            self._core.epoch = self._core.beginning.wait()  # fenced at once when it can be
            self._core.beginning = None

    def __repr__(self) -> str:
        return repr(self._core)

    @property
    def id(self) -> str:
        return self._core.id

    @property
    def state(self) -> str:
        return self._core.state

    async def __aenter__(self) -> Transaction:
        await adrive(self._core.begun())
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
        self._core.check_open()
        await adrive(self._core.prepare([queue]))
        self._core.add(queue, [to_send(body, key, headers, id)], source)

    async def send_batch(
        self, queue: str, messages: Iterable[bytes | Any], *, source: MessageBase | None = None
    ) -> None:
        self._core.check_open()
        await adrive(self._core.prepare([queue]))
        self._core.add(queue, batch_to_send(list(messages)), source)

    async def ack(self, msg: MessageBase) -> None:
        self._core.ack(msg)

    async def commit(self) -> None:
        self._core.check_open()
        await adrive(self._core.begun())
        pending = self._core.submit()
        try:
            await pending
        except BrokerUnreachable:
            self._core.state = "unknown"  # over the network: the outcome is not known
            raise
        except BaseException:
            self._core.finished(False)
            raise
        self._core.finished(True)

    async def abort(self) -> None:
        ended = self._core.abort()
        if ended is not None:
            await ended


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
        self._add(queue, body, key, headers, id)


class Message(MessageBase):
    """The async twin of ``arrival.Message``."""

    __slots__ = ()

    async def ack(self) -> None:
        if self.lease_deadline == 0.0:  # at-most-once: processed when handed out
            return
        await self._backend.ack(self._member, self._epoch, ((self.offset, self.attempt),))

    async def nack(self, delay: float | None = None, *, error: str | None = None) -> None:
        b = self._backend
        await b.nack(self._member, self._epoch, self.offset, self.attempt, delay, error)

    async def reject(self, reason: str) -> None:
        b = self._backend
        await b.reject(self._member, self._epoch, self.offset, self.attempt, reason)

    async def extend(self, seconds: float | None = None) -> None:
        b = self._backend
        self.lease_deadline = await b.extend(
            self._member, self._epoch, self.offset, self.attempt, seconds
        )

    async def release(self) -> None:
        await self._backend.release(self._member, self._epoch, self.offset, self.attempt)


class Consumer:
    """The async twin of ``arrival.Consumer``; iterate it with ``async for``."""

    def __init__(self, backend: Backend, queue: str, group: str, start: str) -> None:
        if start not in ("earliest", "latest"):
            raise UsageError(f"start must be 'earliest' or 'latest', not {start!r}")
        self._b = backend
        self.queue = queue
        self.group = group
        # joining starts now; over the network it completes by the first receive
        self._joining: Pending[int] | None = backend.join(queue, group, start == "latest")
        self._member = -1
        self._ctx: MessageContext | None = None
        self._closed = False
        if self._joining.done():
            self._joined(self._joining.wait())

    def _joined(self, member: int) -> MessageContext:
        self._joining = None
        self._member = member
        self._ctx = MessageContext(self._b, member, self.queue, self.group)
        return self._ctx

    async def _context(self) -> MessageContext:
        if self._ctx is not None:
            return self._ctx
        assert self._joining is not None
        return self._joined(await self._joining)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<arrival.aio.Consumer {self.queue}/{self.group} member={self._member} {state}>"

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stats(self) -> ConsumerStats:
        """This consumer's counters and how many messages it holds now."""
        await self._context()
        return await self._b.member_stats(self._member)

    async def receive(self, timeout: float | None = None) -> Message | None:
        got = await self.receive_batch(1, timeout)
        return got[0] if got else None

    async def receive_batch(
        self, max_messages: int = 100, timeout: float | None = None
    ) -> list[Message]:
        if max_messages < 1:
            raise UsageError("max_messages must be at least 1")
        if self._closed:
            raise ClosedError("the consumer")
        ctx = await self._context()
        got = await self._b.receive(ctx.member, max_messages, timeout)
        if ctx.epoch != self._b.epoch:  # delivered by a restarted server: its receipts
            ctx = self._ctx = MessageContext(self._b, ctx.member, self.queue, self.group)
        return [Message(ctx, off, att, dl, rec) for off, att, dl, rec in got]

    async def __aiter__(self) -> AsyncIterator[Message]:
        while not self._closed and not self._b.closed:
            try:
                msg = await self.receive(timeout=1.0)
            except ClosedError:
                return
            if msg is not None:
                yield msg

    async def ack_batch(self, messages: Iterable[Message]) -> None:
        msgs = list(messages)
        if msgs and msgs[0].lease_deadline != 0.0:  # 0: at-most-once, where acks are no-ops
            receipts = [(m.offset, m.attempt) for m in msgs]
            await self._b.ack(self._member, msgs[0]._epoch, receipts)

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
        on_error: Callable[[Message, Exception], Failure | None] | None = None,
        handle_many: Callable[[list[Message], list[Outputs]], Awaitable[list[Exception | None]]]
        | None = None,
    ) -> ProcessResult:
        """See ``arrival.Consumer.process``; ``handler`` may be sync or async.

        ``handle_many(msgs, outs)``, when given, is called instead of ``handler`` with the
        messages of one receive (each with its outputs) and returns, for each, None or the
        exception its handling raised: the worker runtime hands a sync handler several
        messages per thread hop so."""
        check_arguments(batch, interval, timeout)
        await self._context()
        gen = steps(
            self._b,
            Outputs,
            transactional_id=transactional_id,
            batch=batch,
            interval=interval,
            timeout=timeout,
            limit=limit,
            idle=idle,
            stop=stop,
            on_commit=on_commit,
            on_error=on_error,
        )

        async def execute(cmd: Command) -> Any:
            if type(cmd) is Receive:
                try:
                    return await self.receive_batch(cmd.want, timeout=cmd.wait)
                except ClosedError:
                    return None
            if type(cmd) is Handle:
                errors: list[Exception | None] = []
                outcomes = None if handle_many is None else await handle_many(cmd.msgs, cmd.outs)
                for i, (msg, out) in enumerate(zip(cmd.msgs, cmd.outs, strict=True)):
                    try:
                        if outcomes is None:
                            r = handler(msg, out)
                            if asyncio.iscoroutine(r):
                                await r
                        elif outcomes[i] is not None:
                            raise outcomes[i]  # type: ignore[misc]
                        prepare = out._prepare()
                        if prepare is not None:
                            await adrive(prepare)
                        out._flush()  # all of its outputs, or (refused) none
                    except Exception as exc:  # noqa: BLE001 - the handler's failure is data
                        errors.append(exc)
                    else:
                        errors.append(None)
                return errors
            elif type(cmd) is Nack:
                with contextlib.suppress(LeaseExpired):  # it is redelivered anyway
                    if cmd.dead_letter:
                        await cmd.msg.reject(cmd.error)
                    else:
                        await cmd.msg.nack(cmd.delay, error=cmd.error)
            elif type(cmd) is Release:
                with contextlib.suppress(ReceiptError):
                    await cmd.msg.release()
            elif type(cmd) is Wait:
                return await cmd.pending
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
            if self._joining is not None:
                with contextlib.suppress(Exception):  # a failed join has nothing to leave
                    await self._context()
            if self._ctx is not None:
                await self._b.leave(self._member)


class DeadLetters:
    """The async twin of ``arrival.DeadLetters``."""

    def __init__(self, backend: Backend, queue: str) -> None:
        self._b = backend
        self.queue = queue

    def __repr__(self) -> str:
        return f"<arrival.aio.DeadLetters of {self.queue!r}>"

    async def list(self, limit: int | None = None) -> builtins.list[DeadMessage]:
        return await self._b.dead_letters(self.queue, limit)

    async def replay(
        self,
        where: Callable[[DeadMessage], bool] | None = None,
        *,
        limit: int | None = None,
        dry_run: bool = False,
        max_replays: int | None = DEFAULT_MAX_REPLAYS,
        rate: float | None = None,
        progress: Progress | None = None,
    ) -> Replayed:
        """As ``arrival.DeadLetters.replay``; a paced replay awaits ``asyncio.sleep``
        between its chunks."""
        steps = replay_steps(
            self._b,
            self.queue,
            where,
            limit=limit,
            dry_run=dry_run,
            max_replays=max_replays,
            rate=rate,
            progress=progress,
        )
        return await adrive(steps)

    async def purge(self, where: Callable[[DeadMessage], bool] | None = None) -> int:
        return await self._b.purge_dead_letters(self.queue, where)


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
        existing = (await self._broker._b.spec(queue)).guarantee if exists else None
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
