"""The arrival wire protocol as a pure state machine: bytes in, events out; no sockets.

```python
conn = Connection(CLIENT)
wire = conn.send(Hello(client="me"))       # bytes to write to the socket
conn.receive_data(bytes_from_socket)        # b"" means the peer closed
event = conn.next_event()                   # an Event, or NEED_DATA
```

On the wire: the client first sends the 8-byte preface ``\\x89ARV\\r\\n`` and a 2-byte
big-endian protocol version, then frames. A frame is a 4-byte big-endian length and that
many bytes of MessagePack: one event (``events.py``). Neither side sends a frame longer
than ``max_frame``. The server answers the preface and ``Hello`` with ``Welcome``, or
with an ``Error`` and closes.

Every legal move is in ``TRANSITIONS``, one table. An illegal move raises
``LocalProtocolError`` when this side tried it (a bug in the caller) and
``RemoteProtocolError`` when the peer did (bad input: answer with ``error_for`` if the
connection can still carry it, then close). Nothing else escapes ``receive_data``,
``next_event`` and ``send``.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Final

import msgspec

from arrival.protocol.events import Error, Event, Goodbye, Hello, Push, Reply, Request, Welcome

__all__ = [
    "CLIENT",
    "DEFAULT_MAX_FRAME",
    "MAX_IN_FLIGHT",
    "NEED_DATA",
    "PREFACE",
    "SERVER",
    "TRANSITIONS",
    "VERSION",
    "Connection",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "State",
    "error_for",
]

PREFACE: Final = b"\x89ARV\r\n\x1a\n"  # not text: an HTTP or telnet peer shows at once
VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 16 << 20  # 16 MiB: a batch of messages, not a stream
MAX_IN_FLIGHT: Final = 1024  # requests a client may have unanswered
MIN_FRAME: Final = 1024  # room for any handshake or connection error frame
_MAX_ERROR_TEXT = 400  # characters of a connection error's message on the wire
_HEADER = struct.Struct(">I")
_VERSION = struct.Struct(">H")
_HTTP = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"PRI ")


class ProtocolError(Exception):
    """The protocol's own error: the only exception its methods raise."""


class LocalProtocolError(ProtocolError):
    """This side broke the protocol: a bug in the code using the connection."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: bad input. Answer with ``error_for`` and close."""


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


CLIENT: Final = Role.CLIENT
SERVER: Final = Role.SERVER


class State(enum.Enum):
    START = "start"  # nothing exchanged
    HELLO_SENT = "hello-sent"  # client: preface and Hello sent, Welcome awaited
    HELLO_RECEIVED = "hello-received"  # server: Hello read, Welcome (or Error) to send
    OPEN = "open"
    CLOSED = "closed"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""``next_event()`` has nothing complete yet: call ``receive_data`` first."""

_Move = tuple[Role, State, str, type]  # (role, state, "send"/"recv", event type)

TRANSITIONS: Final[dict[_Move, State]] = {
    (CLIENT, State.START, "send", Hello): State.HELLO_SENT,
    (CLIENT, State.HELLO_SENT, "recv", Welcome): State.OPEN,
    (CLIENT, State.HELLO_SENT, "recv", Error): State.CLOSED,
    (CLIENT, State.OPEN, "send", Request): State.OPEN,
    (CLIENT, State.OPEN, "recv", Reply): State.OPEN,
    (CLIENT, State.OPEN, "recv", Push): State.OPEN,
    (CLIENT, State.OPEN, "recv", Error): State.OPEN,  # a request's error; id None closes
    (SERVER, State.START, "recv", Hello): State.HELLO_RECEIVED,
    (SERVER, State.START, "send", Error): State.CLOSED,  # a bad preface
    (SERVER, State.HELLO_RECEIVED, "send", Welcome): State.OPEN,
    (SERVER, State.HELLO_RECEIVED, "send", Error): State.CLOSED,
    (SERVER, State.OPEN, "recv", Request): State.OPEN,
    (SERVER, State.OPEN, "send", Reply): State.OPEN,
    (SERVER, State.OPEN, "send", Push): State.OPEN,
    (SERVER, State.OPEN, "send", Error): State.OPEN,  # a request's error; id None closes
}
"""Every legal move. Goodbye is legal from any state but CLOSED, and closes."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Event)


