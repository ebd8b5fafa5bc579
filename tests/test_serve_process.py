"""``arrival serve`` as a real process: signals, SIGKILL, --listen, --token and TLS.

Each test starts ``python -m arrival serve --data DIR --listen 127.0.0.1:0``, reads
stdout until ``listening on HOST:PORT`` to learn the port, talks to it with the public
client, and always stops it (by its PID: SIGKILL in teardown if it is still alive).
Clients are opened with ``reconnect=0`` to see failures as they happen, except in the
test of reconnection across a restart.

Seeds: the SIGKILL tests print their seed; rerun with ``ARRIVAL_CRASH_TEST_SEED=<seed>``.
The kill delays follow the seed; where in the producer's work a kill lands also depends
on timing, so a rerun explores the same schedule, not the same interleaving.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import arrival
import arrival.aio
from arrival.errors import AuthenticationFailed, BrokerUnreachable, ClosedError
from arrival.server import SERVER_GC_THRESHOLDS

READY_TIMEOUT_S = 30.0  # interpreter start + imports + opening the store, on a loaded box
EXIT_TIMEOUT_S = 10.0  # a process asked to stop, or failing at start
GRACEFUL_S = 5.0  # what "exits within a few seconds" means
CALL_TIMEOUT_S = 10.0  # a client call that must fail fast, not hang
ALO = "alo"
EOQ = "eo"

# The client reconnects by default (``arrival.connect(reconnect=...)``): these tests
# want to see the failure itself, so their clients don't.
NO_RECONNECT: dict[str, Any] = (
    {"reconnect": 0} if "reconnect" in inspect.signature(arrival.connect).parameters else {}
)


def connect(url: str, **kwargs: Any) -> arrival.Broker:
    return arrival.connect(url, **NO_RECONNECT, **kwargs)


async def aio_connect(url: str, **kwargs: Any) -> arrival.aio.Broker:
    return await arrival.aio.connect(url, **NO_RECONNECT, **kwargs)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ARRIVAL_TOKEN", "ARRIVAL_URL")}
    env.update(extra)
    return env


def _flat(text: str) -> str:
    """``text`` with runs of whitespace as one space (rich wraps stderr at 80 columns)."""
    return " ".join(text.split())


class Served:
    """One ``arrival serve`` process; its stdout and stderr are read by two threads."""

    def __init__(
        self, data: Path, *args: str, listen: str = "127.0.0.1:0", env: dict[str, str]
    ) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "arrival",
                "serve",
                "--data",
                str(data),
                "--listen",
                listen,
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._err: list[bytes] = []
        self._readers = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.port = 0

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self._err.append(raw)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> Served:
        """Wait for ``listening on HOST:PORT``; fail with the stderr if it never comes."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                line = None
            if line is None:
                self.close()
                pytest.fail(f"arrival serve never said 'listening on':\n{self.stderr()}")
            if line.startswith("listening on "):
                host, _, port = line.removeprefix("listening on ").rpartition(":")
                assert host == "127.0.0.1", line
                self.port = int(port)
                return self

    @property
    def url(self) -> str:
        return f"arrival://127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"arrival serve (pid {self.pid}) still running after {timeout} s")

    def stderr(self) -> str:
        """Everything it logged; complete once it has exited."""
        if self.proc.poll() is not None:
            self._readers[1].join(EXIT_TIMEOUT_S)
        return b"".join(self._err).decode(errors="replace")

    def stdout_rest(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return out
            if line is not None:
                out.append(line)

    def close(self) -> None:
        """Kill it if it still runs (by PID), reap it, join the readers, close the pipes."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(EXIT_TIMEOUT_S)
        for t in self._readers:
            t.join(EXIT_TIMEOUT_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """``serve(data, *args, listen=..., env=..., ready=True)``: a started server."""
    started: list[Served] = []

    def start(
        data: Path,
        *args: str,
        listen: str = "127.0.0.1:0",
        env: dict[str, str] | None = None,
        ready: bool = True,
    ) -> Served:
        s = Served(data, *args, listen=listen, env=_env() if env is None else env)
        started.append(s)
        return s.ready() if ready else s

    yield start
    for s in started:
        s.close()


def within(seconds: float, fn: Callable[[], Any]) -> BaseException | Any:
    """Run ``fn`` in a thread; its result or exception. Fails if it is still running
    after ``seconds`` (a hang) rather than waiting for the test timeout."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"{fn!r} still blocked after {seconds} s")
    return box[0]


def _group(broker: arrival.Broker, q: str, group: str) -> arrival.GroupStats:
    (g,) = [g for g in broker.stats(q).groups if g.group == group]
    return g


# =====================================================================================
# 1. graceful stop on SIGTERM / SIGINT
# =====================================================================================


def _hold_one(broker: arrival.Broker) -> arrival.Message:
    """Queue "q" (acked messages retained): "first" received and acked, "held" received
    and held, "after" sent (and acknowledged) while the lease is held. Returns "held"."""
    broker.create_queue("q", "at-least-once", max_deliveries=1, ack_timeout=60, retention=3600)
    p = broker.producer()
    assert p.send("q", b"first") == 0
    assert p.send("q", b"held") == 1
    c = broker.consumer("q", "g")
    first = c.receive(timeout=5)
    assert first is not None
    assert first.body == b"first"
    first.ack()
    held = c.receive(timeout=5)
    assert held is not None
    assert (held.body, held.attempt) == (b"held", 1)
    assert p.send("q", b"after") == 2
    return held


def _redelivered(broker: arrival.Broker) -> list[tuple[int, bytes, int]]:
    c = broker.consumer("q", "g")
    got = c.receive_batch(10, timeout=1)
    c.ack_batch(got)
    return [(m.offset, m.body, m.attempt) for m in got]


def _embedded_reference(data: Path) -> list[tuple[int, bytes, int]]:
    """What the embedded engine redelivers after the same steps and a clean close."""
    with arrival.connect(data) as b:
        _hold_one(b)
    with arrival.connect(data) as b:
        out = _redelivered(b)
        assert b.dead_letters("q").list() == []
        return out


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, signal.SIGINT],
    ids=["SIGTERM", "SIGINT"],
)
def test_graceful_stop_keeps_acked_and_releases_leases(
    sig: signal.Signals, tmp_path: Path, serve: Callable[..., Served]
) -> None:
    data = tmp_path / "data"
    server = serve(data)
    client = connect(server.url)
    try:
        held = _hold_one(client)
        producer = client.producer()
        consumer = client.consumer("q", "other")
        # another connection, blocked in a long receive when the signal comes
        waiter = connect(server.url)
        waiter.create_queue("idle", "at-least-once")
        idle = waiter.consumer("idle")
        blocked: list[BaseException | Any] = []

        def receive() -> None:
            try:
                blocked.append(idle.receive(timeout=30))
            except BaseException as exc:  # noqa: BLE001 - checked below
                blocked.append(exc)

        receiving = threading.Thread(target=receive, daemon=True)
        receiving.start()
        time.sleep(0.2)  # let its receive reach the server

        started = time.monotonic()
        server.signal(sig)
        code = server.wait()
        took = time.monotonic() - started
        assert code == 0, server.stderr()
        assert took < GRACEFUL_S, f"took {took:.1f} s to stop"
        log = server.stderr()
        assert "shutting down" in log, log
        assert "stopped cleanly" in log, log
        assert "Traceback" not in log, log

        receiving.join(CALL_TIMEOUT_S)
        assert not receiving.is_alive(), "a receive in progress still waits for the server"
        assert isinstance(blocked[0], BrokerUnreachable), blocked[0]
        assert "shutting down" in str(blocked[0]), blocked[0]  # the server's goodbye
        waiter.close()

        # the connected client learns at its next call, it does not hang
        for call in (
            lambda: producer.send("q", b"late"),
            lambda: consumer.receive(timeout=1),
            lambda: client.stats("q"),
            held.ack,
        ):
            outcome = within(CALL_TIMEOUT_S, call)
            assert isinstance(outcome, (BrokerUnreachable, ClosedError)), outcome
        assert client.closed
        assert held.lease_lost
    finally:
        client.close()

    expected = _embedded_reference(tmp_path / "ref")
    assert [(o, b) for o, b, _ in expected] == [(1, b"held"), (2, b"after")]

    again = serve(data)
    with connect(again.url) as b:
        assert [m.body for m in b.peek("q", 10)] == [b"first", b"held", b"after"]
        got = _redelivered(b)
        # the held message comes back, its attempt the one the embedded engine gives
        # after a close, and with max_deliveries=1 it was not dead-lettered: not spent
        assert got == expected
        assert b.dead_letters("q").list() == []
        g = _group(b, "q", "g")
        assert (g.dead_lettered, g.nacked, g.expired) == (0, 0, 0)
    again.signal(signal.SIGTERM)
    assert again.wait() == 0


