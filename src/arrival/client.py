"""The network client: ``arrival.connect("arrival://host:port")`` and its asyncio twin.

``RemoteBackend`` turns each backend operation into a ``Request`` on one connection and
returns a ``Future`` that the reply completes, so the public API (``arrival.Broker``,
``arrival.aio.Broker``) runs unchanged over the network. Requests are pipelined: many
may be in flight on one connection (up to the protocol's ``MAX_IN_FLIGHT``; more wait
in a backlog on the client, so a fast producer fills its own memory, not the server's).

Two transports share it, and neither hides an event loop in a thread:

- ``SyncClient``: a blocking socket; the calling thread writes its request, a reader
  thread reads replies and completes their futures.
- ``AsyncClient``: an ``asyncio.Protocol`` on the caller's loop. Requests made in one
  turn of the loop go out in one write (so concurrent sends share a frame write and,
  on the server, an fsync).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec

from arrival import __version__
from arrival._backend import Backend, Where
from arrival._codec import RecordTuple
from arrival._common import ProducerCore
from arrival._pending import Future, Pending, Ready
from arrival._replay import Offsets
from arrival._wire import decode_error, from_plain, to_plain
from arrival.engine import DeadMessage, Delivery, ProducerSeq, Send, TxnAcks
from arrival.errors import (
    ArrivalError,
    AuthenticationFailed,
    BrokerUnreachable,
    ClosedError,
    ProducerFenced,
    UsageError,
)
from arrival.model import (
    BrokerStats,
    ConsumerStats,
    QueueDescription,
    QueueSpec,
    QueueStats,
    StoredMessage,
)
from arrival.protocol import (
    CLIENT,
    NEED_DATA,
    Connection,
    Error,
    Goodbye,
    Hello,
    ProtocolError,
    Push,
    Reply,
    Request,
    Welcome,
)
from arrival.protocol.connection import MAX_IN_FLIGHT, State
from arrival.semantics.dedup import RECENT

__all__ = ["AsyncClient", "RemoteBackend", "SyncClient", "parse_url"]

DEFAULT_PORT = 7711
CONNECT_TIMEOUT_S = 10.0
_READ_SIZE = 1 << 18
_CLIENT_NAME = f"arrival-python/{__version__}"

_Decode = Callable[[Any], Any]


class _Typed:
    """A reply decoder that reads the result's MessagePack straight into ``kind``."""

    __slots__ = ("decoder", "then")

    def __init__(self, decoder: msgspec.msgpack.Decoder[Any], then: Callable[[Any], Any]) -> None:
        self.decoder = decoder
        self.then = then

    def __call__(self, raw: msgspec.Raw) -> Any:
        return self.then(self.decoder.decode(raw))


_plain = msgspec.msgpack.Decoder()
_received_deliveries = msgspec.msgpack.Decoder(tuple[float, list[Delivery]])


def _decoded(req_decode: Any, result: Any) -> Any:
    """What a request's reply ``result`` (raw MessagePack) means to its caller."""
    if type(req_decode) is _Typed:
        return req_decode(result)
    return req_decode(_plain.decode(result))


def _same(value: Any) -> Any:
    return value


def parse_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of ``arrival://host:port`` or ``arrivals://host:port``."""
    parts = urlsplit(url)
    if parts.scheme not in ("arrival", "arrivals") or not parts.hostname:
        raise UsageError(f"not an arrival server URL: {url!r}; use arrival://host:port")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise UsageError(f"bad port in {url!r}") from None
    return parts.hostname, port, parts.scheme == "arrivals"


