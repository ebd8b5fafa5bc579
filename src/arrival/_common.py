"""What the sync and async APIs share: opening a backend, checking arguments, messages.

The two APIs differ only in how they wait; every decision is made by the engine.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from arrival import tracing
from arrival._backend import Backend, LocalBackend
from arrival._clock import Clock
from arrival._codec import RecordTuple
from arrival._pending import Future, Pending, Steps
from arrival.engine import Engine, Send, TxnAcks, check_size
from arrival.errors import (
    DedupHorizonPassed,
    MessageTooLarge,
    ProducerFenced,
    SequenceError,
    TransactionError,
    UsageError,
)
from arrival.model import Guarantee, QueueSpec
from arrival.semantics.spec import UNSET, resolve_spec
from arrival.storage.base import Storage
from arrival.storage.memory import MemoryStorage
from arrival.tracing import ENABLED as TRACING

__all__ = [
    "Envelope",
    "MessageBase",
    "MessageContext",
    "ProducerCore",
    "TransactionCore",
    "open_engine",
    "to_send",
]

DEFAULT_URL = "./data"
DEFAULT_TRANSACTION_TIMEOUT_S = 60.0
MAX_TRANSACTION_BYTES = 64 << 20  # a transaction is held in memory until it commits


def open_engine(
    url: str | os.PathLike[str] | Storage | None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    producer_horizon: float | None = None,
) -> tuple[Engine, str]:
    """Open the backend ``url`` names: ``memory:``, a directory path, or a Storage."""
    if url is None:
        url = os.environ.get("ARRIVAL_URL", DEFAULT_URL)
    options: dict[str, Any] = {"clock": clock, "rng": rng}
    if producer_horizon is not None:
        options["producer_horizon_s"] = producer_horizon
    if not isinstance(url, (str, os.PathLike)):
        return Engine(url, **options), repr(url)
    text = os.fspath(url)
    if text == "memory:":
        return Engine(MemoryStorage(), **options), text
    scheme, sep, _rest = text.partition("://")
    if sep:
        raise UsageError(
            f"can't connect to {text!r}: unknown scheme {scheme!r}; use a directory path, "
            f"'memory:', 'arrival://host:port' or 'nats://host:port'"
        )
    if text.startswith("file:"):
        text = text[len("file:") :]
    from arrival.storage.sqlite import SqliteStorage

    return Engine(SqliteStorage(text), **options), text


def remote_url(url: str | os.PathLike[str] | Storage | None) -> str | None:
    """``url`` (or ``$ARRIVAL_URL``) if it names an arrival server, else None."""
    if url is None:
        url = os.environ.get("ARRIVAL_URL", DEFAULT_URL)
    if isinstance(url, str) and url.startswith(("arrival://", "arrivals://")):
        return url
    return None


def nats_url(url: str | os.PathLike[str] | Storage | None) -> str | None:
    """``url`` (or ``$ARRIVAL_URL``) if it names NATS JetStream servers, else None."""
    if url is None:
        url = os.environ.get("ARRIVAL_URL", DEFAULT_URL)
    if isinstance(url, str) and url.startswith("nats://"):
        return url
    return None


def nats_backend(url: str, *, reconnect: float, token: str | None, extra: bool) -> Backend:
    """The JetStream backend for ``url``; ``extra`` is True if local-only options were
    passed, which JetStream has no use for."""
    if extra:
        raise UsageError("clock, rng and producer_horizon are for embedded brokers")
    from arrival.jetstream import open_backend

    backend = open_backend(url, reconnect=reconnect, token=token)
    assert isinstance(backend, Backend)
    return backend


def local_backend(
    url: str | os.PathLike[str] | Storage | None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    producer_horizon: float | None = None,
) -> LocalBackend:
    engine, where = open_engine(url, clock=clock, rng=rng, producer_horizon=producer_horizon)
    return LocalBackend(engine, where)


def queue_spec(name: str, guarantee: str, options: dict[str, Any]) -> QueueSpec:
    return resolve_spec(name, guarantee, **{k: v for k, v in options.items() if v is not UNSET})


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message to send in a batch: ``producer.send_batch(q, [Envelope(b"..", key="k")])``."""

    body: bytes
    key: str | None = None
    headers: Mapping[str, str] | None = None
    id: str | None = None