# =====================================================================================
# 2. SIGKILL under load
# =====================================================================================


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("ARRIVAL_CRASH_TEST_SEED") or random.randrange(2**32))
    print(f"crash test seed: {value} (rerun with ARRIVAL_CRASH_TEST_SEED={value})")
    return value


def _body(q: str, n: int) -> bytes:
    return f"{q} message {n:06d} ".encode() * 3


class Load:
    """Sends (n, ALO) then (n, EO) for n = 0, 1, ...; remembers each send that returned.
    A send that failed is the first one tried on the next connection, with the same id,
    so an exactly-once queue sees the retry a real producer would make."""

    MAX_STEPS = 20_000  # per round: bounded even if the kill never comes
    MAX_SECONDS = 15.0

    def __init__(self) -> None:
        self.step = 0  # next (n, queue) to send: n = step // 2, queue = step % 2
        self.acked: dict[str, list[int]] = {ALO: [], EOQ: []}
        self.failures: list[BaseException] = []

    def run(self, url: str) -> None:
        broker = None
        try:
            broker = connect(url)
            p = broker.producer(id="p1")
            deadline = time.monotonic() + self.MAX_SECONDS
            for _ in range(self.MAX_STEPS):
                if time.monotonic() > deadline:
                    return
                n, q = self.step // 2, (ALO, EOQ)[self.step % 2]
                p.send(q, _body(q, n), id=f"{q}-{n}")
                self.acked[q].append(n)
                self.step += 1
        except BaseException as exc:  # noqa: BLE001 - the test checks it
            self.failures.append(exc)
        finally:
            if broker is not None:
                broker.close()