def _tls_context(tls_ca: str | os.PathLike[str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=None if tls_ca is None else os.fspath(tls_ca))
    return ctx


def _token(token: str | None) -> str | None:
    return token if token is not None else os.environ.get("ARRIVAL_TOKEN") or None


def _unreachable(url: str, why: str) -> BrokerUnreachable:
    return BrokerUnreachable(f"lost the connection to {url}: {why}")


# Requests a reconnected client sends again. Reads are harmless to repeat; a send
# carries its producer's (id, epoch, sequence), so the broker stores it once; a commit
# carries an id the server answers a retry by; a receive's deliveries on the lost
# connection went back to the group at once. Not repeated, they fail with
# BrokerUnreachable (their outcome is unknown): at-most-once sends (never retried, by
# contract), acks and the other settles (the lease went back with the connection) and
# dead-letter replays and purges.
_RETRIED = frozenset(
    {
        "create_queue",
        "spec",
        "describe",
        "queues",
        "peek",
        "info",
        "stats",
        "member_stats",
        "register",
        "send",
        "begin",
        "end",
        "commit",
        "join",
        "receive",
        "leased",
        "dlq_list",
    }
)
_MEMBER_OPS = frozenset(
    {"member_stats", "receive", "ack", "nack", "reject", "extend", "release", "leased", "leave"}
)
DEFAULT_RECONNECT_S = 30.0


class _Req:
    """A request until it is answered: sent again after a reconnect if it may be."""

    __slots__ = ("args", "deadline", "decode", "fut", "op", "repeated", "retry")

    def __init__(self, op: str, args: dict[str, Any], fut: Future[Any], decode: _Decode) -> None:
        self.op = op
        self.args = args
        self.fut = fut
        self.decode = decode
        self.retry = op in _RETRIED and (op != "send" or args.get("p") is not None)
        self.repeated = False  # sent again after a reconnect
        # a receive sent again waits only for what is left of its timeout
        timeout = args.get("timeout") if op == "receive" else None
        self.deadline = None if timeout is None else time.monotonic() + timeout


class RemoteBackend(Backend):
    """The backend operations as requests; subclasses move the bytes.

    When the connection drops (and the client did not close it), the requests that may
    be repeated wait, the transport reconnects with backoff for up to ``reconnect``
    seconds, the consumers join their groups again, and the waiting requests go out on
    the new connection in their original order.
    """

    def __init__(self, url: str, token: str | None, reconnect: float) -> None:
        self.url = url
        self.conn = Connection(CLIENT, raw_results=True)
        self.token = token
        self.reconnect = reconnect
        self._epoch = 0
        self._cid_base = uuid.uuid4().hex
        self._cids = itertools.count()
        self._closed = False
        self._connected = False
        self._failure: ArrivalError | None = None
        self._waiting: dict[int, _Req] = {}
        self._backlog: deque[_Req] = deque()
        self._lock = threading.Lock()  # the Connection, _waiting, _backlog, _members
        self._order = threading.Lock()  # held from framing a request to writing it
        self._specs: dict[str, QueueSpec] = {}
        self._members: dict[int, int] = {}  # our consumer id -> the server's, this connection
        self._joins: dict[int, tuple[str, str, bool]] = {}  # to join again after a reconnect
        self._next_member = 1
        self._shared: ProducerCore | None = None
        self._shared_lock = threading.Lock()
        self.reconnects = 0
        self._generation = 0  # grows when a connection is lost
        self._server_clock = 0.0  # the server's clock minus ours, at the last receive

    # -- moving requests ----------------------------------------------------------------

    def _call(
        self, op: str, args: dict[str, Any], decode: _Decode = _same, *, flush: bool = True
    ) -> Future[Any]:
        req = _Req(op, args, Future(), decode)
        self._submit(req, flush=flush)
        return req.fut

    def flush_sends(self) -> None:
        self._flush_writes()

    def _submit(self, req: _Req, urgent: bool = False, flush: bool = True) -> None:
        with self._order:  # frames go out in the order of their request ids
            with self._lock:
                if self._closed:
                    req.fut.set_exception(ClosedError("the broker"))
                    return
                if self._failure is not None:
                    req.fut.set_exception(self._failure)
                    return
                if not urgent and (not self._connected or not self._room()):
                    self._backlog.append(req)
                    return
                data = self._frame(req)
                generation = self._generation
            if data is not None:
                self._write(data, generation)
        if data is not None and flush:
            self._flush_writes()

    def _room(self) -> bool:
        """Whether another request may go out now (under the lock)."""
        return self.conn.unanswered < MAX_IN_FLIGHT and not self._backlog

    def _wire_args(self, req: _Req) -> dict[str, Any]:
        """``req``'s arguments with our consumer ids as the server knows them now."""
        args = req.args
        if req.deadline is not None:
            args = {**args, "timeout": max(0.0, req.deadline - time.monotonic())}
        if req.op in _MEMBER_OPS:
            return {**args, "m": self._members.get(args["m"], -1)}
        if req.op == "commit":
            acks = [[self._members.get(m, -1), e, r] for m, e, r in args["acks"]]
            return {**args, "acks": acks}
        return args

    def _frame(self, req: _Req) -> bytes | None:
        """The request's bytes (under the lock); None if it can't be encoded, or if the
        server already said goodbye on this connection (the request then waits in the
        backlog, for the connection that replaces it)."""
        if self.conn.state is State.CLOSED:
            self._backlog.appendleft(req)
            return None
        rid = self.conn.next_request_id()
        try:
            data = self.conn.send(Request(rid, req.op, self._wire_args(req)))
        except ProtocolError as exc:
            req.fut.set_exception(UsageError(str(exc)))
            return None
        self._waiting[rid] = req
        return data

    def _write(self, data: bytes, generation: int) -> None:
        """Send ``data``, framed on connection ``generation``: in the order of the calls,
        and not at all once that connection is lost (its requests are framed again).
        Called in frame order (under ``_order``); ``_flush_writes`` follows outside it."""
        raise NotImplementedError

    def _flush_writes(self) -> None:
        """Put what ``_write`` queued on the wire, if the transport waits for that."""

    def _received(self, data: bytes) -> str | None:
        """Bytes from the server (b"": it closed): complete the futures they answer.
        Returns why the connection is lost, if it is."""
        done: list[tuple[_Req, Any, BaseException | None]] = []
        lost: str | None = None
        with self._lock:
            try:
                self.conn.receive_data(data)
                while True:
                    event = self.conn.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Reply):
                        done.append((self._waiting.pop(event.id), event.result, None))
                    elif isinstance(event, Error):
                        if event.id is None:
                            lost = event.message
                            break
                        req = self._waiting.pop(event.id)
                        done.append((req, None, self._error_of(req, event)))
                    elif isinstance(event, Goodbye):
                        lost = event.reason or "the server closed the connection"
                        break
                    elif isinstance(event, Push):
                        pass  # no subscriptions in this protocol version
                if lost is None and self.conn.peer_closed:
                    lost = "the server closed the connection"
            except ProtocolError as exc:
                lost = f"the server broke the protocol: {exc}"
        for req, result, error in done:  # decoders may take the lock: outside it
            if error is None:
                try:
                    value = _decoded(req.decode, result)
                except Exception as exc:  # noqa: BLE001 - a malformed result is its error
                    req.fut.set_exception(exc)
                else:
                    req.fut.set_result(value)
            else:
                req.fut.set_exception(error)
        if lost is None and self._backlog and self._connected:
            self._drain()
        return lost

    def _error_of(self, req: _Req, event: Error) -> ArrivalError:
        error = decode_error(event)
        if req.op == "commit" and req.repeated and isinstance(error, ProducerFenced):
            # the first attempt may have committed before the server restarted (which
            # fenced the repeat): only that attempt's lost answer could tell
            return BrokerUnreachable(
                f"lost the connection to {self.url} while transaction {req.args['t']!r} "
                f"was committing, and the server restarted: the outcome is unknown. With "
                f"deterministic output ids (the default), redoing the work is safe"
            )
        return error

    def _drain(self) -> None:
        """Send backlogged requests while the in-flight limit has room."""
        out: list[bytes] = []
        with self._order:
            with self._lock:
                while (
                    self._backlog
                    and self._connected
                    and self.conn.unanswered < MAX_IN_FLIGHT
                    and self.conn.state is not State.CLOSED
                ):
                    frame = self._frame(self._backlog.popleft())
                    if frame is not None:
                        out.append(frame)
                generation = self._generation
            if out:
                self._write(b"".join(out), generation)
        if out:
            self._flush_writes()

    def _lost(self, why: str) -> bool:
        """The connection dropped: keep what may be repeated, fail the rest. Returns
        whether to reconnect."""
        failed: list[_Req] = []
        with self._lock:
            self._connected = False
            self._generation += 1  # callbacks of the lost connection's rejoin do nothing
            waiting = [self._waiting[rid] for rid in sorted(self._waiting)]
            self._waiting = {}
            self._members = {}  # the server let go of them with the connection
            keep = [r for r in waiting if r.retry]
            for r in keep:
                r.repeated = True
            failed = [r for r in waiting if not r.retry]
            self._backlog.extendleft(reversed(keep))
            give_up = self._closed or self.reconnect <= 0 or self._failure is not None
        error = _unreachable(
            self.url, f"{why}; the outcome of this call is unknown (it was in flight)"
        )
        for r in failed:
            r.fut.set_exception(ClosedError("the broker") if self._closed else error)
        if give_up:
            self._fail(ClosedError("the broker") if self._closed else _unreachable(self.url, why))
            return False
        return True

    def _fail(self, failure: ArrivalError) -> None:
        """The connection is gone for good: every request waiting fails with ``failure``."""
        if self._closed:  # we closed it: whatever the socket saw, the broker is closed
            failure = ClosedError("the broker")
        with self._lock:
            if self._failure is None:
                self._failure = failure
            self._connected = False
            waiting, self._waiting = self._waiting, {}
            backlog, self._backlog = self._backlog, deque()
        for r in [*waiting.values(), *backlog]:
            r.fut.set_exception(failure)

    def _welcome(self, event: Any) -> None:
        if type(event) is Error:
            exc = decode_error(event)
            if isinstance(exc, AuthenticationFailed):
                raise exc
            raise BrokerUnreachable(f"{self.url} refused the connection: {event.message}")
        assert type(event) is Welcome
        self._epoch = event.broker_epoch

    def _reconnected(self) -> None:
        """A new connection is open (``self.conn``): join the consumers' groups again,
        then send what waited."""
        self.reconnects += 1
        with self._lock:
            joins = dict(self._joins)
            generation = self._generation
        remaining = [len(joins)]

        def joined(local: int, req: _Req) -> None:
            error = req.fut.exception()
            with self._lock:
                if generation != self._generation:
                    return  # this connection was lost too: the next one joins again
                if error is None and local in self._joins:
                    self._members[local] = int(req.fut.result())
                remaining[0] -= 1
                ready = remaining[0] == 0
                if ready:
                    self._connected = True
            if ready:
                self._drain()

        if not joins:
            with self._lock:
                if generation != self._generation:
                    return
                self._connected = True
            self._drain()
            return
        for local, (q, g, latest) in joins.items():
            req = _Req("join", {"q": q, "g": g, "latest": latest}, Future(), int)
            req.retry = False  # lost with this connection: the next one joins again
            req.fut.add_done_callback(functools.partial(joined, local, req))
            self._submit(req, urgent=True)

    def send_window(self) -> int | None:
        # a send repeated after a reconnect gets its original result only while it is
        # among the producer's last RECENT sends the broker remembers
        return RECENT

    def shared_producer(self) -> ProducerCore | None:
        """The producer this client's anonymous producers send to durable queues with:
        over the network every durable send carries a producer sequence, so that a send
        repeated after a reconnect is stored once."""
        with self._shared_lock:  # not self._lock: registering sends a request
            if self._shared is None:
                self._shared = ProducerCore(self, f"client.{uuid.uuid4().hex}")
            return self._shared

    # -- Backend ------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def closed(self) -> bool:
        return self._closed or self._failure is not None

    def now(self) -> float:
        return time.monotonic()

    def create_queue(self, spec: QueueSpec) -> Pending[QueueSpec]:
        def remember(data: Any) -> QueueSpec:
            created = from_plain(data, QueueSpec)
            self._specs[created.name] = created
            return created

        return self._call("create_queue", {"spec": to_plain(spec)}, remember)

    def spec(self, queue: str) -> Pending[QueueSpec]:
        known = self._specs.get(queue)
        if known is not None:  # specs never change once created
            return Ready(known)

        def remember(data: Any) -> QueueSpec:
            spec = from_plain(data, QueueSpec)
            self._specs[queue] = spec
            return spec

        return self._call("spec", {"q": queue}, remember)

    def is_durable(self, queue: str) -> Pending[bool]:
        raise NotImplementedError("use spec()")

    def describe(self, queue: str) -> Pending[QueueDescription]:
        return self._call("describe", {"q": queue}, _as(QueueDescription))

    def queue_names(self) -> Pending[list[str]]:
        return self._call("queues", {}, list)

    def peek(self, queue: str, limit: int, start: int | None) -> Pending[list[StoredMessage]]:
        return self._call(
            "peek", {"q": queue, "limit": limit, "start": start}, _as(list[StoredMessage])
        )

    def info(self) -> Pending[BrokerStats]:
        return self._call("info", {}, _as(BrokerStats))

    def stats(self, queue: str) -> Pending[QueueStats]:
        return self._call("stats", {"q": queue}, _as(QueueStats))

    def register_producer(self, producer: str) -> Pending[int]:
        return self._call("register", {"p": producer}, int)

    def send(
        self,
        queue: str,
        messages: Sequence[Send] | None,
        bodies: Sequence[bytes] | None,
        producer: ProducerSeq | None,
    ) -> Pending[int | None]:
        args: dict[str, Any] = {"q": queue, "p": None if producer is None else list(producer)}
        if bodies is not None:
            size = sum(map(len, bodies)) + 8 * len(bodies)
            args["bodies"] = list(bodies)
        else:
            assert messages is not None
            size = sum(_send_size(m) for m in messages)
            args["msgs"] = [list(m) for m in messages]
        # refused here, before it is numbered and sent, rather than by the protocol
        # after it took a sequence number (which would leave a gap)
        limit = self.conn.max_frame - _FRAME_SLACK
        if size > limit:
            raise UsageError(
                f"a batch of about {size} bytes does not fit in one frame ({limit} bytes "
                f"with the server's max_frame): send it in smaller batches"
            )
        # queued in sequence order under the producer's lock; written by flush_sends
        # once that lock is released, so other threads' sends can join the write
        return self._call("send", args, flush=producer is None)

    def begin_transaction(self, tid: str) -> Pending[tuple[int, int]]:
        return self._call("begin", {"t": tid}, lambda e: (int(e[0]), int(e[1])))

    def end_transaction(self, tid: str, epoch: tuple[int, int]) -> Pending[None]:
        return self._call("end", {"t": tid, "e": list(epoch)})

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
        args = {
            "t": tid,
            "e": list(epoch),
            "age": self.now() - started,
            "timeout": timeout,
            "sends": [[q, recs] for q, recs in sends],  # tuples encode as arrays
            "acks": [[m, e, receipts] for m, e, receipts in acks],
            "keep": keep,
            # a retry after a reconnect is answered, not redone: unique per client
            "cid": f"{self._cid_base}.{next(self._cids)}",
        }
        return self._call("commit", args)

    def join(self, queue: str, group: str, latest: bool) -> Pending[int]:
        with self._lock:
            local = self._next_member
            self._next_member += 1

        def joined(server_id: Any) -> int:
            with self._lock:
                self._members[local] = int(server_id)
                self._joins[local] = (queue, group, False)  # the group exists from now on
            return local

        return self._call("join", {"q": queue, "g": group, "latest": latest}, joined)

    def leave(self, member: int) -> Pending[None]:
        with self._lock:
            self._joins.pop(member, None)
            here = member in self._members
        if self.closed or not here:
            return Ready(None)  # the server let go of it with the connection
        fut = self._call("leave", {"m": member})

        def forget() -> None:
            with self._lock:
                self._members.pop(member, None)

        fut.add_done_callback(forget)
        return fut

    def member_stats(self, member: int) -> Pending[ConsumerStats]:
        return self._call("member_stats", {"m": member}, _as(ConsumerStats))

    def receive(self, member: int, limit: int, timeout: float | None) -> Pending[list[Delivery]]:
        def decode(result: tuple[float, list[Delivery]]) -> list[Delivery]:
            server_now, deliveries = result
            self._server_clock = server_now - time.monotonic()
            return deliveries

        args = {"m": member, "n": limit, "timeout": timeout}
        return self._call("receive", args, _Typed(_received_deliveries, decode))

    def ack(self, member: int, epoch: int, receipts: Sequence[tuple[int, int]]) -> Pending[None]:
        r = receipts if isinstance(receipts, list) else list(receipts)
        return self._call("ack", {"m": member, "e": epoch, "r": r})

    def nack(
        self,
        member: int,
        epoch: int,
        off: int,
        attempt: int,
        delay: float | None,
        error: str | None,
    ) -> Pending[bool]:
        args = {"m": member, "e": epoch, "o": off, "a": attempt, "delay": delay, "error": error}
        return self._call("nack", args, bool)

    def reject(self, member: int, epoch: int, off: int, attempt: int, reason: str) -> Pending[None]:
        args = {"m": member, "e": epoch, "o": off, "a": attempt, "reason": reason}
        return self._call("reject", args)

    def extend(
        self, member: int, epoch: int, off: int, attempt: int, seconds: float | None
    ) -> Pending[float]:
        args = {"m": member, "e": epoch, "o": off, "a": attempt, "s": seconds}
        return self._call("extend", args, float)

    def release(self, member: int, epoch: int, off: int, attempt: int) -> Pending[None]:
        return self._call("release", {"m": member, "e": epoch, "o": off, "a": attempt})

    def is_leased(self, member: int, epoch: int, off: int, attempt: int, deadline: float) -> bool:
        raise NotImplementedError

    def dead_letters(self, queue: str, limit: int | None) -> Pending[list[DeadMessage]]:
        return self._call("dlq_list", {"q": queue, "limit": limit}, _as(list[DeadMessage]))

    def _chosen(
        self, op: str, queue: str, where: Where, extra: dict[str, Any], decode: _Decode
    ) -> Pending[Any]:
        """``op`` on the dead letters ``where`` selects: the filter runs here, on the
        listed letters, and the server acts on their offsets (those still there)."""
        if where is None:
            return self._call(op, {"q": queue, "offsets": None, **extra}, decode)
        if isinstance(where, Offsets):  # chosen by offset already: no listing needed
            offsets = sorted(where.offsets)
            return self._call(op, {"q": queue, "offsets": offsets, **extra}, decode)
        result: Future[Any] = Future()
        listed = self.dead_letters(queue, None)

        def then() -> None:
            try:
                offsets = [d.offset for d in listed.wait() if where(d)]
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result.set_exception(exc)
                return
            inner = self._call(op, {"q": queue, "offsets": offsets, **extra}, decode)
            inner.add_done_callback(lambda: _chain(inner, result))

        listed.add_done_callback(then)
        return result

    def replay_dead_letters(
        self, queue: str, where: Where, limit: int | None, dry_run: bool, max_replays: int | None
    ) -> Pending[tuple[list[DeadMessage], list[DeadMessage]]]:
        extra = {"limit": limit, "dry": dry_run, "max_replays": max_replays}

        def decode(data: Any) -> tuple[list[DeadMessage], list[DeadMessage]]:
            result = from_plain(data, dict[str, list[DeadMessage]])
            return result["replayed"], result["quarantined"]

        return self._chosen("dlq_replay", queue, where, extra, decode)

    def purge_dead_letters(self, queue: str, where: Where) -> Pending[int]:
        return self._chosen("dlq_purge", queue, where, {}, int)


