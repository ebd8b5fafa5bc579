"""Real processes, killed with SIGKILL at random moments (STYLE.md habits 8 and 15).

The workers in ``tests/crash_workers/`` report what happened on stdout, one flushed line
per event; the parent kills them after a seeded random delay, restarts them on the same
data directory, and at the end opens the directory itself and drains it. The checks are
pure functions over the recorded history (``check_*``), unit-tested below on hand-made
histories so that each one is known to fail when it should.

Seeds: every test prints its seed (shown by pytest on failure, and put in every assertion
message); rerun with ``ARRIVAL_CRASH_TEST_SEED=<seed>``. The kill delays and the workers'
choices follow the seed; where in the worker's work a kill lands also depends on timing,
so a rerun explores the same schedule, not the same interleaving.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import arrival

WORKERS = Path(__file__).parent / "crash_workers"
ALO_QUEUE = "crash-alo"  # the names in crash_workers/_common.py
AMO_QUEUE = "crash-amo"
READY_TIMEOUT_S = 30.0  # interpreter start + import + opening the store, on a loaded box
RUN_TIMEOUT_S = 60.0  # a worker left to finish on its own
REAP_TIMEOUT_S = 10.0
DRAIN_WAIT_S = 0.5


def skip_unless_slow_selected(request: pytest.FixtureRequest) -> None:
    """Slow variants run only when asked for (``-m slow``), so the default run stays fast."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long variant: run with -m slow")


def body_of(n: int) -> bytes:
    return f"message {n}".encode()


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("ARRIVAL_CRASH_TEST_SEED") or random.randrange(2**32))
    print(f"crash test seed: {value} (rerun with ARRIVAL_CRASH_TEST_SEED={value})")
    return value


# =====================================================================================
# running a worker
# =====================================================================================


@dataclass
class Run:
    """One worker process's life: the complete lines it wrote, and how it ended."""

    lines: list[str]
    returncode: int | None
    stderr: str
    killed_by_us: bool

    def words(self, tag: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.lines if line.split()[:1] == [tag]]

    def ranges(self, tag: str) -> set[int]:
        out: set[int] = set()
        for lo, hi in self.words(tag):
            out.update(range(int(lo), int(hi) + 1))
        return out