# What ``send`` checks before a frame leaves: the envelope as the peer's decoder types it,
# with the payloads (a request's argument values, a result, pushed data) skipped over
# as raw MessagePack rather than built into objects. A batch of messages costs one scan.
class _RequestShape(msgspec.Struct, tag="req"):
    id: int
    op: str
    args: dict[str, msgspec.Raw] = {}


class _ReplyShape(msgspec.Struct, tag="rep"):
    id: int
    result: msgspec.Raw = msgspec.Raw(b"\xc0")


class _PushShape(msgspec.Struct, tag="push"):
    stream: int
    data: msgspec.Raw = msgspec.Raw(b"\xc0")


class _ErrorShape(msgspec.Struct, tag="err"):
    id: int | None
    kind: str
    message: str
    fields: dict[str, msgspec.Raw] = {}


_checker = msgspec.msgpack.Decoder(
    Hello | Welcome | Goodbye | _RequestShape | _ReplyShape | _PushShape | _ErrorShape
)
_raw_decoder = msgspec.msgpack.Decoder(
    Hello | Welcome | Goodbye | Request | _ReplyShape | Push | Error
)


class Connection:
    """One side of one connection; see the module docstring."""

    def __init__(
        self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME, raw_results: bool = False
    ) -> None:
        """``raw_results``: a ``Reply``'s result is left as ``msgspec.Raw`` (its
        MessagePack, checked to be well formed), for the caller to decode into the type it
        expects in one pass, without building plain lists and dicts first."""
        if not MIN_FRAME <= max_frame <= (1 << 31):
            raise LocalProtocolError(
                f"max_frame must be in [{MIN_FRAME}, 2**31] bytes, not {max_frame}"
            )
        self.role = role
        self.state = State.START
        self.max_frame = max_frame
        self._decoder: msgspec.msgpack.Decoder[Any] = _raw_decoder if raw_results else _decoder
        self.peer_closed = False
        self._buf = bytearray()
        self._preface_done = role is CLIENT  # only the server reads a preface
        self._preface_sent = role is SERVER  # only the client sends one
        self._next_id = 1  # client: the id of the next request
        self._unanswered: set[int] = set()  # client: requests sent, not yet answered
        self._seen_ids = 0  # server: the highest request id received

    def __repr__(self) -> str:
        return f"<Connection {self.role.value} {self.state.value} buffered={len(self._buf)}>"

    @property
    def unanswered(self) -> int:
        return len(self._unanswered)

    def next_request_id(self) -> int:
        """The id the next ``Request`` must carry (client side)."""
        return self._next_id

    # -- sending ------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes that carry ``event``; raises LocalProtocolError for an illegal move
        or an event that can't be encoded, and then changes nothing."""
        kind = type(event).__name__
        try:
            data = _encoder.encode(event)
            _checker.decode(data)  # what the peer will check of the envelope
        except Exception as exc:  # noqa: BLE001 - any failure to encode is the caller's
            raise LocalProtocolError(f"can't encode this {kind}: {exc}") from None
        if len(data) > self.max_frame:
            raise LocalProtocolError(
                f"the {kind} frame of {len(data)} bytes exceeds max_frame "
                f"({self.max_frame} bytes): send smaller batches"
            )
        self._move("send", event, LocalProtocolError)
        frame = _HEADER.pack(len(data)) + data
        if not self._preface_sent:
            self._preface_sent = True
            return PREFACE + _VERSION.pack(VERSION) + frame
        return frame

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means it closed its side."""
        if not data:
            self.peer_closed = True
            return
        if self.peer_closed:
            raise LocalProtocolError("receive_data after the peer closed (b'' was fed)")
        self._buf += data

    def next_event(self) -> Event | _NeedData:
        """The next complete event from the peer, or NEED_DATA."""
        if self.state is State.CLOSED:
            if self._buf:
                raise RemoteProtocolError("data after the connection closed")
            return NEED_DATA
        if not self._preface_done and not self._read_preface():
            return self._need_data()
        buf = self._buf
        if len(buf) < _HEADER.size:
            return self._need_data()
        (size,) = _HEADER.unpack_from(buf)
        if size > self.max_frame:
            raise self._fail(
                f"the peer announced a frame of {size} bytes, more than max_frame "
                f"({self.max_frame} bytes)"
            )
        if size == 0:
            raise self._fail("an empty frame")
        if len(buf) < _HEADER.size + size:
            return self._need_data()
        payload = bytes(buf[_HEADER.size : _HEADER.size + size])
        del buf[: _HEADER.size + size]
        try:
            decoded = self._decoder.decode(payload)
            event: Event = (
                Reply(decoded.id, decoded.result) if type(decoded) is _ReplyShape else decoded
            )
        except RecursionError:
            raise self._fail("a frame nested too deeply to be an arrival event") from None
        except Exception as exc:  # noqa: BLE001 - whatever the bytes break is the peer's fault
            raise self._fail(f"a frame that is not an arrival event ({exc})") from None
        self._move("recv", event, RemoteProtocolError)
        return event

    def _read_preface(self) -> bool:
        buf = self._buf
        n = len(PREFACE)
        head = bytes(buf[:n])
        if head != PREFACE[: len(head)]:
            if head[:4] in _HTTP:
                raise self._fail(
                    "an HTTP request: this port speaks the arrival protocol, not HTTP; "
                    "connect with arrival://host:port"
                )
            if len(head) < 4 and any(m.startswith(head) for m in _HTTP):
                return False  # maybe the start of an HTTP method: wait to tell
            raise self._fail("not an arrival client: the connection preface is wrong")
        if len(buf) < n + _VERSION.size:
            return False
        (version,) = _VERSION.unpack_from(buf, n)
        if version != VERSION:
            raise self._fail(
                f"protocol version {version} is not supported: this server speaks version "
                f"{VERSION}; upgrade the older side"
            )
        del buf[: n + _VERSION.size]
        self._preface_done = True
        return True

    def _need_data(self) -> _NeedData:
        if self.peer_closed and self._buf:
            raise self._fail(f"the peer closed in the middle of a frame ({len(self._buf)} bytes)")
        return NEED_DATA

    def _fail(self, problem: str) -> RemoteProtocolError:
        self._buf.clear()
        return RemoteProtocolError(problem)

    # -- the table ----------------------------------------------------------------------

    def _move(self, direction: str, event: Event, error: type[ProtocolError]) -> None:
        kind = type(event)
        if kind is Goodbye:
            if self.state is State.CLOSED:
                raise error(f"can't {direction} Goodbye: the connection is closed")
            self.state = State.CLOSED
            return
        new = TRANSITIONS.get((self.role, self.state, direction, kind))
        if new is None:
            raise error(
                f"a {self.role.value} can't {direction} {kind.__name__} in state "
                f"{self.state.value!r}"
            )
        self._check_ids(direction, event, error)
        self.state = new
        if kind is Error and event.id is None:  # type: ignore[union-attr]
            self.state = State.CLOSED
        elif kind is Welcome and event.max_frame < self.max_frame:  # type: ignore[union-attr]
            self.max_frame = max(MIN_FRAME, event.max_frame)  # type: ignore[union-attr]

    def _check_ids(self, direction: str, event: Event, error: type[ProtocolError]) -> None:
        if self.role is CLIENT:
            if type(event) is Request:
                if event.id != self._next_id:
                    raise error(f"request id {event.id} is out of order: expected {self._next_id}")
                if len(self._unanswered) >= MAX_IN_FLIGHT:
                    raise error(f"more than {MAX_IN_FLIGHT} requests unanswered")
                self._next_id += 1
                self._unanswered.add(event.id)
            elif type(event) in (Reply, Error) and event.id is not None:  # type: ignore[union-attr]
                rid = event.id  # type: ignore[union-attr]
                if rid not in self._unanswered:
                    raise error(f"an answer to request {rid}, which is not outstanding")
                self._unanswered.discard(rid)
        elif type(event) is Request:
            if event.id <= self._seen_ids:
                raise error(f"request id {event.id} is not above the last ({self._seen_ids})")
            self._seen_ids = event.id


def error_for(exc: ProtocolError) -> Error:
    """The connection-level Error frame that tells the peer why it is being closed."""
    return Error(id=None, kind="ProtocolError", message=str(exc)[:_MAX_ERROR_TEXT])
