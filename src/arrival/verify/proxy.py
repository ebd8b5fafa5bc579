"""A TCP fault proxy on loopback between clients and a server: the network faults of
``arrival verify`` (the "network" row of the verification design) and of the tests.

``FaultProxy(("127.0.0.1", port), seed=0)`` listens on ``proxy.port`` (``proxy.url`` is
its ``arrival://`` address) and forwards each client connection to the upstream server,
one thread per direction; it runs beside a client or server in the same process. Any
thread may inject a fault at any moment:

- ``cut()``: reset (RST) every open connection, as a killed peer or a crashed router.
- ``cut_after(n)``: the next new connection is reset after ``n`` bytes towards the server.
- ``cut_mid_frame()``: every open connection forwards a random strict prefix of the next
  chunk it sends towards the server (a frame cut in the middle), then is reset.
- ``half_open()``: every open connection loses its server side silently: the server sees
  its connection closed, the client hears nothing (no FIN, no RST), and what it sends is
  swallowed, so only its own timeouts or heartbeats can tell. ``heal()`` or ``cut()``
  ends it with an RST, as the healed network would answer the client's next packet.
- ``hold(up=..., down=...)``: stop forwarding one or both directions, the connections
  left open; ``hold()`` resumes.
- ``delay(s, jitter=0.0)``: every chunk waits ``s`` plus up to ``jitter`` seconds.
- ``split(True)``: every chunk goes out in pieces cut at random bytes, with tiny pauses
  between them, so the peer reads frames split anywhere.
- ``refuse(True)``: new connections are closed at once.
- ``blackhole(True)``: both directions held, and new connections accepted but not
  connected upstream, until ``blackhole(False)`` or ``heal()``.
- ``heal()``: undo every fault without closing the connections that work.

Invariants:

1. Per direction, bytes leave in the order they came, unaltered and never duplicated. A
   fault only delays them, or loses them by ending the connection (the cuts), or swallows
   them on a connection whose server side is gone (half-open).
2. A connection the proxy ends is reset on both sides (SO_LINGER 0, RST), never closed
   with a FIN: the peers see "connection reset", as from a crashed host. The exceptions
   close normally: a client refused (``refuse``) or whose upstream connect failed, and
   the server side of a half-open connection (the server sees EOF).
3. The proxy adds no delay of its own: its sockets have TCP_NODELAY (the arrival client's
   has too), so a chunk is forwarded as soon as it is read.
4. All randomness comes from ``random.Random(seed)``: each connection draws its own
   generators from it in the order the connections are accepted, one per direction, so
   the same seed and the same traffic make the same choices.
5. ``counts`` says how often each fault took effect, by method name: for the faults that
   hit connections (``cut``, ``cut_after``, ``cut_mid_frame``, ``half_open``), the number
   of connections hit, when hit (an armed cut that never fired is not counted); for the
   modes (``hold``, ``delay``, ``split``, ``refuse``, ``blackhole``), how many times a
   call switched one on from off.

Threads, not asyncio, so it works beside any client. ``close()`` (or leaving the ``with``
block) resets everything and stops its threads.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

from arrival.errors import UsageError

__all__ = ["FaultProxy", "ProxyStats"]

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_READ_SIZE = 1 << 16
CONNECT_TIMEOUT_S = 5.0
"""Upstream is on loopback: a connect that takes longer is the server's fault, not the
network's, and the client is closed as if the server had refused it."""
SPLIT_MAX_PIECES = 4
"""Enough to cut a header from its body and a body in two; more pieces only slow a run."""
SPLIT_PAUSE_S = 0.0005
"""Between pieces: long enough for the reader to wake up and read each piece alone,
short enough for hundreds of split frames a second."""
POLL_S = 0.2
"""How often a pump waiting on a socket looks whether its connection has ended: a reset
wakes a reader at once, but a writer stuck on a peer that does not read only by this."""
JOIN_TIMEOUT_S = 2.0
"""How long ``close()`` waits for its threads (all daemons) before returning anyway."""


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """What the proxy has done so far: see ``FaultProxy.stats()``."""

    connections: int  # forwarded upstream so far
    open_connections: int  # not yet ended (the pending and half-open included)
    pending: int  # accepted in a black hole, not yet connected upstream
    half_open: int  # server side gone, client side still open
    bytes_up: int  # forwarded towards the server
    bytes_down: int  # forwarded towards the clients
    split_chunks: int  # chunks forwarded in more than one piece
    faults: dict[str, int]  # a copy of ``counts``


