"""The fault proxy of ``arrival verify``: each fault against a real TCP server on
127.0.0.1, checked by what a client and the server observe; then a real arrival client
and server talking through frames split at random bytes.

The server here reads length-prefixed frames (4-byte big-endian length, then the body)
and echoes each complete frame back, recording every ``recv`` chunk and how each
connection ended, so a test can see a frame cut in two, a frame never completed, or a
connection closed under the client's feet.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import arrival
from arrival.errors import UsageError
from arrival.storage.memory import MemoryStorage
from arrival.verify.proxy import FaultProxy
from inprocess_server import InProcessServer

WAIT_S = 5.0  # for what must happen: generous, only a failing test waits this long
QUIET_S = 0.1  # for what must not happen: long enough for the proxy to have done it


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def wait_for(check: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class ServerConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.chunks: list[bytes] = []
        self.ended = threading.Event()
        self.how = ""  # "eof" or "reset" once ended

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)

    def serve(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    self.how = "eof"
                    return
                self.chunks.append(data)
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    n = 4 + struct.unpack(">I", buf[:4])[0]
                    self.sock.sendall(buf[:n])
                    buf = buf[n:]
        except ConnectionResetError:
            self.how = "reset"
        except OSError as e:
            self.how = f"error: {e}"
        finally:
            self.ended.set()
            self.sock.close()


class FrameServer:
    """Echoes complete length-prefixed frames; one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[ServerConn] = []
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            conn = ServerConn(sock)
            self.conns.append(conn)
            t = threading.Thread(target=conn.serve, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(WAIT_S)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, body: bytes) -> None:
        self.sock.sendall(frame(body))

    def read_frame(self, timeout: float = WAIT_S) -> tuple[bytes, int]:
        """The next frame's body, and in how many ``recv`` chunks it came."""
        self.sock.settimeout(timeout)
        buf, chunks = b"", 0
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the connection was closed (FIN)")
            buf += data
            chunks += 1
        return buf[4:], chunks

    def request(self, body: bytes) -> tuple[bytes, int]:
        self.send(body)
        return self.read_frame()

    def nothing_comes(self) -> bool:
        """No byte arrives within QUIET_S (and the connection is not closed either)."""
        self.sock.settimeout(QUIET_S)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return True
        raise AssertionError(f"expected silence, got {data!r}")

    def sees_reset(self) -> bool:
        """Whatever was forwarded before, then ECONNRESET: not a FIN, not silence."""
        self.sock.settimeout(WAIT_S)
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            return True
        raise AssertionError("the connection was closed with a FIN, not reset")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[FrameServer]:
    s = FrameServer()
    yield s
    s.close()


@pytest.fixture
def proxy(server: FrameServer) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", server.port), seed=7) as p:
        yield p


@pytest.fixture
def clients(proxy: FaultProxy) -> Iterator[Callable[..., Client]]:
    """Opens clients through the proxy, each with one answered request behind it (so the
    proxy has it connected upstream) unless ``answered=False``; closes them at the end."""
    opened: list[Client] = []

    def open_one(answered: bool = True) -> Client:
        c = Client(proxy.port)
        opened.append(c)
        if answered:
            assert c.request(b"hello") == (b"hello", 1)
        return c

    yield open_one
    for c in opened:
        c.close()


BODY = bytes(range(256)) * 16  # 4 KiB: one chunk on loopback, unless something cuts it


def test_split_delivers_the_same_bytes_in_more_chunks(
    server: FrameServer, proxy: FaultProxy, clients: Callable[..., Client]
) -> None:
    c = clients()
    conn = server.conns[0]
    before = len(conn.chunks)
    assert c.request(BODY) == (BODY, 1)  # whole, both ways
    assert len(conn.chunks) == before + 1
    proxy.split(True)
    down = up = 0
    for _ in range(5):
        before = len(conn.chunks)
        body, chunks = c.request(BODY)
        assert body == BODY
        down += chunks
        up += len(conn.chunks) - before
    assert conn.received.endswith(frame(BODY) * 5)
    assert down > 5, "the replies were not split"
    assert up > 5, "the requests were not split"
    # every chunk, both ways (counted just after its last piece went out)
    wait_for(lambda: proxy.stats().split_chunks == 10, "10 split chunks")
    proxy.split(False)
    assert c.request(BODY) == (BODY, 1)