_FRAME_SLACK = 4096  # a send request's own fields, beyond its messages


def _text_size(text: str | None) -> int:
    if text is None:
        return 1
    return len(text) + 5 if text.isascii() else 4 * len(text) + 5


def _send_size(m: Send) -> int:
    """At least the MessagePack size of one message in a send request."""
    mid, key, headers, body = m
    size = len(body) + 16 + _text_size(mid) + _text_size(key)
    if headers:
        size += sum(_text_size(k) + _text_size(v) for k, v in headers.items())
    return size


def _as(kind: Any) -> _Decode:
    return lambda data: from_plain(data, kind)


def _chain(inner: Future[Any], outer: Future[Any]) -> None:
    error = inner.exception()
    if error is not None:
        outer.set_exception(error)
    else:
        outer.set_result(inner.result())


# =====================================================================================
# blocking transport
# =====================================================================================


class SyncClient(RemoteBackend):
    """A blocking connection: callers write, a reader thread reads the replies (and
    reconnects when the connection drops)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        reconnect: float,
        tls: ssl.SSLContext | None,
    ) -> None:
        super().__init__(url, token, reconnect)
        self._host, self._port, _ = parse_url(url)
        self._tls = tls
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._room_cv = threading.Condition(self._lock)
        self._out: list[tuple[int, bytes]] = []  # (generation, frames) waiting to be written
        self._out_lock = threading.Lock()
        self._writing = threading.Lock()  # held by the one thread writing
        self.writes = 0  # socket writes, for tests and the curious

    @classmethod
    def open(
        cls,
        url: str,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        reconnect: float = DEFAULT_RECONNECT_S,
    ) -> SyncClient:
        _host, _port, tls = parse_url(url)
        client = cls(
            url,
            token=_token(token),
            reconnect=reconnect,
            tls=_tls_context(tls_ca) if tls else None,
        )
        client._sock = client._connect()
        client._connected = True
        client._reader = threading.Thread(
            target=client._read_loop, name=f"arrival-client {url}", daemon=True
        )
        client._reader.start()
        return client

    def _connect(self) -> socket.socket:
        """A new socket, handshaken on a new Connection (``self.conn``)."""
        try:
            sock = socket.create_connection((self._host, self._port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise BrokerUnreachable(f"can't connect to {self.url}: {exc}") from exc
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.conn = Connection(CLIENT, raw_results=True)
            self._handshake(sock)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):  # e.g. a TLS certificate that does not verify
                raise BrokerUnreachable(f"can't connect to {self.url}: {exc}") from exc
            raise
        sock.settimeout(None)
        return sock

    def _handshake(self, sock: socket.socket) -> None:
        sock.sendall(self.conn.send(Hello(client=_CLIENT_NAME, token=self.token)))
        while True:
            try:
                event = self.conn.next_event()
            except ProtocolError as exc:
                raise BrokerUnreachable(f"{self.url} is not an arrival server: {exc}") from None
            if event is not NEED_DATA:
                self._welcome(event)
                return
            try:
                data = sock.recv(_READ_SIZE)
            except OSError as exc:
                raise BrokerUnreachable(f"{self.url} did not answer: {exc}") from exc
            try:
                self.conn.receive_data(data)
            except ProtocolError as exc:
                raise BrokerUnreachable(f"{self.url}: {exc}") from None
            if not data and self.conn.next_event() is NEED_DATA:
                raise BrokerUnreachable(f"{self.url} closed the connection during the handshake")

    def _room(self) -> bool:
        # a calling thread waits for room rather than queueing: the reader thread never
        # waits, so it can't block on a server that waits for us to read
        if threading.current_thread() is not self._reader:
            while self.conn.unanswered >= MAX_IN_FLIGHT and self._connected and not self._closed:
                self._room_cv.wait(1.0)
        # behind what waits in the backlog (requests repeated after a reconnect, before
        # ``_drain`` sent them): a numbered send must not overtake a lower sequence
        return self.conn.unanswered < MAX_IN_FLIGHT and not self._backlog

    def _write(self, data: bytes, generation: int) -> None:
        """Queue ``data``; then ``_flush_writes``: one thread at a time writes everything
        queued, so requests made concurrently by many threads go out together (a short
        linger of one write: while one thread writes, the others' requests gather)."""
        with self._out_lock:
            self._out.append((generation, data))

    def _flush_writes(self) -> None:
        while self._writing.acquire(blocking=False):
            try:
                while True:
                    with self._out_lock:
                        if not self._out:
                            break
                        queued, self._out = self._out, []
                    current = self._generation
                    chunk = b"".join(d for g, d in queued if g == current)
                    sock = self._sock
                    if not chunk or sock is None:
                        continue
                    self.writes += 1
                    try:
                        sock.sendall(chunk)
                    except OSError:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)  # the reader reconnects
            finally:
                self._writing.release()
            with self._out_lock:
                if not self._out:
                    return  # else: queued after our last look; write it

    def _read_loop(self) -> None:
        while True:
            sock = self._sock
            assert sock is not None
            lost: str | None = None
            while lost is None:
                try:
                    data = sock.recv(_READ_SIZE)
                except OSError as exc:
                    data, lost = b"", str(exc)
                why = self._received(data)
                with self._lock:
                    self._room_cv.notify_all()
                lost = lost or why
            with contextlib.suppress(OSError):
                sock.close()
            if not self._lost(lost) or not self._reconnect_loop():
                with self._lock:
                    self._room_cv.notify_all()
                return

    def _reconnect_loop(self) -> bool:
        deadline = time.monotonic() + self.reconnect
        delay = 0.02
        while not self._closed:
            try:
                sock = self._connect()
            except AuthenticationFailed as exc:
                self._fail(exc)
                return False
            except BrokerUnreachable as exc:
                if time.monotonic() + delay > deadline:
                    self._fail(
                        BrokerUnreachable(
                            f"gave up reconnecting to {self.url} after {self.reconnect:g} s: {exc}"
                        )
                    )
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._closed:
                sock.close()
                return False
            self._sock = sock
            self._reconnected()
            return True
        return False

    def is_leased(self, member: int, epoch: int, off: int, attempt: int, deadline: float) -> bool:
        if self.closed:
            return False
        args = {"m": member, "e": epoch, "o": off, "a": attempt}
        try:
            return bool(self._call("leased", args).wait())
        except BrokerUnreachable:
            return False

    def close(self) -> Pending[None]:
        if not self._closed:
            with self._order, self._lock:
                self._closed = True
                try:
                    bye = self.conn.send(Goodbye("the client closed"))
                except ProtocolError:
                    bye = b""
            sock = self._sock
            if sock is not None:
                if bye and self._connected:
                    with contextlib.suppress(OSError):
                        sock.sendall(bye)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            if self._reader is not None and self._reader is not threading.current_thread():
                self._reader.join(5.0)
            self._fail(ClosedError("the broker"))
        return Ready(None)