def _body(body: object) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        raise TypeError("a message body is bytes: encode the str first, e.g. text.encode()")
    raise TypeError(f"a message body is bytes, not {type(body).__name__}")


def to_send(body: object, key: object, headers: object, mid: object) -> Send:
    """Check one message's fields and return them as the engine takes them."""
    b = _body(body)
    if key is not None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str or None, not {type(key).__name__}")
        _check_text("the key", key)
    if mid is not None:
        if not isinstance(mid, str):
            raise TypeError(f"id must be a str or None, not {type(mid).__name__}")
        _check_text("the id", mid)
    h: dict[str, str] | None = None
    if headers:
        if not isinstance(headers, Mapping):
            raise TypeError("headers must be a mapping of str to str")
        h = {}
        for k, v in headers.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"headers must map str to str; got {k!r}: {v!r}")
            _check_text("a header", k)
            _check_text("a header", v)
            h[k] = v
    return (mid, key, h, b)


def _check_text(what: str, text: str) -> None:
    """Refuse text that can't be stored or sent: a lone surrogate is not UTF-8."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise UsageError(f"{what} {text!r} is not valid Unicode text ({exc.reason})") from None


def batch_to_send(items: object) -> list[Send]:
    out: list[Send] = []
    for item in items:  # type: ignore[attr-defined]
        if isinstance(item, Envelope):
            out.append(to_send(item.body, item.key, item.headers, item.id))
        else:
            out.append((None, None, None, _body(item)))
    return out


class MessageContext:
    """What every message from one consumer shares: one object, not five fields each."""

    __slots__ = ("backend", "epoch", "group", "member", "queue")

    def __init__(self, backend: Backend, member: int, queue: str, group: str) -> None:
        self.backend = backend
        self.member = member
        self.epoch = backend.epoch
        self.queue = queue
        self.group = group


class MessageBase:
    """A delivered message: its content, its attempt and the lease it is held under."""

    __slots__ = ("_ctx", "_rec", "attempt", "lease_deadline", "offset")

    def __init__(
        self, ctx: MessageContext, offset: int, attempt: int, deadline: float, rec: RecordTuple
    ) -> None:
        self._ctx = ctx
        self._rec = rec
        self.offset = offset
        self.attempt = attempt  # 1 on first delivery
        self.lease_deadline = deadline  # engine clock; 0 when there is no lease (at-most-once)

    @property
    def queue(self) -> str:
        return self._ctx.queue

    @property
    def group(self) -> str:
        return self._ctx.group

    @property
    def _backend(self) -> Backend:
        return self._ctx.backend

    @property
    def _member(self) -> int:
        return self._ctx.member

    @property
    def _epoch(self) -> int:
        return self._ctx.epoch

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.queue}/{self.group} offset={self.offset} "
            f"id={self.id!r} key={self.key!r} attempt={self.attempt} {len(self.body)} bytes>"
        )

    @property
    def body(self) -> bytes:
        return self._rec[4]

    @property
    def key(self) -> str | None:
        return self._rec[2]

    @property
    def id(self) -> str:
        """The producer's id for the message, or ``queue:offset`` when it gave none."""
        mid = self._rec[1]
        return mid if mid is not None else f"{self.queue}:{self.offset}"

    @property
    def headers(self) -> dict[str, str]:
        h = self._rec[3]
        return dict(h) if h else {}

    @property
    def timestamp(self) -> float:
        """When the broker accepted the message (seconds since the epoch)."""
        return self._rec[0]

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    @property
    def lease_lost(self) -> bool:
        """True once this delivery's lease expired or was released: another consumer may
        get the message, so skip side effects that must not happen twice."""
        return not self._backend.is_leased(
            self._member, self._epoch, self.offset, self.attempt, self.lease_deadline
        )

    @property
    def receipt(self) -> tuple[str, str, int, int, int]:
        """(queue, group, offset, attempt, broker epoch): what an ack is checked against."""
        return (self.queue, self.group, self.offset, self.attempt, self._epoch)


