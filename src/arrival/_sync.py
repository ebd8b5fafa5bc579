"""The blocking API: ``arrival.connect()`` and what it returns. ``arrival.aio`` is its twin."""

from __future__ import annotations

import builtins
import contextlib
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from arrival._backend import Backend, LocalBackend
from arrival._clock import Clock
from arrival._common import (
    DEFAULT_TRANSACTION_TIMEOUT_S,
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
from arrival._pending import drive
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
    QueueDescription,
    QueueSpec,
    QueueStats,
    StoredMessage,
)
from arrival.semantics.spec import UNSET
from arrival.storage.base import Storage

__all__ = [
    "Broker",
    "Consumer",
    "DeadLetters",
    "Message",
    "ProcessResult",
    "Producer",
    "Transaction",
    "connect",
]


def connect(
    url: str | os.PathLike[str] | Storage | None = None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    producer_horizon: float | None = None,
    token: str | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    reconnect: float = 30.0,
) -> Broker:
    """Open a broker: a directory path (durable, embedded), ``"memory:"`` (for tests),
    a Storage, or a server: ``"arrival://host:port"`` (``"arrivals://"`` for TLS).
    Without ``url``, ``$ARRIVAL_URL`` or ``./data``.

    ``producer_horizon``: seconds an idempotent producer's state is kept after its last
    send (default 7 days); a retry after that raises ``DedupHorizonPassed``.
    ``token`` (default ``$ARRIVAL_TOKEN``) authenticates to a server that requires one;
    ``tls_ca``: a CA file to verify the server's certificate by (default: the system's).
    ``reconnect``: seconds a network client keeps reconnecting after the connection
    drops (0: don't); meanwhile calls wait, and durable sends in flight are sent again
    with their producer sequence, so they are stored once.
    ``clock`` and ``rng`` replace the system clock and randomness (tests only).
    """
    nats = nats_url(url)
    if nats is not None:
        extra = clock is not None or rng is not None or producer_horizon is not None
        return Broker(nats_backend(nats, reconnect=reconnect, token=token, extra=extra))
    remote = remote_url(url)
    if remote is not None:
        from arrival.client import SyncClient

        if clock is not None or rng is not None or producer_horizon is not None:
            raise UsageError("clock, rng and producer_horizon are set on the server")
        return Broker(SyncClient.open(remote, token=token, tls_ca=tls_ca, reconnect=reconnect))
    return Broker(local_backend(url, clock=clock, rng=rng, producer_horizon=producer_horizon))


