"""``arrival bench``: end-to-end throughput and latency per guarantee, on the public API.

A run sends ``count`` messages of ``size`` bytes from producer threads (``send_batch``
of ``batch`` messages each) while one consumer thread receives batches and acks them.
Against a server (``url`` is ``arrival://...``) the producers are separate processes,
one connection each, and this process consumes.
Throughput is messages produced, delivered and acked per second, first send to last
ack. Latency is per message, from the broker accepting it to the ack returning.

Exactly-once runs a consume-transform-produce loop instead: ``consumers`` threads each run
``Consumer.process`` on the input queue with their own transactional id, sending one
output per input to a second exactly-once queue; each transaction commits up to
``txn_batch`` inputs with their outputs (``txn_batch=1``: one transaction per message).
Throughput is inputs committed per second; latency runs from the broker accepting an
input to the commit of its output returning.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import arrival

__all__ = ["BenchResult", "run_bench", "summarize"]

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class BenchResult:
    guarantee: str
    messages: int
    size_bytes: int
    batch: int
    producers: int
    seconds: float
    throughput: float  # msg/s end to end
    delivered: int
    dropped: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    fsyncs: int
    commits: int
    consumers: int = 1
    txn_batch: int = 0  # exactly-once: inputs per transaction (0: not transactional)
    transactions: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(slots=True)
class _Consumed:
    count: int = 0
    latencies_s: list[float] = field(default_factory=list)
    error: BaseException | None = None
    transactions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[i]


def run_bench(
    guarantee: str,
    *,
    count: int,
    size: int,
    batch: int,
    producers: int,
    url: str | None = None,
    progress: Progress | None = None,
    consumers: int = 1,
    txn_batch: int = 1000,
) -> BenchResult:
    """One run against a fresh data directory (or ``url``); see the module docstring."""
    own_dir = None
    if url is None:
        own_dir = tempfile.mkdtemp(prefix="arrival-bench-")
        url = own_dir
    try:
        if guarantee == "exactly-once":
            return _run_ctp(count, size, batch, producers, url, progress, consumers, txn_batch)
        return _run(guarantee, count, size, batch, producers, url, progress)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _produce(broker: arrival.Broker, queue: str, body: bytes, n: int, batch: int) -> None:
    p = broker.producer()
    left = n
    while left > 0:
        k = min(batch, left)
        p.send_batch(queue, [body] * k)
        left -= k


def _produce_remote(url: str, queue: str, body: bytes, n: int, batch: int) -> None:
    """A producer process's whole life: connect, send ``n`` messages, close."""
    with arrival.connect(url) as broker:
        _produce(broker, queue, body, n, batch)