def check_seconds(what: str, value: object) -> None:
    """Raise UsageError unless ``value`` is a finite number of seconds > 0."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UsageError(f"{what} must be a finite number of seconds > 0, not {value!r}")


class ProducerCore:
    """A producer's identity and sequence numbers, shared by both APIs.

    A producer with an id is idempotent: its durable sends carry (id, epoch, sequence), a
    retry of a stored sequence gets its original result, and opening the id again fences
    the older holder. Sequences reach the backend in the order they are numbered (the
    lock spans numbering and queueing), so threads sharing a producer never make a gap;
    a send is checked (queue, sizes) before it is numbered, so a refused send leaves none
    either. At-most-once sends carry none: they are never retried.

    An anonymous producer sends without sequence numbers. In-process sends have no
    retry path for them to cover, and broker-side state for every short-lived producer
    (one per web request, say) would grow without bound for the state's whole horizon.
    Over the network the client numbers every send itself, so that a send retried after
    a reconnect is never stored twice (``arrival.client``).
    """

    def __init__(self, backend: Backend, producer_id: str | None) -> None:
        self.backend = backend
        self.id = producer_id
        self.epoch = 0
        self.seq = 0
        self._lock = threading.Lock()
        self._specs: dict[str, QueueSpec] = {}
        self._window = backend.send_window()
        self._in_flight = 0
        self._waiting: deque[Future[None]] = deque()
        self._reopening: Future[int] | None = None  # a new epoch being opened
        # registration starts now (fencing any older holder) and is awaited by the first send
        self.registering: Pending[int] | None = None
        if producer_id is not None:
            self.registering = backend.register_producer(producer_id)

    def registered(self) -> Steps[None]:
        if self.registering is not None:
            epoch = yield self.registering
            if self.registering is not None:
                self.epoch, self.registering = epoch, None

    def send(
        self, queue: str, messages: Sequence[Send] | None, bodies: list[bytes] | None = None
    ) -> Steps[int | None]:
        """Steps (``_pending.drive``) that send and return the first offset (None for
        at-most-once queues); traced (``arrival.tracing``) when opentelemetry is installed."""
        if TRACING:  # one check a call, not a message
            return tracing.traced_send(self._send, queue, messages, bodies)
        return self._send(queue, messages, bodies)

    def _send(
        self, queue: str, messages: Sequence[Send] | None, bodies: list[bytes] | None = None
    ) -> Steps[int | None]:
        if not (messages if bodies is None else bodies):
            raise UsageError("send needs at least one message")
        yield from self.registered()
        spec = self._specs.get(queue)
        if spec is None:
            spec = self._specs[queue] = yield self.backend.spec(queue)
        backend = self.backend
        if self.id is None and spec.guarantee is not Guarantee.AT_MOST_ONCE:
            shared = backend.shared_producer()
            if shared is not None:  # over the network: numbered, so a resend is stored once
                offset_: int | None = yield from shared._send(queue, messages, bodies)
                return offset_
        if self._window is not None:
            # a backend that repeats sends (the network client) numbers a send before
            # the broker checks it: refuse an oversized one here, before it takes a
            # number. In process the engine refuses it before the number is counted.
            limit = spec.max_message_bytes
            if bodies is not None:
                if bodies and max(map(len, bodies)) > limit:
                    raise MessageTooLarge(queue, max(map(len, bodies)), limit)
            else:
                assert messages is not None
                for _mid, _key, headers, body in messages:
                    check_size(queue, limit, headers, body)
        if self.id is None or spec.guarantee is Guarantee.AT_MOST_ONCE:
            offset: int | None = yield backend.send(queue, messages, bodies, None)
            return offset
        if self._window is None:
            return (yield from self._numbered(queue, messages, bodies))
        yield from self._acquire()
        try:
            return (yield from self._numbered(queue, messages, bodies))
        finally:
            self._release()

    def _acquire(self) -> Steps[None]:
        """A place among the sends this producer may have unanswered (over the network,
        as many as the broker remembers results for, so that each can be repeated)."""
        with self._lock:
            if self._in_flight < self._window:  # type: ignore[operator]
                self._in_flight += 1
                return
            turn: Future[None] = Future()
            self._waiting.append(turn)
        try:
            yield turn  # a finishing send hands its place over
        except BaseException:
            with self._lock:
                if turn in self._waiting:
                    self._waiting.remove(turn)
                    raise
            self._release()  # the place was handed to us already: pass it on
            raise

    def _release(self) -> None:
        with self._lock:
            turn = self._waiting.popleft() if self._waiting else None
            if turn is None:
                self._in_flight -= 1
        if turn is not None:
            turn.set_result(None)

    def _reopens(self, exc: BaseException, epoch: int) -> bool:
        """Whether a send numbered in ``epoch`` and refused with ``exc`` is sent again in
        a new epoch. It was not stored in each case: the broker forgot the producer (idle
        past its horizon); the broker's sequence is behind ours (sends numbered before
        it never reached the store: they failed, or a crashed broker lost them), and
        without a new epoch every later send would fail the same way; or the new epoch
        this producer opened for that fenced it."""
        if isinstance(exc, ProducerFenced):  # (read without the lock: callers hold it)
            return self.epoch != epoch or self._reopening is not None
        return isinstance(exc, DedupHorizonPassed) or bool(getattr(exc, "gap", False))

    def _numbered(
        self, queue: str, messages: Sequence[Send] | None, bodies: list[bytes] | None
    ) -> Steps[int | None]:
        backend = self.backend
        assert self.id is not None
        for attempt in (1, 2, 3):
            with self._lock:
                epoch = self.epoch
                try:
                    pending = backend.send(queue, messages, bodies, (self.id, epoch, self.seq + 1))
                except (DedupHorizonPassed, SequenceError, ProducerFenced) as exc:
                    # in process the engine refuses at once what a server answers later
                    if attempt == 3 or not self._reopens(exc, epoch):
                        raise
                    pending = None
                else:
                    self.seq += 1
            backend.flush_sends()
            if pending is not None:
                try:
                    first: int | None = yield pending
                    return first
                except (DedupHorizonPassed, SequenceError, ProducerFenced) as exc:
                    if attempt == 3 or not self._reopens(exc, epoch):
                        raise
            if self.epoch != epoch:
                continue  # a new epoch is open already: send again in it
            # idle past the horizon, the broker forgot this producer; or its sequence
            # is behind ours. This send was not stored, so open a new epoch: one for all
            # the sends that found out at once (each its own would fence the others)
            opener = False
            with self._lock:
                if self.epoch == epoch and self._reopening is None:
                    self._reopening, opener = Future(), True
                reopening = self._reopening if self.epoch == epoch else None
            if reopening is None:
                continue
            if not opener:
                yield reopening  # the opener sets the epoch; its failure is ours
                continue
            try:
                new = yield backend.register_producer(self.id)
            except BaseException as exc:
                with self._lock:
                    self._reopening = None
                reopening.set_exception(exc)
                raise
            with self._lock:  # the new epoch and the end of opening it, at once
                if self.epoch == epoch:
                    self.epoch, self.seq = new, 0
                self._reopening = None
            reopening.set_result(new)
        raise AssertionError("unreachable")


class TransactionCore:
    """A transaction's buffered sends and acks, committed by the engine in one write.

    Nothing is sent to the engine before ``commit``: an abort, an exception, a crash or
    a timeout leaves no trace but the fenced epoch.
    """

    def __init__(
        self, backend: Backend, tid: str, timeout: float, epoch: tuple[int, int] | None = None
    ) -> None:
        check_seconds("transaction timeout", timeout)
        self.backend = backend
        self.id = tid
        self.timeout = float(timeout)
        # a processing loop holds one epoch for all its transactions, as Kafka's
        # initTransactions does; a lone transaction opens (and fences with) its own,
        # asked for now and awaited by ``begun()``
        self.keep = epoch is not None
        self.epoch = epoch if epoch is not None else (0, 0)
        self.beginning: Pending[tuple[int, int]] | None = (
            None if epoch is not None else backend.begin_transaction(tid)
        )
        self.started = backend.now()
        self.state = "open"
        self.sends: dict[str, list[tuple[RecordTuple, int]]] = {}  # record, unnamed index
        self.acks: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.inputs: dict[tuple[int, int], MessageBase] = {}  # acked, by (member, offset)
        self.limits: dict[str, int] = {}  # max_message_bytes of each queue sent to
        self.outputs_of: dict[str, int] = {}  # outputs named after each input so far
        self.unnamed = 0  # outputs with neither an id nor a source
        self.nbytes = 0

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.sends.values())
        return f"<Transaction {self.id!r} {self.state} sends={n} acks={len(self.inputs)}>"

    def begun(self) -> Steps[None]:
        if self.beginning is not None:
            epoch = yield self.beginning
            if self.beginning is not None:
                self.epoch, self.beginning = epoch, None

    def prepare(self, queues: Iterable[str]) -> Steps[None]:
        """Look up the limits of ``queues`` (raising UnknownQueue) before ``add_all``."""
        yield from self.begun()
        for queue in queues:
            if queue not in self.limits:
                spec = yield self.backend.spec(queue)
                self.limits[queue] = spec.max_message_bytes

    def check_open(self) -> None:
        if self.state != "open":
            raise TransactionError(
                f"transaction {self.id!r} is {self.state}: open a new one with "
                f"broker.transaction({self.id!r})"
            )

    def add(self, queue: str, messages: Sequence[Send], source: MessageBase | None) -> None:
        """Buffer ``messages`` for ``queue``: checked now, sent at commit."""
        items = [(queue, m) for m in messages]
        if TRACING:  # in the sender's context; before the size check, which counts it
            items = tracing.traced_items(items)
        self.add_all(items, source)

    def add_all(self, items: Sequence[tuple[str, Send]], source: MessageBase | None) -> None:
        """Buffer (queue, message) pairs: all of them, or (on an error) none. The queues'
        limits must be known (``prepare``)."""
        if self.state != "open":
            self.check_open()
        size = 0
        for queue, (_mid, _key, headers, body) in items:
            check_size(queue, self.limits[queue], headers, body)
            size += len(body)
        if self.nbytes + size > MAX_TRANSACTION_BYTES:
            raise TransactionError(
                f"transaction {self.id!r} would hold more than {MAX_TRANSACTION_BYTES} bytes; "
                f"commit in smaller transactions"
            )
        self.nbytes += size
        now = self.backend.now()
        sid = None if source is None else source.id
        for queue, (mid, key, headers, body) in items:
            out = self.sends.get(queue)
            if out is None:
                out = self.sends[queue] = []
            unnamed = -1
            if mid is None:
                if sid is not None:
                    # a deterministic id: the same input and output index on every retry
                    n = self.outputs_of.get(sid, 0)
                    self.outputs_of[sid] = n + 1
                    mid = f"{sid}/{n}"
                else:
                    unnamed = self.unnamed
                    self.unnamed += 1
            out.append(((now, mid, key, headers, body), unnamed))

    def ack(self, msg: MessageBase) -> None:
        if self.state != "open":
            self.check_open()
        if not isinstance(msg, MessageBase):
            raise TypeError(f"tx.ack() takes a received message, not {type(msg).__name__}")
        ctx = msg._ctx
        if ctx.backend is not self.backend:
            raise UsageError("tx.ack() takes messages received from the same broker")
        key = (ctx.member, ctx.epoch)
        receipts = self.acks.get(key)
        if receipts is None:
            receipts = self.acks[key] = []
        receipts.append((msg.offset, msg.attempt))
        self.inputs[(ctx.member, msg.offset)] = msg

    def submit(self) -> Pending[None]:
        """Hand the transaction to the backend; done once it is durable."""
        self.check_open()
        self.state = "committing"
        # with one input, outputs without an id derive theirs from it, as with source=
        sole = next(iter(self.inputs.values())).id if len(self.inputs) == 1 else None
        base = self.outputs_of.get(sole, 0) if sole is not None else 0
        sends: list[tuple[str, list[RecordTuple]]] = []
        for queue, items in self.sends.items():
            records = []
            for r, unnamed in items:
                if unnamed >= 0 and sole is not None:
                    r = (r[0], f"{sole}/{base + unnamed}", r[2], r[3], r[4])
                records.append(r)
            sends.append((queue, records))
        acks: TxnAcks = [(m, e, receipts) for (m, e), receipts in self.acks.items()]
        try:
            pending = self.backend.commit_transaction(
                self.id, self.epoch, self.started, self.timeout, sends, acks, self.keep
            )
        except BaseException:
            self.state = "aborted"
            raise
        self.sends = {}
        self.acks = {}
        return pending

    def finished(self, ok: bool) -> None:
        self.state = "committed" if ok else "aborted"

    def abort(self) -> Pending[None] | None:
        """Discard; returns the backend's end of the transactional id, to wait for."""
        if self.state == "open":
            self.state = "aborted"
            self.sends = {}
            self.acks = {}
            if self.keep:
                return None
            if self.beginning is not None:  # never awaited: end it if we know the epoch
                if not self.beginning.done():
                    return None
                try:
                    self.epoch = self.beginning.wait()
                except Exception:  # noqa: BLE001 - the begin failed: nothing to end
                    return None
                self.beginning = None
            return self.backend.end_transaction(self.id, self.epoch)
        return None
