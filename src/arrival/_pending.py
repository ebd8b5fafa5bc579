"""Results that may not be there yet: blocking code calls ``wait()``, async code awaits.

Every operation of a backend (``_backend.Backend``) returns one, so the blocking API and
the asyncio API drive the same backends and differ only in how they wait. A local
engine completes them from its writer thread (a commit became durable); a network
client completes them when the reply arrives, from its reader thread or its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Generator
from typing import Any, Generic, Protocol, TypeVar

from arrival.engine import Ticket

__all__ = [
    "Deferred",
    "Future",
    "Pending",
    "Ready",
    "Steps",
    "TicketResult",
    "adrive",
    "drive",
    "wake_soon",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

_lock = threading.Lock()  # guards every Future's callbacks; held for a list append only


class Pending(Protocol[T_co]):
    """What every backend operation returns."""

    def done(self) -> bool: ...

    def add_done_callback(self, cb: Callable[[], None]) -> None: ...

    def wait(self, timeout: float | None = None) -> T_co: ...

    def __await__(self) -> Generator[Any, None, T_co]: ...


def wake_soon(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    """Resolve ``fut`` on its loop, from any thread; a closed loop has no one to wake.
    On the loop's own thread (a server's send waking a long poll) no cross-thread wakeup
    (a write to the loop's wakeup fd) is needed."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.call_soon(_resolve, fut)
        return
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _until_done(p: Pending[Any]) -> Generator[Any, None, None]:
    if not p.done():
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        p.add_done_callback(lambda: wake_soon(loop, fut))
        yield from fut.__await__()


class Future(Generic[T]):
    """Completed once, by whoever has the answer, from any thread."""

    __slots__ = ("_callbacks", "_done", "_error", "_event", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[], None]] | None = None
        self._event: threading.Event | None = None  # made only when a thread blocks

    def __repr__(self) -> str:
        state = "pending" if not self._done else ("failed" if self._error else "done")
        return f"<Future {state}>"

    def set_result(self, value: T) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: T | None, error: BaseException | None) -> None:
        with _lock:
            if self._done:
                return
            self._value, self._error, self._done = value, error, True
            callbacks, self._callbacks = self._callbacks, None
            event = self._event
        if event is not None:
            event.set()
        for cb in callbacks or ():
            cb()

    def done(self) -> bool:
        return self._done

    def exception(self) -> BaseException | None:
        return self._error

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        with _lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(cb)
                return
        cb()

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def wait(self, timeout: float | None = None) -> T:
        if not self._done:
            with _lock:
                if not self._done and self._event is None:
                    self._event = threading.Event()
                event = self._event
            if event is not None and not event.wait(timeout):
                raise TimeoutError(f"no answer within {timeout} s")
        return self.result()

    def __await__(self) -> Generator[Any, None, T]:
        yield from _until_done(self)
        return self.result()


class Ready(Generic[T]):
    """A result known at once."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        cb()

    def wait(self, timeout: float | None = None) -> T:
        return self.value

    def __await__(self) -> Generator[Any, None, T]:
        return self.value
        yield  # a generator that never suspends


class Deferred(Generic[T]):
    """A call that may block (an fsync, a file): run inline by ``wait()``, in a worker
    thread when awaited, so it never blocks an event loop."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn

    def done(self) -> bool:
        return False

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        raise TypeError("a Deferred call runs when waited for; it has no callbacks")

    def wait(self, timeout: float | None = None) -> T:
        return self._fn()

    def __await__(self) -> Generator[Any, None, T]:
        return (yield from asyncio.to_thread(self._fn).__await__())


class TicketResult(Generic[T]):
    """An engine Ticket (a durable commit) and what its success means to the caller."""

    __slots__ = ("_make", "ticket")

    def __init__(self, ticket: Ticket, make: Callable[[int], T]) -> None:
        self.ticket = ticket
        self._make = make

    def done(self) -> bool:
        return self.ticket.done()

    def exception(self) -> BaseException | None:
        return self.ticket._error if self.ticket.done() else None

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        self.ticket.add_done_callback(cb)

    def wait(self, timeout: float | None = None) -> T:
        return self._make(self.ticket.wait(timeout))

    def __await__(self) -> Generator[Any, None, T]:
        yield from _until_done(self)
        return self._make(self.ticket.outcome())


Steps = Generator["Pending[Any]", Any, T]
"""Logic written once for both APIs: it yields what it waits for and gets each result
(or error) sent back. ``drive`` runs it blocking, ``adrive`` awaiting."""


def drive(steps: Steps[T], timeout: float | None = None) -> T:
    """Run ``steps``, blocking on each Pending (up to ``timeout`` seconds each)."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            p = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        value, error = None, None
        try:
            value = p.wait(timeout)
        except BaseException as exc:  # noqa: BLE001 - thrown into the steps, which decide
            error = exc


async def adrive(steps: Steps[T]) -> T:
    """Run ``steps``, awaiting each Pending."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            p = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        value, error = None, None
        try:
            value = await p
        except BaseException as exc:  # noqa: BLE001 - thrown into the steps, which decide
            error = exc