Drained = list[tuple[int, str, bytes]]  # (offset, id, body) in the order received


def _drain(broker: arrival.Broker, q: str) -> Drained:
    c = broker.consumer(q, "check")
    out: Drained = []
    while True:
        got = c.receive_batch(1000, timeout=0.5)
        if not got:
            return out
        out.extend((m.offset, m.id, m.body) for m in got)
        c.ack_batch(got)


def check_queue(q: str, drained: Drained, acked: list[int], *, unique: bool) -> None:
    """Every acknowledged message of ``q`` is in ``drained``, intact, the acknowledged
    ones in the order they were sent; with ``unique``, no id twice."""
    numbers: list[int] = []
    for offset, mid, body in drained:
        n = int(mid.rpartition("-")[2])
        assert body == _body(q, n), f"{q} offset {offset} ({mid}): body {body!r}"
        numbers.append(n)
    missing = sorted(set(acked) - set(numbers))
    assert not missing, f"{q} lost acknowledged messages {missing[:20]}"
    wanted = set(acked)
    first_seen = list(dict.fromkeys(n for n in numbers if n in wanted))
    assert first_seen == sorted(acked), f"{q}: the acknowledged messages are out of order"
    if unique:
        twice = sorted(mid for mid, c in Counter(mid for _, mid, _ in drained).items() if c > 1)
        assert not twice, f"{q} holds these ids twice: {twice[:20]}"


