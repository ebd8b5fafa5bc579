"""``arrival serve``: one embedded engine shared over TCP.

Each connection is a ``_Session``: it feeds bytes to the sans-IO protocol
(``arrival.protocol``), runs each request as an operation of the engine's
``LocalBackend`` and writes the reply when its result is there. Requests of one
connection start in the order they arrived (so a producer's sequence numbers reach
the engine in order), and finish in any order (a durable send waits for its fsync
while a receive waits for a message).

A connection's consumers leave the moment it drops: their leases go back without
spending attempts. Bad input closes only the connection that sent it, with an error
frame when one can be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import signal
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Generator
from typing import Any, cast

import msgspec

from arrival import __version__
from arrival._backend import LocalBackend, _Receive
from arrival._common import local_backend
from arrival._pending import Deferred, Pending
from arrival._wire import (
    decode_bodies,
    decode_receipts,
    encode_error,
    from_plain,
    record,
    to_plain,
)
from arrival.engine import DeadMessage
from arrival.errors import ArrivalError, ClosedError, StorageError, UsageError
from arrival.model import QueueSpec
from arrival.protocol import (
    SERVER,
    Connection,
    Error,
    Goodbye,
    Hello,
    ProtocolError,
    RemoteProtocolError,
    Reply,
    Request,
    Welcome,
    error_for,
)
from arrival.protocol.connection import NEED_DATA

__all__ = ["DEFAULT_LISTEN", "Server", "parse_listen", "serve", "tls_context"]

log = logging.getLogger("arrival.server")

DEFAULT_LISTEN = "127.0.0.1:7711"
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_IN_FLIGHT = 10_000  # messages one consumer may hold unsettled
_THROTTLE_POLL_S = 0.05  # how often a consumer at its limit looks for room
MAX_REQUESTS_PER_CONNECTION = 256  # running at once; reading pauses beyond it
MAX_REMEMBERED_COMMITS = 100_000  # answers kept for commits retried after a reconnect
MAX_OPEN_TRANSACTIONS = 10_000  # begin times a connection keeps for its transactions
MAX_RECEIVES_PER_CONNECTION = 1024  # long polls waiting at once (the protocol's in-flight)
MAX_RECEIVE = 10_000  # messages one receive may take: a consumer's in-flight bound
_WRITE_HIGH = 4 << 20  # bytes buffered for a slow reader before its reading pauses
SERVER_GC_THRESHOLDS = (100_000, 50, 100)  # gc.set_threshold for ``arrival serve``
_COALESCE_BYTES = 256 << 10  # replies gathered for one write before it is made early

_Encode = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


class Server:
    """Serves ``backend`` on ``host:port``. ``start()``, then ``close()`` (graceful)."""

    def __init__(
        self,
        backend: LocalBackend,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.backend = backend
        self._token = token.encode() if token else None
        self._ssl = ssl_context
        self.max_connections = max_connections
        self.sessions: set[_Session] = set()
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] = ("", 0)
        # recent commits by the client's commit id: a commit whose reply was lost with its
        # connection is asked again after the reconnect, and gets this outcome
        self.commits: OrderedDict[str, Pending[Any]] = OrderedDict()

    @property
    def connections(self) -> int:
        """Client connections open now (read by the admin server's metrics)."""
        return len(self.sessions)

    def remember_commit(self, cid: str, pending: Pending[Any]) -> None:
        self.commits[cid] = pending
        while len(self.commits) > MAX_REMEMBERED_COMMITS:
            self.commits.popitem(last=False)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Session(self), host, port, ssl=self._ssl, reuse_address=True
        )
        sock = self._server.sockets[0]
        self.address = sock.getsockname()[:2]
        return self.address

    def check_token(self, given: str | None) -> bool:
        if self._token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    async def close(self) -> None:
        """Stop accepting, say goodbye to every client (their consumers leave, releasing
        leases without spending attempts), then flush and close the engine."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for s in list(self.sessions):
            s.shut("the server is shutting down")
        for _ in range(100):  # let in-flight replies (commits) reach their clients
            if not any(s.running for s in self.sessions):
                break
            await asyncio.sleep(0.02)
        await self.backend.close()


class _Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.backend = server.backend
        self.conn = Connection(SERVER)
        self.transport: asyncio.Transport | None = None
        self.members: set[int] = set()
        self.left: set[int] = set()  # consumers this connection closed
        self.held: dict[int, int] = {}  # messages each consumer holds, about (see room)
        self.begun: dict[tuple[str, tuple[int, int]], float] = {}  # (tid, epoch) -> when
        self.running = 0  # requests started, not yet answered
        self.tasks: set[asyncio.Task[None]] = set()
        self.receives: set[asyncio.Task[None]] = set()  # long polls waiting
        self.peer = "?"
        self.closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._out: list[bytes] = []  # frames written in this turn of the loop
        self._out_bytes = 0
        self.loop = asyncio.get_running_loop()

    # -- transport callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if len(self.server.sessions) >= self.server.max_connections:
            log.warning("refused %s: %d connections open", self.peer, len(self.server.sessions))
            self._write_error(
                Error(None, "BrokerUnreachable", "too many connections: try again later")
            )
            self._close()
            return
        self.server.sessions.add(self)
        log.info("connection from %s", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.sessions.discard(self)
        for task in [*self.tasks, *self.receives]:
            task.cancel()
        for m in self.members:
            with contextlib.suppress(ArrivalError):
                self.backend.leave(m)  # its leases go back at once, no attempt spent
        self.members.clear()
        log.info("connection from %s closed", self.peer)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._flow()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.conn.receive_data(data)
        except ProtocolError as exc:  # pragma: no cover - only after b"" was fed
            log.warning("protocol error from %s: %s", self.peer, exc)
            self._close()
            return
        self._pump()

    def _pump(self) -> None:
        """Handle the complete events read so far, until reading is paused: what was
        read but not handled waits in the protocol's buffer."""
        try:
            while not self._reading_paused and not self.closed:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    break
                self._handle(event)
        except RemoteProtocolError as exc:
            log.warning("protocol error from %s: %s", self.peer, exc)
            self._write_error(error_for(exc))
            self._close()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # -- events -----------------------------------------------------------------------

    def _handle(self, event: Any) -> None:
        kind = type(event)
        if kind is Request:
            self._start(event)
        elif kind is Hello:
            if not self.server.check_token(event.token):
                log.warning("authentication failed for %s", self.peer)
                self._write_error(
                    Error(None, "AuthenticationFailed", "authentication failed: wrong token")
                )
                self._close()
                return
            welcome = Welcome(
                server=f"arrival/{__version__}",
                broker_epoch=self.backend.epoch,
                max_frame=self.conn.max_frame,
            )
            self._write(self.conn.send(welcome))
        elif kind is Goodbye:
            self._close()

    def _start(self, req: Request) -> None:
        handler = _OPS.get(req.op)
        if handler is None:
            self._reply_error(req.id, UsageError(f"unknown operation {req.op!r}"))
            return
        try:
            pending, encode = handler(self, req.args)
        except ArrivalError as exc:
            self._reply_error(req.id, exc)
            return
        except (
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            AttributeError,
            msgspec.ValidationError,
        ) as exc:
            self._reply_error(req.id, UsageError(f"malformed {req.op!r} request: {exc!r}"))
            return
        if isinstance(pending, _Receive):
            try:
                got = pending.now()
            except ArrivalError as exc:
                self._reply_error(req.id, exc)
                return
            if got:  # no need to wait: answered at once, without a task
                self._reply(req.id, encode(got))
                return
        if isinstance(pending, (_Receive, _Throttled)):
            # a long poll waits for messages, not for the server: it does not hold back
            # the connection's other requests; reading pauses only at the protocol's
            # in-flight limit of them
            task = self.loop.create_task(self._await(req.id, pending, encode, counted=False))
            self.receives.add(task)
            task.add_done_callback(self._receive_done)
            self._flow()
            return
        self.running += 1
        self._flow()
        if isinstance(pending, Deferred):
            task = self.loop.create_task(self._await(req.id, pending, encode))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif pending.done():
            self._finish(req.id, pending, encode)
        else:
            rid = req.id

            def done() -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed: no one to answer
                    self.loop.call_soon_threadsafe(self._finish, rid, pending, encode)

            pending.add_done_callback(done)

    async def _await(
        self, rid: int, pending: Pending[Any], encode: _Encode, *, counted: bool = True
    ) -> None:
        try:
            value = await pending
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the request's error is its answer
            if counted:
                self._answered()
            self._reply_error(rid, exc)
            return
        if counted:
            self._answered()
        self._reply(rid, encode(value))

    def _finish(self, rid: int, pending: Pending[Any], encode: _Encode) -> None:
        self._answered()
        try:
            value = pending.wait()
        except BaseException as exc:  # noqa: BLE001 - the request's error is its answer
            self._reply_error(rid, exc)
            return
        self._reply(rid, encode(value))

    def _receive_done(self, task: asyncio.Task[None]) -> None:
        self.receives.discard(task)
        self._flow()

    def _answered(self) -> None:
        self.running -= 1
        self._flow()

    def _flow(self) -> None:
        """Stop reading while too much is running or the client reads too slowly."""
        if self.transport is None or self.closed:
            return
        pause = (
            self.running >= MAX_REQUESTS_PER_CONNECTION
            or len(self.receives) >= MAX_RECEIVES_PER_CONNECTION
            or self._writing_paused
        )
        if pause and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        elif not pause and self._reading_paused:
            self.transport.resume_reading()
            self._reading_paused = False
            self.loop.call_soon(self._pump)  # what was read while paused

    # -- writing ----------------------------------------------------------------------

    def _reply(self, rid: int, result: Any) -> None:
        if self.closed:
            return
        try:
            self._write(self.conn.send(Reply(rid, result)))
        except ProtocolError as exc:  # e.g. a reply larger than max_frame
            self._reply_error(rid, UsageError(str(exc)))

    def _reply_error(self, rid: int, exc: BaseException) -> None:
        if self.closed:
            return
        if not isinstance(exc, ArrivalError):
            log.exception("request %d from %s failed", rid, self.peer, exc_info=exc)
        with contextlib.suppress(ProtocolError):
            self._write(self.conn.send(encode_error(rid, exc)))

    def _write_error(self, frame: Error) -> None:
        with contextlib.suppress(ProtocolError):
            self._write(self.conn.send(frame))

    def _write(self, data: bytes) -> None:
        """Queue a frame; the frames of one turn of the loop go out in one write (the
        replies of one group commit, say), not one system call each."""
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(data)
        self._out_bytes += len(data)
        t = self.transport
        if self._out_bytes >= _COALESCE_BYTES or (t is not None and t.get_write_buffer_size()):
            self._flush()  # a slow reader: flow control (pause_writing) must see it now

    def _flush(self) -> None:
        out, self._out = self._out, []
        self._out_bytes = 0
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def shut(self, reason: str) -> None:
        with contextlib.suppress(ProtocolError):
            self._write(self.conn.send(Goodbye(reason)))
        self._close()

    def _close(self) -> None:
        self.closed = True
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # -- helpers for the operations ---------------------------------------------------

    def member(self, m: Any) -> int:
        """A consumer of this connection, for receiving; one it closed is closed."""
        if m not in self.members:
            raise ClosedError("the consumer")
        return int(m)

    def room(self, m: int) -> int:
        """How many more messages consumer ``m`` may hold. Counted as deliveries minus
        settles through this connection, and recounted exactly when that reaches the
        limit (leases that expired meanwhile were counted as held)."""
        limit = self.server.max_in_flight
        if self.held.get(m, 0) < limit:
            return limit - self.held.get(m, 0)
        try:
            self.held[m] = self.backend.engine.member_stats(m).in_flight
        except ArrivalError:
            return limit  # gone: the receive itself says so
        return limit - self.held[m]

    def settled(self, m: int, n: int) -> None:
        if m in self.held:
            self.held[m] = max(0, self.held[m] - n)

    def settling(self, m: Any) -> int:
        """The consumer a settle names: the engine refuses one that left (LeaseExpired),
        and a consumer of another connection is never reachable from this one."""
        if m in self.members or m in self.left:
            return int(m)
        return -1


