"""``arrival bench``: end-to-end throughput and latency per guarantee, on the public API.

A run sends messages of ``size`` bytes from ``producers`` (``send_batch`` of up to
``batch`` messages) while ``consumers`` receive batches and ack them; for exactly-once
each consumer runs ``Consumer.process`` instead, a consume-transform-produce loop with its
own transactional id that sends one output per input to a second exactly-once queue and
commits ``txn_batch`` inputs per transaction (1: one transaction per message). On the
embedded engine the producers and consumers are threads of this process; against a
server (``url`` is ``arrival://...``) they are ``spawn`` processes, one connection each,
and this process only orchestrates. Workers: ``bench_workers``.

How much is sent: ``count`` messages, or for ``duration`` seconds (the run then drains
what was sent). Closed loop by default (each producer sends its next batch once the last
one returned; with ``linger``, a batch goes when full or when its first message has waited
``linger``); with ``rate``, open loop: the producers send ``rate`` messages a second in
total on a fixed schedule, every ``linger`` (default 1 ms) what is due, whether or not the
broker keeps up, and report how far behind the schedule they ended.

Latency is per message, from its send time (written in its first 8 bytes; in an open-loop
run the time the schedule meant it to be sent) to the ack or the commit of its output
returning. Throughput is messages processed per second, from the start of the measured
phase to the last ack or commit.

``backlog`` first loads that many messages with no consumer running (not timed), then the
measured phase's consumers drain the backlog and the new messages. The broker's RSS (the
server bench started, or this process on the embedded engine) is sampled once a second,
and every process reports its peak (``bench_measure``).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import multiprocessing
import os
import platform
import queue as queue_module
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import arrival
from arrival.cli.bench_measure import LatencyHistogram, RssProbe, RssSampler
from arrival.cli.bench_workers import (
    GROUP,
    Plan,
    Shared,
    WorkerReport,
    pack_time,
    process_main,
    run_worker,
)

__all__ = [
    "DEFAULT_COUNT",
    "GUARANTEES",
    "BenchError",
    "BenchOptions",
    "BenchResult",
    "BenchServer",
    "BenchUsageError",
    "ProgressState",
    "environment",
    "run_bench",
    "start_server",
    "summarize",
]

GUARANTEES = ("at-most-once", "at-least-once", "exactly-once")
DEFAULT_COUNT = 200_000
DEFAULT_RATE_LINGER_MS = 1.0
AT_MOST_ONCE_CAPACITY = 100_000  # the default: a closed-loop duration run's at-most-once queue

DURABILITY = {
    "at-most-once": "memory only, nothing fsynced (send returns at once)",
    "at-least-once": "fsync on every commit (SQLite WAL, synchronous=FULL), group commit",
    "exactly-once": "fsync on every commit (SQLite WAL, synchronous=FULL), group commit",
}


class BenchError(Exception):
    """A run failed: a worker failed or died, or the figures do not add up."""


class BenchUsageError(ValueError):
    """An option value bench cannot run with."""


def _is_remote(url: str | None) -> bool:
    return url is not None and url.startswith(("arrival://", "arrivals://", "nats://"))


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """One run's settings; ``count`` and ``duration`` both None: ``DEFAULT_COUNT``."""

    guarantee: str
    count: int | None = None
    duration: float | None = None
    size: int = 100
    batch: int = 1000
    producers: int = 1
    consumers: int = 1
    txn_batch: int = 1000
    rate: float | None = None
    linger_ms: float | None = None
    backlog: int = 0
    url: str | None = None  # None: a fresh temp dir

    def check(self) -> None:
        """Raise BenchUsageError, naming the option, for a value bench cannot run with."""
        if self.guarantee not in GUARANTEES:
            raise BenchUsageError(
                f"unknown guarantee {self.guarantee!r}; choose from {', '.join(GUARANTEES)}"
            )
        if self.count is not None and self.duration is not None:
            raise BenchUsageError("give --count or --duration, not both")
        for name, value in (
            ("--count", self.count),
            ("--batch", self.batch),
            ("--producers", self.producers),
            ("--consumers", self.consumers),
            ("--txn-batch", self.txn_batch),
        ):
            if value is not None and value < 1:
                raise BenchUsageError(f"{name} must be at least 1, not {value}")
        for name, seconds in (("--duration", self.duration), ("--rate", self.rate)):
            if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
                raise BenchUsageError(f"{name} must be a positive number, not {seconds}")
        if self.linger_ms is not None and not (
            math.isfinite(self.linger_ms) and self.linger_ms >= 0
        ):
            raise BenchUsageError(f"--linger must be 0 or more milliseconds, not {self.linger_ms}")
        if self.size < 8:
            raise BenchUsageError(
                f"--size must be at least 8 bytes (a body starts with its send time), "
                f"not {self.size}"
            )
        if self.backlog < 0:
            raise BenchUsageError(f"--backlog must be 0 or more, not {self.backlog}")

    @property
    def messages(self) -> int | None:
        """Messages sent in the measured phase; None: as many as fit in ``duration``."""
        if self.count is not None:
            return self.count
        if self.duration is None:
            return DEFAULT_COUNT
        if self.rate is not None:
            return max(1, math.ceil(self.rate * self.duration - 1e-9))  # the schedule
        return None

    @property
    def linger(self) -> float | None:
        """Seconds; an open-loop run's default is ``DEFAULT_RATE_LINGER_MS``."""
        if self.linger_ms is None:
            return DEFAULT_RATE_LINGER_MS / 1000 if self.rate is not None else None
        return self.linger_ms / 1000