class _Conn:
    """One client connection and, once connected, its upstream socket."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, rng: random.Random) -> None:
        self.proxy = proxy
        self.client = client
        self.server: socket.socket | None = None  # None while pending in a black hole
        self.dead = threading.Event()
        self.half_open = False
        self.cut_mid = False  # cut the next chunk up in the middle, then reset
        self.cut_at: int | None = None  # reset after this many bytes up
        self.up_bytes = 0
        self.rngs = (random.Random(rng.getrandbits(64)), random.Random(rng.getrandbits(64)))
        self.threads: list[threading.Thread] = []

    def start(self, server: socket.socket) -> None:
        for up, src, dst in ((True, self.client, server), (False, server, self.client)):
            name = f"faultproxy-{self.proxy.port}-{'up' if up else 'down'}"
            t = threading.Thread(target=self._pump, args=(up, src, dst), name=name, daemon=True)
            self.threads.append(t)
            t.start()

    def _pump(self, up: bool, src: socket.socket, dst: socket.socket) -> None:
        p = self.proxy
        rng = self.rngs[up]
        while not self.dead.is_set():
            try:
                data = src.recv(_READ_SIZE)
            except TimeoutError:
                continue  # idle: look at ``dead`` again
            except OSError:
                data = b""
            if self.half_open and not up:
                return  # the server side is gone; the client must not hear of it
            if not data:
                break
            if not p._wait_until_passable(self, up):
                break  # reset while held: what was held is lost with the connection
            if self.half_open:
                if up:
                    continue  # swallowed: the client's writes succeed, nobody reads them
                return
            wait_s = p._latency_s(rng)
            if wait_s and self.dead.wait(wait_s):
                break
            fired = None
            if up:
                data, fired = self._cut_point(data, rng)
            if not self._send(dst, data, up, rng):
                if up and self.half_open:
                    continue
                break
            if fired is not None:
                if not self.dead.is_set():
                    p._count(fired)  # before the RST: whoever sees it sees the count too
                self.reset()
                return
        self.reset()

    def _cut_point(self, data: bytes, rng: random.Random) -> tuple[bytes, str | None]:
        """What of ``data`` to forward up, and which cut fires after it (if one does)."""
        if self.cut_mid:
            keep = rng.randrange(1, len(data)) if len(data) > 1 else 0
            return data[:keep], "cut_mid_frame"
        if self.cut_at is not None and self.cut_at - self.up_bytes < len(data):
            return data[: max(self.cut_at - self.up_bytes, 0)], "cut_after"
        self.up_bytes += len(data)
        return data, None

    def _send(self, dst: socket.socket, data: bytes, up: bool, rng: random.Random) -> bool:
        """Forward ``data``, in pieces if splitting; False if the connection broke."""
        pieces = self.proxy._pieces(data, rng)
        for i, piece in enumerate(pieces):
            if i and self.dead.wait(SPLIT_PAUSE_S):
                return False
            view = memoryview(piece)
            while view:
                if self.dead.is_set():
                    return False
                try:
                    view = view[dst.send(view) :]
                except TimeoutError:
                    continue  # the peer reads slowly (or not at all): look at ``dead`` again
                except OSError:
                    return False
        self.proxy._account(up, len(data), len(pieces) > 1)
        return True

    def go_half_open(self) -> None:
        """Close the server side with a FIN; the pumps see ``half_open`` and keep quiet."""
        if self.server is not None:
            with contextlib.suppress(OSError):
                self.server.shutdown(socket.SHUT_RDWR)  # wakes the pump reading it

    def reset(self, rst: bool = True) -> bool:
        """End the connection, with RST on both sides unless ``rst`` is False; True if
        this call ended it."""
        with self.proxy._cv:
            if self.dead.is_set():
                return False
            self.dead.set()
            self.proxy._cv.notify_all()  # wakes the pumps waiting out a hold
        for sock in (self.client, self.server):
            if sock is None:
                continue
            if rst:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                # SHUT_RD wakes a pump waiting to read this socket and sends nothing (SHUT_WR
                # would send a FIN), so the close below sends the RST alone, once the pumps
                # have let go of the socket: at once for a reader, within POLL_S for a
                # writer waiting for a peer that does not read.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
            with contextlib.suppress(OSError):
                sock.close()
        return True


class FaultProxy:
    """A fault proxy listening on ``127.0.0.1:port`` in front of ``upstream``; see the
    module docstring for the faults. ``seed`` drives every random choice (split points,
    cut points, jitter)."""

    def __init__(self, upstream: tuple[str, int], seed: int = 0) -> None:
        self.upstream = upstream
        self.seed = seed
        self.held_up = False
        self.held_down = False
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self.splitting = False
        self.refusing = False
        self.blackholed = False
        self.connections = 0  # forwarded upstream so far
        self.counts: dict[str, int] = {}
        self._rng = random.Random(seed)
        self._cv = threading.Condition()  # guards the state above and every _Conn's flags
        self._conns: list[_Conn] = []
        self._ended: list[_Conn] = []  # for close() to join their threads
        self._cut_next: int | None = None
        self._bytes = [0, 0]  # [down, up]
        self._split_chunks = 0
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(
            target=self._accept, name=f"faultproxy-{self.port}-accept", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"arrival://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        host, port = self.upstream
        with self._cv:
            on = [name for name, active in self._modes().items() if active]
            n = sum(not c.dead.is_set() for c in self._conns)
        state = "closed" if self._closed else f"{n} open, faults on: {', '.join(on) or 'none'}"
        return f"<FaultProxy 127.0.0.1:{self.port} -> {host}:{port} seed={self.seed}, {state}>"

    def stats(self) -> ProxyStats:
        with self._cv:
            live = [c for c in self._conns if not c.dead.is_set()]
            return ProxyStats(
                connections=self.connections,
                open_connections=len(live),
                pending=sum(c.server is None for c in live),
                half_open=sum(c.half_open for c in live),
                bytes_up=self._bytes[True],
                bytes_down=self._bytes[False],
                split_chunks=self._split_chunks,
                faults=dict(self.counts),
            )

    # -- faults ----------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection (the pending and half-open ones too); returns how
        many. The clients see "connection reset" and may reconnect at once."""
        n = self._reset_all()
        self._count("cut", n)
        return n

    def cut_after(self, n_bytes: int) -> None:
        """Reset the next new connection after ``n_bytes`` bytes towards the server."""
        if n_bytes < 0:
            raise UsageError(f"cut_after needs a byte count of 0 or more, not {n_bytes}")
        with self._cv:
            self._cut_next = n_bytes

    def cut_mid_frame(self) -> int:
        """Every open connection forwards a random strict prefix (at least one byte of two
        or more) of the next chunk it sends towards the server, then is reset; returns how
        many connections were armed. ``heal()`` disarms the ones that have not sent since."""
        with self._cv:
            conns = [c for c in self._live() if not c.half_open]
            for c in conns:
                c.cut_mid = True
        return len(conns)

    def half_open(self) -> int:
        """Close every open connection's server side silently; returns how many. The server
        sees its connection closed; the client's socket stays open, its writes succeed and
        are swallowed, and nothing reaches it until ``heal()`` or ``cut()`` resets it."""
        with self._cv:
            conns = [c for c in self._live() if not c.half_open]
            for c in conns:
                c.half_open = True
            self._cv.notify_all()  # a pump waiting out a hold now swallows or stops
        self._count("half_open", len(conns))
        for c in conns:
            c.go_half_open()
        return len(conns)

    def hold(self, *, up: bool = False, down: bool = False) -> None:
        """Stop forwarding towards the server (``up``) and/or the clients (``down``),
        keeping the connections open; ``hold()`` resumes both."""
        with self._cv:
            if (up and not self.held_up) or (down and not self.held_down):
                self._count("hold")
            self.held_up, self.held_down = up, down
            self._cv.notify_all()

    def delay(self, seconds: float, jitter: float = 0.0) -> None:
        """Forward each chunk ``seconds`` plus a random ``0..jitter`` seconds late (each
        direction: a round trip takes twice that). Data that arrives during a wait waits
        its own turn after it, so a delayed link is also a slower one. ``delay(0)`` ends it."""
        if seconds < 0 or jitter < 0:
            raise UsageError(
                f"delay needs seconds and jitter of 0 or more, not {seconds} and {jitter}"
            )
        with self._cv:
            if (seconds or jitter) and not (self.delay_s or self.jitter_s):
                self._count("delay")
            self.delay_s, self.jitter_s = seconds, jitter

    def split(self, on: bool) -> None:
        """Forward every chunk, both ways, in 2 to 4 pieces cut at random bytes with a
        tiny pause between them (``SPLIT_PAUSE_S``)."""
        self._switch("split", "splitting", on)

    def refuse(self, on: bool) -> None:
        """Close new connections at once (the client's connect succeeds, then EOF)."""
        self._switch("refuse", "refusing", on)

    def blackhole(self, on: bool) -> None:
        """Hold both directions of every connection, and accept new connections without
        connecting them upstream, until ``blackhole(False)`` or ``heal()``: then the held
        bytes flow and the new connections are connected. Nothing is closed either way."""
        self._switch("blackhole", "blackholed", on)

    def heal(self) -> None:
        """Undo every fault: holds, delay, split, refusal and black hole end, armed cuts
        (``cut_after``, ``cut_mid_frame``) are disarmed, held bytes flow again. Working
        connections stay open; half-open ones are reset, as the healed network would
        answer their client's next packet (their server side is gone)."""
        with self._cv:
            self.held_up = self.held_down = False
            self.delay_s = self.jitter_s = 0.0
            self.splitting = self.refusing = self.blackholed = False
            self._cut_next = None
            for c in self._conns:
                c.cut_mid = False
                c.cut_at = None
            gone = [c for c in self._conns if c.half_open]
            self._cv.notify_all()
        for c in gone:
            c.reset()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, reset every connection and wait (briefly) for the threads."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        with contextlib.suppress(OSError):
            self._listener.close()
        self._reset_all()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        self._thread.join(max(deadline - time.monotonic(), 0.0))
        with self._cv:
            threads = [t for c in self._ended for t in c.threads]
            self._ended.clear()
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(deadline - time.monotonic(), 0.0))

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._cv:
                if self._closed or self.refusing:
                    conn = None
                else:
                    conn = _Conn(self, client, random.Random(self._rng.getrandbits(64)))
                    self._conns = [c for c in self._conns if not c.dead.is_set()] + [conn]
                    self._ended = [c for c in self._ended if any(t.is_alive() for t in c.threads)]
                    self._ended.append(conn)
                    pending = self.blackholed
            if conn is None:
                client.close()
            elif pending:
                t = threading.Thread(
                    target=self._connect,
                    args=(conn,),
                    name=f"faultproxy-{self.port}-pending",
                    daemon=True,
                )
                conn.threads.append(t)
                t.start()
            else:
                self._connect(conn, wait=False)  # here: cut_after hits connections in order

    def _connect(self, conn: _Conn, wait: bool = True) -> None:
        """Connect ``conn`` upstream and start its pumps; if ``wait``, once no black hole
        holds it (a black hole that begins meanwhile only holds its bytes)."""
        if wait:
            with self._cv:
                self._cv.wait_for(lambda: not self.blackholed or conn.dead.is_set())
        if conn.dead.is_set():
            return
        try:
            server = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT_S)
        except OSError:
            conn.reset(rst=False)
            return
        for sock in (conn.client, server):
            with contextlib.suppress(OSError):  # the client's, if a cut closed it meanwhile
                sock.settimeout(POLL_S)
                # Forward at once: with Nagle, a chunk waits for the ACK of the one before,
                # and the peer's delayed ACK turns that into 40 ms stalls no real router
                # adds (and would join split pieces up again).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cv:
            if not conn.dead.is_set():
                conn.server = server
                conn.cut_at, self._cut_next = self._cut_next, None
                self.connections += 1
        if conn.server is None:  # reset while connecting
            server.close()
            return
        conn.start(server)

    def _live(self) -> list[_Conn]:
        """Connections with both sides open (call with the lock held)."""
        return [c for c in self._conns if c.server is not None and not c.dead.is_set()]

    def _reset_all(self) -> int:
        with self._cv:
            conns, self._conns = self._conns, []
        return sum(c.reset() for c in conns)

    def _wait_until_passable(self, conn: _Conn, up: bool) -> bool:
        """Wait while this direction is held; False if the connection ended meanwhile."""

        def passable() -> bool:
            held = self.blackholed or (self.held_up if up else self.held_down)
            return not held or conn.half_open or conn.dead.is_set()

        if not passable():
            with self._cv:
                self._cv.wait_for(passable)
        return not conn.dead.is_set()

    def _latency_s(self, rng: random.Random) -> float:
        delay_s, jitter_s = self.delay_s, self.jitter_s
        return delay_s + rng.uniform(0.0, jitter_s) if jitter_s else delay_s

    def _pieces(self, data: bytes, rng: random.Random) -> list[bytes]:
        if not self.splitting or len(data) < 2:
            return [data]
        n = rng.randint(2, min(SPLIT_MAX_PIECES, len(data)))
        cuts = [0, *sorted(rng.sample(range(1, len(data)), n - 1)), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(cuts)]

    def _account(self, up: bool, n_bytes: int, split: bool) -> None:
        with self._cv:
            self._bytes[up] += n_bytes
            self._split_chunks += split

    def _count(self, kind: str, n: int = 1) -> None:
        if n:
            with self._cv:
                self.counts[kind] = self.counts.get(kind, 0) + n

    def _switch(self, kind: str, attr: str, on: bool) -> None:
        with self._cv:
            if on and not getattr(self, attr):
                self._count(kind)
            setattr(self, attr, on)
            self._cv.notify_all()

    def _modes(self) -> dict[str, bool]:
        return {
            "hold-up": self.held_up,
            "hold-down": self.held_down,
            "delay": bool(self.delay_s or self.jitter_s),
            "split": self.splitting,
            "refuse": self.refusing,
            "blackhole": self.blackholed,
        }