def _msgs(q: str, *numbers: int) -> Drained:
    return [(i, f"{q}-{n}", _body(q, n)) for i, n in enumerate(numbers)]


def test_check_queue_catches_loss_disorder_corruption_and_duplicates() -> None:
    check_queue(ALO, _msgs(ALO, 0, 1, 1, 2, 3), [0, 1, 2], unique=False)  # 3: not acked
    with pytest.raises(AssertionError, match="lost acknowledged messages \\[1\\]"):
        check_queue(ALO, _msgs(ALO, 0, 2), [0, 1, 2], unique=False)
    with pytest.raises(AssertionError, match="out of order"):
        check_queue(ALO, _msgs(ALO, 0, 2, 1), [0, 1, 2], unique=False)
    with pytest.raises(AssertionError, match="body"):
        check_queue(ALO, [(0, f"{ALO}-0", b"garbled")], [0], unique=False)
    with pytest.raises(AssertionError, match="ids twice"):
        check_queue(EOQ, _msgs(EOQ, 0, 1, 1), [0, 1], unique=True)


def _sigkill_rounds(rounds: int, seed: int, tmp_path: Path, serve: Callable[..., Served]) -> None:
    rng = random.Random(seed)
    data = tmp_path / "data"
    load = Load()
    for r in range(rounds):
        server = serve(data)
        if r == 0:
            with connect(server.url) as b:
                b.create_queue(ALO, "at-least-once")
                b.create_queue(EOQ, "exactly-once")
        failures_before = len(load.failures)
        producer = threading.Thread(target=load.run, args=(server.url,), daemon=True)
        producer.start()
        time.sleep(rng.uniform(0.2, 0.6))
        server.signal(signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL
        producer.join(CALL_TIMEOUT_S)
        assert not producer.is_alive(), f"seed {seed}: round {r}: producer hung after SIGKILL"
        new = load.failures[failures_before:]
        assert len(new) == 1, f"seed {seed}: round {r}: producer ended without error: {new}"
        assert isinstance(new[0], BrokerUnreachable), f"seed {seed}: round {r}: {new[0]!r}"
        server.close()

    final = serve(data)
    with connect(final.url) as b:
        drained = {q: _drain(b, q) for q in (ALO, EOQ)}
    final.signal(signal.SIGTERM)
    assert final.wait() == 0, final.stderr()

    dupes = {q: len(ms) - len({mid for _, mid, _ in ms}) for q, ms in drained.items()}
    summary = (
        f"seed {seed}: {rounds} SIGKILL rounds; acknowledged alo={len(load.acked[ALO])} "
        f"eo={len(load.acked[EOQ])}; drained alo={len(drained[ALO])} eo={len(drained[EOQ])}; "
        f"duplicates alo={dupes[ALO]} eo={dupes[EOQ]}"
    )
    print(summary)
    assert load.acked[ALO], f"{summary}: nothing was acknowledged: the test tested nothing"
    try:
        check_queue(ALO, drained[ALO], load.acked[ALO], unique=False)
        check_queue(EOQ, drained[EOQ], load.acked[EOQ], unique=True)
    except AssertionError as exc:
        raise AssertionError(f"{summary}: {exc}") from None
    # at most the one send in flight at each kill is stored without being acknowledged
    assert len(drained[EOQ]) <= len(load.acked[EOQ]) + rounds, summary


def test_sigkill_under_load_loses_no_acknowledged_message(
    seed: int, tmp_path: Path, serve: Callable[..., Served]
) -> None:
    _sigkill_rounds(3, seed, tmp_path, serve)


@pytest.mark.slow
def test_sigkill_under_load_many_rounds(
    seed: int, tmp_path: Path, serve: Callable[..., Served]
) -> None:
    _sigkill_rounds(12, seed, tmp_path, serve)


@pytest.mark.skipif(not NO_RECONNECT, reason="this client does not reconnect")
def test_reconnecting_client_rides_over_sigkill_and_restart(
    seed: int, tmp_path: Path, serve: Callable[..., Served]
) -> None:
    """A client left to reconnect (the default) sees no error when the server is killed
    and restarted on the same port, and the sends it repeats are stored once."""
    rng = random.Random(seed)
    data = tmp_path / "data"
    server = serve(data)
    port = server.port
    with connect(server.url) as b:
        b.create_queue(ALO, "at-least-once")
        b.create_queue(EOQ, "exactly-once")
    client = arrival.connect(server.url)  # reconnects by default
    acked: dict[str, list[int]] = {ALO: [], EOQ: []}
    errors: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        try:
            anonymous, named = client.producer(), client.producer(id="p1")
            deadline = time.monotonic() + 30
            for n in range(50_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                anonymous.send(ALO, _body(ALO, n), id=f"{ALO}-{n}")
                acked[ALO].append(n)
                named.send(EOQ, _body(EOQ, n), id=f"{EOQ}-{n}")
                acked[EOQ].append(n)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        for r in range(2):
            time.sleep(rng.uniform(0.2, 0.6))
            server.signal(signal.SIGKILL)
            assert server.wait() == -signal.SIGKILL
            before = len(acked[EOQ])
            server = serve(data, listen=f"127.0.0.1:{port}")
            deadline = time.monotonic() + 15
            while len(acked[EOQ]) < before + 20 and not errors and producer.is_alive():
                assert time.monotonic() < deadline, f"seed {seed}: round {r}: no progress"
                time.sleep(0.02)
    finally:
        stop.set()
        producer.join(CALL_TIMEOUT_S)
        client.close()
    assert not producer.is_alive()
    assert not errors, f"seed {seed}: {errors[0]!r}"

    with connect(server.url) as b:
        drained = {q: _drain(b, q) for q in (ALO, EOQ)}
    summary = (
        f"seed {seed}: acknowledged alo={len(acked[ALO])} eo={len(acked[EOQ])}; "
        f"drained alo={len(drained[ALO])} eo={len(drained[EOQ])}"
    )
    print(summary)
    try:
        for q in (ALO, EOQ):  # a repeated send carries its producer sequence: stored once
            check_queue(q, drained[q], acked[q], unique=True)
    except AssertionError as exc:
        raise AssertionError(f"{summary}: {exc}") from None


# =====================================================================================
# 3. --listen errors
# =====================================================================================


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999"])
def test_bad_listen_value_exits_with_a_clear_message(
    listen: str, tmp_path: Path, serve: Callable[..., Served]
) -> None:
    s = serve(tmp_path / "data", listen=listen, ready=False)
    assert s.wait() != 0
    err = _flat(s.stderr())
    assert "--listen" in err, err
    assert repr(listen) in err, err
    assert "HOST:PORT" in err, err
    assert "Traceback" not in err, err
    assert s.stdout_rest() == []


def test_port_in_use_exits_with_a_clear_message(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = serve(tmp_path / "data", listen=f"127.0.0.1:{port}", ready=False)
        assert s.wait() != 0
    err = _flat(s.stderr())
    assert "address already in use" in err.lower(), err
    assert str(port) in err, err
    assert "Traceback" not in err, err
    assert not any(line.startswith("listening on") for line in s.stdout_rest())


# =====================================================================================
# 4. --token / ARRIVAL_TOKEN
# =====================================================================================

TOKEN = "s3cret-t0ken-5f1e2d"


@pytest.mark.parametrize("how", ["option", "env"])
def test_token_is_required_and_never_logged(
    how: str, tmp_path: Path, serve: Callable[..., Served]
) -> None:
    if how == "option":
        server = serve(tmp_path / "data", "--token", TOKEN)
    else:
        server = serve(tmp_path / "data", env=_env(ARRIVAL_TOKEN=TOKEN))

    with pytest.raises(AuthenticationFailed):
        connect(server.url)
    with pytest.raises(AuthenticationFailed):
        connect(server.url, token=TOKEN + "x")
    with pytest.raises(AuthenticationFailed):
        asyncio.run(aio_connect(server.url, token="wrong"))

    with connect(server.url, token=TOKEN) as b:
        b.create_queue("q", "at-least-once")
        b.producer().send("q", b"hello")
        msg = b.consumer("q").receive(timeout=5)
        assert msg is not None
        assert msg.body == b"hello"
        msg.ack()

    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    log = server.stderr()
    assert "authentication failed" in log, log
    assert "token required" in log, log
    assert TOKEN not in log
    assert TOKEN not in "\n".join(server.stdout_rest())


# =====================================================================================
# 5. TLS
# =====================================================================================

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl CLI is not installed"
)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@needs_openssl
def test_tls_server(
    tls_files: tuple[Path, Path], tmp_path: Path, serve: Callable[..., Served]
) -> None:
    cert, key = tls_files
    server = serve(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key))
    tls_url = f"arrivals://127.0.0.1:{server.port}"

    with connect(tls_url, tls_ca=cert) as b:
        b.create_queue("q", "at-least-once")
        b.producer().send("q", b"over tls")
        msg = b.consumer("q").receive(timeout=5)
        assert msg is not None
        assert msg.body == b"over tls"
        msg.ack()

    async def aio() -> bytes:
        async with await aio_connect(tls_url, tls_ca=str(cert)) as b:
            await b.producer().send("q", b"aio over tls")
            msg = await b.consumer("q", "aio").receive(timeout=5)
            assert msg is not None
            await msg.ack()
            return msg.body

    assert asyncio.run(aio()) == b"over tls"  # group "aio" starts at the earliest

    # a plain client to the TLS port fails, and fast
    outcome = within(CALL_TIMEOUT_S, lambda: connect(server.url))
    assert isinstance(outcome, BrokerUnreachable), outcome
    # TLS without the CA: the system's CAs don't know a self-signed certificate
    outcome = within(CALL_TIMEOUT_S, lambda: connect(tls_url))
    assert isinstance(outcome, BrokerUnreachable), outcome
    assert "certificate" in str(outcome).lower(), outcome

    async def aio_untrusted() -> BaseException | None:
        try:
            b = await aio_connect(tls_url)
        except BrokerUnreachable as exc:
            return exc
        await b.close()
        return None

    outcome = within(CALL_TIMEOUT_S, lambda: asyncio.run(aio_untrusted()))
    assert isinstance(outcome, BrokerUnreachable), outcome
    assert "certificate" in str(outcome).lower(), outcome

    # the server survived the failed handshakes
    with connect(tls_url, tls_ca=cert) as b:
        assert b.stats("q").end_offset == 2

    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert "arrivals://" in server.stderr()


@needs_openssl
def test_tls_needs_both_cert_and_key(
    tls_files: tuple[Path, Path], tmp_path: Path, serve: Callable[..., Served]
) -> None:
    cert, _key = tls_files
    s = serve(tmp_path / "data", "--tls-cert", str(cert), ready=False)
    assert s.wait() != 0
    err = _flat(s.stderr())
    assert "--tls-key" in err, err
    assert "Traceback" not in err, err


def test_serve_collects_cycles_less_often_than_the_default() -> None:
    # a broker allocates a few containers per message: at Python's default threshold
    # (700) the cycle collector took about a third of its CPU
    code = (
        "import gc\n"
        "from arrival import server\n"
        "async def fake(*args):\n"
        "    print(gc.get_threshold())\n"
        "server._serve = fake\n"
        "server.serve('unused', '127.0.0.1:0')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == str(SERVER_GC_THRESHOLDS)
    assert SERVER_GC_THRESHOLDS[0] >= 50 * 700
