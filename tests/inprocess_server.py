"""An arrival server in this process, on its own event loop thread, for the contract
suite: the same tests run through the real protocol, a real TCP socket on 127.0.0.1 and
the network client, while the engine behind it keeps the test's fake clock."""

from __future__ import annotations

import asyncio
import random
import threading

from arrival._backend import LocalBackend
from arrival.engine import Engine
from arrival.server import Server
from arrival.storage.base import Storage
from arrival.testing import FakeClock


class InProcessServer:
    def __init__(
        self,
        storage: Storage,
        clock: FakeClock | None = None,
        rng: random.Random | None = None,
        token: str | None = None,
        port: int = 0,
        max_in_flight: int = 10_000,
    ) -> None:
        self.backend = LocalBackend(Engine(storage, clock=clock, rng=rng), "in-process")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(self.backend, token=token, max_in_flight=max_in_flight)
        host, port = self._run(self.server.start("127.0.0.1", port))
        self.url = f"arrival://{host}:{port}"
        self.port = port
        self.stopped = False

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    @property
    def engine(self) -> Engine:
        return self.backend.engine

    def crash(self) -> None:
        """Stop as SIGKILL would: nothing pending is committed; connections drop."""
        if not self.stopped:
            self.engine.abandon()
            self._stop_loop(graceful=False)

    def stop(self) -> None:
        if not self.stopped:
            self._run(self.server.close())
            self._stop_loop(graceful=True)

    def _stop_loop(self, graceful: bool) -> None:
        self.stopped = True

        async def drop() -> None:
            if self.server._server is not None:
                self.server._server.close()
            # twice: a connection accepted while the first round ran is dropped too, as a
            # dead process would drop it (else its client waits out its handshake timeout)
            for _ in range(2):
                await asyncio.sleep(0.02)
                for s in list(self.server.sessions):
                    if s.transport is not None:
                        s.transport.abort()
            await asyncio.sleep(0.05)  # the aborted transports' connection_lost callbacks

        if not graceful:
            self._run(drop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

        async def settle() -> None:
            # what was scheduled before the loop stopped (a connection being accepted, a
            # late failed request dropping its connection): run it, and close every
            # transport before the loop closes
            for _ in range(2):
                await asyncio.sleep(0.02)
                for s in list(self.server.sessions):
                    if s.transport is not None:
                        s.transport.abort()
            await asyncio.sleep(0.05)

        self.loop.run_until_complete(settle())
        self.loop.close()
