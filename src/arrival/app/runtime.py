"""The worker runtime: ``arrival.App`` runs decorated handlers under their queue's contract.

```python
app = arrival.App("./data")

@app.handler("orders", group="fulfilment", concurrency=4,
             retry=arrival.RetryPolicy(max_attempts=5), breaker=arrival.CircuitBreaker())
async def fulfil(order: Order, ctx: arrival.Context) -> None:
    ctx.send("shipments", Shipment(order.id))

app.run()          # or: arrival worker module:app
```

Each handler gets its messages decoded into the type of its first parameter
(``arrival.app.codec``). What happens to a message follows from the queue's guarantee:

- **at-least-once**: the handler runs; on success its sends are made, then the message
  is acked; on failure the retry policy decides: nack (retried after a backoff) or
  dead-letter. A crash anywhere redelivers the message.
- **exactly-once**: the handler runs inside a transaction (``Consumer.process``): its
  sends and the ack commit together or not at all.
- **at-most-once**: the handler runs once; a failure is logged and counted, never retried.

A body that does not decode is a poison message: dead-lettered at once (or, on a queue
without a dead-letter queue, nacked until ``max_deliveries``). It does not count against
the circuit breaker, which measures the handler's health, not the input's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import hashlib
import inspect
import logging
import os
import random
import re
import socket
import time
import typing
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from arrival import aio, tracing
from arrival._common import check_seconds
from arrival._process import OutputsBase
from arrival.app.codec import CONTENT_TYPE, decoder_for, encode
from arrival.errors import (
    ClosedError,
    GuaranteeMismatch,
    NotSupported,
    ReceiptError,
    UndecodableMessage,
    UsageError,
)
from arrival.model import Backoff, Guarantee, QueueSpec
from arrival.router import _guarantee, weaker
from arrival.semantics.breaker import Breaker, BreakerState, CircuitBreaker
from arrival.semantics.retry import backoff_delay

__all__ = ["App", "Context", "HandlerStats", "RetryPolicy"]

log = logging.getLogger("arrival.app")

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
_POLL_S = 0.1  # how often an idle handler looks at its breaker and the stop flag
MAX_PREFETCH = 256  # messages a handler holds beyond those it is handling, at most
# a sync handler faster than this gets several messages per thread hop, up to MAX_CHUNK:
# the hop (a thread wake-up and back) costs about 0.1 ms of its own
CHUNK_PACE_S = 0.001
MAX_CHUNK = 32


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """What a handler's failure does to its message.

    - an exception in ``dead_letter_on``, or not in ``retry_on``: dead-lettered at once;
    - a failure on attempt ``max_attempts`` (``msg.attempt``, the delivery number) or
      later: dead-lettered;
    - otherwise nacked, redelivered after ``backoff`` (None: the queue's own backoff).

    The queue's ``max_deliveries`` still applies: the first limit reached wins. It counts
    failures only; a delivery that ended without an outcome (its worker crashed, was
    disconnected or stopped) spends none. So a message that *crashes its worker* — a
    segfault, an out-of-memory kill — would come back forever: ``max_total_deliveries``
    is the guard. A message delivered more often than that is dead-lettered before the
    handler runs again (reason ``delivered N times``), whatever ended the earlier ones.
    """

    max_attempts: int | None = None
    backoff: Backoff | None = None
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dead_letter_on: tuple[type[BaseException], ...] = ()
    max_total_deliveries: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_attempts", "max_total_deliveries"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise UsageError(f"{name} must be an int >= 1 or None, not {value!r}")
        for name in ("retry_on", "dead_letter_on"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in value
            ):
                raise UsageError(f"{name} must be a tuple of exception classes, not {value!r}")

    def exhausted(self, attempt: int) -> str | None:
        """The dead-letter reason when delivery number ``attempt`` is past
        ``max_total_deliveries``, else None."""
        limit = self.max_total_deliveries
        if limit is None or attempt <= limit:
            return None
        return (
            f"delivered {attempt} times, more than max_total_deliveries={limit}: the earlier "
            f"deliveries ended without an outcome (did the message crash its worker?)"
        )

    def decide(
        self, attempt: int, exc: BaseException, rng: random.Random
    ) -> tuple[float | None, bool]:
        """``(delay, dead_letter)`` after attempt number ``attempt`` failed with ``exc``."""
        if isinstance(exc, self.dead_letter_on) or not isinstance(exc, self.retry_on):
            return None, True
        if self.max_attempts is not None and attempt >= self.max_attempts:
            return None, True
        if self.backoff is None:
            return None, False
        return backoff_delay(attempt, self.backoff, rng), False


class _Takes(enum.Enum):
    BODY = "body"  # the payload decoded by the first parameter's type
    MESSAGE = "message"  # the message itself


@dataclass
class HandlerStats:
    """One handler's counters since its app started, and its circuit breaker."""

    name: str
    queue: str
    group: str
    guarantee: str
    concurrency: int
    in_flight: int = 0
    handled: int = 0  # handler returned (and, except at-most-once, the message settled)
    failed: int = 0  # handler raised
    retried: int = 0  # failures nacked for a later attempt
    dead_lettered: int = 0  # sent to the dead-letter queue by this worker
    undecodable: int = 0  # poison messages (bodies that did not decode)
    released: int = 0  # given back without spending an attempt (breaker, shutdown)
    lease_lost: int = 0  # settled too late: the lease had run out (redelivered)
    breaker_state: str = "closed"
    breaker_opened: int = 0  # times the breaker opened
    consecutive_failures: int = 0


@dataclass
class _Handler:
    fn: Callable[..., Any]
    name: str
    queue: str
    group: str
    concurrency: int
    retry: RetryPolicy
    breaker: Breaker | None
    declare: Mapping[str, Any] | None  # create_queue options, when the handler declares it
    batch: int
    takes: _Takes
    payload_type: Any
    decode: Callable[[bytes, str | None], Any]
    with_context: bool
    is_async: bool
    guarantee: Guarantee | None = None  # the queue's, known at start
    dead_letter: bool = False  # the queue has a dead-letter queue
    stats: HandlerStats = field(init=False)
    prefetch: int | None = None  # None: adaptive (App._prefetch)
    ack_timeout: float = 30.0  # the queue's, known at start
    seconds_per_message: float | None = None  # moving average of the handler's time
    idle: bool = False  # nothing to do right now (for run(until_idle=...))
    last_active: float = 0.0

    def __post_init__(self) -> None:
        self.stats = HandlerStats(self.name, self.queue, self.group, "", self.concurrency)


class Context:
    """What a handler may do besides reading its message: send messages that go out with
    its outcome, and check its lease.

    Sends are buffered and made only when the handler succeeds: on an exactly-once queue
    they commit in one transaction with the ack; on at-least-once they are sent, then the
    message is acked (a crash in between repeats them, with the same ids: a queue that
    deduplicates keeps one). An output without an id gets ``<input id>/<n>``, the same on
    every retry.
    """

    __slots__ = ("_outputs", "_sends", "message")

    def __init__(self, message: aio.Message, outputs: OutputsBase | None) -> None:
        self.message = message
        self._outputs = outputs
        self._sends: list[tuple[str, bytes, str | None, dict[str, str], str]] = []

    def __repr__(self) -> str:
        return f"<arrival.Context {self.message!r}>"

    @property
    def attempt(self) -> int:
        return self.message.attempt

    @property
    def lease_lost(self) -> bool:
        """True once the lease ran out: another consumer may get the message, so skip
        side effects that must not happen twice."""
        return self.message.lease_lost

    def send(
        self,
        queue: str,
        obj: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
        content_type: str | None = None,
    ) -> None:
        """Send ``obj`` (bytes, or anything ``arrival.app.codec.encode`` takes) with this
        message's outcome."""
        body, ct = encode(obj, content_type)
        h = dict(headers) if headers else {}
        if ct is not None:
            h.setdefault(CONTENT_TYPE, ct)
        if self._outputs is not None:
            self._outputs._add(queue, body, key, h or None, id)
            return
        mid = id if id is not None else f"{self.message.id}/{len(self._sends)}"
        self._sends.append((queue, body, key, h, mid))


def _guarantee_of(tp: Any) -> Guarantee | None:
    """What a message type requires (its ``__guarantee__``, as the router reads it)."""
    value = getattr(tp, "__guarantee__", None)
    return None if value is None else _guarantee(value, f"{tp.__name__}.__guarantee__")


def _inspect(fn: Callable[..., Any]) -> tuple[_Takes, Any, bool]:
    """What the handler takes: (body or message, the payload type, whether a Context)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot read the parameters of handler {fn!r}: {exc}") from None
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if not 1 <= len(positional) <= 2:
        raise UsageError(
            f"handler {fn.__qualname__} takes {len(positional)} required parameters; it takes "
            f"the message (or its decoded body) and, optionally, an arrival.Context"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # noqa: BLE001 - any failure to resolve is the user's to fix
        raise UsageError(
            f"cannot resolve the type hints of handler {fn.__qualname__}: {exc}"
        ) from None
    tp = hints.get(positional[0].name, bytes)
    if isinstance(tp, type) and issubclass(tp, aio.Message):
        return _Takes.MESSAGE, tp, len(positional) == 2
    return _Takes.BODY, tp, len(positional) == 2


class App:
    """Handlers for queues, run by ``run()`` (or ``arrival worker module:app``).

    ``url`` is what ``arrival.connect`` takes, or a broker already open (sync or async:
    the app uses it and leaves it open). ``name`` is the default consumer group of its
    handlers. ``instance`` names this worker among its replicas: exactly-once handlers
    use it in their transactional ids, so give each replica a stable one (a pod name, an
    ordinal) and a restarted worker fences its predecessor; by default it is
    ``$ARRIVAL_INSTANCE`` or ``host.pid``. ``clock`` (seconds, monotonic) drives the
    circuit breakers; tests pass a fake one.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | aio.Broker | Any = "./data",
        *,
        name: str = "default",
        instance: str | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        **connect_options: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise UsageError("an app's name is a non-empty str (it is the default group)")
        check_seconds("shutdown_timeout", shutdown_timeout)
        self.url = url
        self.name = name
        self.instance = (
            instance
            or os.environ.get("ARRIVAL_INSTANCE")
            or (f"{socket.gethostname()}.{os.getpid()}")
        )
        self.clock = clock or time.monotonic
        self.rng = rng or random.Random()
        self.shutdown_timeout = shutdown_timeout
        self._connect_options = connect_options
        self._handlers: list[_Handler] = []
        self._broker: aio.Broker | None = None
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._consumers: list[aio.Consumer] = []
        self._until_idle: float | None = None
        self.running = False

    def __repr__(self) -> str:
        return f"<arrival.App {self.name!r} {len(self._handlers)} handler(s)>"

    # -- declaring ---------------------------------------------------------------------

    def handler(
        self,
        queue: str,
        *,
        group: str | None = None,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        guarantee: str | Guarantee | None = None,
        batch: int = 1,
        prefetch: int | None = None,
        **queue_options: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function (sync or async) as the handler of ``queue``.

        - ``group``: its consumer group (default: the app's name); each handler of a queue
          needs its own.
        - ``concurrency``: messages handled at once (exactly-once: transactions at once).
        - ``retry``: a ``RetryPolicy`` (default: the queue's retries and backoff).
        - ``breaker``: a ``CircuitBreaker`` (default: none).
        - ``guarantee`` and ``queue_options``: declare the queue at start (as
          ``create_queue`` does); without them the queue must exist.
        - ``batch``: exactly-once only, messages per transaction (up to).
        - ``prefetch``: messages to hold beyond those being handled (at-least-once and
          at-most-once). Default: adaptive, as many as the handler gets to within a
          quarter of the queue's ``ack_timeout`` at its measured pace, up to 256.
        """
        if not isinstance(queue, str) or not queue:
            raise UsageError("a handler's queue is a non-empty str")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise UsageError(f"concurrency must be an int >= 1, not {concurrency!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UsageError(f"batch must be an int >= 1, not {batch!r}")
        if prefetch is not None and (
            isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0
        ):
            raise UsageError(f"prefetch must be an int >= 0 or None, not {prefetch!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise UsageError(f"retry must be an arrival.RetryPolicy, not {retry!r}")
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise UsageError(f"breaker must be an arrival.CircuitBreaker, not {breaker!r}")
        if queue_options and guarantee is None:
            raise UsageError(
                f"queue options {sorted(queue_options)} need guarantee=... (they declare "
                f"queue {queue!r})"
            )
        g = group or self.name
        for h in self._handlers:
            if h.queue == queue and h.group == g:
                raise UsageError(
                    f"{h.name} already handles queue {queue!r} in group {g!r}: give this "
                    f"handler another group (two handlers in one group would each get half "
                    f"of the messages)"
                )
        declare = None if guarantee is None else {"guarantee": guarantee, **queue_options}

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if not callable(fn):
                raise UsageError(f"a handler is a function, not {fn!r}")
            takes, tp, with_context = _inspect(fn)
            decode = decoder_for(tp) if takes is _Takes.BODY else _no_decode
            self._handlers.append(
                _Handler(
                    fn=fn,
                    name=getattr(fn, "__qualname__", repr(fn)),
                    queue=queue,
                    group=g,
                    concurrency=concurrency,
                    retry=retry or RetryPolicy(),
                    breaker=Breaker(breaker) if breaker is not None else None,
                    declare=declare,
                    batch=batch,
                    prefetch=prefetch,
                    takes=takes,
                    payload_type=tp,
                    decode=decode,
                    with_context=with_context,
                    is_async=inspect.iscoroutinefunction(fn),
                )
            )
            return fn

        return register

    @property
    def handlers(self) -> list[str]:
        """``queue/group: name`` of each handler."""
        return [f"{h.queue}/{h.group}: {h.name}" for h in self._handlers]

    def stats(self) -> list[HandlerStats]:
        """Each handler's counters and breaker state (a copy)."""
        now = self.clock()
        result = []
        for h in self._handlers:
            s = h.stats
            if h.breaker is not None:
                s.breaker_state = str(h.breaker.current(now))
                s.breaker_opened = h.breaker.opened
                s.consecutive_failures = h.breaker.consecutive_failures
            result.append(HandlerStats(**{f: getattr(s, f) for f in s.__dataclass_fields__}))
        return result

    # -- running -----------------------------------------------------------------------

    def run(self, *, until_idle: float | None = None) -> list[HandlerStats]:
        """Run the handlers until ``stop()`` (or SIGTERM/SIGINT, in ``arrival worker``); with
        ``until_idle``, until no handler had anything to do for that many seconds (for
        tests and batch jobs). Returns the handlers' stats."""
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is not built for every platform
            asyncio.run(self.serve(until_idle=until_idle))
        else:
            uvloop.run(self.serve(until_idle=until_idle))
        return self.stats()

    def stop(self) -> None:
        """Ask a running app to stop gracefully (thread-safe): it takes no new messages,
        finishes those in progress up to ``shutdown_timeout``, and gives back the rest."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(event.set)

    async def serve(
        self, *, until_idle: float | None = None, ready: Callable[[], None] | None = None
    ) -> None:
        """``run()`` for code already in an event loop."""
        if self.running:
            raise UsageError("the app is running already")
        if not self._handlers:
            raise UsageError("the app has no handlers: decorate a function with @app.handler")
        if until_idle is not None:
            check_seconds("until_idle", until_idle)
        self.running = True
        self._stopping = False
        self._until_idle = until_idle
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=sum(h.concurrency for h in self._handlers if not h.is_async) or 1,
            thread_name_prefix="arrival-handler",
        )
        owned = False
        try:
            broker = self._broker = await self._open()
            owned = isinstance(self.url, (str, os.PathLike))
            await self._prepare(broker)
            runners = [
                asyncio.create_task(self._runner(h, i), name=f"arrival {h.name} #{i}")
                for h in self._handlers
                for i in range(h.concurrency if h.guarantee is Guarantee.EXACTLY_ONCE else 1)
            ]
            log.info("worker running: %s", "; ".join(self.handlers))
            if ready is not None:
                ready()
            try:
                await self._wait(runners, until_idle)
            finally:
                failure = await self._shut_down(runners)
            if failure is not None:
                raise failure
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            for c in self._consumers:
                with contextlib.suppress(Exception):  # best effort: closing returns leases
                    await c.close()
            self._consumers.clear()
            if self._broker is not None and owned:
                await self._broker.close()
            self._broker = None
            self.running = False

    async def _open(self) -> aio.Broker:
        url = self.url
        if isinstance(url, aio.Broker):
            return url
        backend = getattr(url, "_b", None)
        if backend is not None and hasattr(url, "producer"):  # an arrival.Broker (sync)
            return aio.Broker(backend)
        if not isinstance(url, (str, os.PathLike)):
            raise UsageError(f"App takes a URL or an arrival broker, not {url!r}")
        return await aio.connect(url, **self._connect_options)

    async def _prepare(self, broker: aio.Broker) -> None:
        """Declare or look up each queue; refuse a message type routed to a weaker queue."""
        for h in self._handlers:
            if h.declare is not None:
                await broker.create_queue(h.queue, **h.declare)
            d = await broker.describe(h.queue)  # UnknownQueue names the fix
            spec: QueueSpec = d.spec
            h.guarantee = spec.guarantee
            h.dead_letter = spec.dead_letter is not None
            h.ack_timeout = spec.ack_timeout
            h.stats.guarantee = str(spec.guarantee)
            needs = _guarantee_of(h.payload_type)
            if needs is not None and weaker(spec.guarantee, needs):
                raise GuaranteeMismatch(
                    h.queue,
                    {
                        "guarantee": (
                            str(spec.guarantee),
                            f"{needs} (required by "
                            f"{h.payload_type.__name__}, which {h.name} takes)",
                        )
                    },
                )
            if h.guarantee is Guarantee.AT_MOST_ONCE and h.retry != RetryPolicy():
                log.warning(
                    "%s: queue %r is at-most-once, so its retry policy never applies "
                    "(a failed message is not redelivered)",
                    h.name,
                    h.queue,
                )

    async def _wait(self, runners: list[asyncio.Task[None]], until_idle: float | None) -> None:
        assert self._stop_event is not None
        stop = asyncio.ensure_future(self._stop_event.wait())
        try:
            while True:
                timeout = None if until_idle is None else min(until_idle / 4, _POLL_S)
                done, _ = await asyncio.wait(
                    [stop, *runners], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if any(t.done() for t in runners):
                    return  # a runner failed (or its consumer closed): stop them all
                if stop in done:
                    return
                if until_idle is not None and self._idle(until_idle):
                    return
        finally:
            stop.cancel()

    def _idle(self, seconds: float) -> bool:
        now = time.monotonic()
        return all(
            h.idle and h.stats.in_flight == 0 and now - h.last_active >= seconds
            for h in self._handlers
        )

    async def _shut_down(self, runners: list[asyncio.Task[None]]) -> BaseException | None:
        """Stop taking messages, wait for those in progress up to the deadline, cancel the
        rest (their messages are released); the first runner's failure, if one failed."""
        self._stopping = True
        pending = [t for t in (*runners, *self._tasks) if not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=self.shutdown_timeout)
            if late:
                log.warning(
                    "%d handler task(s) still running after the %.1f s shutdown deadline: "
                    "their messages go back to their queues without spending an attempt",
                    len(late),
                    self.shutdown_timeout,
                )
                for t in late:
                    t.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        for t in runners:
            if t.done() and not t.cancelled() and t.exception() is not None:
                return t.exception()
        return None

    # -- one handler -------------------------------------------------------------------

    async def _runner(self, h: _Handler, index: int) -> None:
        assert self._broker is not None
        consumer = self._broker.consumer(h.queue, h.group)
        self._consumers.append(consumer)
        h.last_active = time.monotonic()
        if h.guarantee is Guarantee.EXACTLY_ONCE:
            await self._run_transactions(h, index, consumer)
        else:
            await self._run_messages(h, consumer)

    def _allowed(self, h: _Handler) -> int | None:
        return None if h.breaker is None else h.breaker.allowed(self.clock())

    async def _pause(self, h: _Handler) -> None:
        """Wait while the breaker is open (or a trial runs), or until stopping."""
        assert self._stop_event is not None
        wait = _POLL_S
        if h.breaker is not None:
            wait = min(max(h.breaker.remaining(self.clock()), 0.001), _POLL_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), wait)

    def _prefetch(self, h: _Handler) -> int:
        """Messages to hold beyond those being handled. Held messages' leases run, so hold
        only as many as the handlers get to within a quarter of ``ack_timeout``, going by
        how long a message has taken (none until the first is done: a slow handler's first
        batch must not outlive its leases)."""
        if h.prefetch is not None:
            return h.prefetch
        if h.guarantee is Guarantee.AT_MOST_ONCE:
            return MAX_PREFETCH  # no leases to outlive
        if h.seconds_per_message is None:
            return 0
        budget = 0.25 * h.ack_timeout * h.concurrency
        return min(MAX_PREFETCH, int(budget / max(h.seconds_per_message, 1e-6)))

    async def _run_messages(self, h: _Handler, consumer: aio.Consumer) -> None:
        """At-least-once and at-most-once: this receiver keeps a buffer of messages filled
        (the prefetch), ``concurrency`` workers handle them."""
        buffer: asyncio.Queue[aio.Message | None] = asyncio.Queue()
        room = asyncio.Event()  # a worker took or finished a message
        workers = [
            asyncio.create_task(self._worker(h, buffer, room), name=f"arrival {h.name} worker")
            for _ in range(h.concurrency)
        ]
        self._tasks.update(workers)
        try:
            while not self._stopping:
                allowed = self._allowed(h)
                if allowed == 0:  # open breaker (or its trial running): hold nothing
                    await self._release_buffered(h, buffer)
                    h.idle = True
                    await self._pause(h)
                    continue
                held = buffer.qsize() + h.stats.in_flight
                # half-open (allowed 1): one trial message, nothing else
                limit = 1 if allowed == 1 else h.concurrency + self._prefetch(h)
                want = limit - held
                if want <= 0:
                    room.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(room.wait(), _POLL_S)
                    continue
                try:
                    msgs = await consumer.receive_batch(want, timeout=_POLL_S)
                except ClosedError:
                    return
                if not msgs:
                    h.idle = held == 0
                    continue
                h.idle = False
                h.last_active = time.monotonic()
                for msg in msgs:
                    buffer.put_nowait(msg)
        finally:
            # stopping: what no worker took goes back; the workers finish their message
            await self._release_buffered(h, buffer)
            for _ in workers:
                buffer.put_nowait(None)
            await asyncio.gather(*workers, return_exceptions=True)
            self._tasks.difference_update(workers)

    async def _release_buffered(
        self, h: _Handler, buffer: asyncio.Queue[aio.Message | None]
    ) -> None:
        while not buffer.empty():
            msg = buffer.get_nowait()
            if msg is not None:
                await self._release(h, msg)

    async def _worker(
        self, h: _Handler, buffer: asyncio.Queue[aio.Message | None], room: asyncio.Event
    ) -> None:
        while True:
            msg = await buffer.get()
            if msg is None:
                return
            if self._stopping or (h.breaker is not None and self._allowed(h) == 0):
                await self._release(h, msg)  # taken, not started: back without an attempt
                continue
            batch = [msg]
            if self._chunked(h):  # a fast sync handler: several messages a thread hop
                while len(batch) < MAX_CHUNK and not buffer.empty():
                    more = buffer.get_nowait()
                    if more is None:  # stopping: the sentinel ends this or another worker
                        buffer.put_nowait(None)
                        break
                    batch.append(more)
            started = time.perf_counter()
            try:
                if len(batch) == 1:
                    if h.breaker is not None:
                        h.breaker.started(self.clock())
                    await self._one(h, msg)
                else:
                    await self._chunk(h, batch)
            finally:
                _paced(h, time.perf_counter() - started, len(batch))
                room.set()

    def _chunked(self, h: _Handler) -> bool:
        """Hand a sync handler several messages per thread hop? Only when it is fast (the
        hop costs more than the handler) and its breaker, if any, is closed."""
        pace = h.seconds_per_message
        return (
            not h.is_async
            and pace is not None
            and pace < CHUNK_PACE_S
            and (h.breaker is None or self._allowed(h) is None)
        )

    async def _one(self, h: _Handler, msg: aio.Message) -> None:
        h.stats.in_flight += 1
        try:
            await self._handle_one(h, msg)
        except asyncio.CancelledError:
            await self._release(h, msg)  # the shutdown deadline passed
            raise
        finally:
            h.stats.in_flight -= 1
            h.last_active = time.monotonic()

    async def _prepare_one(self, h: _Handler, msg: aio.Message) -> tuple[Any, Context] | None:
        """The handler's arguments for ``msg``; None when it is settled already (past
        ``max_total_deliveries``, or undecodable)."""
        reason = h.retry.exhausted(msg.attempt)
        if reason is not None:
            log.error("%s: message %s %s", h.name, msg.id, reason)
            await self._settle_failure(h, msg, reason, None, True)
            return None
        try:
            payload = self._payload(h, msg)
        except UndecodableMessage as exc:
            await self._poison(h, msg, exc)
            return None
        return payload, Context(msg, None)

    async def _handle_one(self, h: _Handler, msg: aio.Message) -> None:
        prepared = await self._prepare_one(h, msg)
        if prepared is None:
            return
        payload, ctx = prepared
        with _span(msg, h.group) as span:  # the sends too: their spans are children of it
            try:
                await self._call(h, payload, ctx)
            except Exception as exc:  # noqa: BLE001 - the handler's failure is data
                tracing.record_failure(span, exc)
                await self._handler_failed(h, msg, exc)
                return
            await self._handler_succeeded(h, msg, ctx)

    async def _handler_failed(self, h: _Handler, msg: aio.Message, exc: Exception) -> None:
        self._failed(h, msg, exc)
        if h.guarantee is Guarantee.AT_MOST_ONCE:
            return  # never redelivered, by contract: counted and logged
        delay, dead = h.retry.decide(msg.attempt, exc, self.rng)
        await self._settle_failure(h, msg, f"{type(exc).__name__}: {exc}", delay, dead)

    async def _handler_succeeded(self, h: _Handler, msg: aio.Message, ctx: Context) -> None:
        """Make the handler's sends, then ack."""
        if h.breaker is not None:
            h.breaker.succeeded(self.clock())
        try:
            assert self._broker is not None
            if ctx._sends:
                producer = self._broker.producer()
                for queue, body, key, headers, mid in ctx._sends:
                    await producer.send(queue, body, key=key, headers=headers or None, id=mid)
            await msg.ack()
        except ReceiptError as exc:
            h.stats.lease_lost += 1
            log.warning("%s: %s (the message comes back)", h.name, exc)
            return
        except ClosedError:
            return  # shutting down: the lease went back with the consumer
        h.stats.handled += 1

    async def _chunk(self, h: _Handler, msgs: list[aio.Message]) -> None:
        """Several messages for a fast sync handler in one thread hop; each is settled
        as ``_handle_one`` would. The thread stops at the first failure (the breaker may
        open on it): the rest go on one by one, each checking the breaker first."""
        h.stats.in_flight += len(msgs)
        unsettled = list(msgs)
        try:
            ready: list[tuple[aio.Message, Any, Context]] = []
            for msg in msgs:
                prepared = await self._prepare_one(h, msg)
                if prepared is None:
                    unsettled.remove(msg)
                else:
                    ready.append((msg, *prepared))
            assert self._pool is not None
            loop = asyncio.get_running_loop()
            run = contextvars.copy_context().run
            results = await loop.run_in_executor(self._pool, lambda: run(self._run_chunk, h, ready))
            for (msg, _payload, ctx), (exc, span, result) in zip(ready, results, strict=False):
                with tracing.resumed(span):
                    if exc is not None:
                        await self._handler_failed(h, msg, exc)
                    else:
                        if inspect.isawaitable(result):  # a sync def returning a coroutine
                            await result
                        await self._handler_succeeded(h, msg, ctx)
                unsettled.remove(msg)
            for msg, _payload, _ctx in ready[len(results) :]:
                unsettled.remove(msg)
                if self._stopping or (h.breaker is not None and self._allowed(h) == 0):
                    await self._release(h, msg)
                    continue
                if h.breaker is not None:
                    h.breaker.started(self.clock())
                await self._handle_one(h, msg)
        except asyncio.CancelledError:
            for msg in unsettled:  # the shutdown deadline passed
                await self._release(h, msg)
            raise
        finally:
            h.stats.in_flight -= len(msgs)
            h.last_active = time.monotonic()

    def _run_chunk(
        self, h: _Handler, ready: list[tuple[aio.Message, Any, Context]]
    ) -> list[tuple[Exception | None, Any, Any]]:
        """In a handler thread: call the handler on each message, up to the first failure.
        Returns (exception or None, its span, the handler's result) for each one called."""
        results: list[tuple[Exception | None, Any, Any]] = []
        for msg, payload, ctx in ready:
            with _span(msg, h.group) as span:
                try:
                    result = h.fn(payload, ctx) if h.with_context else h.fn(payload)
                except Exception as exc:  # noqa: BLE001 - the handler's failure is data
                    tracing.record_failure(span, exc)
                    results.append((exc, span, None))
                    return results
            results.append((None, span, result))
        return results

    def _payload(self, h: _Handler, msg: aio.Message) -> Any:
        if h.takes is _Takes.MESSAGE:
            return msg
        headers = msg._rec[3]  # the stored mapping: ``msg.headers`` would copy it
        return h.decode(msg.body, headers.get(CONTENT_TYPE) if headers else None)

    async def _call(self, h: _Handler, payload: Any, ctx: Context) -> None:
        args = (payload, ctx) if h.with_context else (payload,)
        if h.is_async:
            await h.fn(*args)
            return
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        # in a copy of this task's context: the handler sees its message's trace span
        call = contextvars.copy_context().run
        result = await loop.run_in_executor(self._pool, lambda: call(h.fn, *args))
        if inspect.isawaitable(result):  # a sync def returning a coroutine
            await result

    def _failed(self, h: _Handler, msg: aio.Message, exc: BaseException) -> None:
        h.stats.failed += 1
        if h.breaker is not None:
            before = h.breaker.state
            h.breaker.failed(self.clock())
            if h.breaker.state is BreakerState.OPEN and before is not BreakerState.OPEN:
                log.error(
                    "%s: circuit breaker opened after %d consecutive failures; no messages "
                    "for %.1f s",
                    h.name,
                    h.breaker.consecutive_failures,
                    h.breaker.config.recovery_timeout,
                )
        log.warning(
            "%s failed on message %s (attempt %d): %s: %s",
            h.name,
            msg.id,
            msg.attempt,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    async def _settle_failure(
        self, h: _Handler, msg: aio.Message, error: str, delay: float | None, dead: bool
    ) -> None:
        try:
            if dead and h.dead_letter:
                await msg.reject(error)
                h.stats.dead_lettered += 1
            else:
                await msg.nack(delay, error=error)
                h.stats.retried += 1
        except ReceiptError as exc:
            h.stats.lease_lost += 1
            log.warning("%s: %s", h.name, exc)
        except (ClosedError, NotSupported):
            pass

    async def _poison(self, h: _Handler, msg: aio.Message, exc: UndecodableMessage) -> None:
        h.stats.undecodable += 1
        log.error("%s: message %s is undecodable: %s", h.name, msg.id, exc)
        if h.guarantee is Guarantee.AT_MOST_ONCE:
            return
        await self._settle_failure(h, msg, f"undecodable: {exc}", None, True)

    async def _release(self, h: _Handler, msg: aio.Message) -> None:
        h.stats.released += 1
        if h.guarantee is Guarantee.AT_MOST_ONCE:
            return  # no lease to give back
        with contextlib.suppress(ReceiptError, ClosedError):
            await msg.release()

    # -- exactly-once ------------------------------------------------------------------

    async def _run_transactions(self, h: _Handler, index: int, consumer: aio.Consumer) -> None:
        tid = _transactional_id(self.name, h.queue, h.group, self.instance, index)

        async def handle(msg: aio.Message, out: aio.Outputs) -> None:
            if h.breaker is not None:
                if self._allowed(h) == 0:
                    raise _BreakerOpen
                h.breaker.started(self.clock())
            reason = h.retry.exhausted(msg.attempt)
            if reason is not None:
                raise _Exhausted(reason)
            h.stats.in_flight += 1
            h.idle = False
            started = time.perf_counter()
            try:
                payload = self._payload(h, msg)  # UndecodableMessage: see on_error
                ctx = Context(msg, out)
                with _span(msg, h.group):
                    await self._call(h, payload, ctx)
            except UndecodableMessage:
                raise
            except Exception as exc:
                self._failed(h, msg, exc)
                raise
            finally:
                h.stats.in_flight -= 1
                h.last_active = time.monotonic()
                _paced(h, time.perf_counter() - started, 1)
            if h.breaker is not None:
                h.breaker.succeeded(self.clock())

        async def handle_many(
            msgs: list[aio.Message], outs: list[aio.Outputs]
        ) -> list[Exception | None]:
            """A fast sync handler: the messages of one receive in one thread hop (see
            ``_chunk``); otherwise ``handle`` on each."""
            results: list[Exception | None] = [None] * len(msgs)
            ready: list[tuple[int, aio.Message, Any, Context]] = []
            if len(msgs) > 1 and self._chunked(h):
                for i, (msg, out) in enumerate(zip(msgs, outs, strict=True)):
                    reason = h.retry.exhausted(msg.attempt)
                    if reason is not None:
                        results[i] = _Exhausted(reason)
                        continue
                    try:
                        ready.append((i, msg, self._payload(h, msg), Context(msg, out)))
                    except UndecodableMessage as exc:
                        results[i] = exc
                h.stats.in_flight += len(ready)
                h.idle = False
                started = time.perf_counter()
                try:
                    assert self._pool is not None
                    run = contextvars.copy_context().run
                    chunk = [(m, p, c) for _, m, p, c in ready]
                    done = await asyncio.get_running_loop().run_in_executor(
                        self._pool, lambda: run(self._run_chunk, h, chunk)
                    )
                finally:
                    h.stats.in_flight -= len(ready)
                    h.last_active = time.monotonic()
                    _paced(h, time.perf_counter() - started, max(1, len(ready)))
                for (i, msg, _payload, _ctx), (error, _span, result) in zip(
                    ready, done, strict=False
                ):
                    if error is not None:
                        self._failed(h, msg, error)
                        results[i] = error
                        continue
                    if inspect.isawaitable(result):  # a sync def returning a coroutine
                        await result
                    if h.breaker is not None:
                        h.breaker.succeeded(self.clock())
                rest = [i for i, *_ in ready[len(done) :]]  # after a failure: one by one
            else:
                rest = list(range(len(msgs)))
            for i in rest:
                try:
                    await handle(msgs[i], outs[i])
                except Exception as exc:  # noqa: BLE001 - the handler's failure is data
                    results[i] = exc
            return results

        def on_error(msg: aio.Message, exc: Exception) -> tuple[float | None, bool] | None:
            if isinstance(exc, _BreakerOpen):
                h.stats.released += 1
                return None
            if isinstance(exc, UndecodableMessage):
                h.stats.undecodable += 1
                log.error("%s: message %s is undecodable: %s", h.name, msg.id, exc)
                decision: tuple[float | None, bool] = (None, True)
            elif isinstance(exc, _Exhausted):
                log.error("%s: message %s %s", h.name, msg.id, exc)
                decision = (None, True)
            else:
                decision = h.retry.decide(msg.attempt, exc, self.rng)
            if decision[1] and h.dead_letter:
                h.stats.dead_lettered += 1
                return decision
            h.stats.retried += 1
            return decision[0], False

        def committed(msgs: list[aio.Message]) -> None:
            h.stats.handled += len(msgs)

        while not self._stopping:
            allowed = self._allowed(h)
            trial = allowed == 1
            if allowed == 0 or (trial and index != 0):  # one trial, by the first loop
                h.idle = True
                await self._pause(h)
                continue
            closed = h.breaker is None or not trial

            def stop(closed: bool = closed) -> bool:
                if self._stopping:
                    return True
                return closed and h.breaker is not None and self._allowed(h) is not None

            result = await consumer.process(
                handle,
                handle_many=None if h.is_async else handle_many,
                transactional_id=tid,
                batch=h.batch,
                limit=1 if trial else None,
                idle=self._until_idle,
                stop=stop,
                on_commit=committed,
                on_error=on_error,
            )
            if result.committed + result.failed + result.aborted == 0:
                h.idle = True
            if consumer._closed:
                return


class _Exhausted(Exception):
    """A message past its policy's ``max_total_deliveries``: dead-letter it unhandled."""


class _BreakerOpen(Exception):
    """The breaker opened while a batch was being handled: release the rest."""


def _paced(h: _Handler, seconds: float, messages: int) -> None:
    """Fold ``messages`` handled in ``seconds`` into the handler's moving average pace."""
    took = seconds / messages
    avg = h.seconds_per_message
    h.seconds_per_message = took if avg is None else 0.8 * avg + 0.2 * took


def _transactional_id(*parts: object) -> str:
    """``name:queue:group:instance:index`` in the characters a transactional id may use."""
    text = re.sub(r"[^A-Za-z0-9._:\-]", "-", ":".join(str(p) for p in parts))
    if len(text) > 200:  # keep it unique: the end (instance, index) and a digest of all
        digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        text = f"{digest}:{text[-183:]}"
    return text if text[0].isalnum() else f"t{text}"[:200]


def _no_decode(body: bytes, content_type: str | None) -> Any:
    return body


_NO_SPAN = contextlib.nullcontext()  # reusable: yields None, as process_span does


def _span(msg: aio.Message, group: str) -> contextlib.AbstractContextManager[Any]:
    """The OpenTelemetry ``process`` span of a message (nothing without opentelemetry)."""
    if not tracing.ENABLED:
        return _NO_SPAN
    return tracing.process_span(msg, group=group)
