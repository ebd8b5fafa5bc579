"""The exactly-once processing loop, written once for both APIs.

``steps()`` is a generator that decides everything and does no waiting: it yields
commands (receive, handle, nack, release, wait for a commit) and the sync or async
driver carries each one out, sending back its result or throwing its error in. So the
blocking ``Consumer.process`` and the asyncio one cannot drift apart.

Invariants:
1. A message's outputs and its ack join a transaction together, or (handler failure,
   refused output) neither does; the message is then nacked.
2. Commits are submitted in order and complete in order. Up to ``MAX_IN_FLIGHT`` may be
   in flight at once while the next messages are handled: their fsyncs overlap that work
   and are shared by group commit. A batch's acks settle its messages in memory at
   submit, so per-key order holds across batches in flight.
3. A refused commit (a lease lost, the transaction timed out) took no effect: it is
   counted and its messages come back. A fenced loop releases its batch to the newer
   holder and stops.
4. The loop holds one epoch of its transactional id for all its transactions.
5. A transaction commits when it holds ``batch`` messages, when no more input is waiting,
   or ``interval`` after it opened. Small transactions (one per message, say) share a
   receive; what a fenced or stopped loop received and did not handle goes back at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, NamedTuple

from arrival import tracing
from arrival._backend import Backend
from arrival._common import MessageBase, TransactionCore, check_seconds, to_send
from arrival._pending import Pending, Steps
from arrival.engine import Send
from arrival.errors import ProducerFenced, ReceiptError, TransactionTimedOut, UsageError

__all__ = [
    "MAX_IN_FLIGHT",
    "Failure",
    "Handle",
    "Nack",
    "ProcessResult",
    "Receive",
    "Release",
    "Wait",
]

MAX_IN_FLIGHT = 16
"""Commits a loop may have in flight: with one transaction per message, this many share
an fsync instead of waiting for one each."""

PREFETCH = 256
"""With transactions smaller than this, a receive takes messages for several of them."""


@dataclass
class ProcessResult:
    """What ``Consumer.process`` did."""

    committed: int = 0  # input messages whose outputs and ack were committed
    failed: int = 0  # handler raised: the message was nacked, its outputs discarded
    aborted: int = 0  # transactions refused (a lease expired, timeout): inputs come back


class OutputsBase:
    """A handler's outputs for one input message, committed with that message's ack."""

    __slots__ = ("_core", "_items", "_source")

    def __init__(self, core: TransactionCore, source: MessageBase) -> None:
        self._core = core
        self._source = source
        self._items: list[tuple[str, Send]] = []

    def _prepare(self) -> Steps[None] | None:
        """Steps that look up the queues sent to (raising UnknownQueue) before ``_flush``;
        None when they are known already (the common case: no generator per message)."""
        core = self._core
        limits = core.limits
        for q, _ in self._items:
            if q not in limits:
                return core.prepare({q for q, _ in self._items})
        return None if core.beginning is None else core.prepare(())

    def _flush(self) -> None:
        self._core.add_all(self._items, self._source)

    def _add(
        self,
        queue: str,
        body: object,
        key: object,
        headers: object,
        mid: object,
    ) -> None:
        """Buffer one output (``Outputs.send`` of either API, and the worker runtime's
        ``Context.send``, which runs outside the event loop)."""
        message = to_send(body, key, headers, mid)
        if tracing.ENABLED:  # in the handler's context: its span is the output's parent
            message = tracing.traced_message(queue, message)
        self._items.append((queue, message))


class Receive(NamedTuple):
    """Receive up to ``want`` messages within ``wait`` seconds; reply: the list, or None
    once the consumer is closed."""

    want: int
    wait: float


class Handle(NamedTuple):
    """For each message in turn, run the handler on it and its outputs, then
    ``out._prepare()`` and ``out._flush()``; reply: a list with None, or the Exception,
    for each message. One command a batch, not one a message: the loop's cost per
    message is the handler's."""

    msgs: list[Any]
    outs: list[Any]


class Nack(NamedTuple):
    """Settle a message whose handler failed: nack it (after ``delay``, or the queue's
    backoff when None), or reject it to the dead-letter queue when ``dead_letter``."""

    msg: Any
    error: str
    delay: float | None = None
    dead_letter: bool = False


class Release(NamedTuple):
    msg: Any


class Wait(NamedTuple):
    """Wait for ``pending``; reply: its result, or its error is thrown into the loop."""

    pending: Pending[Any]


Command = Receive | Handle | Nack | Release | Wait

Failure = tuple[float | None, bool]
"""What ``on_error(msg, exc)`` decides for a failed message: (nack delay or None for the
queue's backoff, True to dead-letter it now); None instead releases it without spending
an attempt (the failure was not the message's: a circuit breaker opened, say)."""


def check_arguments(batch: object, interval: object, timeout: object) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UsageError(f"batch must be at least 1 message, not {batch!r}")
    check_seconds("interval", interval)
    check_seconds("transaction timeout", timeout)