def run_worker(
    script: str,
    args: Sequence[str],
    *,
    kill_after_s: float | None,
    kill_on: str = "READY",
    env: dict[str, str] | None = None,
    cwd: Path,
) -> Run:
    """Start ``script``, wait for a line starting with ``kill_on`` (default: its READY
    line), let it work ``kill_after_s`` more seconds and SIGKILL it (None: let it finish).
    Always reaps the process; every wait has a timeout."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    lines: list[str] = []
    err: list[bytes] = []
    ready = threading.Event()

    def read_out() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            if not raw.endswith(b"\n"):
                break  # cut short by the kill: never fully written, so it did not happen
            line = raw.decode().rstrip("\n")
            lines.append(line)
            if line.startswith(kill_on):
                ready.set()
        ready.set()  # EOF: the process is gone

    def read_err() -> None:
        assert proc.stderr is not None
        err.append(proc.stderr.read())

    readers = [threading.Thread(target=read_out), threading.Thread(target=read_err)]
    for r in readers:
        r.start()
    killed = False
    try:
        if not ready.wait(READY_TIMEOUT_S):
            raise AssertionError(f"{script} did not print {kill_on} within {READY_TIMEOUT_S} s")
        try:
            proc.wait(RUN_TIMEOUT_S if kill_after_s is None else kill_after_s)
        except subprocess.TimeoutExpired:
            if kill_after_s is None:
                raise AssertionError(f"{script} did not finish within {RUN_TIMEOUT_S} s") from None
            proc.send_signal(signal.SIGKILL)
            killed = True
        proc.wait(REAP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(REAP_TIMEOUT_S)
        for r in readers:
            r.join(REAP_TIMEOUT_S)
        proc.stdout.close()
        proc.stderr.close()
    return Run(lines, proc.returncode, b"".join(err).decode(errors="replace"), killed)


def expect_killed_or_done(run: Run, done_line: str, ctx: str) -> None:
    """The worker either died by SIGKILL (ours or a crash point's) or finished cleanly."""
    if run.returncode == -signal.SIGKILL:
        return
    assert (run.returncode, done_line in run.lines) == (0, True), (
        f"{ctx}: worker exited with {run.returncode}; stderr:\n{run.stderr[-3000:]}"
    )


def number_of(m: arrival.Message) -> int:
    """A worker message's number: its id or, when sent as a bare body (the broker then
    names it ``queue:offset``), the number its body carries; -1 if it has neither."""
    if m.id.isdigit():
        return int(m.id)
    prefix = body_of(0)[:-1]
    tail = m.body[len(prefix) :]
    return int(tail) if m.body.startswith(prefix) and tail.isdigit() else -1


@dataclass(frozen=True)
class Drained:
    id: int
    key: str | None
    body: bytes
    attempt: int


DRAIN_CHUNK = 1000  # messages per receive: acked well within the 30 s lease


def drain(datadir: Path, queue: str, group: str, **spec: object) -> list[Drained]:
    """Open the directory in this process and receive-and-ack everything left for ``group``."""
    out: list[Drained] = []
    with arrival.connect(datadir) as broker:
        broker.create_queue(queue, "at-least-once", **spec)  # type: ignore[arg-type]
        consumer = broker.consumer(queue, group)
        while msgs := consumer.receive_batch(DRAIN_CHUNK, timeout=DRAIN_WAIT_S):
            out.extend(Drained(number_of(m), m.key, m.body, m.attempt) for m in msgs)
            consumer.ack_batch(msgs)
        consumer.close()
    return out


# =====================================================================================
# the checks: pure functions over a recorded history
# =====================================================================================


@dataclass
class Verdict:
    """Forbidden anomalies (each must be empty) and allowed ones (counted, reported)."""

    forbidden: dict[str, list[object]] = field(default_factory=dict)
    allowed: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, items: Iterable[object]) -> None:
        items = sorted(items, key=repr)
        if items:
            self.forbidden[name] = items

    @property
    def ok(self) -> bool:
        return not self.forbidden

    def report(self) -> str:
        bad = "; ".join(f"{k}: {len(v)} e.g. {v[:10]}" for k, v in self.forbidden.items())
        return f"forbidden: {bad or 'none'}; allowed: {self.allowed}"


def per_key_reorders(deliveries: Iterable[tuple[str | None, int]]) -> list[tuple[str, int, int]]:
    """First deliveries per key must come in send order (= id order for these workers)."""
    seen: set[int] = set()
    last: dict[str, int] = {}
    out = []
    for key, mid in deliveries:
        if key is None or mid in seen:
            continue
        seen.add(mid)
        if key in last and mid < last[key]:
            out.append((key, last[key], mid))
        last[key] = max(mid, last.get(key, mid))
    return out


def check_producer_history(
    attempted: set[int], acknowledged: set[int], drained: Sequence[Drained]
) -> Verdict:
    """at-least-once producer side, after crashes: nothing acknowledged is lost."""
    v = Verdict()
    counts = Counter(d.id for d in drained)
    stored = set(counts)
    v.add("lost (acknowledged, never delivered)", acknowledged - stored)
    # no send is retried here, so even an indeterminate one may be stored at most once
    v.add("duplicate in storage", [i for i, n in counts.items() if n > 1])
    v.add("phantom (delivered, never sent)", stored - attempted)
    v.add("corrupt (body does not match id)", [d.id for d in drained if d.body != body_of(d.id)])
    v.add("reorder per key", per_key_reorders((d.key, d.id) for d in drained))
    v.add("acknowledged but never attempted (harness)", acknowledged - attempted)
    v.allowed["indeterminate sends stored"] = len((attempted - acknowledged) & stored)
    v.allowed["indeterminate sends lost"] = len((attempted - acknowledged) - stored)
    return v


