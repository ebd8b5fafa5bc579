"""Fuzzing arrival.protocol.Connection: random and mutated bytes in, only ProtocolError out.

Two properties, checked on a server Connection and on a client Connection after its
handshake, fed random bytes and random splits of valid traffic with random mutations:

1. Nothing but the protocol's own error escapes ``receive_data`` and ``next_event`` (and
   ``next_event`` raises only ``RemoteProtocolError``: the peer's bytes are never this
   side's fault). Any other exception fails the test.
2. The state machine never accepts an event that an earlier accepted event made illegal:
   an independent model of each side (``ServerModel``, ``ClientModel``) checks every event
   the connection hands out, and the connection's state agrees with the model's.

The drivers ``run_server`` and ``run_client`` are shared with the atheris harness
``fuzz_atheris.py``. Exceptions in ``KNOWN_BUGS`` escape ``next_event`` today; the drivers
stop quietly on them (unless ``tolerate=False``) so the other properties keep being
checked, and a strict xfail test per bug makes sure each is still there: when one is
fixed, its xfail test passes, fails the run, and the bug leaves ``KNOWN_BUGS``.
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from arrival.protocol import (
    CLIENT,
    NEED_DATA,
    PREFACE,
    SERVER,
    VERSION,
    Connection,
    Error,
    Event,
    Goodbye,
    Hello,
    ProtocolError,
    Push,
    RemoteProtocolError,
    Reply,
    Request,
    State,
    Welcome,
    error_for,
)

MAX_FRAME = 4096  # small, so oversized headers and frames are found quickly
GREETING = PREFACE + struct.pack(">H", VERSION)
WELCOME = Welcome(server="fuzz", broker_epoch=1, max_frame=MAX_FRAME)
FUZZ = settings(
    max_examples=int(os.environ.get("ARRIVAL_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


KNOWN_BUGS: tuple[type[BaseException], ...] = ()


class _KnownBug(Exception):
    """A KNOWN_BUGS exception escaped: the connection's state is unknown, stop driving it."""


def frame(obj: Any) -> bytes:
    payload = msgspec.msgpack.encode(obj)
    return struct.pack(">I", len(payload)) + payload


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (taken modulo its length); no empty chunk (b"" means EOF)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# -- the models ---------------------------------------------------------------------------


class ServerModel:
    """What a server may accept, written without the TRANSITIONS table."""

    STATES = {"start": State.START, "hello": State.HELLO_RECEIVED, "open": State.OPEN}

    def __init__(self) -> None:
        self.state = "start"
        self.last_id = 0

    def accept(self, ev: Event) -> None:
        assert self.state != "closed", f"the server accepted {ev!r} after it closed"
        if isinstance(ev, Goodbye):
            self.state = "closed"
        elif isinstance(ev, Hello):
            assert self.state == "start", f"the server accepted a Hello in {self.state}"
            self.state = "hello"
        elif isinstance(ev, Request):
            assert self.state == "open", f"the server accepted {ev!r} in {self.state}"
            assert ev.id > self.last_id, f"the server accepted id {ev.id} after {self.last_id}"
            self.last_id = ev.id
        else:
            raise AssertionError(f"a server accepted a server's event: {ev!r}")

    def agrees(self, conn: Connection) -> None:
        expected = State.CLOSED if self.state == "closed" else self.STATES[self.state]
        assert conn.state is expected, (conn, self.state)


class ClientModel:
    """What an open client may accept: answers to its outstanding requests, pushes, the end."""

    def __init__(self) -> None:
        self.closed = False
        self.outstanding: set[int] = set()

    def accept(self, ev: Event) -> None:
        assert not self.closed, f"the client accepted {ev!r} after it closed"
        if isinstance(ev, Goodbye) or (isinstance(ev, Error) and ev.id is None):
            self.closed = True
        elif isinstance(ev, Reply | Error):
            assert ev.id in self.outstanding, f"the client accepted {ev!r}: not outstanding"
            self.outstanding.discard(ev.id)
        elif not isinstance(ev, Push):
            raise AssertionError(f"an open client accepted {ev!r}")

    def agrees(self, conn: Connection) -> None:
        assert conn.state is (State.CLOSED if self.closed else State.OPEN), conn
        assert conn.unanswered == len(self.outstanding)


def _decodes_as_connection_error(wire: bytes, exc: ProtocolError) -> None:
    """What the server sent after ``exc``: a client reading it gets Error(id=None), closes."""
    client = Connection(CLIENT, max_frame=MAX_FRAME)
    client.send(Hello(client="reader"))
    client.receive_data(wire)
    assert client.next_event() == Error(id=None, kind="ProtocolError", message=str(exc))
    assert client.state is State.CLOSED