def steps(
    backend: Backend,
    make_outputs: Callable[[TransactionCore, Any], OutputsBase],
    *,
    transactional_id: str,
    batch: int,
    interval: float,
    timeout: float,
    limit: int | None,
    idle: float | None,
    stop: Callable[[], bool] | None,
    on_commit: Callable[[list[Any]], None] | None,
    on_error: Callable[[Any, Exception], Failure | None] | None = None,
) -> Generator[Command, Any, ProcessResult]:
    """The loop of ``Consumer.process``; see the module docstring."""
    result = ProcessResult()
    tx: TransactionCore | None = None
    batch_msgs: list[Any] = []  # handled, in ``tx``, not yet submitted
    in_flight: deque[tuple[Pending[None], TransactionCore, list[Any]]] = deque()
    pending = 0  # messages in ``in_flight``
    opened = last_seen = time.monotonic()
    waiting: list[Any] = []  # received for transactions not begun yet
    epoch = yield Wait(backend.begin_transaction(transactional_id))

    def give_back(msgs: list[Any]) -> Generator[Command, Any, None]:
        """Fenced: a newer holder took over. Hand it at once ``msgs``, the batches still
        in flight (committed after, in the same epoch: fenced too) and what was received
        for later transactions, rather than leave them leased until their leases expire."""
        nonlocal pending, waiting
        for m in msgs:
            yield Release(m)
        while in_flight:
            _commit, core, more = in_flight.popleft()
            pending -= len(more)
            core.finished(False)
            for m in more:
                yield Release(m)
        rest, waiting = waiting, []
        for m in rest:
            yield Release(m)

    def settle_one() -> Generator[Command, Any, None]:
        nonlocal pending
        commit, core, msgs = in_flight.popleft()
        pending -= len(msgs)
        try:
            yield Wait(commit)  # a storage failure is thrown in: the broker stopped
        except ProducerFenced:
            core.finished(False)
            yield from give_back(msgs)
            raise
        except (ReceiptError, TransactionTimedOut):
            core.finished(False)  # refused over the network: as below, nothing took effect
            result.aborted += 1
            return
        except BaseException:
            core.finished(False)
            raise
        core.finished(True)
        result.committed += len(msgs)
        if on_commit is not None:
            on_commit(msgs)

    def commit() -> Generator[Command, Any, None]:
        nonlocal tx, batch_msgs, pending
        assert tx is not None
        current, msgs = tx, batch_msgs
        tx, batch_msgs = None, []
        while len(in_flight) >= MAX_IN_FLIGHT:
            yield from settle_one()
        try:
            commit = current.submit()
        except ProducerFenced:
            yield from give_back(msgs)
            raise
        except (ReceiptError, TransactionTimedOut):
            result.aborted += 1  # nothing took effect; the inputs are redelivered
            return
        in_flight.append((commit, current, msgs))
        pending += len(msgs)

    try:
        while True:
            held = len(batch_msgs)
            done = result.committed + result.failed + pending + held
            if stop is not None and stop():
                break
            if limit is not None and done >= limit:
                if not in_flight:
                    break
                while in_flight:  # a commit may yet be refused, and its messages redone
                    yield from settle_one()
                continue
            now = time.monotonic()
            if idle is not None and not held and not in_flight and now - last_seen >= idle:
                break
            want = batch - held
            if not held and batch < PREFETCH:
                # small transactions: one receive for several of them (up to the commits
                # that may still go in flight), not a round trip for each
                want = min(batch * max(1, MAX_IN_FLIGHT - len(in_flight)), PREFETCH)
            if limit is not None:
                want = min(want, limit - done)
            if held:
                wait = 0.0  # what is there now joins the batch; a dry input commits it
            elif in_flight:
                wait = 0.0  # take what is there; settle the commits if nothing is
            else:
                wait = 0.1 if stop is not None else 1.0
                if idle is not None:
                    wait = min(wait, max(0.0, idle - (now - last_seen)))
            msgs = yield Receive(want, wait)
            if msgs is None:
                break  # the consumer was closed
            if not msgs and not held:
                while in_flight:  # nothing to overlap the commits with: finish them
                    yield from settle_one()
                continue
            dry = len(msgs) < want  # nothing more waiting right now
            if msgs:
                last_seen = time.monotonic()
            i = 0
            while i < len(msgs):  # in transactions of up to ``batch`` messages
                if i and stop is not None and stop():
                    waiting = []
                    for m in msgs[i:]:  # received, not handled: back without an attempt
                        yield Release(m)
                    break
                if tx is None:
                    tx = TransactionCore(backend, transactional_id, timeout, epoch)
                    opened = time.monotonic()
                chunk = msgs[i : i + batch - len(batch_msgs)]
                i += len(chunk)
                waiting = msgs[i:]
                errors = yield Handle(chunk, [make_outputs(tx, m) for m in chunk])
                for msg, error in zip(chunk, errors, strict=True):
                    if error is not None:
                        result.failed += 1
                        text = f"{type(error).__name__}: {error}"
                        decision = (None, False) if on_error is None else on_error(msg, error)
                        if decision is None:
                            yield Release(msg)  # not the message's fault: no attempt spent
                        else:
                            yield Nack(msg, text, *decision)
                        continue
                    tx.ack(msg)
                    batch_msgs.append(msg)
                if len(batch_msgs) >= batch:
                    yield from commit()
            waiting = []
            if tx is not None and (dry or time.monotonic() - opened >= interval):
                if batch_msgs:
                    yield from commit()
                else:
                    tx.abort()
                    tx = None
    finally:
        if tx is not None:
            if batch_msgs and not backend.closed:
                yield from commit()
            else:
                tx.abort()
        while in_flight:
            yield from settle_one()
        yield Wait(backend.end_transaction(transactional_id, epoch))
    return result