class Broker:
    """A connection to a broker. Close it (or use ``with``) to release leases and flush."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self.url = backend.url

    def __repr__(self) -> str:
        return f"<arrival.Broker {self.url!r} {'closed' if self._b.closed else 'open'}>"

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

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
        dedup: bool = UNSET,
        dedup_window: float = UNSET,
    ) -> QueueSpec:
        """Declare a queue and its guarantee: ``"at-most-once"``, ``"at-least-once"`` or
        ``"exactly-once"``. Declaring it again with the same settings is a no-op; with
        other settings it raises QueueSpecConflict naming each difference.

        at-least-once: ``ack_timeout`` (s, lease length), ``max_deliveries`` (failed
        attempts before dead-lettering; None = unlimited), ``dead_letter`` (queue name,
        default ``NAME.dlq``), ``backoff`` (``arrival.Backoff``), ``retention`` (s to keep
        messages after every group acked them), ``dedup`` (a send whose id is already
        stored is not stored again; always on for exactly-once), ``dedup_window`` (s to
        remember ids, at least; default 7 days).
        exactly-once: as at-least-once, plus idempotent sends, confirmed acks and
        transactions (``broker.transaction``).
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
            "dedup": dedup,
            "dedup_window": dedup_window,
        }
        return self._b.create_queue(queue_spec(name, guarantee, options)).wait()

    def describe(self, queue: str) -> QueueDescription:
        """What ``queue`` promises, by which mechanism, and its limits right now."""
        return self._b.describe(queue).wait()

    def queues(self) -> list[str]:
        return self._b.queue_names().wait()

    def peek(self, queue: str, limit: int = 10, *, start: int | None = None) -> list[StoredMessage]:
        """Retained messages of ``queue`` from offset ``start`` (default: the oldest),
        read without consuming them."""
        return self._b.peek(queue, limit, start).wait()

    def info(self) -> BrokerStats:
        """The broker's own counters: commits and fsyncs since it opened."""
        return self._b.info().wait()

    def stats(self, queue: str) -> QueueStats:
        return self._b.stats(queue).wait()

    def producer(self, id: str | None = None) -> Producer:  # noqa: A002 - like Envelope.id
        """A producer. With an ``id``, its sends to durable queues are idempotent: each
        carries the id, an epoch and a sequence number, so a retried send is never stored
        twice, and opening the same id again fences the earlier holder (its next send
        raises ProducerFenced). The broker keeps a named producer's state for the
        producer horizon (7 days) after its last send. On exactly-once queues, message
        ids deduplicate sends from any producer."""
        return Producer(self._b, id)

    def transaction(
        self, transactional_id: str, *, timeout: float = DEFAULT_TRANSACTION_TIMEOUT_S
    ) -> Transaction:
        """Begin a transaction: its sends (to any queues) and acks (of messages from any
        queues) take effect together at commit, or not at all on an exception, ``abort()``,
        a crash or after ``timeout`` seconds. Use it as ``with broker.transaction(...) as
        tx:``, which commits on success and aborts on an exception.

        Opening ``transactional_id`` again fences the earlier holder: its commit raises
        ProducerFenced and nothing of it becomes visible."""
        return Transaction(self._b, transactional_id, timeout)

    def consumer(self, queue: str, group: str = "default", *, start: str = "earliest") -> Consumer:
        """Join consumer ``group`` of ``queue``. A new group starts at the oldest retained
        message (``start="latest"``: only messages sent from now on)."""
        return Consumer(self._b, queue, group, start)

    def dead_letters(self, queue: str) -> DeadLetters:
        """The dead-letter queue of ``queue``: list, replay and purge."""
        self._b.spec(queue).wait()
        return DeadLetters(self._b, queue)

    def close(self) -> None:
        """Release every lease without spending attempts, flush, and close the store
        (or the connection)."""
        self._b.close().wait()


class Producer:
    """Sends messages. On durable queues ``send`` returns once the message is fsynced (and a
    producer with an id sends idempotently); on at-most-once queues it returns at once
    (fire and forget)."""

    def __init__(self, backend: Backend, producer_id: str | None = None) -> None:
        self._core = ProducerCore(backend, producer_id)
        drive(self._core.registered())  # the older holder is fenced once this returns
        self._closed = False

    def __repr__(self) -> str:
        return f"<arrival.Producer {self.id!r} {'closed' if self._closed else 'open'}>"

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def id(self) -> str | None:
        """The producer's id; None for an anonymous producer."""
        return self._core.id

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
        """Send one message; returns its offset (None on at-most-once queues). On a queue
        with dedup, a message whose ``id`` is stored already is not stored again and the
        original's offset is returned."""
        if self._closed:
            raise ClosedError("the producer")
        return drive(self._core.send(queue, [to_send(body, key, headers, id)]), timeout)

    def send_batch(
        self, queue: str, messages: Iterable[bytes | Any], *, timeout: float | None = None
    ) -> int | None:
        """Send many messages (bytes or ``arrival.Envelope``) with one commit; returns the
        first offset. All are stored, in order, or none is."""
        if self._closed:
            raise ClosedError("the producer")
        items = list(messages)
        if all(type(m) is bytes for m in items):  # the fast path: bodies only
            return drive(self._core.send(queue, None, items), timeout)
        return drive(self._core.send(queue, batch_to_send(items)), timeout)

    def close(self) -> None:
        self._closed = True