@dataclass(frozen=True, slots=True)
class ProgressState:
    phase: str  # "starting", "loading backlog", "running", "draining"
    done: int  # messages processed (loading: loaded)
    total: int | None  # None: not known yet (a duration run)
    seconds_left: float | None  # a duration run: until the producers stop
    rate: float  # msg/s over about the last second


Progress = Callable[[ProgressState], None]


@dataclass(frozen=True, slots=True)
class BenchResult:
    guarantee: str
    messages: int  # sent in the measured phase
    size_bytes: int
    batch: int
    producers: int
    seconds: float  # the measured phase: start to the last ack / commit
    throughput: float  # msg/s end to end: processed (backlog included) per second
    delivered: int  # processed: acked, or committed (backlog included)
    dropped: int  # at-most-once: dropped on overflow
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    fsyncs: int  # in the measured phase
    commits: int
    consumers: int = 1
    txn_batch: int = 0  # exactly-once: inputs per transaction (0: not transactional)
    transactions: int = 0
    backend: str = "embedded"
    durability: str = ""
    count: int | None = None
    duration_s: float | None = None
    rate: float | None = None  # asked for, msg/s (None: closed loop)
    linger_ms: float | None = None
    max_ms: float = math.nan
    timed: int = 0  # messages with a latency (the backlog's have none)
    send_batches: int = 0
    send_seconds: float = 0.0  # start to the last send returning
    send_rate: float = 0.0  # achieved: messages sent / send_seconds
    behind_schedule_s: float | None = None  # open loop: how late the last send started
    transactions_per_s: float = 0.0
    backlog: int = 0
    backlog_seconds: float = 0.0  # loading it (not timed)
    rss_before_backlog: int | None = None  # the broker's RSS, bytes
    rss_backlog_loaded: int | None = None
    rss_peak_draining: int | None = None  # peak in the measured phase
    broker_process: str | None = None  # "server" or "bench": whose RSS rss_* are
    broker_peak_rss: int | None = None  # the whole run
    peak_rss: list[dict[str, Any]] = field(default_factory=list)  # every process
    workers: list[dict[str, Any]] = field(default_factory=list)  # what each one did
    rss_timeline: list[list[float]] = field(default_factory=list)  # [s, bytes], 1 Hz

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_bench(
    options: BenchOptions,
    *,
    progress: Progress | None = None,
    server: BenchServer | None = None,
) -> BenchResult:
    """One run against a fresh data directory (or ``options.url``); ``server`` is the one
    bench started, whose memory it then watches. Raises BenchUsageError for bad options,
    BenchError when a worker fails or dies; every thread and process it started is
    ended, and its temp dir removed, however it ends (Ctrl-C included)."""
    options.check()
    own_dir = None
    url = options.url
    if url is None:
        own_dir = tempfile.mkdtemp(prefix="arrival-bench-")
        url = own_dir
    try:
        return _Run(options, url, progress or (lambda _: None), server).run()
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