def check_consumer_history(
    sent: set[int],
    got: Sequence[tuple[str | None, int]],
    acked: set[int],
    drained: Sequence[Drained],
    acking: Set[int] = frozenset(),
) -> Verdict:
    """at-least-once consumer side, after consumer crashes: every message is processed
    (acked by a worker, or delivered by the final drain); one never acked is delivered.

    ``acking`` holds ids whose ack was called but never reported as returned: the worker
    was killed in between, so the ack may have committed (and the message is gone) or not
    (and the drain delivers it). Both are allowed; only ids never acked at all must come
    back."""
    v = Verdict()
    drained_ids = Counter(d.id for d in drained)
    in_doubt = acking - acked
    v.add(
        "lost (never acked, not delivered by the drain)", sent - acked - in_doubt - set(drained_ids)
    )
    v.allowed["ack in flight at a kill, then committed"] = len(in_doubt - set(drained_ids))
    v.add("phantom", ({i for _k, i in got} | set(drained_ids)) - sent)
    v.add("delivered twice within the final drain", [i for i, n in drained_ids.items() if n > 1])
    v.add("corrupt", [d.id for d in drained if d.body != body_of(d.id)])
    v.add("reorder per key", per_key_reorders([*got, *((d.key, d.id) for d in drained)]))
    # allowed: an ack is committed within ack_linger_s, a kill just after it can undo it
    v.allowed["redelivered after a reported ack"] = len(acked & set(drained_ids))
    return v


def check_at_most_once_history(
    attempted: set[int], got: Sequence[tuple[str, int]], corrupt: Sequence[int]
) -> Verdict:
    """at-most-once, across crashes and restarts: never two deliveries of one id to a group."""
    v = Verdict()
    counts = Counter(got)
    v.add("duplicate delivery", [gi for gi, n in counts.items() if n > 1])
    v.add("phantom", {i for _g, i in got} - attempted)
    v.add("corrupt", corrupt)
    for group in sorted({g for g, _ in got}):
        v.allowed[f"delivered to {group}"] = sum(1 for g, _ in counts if g == group)
    v.allowed["lost (allowed)"] = len(attempted) - len({i for _g, i in got})
    return v


# =====================================================================================
# the scenarios
# =====================================================================================


PER_ROUND = 5000  # ids a producer round may send: bounds the final drain
KILL_AFTER_S = (0.01, 0.15)  # a round's life after READY: 5000 ids take ~0.2-0.5 s


