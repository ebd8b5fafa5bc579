"""arrival.protocol.Connection: a client and a server joined in memory, bytes in and events out.

No sockets: what one side's ``send`` returns is fed to the other side's ``receive_data``.
Illegal moves are checked on both sides of the table: ``LocalProtocolError`` when this
side tries one, ``RemoteProtocolError`` when the peer does.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from arrival.protocol import (
    CLIENT,
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    PREFACE,
    SERVER,
    VERSION,
    Connection,
    Error,
    Event,
    Goodbye,
    Hello,
    LocalProtocolError,
    ProtocolError,
    Push,
    RemoteProtocolError,
    Reply,
    Request,
    State,
    Welcome,
    error_for,
)
from arrival.protocol.connection import MAX_IN_FLIGHT, MIN_FRAME, TRANSITIONS

WELCOME = Welcome(server="arrival-test/0", broker_epoch=7, max_frame=DEFAULT_MAX_FRAME)
GREETING = PREFACE + struct.pack(">H", VERSION)


# -- helpers ------------------------------------------------------------------------------


def events(conn: Connection) -> list[Event]:
    """Every complete event ``conn`` holds, until NEED_DATA."""
    out: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        assert isinstance(ev, Event.__args__)  # type: ignore[attr-defined]
        out.append(ev)


def deliver(data: bytes, to: Connection) -> list[Event]:
    to.receive_data(data)
    return events(to)


def frame(obj: Any) -> bytes:
    """A well-formed frame around ``obj`` (an event, or any MessagePack-able value)."""
    payload = msgspec.msgpack.encode(obj)
    return struct.pack(">I", len(payload)) + payload


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def pair(*, token: str | None = None, **kw: Any) -> tuple[Connection, Connection]:
    """A client and a server after a successful handshake: both OPEN."""
    client, server = Connection(CLIENT, **kw), Connection(SERVER, **kw)
    assert deliver(client.send(Hello(client="test", token=token)), server) == [
        Hello(client="test", token=token)
    ]
    assert deliver(server.send(WELCOME), client) == [WELCOME]
    assert client.state is server.state is State.OPEN
    return client, server


def request(client: Connection, op: str = "send", **args: Any) -> bytes:
    return client.send(Request(id=client.next_request_id(), op=op, args=args))


def server_after_hello() -> Connection:
    server = Connection(SERVER)
    assert deliver(GREETING + frame(Hello(client="raw")), server) == [Hello(client="raw")]
    return server


def open_server() -> Connection:
    server = server_after_hello()
    server.send(WELCOME)
    return server


def client_after_hello() -> Connection:
    client = Connection(CLIENT)
    client.send(Hello(client="test"))
    return client


# -- the handshake ------------------------------------------------------------------------


def test_handshake_opens_both_sides_and_carries_the_token() -> None:
    client, server = Connection(CLIENT), Connection(SERVER)
    assert client.state is server.state is State.START

    wire = client.send(Hello(client="arrival-python/0.1.0", token="s3cret"))
    assert wire.startswith(PREFACE + b"\x00\x01")  # the preface, then version 1 big-endian
    assert client.state is State.HELLO_SENT

    assert server.next_event() is NEED_DATA
    assert deliver(wire, server) == [Hello(client="arrival-python/0.1.0", token="s3cret")]
    assert server.state is State.HELLO_RECEIVED

    assert deliver(server.send(WELCOME), client) == [WELCOME]
    assert client.state is server.state is State.OPEN
    assert client.next_event() is NEED_DATA
    assert server.next_event() is NEED_DATA


def test_only_the_hello_carries_the_preface() -> None:
    client, server = pair()
    wire = request(client)
    assert not wire.startswith(PREFACE)
    assert wire[:4] == struct.pack(">I", len(wire) - 4)
    assert deliver(wire, server) == [Request(id=1, op="send")]


def test_a_hello_without_token_arrives_without_token() -> None:
    _, server = Connection(CLIENT), Connection(SERVER)
    assert deliver(Connection(CLIENT).send(Hello(client="anon")), server) == [
        Hello(client="anon", token=None)
    ]


def test_a_server_error_instead_of_welcome_closes_both_sides() -> None:
    client, server = Connection(CLIENT), Connection(SERVER)
    deliver(client.send(Hello(client="c", token="wrong")), server)
    refusal = Error(id=None, kind="Unauthorized", message="bad token", fields={"user": "c"})

    wire = server.send(refusal)
    assert server.state is State.CLOSED
    assert deliver(wire, client) == [refusal]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="Request"):
        client.send(Request(id=1, op="send"))


def test_a_request_error_during_the_handshake_is_refused_by_the_client() -> None:
    # Before Welcome no request exists, so an Error naming one is the server's mistake.
    client = client_after_hello()
    with pytest.raises(RemoteProtocolError, match="request 1"):
        deliver(frame(Error(id=1, kind="X", message="m")), client)
    assert client.state is State.HELLO_SENT


# -- pipelining, pushes, batches ----------------------------------------------------------


def test_many_requests_in_flight_answered_in_any_order() -> None:
    client, server = pair()
    wire = b"".join(request(client, n=i) for i in range(200))
    assert client.unanswered == 200
    assert client.next_request_id() == 201

    got = deliver(wire, server)
    assert [e.id for e in got] == list(range(1, 201))  # type: ignore[union-attr]
    assert [e.args for e in got] == [{"n": i} for i in range(200)]  # type: ignore[union-attr]

    answers: list[Event] = [
        Error(id=i, kind="QueueNotFound", message=f"no queue for {i}", fields={"queue": "q"})
        if i % 7 == 0
        else Reply(id=i, result={"offset": i * 10})
        for i in range(1, 201)
    ]
    random.Random(4).shuffle(answers)
    back = b"".join(server.send(a) for a in answers)
    assert server.state is State.OPEN

    assert deliver(back, client) == answers
    assert client.unanswered == 0
    assert client.state is State.OPEN  # a request's error does not close the connection


def test_the_client_counts_what_is_unanswered() -> None:
    client, server = pair()
    deliver(request(client) + request(client) + request(client), server)
    assert client.unanswered == 3
    deliver(server.send(Reply(id=2)), client)
    assert client.unanswered == 2
    deliver(server.send(Error(id=3, kind="K", message="m")), client)
    assert client.unanswered == 1
    assert "client" in repr(client)
    assert "open" in repr(client)


def test_pushes_arrive_interleaved_with_replies() -> None:
    client, server = pair()
    deliver(request(client, op="consume", queue="q"), server)
    out = [
        Push(stream=1, data=[b"a", b"b"]),
        Reply(id=1, result={"stream": 1}),
        Push(stream=1, data=None),
        Push(stream=2, data={"k": [1, 2.5, "x", None, True]}),
    ]
    assert deliver(b"".join(server.send(e) for e in out), client) == out
    assert client.unanswered == 0
    assert client.state is State.OPEN


def _bodies(n: int) -> list[bytes]:
    rng = random.Random(1)
    bodies = [b"", b"\x00", bytes(range(256)), PREFACE, struct.pack(">I", 1 << 31)]
    bodies += [rng.randbytes(rng.randrange(0, 300)) for _ in range(n - len(bodies))]
    return bodies


def test_a_batch_of_a_thousand_bodies_round_trips_byte_exact() -> None:
    client, server = pair()
    bodies = _bodies(1000)
    headers = [{"k": i, "trace": "x" * (i % 5)} for i in range(1000)]

    (req,) = deliver(request(client, queue="orders", bodies=bodies, headers=headers), server)
    assert isinstance(req, Request)
    got = req.args["bodies"]
    assert all(type(b) is bytes for b in got)
    assert got == bodies
    assert req.args["headers"] == headers

    (rep,) = deliver(server.send(Reply(id=req.id, result={"bodies": got})), client)
    assert isinstance(rep, Reply)
    assert rep.result["bodies"] == bodies
    assert b"".join(rep.result["bodies"]) == b"".join(bodies)


def _client_traffic() -> tuple[bytes, bytes]:
    """What a client writes: the preface and Hello, then (after Welcome) a few frames."""
    client = Connection(CLIENT)
    hello = client.send(Hello(client="split", token="t"))
    client.receive_data(frame(WELCOME))
    assert client.next_event() == WELCOME
    rest = b"".join(
        request(client, op=f"op{i}", bodies=_bodies(8), n=i) for i in range(5)
    ) + client.send(Goodbye(reason="done"))
    return hello, rest


def _server_traffic() -> bytes:
    server = open_server()
    server.receive_data(b"".join(frame(Request(id=i, op="x")) for i in range(1, 6)))
    events(server)
    out = [
        WELCOME,
        Push(stream=3, data=_bodies(6)),
        Reply(id=2, result=[1, 2]),
        Error(id=1, kind="K", message="m"),
        Reply(id=5),
        Push(stream=3, data={"b": b"\x00\x00\x00\x04"}),
        Reply(id=3),
        Reply(id=4, result=None),
        Goodbye(reason="shutdown"),
    ]
    return frame(out[0]) + b"".join(server.send(e) for e in out[1:])


def _feed_server(chunks: Callable[[bytes], list[bytes]]) -> list[Event]:
    hello, rest = _client_traffic()
    server = Connection(SERVER)
    got: list[Event] = []
    for c in chunks(hello):
        got += deliver(c, server)
    server.send(WELCOME)
    for c in chunks(rest):
        got += deliver(c, server)
    assert server.state is State.CLOSED
    return got


def _client_events(client: Connection, data: bytes) -> list[Event]:
    """Feed ``data`` to a client; on Welcome it pipelines requests 1..5 at once, as a real
    client would, so the replies in ``_server_traffic`` answer something."""
    client.receive_data(data)
    got: list[Event] = []
    while (ev := client.next_event()) is not NEED_DATA:
        assert not isinstance(ev, type(NEED_DATA))
        got.append(ev)
        if isinstance(ev, Welcome):
            for i in range(5):
                client.send(Request(id=i + 1, op="x"))
    return got


def _feed_client(chunks: Callable[[bytes], list[bytes]]) -> list[Event]:
    client = client_after_hello()
    got: list[Event] = []
    for c in chunks(_server_traffic()):
        got += _client_events(client, c)
    assert client.state is State.CLOSED
    assert client.unanswered == 0
    return got


def _whole(data: bytes) -> list[bytes]:
    return [data]


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("feed", [_feed_server, _feed_client], ids=["server", "client"])
def test_one_byte_at_a_time_gives_the_same_events_as_one_chunk(
    feed: Callable[[Callable[[bytes], list[bytes]]], list[Event]],
) -> None:
    whole = feed(_whole)
    assert len(whole) >= 7
    assert feed(_bytewise) == whole
    sizes = random.Random(9)

    def ragged(data: bytes) -> list[bytes]:
        out, i = [], 0
        while i < len(data):
            n = sizes.randrange(1, 40)
            out.append(data[i : i + n])
            i += n
        return out

    assert feed(ragged) == whole


def test_a_split_at_every_byte_boundary_gives_the_same_events() -> None:
    data = _server_traffic()
    expected = _client_events(client_after_hello(), data)
    assert len(expected) >= 3
    for cut in range(1, len(data)):  # b"" would mean EOF, so both halves are non-empty
        conn = client_after_hello()
        got = _client_events(conn, data[:cut]) + _client_events(conn, data[cut:])
        assert got == expected, cut


# -- illegal moves by this side: LocalProtocolError ---------------------------------------


@pytest.mark.parametrize(
    ("setup", "event", "words"),
    [
        ("client-start", Request(id=1, op="send"), ("Request", "'start'")),
        ("client-hello-sent", Request(id=1, op="send"), ("Request", "'hello-sent'")),
        ("client-hello-sent", Hello(client="again"), ("Hello", "'hello-sent'")),
        ("client-open", Hello(client="again"), ("Hello", "'open'")),
        ("client-open", WELCOME, ("Welcome", "'open'")),
        ("client-open", Reply(id=1), ("Reply", "'open'")),
        ("client-open", Push(stream=1), ("Push", "'open'")),
        ("client-open", Error(id=None, kind="K", message="m"), ("Error", "'open'")),
        ("client-start", Error(id=None, kind="K", message="m"), ("Error", "'start'")),
        ("server-start", WELCOME, ("Welcome", "'start'")),
        ("server-start", Reply(id=1), ("Reply", "'start'")),
        ("server-hello-received", Reply(id=1), ("Reply", "'hello-received'")),
        ("server-hello-received", Push(stream=1), ("Push", "'hello-received'")),
        ("server-open", WELCOME, ("Welcome", "'open'")),
        ("server-open", Hello(client="x"), ("Hello", "'open'")),
        ("server-open", Request(id=1, op="x"), ("Request", "'open'")),
    ],
)
def test_an_illegal_send_is_a_local_error_naming_event_and_state(
    setup: str, event: Event, words: tuple[str, ...]
) -> None:
    conn = _in_state(setup)
    before = (conn.state, conn.next_request_id(), conn.unanswered)
    with pytest.raises(LocalProtocolError) as info:
        conn.send(event)
    for w in words:
        assert w in str(info.value)
    assert conn.role.value in str(info.value)
    assert (conn.state, conn.next_request_id(), conn.unanswered) == before  # nothing moved


def _in_state(setup: str) -> Connection:
    if setup == "client-start":
        return Connection(CLIENT)
    if setup == "client-hello-sent":
        return client_after_hello()
    if setup == "client-open":
        return pair()[0]
    if setup == "server-start":
        return Connection(SERVER)
    if setup == "server-hello-received":
        return server_after_hello()
    assert setup == "server-open"
    return open_server()


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("closed_by", ["goodbye-sent", "goodbye-received"])
def test_nothing_may_be_sent_after_goodbye(side: str, closed_by: str) -> None:
    client, server = pair()
    me, peer = (client, server) if side == "client" else (server, client)
    if closed_by == "goodbye-sent":
        deliver(me.send(Goodbye()), peer)
    else:
        deliver(peer.send(Goodbye()), me)
    assert me.state is peer.state is State.CLOSED
    then = Request(id=1, op="x") if side == "client" else Reply(id=1)
    with pytest.raises(LocalProtocolError, match=rf"{type(then).__name__} in state 'closed'"):
        me.send(then)
    with pytest.raises(LocalProtocolError, match="Goodbye: the connection is closed"):
        me.send(Goodbye())


def test_the_server_cannot_answer_after_its_connection_error() -> None:
    server = open_server()
    server.send(Error(id=None, kind="Overloaded", message="bye"))
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="Reply in state 'closed'"):
        server.send(Reply(id=1))


def test_request_ids_must_count_up_by_one() -> None:
    client, server = pair()
    with pytest.raises(LocalProtocolError, match="request id 2 is out of order: expected 1"):
        client.send(Request(id=2, op="x"))
    with pytest.raises(LocalProtocolError, match="request id 0 is out of order"):
        client.send(Request(id=0, op="x"))
    assert (client.next_request_id(), client.unanswered) == (1, 0)

    deliver(client.send(Request(id=1, op="x")), server)
    with pytest.raises(LocalProtocolError, match="request id 1 is out of order: expected 2"):
        client.send(Request(id=1, op="again"))  # a retry must take a new id
    assert (client.next_request_id(), client.unanswered) == (2, 1)


def test_no_more_than_max_in_flight_requests_unanswered() -> None:
    client, server = pair()
    wire = b"".join(request(client) for _ in range(MAX_IN_FLIGHT))
    assert client.unanswered == MAX_IN_FLIGHT
    with pytest.raises(LocalProtocolError, match=f"more than {MAX_IN_FLIGHT} requests"):
        request(client)
    assert client.next_request_id() == MAX_IN_FLIGHT + 1  # the refused id was not used

    assert len(deliver(wire, server)) == MAX_IN_FLIGHT
    deliver(server.send(Reply(id=17)), client)
    deliver(request(client), server)  # one answer frees one slot
    assert client.unanswered == MAX_IN_FLIGHT
    with pytest.raises(LocalProtocolError, match="unanswered"):
        request(client)


# -- illegal moves by the peer: RemoteProtocolError ---------------------------------------


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (Reply(id=99), "request 99, which is not outstanding"),
        (Error(id=99, kind="K", message="m"), "request 99, which is not outstanding"),
        (Reply(id=0), "request 0"),
    ],
)
def test_the_client_refuses_an_answer_to_an_unknown_request(answer: Event, words: str) -> None:
    client, server = pair()
    deliver(request(client), server)
    with pytest.raises(RemoteProtocolError, match=words):
        deliver(frame(answer), client)
    assert client.unanswered == 1


@pytest.mark.parametrize("second", [Reply(id=1), Error(id=1, kind="K", message="m")])
def test_the_client_refuses_a_second_answer_to_one_request(second: Event) -> None:
    client, server = pair()
    deliver(request(client), server)
    assert deliver(server.send(Reply(id=1, result="first")), client) == [
        Reply(id=1, result="first")
    ]
    with pytest.raises(RemoteProtocolError, match="request 1, which is not outstanding"):
        deliver(frame(second), client)


@pytest.mark.parametrize(("first", "then"), [(1, 1), (5, 5), (5, 4), (1, 0), (1, -3)])
def test_the_server_refuses_a_request_id_that_does_not_grow(first: int, then: int) -> None:
    server = open_server()
    assert deliver(frame(Request(id=first, op="x")), server) == [Request(id=first, op="x")]
    with pytest.raises(RemoteProtocolError, match=rf"request id {then} is not above the last"):
        deliver(frame(Request(id=then, op="x")), server)
    # ids may skip (a client that gave up on one), as long as they grow
    assert deliver(frame(Request(id=first + 10, op="x")), server) == [
        Request(id=first + 10, op="x")
    ]


def test_the_server_refuses_a_first_request_id_below_one() -> None:
    server = open_server()
    with pytest.raises(RemoteProtocolError, match="request id 0 is not above the last"):
        deliver(frame(Request(id=0, op="x")), server)


@pytest.mark.parametrize(
    ("make", "incoming", "words"),
    [
        ("server-hello-received", Hello(client="twice"), ("Hello", "'hello-received'")),
        ("server-open", Hello(client="twice"), ("Hello", "'open'")),
        ("server-hello-received", Request(id=1, op="x"), ("Request", "'hello-received'")),
        ("server-start", Request(id=1, op="x"), ("Request", "'start'")),
        ("server-start", WELCOME, ("Welcome", "'start'")),
        ("server-open", WELCOME, ("Welcome", "'open'")),
        ("server-open", Reply(id=1), ("Reply", "'open'")),
        ("server-open", Push(stream=1), ("Push", "'open'")),
        ("server-open", Error(id=None, kind="K", message="m"), ("Error", "'open'")),
        ("client-hello-sent", Reply(id=1), ("Reply", "'hello-sent'")),
        ("client-hello-sent", Push(stream=1), ("Push", "'hello-sent'")),
        ("client-hello-sent", Hello(client="x"), ("Hello", "'hello-sent'")),
        ("client-hello-sent", Request(id=1, op="x"), ("Request", "'hello-sent'")),
        ("client-start", WELCOME, ("Welcome", "'start'")),
        ("client-open", WELCOME, ("Welcome", "'open'")),
        ("client-open", Request(id=1, op="x"), ("Request", "'open'")),
        ("client-open", Hello(client="x"), ("Hello", "'open'")),
    ],
)
def test_an_illegal_event_from_the_peer_is_a_remote_error_naming_event_and_state(
    make: str, incoming: Event, words: tuple[str, ...]
) -> None:
    conn = _in_state(make)
    data = frame(incoming)
    if make == "server-start":
        data = GREETING + data
    before = conn.state
    with pytest.raises(RemoteProtocolError) as info:
        deliver(data, conn)
    for w in words:
        assert w in str(info.value)
    assert f"a {conn.role.value} can't recv" in str(info.value)
    assert conn.state is before


def test_a_refused_event_is_not_half_applied() -> None:
    # The server refuses a non-growing id; the id it saw last still stands.
    server = open_server()
    deliver(frame(Request(id=3, op="x")), server)
    with pytest.raises(RemoteProtocolError):
        deliver(frame(Request(id=2, op="x")), server)
    with pytest.raises(RemoteProtocolError, match="not above the last \\(3\\)"):
        deliver(frame(Request(id=3, op="x")), server)


def test_the_table_only_holds_legal_directions() -> None:
    # Each role sends only its own events and receives only the other's.
    client_sends = {Hello, Request}
    server_sends = {Welcome, Reply, Push, Error}
    for (role, _state, direction, kind), new in TRANSITIONS.items():
        mine = client_sends if role is CLIENT else server_sends
        theirs = server_sends if role is CLIENT else client_sends
        assert kind in (mine if direction == "send" else theirs)
        assert isinstance(new, State)
        assert _state is not State.CLOSED  # nothing leaves CLOSED


# -- bad input at the server --------------------------------------------------------------

_BAD_PREFACES: list[tuple[str, bytes, str]] = [
    ("http-get", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "HTTP request"),
    ("http-post", b"POST /q HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP request"),
    ("http2", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP request"),
    ("garbage", b"\x00\x01\x02garbage garbage", "preface is wrong"),
    ("text", b"hello\r\n", "preface is wrong"),
    ("preface-typo", b"\x89ARW\r\n\x1a\n\x00\x01", "preface is wrong"),
    ("preface-late-typo", PREFACE[:-1] + b"\r\x00\x01", "preface is wrong"),
    ("tls", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "preface is wrong"),
    ("version-2", PREFACE + b"\x00\x02", "version 2 is not supported"),
    ("version-0", PREFACE + b"\x00\x00", "version 0 is not supported"),
    ("version-256", PREFACE + b"\x01\x00", "version 256 is not supported"),
    ("frame-without-preface", frame(Hello(client="x")), "preface is wrong"),
]


def _client_for(stage: str) -> Connection:
    """A client in the state it would be in when the server fails at ``stage``."""
    if stage == "open":
        return pair()[0]
    return client_after_hello()


def _assert_error_reaches_client(
    server: Connection, exc: RemoteProtocolError, client: Connection
) -> None:
    wire = server.send(error_for(exc))
    assert server.state is State.CLOSED
    got = deliver(wire, client)
    assert got == [Error(id=None, kind="ProtocolError", message=str(exc))]
    assert client.state is State.CLOSED


@pytest.mark.parametrize(("data", "words"), [(d, w) for _, d, w in _BAD_PREFACES],
                         ids=[n for n, _, _ in _BAD_PREFACES])  # fmt: skip
def test_a_bad_start_is_refused_and_answered(data: bytes, words: str) -> None:
    server = Connection(SERVER)
    with pytest.raises(RemoteProtocolError, match=words) as info:
        deliver(data, server)
    assert server.state is State.START
    _assert_error_reaches_client(server, info.value, _client_for("start"))


def test_a_wrong_version_names_both_versions() -> None:
    server = Connection(SERVER)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(PREFACE + struct.pack(">H", 7), server)
    msg = str(info.value)
    assert "version 7" in msg
    assert f"version {VERSION}" in msg


def test_an_http_request_gets_advice_not_just_a_refusal() -> None:
    server = Connection(SERVER)
    with pytest.raises(RemoteProtocolError, match="not HTTP") as info:
        deliver(b"GET /metrics HTTP/1.1\r\n\r\n", server)
    assert "arrival://" in str(info.value)


def test_a_partial_preface_waits_for_more() -> None:
    server = Connection(SERVER)
    for i in range(len(GREETING)):
        assert deliver(GREETING[i : i + 1], server) == []
    assert deliver(frame(Hello(client="slow")), server) == [Hello(client="slow")]


_MAX = 1024  # the server's max_frame in the frame tests: small, so oversize is cheap

_BAD_FRAMES: list[tuple[str, bytes, str]] = [
    ("oversized-header-only", struct.pack(">I", _MAX + 1), f"frame of {_MAX + 1} bytes"),
    ("huge-header-only", b"\xff\xff\xff\xff", f"frame of {2**32 - 1} bytes"),
    ("empty", struct.pack(">I", 0), "an empty frame"),
    ("not-msgpack", raw_frame(b"\xc1"), "not an arrival event"),
    ("truncated-msgpack", raw_frame(b"\x92\x01"), "not an arrival event"),
    ("trailing-bytes", raw_frame(msgspec.msgpack.encode(Goodbye()) + b"\x00"), "not an arrival"),
    ("a-list", frame([1, 2, 3]), "not an arrival event"),
    ("an-int", frame(42), "not an arrival event"),
    ("unknown-tag", frame({"type": "nope", "id": 1}), "not an arrival event"),
    ("no-tag", frame({"id": 1, "op": "x"}), "not an arrival event"),
    ("missing-field", frame({"type": "req", "id": 1}), "not an arrival event"),
    ("wrong-type", frame({"type": "req", "id": "1", "op": "x"}), "not an arrival event"),
    ("bool-id", frame({"type": "req", "id": True, "op": "x"}), "not an arrival event"),
    ("args-not-map", frame({"type": "req", "id": 1, "op": "x", "args": [1]}), "not an arrival"),
    ("float-id", frame({"type": "req", "id": 1.0, "op": "x"}), "not an arrival event"),
]


def _server_at(stage: str) -> Connection:
    server = Connection(SERVER, max_frame=_MAX)
    if stage == "start":
        assert deliver(GREETING, server) == []
        return server
    deliver(GREETING + frame(Hello(client="raw")), server)
    if stage == "open":
        server.send(WELCOME)
    return server


@pytest.mark.parametrize("stage", ["start", "hello-received", "open"])
@pytest.mark.parametrize(("data", "words"), [(d, w) for _, d, w in _BAD_FRAMES],
                         ids=[n for n, _, _ in _BAD_FRAMES])  # fmt: skip
def test_a_bad_frame_is_refused_and_answered(stage: str, data: bytes, words: str) -> None:
    server = _server_at(stage)
    before = server.state
    with pytest.raises(RemoteProtocolError) as info:
        deliver(data, server)
    assert words in str(info.value)
    assert server.state is before
    _assert_error_reaches_client(server, info.value, _client_for(stage))


def test_the_largest_request_id_is_a_request_id() -> None:
    # uint64 max is a valid MessagePack int: legal when open, refused before
    huge = raw_frame(b"\x83\xa4type\xa3req\xa2id\xcf" + b"\xff" * 8 + b"\xa2op\xa1x")
    assert deliver(huge, _server_at("open")) == [Request(id=2**64 - 1, op="x")]
    with pytest.raises(RemoteProtocolError, match="can't recv Request in state 'hello-received'"):
        deliver(huge, _server_at("hello-received"))


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    server = _server_at("open")
    deliver(struct.pack(">I", _MAX + 1)[:3], server)  # not even a whole header yet
    with pytest.raises(RemoteProtocolError, match=rf"{_MAX + 1} bytes, more than max_frame"):
        deliver(b"\x01", server)  # the last header byte, no body


def test_a_frame_of_exactly_max_frame_is_accepted() -> None:
    server = _server_at("open")
    base = msgspec.msgpack.encode(Request(id=1, op="x", args={"b": b""}))
    pad = _MAX - len(base) - 1  # a bin8 length grows the header by one byte once past 0
    event = Request(id=1, op="x", args={"b": b"\x00" * pad})
    assert len(msgspec.msgpack.encode(event)) == _MAX
    assert deliver(frame(event), server) == [event]
    bigger = Request(id=2, op="x", args={"b": b"\x00" * (pad + 1)})
    with pytest.raises(RemoteProtocolError, match="more than max_frame"):
        deliver(frame(bigger), server)


@pytest.mark.parametrize("stage", ["start", "hello-received", "open"])
@pytest.mark.parametrize("keep", [1, 3, 4, 5, -1])
def test_a_frame_truncated_at_eof_is_refused(stage: str, keep: int) -> None:
    server = _server_at(stage)
    whole = frame(Request(id=1, op="send", args={"b": b"xyz"}))
    assert deliver(whole[:keep], server) == []
    server.receive_data(b"")
    assert server.peer_closed
    with pytest.raises(RemoteProtocolError, match="closed in the middle of a frame") as info:
        server.next_event()
    _assert_error_reaches_client(server, info.value, _client_for(stage))


def test_a_preface_truncated_at_eof_is_refused() -> None:
    server = Connection(SERVER)
    deliver(PREFACE[:5], server)
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="5 bytes"):
        server.next_event()


def test_eof_between_frames_is_clean() -> None:
    client, server = pair()
    deliver(request(client), server)
    server.receive_data(b"")
    assert server.next_event() is NEED_DATA
    assert server.peer_closed
    assert server.state is State.OPEN  # the caller decides; nothing was cut in half


@pytest.mark.parametrize("side", ["client", "server"])
def test_data_after_goodbye_is_refused(side: str) -> None:
    client, server = pair()
    me, peer = (server, client) if side == "server" else (client, server)
    after = request(client) if side == "server" else frame(Reply(id=1))
    bye = peer.send(Goodbye(reason="done"))
    with pytest.raises(RemoteProtocolError, match="data after the connection closed"):
        deliver(bye + after, me)
    assert me.state is State.CLOSED
    # The connection is closed: no Error frame can follow, the caller just closes.
    if side == "server":
        with pytest.raises(LocalProtocolError, match="closed"):
            me.send(error_for(RemoteProtocolError("x")))


def test_data_after_a_connection_error_is_refused() -> None:
    client = client_after_hello()
    wire = frame(Error(id=None, kind="Unauthorized", message="no")) + frame(WELCOME)
    with pytest.raises(RemoteProtocolError, match="after the connection closed"):
        deliver(wire, client)
    assert client.state is State.CLOSED


# -- the client's own bad input -----------------------------------------------------------


def test_the_client_refuses_an_oversized_frame_from_the_server() -> None:
    client = Connection(CLIENT, max_frame=_MAX)
    client.send(Hello(client="c"))
    with pytest.raises(RemoteProtocolError, match="more than max_frame"):
        deliver(struct.pack(">I", _MAX + 1), client)


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x00", raw_frame(b"\xc1"), frame({"type": "x"})])
def test_the_client_refuses_bad_frames(data: bytes) -> None:
    client = client_after_hello()
    with pytest.raises(RemoteProtocolError):
        deliver(data, client)


def test_a_client_does_not_expect_a_preface() -> None:
    client = client_after_hello()
    with pytest.raises(RemoteProtocolError):
        deliver(GREETING + frame(WELCOME), client)


# -- max_frame ----------------------------------------------------------------------------


def test_the_client_refuses_to_send_a_frame_over_max_frame() -> None:
    client, _ = pair(max_frame=_MAX)
    event = Request(id=1, op="send", args={"body": b"x" * _MAX})
    size = len(msgspec.msgpack.encode(event))
    with pytest.raises(LocalProtocolError) as info:
        client.send(event)
    msg = str(info.value)
    assert f"{size} bytes" in msg
    assert f"({_MAX} bytes)" in msg
    assert "Request" in msg


def test_the_server_refuses_to_send_a_frame_over_max_frame() -> None:
    server = _server_at("open")
    with pytest.raises(LocalProtocolError, match=r"Push frame of .* exceeds max_frame"):
        server.send(Push(stream=1, data=b"y" * _MAX))


@pytest.mark.parametrize("bad", [10, 0, -1, 63, MIN_FRAME - 1, (1 << 31) + 1, 1 << 40])
def test_an_unusable_max_frame_is_refused(bad: int) -> None:
    with pytest.raises(LocalProtocolError, match=rf"max_frame .* not {bad}\b"):
        Connection(CLIENT, max_frame=bad)
    with pytest.raises(LocalProtocolError):
        Connection(SERVER, max_frame=bad)


@pytest.mark.parametrize("ok", [MIN_FRAME, 1 << 31, DEFAULT_MAX_FRAME])
def test_max_frame_limits_are_inclusive(ok: int) -> None:
    assert Connection(SERVER, max_frame=ok).max_frame == ok


# -- Goodbye and EOF ----------------------------------------------------------------------


@pytest.mark.parametrize("who", ["client", "server"])
@pytest.mark.parametrize("stage", ["hello", "open"])
def test_goodbye_from_either_side_closes_both(who: str, stage: str) -> None:
    if stage == "open":
        client, server = pair()
        deliver(request(client), server)
    else:
        client, server = Connection(CLIENT), Connection(SERVER)
        deliver(client.send(Hello(client="c")), server)
    me, peer = (client, server) if who == "client" else (server, client)
    assert deliver(me.send(Goodbye(reason="shutting down")), peer) == [
        Goodbye(reason="shutting down")
    ]
    assert me.state is peer.state is State.CLOSED
    assert peer.next_event() is NEED_DATA


def test_goodbye_from_a_server_that_read_nothing() -> None:
    server = Connection(SERVER)
    client = Connection(CLIENT)
    assert deliver(server.send(Goodbye(reason="full")), client) == [Goodbye(reason="full")]
    assert client.state is server.state is State.CLOSED


def test_goodbye_from_a_client_that_sent_nothing_is_understood() -> None:
    client, server = Connection(CLIENT), Connection(SERVER)
    wire = client.send(Goodbye(reason="changed my mind"))
    assert client.state is State.CLOSED
    # Either nothing goes on the wire, or what does is a clean Goodbye for the server.
    assert deliver(wire, server) in ([], [Goodbye(reason="changed my mind")])


def test_receive_data_after_eof_is_a_local_error() -> None:
    for conn in (Connection(CLIENT), Connection(SERVER), pair()[1]):
        conn.receive_data(b"")
        conn.receive_data(b"")  # saying it twice is harmless
        with pytest.raises(LocalProtocolError, match="after the peer closed"):
            conn.receive_data(b"\x00")


def test_error_for_makes_a_connection_error() -> None:
    exc = RemoteProtocolError("the peer sent nonsense")
    err = error_for(exc)
    assert err == Error(id=None, kind="ProtocolError", message="the peer sent nonsense")
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


# -- bugs ---------------------------------------------------------------------------------


def test_a_refused_oversized_send_changes_nothing() -> None:
    client, _ = pair(max_frame=_MAX)
    with pytest.raises(LocalProtocolError):
        client.send(Request(id=1, op="send", args={"body": b"x" * _MAX}))
    assert (client.next_request_id(), client.unanswered) == (1, 0)
    client.send(Request(id=1, op="send", args={"body": b"smaller"}))  # the retry

    hello = Connection(CLIENT, max_frame=MIN_FRAME)
    with pytest.raises(LocalProtocolError):
        hello.send(Hello(client="c" * 2 * MIN_FRAME))
    assert hello.state is State.START


@pytest.mark.parametrize("args", [{"a": object()}, {"n": 1 << 70}])
def test_an_unencodable_payload_is_a_local_error(args: dict[str, Any]) -> None:
    client, _ = pair()
    with pytest.raises(LocalProtocolError):
        client.send(Request(id=1, op="send", args=args))
    assert client.unanswered == 0


@pytest.mark.parametrize(
    "event", [Request(id=True, op="x"), Request(id=1, op=5), Request(id=1, op="x", args={1: 2})]
)
def test_an_ill_typed_event_is_refused_on_send(event: Request) -> None:
    client, server = pair()
    try:
        wire = client.send(event)
    except LocalProtocolError:
        return
    deliver(wire, server)  # raises RemoteProtocolError at the server: the bug shows there


@pytest.mark.parametrize("side", ["server", "client"])
def test_deeply_nested_payload_is_a_remote_error(side: str) -> None:
    depth = 100_000
    nested = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
    if side == "server":
        conn = open_server()
        payload = b"\x84\xa4type\xa3req\xa2id\x01\xa2op\xa1x\xa4args\x81\xa1k" + nested
    else:
        conn, server = pair()
        deliver(request(conn), server)
        payload = b"\x83\xa4type\xa3rep\xa2id\x01\xa6result" + nested
    with pytest.raises(RemoteProtocolError):
        deliver(raw_frame(payload), conn)


def test_an_http_request_is_recognised_however_it_is_split() -> None:
    server = Connection(SERVER)
    data = b"GET / HTTP/1.1\r\n\r\n"
    for b in data[:3]:
        assert deliver(bytes([b]), server) == []  # "GET" could still become "GET "
    with pytest.raises(RemoteProtocolError, match="HTTP request"):
        deliver(data[3:], server)


def test_the_error_frame_fits_the_smallest_max_frame() -> None:
    server = Connection(SERVER, max_frame=MIN_FRAME)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(PREFACE + struct.pack(">H", 5), server)
    wire = server.send(error_for(info.value))
    (err,) = deliver(wire, _client_for("start"))
    assert isinstance(err, Error)
    assert err.id is None
    assert err.message


def test_raw_results_leave_a_replys_result_as_msgpack_for_the_caller() -> None:
    # the client decodes a reply's result into the type it expects in one pass
    client, server = pair(raw_results=True)
    client.send(Request(id=1, op="receive"))
    result = [1.5, [[0, 1, 0.0, [1.0, None, None, None, b"body"]]]]
    (reply,) = deliver(server.send(Reply(1, result)), client)
    assert isinstance(reply, Reply)
    assert isinstance(reply.result, msgspec.Raw)
    assert msgspec.msgpack.decode(reply.result) == result
    typed = msgspec.msgpack.decode(
        reply.result, type=tuple[float, list[tuple[int, int, float, Any]]]
    )
    assert typed[1][0][:3] == (0, 1, 0.0)
    # errors and pushes are still plain events, and the envelope is still checked
    client.send(Request(id=2, op="x"))
    (err,) = deliver(server.send(Error(2, "UsageError", "no")), client)
    assert err == Error(2, "UsageError", "no")
    with pytest.raises(RemoteProtocolError):
        deliver(frame({"type": "rep", "id": "three", "result": 1}), client)