class _Ticker:
    """Reports progress at each new phase and at most every 0.1 s within one, with the
    rate over about the last second."""

    def __init__(self, progress: Progress, shared: Shared) -> None:
        self.progress = progress
        self.shared = shared
        self.window: deque[tuple[float, int]] = deque()
        self.last = 0.0
        self.phase = ""

    def __call__(
        self,
        phase: str,
        total: int | None,
        seconds_left: float | None = None,
        done: int | None = None,
        force: bool = False,
    ) -> None:
        now = time.monotonic()
        if not force and phase == self.phase and now - self.last < 0.1:
            return
        if phase != self.phase:
            self.window.clear()  # a new count (the backlog loaded, then processed)
        self.last, self.phase = now, phase
        if done is None:
            done = self.shared.processed()
        w = self.window
        w.append((now, done))
        while len(w) > 2 and now - w[1][0] >= 1.0:
            w.popleft()
        t, d = w[0]
        rate = (done - d) / (now - t) if now > t else 0.0
        self.progress(ProgressState(phase, done, total, seconds_left, max(0.0, rate)))


@dataclass(slots=True)
class _Handle:
    role: str
    index: int
    worker: threading.Thread | multiprocessing.process.BaseProcess
    report: WorkerReport | None = None

    @property
    def name(self) -> str:
        return f"{self.role} {self.index + 1}"

    @property
    def pid(self) -> int | None:
        w = self.worker
        return None if isinstance(w, threading.Thread) else w.pid

    def exited(self) -> bool:
        w = self.worker
        if isinstance(w, threading.Thread):
            return w.ident is not None and not w.is_alive()
        return w.exitcode is not None

    def how_it_died(self) -> str:
        w = self.worker
        code = None if isinstance(w, threading.Thread) else w.exitcode
        if code is None:
            return "ended without a report"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"died with exit code {code}"


class _Workers:
    """The run's producers and consumers, and their reports: threads on ``broker`` (the
    embedded engine), or spawned processes when ``broker`` is None."""

    def __init__(self, plan: Plan, consumers: int, broker: arrival.Broker | None) -> None:
        self.handles: list[_Handle] = []
        self.reports: Any
        if broker is None:
            ctx = multiprocessing.get_context("spawn")
            self.shared = Shared(plan.producers, consumers, ctx)
            self.reports = ctx.Queue()
        else:
            self.shared = Shared(plan.producers, consumers)
            self.reports = queue_module.Queue()
        roles = [("producer", i) for i in range(plan.producers)]
        roles += [("consumer", i) for i in range(consumers)]
        for role, i in roles:
            worker: threading.Thread | multiprocessing.process.BaseProcess
            if broker is None:
                worker = ctx.Process(
                    target=process_main,
                    args=(role, plan, i, self.shared, self.reports),
                    name=f"bench-{role}-{i + 1}",
                    daemon=True,
                )
            else:
                worker = threading.Thread(
                    target=run_worker,
                    args=(role, plan, i, self.shared, self.reports, broker),
                    name=f"bench-{role}-{i + 1}",
                    daemon=True,
                )
            self.handles.append(_Handle(role, i, worker))

    def start(self) -> None:
        # A process starts with SIGINT blocked (the mask survives exec), so a Ctrl-C at
        # the terminal, which reaches the whole process group, cannot interrupt it while
        # it starts; it then ignores SIGINT: this process ends its workers itself.
        blocked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is (
            threading.main_thread()
        )
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for h in self.handles:
                h.worker.start()
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def _pump(self, timeout: float) -> None:
        """Take a report if one comes within ``timeout``; raise BenchError for a worker
        that failed or died."""
        try:
            report: WorkerReport = self.reports.get(timeout=timeout)
        except queue_module.Empty:
            pass
        else:
            self._take(report)
        for h in self.handles:
            if h.report is None and h.exited():
                deadline = time.monotonic() + 1.0  # its report may still be in the pipe
                while h.report is None and time.monotonic() < deadline:
                    with contextlib.suppress(queue_module.Empty):
                        self._take(self.reports.get(timeout=0.1))
                if h.report is None:
                    pid = f" (pid {h.pid})" if h.pid is not None else ""
                    raise BenchError(f"bench {h.name}{pid} {h.how_it_died()}")

    def _take(self, report: WorkerReport) -> None:
        h = next(h for h in self.handles if (h.role, h.index) == (report.role, report.index))
        h.report = report
        if report.error is not None:
            pid = f" (pid {h.pid})" if h.pid is not None else ""
            raise BenchError(f"bench {h.name}{pid} failed: {report.error}")

    def wait_ready(self, tick: Callable[[], None]) -> None:
        tick()
        while self.shared.ready() < len(self.handles):
            self._pump(0.05)
            tick()

    def go(self, t0: float) -> None:
        self.shared.start(t0)

    def wait(self, role: str, tick: Callable[[], None]) -> list[WorkerReport]:
        mine = [h for h in self.handles if h.role == role]
        while any(h.report is None for h in mine):
            self._pump(0.1)
            tick()
        return [h.report for h in mine if h.report is not None]

    def close(self, grace: float) -> None:
        """End every worker: ask them to stop, wait ``grace`` seconds, then end the
        processes still running (by their pid: SIGTERM, then SIGKILL)."""
        self.shared.abort()
        deadline = time.monotonic() + grace
        for h in self.handles:
            w = h.worker
            if isinstance(w, threading.Thread):
                if w.ident is not None:
                    w.join(max(0.0, deadline - time.monotonic()))
                continue
            if w.pid is None:
                continue  # never started
            w.join(max(0.0, deadline - time.monotonic()))
            if w.exitcode is None:
                w.terminate()
                w.join(2.0)
            if w.exitcode is None:
                w.kill()
                w.join()
            w.close()
        if not isinstance(self.reports, queue_module.Queue):
            self.reports.close()
            self.reports.cancel_join_thread()