def _producers(
    broker: arrival.Broker, queue: str, body: bytes, count: int, producers: int, batch: int
) -> list[threading.Thread] | list[multiprocessing.process.BaseProcess]:
    """Producers (not started) that send ``count`` copies of ``body`` in batches, together:
    threads on the embedded engine, processes (one connection each) against a server."""
    shares = [count // producers + (i < count % producers) for i in range(producers)]
    if broker.url.startswith(("arrival://", "arrivals://")):
        ctx = multiprocessing.get_context("spawn")
        procs: list[multiprocessing.process.BaseProcess] = [
            ctx.Process(
                target=_produce_remote,
                args=(broker.url, queue, body, n, batch),
                name="bench-producer",
            )
            for n in shares
        ]
        return procs
    return [
        threading.Thread(
            target=_produce, args=(broker, queue, body, n, batch), name="bench-producer"
        )
        for n in shares
    ]


def _join_producers(ps: list[threading.Thread] | list[multiprocessing.process.BaseProcess]) -> None:
    for t in ps:
        t.join()
        code = getattr(t, "exitcode", 0)
        if code:
            raise RuntimeError(f"a bench producer process failed (exit code {code})")


def _run(
    guarantee: str,
    count: int,
    size: int,
    batch: int,
    producers: int,
    url: str,
    progress: Progress | None,
) -> BenchResult:
    queue = f"bench-{guarantee}-{os.getpid()}-{time.monotonic_ns()}"
    with arrival.connect(url) as broker:
        if guarantee == "at-most-once":
            broker.create_queue(queue, guarantee, capacity=max(count, 1))
        else:
            broker.create_queue(queue, guarantee)
        consumer = broker.consumer(queue, "bench")
        body = os.urandom(size)
        before = broker.info()
        produced_all = threading.Event()
        consumed = _Consumed()

        def consume() -> None:
            try:
                lat = consumed.latencies_s
                while consumed.count < count:
                    msgs = consumer.receive_batch(batch, timeout=0.2)
                    if not msgs:
                        if produced_all.is_set() and guarantee == "at-most-once":
                            break  # the rest was dropped
                        continue
                    consumer.ack_batch(msgs)
                    now = time.time()
                    lat.extend([now - m.timestamp for m in msgs])
                    consumed.count += len(msgs)
                    if progress is not None:
                        progress(len(msgs))
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                consumed.error = exc

        c = threading.Thread(target=consume, name="bench-consumer")
        ps = _producers(broker, queue, body, count, producers, batch)
        start = time.perf_counter()
        c.start()
        for t in ps:
            t.start()
        _join_producers(ps)
        produced_all.set()
        c.join()
        seconds = time.perf_counter() - start
        if consumed.error is not None:
            raise consumed.error
        after = broker.info()
        stats = broker.stats(queue)
        consumer.close()
    lat = sorted(consumed.latencies_s)
    return BenchResult(
        guarantee=guarantee,
        messages=count,
        size_bytes=size,
        batch=batch,
        producers=producers,
        seconds=seconds,
        throughput=consumed.count / seconds if seconds > 0 else 0.0,
        delivered=consumed.count,
        dropped=stats.dropped,
        p50_ms=_percentile(lat, 0.50) * 1000,
        p90_ms=_percentile(lat, 0.90) * 1000,
        p99_ms=_percentile(lat, 0.99) * 1000,
        p999_ms=_percentile(lat, 0.999) * 1000,
        fsyncs=after.fsyncs - before.fsyncs,
        commits=after.commits - before.commits,
    )


def _run_ctp(
    count: int,
    size: int,
    batch: int,
    producers: int,
    url: str,
    progress: Progress | None,
    consumers: int,
    txn_batch: int,
) -> BenchResult:
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    source, sink = f"bench-in-{tag}", f"bench-out-{tag}"
    with arrival.connect(url) as broker:
        broker.create_queue(source, "exactly-once")
        broker.create_queue(sink, "exactly-once")
        body = os.urandom(size)
        before = broker.info()
        consumed = _Consumed()

        def handle(msg: arrival.Message, out: arrival.Outputs) -> None:
            out.send(sink, msg.body)

        def committed(msgs: list[arrival.Message]) -> None:
            now = time.time()
            with consumed.lock:
                consumed.latencies_s.extend([now - m.timestamp for m in msgs])
                consumed.count += len(msgs)
                consumed.transactions += 1
            if progress is not None:
                progress(len(msgs))

        def process(i: int) -> None:
            try:
                with broker.consumer(source, "bench") as c:
                    c.process(
                        handle,
                        transactional_id=f"bench-{tag}-{i}",
                        batch=txn_batch,
                        interval=0.1,
                        stop=lambda: consumed.count >= count,
                        on_commit=committed,
                    )
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                consumed.error = exc

        cs = [threading.Thread(target=process, args=(i,)) for i in range(consumers)]
        ps = _producers(broker, source, body, count, producers, batch)
        start = time.perf_counter()
        for t in (*cs, *ps):
            t.start()
        _join_producers(ps)
        for t in cs:
            t.join()
        seconds = time.perf_counter() - start
        if consumed.error is not None:
            raise consumed.error
        after = broker.info()
        outputs = broker.stats(sink).sent
    if outputs != count:
        raise RuntimeError(f"exactly-once bench: {count} inputs gave {outputs} outputs")
    lat = sorted(consumed.latencies_s)
    return BenchResult(
        guarantee="exactly-once",
        messages=count,
        size_bytes=size,
        batch=batch,
        producers=producers,
        seconds=seconds,
        throughput=consumed.count / seconds if seconds > 0 else 0.0,
        delivered=consumed.count,
        dropped=0,
        p50_ms=_percentile(lat, 0.50) * 1000,
        p90_ms=_percentile(lat, 0.90) * 1000,
        p99_ms=_percentile(lat, 0.99) * 1000,
        p999_ms=_percentile(lat, 0.999) * 1000,
        fsyncs=after.fsyncs - before.fsyncs,
        commits=after.commits - before.commits,
        consumers=consumers,
        txn_batch=txn_batch,
        transactions=consumed.transactions,
    )


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


def environment(url: str | None = None) -> dict[str, object]:
    remote = url is not None and url.startswith(("arrival://", "arrivals://"))
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "arrival": arrival.__version__,
        "backend": "server" if remote else "embedded",
    }


def start_server() -> tuple[str, Callable[[], None]]:
    """``arrival serve`` on a fresh temp dir and a free loopback port, as a separate
    process; returns its URL and the function that stops it (SIGTERM) and cleans up."""
    data = tempfile.mkdtemp(prefix="arrival-bench-server-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "arrival", "serve", "--data", data, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # "listening on HOST:PORT" once it serves

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

    if not line.startswith("listening on "):
        stop()
        raise RuntimeError(f"the bench server did not start (it said {line!r})")
    return f"arrival://{line.removeprefix('listening on ')}", stop