def test_cut_mid_frame_forwards_a_strict_prefix_of_every_open_connection_then_resets(
    server: FrameServer, proxy: FaultProxy, clients: Callable[..., Client]
) -> None:
    a, b = clients(), clients()
    assert proxy.cut_mid_frame() == 2
    later = clients()  # opened after the call: not armed
    for client, conn in ((a, server.conns[0]), (b, server.conns[1])):
        client.send(BODY)
        assert client.sees_reset()
        assert conn.ended.wait(WAIT_S)
        assert conn.how == "reset"
        got = conn.received[len(frame(b"hello")) :]
        assert 0 < len(got) < len(frame(BODY)), "not a strict, non-empty prefix"
        assert frame(BODY).startswith(got)
    assert later.request(BODY) == (BODY, 1)
    assert proxy.counts == {"cut_mid_frame": 2}


def test_half_open_swallows_the_clients_writes_and_closes_the_server_side(
    server: FrameServer, proxy: FaultProxy, clients: Callable[..., Client]
) -> None:
    c = clients()
    conn = server.conns[0]
    assert proxy.half_open() == 1
    assert conn.ended.wait(WAIT_S)
    assert conn.how == "eof"  # the server sees its connection closed
    before = len(conn.received)
    # More than the kernel buffers of the path could hold: the writes succeed because the
    # proxy reads and drops them, not because they are queued somewhere.
    for _ in range(16):
        c.send(bytes(1 << 20))
    assert c.nothing_comes()  # no reply, and no FIN or RST either
    assert len(conn.received) == before
    s = proxy.stats()
    assert (s.half_open, s.open_connections) == (1, 1)
    assert clients().request(b"new") == (b"new", 1)  # new connections work
    proxy.heal()
    assert c.sees_reset()  # the healed network answers the orphaned client with RST
    assert proxy.counts == {"half_open": 1}


def test_blackhole_holds_open_connections_and_new_ones_until_healed(
    server: FrameServer, proxy: FaultProxy, clients: Callable[..., Client]
) -> None:
    old = clients()
    proxy.blackhole(True)
    new = clients(answered=False)  # the connect itself succeeds: the proxy accepts it
    old.send(b"old")
    new.send(b"new")
    assert old.nothing_comes()
    assert new.nothing_comes()
    assert len(server.conns) == 1  # the new one was never connected upstream
    s = proxy.stats()
    assert (s.pending, s.open_connections, s.connections) == (1, 2, 1)
    proxy.heal()
    assert old.read_frame() == (b"old", 1)  # held bytes flow, on the same connection
    assert new.read_frame() == (b"new", 1)
    assert len(server.conns) == 2
    assert proxy.counts == {"blackhole": 1}


def test_heal_undoes_every_fault_and_keeps_the_connections(
    server: FrameServer, proxy: FaultProxy, clients: Callable[..., Client]
) -> None:
    c = clients()
    proxy.hold(up=True, down=True)
    proxy.delay(1.0, jitter=1.0)
    proxy.split(True)
    proxy.refuse(True)
    proxy.cut_after(0)
    c.send(BODY)
    assert c.nothing_comes()  # held
    proxy.heal()
    start = time.monotonic()
    assert c.read_frame() == (BODY, 1)  # not split
    assert time.monotonic() - start < 0.5  # not delayed
    assert c.request(BODY) == (BODY, 1)
    assert clients().request(BODY) == (BODY, 1)  # neither refused nor cut after 0 bytes
    assert [conn.how for conn in server.conns] == ["", ""]  # both still open
    assert proxy.stats().open_connections == 2
    assert repr(proxy).endswith("2 open, faults on: none>")


def test_delay_adds_latency_with_jitter(proxy: FaultProxy, clients: Callable[..., Client]) -> None:
    c = clients()
    proxy.delay(0.05)
    start = time.monotonic()
    assert c.request(b"x") == (b"x", 1)
    assert time.monotonic() - start >= 0.1  # each way
    proxy.delay(0.01, jitter=0.04)
    times = []
    for _ in range(6):
        start = time.monotonic()
        c.request(b"x")
        times.append(time.monotonic() - start)
    assert min(times) >= 0.02
    assert max(times) - min(times) > 0.004, f"no jitter: {times}"
    proxy.delay(0)
    start = time.monotonic()
    c.request(b"x")
    assert time.monotonic() - start < 0.02
    assert proxy.counts == {"delay": 1}  # switched on once; changing it is not a new fault
    with pytest.raises(UsageError, match="0 or more"):
        proxy.delay(-1)