def producer_rounds(
    tmp_path: Path, seed: int, rounds: int, *, crashpoint: str | None = None
) -> tuple[set[int], set[int], list[Run]]:
    """Kill a multi-threaded producer ``rounds`` times, each round continuing the numbering
    after every id the previous rounds attempted. Returns (attempted, acknowledged, runs)."""
    rng = random.Random(seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    datadir = tmp_path / "data"
    attempted: set[int] = set()
    acknowledged: set[int] = set()
    runs: list[Run] = []
    next_id = 0
    for r in range(rounds):
        env = None
        if crashpoint is not None:
            env = {"ARRIVAL_CRASHPOINTS": crashpoint, "ARRIVAL_CRASH_SEED": str(seed + r)}
        run = run_worker(
            "producer.py",
            [str(datadir), str(next_id), str(next_id + PER_ROUND), "4", f"{seed}-{r}"],
            kill_after_s=rng.uniform(*KILL_AFTER_S) if crashpoint is None else 5.0,
            env=env,
            cwd=tmp_path,
        )
        expect_killed_or_done(run, "DONE", f"seed {seed} round {r}")
        runs.append(run)
        attempted |= run.ranges("TRY")
        acknowledged |= run.ranges("ACK")
        next_id = max(attempted, default=next_id - 1) + 1
    return attempted, acknowledged, runs


def check_producer_scenario(tmp_path: Path, seed: int, rounds: int, crashpoint: str | None) -> None:
    attempted, acknowledged, runs = producer_rounds(tmp_path, seed, rounds, crashpoint=crashpoint)
    drained = drain(tmp_path / "data", ALO_QUEUE, "audit")
    verdict = check_producer_history(attempted, acknowledged, drained)
    ctx = f"seed {seed}, {rounds} rounds, crash point {crashpoint}"
    print(f"{ctx}: {len(acknowledged)} acknowledged, {len(drained)} stored; {verdict.report()}")
    assert verdict.ok, f"{ctx}: {verdict.report()}"
    assert acknowledged, f"{ctx}: no send was ever acknowledged; the test tested nothing"
    kills = sum(1 for r in runs if r.returncode == -signal.SIGKILL)
    assert kills >= rounds // 2, f"{ctx}: only {kills} of {rounds} rounds were killed mid-way"
    if crashpoint is not None:
        # the fault must actually fire: some rounds died by the crash point, not our kill
        fired = sum(1 for r in runs if r.returncode == -signal.SIGKILL and not r.killed_by_us)
        assert fired, f"{ctx}: the crash point never fired"


def test_producer_killed_loses_no_acknowledged_send(tmp_path: Path, seed: int) -> None:
    check_producer_scenario(tmp_path, seed, rounds=6, crashpoint=None)


@pytest.mark.parametrize(
    "crashpoint",
    ["writer.before-commit=0.05", "writer.after-commit=0.05", "writer.after-ack=0.05"],
)
def test_producer_crash_points_lose_no_acknowledged_send(
    tmp_path: Path, seed: int, crashpoint: str
) -> None:
    """The process kills itself between commit and acknowledgement (and around them):
    ids acknowledged are all stored; ids committed but never acknowledged may be."""
    check_producer_scenario(tmp_path, seed, rounds=4, crashpoint=crashpoint)


def consumer_scenario(tmp_path: Path, seed: int, rounds: int, n_messages: int) -> None:
    rng = random.Random(seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    datadir = tmp_path / "data"
    spec: dict[str, object] = {"max_deliveries": None}
    with arrival.connect(datadir) as broker:
        broker.create_queue(ALO_QUEUE, "at-least-once", max_deliveries=None)
        producer = broker.producer()
        ids = list(range(n_messages))
        for lo in range(0, n_messages, 100):
            batch = [
                arrival.Envelope(body_of(i), key=f"k{i % 8}", id=str(i)) for i in ids[lo : lo + 100]
            ]
            producer.send_batch(ALO_QUEUE, batch)
    got: list[tuple[str | None, int]] = []
    acked: set[int] = set()
    acking: set[int] = set()
    kills = 0
    for r in range(rounds):
        run = run_worker(
            "consumer.py",
            [str(datadir), "2", f"{seed}-{r}"],
            kill_after_s=rng.uniform(0.05, 0.6),
            cwd=tmp_path,
        )
        ctx = f"seed {seed} round {r}"
        expect_killed_or_done(run, "EMPTY", ctx)
        assert not run.words("CORRUPT"), f"{ctx}: corrupt bodies {run.words('CORRUPT')}"
        kills += run.killed_by_us
        got.extend((f"k{int(w[0]) % 8}", int(w[0])) for w in run.words("GOT"))
        acked |= {int(w[0]) for w in run.words("ACKED")}
        acking |= {int(w[0]) for w in run.words("ACKING")}
        if "EMPTY" in run.lines:
            break
    drained = drain(datadir, ALO_QUEUE, "g", **spec)
    verdict = check_consumer_history(set(range(n_messages)), got, acked, drained, acking)
    ctx = f"seed {seed}, {kills} kills"
    print(f"{ctx}: {len(acked)} acked by workers, {len(drained)} drained; {verdict.report()}")
    assert verdict.ok, f"{ctx}: {verdict.report()}"
    assert kills, f"{ctx}: no worker was killed mid-way; the test tested nothing"
    assert sent_never_acked(n_messages, acked), f"{ctx}: the workers acked everything"


def sent_never_acked(n_messages: int, acked: set[int]) -> int:
    """How many messages the final drain must deliver (nothing tested if 0)."""
    return n_messages - len(acked & set(range(n_messages)))


def test_consumer_killed_loses_nothing(tmp_path: Path, seed: int) -> None:
    consumer_scenario(tmp_path, seed, rounds=6, n_messages=20_000)


def at_most_once_scenario(tmp_path: Path, seed: int, rounds: int, per_round: int) -> None:
    rng = random.Random(seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    datadir = tmp_path / "data"
    attempted: set[int] = set()
    got: list[tuple[str, int]] = []
    corrupt: list[int] = []
    next_id = 0
    kills = 0
    for r in range(rounds):
        run = run_worker(
            "at_most_once.py",
            [str(datadir), str(next_id), str(per_round), f"{seed}-{r}"],
            kill_after_s=rng.uniform(0.05, 0.4),
            cwd=tmp_path,
        )
        expect_killed_or_done(run, "DONE", f"seed {seed} round {r}")
        kills += run.killed_by_us
        attempted |= run.ranges("TRY")
        got.extend((w[0], int(w[1])) for w in run.words("GOT"))
        corrupt.extend(int(w[0]) for w in run.words("CORRUPT"))
        next_id = max(attempted, default=next_id - 1) + 1
    verdict = check_at_most_once_history(attempted, got, corrupt)
    ctx = f"seed {seed}, {kills} kills"
    print(f"{ctx}: {len(attempted)} sent; {verdict.report()}")
    assert verdict.ok, f"{ctx}: {verdict.report()}"
    assert kills, f"{ctx}: no worker was killed mid-way; the test tested nothing"
    assert got, f"{ctx}: nothing was delivered; the test tested nothing"


def test_at_most_once_never_delivers_twice_across_kills(tmp_path: Path, seed: int) -> None:
    at_most_once_scenario(tmp_path, seed, rounds=5, per_round=5000)


ACK_LINGER_S = 0.005  # engine.Engine's default: group changes commit within this


def test_an_ack_is_durable_within_ack_linger(tmp_path: Path) -> None:
    """Kill the consumer 30x ack_linger_s after ``ack()`` returned: by then the ack is
    committed (engine invariant 4), so the message is never delivered again. This also
    bounds the duplicates a crash can cause, and keeps attempt numbers growing.

    Regression (fixed in d7a2641): the idle writer slept HOUSEKEEPING_S (0.25 s) and an
    ack did not wake it, so every round here redelivered message 0 at attempt 1."""
    datadir = tmp_path / "data"
    n = 4
    with arrival.connect(datadir) as broker:
        broker.create_queue(ALO_QUEUE, "at-least-once", max_deliveries=None)
        broker.producer().send_batch(ALO_QUEUE, [body_of(i) for i in range(n)])
    acks: list[tuple[str, int]] = []
    for _ in range(n):
        run = run_worker(
            "ack_then_wait.py",
            [str(datadir)],
            kill_after_s=30 * ACK_LINGER_S,
            kill_on="ACKED",
            cwd=tmp_path,
        )
        assert run.killed_by_us, run.stderr[-3000:]
        acks.extend((w[0], int(w[1])) for w in run.words("ACKED"))
    ids = [mid for mid, _attempt in acks]
    assert ids == [f"{ALO_QUEUE}:{i}" for i in range(n)], (
        f"acked more than {30 * ACK_LINGER_S:.2f} s before the kill, yet delivered again: "
        f"(id, attempt) per round = {acks}"
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_crash_long(tmp_path: Path, seed: int, request: pytest.FixtureRequest) -> None:
    skip_unless_slow_selected(request)
    for k in range(4):  # 40 kills, in four directories: each drain stays a modest size
        check_producer_scenario(tmp_path / f"p{k}", seed + k, rounds=10, crashpoint=None)
    for point in ("writer.before-commit=0.02", "writer.after-commit=0.02"):
        check_producer_scenario(tmp_path / point, seed, rounds=20, crashpoint=point)
    consumer_scenario(tmp_path / "c", seed, rounds=30, n_messages=150_000)
    at_most_once_scenario(tmp_path / "a", seed, rounds=30, per_round=5000)


# =====================================================================================
# the checkers must be able to fail
# =====================================================================================


def _drained(ids: Iterable[int], key: str | None = "k") -> list[Drained]:
    return [Drained(i, key, body_of(i), 1) for i in ids]


def test_producer_checker_flags_a_dropped_id() -> None:
    ok = check_producer_history({0, 1, 2, 3}, {0, 1, 2}, _drained([0, 1, 2, 3]))
    assert ok.ok
    assert ok.allowed["indeterminate sends stored"] == 1
    v = check_producer_history({0, 1, 2, 3}, {0, 1, 2}, _drained([0, 2, 3]))
    assert v.forbidden == {"lost (acknowledged, never delivered)": [1]}


def test_producer_checker_flags_duplicates_phantoms_corruption_and_reorders() -> None:
    v = check_producer_history({0, 1}, {0, 1}, _drained([0, 1, 1]))
    assert v.forbidden == {"duplicate in storage": [1]}
    v = check_producer_history({0, 1}, {0, 1}, _drained([0, 1, 7]))
    assert v.forbidden == {"phantom (delivered, never sent)": [7]}
    v = check_producer_history({0, 1}, {0, 1}, [*_drained([0]), Drained(1, "k", b"junk", 1)])
    assert v.forbidden == {"corrupt (body does not match id)": [1]}
    v = check_producer_history({0, 1}, {0, 1}, _drained([1, 0]))
    assert v.forbidden == {"reorder per key": [("k", 1, 0)]}
    assert check_producer_history({0, 1}, {0, 1}, _drained([1, 0], key=None)).ok


def test_consumer_checker_flags_a_lost_message() -> None:
    got = [("k", 0), ("k", 1), ("k", 2)]
    ok = check_consumer_history({0, 1, 2, 3}, got, {0, 1}, _drained([1, 2, 3]))
    assert ok.ok
    assert ok.allowed["redelivered after a reported ack"] == 1
    v = check_consumer_history({0, 1, 2, 3}, got, {0, 1}, _drained([3]))
    assert v.forbidden == {"lost (never acked, not delivered by the drain)": [2]}
    # an ack called but never reported returned may have committed: 2 is in doubt, not lost
    v = check_consumer_history({0, 1, 2, 3}, got, {0, 1}, _drained([3]), acking={1, 2})
    assert v.ok
    assert v.allowed["ack in flight at a kill, then committed"] == 1
    # ...but only ids whose ack was called: 3 was never acked and must come back
    v = check_consumer_history({0, 1, 2, 3}, got, {0, 1}, [], acking={2})
    assert v.forbidden == {"lost (never acked, not delivered by the drain)": [3]}
    v = check_consumer_history({0, 1}, [("k", 1), ("k", 0)], {0, 1}, [])
    assert v.forbidden == {"reorder per key": [("k", 1, 0)]}


def test_at_most_once_checker_flags_a_duplicate() -> None:
    assert check_at_most_once_history({1, 2}, [("g", 1), ("h", 1), ("g", 2)], []).ok
    v = check_at_most_once_history({1, 2}, [("g", 1), ("g", 2), ("g", 1)], [])
    assert v.forbidden == {"duplicate delivery": [("g", 1)]}
    v = check_at_most_once_history({1}, [("g", 5)], [5])
    assert set(v.forbidden) == {"phantom", "corrupt"}


def test_the_harness_sees_a_kill_and_discards_a_torn_line(tmp_path: Path) -> None:
    """A worker killed mid-line: the torn line is not recorded, the complete ones are."""
    script = tmp_path / "torn.py"
    script.write_text(
        "import os, signal, sys\n"
        "sys.stdout.write('READY\\nACK 1 1\\nACK 2'); sys.stdout.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = run_worker(str(script), [], kill_after_s=5.0, cwd=tmp_path)
    assert run.returncode == -signal.SIGKILL
    assert not run.killed_by_us
    assert run.lines == ["READY", "ACK 1 1"]
    assert run.ranges("ACK") == {1}
    slow = tmp_path / "slow.py"
    slow.write_text("import time\nprint('READY', flush=True)\ntime.sleep(60)\n")
    started = time.monotonic()
    run = run_worker(str(slow), [], kill_after_s=0.1, cwd=tmp_path)
    assert run.killed_by_us
    assert run.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10