class Transaction:
    """Sends and acks that take effect together at ``commit()``, or not at all.

    Nothing is visible to any consumer before the commit is durable. The acked messages
    must still be leased at commit: if a lease expired meanwhile the whole transaction is
    refused (LeaseExpired), since another consumer may be processing the message."""

    def __init__(self, backend: Backend, tid: str, timeout: float) -> None:
        self._core = TransactionCore(backend, tid, timeout)
        drive(self._core.begun())  # the older holder is fenced once this returns

    def __repr__(self) -> str:
        return repr(self._core)

    @property
    def id(self) -> str:
        return self._core.id

    @property
    def state(self) -> str:
        """``open``, ``committing``, ``committed``, ``aborted``, or ``unknown`` (over the
        network: the connection dropped while the commit was in flight, and the answer
        could not be had after the reconnect)."""
        return self._core.state

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: object) -> None:
        if t is None:
            if self._core.state == "open":
                self.commit()
        else:
            self.abort()

    def send(
        self,
        queue: str,
        body: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
        source: MessageBase | None = None,
    ) -> None:
        """Send at commit. Without ``id``, an output of ``source`` (or of the one message
        this transaction acks) gets the id ``<input id>/<n>``: the same on every retry."""
        self._core.check_open()
        drive(self._core.prepare([queue]))
        self._core.add(queue, [to_send(body, key, headers, id)], source)

    def send_batch(
        self, queue: str, messages: Iterable[bytes | Any], *, source: MessageBase | None = None
    ) -> None:
        self._core.check_open()
        drive(self._core.prepare([queue]))
        self._core.add(queue, batch_to_send(list(messages)), source)

    def ack(self, msg: MessageBase) -> None:
        """Ack ``msg`` at commit, atomically with this transaction's sends."""
        self._core.ack(msg)

    def commit(self, timeout: float | None = None) -> None:
        """Make every send and ack take effect, durably; returns once fsynced. Raises
        (and nothing took effect) if the transaction was fenced, timed out, or an acked
        message's lease is no longer held. Over the network, BrokerUnreachable means the
        outcome is unknown (the state says ``unknown``)."""
        pending = self._core.submit()
        try:
            pending.wait(timeout)
        except TimeoutError:
            raise  # not known yet: the commit may still complete (the state says so)
        except BrokerUnreachable:
            self._core.state = "unknown"
            raise
        except BaseException:
            self._core.finished(False)
            raise
        self._core.finished(True)

    def abort(self) -> None:
        """Discard the transaction: nothing of it takes effect; its acked messages are
        redelivered when their leases end (release them to hand them back sooner)."""
        ended = self._core.abort()
        if ended is not None:
            ended.wait()


class Outputs(OutputsBase):
    """What a handler of ``Consumer.process`` sends with: outputs of the message it is
    given, committed with that message's ack, with deterministic ids."""

    __slots__ = ()

    def send(
        self,
        queue: str,
        body: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
    ) -> None:
        """Send ``body`` to ``queue`` when this message's transaction commits."""
        self._add(queue, body, key, headers, id)


