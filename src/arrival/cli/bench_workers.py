"""The producers and consumers of ``arrival bench``: threads on the embedded engine,
``spawn`` processes (one connection each) against a server.

Every body starts with its send time (``struct.pack("<d", t)``): the time ``send_batch``
was called, or in an open-loop (``rate``) run the time the schedule meant it to be sent,
so a broker that makes producers wait cannot hide that wait (no coordinated omission). A
consumer records processed time minus send time once the message is processed: acked, or
for exactly-once its transaction committed. Backlog messages carry 0 and are not timed.

A worker joins, marks itself ready in ``Shared``, waits for the start, works, and puts
one ``WorkerReport`` on its report queue, with an error instead when it failed. Progress
is the ``Shared`` processed counters; a consumer stops once the producers are done and
everything sent (backlog included) is processed, or when the run is aborted.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import arrival
from arrival.cli.bench_measure import LatencyHistogram, own_peak_rss

__all__ = ["GC_ENV", "Plan", "Shared", "WorkerReport", "process_main", "run_worker", "tune_gc"]

GC_ENV = "ARRIVAL_BENCH_GC"  # --gc-threshold, for the worker processes


def tune_gc() -> None:
    """``gc.set_threshold(N, 50, 100)`` when ``$ARRIVAL_BENCH_GC`` is N (--gc-threshold)."""
    n = os.environ.get(GC_ENV)
    if n:
        gc.set_threshold(int(n), 50, 100)


_stamp = struct.Struct("<d")
pack_time = _stamp.pack
unpack_time = _stamp.unpack_from
GROUP = "bench"


@dataclass(frozen=True, slots=True)
class Plan:
    """What every worker of one run needs to know (pickled into spawned processes)."""

    url: str
    guarantee: str
    queue: str
    sink: str | None  # exactly-once: the output queue
    size: int
    batch: int
    producers: int
    messages: int | None  # sent in the measured phase; None: closed loop until the deadline
    duration: float | None
    rate: float | None  # msg/s, all producers together (open loop)
    linger: float | None  # seconds
    txn_batch: int
    backlog: int
    tag: str


def _local_array(code: str, n: int) -> list[Any]:
    """A list standing for ``RawArray(code, n)``, for threads."""
    return [0.0 if code == "d" else 0] * n


class Shared:
    """Counters and flags shared by the bench process and its workers (``ctx``: shared
    memory for processes; None: lists, for threads). Each worker writes only its own
    slots and the bench process only the flags, so nothing needs a lock: a worker killed
    at any moment cannot leave one held for the others to wait on forever."""

    _GO, _PRODUCERS_DONE, _ABORT = 0, 1, 2

    def __init__(self, producers: int, consumers: int, ctx: Any = None) -> None:
        self.producers = producers
        new: Callable[[str, int], Any] = _local_array if ctx is None else ctx.RawArray
        self._flags = new("q", 3)
        self._t0 = new("d", 1)
        self._ready = new("q", producers + consumers)
        self._sent = new("q", producers)
        self._processed = new("q", consumers)

    # the bench process
    def start(self, t0: float) -> None:
        self._t0[0] = t0
        self._flags[self._GO] = 1

    def producers_finished(self) -> None:
        self._flags[self._PRODUCERS_DONE] = 1

    def abort(self) -> None:
        self._flags[self._ABORT] = 1
        self._flags[self._GO] = 1

    def ready(self) -> int:
        return sum(self._ready[:])

    # both
    @property
    def t0(self) -> float:
        return float(self._t0[0])

    @property
    def going(self) -> bool:
        return bool(self._flags[self._GO])

    @property
    def producers_done(self) -> bool:
        return bool(self._flags[self._PRODUCERS_DONE])

    @property
    def aborted(self) -> bool:
        return bool(self._flags[self._ABORT])

    def sent(self) -> int:
        return sum(self._sent[:])

    def processed(self) -> int:
        return sum(self._processed[:])

    # the workers
    def mark_ready(self, role: str, index: int) -> None:
        self._ready[index if role == "producer" else self.producers + index] = 1

    def add_sent(self, index: int, n: int) -> None:
        self._sent[index] += n

    def add_processed(self, index: int, n: int) -> None:
        self._processed[index] += n


@dataclass(slots=True)
class WorkerReport:
    role: str  # "producer" or "consumer"
    index: int
    pid: int
    sent: int = 0
    batches: int = 0  # send_batch calls
    last_sent: float = 0.0  # wall time the last send returned
    behind_s: float = 0.0  # open loop: last send's start minus its last message's time
    processed: int = 0
    transactions: int = 0
    last_processed: float = 0.0  # wall time the last ack / commit returned
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    peak_rss: int | None = None  # processes only: their own peak
    error: str | None = None


def _ready_then_go(shared: Shared, role: str, index: int) -> bool:
    """Count this worker as ready, wait for the start; False if the run was aborted."""
    shared.mark_ready(role, index)
    while not shared.going:
        time.sleep(0.0005)
    return not shared.aborted


def _produce(plan: Plan, index: int, shared: Shared, broker: arrival.Broker) -> WorkerReport:
    report = WorkerReport("producer", index, os.getpid())
    producer = broker.producer()
    tail = os.urandom(plan.size - 8)
    send_batch, queue, batch = producer.send_batch, plan.queue, plan.batch
    if not _ready_then_go(shared, "producer", index):
        return report
    t0 = shared.t0

    def send(bodies: list[bytes]) -> None:
        send_batch(queue, bodies)
        report.last_sent = time.time()
        report.sent += len(bodies)
        report.batches += 1
        shared.add_sent(index, len(bodies))

    share = None if plan.messages is None else len(range(index, plan.messages, plan.producers))
    if plan.rate is not None:
        assert share is not None
        _open_loop(plan, index, t0, share, tail, send, report, shared)
        return report
    deadline = math.inf if plan.duration is None else t0 + plan.duration
    if plan.linger is None:  # as fast as the broker takes them, a batch at a time
        left = math.inf if share is None else share
        while left > 0 and not shared.aborted and time.time() < deadline:
            k = int(min(batch, left))
            send([pack_time(time.time()) + tail] * k)
            left -= k
        return report
    # a batch goes when it has ``batch`` messages or its first has waited ``linger``
    linger, first = plan.linger, 0.0
    pending: list[bytes] = []
    left = math.inf if share is None else share
    while left > 0 and not shared.aborted:
        now = time.time()
        if now >= deadline:
            break
        if not pending:
            first = now
        pending.append(pack_time(now) + tail)
        left -= 1
        if len(pending) >= batch or now - first >= linger:
            send(pending)
            pending = []
    if pending and not shared.aborted:
        send(pending)
    return report


def _open_loop(
    plan: Plan,
    index: int,
    t0: float,
    share: int,
    tail: bytes,
    send: Callable[[list[bytes]], None],
    report: WorkerReport,
    shared: Shared,
) -> None:
    """Send on a fixed schedule: message ``k`` of producer ``index`` is due at
    ``t0 + (k * producers + index) / rate``, so the producers together send ``rate``
    messages a second, evenly. Every ``linger`` seconds, what is due goes in batches of
    at most ``batch``, each stamped with its due time, however late it is."""
    rate, step, batch = float(plan.rate or 0.0), plan.producers, plan.batch
    linger = 0.001 if plan.linger is None else plan.linger

    def due_at(k: int) -> float:
        return t0 + (k * step + index) / rate

    k = 0
    wake = t0
    while k < share and not shared.aborted:
        now = time.time()
        if now < wake:
            time.sleep(wake - now)
            now = time.time()
        elapsed = (now - t0) * rate - index
        due = 0 if elapsed < 0 else min(share, int(elapsed // step) + 1)
        while k < due and not shared.aborted:
            m = min(batch, due - k)
            bodies = [pack_time(due_at(j)) + tail for j in range(k, k + m)]
            started = time.time()
            send(bodies)
            k += m
            report.behind_s = max(0.0, started - due_at(k - 1))
        if k < share:  # next: ``linger`` after this look, or when the next one is due
            wake = max(now + linger, due_at(k))


def _recorder(report: WorkerReport, shared: Shared) -> Callable[[list[arrival.Message]], None]:
    """``record(msgs)``: msgs were processed just now."""
    hist, index = report.latency, report.index

    def record(msgs: list[arrival.Message]) -> None:
        now = time.time()
        hist.add_stamps(now, Counter(map(unpack_time, [m.body for m in msgs])))
        n = len(msgs)
        report.processed += n
        report.last_processed = now
        shared.add_processed(index, n)

    return record


def _finished(plan: Plan, shared: Shared) -> bool:
    """The producers are done and every message sent (backlog included) is processed."""
    return shared.producers_done and shared.processed() >= plan.backlog + shared.sent()


def _consume(plan: Plan, index: int, shared: Shared, broker: arrival.Broker) -> WorkerReport:
    report = WorkerReport("consumer", index, os.getpid())
    consumer = broker.consumer(plan.queue, GROUP)
    try:
        if not _ready_then_go(shared, "consumer", index):
            return report
        record = _recorder(report, shared)
        receive, ack, batch = consumer.receive_batch, consumer.ack_batch, plan.batch
        lossy = plan.guarantee == "at-most-once"
        arrived = False  # at-most-once: the broker accepted every message sent
        idle_since = 0.0
        while not shared.aborted:
            msgs = receive(batch, timeout=0.1)
            if msgs:
                ack(msgs)
                record(msgs)
                idle_since = 0.0
                if _finished(plan, shared):
                    break
                continue
            if not shared.producers_done:
                continue
            if _finished(plan, shared):
                break
            if lossy:
                # what is not here was dropped (counted by the broker): stop once the broker
                # has accepted all that was sent and the queue came up empty after that
                if arrived:
                    break
                arrived = broker.stats(plan.queue).sent >= plan.backlog + shared.sent()
                now = time.monotonic()
                idle_since = idle_since or now
                if now - idle_since > 10.0:
                    break  # lost on the way (at-most-once may lose): stop waiting
    finally:
        consumer.close()
    return report


def _transform(plan: Plan, index: int, shared: Shared, broker: arrival.Broker) -> WorkerReport:
    """Exactly-once consume-transform-produce: one output per input, committed with the
    input's ack, ``txn_batch`` inputs per transaction."""
    report = WorkerReport("consumer", index, os.getpid())
    sink = plan.sink
    assert sink is not None
    with broker.consumer(plan.queue, GROUP) as consumer:
        if not _ready_then_go(shared, "consumer", index):
            return report
        record = _recorder(report, shared)

        def handle(msg: arrival.Message, out: arrival.Outputs) -> None:
            out.send(sink, msg.body)

        def committed(msgs: list[arrival.Message]) -> None:
            record(msgs)
            report.transactions += 1

        consumer.process(
            handle,
            transactional_id=f"bench-{plan.tag}-{index}",
            batch=plan.txn_batch,
            interval=0.1,
            stop=lambda: shared.aborted or _finished(plan, shared),
            on_commit=committed,
        )
    return report


def run_worker(
    role: str,
    plan: Plan,
    index: int,
    shared: Shared,
    reports: Any,
    broker: arrival.Broker | None = None,
) -> bool:
    """Run one worker on ``broker`` (a thread) or on its own connection (a process) and
    put its report on ``reports``; False if it failed."""
    if role == "producer":
        work = _produce
    else:
        work = _transform if plan.guarantee == "exactly-once" else _consume
    try:
        if broker is None:
            with arrival.connect(plan.url) as own:
                report = work(plan, index, shared, own)
        else:
            report = work(plan, index, shared, broker)
    except BaseException as exc:  # noqa: BLE001 - reported to the bench process
        report = WorkerReport(role, index, os.getpid(), error=f"{type(exc).__name__}: {exc}")
    if broker is None:
        report.peak_rss = own_peak_rss()
    reports.put(report)
    return report.error is None


def process_main(role: str, plan: Plan, index: int, shared: Shared, reports: Any) -> None:
    """A worker process's whole life. Ctrl-C is for the bench process, which ends its
    workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_gc()
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked to start
    ok = run_worker(role, plan, index, shared, reports)
    reports.close()
    reports.join_thread()  # the report is in the pipe before the process exits
    sys.exit(0 if ok else 1)