def _from_the_peer(exc: ProtocolError) -> None:
    """next_event() reads only the peer's bytes: its errors blame the peer, in words."""
    if not isinstance(exc, RemoteProtocolError) or not str(exc):
        raise AssertionError(f"next_event raised {exc!r}, not a RemoteProtocolError") from exc


# -- the drivers --------------------------------------------------------------------------


def run_server(
    chunks: Sequence[bytes], *, eof: bool, refuse: bool = False, tolerate: bool = True
) -> list[Event]:
    """Feed ``chunks`` (then EOF) to a server, answering Hello with Welcome (or an Error
    when ``refuse``) and every RemoteProtocolError with ``error_for``, as a server would.
    Returns the events it accepted; raises whatever else escapes (KNOWN_BUGS only when
    not ``tolerate``)."""
    conn = Connection(SERVER, max_frame=MAX_FRAME)
    model = ServerModel()
    accepted: list[Event] = []

    def pump() -> None:
        while True:
            try:
                ev = conn.next_event()
            except ProtocolError as exc:
                _from_the_peer(exc)
                if conn.state is not State.CLOSED:  # else: data after close, just hang up
                    wire = conn.send(error_for(exc))
                    model.state = "closed"
                    _decodes_as_connection_error(wire, exc)
                model.agrees(conn)
                return
            except KNOWN_BUGS:
                if not tolerate:
                    raise
                raise _KnownBug from None
            if ev is NEED_DATA:
                return
            assert isinstance(ev, Event.__args__)  # type: ignore[attr-defined]
            model.accept(ev)
            accepted.append(ev)
            if isinstance(ev, Hello):
                if refuse:
                    conn.send(Error(id=None, kind="Unauthorized", message="no"))
                    model.state = "closed"
                else:
                    conn.send(WELCOME)
                    model.state = "open"
            model.agrees(conn)

    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            pump()
        if eof:
            conn.receive_data(b"")
            pump()
    except _KnownBug:
        pass
    return accepted


def run_client(
    chunks: Sequence[bytes],
    *,
    requests: int,
    eof: bool,
    more: Sequence[int] = (),
    tolerate: bool = True,
) -> list[Event]:
    """Feed ``chunks`` to a client that finished its handshake and sent ``requests``
    requests; before chunk i it sends ``more[i]`` further requests while it is open. On a
    RemoteProtocolError it says Goodbye, as a client would."""
    conn = Connection(CLIENT, max_frame=MAX_FRAME)
    conn.send(Hello(client="fuzz"))
    conn.receive_data(frame(WELCOME))
    assert conn.next_event() == WELCOME
    model = ClientModel()
    accepted: list[Event] = []

    def send_requests(n: int) -> None:
        for _ in range(n):
            rid = conn.next_request_id()
            conn.send(Request(id=rid, op="op"))
            model.outstanding.add(rid)

    def pump() -> None:
        while True:
            try:
                ev = conn.next_event()
            except ProtocolError as exc:
                _from_the_peer(exc)
                if conn.state is not State.CLOSED:
                    conn.send(Goodbye(reason=str(exc)[:40]))
                    model.closed = True
                model.agrees(conn)
                return
            except KNOWN_BUGS:
                if not tolerate:
                    raise
                raise _KnownBug from None
            if ev is NEED_DATA:
                return
            assert isinstance(ev, Event.__args__)  # type: ignore[attr-defined]
            model.accept(ev)
            accepted.append(ev)
            model.agrees(conn)

    send_requests(requests)
    try:
        for i, chunk in enumerate(chunks):
            if not model.closed and i < len(more):
                send_requests(more[i])
            conn.receive_data(chunk)
            pump()
        if eof:
            conn.receive_data(b"")
            pump()
    except _KnownBug:
        pass
    return accepted


# -- strategies ---------------------------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=16)
)
payloads = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
ids = st.integers(-2, 14)
texts = st.text(max_size=8)

client_events = st.one_of(
    st.builds(Hello, client=texts, token=st.none() | texts),
    st.builds(Request, id=ids, op=texts, args=st.dictionaries(texts, payloads, max_size=3)),
    st.builds(Goodbye, reason=texts),
)
server_events = st.one_of(
    st.builds(Welcome, server=texts, broker_epoch=st.integers(0, 9), max_frame=st.just(4096)),
    st.builds(Reply, id=ids, result=payloads),
    st.builds(Push, stream=st.integers(0, 3), data=payloads),
    st.builds(Error, id=st.none() | ids, kind=texts, message=texts),
    st.builds(Goodbye, reason=texts),
)
any_events = st.one_of(client_events, server_events)
_args = st.dictionaries(texts, payloads, max_size=3)