class Message(MessageBase):
    """A delivered message. Settle it once: ``ack()``, ``nack()`` or ``reject()``."""

    __slots__ = ()

    def ack(self) -> None:
        """Processed: the group will not get this message again. Raises LeaseExpired if the
        lease ran out first (the message is then redelivered). On an exactly-once queue it
        returns once the ack is durable: the group never gets the message again. On an
        at-most-once queue it does nothing: the message was processed when handed out."""
        if self.lease_deadline == 0.0:
            return
        self._backend.ack(self._member, self._epoch, ((self.offset, self.attempt),)).wait()

    def nack(self, delay: float | None = None, *, error: str | None = None) -> None:
        """Failed: redeliver after ``delay`` seconds (default: the queue's backoff). After
        ``max_deliveries`` failures the message moves to the dead-letter queue."""
        b = self._backend
        b.nack(self._member, self._epoch, self.offset, self.attempt, delay, error).wait()

    def reject(self, reason: str) -> None:
        """Give up on this message now: it moves to the dead-letter queue with ``reason``."""
        b = self._backend
        b.reject(self._member, self._epoch, self.offset, self.attempt, reason).wait()

    def extend(self, seconds: float | None = None) -> None:
        """Hold the lease ``seconds`` longer from now (default: the queue's ack_timeout)."""
        b = self._backend
        p = b.extend(self._member, self._epoch, self.offset, self.attempt, seconds)
        self.lease_deadline = p.wait()

    def release(self) -> None:
        """Give the message back unprocessed, without spending an attempt."""
        self._backend.release(self._member, self._epoch, self.offset, self.attempt).wait()