class _Run:
    def __init__(
        self, o: BenchOptions, url: str, progress: Progress, server: BenchServer | None
    ) -> None:
        self.o = o
        self.url = url
        self.progress = progress
        self.remote = _is_remote(url)
        self.server = server if self.remote else None
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        eo = o.guarantee == "exactly-once"
        self.plan = Plan(
            url=url,
            guarantee=o.guarantee,
            queue=f"bench-in-{tag}" if eo else f"bench-{o.guarantee}-{tag}",
            sink=f"bench-out-{tag}" if eo else None,
            size=o.size,
            batch=o.batch,
            producers=o.producers,
            messages=o.messages,
            duration=o.duration,
            rate=o.rate,
            linger=o.linger,
            txn_batch=o.txn_batch,
            backlog=o.backlog,
            tag=tag,
        )
        if self.server is not None:
            self.broker_process: str | None = "server"
            broker_pid: int | None = self.server.pid
        elif self.remote:
            self.broker_process, broker_pid = None, None  # a server bench did not start
        else:
            self.broker_process, broker_pid = "bench", os.getpid()
        self.broker_probe = RssProbe(broker_pid)
        self.bench_probe = RssProbe(os.getpid())

    def _create_queues(self, broker: arrival.Broker) -> None:
        o, plan = self.o, self.plan
        if o.guarantee == "at-most-once":
            room = plan.messages if plan.messages is not None else AT_MOST_ONCE_CAPACITY
            broker.create_queue(plan.queue, o.guarantee, capacity=max(1, o.backlog + room))
        else:
            broker.create_queue(plan.queue, o.guarantee)
        if plan.sink is not None:
            broker.create_queue(plan.sink, "exactly-once")

    def _load_backlog(self, broker: arrival.Broker, tick: _Ticker) -> None:
        """``backlog`` messages, stamped 0 (not timed), with no consumer running."""
        o = self.o
        producer = broker.producer()
        body = pack_time(0.0) + os.urandom(o.size - 8)
        done = 0
        tick("loading backlog", o.backlog, done=0, force=True)
        while done < o.backlog:
            k = min(o.batch, o.backlog - done)
            producer.send_batch(self.plan.queue, [body] * k)
            done += k
            tick("loading backlog", o.backlog, done=done)

    def run(self) -> BenchResult:
        o, plan = self.o, self.plan
        started = time.time()
        self.bench_probe.reset_peak()
        self.broker_probe.reset_peak()
        with arrival.connect(self.url) as broker:
            self._create_queues(broker)
            holder = broker.consumer(plan.queue, GROUP)  # the group exists from now
            with RssSampler(self.broker_probe, started) as sampler:
                rss_before = sampler.sample()
                rss_loaded = loaded_peak = None
                workers = _Workers(plan, o.consumers, None if self.remote else broker)
                tick = _Ticker(self.progress, workers.shared)
                grace = 1.0
                try:
                    load_start = time.time()
                    if o.backlog:
                        self._load_backlog(broker, tick)
                        rss_loaded = sampler.sample()
                        loaded_peak = self.broker_probe.peak()
                        self.broker_probe.reset_peak()  # from now: the peak while draining
                    backlog_seconds = time.time() - load_start if o.backlog else 0.0
                    workers.start()
                    workers.wait_ready(lambda: tick("starting", None))
                    holder.close()
                    before = broker.info()
                    t0 = time.time()
                    workers.go(t0)
                    expected = None if plan.messages is None else o.backlog + plan.messages
                    deadline = None if o.duration is None else t0 + o.duration

                    def running() -> None:
                        left = None if deadline is None else max(0.0, deadline - time.time())
                        tick("running", expected, left)

                    producing = workers.wait("producer", running)
                    workers.shared.producers_finished()
                    total = o.backlog + workers.shared.sent()
                    consuming = workers.wait("consumer", lambda: tick("draining", total))
                    tick("draining", total, force=True)
                    ended = time.time()
                    grace = 10.0
                finally:
                    workers.close(grace)
                after = broker.info()
                stats = broker.stats(plan.queue)
                outputs = broker.stats(plan.sink).sent if plan.sink is not None else None
                draining_peak = self.broker_probe.peak()
        return self._result(
            producing,
            consuming,
            t0=t0,
            ended=ended,
            fsyncs=after.fsyncs - before.fsyncs,
            commits=after.commits - before.commits,
            dropped=stats.dropped,
            outputs=outputs,
            backlog_seconds=backlog_seconds,
            rss=(rss_before, rss_loaded, loaded_peak, draining_peak),
            timeline=sampler.timeline,
        )

    def _result(
        self,
        producing: list[WorkerReport],
        consuming: list[WorkerReport],
        *,
        t0: float,
        ended: float,
        fsyncs: int,
        commits: int,
        dropped: int,
        outputs: int | None,
        backlog_seconds: float,
        rss: tuple[int | None, int | None, int | None, int | None],
        timeline: list[list[float]],
    ) -> BenchResult:
        o = self.o
        sent = sum(r.sent for r in producing)
        delivered = sum(r.processed for r in consuming)
        if outputs is not None and outputs != o.backlog + sent:
            raise BenchError(
                f"exactly-once bench: {o.backlog + sent} inputs gave {outputs} outputs"
            )
        if o.guarantee != "at-most-once" and delivered < o.backlog + sent:
            raise BenchError(f"{o.guarantee} bench: {o.backlog + sent} sent, {delivered} acked")
        last = max((r.last_processed for r in consuming), default=0.0)
        seconds = (last if last > 0 else ended) - t0
        last_sent = max((r.last_sent for r in producing), default=0.0)
        send_seconds = max(0.0, last_sent - t0)
        hist = LatencyHistogram()
        for r in consuming:
            hist.merge(r.latency)
        transactions = sum(r.transactions for r in consuming)
        rss_before, rss_loaded, loaded_peak, draining_peak = rss
        broker_peak = max((p for p in (loaded_peak, draining_peak) if p is not None), default=None)
        peaks: list[dict[str, Any]] = []
        bench_peak = broker_peak if self.broker_process == "bench" else self.bench_probe.peak()
        peaks.append({"process": "bench", "pid": os.getpid(), "bytes": bench_peak})
        if self.server is not None:
            peaks.append({"process": "server", "pid": self.server.pid, "bytes": broker_peak})
        for r in (*producing, *consuming):
            if r.peak_rss is not None:
                name = f"{r.role} {r.index + 1}"
                peaks.append({"process": name, "pid": r.pid, "bytes": r.peak_rss})

        per_worker: list[dict[str, Any]] = [
            {
                "worker": f"producer {r.index + 1}",
                "pid": r.pid,
                "sent": r.sent,
                "batches": r.batches,
                "behind_s": r.behind_s if o.rate is not None else None,
            }
            for r in producing
        ]
        per_worker += [
            {
                "worker": f"consumer {r.index + 1}",
                "pid": r.pid,
                "processed": r.processed,
                "transactions": r.transactions,
            }
            for r in consuming
        ]

        def ms(q: float) -> float:
            return hist.percentile(q) * 1000

        return BenchResult(
            guarantee=o.guarantee,
            messages=sent,
            size_bytes=o.size,
            batch=o.batch,
            producers=o.producers,
            seconds=seconds,
            throughput=delivered / seconds if seconds > 0 else 0.0,
            delivered=delivered,
            dropped=dropped,
            p50_ms=ms(0.50),
            p90_ms=ms(0.90),
            p99_ms=ms(0.99),
            p999_ms=ms(0.999),
            fsyncs=fsyncs,
            commits=commits,
            consumers=o.consumers,
            txn_batch=o.txn_batch if o.guarantee == "exactly-once" else 0,
            transactions=transactions,
            backend="server" if self.remote else "embedded",
            durability=_durability(o.guarantee, self.url),
            count=o.messages if o.duration is None else None,
            duration_s=o.duration,
            rate=o.rate,
            linger_ms=None if o.linger is None else o.linger * 1000,
            max_ms=hist.maximum * 1000 if hist.total else math.nan,
            timed=hist.total,
            send_batches=sum(r.batches for r in producing),
            send_seconds=send_seconds,
            send_rate=sent / send_seconds if send_seconds > 0 else 0.0,
            behind_schedule_s=(
                max((r.behind_s for r in producing), default=0.0) if o.rate is not None else None
            ),
            transactions_per_s=transactions / seconds if seconds > 0 else 0.0,
            backlog=o.backlog,
            backlog_seconds=backlog_seconds,
            rss_before_backlog=rss_before if o.backlog else None,
            rss_backlog_loaded=rss_loaded,
            rss_peak_draining=draining_peak if o.backlog else None,
            broker_process=self.broker_process,
            broker_peak_rss=broker_peak,
            peak_rss=peaks,
            workers=per_worker,
            rss_timeline=timeline,
        )