# =====================================================================================
# asyncio transport
# =====================================================================================


class _Protocol(asyncio.Protocol):
    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        c = self.client
        # at once: a server that refuses us (too many connections) answers the preface
        self.transport.write(c.conn.send(Hello(client=_CLIENT_NAME, token=c.token)))

    def data_received(self, data: bytes) -> None:
        c = self.client
        if not self.welcome.done():
            try:
                c.conn.receive_data(data)
                event = c.conn.next_event()
            except ProtocolError as exc:
                self.welcome.set_exception(
                    BrokerUnreachable(f"{c.url} is not an arrival server: {exc}")
                )
                return
            if event is not NEED_DATA:
                self.welcome.set_result(event)
                data = bytes(c.conn._buf)  # frames that came with the Welcome
                c.conn._buf.clear()
                if not data:
                    return
            else:
                return
        why = c._received(data)
        if why is not None and self.transport is not None:
            self.transport.close()  # connection_lost follows, and reconnects

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.client
        why = str(exc) if exc else "the server closed the connection"
        if not self.welcome.done():
            self.welcome.set_exception(BrokerUnreachable(f"{c.url}: {why}"))
            return
        if not self.lost:
            self.lost = True
            c._connection_lost(self, why)


class AsyncClient(RemoteBackend):
    """An asyncio connection on the caller's loop; reconnects from a task on it."""

    def __init__(
        self, url: str, *, token: str | None, reconnect: float, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(url, token, reconnect)
        self._host, self._port, _ = parse_url(url)
        self._tls = tls
        self._proto: _Protocol | None = None
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        reconnect: float = DEFAULT_RECONNECT_S,
    ) -> AsyncClient:
        _host, _port, tls = parse_url(url)
        client = cls(
            url, token=_token(token), reconnect=reconnect, tls=_tls_context(tls_ca) if tls else None
        )
        client._proto = await client._connect()
        client._connected = True
        return client

    async def _connect(self) -> _Protocol:
        with self._lock:
            self.conn = Connection(CLIENT, raw_results=True)
        proto = _Protocol(self)
        try:
            await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: proto,
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            raise BrokerUnreachable(f"can't connect to {self.url}: {exc}") from exc
        assert proto.transport is not None
        try:
            sock = proto.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):  # closed at once by the server: below
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                event = await asyncio.wait_for(proto.welcome, CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise BrokerUnreachable(
                    f"{self.url} did not answer the handshake in {CONNECT_TIMEOUT_S:g} s"
                ) from None
            self._welcome(event)
        except BaseException:
            proto.transport.close()
            await asyncio.sleep(0)  # let the transport close its socket before we go
            raise
        return proto

    def _connection_lost(self, proto: _Protocol, why: str) -> None:
        if proto is not self._proto:
            return
        self._out = []
        if self._lost(why) and not self._closed:
            self._task = self._loop.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        deadline = time.monotonic() + self.reconnect
        delay = 0.02
        while not self._closed:
            try:
                proto = await self._connect()
            except AuthenticationFailed as exc:
                self._fail(exc)
                return
            except (BrokerUnreachable, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    self._fail(
                        BrokerUnreachable(
                            f"gave up reconnecting to {self.url} after {self.reconnect:g} s: {exc}"
                        )
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._closed:
                if proto.transport is not None:
                    proto.transport.close()
                return
            self._proto = proto
            self._reconnected()
            return

    def _write(self, data: bytes, generation: int) -> None:
        """Queue ``data``; everything queued in this turn of the loop goes in one write."""
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._write, data, generation)
            return
        if generation != self._generation:
            return  # framed on a connection lost since: framed again on the new one
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(b"".join(out))

    def is_leased(self, member: int, epoch: int, off: int, attempt: int, deadline: float) -> bool:
        # answered here without a round trip: the lease's deadline against the server's
        # clock as of the last receive; a release, or an expiry the server saw first,
        # shows at the next settle as LeaseExpired
        now = time.monotonic() + self._server_clock
        return not self.closed and (deadline <= 0 or now < deadline)

    def close(self) -> Pending[None]:
        if not self._closed:
            with self._lock:
                self._closed = True
                try:
                    bye = self.conn.send(Goodbye("the client closed"))
                except ProtocolError:
                    bye = b""
            if self._task is not None:
                self._task.cancel()
            proto = self._proto
            if proto is not None and proto.transport is not None:
                self._flush()
                if bye and self._connected and not proto.transport.is_closing():
                    proto.transport.write(bye)
                proto.transport.close()
            self._fail(ClosedError("the broker"))
        return Ready(None)