def test_counts_count_faults_that_took_effect(
    server: FrameServer, proxy: FaultProxy, clients: Callable[..., Client]
) -> None:
    a, b = clients(), clients()
    for _ in range(2):  # each mode counts when switched on, not when repeated
        proxy.hold(up=True)
        proxy.split(True)
        proxy.refuse(True)
        proxy.blackhole(True)
    proxy.hold(up=True, down=True)  # one more direction held: a new hold
    proxy.heal()
    assert proxy.cut_mid_frame() == 2
    proxy.heal()  # disarmed before either sent anything: never fired, not counted
    assert a.request(b"a") == (b"a", 1)
    assert proxy.cut() == 2
    assert a.sees_reset()
    assert b.sees_reset()
    assert proxy.cut() == 0
    proxy.cut_after(3)
    c = clients(answered=False)
    c.send(b"cut")
    assert c.sees_reset()
    wait_for(lambda: len(server.conns) == 3 and server.conns[2].ended.is_set(), "the cut")
    assert server.conns[2].received == frame(b"cut")[:3]
    assert proxy.counts == {
        "hold": 2,
        "split": 1,
        "refuse": 1,
        "blackhole": 1,
        "cut": 2,
        "cut_after": 1,
    }
    assert proxy.stats().faults == proxy.counts


def test_close_resets_every_connection_and_stops_its_threads(server: FrameServer) -> None:
    def threads(p: FaultProxy) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(f"faultproxy-{p.port}-")]

    proxy = FaultProxy(("127.0.0.1", server.port))
    opened: list[Client] = []
    try:
        c = Client(proxy.port)
        opened.append(c)
        assert c.request(b"x") == (b"x", 1)
        proxy.blackhole(True)
        pending = Client(proxy.port)
        opened.append(pending)
        wait_for(lambda: proxy.stats().pending == 1, "the pending connection")
        assert len(threads(proxy)) == 4  # accept, up, down, pending
        proxy.close()
        assert threads(proxy) == []
        assert c.sees_reset()
        assert pending.sees_reset()
        assert len(server.conns) == 1
        assert "closed" in repr(proxy)
    finally:
        proxy.close()
        for client in opened:
            client.close()


def test_an_arrival_client_works_through_frames_split_at_random_bytes() -> None:
    server = InProcessServer(MemoryStorage())
    proxy = FaultProxy(("127.0.0.1", server.port), seed=11)
    proxy.split(True)  # from the handshake on
    b = arrival.connect(proxy.url)
    try:
        b.create_queue("q", "at-least-once")
        p = b.producer()
        n = 200
        for i in range(n):
            p.send("q", b"%d" % i)
        c = b.consumer("q", "g")
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT_S
        while len(got) < n and time.monotonic() < deadline:
            msgs = c.receive_batch(n, timeout=1.0)
            got += [m.body for m in msgs]
            if msgs:
                c.ack_batch(msgs)
        assert got == [b"%d" % i for i in range(n)]  # all, once each, in order
        assert c.receive(timeout=0.05) is None
        assert server.engine.stats("q").sent == n
        assert b._b.reconnects == 0  # type: ignore[attr-defined]  # no frame misread
        assert proxy.stats().split_chunks >= 2 * n  # every request and every reply
    finally:
        b.close()
        proxy.close()
        server.stop()


def test_a_cut_while_connecting_upstream_ends_that_connection_only(
    server: FrameServer, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``arrival verify`` cuts at any moment: one landing while the proxy connects a new
    client upstream ends that client only; the proxy goes on accepting."""
    real = socket.create_connection
    armed = [True]

    def connect_then_cut(*args: Any, **kwargs: Any) -> socket.socket:
        sock = real(*args, **kwargs)
        if threading.current_thread().name.endswith("-accept") and armed[0]:
            armed[0] = False
            assert proxy.cut() == 1  # the new client, not yet forwarding
        return sock

    def connect_send_read() -> None:
        # the reset may come as soon as the connect returns, or at the send, or the read
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT_S) as s:
            s.sendall(frame(b"x"))
            while s.recv(1 << 16):
                pass
        raise AssertionError("the connection was closed with a FIN, not reset")

    monkeypatch.setattr(socket, "create_connection", connect_then_cut)
    with pytest.raises(ConnectionResetError):
        connect_send_read()
    assert not armed[0]
    assert proxy.stats().connections == 0
    later = Client(proxy.port)
    try:
        assert later.request(b"still here") == (b"still here", 1)  # times out if it stopped
    finally:
        later.close()
