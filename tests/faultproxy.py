"""A small TCP fault proxy on loopback, between a client and a server, for tests.

``FaultProxy(("127.0.0.1", port))`` listens on ``proxy.port`` and forwards each client
connection to the server. Faults, at any moment:

- ``cut()``: reset every open connection (RST), as a crashed router or a killed peer.
- ``cut_after(n)``: reset the next connection after ``n`` bytes towards the server (a
  frame cut in the middle).
- ``hold(up=..., down=...)``: stop forwarding one or both directions (a black hole) while
  keeping the connections open; ``hold()`` with no arguments resumes.
- ``delay(s)``: forward each chunk ``s`` seconds late.
- ``refuse(True)``: close new connections at once.

Threads, not asyncio, so it works beside any client. ``close()`` stops everything.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

__all__ = ["FaultProxy"]

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class _Pair:
    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.closed = False
        self.up_bytes = 0
        self.cut_at: int | None = None

    def start(self) -> None:
        for src, dst, up in ((self.client, self.server, True), (self.server, self.client, False)):
            threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        p = self.proxy
        while not self.closed:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            while (p.held_up if up else p.held_down) and not self.closed:
                time.sleep(0.005)
            if self.closed:
                break  # cut while held: what was held is lost with the connection
            if p.delay_s:
                time.sleep(p.delay_s)
            if up and self.cut_at is not None:
                room = self.cut_at - self.up_bytes
                if room < len(data):
                    with contextlib.suppress(OSError):
                        dst.sendall(data[: max(room, 0)])
                    self.reset()
                    return
            if up:
                self.up_bytes += len(data)
            try:
                dst.sendall(data)
            except OSError:
                break
        self.reset()

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes our pumps; close() alone would not
            with contextlib.suppress(OSError):
                s.close()


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.held_up = False
        self.held_down = False
        self.delay_s = 0.0
        self.refusing = False
        self.connections = 0  # accepted so far
        self._cut_next: int | None = None
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"arrival://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing or self._closed:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(self, client, server)
            with self._lock:
                self.connections += 1
                pair.cut_at, self._cut_next = self._cut_next, None
                self._pairs = [p for p in self._pairs if not p.closed] + [pair]
            pair.start()

    def cut(self) -> int:
        """Reset every open connection; returns how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        n = 0
        for p in pairs:
            if not p.closed:
                n += 1
            p.reset()
        return n

    def cut_after(self, n_bytes: int) -> None:
        """The next connection is reset after ``n_bytes`` bytes towards the server."""
        with self._lock:
            self._cut_next = n_bytes

    def hold(self, *, up: bool = False, down: bool = False) -> None:
        self.held_up = up
        self.held_down = down

    def delay(self, seconds: float) -> None:
        self.delay_s = seconds

    def refuse(self, on: bool) -> None:
        self.refusing = on

    def close(self) -> None:
        self._closed = True
        self.hold()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