@st.composite
def _with_junk(draw: st.DrawFn, events: list[Any], junk: st.SearchStrategy[Any]) -> list[Any]:
    """``events`` with a few out-of-place events (or raw frames) slipped in, sometimes."""
    out = list(events)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        out.insert(draw(st.integers(0, len(out))), draw(junk))
    return out


@st.composite
def client_streams(draw: st.DrawFn) -> list[Any]:
    """Mostly legal client traffic after the Hello: requests with growing ids, an end."""
    steps = draw(st.lists(st.integers(1, 3), max_size=8))  # ids grow, sometimes skip
    ids = [sum(steps[: i + 1]) for i in range(len(steps))]
    events: list[Any] = [Request(id=i, op=draw(texts), args=draw(_args)) for i in ids]
    if draw(st.booleans()):
        events.append(Goodbye(reason=draw(texts)))
    return draw(_with_junk(events, any_events | lookalikes))


@st.composite
def server_streams(draw: st.DrawFn, requests: int) -> list[Any]:
    """Mostly legal server traffic to an open client with ``requests`` outstanding."""
    answered = draw(st.permutations(range(1, requests + 1)))[: draw(st.integers(0, requests))]
    events: list[Any] = []
    for rid in answered:
        if draw(st.booleans()):
            events.append(Push(stream=draw(st.integers(0, 3)), data=draw(payloads)))
        ok = draw(st.booleans())
        events.append(
            Reply(id=rid, result=draw(payloads)) if ok else Error(id=rid, kind="K", message="m")
        )
    end = draw(st.sampled_from([None, None, Goodbye(), Error(id=None, kind="K", message="m")]))
    if end is not None:
        events.append(end)
    return draw(_with_junk(events, any_events | lookalikes))


# MessagePack maps that look like events: right tags, random fields and values.
_TAGS = ["hello", "welcome", "req", "rep", "push", "err", "bye", "x"]
_FIELDS = ["type", "id", "op", "args", "client", "token", "result", "stream", "data", "kind"]
lookalikes = st.dictionaries(
    st.sampled_from(_FIELDS), st.sampled_from(_TAGS) | payloads, min_size=1, max_size=5
).map(frame)
random_frames = st.binary(max_size=64).map(lambda p: struct.pack(">I", len(p)) + p)

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(0, 1 << 20),
        st.integers(0, 255),
    ),
    max_size=4,
)
cuts = st.lists(st.integers(0, 1 << 20), max_size=10)