def _durability(guarantee: str, url: str | None) -> str:
    if url is not None and url.startswith("memory:"):
        return "memory store: nothing fsynced"
    return DURABILITY[guarantee]


def summarize(runs: list[BenchResult]) -> dict[str, object]:
    """The median run (by throughput) of several, with every run's throughput."""
    ordered = sorted(runs, key=lambda r: r.throughput)
    median = ordered[len(ordered) // 2]
    return {
        **median.as_dict(),
        "runs": len(runs),
        "throughput_runs": [r.throughput for r in runs],
        "throughput_median": statistics.median(r.throughput for r in runs),
    }


def environment(url: str | None = None, server: BenchServer | None = None) -> dict[str, object]:
    remote = _is_remote(url)
    if server is not None:
        loop: str | None = server.event_loop
    else:
        loop = "unknown" if remote else None  # a server bench did not start; or none
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "arrival": arrival.__version__,
        "backend": "server" if remote else "embedded",
        "server_event_loop": loop,
        "gc_threshold": list(gc.get_threshold()),  # this process's (and its workers')
        "durability": {g: _durability(g, url) for g in GUARANTEES},
    }


@dataclass(slots=True)
class BenchServer:
    """An ``arrival serve`` process bench started; ``stop()`` ends it and removes its
    data directory."""

    url: str
    pid: int
    event_loop: str
    stop: Callable[[], None]


def start_server() -> BenchServer:
    """``arrival serve`` on a fresh temp dir and a free loopback port, as a separate
    process; returns once it serves."""
    data = tempfile.mkdtemp(prefix="arrival-bench-server-")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "arrival", "serve", "--data", data, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            # not in the terminal's process group: Ctrl-C reaches the bench alone, which
            # ends its workers and then stops this server itself, in that order
            start_new_session=True,
        )
    except BaseException:
        shutil.rmtree(data, ignore_errors=True)
        raise

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(data, ignore_errors=True)

    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # "listening on HOST:PORT" once it serves
    except BaseException:  # Ctrl-C while it starts
        stop()
        raise
    if not line.startswith("listening on "):
        stop()
        raise BenchError(f"the bench server did not start (it said {line!r})")
    # the server runs on uvloop where this interpreter (the same one) has it
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return BenchServer(f"arrival://{line.removeprefix('listening on ')}", proc.pid, loop, stop)


@contextlib.contextmanager
def bench_server(start: bool) -> Iterator[BenchServer | None]:
    """``start_server()`` if ``start``, stopped however the block ends."""
    if not start:
        yield None
        return
    server = start_server()
    try:
        yield server
    finally:
        server.stop()