class Consumer:
    """A member of a consumer group. ``receive()`` one message, ``receive_batch()`` many,
    or iterate. Closing releases held messages without spending their attempts."""

    def __init__(self, backend: Backend, queue: str, group: str, start: str) -> None:
        if start not in ("earliest", "latest"):
            raise UsageError(f"start must be 'earliest' or 'latest', not {start!r}")
        self._b = backend
        self.queue = queue
        self.group = group
        self._member = backend.join(queue, group, start == "latest").wait()
        self._ctx = MessageContext(backend, self._member, queue, group)
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
        return self._b.member_stats(self._member).wait()

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (None: forever); None if
        nothing arrived in time."""
        got = self.receive_batch(1, timeout)
        return got[0] if got else None

    def receive_batch(self, max_messages: int = 100, timeout: float | None = None) -> list[Message]:
        """Up to ``max_messages`` messages, as soon as at least one is there; [] on timeout."""
        if max_messages < 1:
            raise UsageError("max_messages must be at least 1")
        if self._closed:
            raise ClosedError("the consumer")
        got = self._b.receive(self._member, max_messages, timeout).wait()
        ctx = self._ctx
        if ctx.epoch != self._b.epoch:  # delivered by a restarted server: its receipts
            ctx = self._ctx = MessageContext(self._b, self._member, self.queue, self.group)
        return [Message(ctx, off, att, dl, rec) for off, att, dl, rec in got]

    def __iter__(self) -> Iterator[Message]:
        """Messages as they arrive, until the consumer or broker is closed."""
        while not self._closed and not self._b.closed:
            try:
                msg = self.receive(timeout=1.0)
            except ClosedError:
                return
            if msg is not None:
                yield msg

    def ack_batch(self, messages: Iterable[Message]) -> None:
        """Ack many messages of this consumer at once."""
        msgs = list(messages)
        if msgs and msgs[0].lease_deadline != 0.0:  # 0: at-most-once, where acks are no-ops
            receipts = [(m.offset, m.attempt) for m in msgs]
            self._b.ack(self._member, msgs[0]._epoch, receipts).wait()

    def process(
        self,
        handler: Callable[[Message, Outputs], None],
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
    ) -> ProcessResult:
        """Consume in transactions: exactly-once consume-transform-produce.

        ``handler(msg, out)`` handles one message and sends its outputs with
        ``out.send(queue, body, ...)``. Outputs and acks commit together once a transaction
        holds ``batch`` messages, no more input is waiting, or ``interval`` seconds
        passed since it opened (whichever comes first); ``batch=1`` commits each message
        on its own. An output without
        an id gets ``<input id>/<n>``, the same on every retry.

        When the handler raises, that message's outputs are discarded and it is nacked
        (it is retried with backoff, then dead-lettered); the rest of the batch commits.
        When a commit is refused because a lease expired or the transaction timed out,
        nothing of it took effect and its messages come back. ProducerFenced stops the
        loop: a newer holder of ``transactional_id`` took over.

        Runs until ``limit`` messages were handled, no message came for ``idle`` seconds,
        ``stop()`` returns True, or the consumer is closed. ``on_commit(messages)`` is
        called after each commit with the input messages it made final.
        ``on_error(msg, exc)``, when given, decides for a failed message: it returns
        ``(delay, dead_letter)`` — nack after ``delay`` seconds (None: the queue's
        backoff), or dead-letter it at once — or None to release it without spending an
        attempt. Returns what it did.
        """
        check_arguments(batch, interval, timeout)
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

        def execute(cmd: Command) -> Any:
            if type(cmd) is Receive:
                try:
                    return self.receive_batch(cmd.want, timeout=cmd.wait)
                except ClosedError:
                    return None
            if type(cmd) is Handle:
                errors: list[Exception | None] = []
                for msg, out in zip(cmd.msgs, cmd.outs, strict=True):
                    try:
                        handler(msg, out)
                        prepare = out._prepare()
                        if prepare is not None:
                            drive(prepare)
                        out._flush()  # all of its outputs, or (refused) none
                    except Exception as exc:  # noqa: BLE001 - the handler's failure is data
                        errors.append(exc)
                    else:
                        errors.append(None)
                return errors
            elif type(cmd) is Nack:
                with contextlib.suppress(LeaseExpired):  # it is redelivered anyway
                    if cmd.dead_letter:
                        cmd.msg.reject(cmd.error)
                    else:
                        cmd.msg.nack(cmd.delay, error=cmd.error)
            elif type(cmd) is Release:
                with contextlib.suppress(ReceiptError):
                    cmd.msg.release()
            elif type(cmd) is Wait:
                return cmd.pending.wait()
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
                reply = execute(cmd)
            except BaseException as exc:  # noqa: BLE001 - thrown into the loop, which decides
                error = exc

    def close(self) -> None:
        """Leave the group; messages still held go back to it without spending attempts."""
        if not self._closed:
            self._closed = True
            self._b.leave(self._member).wait()


class DeadLetters:
    """The dead-letter queue of one queue: each entry carries its provenance."""

    def __init__(self, backend: Backend, queue: str) -> None:
        self._b = backend
        self.queue = queue

    def __repr__(self) -> str:
        return f"<arrival.DeadLetters of {self.queue!r}>"

    def list(self, limit: int | None = None) -> builtins.list[DeadMessage]:
        """The dead letters, oldest first, including those moved there just now."""
        return self._b.dead_letters(self.queue, limit).wait()

    def replay(
        self,
        where: Callable[[DeadMessage], bool] | None = None,
        *,
        limit: int | None = None,
        dry_run: bool = False,
        max_replays: int | None = DEFAULT_MAX_REPLAYS,
        rate: float | None = None,
        progress: Progress | None = None,
    ) -> Replayed:
        """Send dead letters (all, or those ``where`` selects, at most ``limit``) back to
        the group that failed them, with a fresh attempt budget, and remove them from the
        dead-letter queue. Returns the letters replayed, as a list.

        The loop guard: a letter already replayed ``max_replays`` times (its ``replays``)
        is not replayed but quarantined: it stays, with ``quarantined`` set, and the
        result's ``.quarantined`` lists it. A higher ``max_replays`` (None: no guard)
        replays it anyway; ``purge`` removes it.

        ``rate`` (letters/s) paces the replay: the letters chosen now go back in small
        chunks, each its own commit, so the consumers are not flooded; this call blocks
        until the last chunk and ``progress(result_so_far, total)`` runs after each.
        Without it, all go back in one commit. ``dry_run`` changes nothing and returns
        what would be replayed, and in ``.quarantined`` what the guard would keep."""
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
        return drive(steps)

    def purge(self, where: Callable[[DeadMessage], bool] | None = None) -> int:
        """Delete dead letters (all, or those ``where`` selects); returns how many."""
        return self._b.purge_dead_letters(self.queue, where).wait()