# =====================================================================================
# the operations: args (plain data) -> (Pending, encoder of its result)
# =====================================================================================

_Op = Callable[[_Session, dict[str, Any]], tuple[Pending[Any], _Encode]]


def _text(a: dict[str, Any], name: str) -> str:
    value = a[name]
    if not isinstance(value, str):
        raise UsageError(f"argument {name!r} must be a string, not {type(value).__name__}")
    return value


_OPS: dict[str, _Op] = {}


def _op(name: str) -> Callable[[_Op], _Op]:
    def register(fn: _Op) -> _Op:
        _OPS[name] = fn
        return fn

    return register


@_op("create_queue")
def _create_queue(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.create_queue(from_plain(a["spec"], QueueSpec)), to_plain


@_op("spec")
def _spec(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.spec(_text(a, "q")), to_plain


@_op("describe")
def _describe(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.describe(_text(a, "q")), to_plain


@_op("queues")
def _queues(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.queue_names(), _same


@_op("peek")
def _peek(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.peek(_text(a, "q"), int(a["limit"]), a.get("start")), to_plain


@_op("info")
def _info(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.info(), to_plain


@_op("stats")
def _stats(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.stats(_text(a, "q")), to_plain


@_op("member_stats")
def _member_stats(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.member_stats(s.member(a["m"])), to_plain


@_op("register")
def _register(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.register_producer(a["p"]), _same


@_op("send")
def _send(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    p = a.get("p")
    producer = None if p is None else (str(p[0]), int(p[1]), int(p[2]))
    bodies = a.get("bodies")
    if bodies is not None:
        return s.backend.send(_text(a, "q"), None, decode_bodies(bodies), producer), _same
    msgs = [(m[0], m[1], dict(m[2]) if m[2] else None, bytes(m[3])) for m in a["msgs"]]
    return s.backend.send(_text(a, "q"), msgs, None, producer), _same


@_op("begin")
def _begin(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    tid = a["t"]
    p = s.backend.begin_transaction(tid)
    if len(s.begun) >= MAX_OPEN_TRANSACTIONS:
        s.begun.pop(next(iter(s.begun)))  # the oldest: its commit falls back on the age
    s.begun[(tid, p.wait())] = s.backend.now()
    return p, list


@_op("end")
def _end(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    e = a["e"]
    epoch = (int(e[0]), int(e[1]))
    s.begun.pop((a["t"], epoch), None)
    return s.backend.end_transaction(a["t"], epoch), _same


@_op("commit")
def _commit(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    b = s.backend
    now = b.now()
    e = a["e"]
    epoch = (int(e[0]), int(e[1]))
    tid = a["t"]
    # its age by the client's clock, or since its begin here if that is older
    started = now - max(0.0, float(a["age"]))
    if not a["keep"]:
        started = min(started, s.begun.pop((tid, epoch), started))
    sends = []
    for q, recs in a["sends"]:
        sends.append((str(q), [(now, *record(r)[1:]) for r in recs]))
    acks = [
        (s.settling(m), int(ep), [(int(o), int(at)) for o, at in receipts])
        for m, ep, receipts in a["acks"]
    ]
    for m, _ep, receipts in acks:
        s.settled(m, len(receipts))
    cid = a.get("cid")
    if cid is not None:
        earlier = s.server.commits.get(cid)
        if earlier is not None:  # a retry after a reconnect: the first attempt's outcome
            return earlier, _same
    pending = b.commit_transaction(
        tid, epoch, started, float(a["timeout"]), sends, acks, bool(a["keep"])
    )
    if cid is not None:
        s.server.remember_commit(str(cid), pending)
    return pending, _same


@_op("join")
def _join(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    p = s.backend.join(_text(a, "q"), _text(a, "g"), bool(a["latest"]))
    member = p.wait()
    s.members.add(member)
    return p, _same


@_op("leave")
def _leave(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    m = a["m"]
    if m not in s.members:
        return s.backend.leave(-1), _same  # left already: nothing to do
    s.members.discard(m)
    s.left.add(m)
    return s.backend.leave(m), _same


@_op("receive")
def _receive(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    limit = max(1, min(int(a["n"]), MAX_RECEIVE))
    t = a.get("timeout")
    timeout = None if t is None else float(t)
    backend = s.backend
    m = s.member(a["m"])

    def encode(got: list[Any]) -> list[Any]:  # with our clock: the client times leases by it
        s.held[m] = s.held.get(m, 0) + len(got)
        return [backend.now(), got]  # the engine's tuples encode as arrays, in C

    room = s.room(m)
    if room <= 0:  # the consumer holds its limit: wait until it settles some
        return _Throttled(s, m, limit, timeout), encode
    return backend.receive(m, min(limit, room), timeout), encode


class _Throttled:
    """A receive by a consumer that holds ``max_in_flight`` messages already: it waits
    (up to its timeout) until the consumer settles some, then receives at most that
    many. A slow consumer holds its share, not the queue."""

    def __init__(self, s: _Session, member: int, limit: int, timeout: float | None) -> None:
        self.s = s
        self.member = member
        self.limit = limit
        self.end = None if timeout is None else time.monotonic() + timeout

    def done(self) -> bool:
        return False

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        raise TypeError("a throttled receive runs when awaited")

    def wait(self, timeout: float | None = None) -> list[Any]:
        raise TypeError("a throttled receive is awaited on the server's loop")

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self._wait().__await__()

    async def _wait(self) -> list[Any]:
        while True:
            left = None if self.end is None else self.end - time.monotonic()
            if left is not None and left <= 0:
                return []
            await asyncio.sleep(_THROTTLE_POLL_S if left is None else min(left, _THROTTLE_POLL_S))
            room = self.s.room(self.member)
            if room > 0:
                left = None if self.end is None else max(0.0, self.end - time.monotonic())
                got: list[Any] = await self.s.backend.receive(
                    self.member, min(self.limit, room), left
                )
                return got


@_op("ack")
def _ack(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    receipts = decode_receipts(a["r"])
    m = s.settling(a["m"])
    s.settled(m, len(receipts))
    return s.backend.ack(m, int(a["e"]), receipts), _same


@_op("nack")
def _nack(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    d = a.get("delay")
    m = s.settling(a["m"])
    s.settled(m, 1)
    return s.backend.nack(
        m,
        int(a["e"]),
        int(a["o"]),
        int(a["a"]),
        None if d is None else float(d),
        a.get("error"),
    ), _same


@_op("reject")
def _reject(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    m = s.settling(a["m"])
    s.settled(m, 1)
    return s.backend.reject(m, int(a["e"]), int(a["o"]), int(a["a"]), str(a["reason"])), _same


@_op("extend")
def _extend(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    sec = a.get("s")
    m = s.settling(a["m"])
    seconds = None if sec is None else float(sec)
    return s.backend.extend(m, int(a["e"]), int(a["o"]), int(a["a"]), seconds), _same


@_op("release")
def _release(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    m = s.settling(a["m"])
    s.settled(m, 1)
    return s.backend.release(m, int(a["e"]), int(a["o"]), int(a["a"])), _same


@_op("leased")
def _leased(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    from arrival._pending import Ready

    m = a["m"]
    if m not in s.members:
        return Ready(False), _same
    return Ready(s.backend.is_leased(m, int(a["e"]), int(a["o"]), int(a["a"]), 0.0)), _same


def _offsets(a: dict[str, Any]) -> Callable[[DeadMessage], bool] | None:
    chosen = a.get("offsets")
    if chosen is None:
        return None
    wanted = {int(o) for o in chosen}
    return lambda d: d.offset in wanted


@_op("dlq_list")
def _dlq_list(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.dead_letters(_text(a, "q"), a.get("limit")), to_plain


@_op("dlq_replay")
def _dlq_replay(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    guard = a.get("max_replays")  # absent or null: no loop guard
    if guard is not None and (type(guard) is not int or guard < 1):
        raise UsageError(f"argument 'max_replays' must be an integer >= 1 or null, not {guard!r}")

    def encode(result: tuple[list[DeadMessage], list[DeadMessage]]) -> Any:
        replayed, quarantined = result
        return {"replayed": to_plain(replayed), "quarantined": to_plain(quarantined)}

    b = s.backend
    return b.replay_dead_letters(
        _text(a, "q"), _offsets(a), a.get("limit"), bool(a["dry"]), guard
    ), encode


@_op("dlq_purge")
def _dlq_purge(s: _Session, a: dict[str, Any]) -> tuple[Pending[Any], _Encode]:
    return s.backend.purge_dead_letters(_text(a, "q"), _offsets(a)), _same


# =====================================================================================
# running a server: ``arrival serve``
# =====================================================================================


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen takes HOST:PORT (e.g. 127.0.0.1:7711), not {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def serve(
    data: str,
    listen: str,
    *,
    token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    http: str | None = None,
) -> None:
    """Serve ``data`` on ``listen`` until SIGTERM/SIGINT. Prints ``listening on H:P``
    (with the real port when 0 was asked) once clients can connect. With ``http``
    (HOST:PORT), also serves metrics, the admin API and the dashboard there
    (``arrival.admin``), and then prints ``admin http on H:P``."""
    host, port = parse_listen(listen)
    ctx = tls_context(tls_cert, tls_key)
    if max_in_flight < 1:
        raise UsageError(f"--max-in-flight must be at least 1, not {max_in_flight}")
    if http is not None:
        from arrival.admin.http import parse_address

        parse_address(http)  # refused before anything starts
    main = _serve(data, host, port, token, ctx, max_connections, max_in_flight, http)
    # A broker makes a few short-lived containers per message while keeping many
    # long-lived ones (cached messages, leases, ids): at the default threshold of 700
    # allocations the cycle collector ran thousands of times a second, rescanning them,
    # for about a third of the CPU. Our objects hold no cycles; collect far less often.
    gc.set_threshold(*SERVER_GC_THRESHOLDS)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not built for every platform
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve(
    data: str,
    host: str,
    port: int,
    token: str | None,
    ctx: ssl.SSLContext | None,
    max_connections: int,
    max_in_flight: int,
    http: str | None = None,
) -> None:
    backend = local_backend(data)
    server = Server(
        backend,
        token=token,
        ssl_context=ctx,
        max_connections=max_connections,
        max_in_flight=max_in_flight,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        h, p = await server.start(host, port)
    except BaseException:
        await backend.close()
        raise
    scheme = "arrivals" if ctx is not None else "arrival"
    log.info(
        "serving %s on %s://%s:%d (pid %d, broker epoch %d%s)",
        backend.url,
        scheme,
        h,
        p,
        os.getpid(),
        backend.epoch,
        ", token required" if token else "",
    )
    print(f"listening on {h}:{p}", flush=True)
    admin = None
    if http is not None:
        from arrival.admin import AdminServer

        try:
            admin = AdminServer(
                backend.engine, http, token=token, connections=lambda: server.connections
            )
            ah, ap = admin.start()
        except BaseException:
            await server.close()
            raise
        print(f"admin http on {ah}:{ap}", flush=True)
    # A storage failure stops the engine; the process stops too, so that whatever
    # supervises it restarts it and recovery reads what the disk really holds (after a
    # failed fsync, nothing in memory can be trusted to match it).
    engine = backend.engine

    def on_change() -> None:
        if engine.failure is not None:
            loop.call_soon_threadsafe(stop.set)

    unwatch = engine.watch(on_change)
    await stop.wait()
    unwatch()
    if admin is not None:
        admin.close()
    if engine.failure is not None:
        log.critical(
            "storage failure: %s; stopping, nothing unconfirmed was acknowledged", engine.failure
        )
    else:
        log.info("shutting down: no new connections; releasing leases, flushing")
    await server.close()
    if engine.failure is not None:
        raise StorageError(
            f"stopped after a storage failure ({engine.failure}); nothing unconfirmed was "
            f"acknowledged. Check the disk, then start the server again: it recovers from "
            f"what the disk holds"
        )
    log.info("stopped cleanly")