def mutate(data: bytes, edits: Sequence[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, byte in edits:
        if kind == "insert":
            buf.insert(pos % (len(buf) + 1), byte)
        elif buf:
            i = pos % len(buf)
            if kind == "flip":
                buf[i] ^= 1 << (byte % 8)
            elif kind == "set":
                buf[i] = byte
            else:
                del buf[i]
    return bytes(buf)


def note(accepted: list[Event]) -> None:
    """Statistics (pytest --hypothesis-show-statistics): how far the fuzz gets."""
    event(f"events accepted: {min(len(accepted), 3)}+")
    for kind in sorted({type(e).__name__ for e in accepted}):
        event(f"accepted a {kind}")


# -- properties ---------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", GREETING]), at=cuts,
       eof=st.booleans())  # fmt: skip
def test_random_bytes_at_a_server(data: bytes, prefix: bytes, at: list[int], eof: bool) -> None:
    note(run_server(split(prefix + data, at), eof=eof))


@FUZZ
@given(
    hello=st.booleans(),
    frames=st.lists(random_frames | lookalikes, max_size=6),
    at=cuts,
    eof=st.booleans(),
)
def test_random_frames_at_a_server(
    hello: bool, frames: list[bytes], at: list[int], eof: bool
) -> None:
    head = GREETING + (frame(Hello(client="c")) if hello else b"")
    note(run_server(split(head + b"".join(frames), at), eof=eof))


@FUZZ
@given(
    events=client_streams() | st.lists(st.one_of(client_events, any_events), max_size=8),
    hello=st.sampled_from([True, True, True, False]),
    edits=mutations,
    at=cuts,
    eof=st.booleans(),
    refuse=st.booleans(),
)
@example(
    events=[Request(id=1, op="a"), Request(id=1, op="b")],
    hello=True, edits=[], at=[], eof=False, refuse=False,
)  # fmt: skip
@example(
    events=[Goodbye(), Request(id=5, op="late")],
    hello=True, edits=[], at=[3, 40], eof=True, refuse=False,
)  # fmt: skip
def test_mutated_traffic_at_a_server(
    events: list[Any], hello: bool, edits: Any, at: list[int], eof: bool, refuse: bool
) -> None:
    head = GREETING + (frame(Hello(client="c", token="t")) if hello else b"")
    data = mutate(head + b"".join(e if isinstance(e, bytes) else frame(e) for e in events), edits)
    note(run_server(split(data, at), eof=eof, refuse=refuse))


@FUZZ
@given(data=st.binary(max_size=300), requests=st.integers(0, 12), at=cuts, eof=st.booleans())
def test_random_bytes_at_a_client(data: bytes, requests: int, at: list[int], eof: bool) -> None:
    note(run_client(split(data, at), requests=requests, eof=eof))


@st.composite
def _client_cases(draw: st.DrawFn) -> tuple[int, list[Any]]:
    requests = draw(st.integers(0, 12))
    wild = st.lists(st.one_of(server_events, any_events, lookalikes), max_size=10)
    return requests, draw(server_streams(requests) | wild)


@FUZZ
@given(
    case=_client_cases(),
    more=st.lists(st.integers(0, 3), max_size=5),
    edits=mutations,
    at=cuts,
    eof=st.booleans(),
)
@example(
    case=(2, [Reply(id=1), Reply(id=1), Error(id=2, kind="k", message="m")]),
    more=[], edits=[], at=[], eof=False,
)  # fmt: skip
def test_mutated_traffic_at_a_client(
    case: tuple[int, list[Any]], more: list[int], edits: Any, at: list[int], eof: bool
) -> None:
    requests, events = case
    raw = b"".join(e if isinstance(e, bytes) else frame(e) for e in events)
    note(run_client(split(mutate(raw, edits), at), requests=requests, eof=eof, more=more))


# -- the harness can fail -----------------------------------------------------------------


def test_valid_traffic_goes_all_the_way_through() -> None:
    events = [Request(id=1, op="a"), Request(id=3, op="b", args={"x": [b"1"]}), Goodbye()]
    data = GREETING + frame(Hello(client="c")) + b"".join(frame(e) for e in events)
    assert run_server(split(data, [1, 9, 10, 30]), eof=True) == [Hello(client="c"), *events]

    answers = [Push(stream=1, data=b"d"), Reply(id=2), Error(id=1, kind="K", message="m")]
    got = run_client(split(b"".join(frame(e) for e in answers), [5, 17]), requests=2, eof=True)
    assert got == answers


def test_the_models_refuse_what_the_protocol_forbids() -> None:
    server = ServerModel()
    server.accept(Hello(client="c"))
    with pytest.raises(AssertionError, match="Hello"):
        server.accept(Hello(client="c"))
    server.state = "open"
    server.accept(Request(id=4, op="x"))
    with pytest.raises(AssertionError, match="id 4 after 4"):
        server.accept(Request(id=4, op="x"))
    server.accept(Goodbye())
    with pytest.raises(AssertionError, match="after it closed"):
        server.accept(Request(id=9, op="x"))

    client = ClientModel()
    client.outstanding = {1}
    client.accept(Reply(id=1))
    with pytest.raises(AssertionError, match="not outstanding"):
        client.accept(Reply(id=1))
    with pytest.raises(AssertionError, match="accepted"):
        client.accept(WELCOME)
    client.accept(Error(id=None, kind="K", message="m"))
    with pytest.raises(AssertionError, match="after it closed"):
        client.accept(Push(stream=1))


def test_split_never_makes_an_empty_chunk() -> None:
    assert split(b"abcdef", [0, 2, 2, 6, 13]) == [b"ab", b"cdef"]  # 13 % 7 == 6
    assert all(split(b"xyz", [k, k + 1]) for k in range(10))
    assert b"".join(split(b"xyz" * 9, [4, 100, 3])) == b"xyz" * 9
    assert split(b"", [1]) == []


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_string_that_is_not_utf8_is_a_remote_error(side: str) -> None:
    payload = b"\x82\xa4type\xa3bye\xa6reason\xa1\xff"  # Goodbye(reason=<0xff>)
    wire = struct.pack(">I", len(payload)) + payload
    if side == "server":
        assert run_server([GREETING + wire], eof=False, tolerate=False) == []
    else:
        assert run_client([wire], requests=1, eof=False, tolerate=False) == []


# -- atheris ------------------------------------------------------------------------------

HARNESS = Path(__file__).with_name("fuzz_atheris.py")


@pytest.mark.slow
def test_atheris_finds_nothing_in_twenty_seconds(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "-max_total_time=20", "-max_len=512"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "Done" in tail, tail
