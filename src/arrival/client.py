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
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

from arrival import __version__
from arrival._backend import Backend, Where
from arrival._codec import RecordTuple
from arrival._pending import Future, Pending, Ready
from arrival._wire import decode_deliveries, decode_error, from_plain, to_plain
from arrival.engine import DeadMessage, Delivery, ProducerSeq, Send, TxnAcks
from arrival.errors import (
    ArrivalError,
    AuthenticationFailed,
    BrokerUnreachable,
    ClosedError,
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
from arrival.protocol.connection import MAX_IN_FLIGHT

__all__ = ["AsyncClient", "RemoteBackend", "SyncClient", "parse_url"]

DEFAULT_PORT = 7711
CONNECT_TIMEOUT_S = 10.0
_READ_SIZE = 1 << 16
_CLIENT_NAME = f"arrival-python/{__version__}"

_Decode = Callable[[Any], Any]


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


class RemoteBackend(Backend):
    """The backend operations as requests; subclasses move the bytes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = Connection(CLIENT)
        self._epoch = 0
        self._closed = False
        self._failure: ArrivalError | None = None
        self._waiting: dict[int, tuple[Future[Any], _Decode]] = {}
        self._backlog: deque[tuple[str, dict[str, Any], Future[Any], _Decode]] = deque()
        self._lock = threading.Lock()  # the Connection, _waiting and _backlog
        self._order = threading.Lock()  # held from framing a request to writing it
        self._specs: dict[str, QueueSpec] = {}

    # -- moving requests ----------------------------------------------------------------

    def _call(self, op: str, args: dict[str, Any], decode: _Decode = _same) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._order:  # frames go out in the order of their request ids
            with self._lock:
                if self._failure is not None:
                    fut.set_exception(self._failure)
                    return fut
                if self._closed:
                    fut.set_exception(ClosedError("the broker"))
                    return fut
                if not self._room():
                    self._backlog.append((op, args, fut, decode))
                    return fut
                data = self._frame(op, args, fut, decode)
            if data is not None:
                self._write(data)
        return fut

    def _room(self) -> bool:
        """Whether another request may go out now (under the lock)."""
        return self.conn.unanswered < MAX_IN_FLIGHT and not self._backlog

    def _frame(self, op: str, args: dict[str, Any], fut: Future[Any], dec: _Decode) -> bytes | None:
        """The request's bytes (under the lock); None if it can't be encoded."""
        rid = self.conn.next_request_id()
        try:
            data = self.conn.send(Request(rid, op, args))
        except ProtocolError as exc:
            fut.set_exception(UsageError(str(exc)))
            return None
        self._waiting[rid] = (fut, dec)
        return data

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _received(self, data: bytes) -> None:
        """Bytes from the server (b"": it closed): complete the futures they answer."""
        done: list[tuple[Future[Any], Any, BaseException | None]] = []
        failure: BrokerUnreachable | None = None
        with self._lock:
            try:
                self.conn.receive_data(data)
                while True:
                    event = self.conn.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Reply):
                        fut, dec = self._waiting.pop(event.id)
                        try:
                            done.append((fut, dec(event.result), None))
                        except Exception as exc:  # noqa: BLE001 - a malformed result
                            done.append((fut, None, exc))
                    elif isinstance(event, Error):
                        if event.id is None:
                            failure = _unreachable(self.url, event.message)
                            failure.__cause__ = decode_error(event)
                            break
                        fut, _dec = self._waiting.pop(event.id)
                        done.append((fut, None, decode_error(event)))
                    elif isinstance(event, Goodbye):
                        failure = _unreachable(self.url, event.reason or "the server closed")
                        break
                    elif isinstance(event, Push):
                        pass  # no subscriptions in this protocol version
                if failure is None and self.conn.peer_closed:
                    failure = _unreachable(self.url, "the server closed the connection")
            except ProtocolError as exc:
                failure = _unreachable(self.url, f"the server broke the protocol: {exc}")
        for fut, value, error in done:
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)
        if failure is not None:
            self._fail(failure)
        elif self._backlog:
            self._drain()

    def _drain(self) -> None:
        """Send backlogged requests the in-flight limit has room for again."""
        out: list[bytes] = []
        with self._order:
            with self._lock:
                while self._backlog and self.conn.unanswered < MAX_IN_FLIGHT:
                    op, args, fut, dec = self._backlog.popleft()
                    frame = self._frame(op, args, fut, dec)
                    if frame is not None:
                        out.append(frame)
            if out:
                self._write(b"".join(out))

    def _fail(self, failure: ArrivalError) -> None:
        """The connection is gone: every request in flight fails with ``failure``."""
        if self._closed:  # we closed it: whatever the socket saw, the broker is closed
            failure = ClosedError("the broker")
        with self._lock:
            if self._failure is None:
                self._failure = failure
            waiting, self._waiting = self._waiting, {}
            backlog, self._backlog = self._backlog, deque()
        for fut, _ in waiting.values():
            fut.set_exception(failure)
        for _op, _args, fut, _dec in backlog:
            fut.set_exception(failure)

    def _welcome(self, event: Any) -> None:
        if type(event) is Error:
            exc = decode_error(event)
            if isinstance(exc, AuthenticationFailed):
                raise exc
            raise BrokerUnreachable(f"{self.url} refused the connection: {event.message}")
        assert type(event) is Welcome
        self._epoch = event.broker_epoch

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
        return self._call("create_queue", {"spec": to_plain(spec)}, _as(QueueSpec))

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
            args["bodies"] = list(bodies)
        else:
            assert messages is not None
            args["msgs"] = [list(m) for m in messages]
        return self._call("send", args)

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
            "sends": [[q, [list(r) for r in recs]] for q, recs in sends],
            "acks": [[m, e, [list(r) for r in receipts]] for m, e, receipts in acks],
            "keep": keep,
        }
        return self._call("commit", args)

    def join(self, queue: str, group: str, latest: bool) -> Pending[int]:
        return self._call("join", {"q": queue, "g": group, "latest": latest}, int)

    def leave(self, member: int) -> Pending[None]:
        if self.closed:
            return Ready(None)  # the server let go of it with the connection
        return self._call("leave", {"m": member})

    def member_stats(self, member: int) -> Pending[ConsumerStats]:
        return self._call("member_stats", {"m": member}, _as(ConsumerStats))

    def receive(self, member: int, limit: int, timeout: float | None) -> Pending[list[Delivery]]:
        return self._call(
            "receive", {"m": member, "n": limit, "timeout": timeout}, decode_deliveries
        )

    def ack(self, member: int, epoch: int, receipts: Sequence[tuple[int, int]]) -> Pending[None]:
        return self._call("ack", {"m": member, "e": epoch, "r": [list(r) for r in receipts]})

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
        self, queue: str, where: Where, limit: int | None, dry_run: bool
    ) -> Pending[list[DeadMessage]]:
        extra = {"limit": limit, "dry": dry_run}
        return self._chosen("dlq_replay", queue, where, extra, _as(list[DeadMessage]))

    def purge_dead_letters(self, queue: str, where: Where) -> Pending[int]:
        return self._chosen("dlq_purge", queue, where, {}, int)


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
    """A blocking connection: callers write, a reader thread completes their futures."""

    def __init__(self, url: str, sock: socket.socket) -> None:
        super().__init__(url)
        self._sock = sock
        self._reader: threading.Thread | None = None
        self._room_cv = threading.Condition(self._lock)

    def _room(self) -> bool:
        # a calling thread waits for room rather than queueing: the reader thread never
        # writes, so it can't block on a server that waits for us to read
        if threading.current_thread() is not self._reader:
            while self.conn.unanswered >= MAX_IN_FLIGHT and self._failure is None:
                self._room_cv.wait(1.0)
        return True

    def _received(self, data: bytes) -> None:
        super()._received(data)
        with self._lock:
            self._room_cv.notify_all()

    @classmethod
    def open(
        cls,
        url: str,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> SyncClient:
        host, port, tls = parse_url(url)
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
            if tls:
                sock = _tls_context(tls_ca).wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            raise BrokerUnreachable(f"can't connect to {url}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(url, sock)
        try:
            client._handshake(_token(token))
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        client._reader = threading.Thread(
            target=client._read_loop, name=f"arrival-client {url}", daemon=True
        )
        client._reader.start()
        return client

    def _handshake(self, token: str | None) -> None:
        self._sock.sendall(self.conn.send(Hello(client=_CLIENT_NAME, token=token)))
        while True:
            try:
                event = self.conn.next_event()
            except ProtocolError as exc:
                raise BrokerUnreachable(f"{self.url} is not an arrival server: {exc}") from None
            if event is not NEED_DATA:
                self._welcome(event)
                return
            try:
                data = self._sock.recv(_READ_SIZE)
            except OSError as exc:
                raise BrokerUnreachable(f"{self.url} did not answer: {exc}") from exc
            try:
                self.conn.receive_data(data)
            except ProtocolError as exc:
                raise BrokerUnreachable(f"{self.url}: {exc}") from None
            if not data and self.conn.next_event() is NEED_DATA:
                raise BrokerUnreachable(f"{self.url} closed the connection during the handshake")

    def _write(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self._fail(_unreachable(self.url, str(exc)))

    def _read_loop(self) -> None:
        while True:
            try:
                data = self._sock.recv(_READ_SIZE)
            except OSError as exc:
                self._fail(_unreachable(self.url, str(exc)))
                return
            self._received(data)
            if not data or self._failure is not None:
                if self._failure is None:
                    self._fail(_unreachable(self.url, "the server closed the connection"))
                return

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
            with self._lock:
                self._closed = True
                try:
                    bye = self.conn.send(Goodbye("the client closed"))
                except ProtocolError:
                    bye = b""
            if bye and self._failure is None:
                self._write(bye)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

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
                rest = bytes(c.conn._buf)  # frames that came with the Welcome
                if rest:
                    c.conn._buf.clear()
                    c._received(rest)
            return
        c._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.client
        why = str(exc) if exc else "the server closed the connection"
        if not self.welcome.done():
            self.welcome.set_exception(BrokerUnreachable(f"{c.url}: {why}"))
        c._fail(_unreachable(c.url, why))


class AsyncClient(RemoteBackend):
    """An asyncio connection on the caller's loop."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._proto: _Protocol | None = None
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> AsyncClient:
        host, port, tls = parse_url(url)
        client = cls(url)
        proto = _Protocol(client)
        try:
            await asyncio.wait_for(
                client._loop.create_connection(
                    lambda: proto,
                    host,
                    port,
                    ssl=_tls_context(tls_ca) if tls else None,
                    server_hostname=host if tls else None,
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            raise BrokerUnreachable(f"can't connect to {url}: {exc}") from exc
        client._proto = proto
        assert proto.transport is not None
        sock = proto.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto.transport.write(client.conn.send(Hello(client=_CLIENT_NAME, token=_token(token))))
        try:
            event = await asyncio.wait_for(proto.welcome, CONNECT_TIMEOUT_S)
            client._welcome(event)
        except BaseException:
            proto.transport.close()
            raise
        return client

    def _write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in this turn of the loop goes in one write."""
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._write, data)
            return
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(b"".join(out))

    def is_leased(self, member: int, epoch: int, off: int, attempt: int, deadline: float) -> bool:
        # answered here without a round trip: the lease's deadline on the server's clock
        # (the same wall clock on one machine); a release or an expiry the server did
        # early shows at the next settle, as LeaseExpired
        return not self.closed and (deadline <= 0 or time.time() < deadline)

    def close(self) -> Pending[None]:
        if not self._closed:
            with self._lock:
                self._closed = True
                try:
                    bye = self.conn.send(Goodbye("the client closed"))
                except ProtocolError:
                    bye = b""
            proto = self._proto
            if proto is not None and proto.transport is not None:
                self._flush()
                if bye and not proto.transport.is_closing():
                    proto.transport.write(bye)
                proto.transport.close()
            self._fail(ClosedError("the broker"))
        return Ready(None)
